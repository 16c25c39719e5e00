#!/usr/bin/env python
"""Evaluate a checkpoint over a corpus split: CLIP R@1 / Sim or oracle metrics.

    python scripts/evaluate.py ckpt_path=outputs/train/RUN/checkpoints/last.ckpt
    python scripts/evaluate.py ckpt_path=... evaluator=oracle split=val
    python scripts/evaluate.py ckpt_path=... evaluator.model=ViT-L-14 evaluator.pretrained=/path/to/weights.bin
    torchrun --nproc_per_node=8 scripts/evaluate.py ckpt_path=... data=df415
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from amortized3d.console import setup_console

    setup_console()  # Lightning's lines once, no tips (amortized3d/console.py)
    import torch

    from amortized3d.evaluation.evaluate import evaluate

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        evaluate(cfg)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
