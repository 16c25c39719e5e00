"""Train each guidance x generator on the same world and tabulate the final metrics.

Each run is a separate ``scripts/train.py`` process (its own Hydra output directory), so a
comparison is exactly what a user would get running the commands one by one.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class RunResult:
    generator: str
    guidance: str
    output_dir: Path
    wall_seconds: float
    returncode: int

    def metrics(self) -> dict:
        path = self.output_dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def train_command(root: Path, out: Path, generator: str, guidance: str, overrides: Sequence[str]) -> list[str]:
    """The ``scripts/train.py`` command line of one cell of the table."""
    return [sys.executable, str(root / "scripts" / "train.py"), f"generator={generator}", f"guidance={guidance}",
            f"hydra.run.dir={out / f'{generator}-{guidance}'}", *overrides]


def run_one(root: Path, out: Path, generator: str, guidance: str, overrides: Sequence[str]) -> RunResult:
    run_dir = out / f"{generator}-{guidance}"
    cmd = train_command(root, out, generator, guidance, overrides)
    t0 = time.perf_counter()
    with open(out / f"{generator}-{guidance}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT).returncode
    return RunResult(generator, guidance, run_dir, time.perf_counter() - t0, rc)


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown_table(results: Sequence[RunResult], split: str = "train") -> str:
    """guidance x generator rows: oracle R@1 / PSNR (seen prompts and held-out), s/step vs SDS, wall time."""
    rows = ["| generator | guidance | R@1 (train) | PSNR dB (train) | R@1 (held-out) | PSNR dB (held-out) "
            "| s/step | s/step ÷ SDS | wall min |", "|---|---|---|---|---|---|---|---|---|"]
    per_step = {}
    for r in results:
        m = r.metrics()
        steps = m.get("training", {}).get("steps") or 0
        per_step[(r.generator, r.guidance)] = m.get("training", {}).get("seconds_per_step") or (
            r.wall_seconds / steps if steps else None)
    for r in results:
        m = r.metrics().get("oracle", {})
        seen = m.get(split, {}).get("overall", {})
        held = m.get("val", {}).get("held_out", {})
        sps = per_step[(r.generator, r.guidance)]
        sds = per_step.get((r.generator, "sds"))
        ratio = sps / sds if (sps and sds) else None
        status = "" if r.returncode == 0 else f" (failed: rc {r.returncode})"
        rows.append(f"| {r.generator} | {r.guidance}{status} | {_fmt(seen.get('r_at_1'), '.3f')} | "
                    f"{_fmt(seen.get('psnr'), '.2f')} | {_fmt(held.get('r_at_1'), '.3f')} | "
                    f"{_fmt(held.get('psnr'), '.2f')} | {_fmt(sps, '.2f')} | {_fmt(ratio, '.2f')} | "
                    f"{r.wall_seconds / 60:.1f} |")
    return "\n".join(rows)


def compare(root: Path, out: Path, generators: Sequence[str], guidances: Sequence[str],
            overrides: Sequence[str] = ()) -> str:
    out.mkdir(parents=True, exist_ok=True)
    results = [run_one(root, out, g, s, overrides) for g in generators for s in guidances]
    table = markdown_table(results)
    settings = " ".join(overrides) or "defaults"
    (out / "comparison.md").write_text(f"Primitives world, oracle metrics of the end-of-run evaluation; overrides: "
                                       f"`{settings}`.\n\n{table}\n")
    (out / "comparison.json").write_text(json.dumps(
        [{"generator": r.generator, "guidance": r.guidance, "wall_seconds": r.wall_seconds,
          "returncode": r.returncode, "metrics": r.metrics()} for r in results], indent=2))
    return table
