#!/usr/bin/env python
"""Train every guidance x generator on the primitives world and write a Markdown table.

    python scripts/compare.py --out outputs/compare --guidances sds vsd l2vsd --generators hyper_ingp ingp
    python scripts/compare.py --out outputs/compare --dry-run     # the commands, one per table cell
    python scripts/compare.py --out outputs/compare -- trainer.max_steps=300   # Hydra overrides after --
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amortized3d.evaluation.compare import compare, train_command  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generators", nargs="+", default=["hyper_ingp"])
    parser.add_argument("--guidances", nargs="+", default=["sds", "csd", "vsd", "lvsd", "l2vsd", "asd", "sdi"])
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    if args.dry_run:
        for g in args.generators:
            for s in args.guidances:
                print(" ".join(train_command(ROOT, args.out, g, s, args.overrides)))
        return
    print(compare(ROOT, args.out, args.generators, args.guidances, args.overrides))


if __name__ == "__main__":
    main()
