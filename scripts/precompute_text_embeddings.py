#!/usr/bin/env python
"""Build the text-embedding cache of a corpus once, before training:

    python scripts/precompute_text_embeddings.py data=primitives prior=stable_diffusion \
        prior.pretrained_model_name_or_path=/models/sd21base precompute.tokens=true
"""
import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="precompute_text_embeddings")
def main(cfg: DictConfig) -> None:
    from amortized3d.text.precompute import precompute_text_embeddings

    p = cfg.precompute
    facts = precompute_text_embeddings(cfg, list(p.splits) if p.splits else None, bool(p.tokens), int(p.batch_size))
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
