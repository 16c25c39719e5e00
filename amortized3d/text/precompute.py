"""Precompute the text-embedding cache of a corpus with a prior's text encoder (before training).

Training builds the same files on demand (``build.build_model``); running this first keeps the
encoder off the training GPUs and lets every rank of a large run start from a warm cache.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from amortized3d.corpora import load_corpus
from amortized3d.text.cache import EmbeddingCache

log = logging.getLogger(__name__)


def precompute_text_embeddings(cfg: DictConfig, splits: list[str] | None = None, tokens: bool = False,
                               batch_size: int = 256) -> dict[str, dict]:
    """Build (or verify) the pooled — and optionally token — cache of each split; returns file facts."""
    corpus = load_corpus(cfg.data.corpus_path or cfg.data.corpus, search_dirs=[cfg.paths.corpora_dir])
    encoder = hydra.utils.instantiate(cfg.prior.text_encoder)
    cache = EmbeddingCache(Path(cfg.paths.cache_dir) / "text")
    out: dict[str, dict] = {}
    for split in splits or [cfg.data.train_split]:
        prompts = list(corpus.unique(split))
        for kind in ("pooled", "tokens") if tokens else ("pooled",):
            table = cache.load_or_build(encoder, corpus.name, prompts, batch_size=batch_size, kind=kind,
                                        dtype=torch.float16)
            entry = cache.entry(encoder, corpus.name, prompts, kind)
            size = entry.array_path.stat().st_size
            out[f"{split}/{kind}"] = {"path": str(entry.array_path), "shape": list(table.shape), "bytes": size,
                                      "bytes_per_prompt": size / max(len(prompts), 1)}
            log.info("%s %s: %s, %.0f bytes/prompt", split, kind, entry.array_path, size / max(len(prompts), 1))
    return out
