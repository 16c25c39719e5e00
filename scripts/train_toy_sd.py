#!/usr/bin/env python
"""Train (or restore from the cache) a toy Stable Diffusion of the primitives world and write it to --out.

    python scripts/train_toy_sd.py --out DIR [--prediction-type epsilon|v_prediction] [--seed N] [--unet-steps N]

DIR gets the SD-2.1 diffusers layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json),
``toy_sd.json`` (config, losses, seconds), ``quality.json`` and ``samples.png`` (amortized3d/toy_sd/quality.py).
Use it with ``python scripts/train.py experiment=toy_sd prior.pretrained_model_name_or_path=DIR``.
"""
import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the model to")
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, default=None,
                        help="UNet + text encoder training steps (default: ToySDConfig's); a smaller budget is "
                             "its own cached model (the R@1-against-toy-training-time curve, docs/results.md)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a loaded 2-core machine two threads spin-wait, 10x slower)")
    parser.add_argument("--no-quality", action="store_true", help="skip the quality measurement")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from amortized3d.toy_sd.cache import cache_root, ensure_toy_sd
    from amortized3d.toy_sd.config import ToySDConfig
    from amortized3d.toy_sd.quality import measure
    from amortized3d.toy_sd.train import rich_progress

    budget = {} if args.unet_steps is None else {"unet_steps": args.unet_steps}
    cfg = ToySDConfig(prediction_type=args.prediction_type, seed=args.seed, **budget)
    t0, c0 = time.time(), time.process_time()
    progress, stop = rich_progress()
    try:
        cached = ensure_toy_sd(cfg, progress=progress)
    finally:
        stop()
    build = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "load_average": os.getloadavg()}
    print(f"toy SD {cfg.digest()}: {cached} ({build['wall_s']:.0f} s wall, {build['cpu_s']:.0f} s CPU, "
          f"load {build['load_average'][0]:.1f})")
    if not args.no_quality and not (cached / "quality.json").is_file():
        measure(cached, cfg, str(cache_root()))
    out = Path(args.out).expanduser()
    if out.resolve() != cached.resolve():
        shutil.copytree(cached, out, dirs_exist_ok=True)
    if (out / "quality.json").is_file():
        q = json.loads((out / "quality.json").read_text())
        print(f"sample R@1 {q['sample_r_at_1']:.3f} (DDIM {q['sampler']['steps']}, CFG {q['sampler']['guidance_scale']}), "
              f"view accuracy {q['sample_view_accuracy']:.3f}; grid {out / 'samples.png'}")
    print(f"wrote {out}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
