#!/usr/bin/env python
"""The L²-VSD paper's 2D Gaussian experiment (App. F) with SDS, VSD, L-VSD and L²-VSD.

    python scripts/gaussian_2d.py --seeds 0 1 2 --out gaussian_2d.json
    python scripts/gaussian_2d.py --methods vsd l2vsd --eta 0.1 --steps 500

Prints a table (means over seeds) and writes every run, with its trajectory, as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import asdict, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from amortized3d.toys.gaussian_2d import METHODS, ToyConfig, compare, format_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--log-every", type=int, default=10, help="trajectory resolution in the JSON (0: none)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    hints = typing.get_type_hints(ToyConfig)
    for f in fields(ToyConfig):  # every experiment setting is a flag, with the library's default
        if f.name == "seed":
            continue
        hint, flag = hints[f.name], "--" + f.name.replace("_", "-")
        if typing.get_origin(hint) is tuple:
            p.add_argument(flag, nargs=2, type=float, default=list(f.default), metavar=("B1", "B2"))
        else:
            kind = next((t for t in (int, float, str) if t in (hint, *typing.get_args(hint))), str)
            p.add_argument(flag, type=kind, default=f.default)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = {f.name: getattr(args, f.name) for f in fields(ToyConfig) if f.name != "seed"}
    settings["score_betas"] = tuple(settings["score_betas"])
    cfg = ToyConfig(**settings)
    results = compare(args.methods, args.seeds, cfg, args.log_every)
    table = format_table(results)
    print(f"after {cfg.steps} steps, means over seeds {args.seeds}:\n{table}")
    report = {"config": asdict(cfg), "seeds": args.seeds, "table": table, "runs": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
