"""Construction: every part of a run from the composed Hydra config.

Training (``train.py``), evaluation and export (``evaluation/checkpoint.py``) and the benchmarks
build through here, so the three cannot drift apart. Evaluation and export build only the
model (:func:`build_model`): no prior, no guidance, no optimiser.

Parts are instantiated in a fixed order (text encoder, text table, generator, renderer, then
prior and guidance; backgrounds draw nothing): initialisations draw from the global RNG seeded
by the run, so this order is part of what makes a run reproducible.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from amortized3d.cameras import CameraRanges
from amortized3d.corpora import Corpus, load_corpus
from amortized3d.guidance.base import Guidance
from amortized3d.model import AmortizedModel
from amortized3d.system import AmortizedSystem
from amortized3d.text.cache import EmbeddingCache


def camera_ranges(cfg: DictConfig) -> CameraRanges:
    c = cfg.data.camera
    return CameraRanges(distance=tuple(c.distance), fovy_deg=tuple(c.fovy_deg),
                        elevation_deg=tuple(c.elevation_deg), azimuth_deg=tuple(c.azimuth_deg))


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain data (stored in checkpoints), without Hydra's own node."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}


def load_run_corpus(cfg: DictConfig) -> Corpus:
    """The corpus the config names (``data.corpus_path`` or the named ``data.corpus``)."""
    return load_corpus(cfg.data.corpus_path or cfg.data.corpus, search_dirs=[cfg.paths.corpora_dir])


def run_corpus(cfg: DictConfig, corpus: Corpus) -> Corpus:
    """The corpus as this run sees it: with ``data.prompt_index`` (experiment/*_per_prompt.yaml,
    one prompt per run) its train split is that one prompt; the other splits are kept."""
    prompt_index = OmegaConf.select(cfg, "data.prompt_index", throw_on_missing=True)  # "???": must be chosen
    if prompt_index is not None:
        return corpus.with_train_prompt(int(prompt_index), cfg.data.train_split)
    return corpus


def build_model(cfg: DictConfig, corpus: Corpus, train_prompts: Sequence[str] | None = None) -> AmortizedModel:
    """Text encoder, text table, generator, renderer and evaluation background.

    ``train_prompts``: the prompts the generator is bound to, in order (a checkpoint's own list, so
    per-prompt fields stay with their prompts whatever the corpus file says today); by default
    the train split of ``corpus`` (see :func:`run_corpus`). Sets ``cfg.data.num_train_prompts`` (generators size
    their per-prompt tables by it).
    """
    train_prompts = list(corpus.unique(cfg.data.train_split) if train_prompts is None else train_prompts)
    with open_dict(cfg):
        cfg.data.num_train_prompts = len(train_prompts)
    text_encoder = hydra.utils.instantiate(cfg.prior.text_encoder)
    text_table = EmbeddingCache(Path(cfg.paths.cache_dir) / "text").load_or_build_shared(
        text_encoder, corpus.name, train_prompts)
    generator = hydra.utils.instantiate(cfg.generator)
    renderer = hydra.utils.instantiate(cfg.renderer)
    return AmortizedModel(generator, renderer, text_encoder, train_prompts, text_table,
                          eval_background=hydra.utils.instantiate(cfg.system.background.eval))


def build_prior(cfg: DictConfig) -> Any:
    """The frozen 2D prior (analytic world or Stable Diffusion)."""
    return hydra.utils.instantiate(cfg.prior.model)


def build_guidance(cfg: DictConfig, prior: Any) -> Guidance:
    guidance_cfg = OmegaConf.to_container(cfg.guidance, resolve=True)
    guidance_cfg.pop("name", None)
    return hydra.utils.instantiate(guidance_cfg, prior=prior)


def build_system(cfg: DictConfig, corpus: Corpus | None = None, *, prior: Any = None
                 ) -> tuple[AmortizedSystem, Any, Corpus]:
    """(system, prior, corpus) for training; ``prior``: reuse an already built one (the full-size
    SD benchmark shares one UNet between guidances) instead of building it from the config."""
    corpus = run_corpus(cfg, corpus or load_run_corpus(cfg))
    model = build_model(cfg, corpus)
    prior = build_prior(cfg) if prior is None else prior
    guidance = build_guidance(cfg, prior)
    system = AmortizedSystem(
        model, guidance, optimizer=OmegaConf.to_container(cfg.system.optimizer, resolve=True),
        loss_weights=OmegaConf.to_container(cfg.system.loss_weights, resolve=True),
        views_per_prompt=cfg.system.views_per_prompt, resolution=cfg.system.resolution,
        camera_ranges=camera_ranges(cfg), train_background=hydra.utils.instantiate(cfg.system.background.train),
        seed=cfg.seed, val_views=cfg.system.val_views,
        config=resolved_config(cfg), max_consecutive_nonfinite=cfg.system.get("max_consecutive_nonfinite", 5))
    return system, prior, corpus
