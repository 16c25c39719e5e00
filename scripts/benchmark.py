#!/usr/bin/env python
"""Speed/memory benchmarks as ratios measured in one run.

    python scripts/benchmark.py                       # all below but conv3d_memory
    python scripts/benchmark.py --only hash_grid --json out.json
    python scripts/benchmark.py --only render         # rays/s of training and evaluation renders
    python scripts/benchmark.py --only render_sd      # the training render at the SD prior's sizes (no SD loaded)
    python scripts/benchmark.py --only mlp [--compile] # generated MLP heads fwd+bwd: old, fused, chunked (+ torch.compile)
    python scripts/benchmark.py --only cache_size     # bytes per prompt of the text cache
    python scripts/benchmark.py --only conv3d_memory  # 3DConv-net params + peak memory per prompt (minutes on CPU)
    python scripts/benchmark.py --only scale --sizes 15 100000 1000000  # R@1 s/prompt, data s/step, old vs new
    python scripts/benchmark.py --only ingp_step --sizes 15 1000 13551  # per-prompt iNGP update: dense vs sparse
    python scripts/benchmark.py --only sd_fullsize --guidances sds vsd l2vsd --steps 1 [--dtype bf16] [--device cuda]
        # SD-2.1-base architecture, random weights: each guidance's training step by part, interleaved
        # (--model-dir DIR reuses / --write-model DIR only writes the random model; --size tiny: smoke;
        # a guidance with its own settings: l2vsd@jvp=exact)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortized3d.allocator import MODES, configure_cpu_allocator  # noqa: E402
from amortized3d.benchmark import (bench_cache_size, bench_conv3d_memory, bench_hash_grid, bench_mlp,  # noqa: E402
                                   bench_render, bench_render_sd, bench_training_steps, write_report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["hash_grid", "mlp", "render", "render_sd", "steps", "cache_size", "conv3d_memory", "scale",
                                           "ingp_step", "sd_fullsize"],
                        default=None, help="default: all but conv3d_memory and sd_fullsize (minutes on a CPU)")
    parser.add_argument("--guidances", nargs="+", default=None,
                        help="default: sds csd vsd lvsd l2vsd asd sdi (steps), sds vsd l2vsd (sd_fullsize)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="sd_fullsize: the prior's dtype")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="sd_fullsize")
    parser.add_argument("--steps", type=int, default=1, help="sd_fullsize: measured steps per guidance")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="sd_fullsize: tiny = smoke test")
    parser.add_argument("--model-dir", default=None, help="sd_fullsize: reuse a model written by --write-model")
    parser.add_argument("--write-model", default=None, metavar="DIR",
                        help="only write the SD-2.1-base architecture with random weights to DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpoint", default=None,
                        help="render: the trained fields of this run's checkpoint (with the run's --override)")
    parser.add_argument("--points", type=int, default=65536)
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides for the step benchmark")
    parser.add_argument("--conv3d", nargs=3, type=int, default=[128, 32, 1], metavar=("RES", "CH", "MULT"),
                        help="3DConv-net grid resolution, channels, channel multiplier")
    parser.add_argument("--sizes", nargs="*", type=int, default=None, help="corpus sizes for --only scale / ingp_step")
    parser.add_argument("--compile", action="store_true", help="mlp: also torch.compile the old path (start-up cost)")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--cpu-allocator", choices=MODES, default="keep_freed",
                        help="glibc's handling of large blocks for this process (amortized3d/allocator.py; "
                             "train.yaml's cpu_allocator)")
    args = parser.parse_args()
    print(f"cpu allocator: {args.cpu_allocator} (applied: {configure_cpu_allocator(args.cpu_allocator)})")
    if args.write_model:
        from amortized3d.benchmark_sd import write_sd21_base

        print(write_sd21_base(args.write_model))
        return
    rows = []
    if args.only in (None, "hash_grid"):
        rows += bench_hash_grid(args.points, rounds=args.rounds)
    if args.only in (None, "mlp"):
        rows += bench_mlp(rounds=args.rounds, compile=args.compile)
    if args.only in (None, "render"):
        rows += bench_render(args.override, rounds=args.rounds, checkpoint=args.checkpoint)
    if args.only == "render_sd":
        rows += bench_render_sd(rounds=args.rounds, overrides=args.override)
    guidances = args.guidances or ["sds", "csd", "vsd", "lvsd", "l2vsd", "asd", "sdi"]
    if args.only in (None, "steps", "sd_fullsize"):
        configs = Path(__file__).resolve().parents[1] / "configs" / "guidance"
        missing = [g for g in (g.partition("@")[0] for g in args.guidances or []) if not (configs / f"{g}.yaml").exists()]
        if missing:
            raise SystemExit(f"unknown guidances {missing}; valid: {sorted(p.stem for p in configs.glob('*.yaml'))}")
    if args.only in (None, "steps"):
        rows += bench_training_steps(guidances, args.override, rounds=args.rounds)
    if args.only in (None, "cache_size"):
        rows += bench_cache_size()
    if args.only == "conv3d_memory":
        res, ch, mult = args.conv3d
        rows += bench_conv3d_memory(res, ch, channel_multiplier=mult, checkpointing=(False, True))
    if args.only == "scale":
        from amortized3d.benchmark_scale import bench_scale
        rows += bench_scale(args.sizes, rounds=min(args.rounds, 3))
    if args.only == "ingp_step":
        from amortized3d.benchmark_scale import bench_ingp_step
        rows += bench_ingp_step(*([args.sizes] if args.sizes else []), rounds=args.rounds)
    if args.only == "sd_fullsize":
        from amortized3d.benchmark_sd import bench_sd_fullsize, format_table

        sd_rows = bench_sd_fullsize(args.guidances or ["sds", "vsd", "l2vsd"], dtype=args.dtype, device=args.device,
                                    steps=args.steps, overrides=args.override, model_dir=args.model_dir,
                                    size=args.size)
        print(format_table(sd_rows))
        rows += sd_rows
    print(write_report(rows, args.json))


if __name__ == "__main__":
    main()
