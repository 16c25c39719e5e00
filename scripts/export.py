#!/usr/bin/env python
"""Turntable video or vertex-coloured mesh of any prompt from a checkpoint.

    python scripts/export.py ckpt_path=outputs/train/RUN/checkpoints/last.ckpt prompt="a green torus" format=mp4
    python scripts/export.py ckpt_path=... prompt="a red cube" format=[gif,glb] mesh.resolution=128
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="export")
def main(cfg: DictConfig) -> None:
    from amortized3d.console import setup_console

    setup_console()  # Lightning's lines once, no tips (amortized3d/console.py)
    from amortized3d.evaluation.exporting import export

    for path in export(cfg):
        print(path)


if __name__ == "__main__":
    main()
