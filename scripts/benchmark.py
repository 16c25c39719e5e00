#!/usr/bin/env python
"""Speed/memory benchmarks as ratios measured in one run.

    python scripts/benchmark.py                       # all below but conv3d_memory
    python scripts/benchmark.py --only hash_grid --json out.json
    python scripts/benchmark.py --only render         # rays/s of training and evaluation renders
    python scripts/benchmark.py --only cache_size     # bytes per prompt of the text cache
    python scripts/benchmark.py --only conv3d_memory  # 3DConv-net params + peak memory per prompt (minutes on CPU)
    python scripts/benchmark.py --only scale --sizes 15 100000 1000000  # R@1 s/prompt, data s/step, old vs new
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortized3d.benchmark import (bench_cache_size, bench_conv3d_memory, bench_hash_grid, bench_render,  # noqa: E402
                                   bench_training_steps, write_report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["hash_grid", "render", "steps", "cache_size", "conv3d_memory", "scale"],
                        default=None, help="default: all but conv3d_memory (minutes on a CPU)")
    parser.add_argument("--guidances", nargs="+", default=["sds", "csd", "vsd", "lvsd", "l2vsd", "asd", "sdi"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--points", type=int, default=65536)
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides for the step benchmark")
    parser.add_argument("--conv3d", nargs=3, type=int, default=[128, 32, 1], metavar=("RES", "CH", "MULT"),
                        help="3DConv-net grid resolution, channels, channel multiplier")
    parser.add_argument("--sizes", nargs="*", type=int, default=None, help="corpus sizes for --only scale")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    if args.only in (None, "hash_grid"):
        rows += bench_hash_grid(args.points, rounds=args.rounds)
    if args.only in (None, "render"):
        rows += bench_render(args.override, rounds=args.rounds)
    if args.only in (None, "steps"):
        configs = Path(__file__).resolve().parents[1] / "configs" / "guidance"
        missing = [g for g in args.guidances if not (configs / f"{g}.yaml").exists()]
        if missing:
            raise SystemExit(f"unknown guidances {missing}; valid: {sorted(p.stem for p in configs.glob('*.yaml'))}")
        rows += bench_training_steps(args.guidances, args.override, rounds=args.rounds)
    if args.only in (None, "cache_size"):
        rows += bench_cache_size()
    if args.only == "conv3d_memory":
        res, ch, mult = args.conv3d
        rows += bench_conv3d_memory(res, ch, channel_multiplier=mult, checkpointing=(False, True))
    if args.only == "scale":
        from amortized3d.benchmark_scale import bench_scale
        rows += bench_scale(args.sizes, rounds=min(args.rounds, 3))
    print(write_report(rows, args.json))


if __name__ == "__main__":
    main()
