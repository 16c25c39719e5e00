#!/usr/bin/env python
"""Train a text-to-3D generator: python scripts/train.py generator=hyper_ingp guidance=l2vsd"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="train")
def main(cfg: DictConfig) -> None:
    from amortized3d.run_guard import Interrupted, RunError, validate_config

    try:
        validate_config(cfg)  # a mistyped value is reported in ~1 s, not after importing Lightning (~12 s)
        from amortized3d.console import report_outputs, setup_console

        setup_console()  # Lightning's lines once, no tips (amortized3d/console.py)
        from amortized3d.train import train

        train(cfg)
        report_outputs(cfg.paths.output_dir)
    except RunError as e:  # a failure the user can act on: its message, no traceback
        print(str(e) if isinstance(e, Interrupted) else f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
