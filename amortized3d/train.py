"""``train(cfg)``: build every part from the composed Hydra config, fit, evaluate, write artifacts.

Outputs under ``cfg.paths.output_dir`` (= ``hydra.run.dir``)::

    checkpoints/last.ckpt, checkpoints/step_XXXXXX.ckpt   (atomic writes)
    csv/metrics.csv (or wandb/)                            training logs
    renders/val/step_XXXXXX.png                            validation grids
    videos/<prompt>.mp4                                    turntables of the val prompts
    metrics.json                                           final evaluation
"""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from amortized3d.benchmark_steps import StepTimer
from amortized3d.cameras import CameraRanges
from amortized3d.checkpoint_io import AtomicCheckpointIO, atomic_write
from amortized3d.corpora import load_corpus
from amortized3d.data import PromptDataModule
from amortized3d.evaluation.final import evaluate_run
from amortized3d.system import AmortizedSystem
from amortized3d.text.cache import EmbeddingCache

log = logging.getLogger(__name__)


def camera_ranges(cfg: DictConfig) -> CameraRanges:
    c = cfg.data.camera
    return CameraRanges(distance=tuple(c.distance), fovy_deg=tuple(c.fovy_deg),
                        elevation_deg=tuple(c.elevation_deg), azimuth_deg=tuple(c.azimuth_deg))


def build_system(cfg: DictConfig, corpus=None, *, with_guidance: bool = True) -> tuple[AmortizedSystem, Any, Any]:
    """(system, prior, corpus) from a composed config; used by training, evaluation and export.

    ``with_guidance=False`` builds neither the prior nor the guidance (prior is None): enough to
    render, and it skips loading e.g. Stable Diffusion's UNet and VAE for CLIP evaluation or export.
    """
    corpus = corpus or load_corpus(cfg.data.corpus_path or cfg.data.corpus, search_dirs=[cfg.paths.corpora_dir])
    prompt_index = OmegaConf.select(cfg, "data.prompt_index", throw_on_missing=True)  # "???": must be chosen
    if prompt_index is not None:  # one prompt per run (experiment/*_per_prompt.yaml)
        corpus = corpus.with_train_prompt(int(prompt_index), cfg.data.train_split)
    train_prompts = list(corpus.unique(cfg.data.train_split))
    with open_dict(cfg):
        cfg.data.num_train_prompts = len(train_prompts)
    text_encoder = hydra.utils.instantiate(cfg.prior.text_encoder)
    text_table = EmbeddingCache(Path(cfg.paths.cache_dir) / "text").load_or_build_shared(
        text_encoder, corpus.name, train_prompts)
    generator = hydra.utils.instantiate(cfg.generator)
    renderer = hydra.utils.instantiate(cfg.renderer)
    prior = guidance = None
    if with_guidance:
        prior = hydra.utils.instantiate(cfg.prior.model)
        guidance_cfg = OmegaConf.to_container(cfg.guidance, resolve=True)
        guidance_cfg.pop("name", None)
        guidance = hydra.utils.instantiate(guidance_cfg, prior=prior)
    system = AmortizedSystem(
        generator=generator, renderer=renderer, guidance=guidance, text_encoder=text_encoder,
        train_prompts=train_prompts, text_table=text_table,
        optimizer=OmegaConf.to_container(cfg.system.optimizer, resolve=True),
        loss_weights=OmegaConf.to_container(cfg.system.loss_weights, resolve=True),
        views_per_prompt=cfg.system.views_per_prompt, resolution=cfg.system.resolution,
        camera_ranges=camera_ranges(cfg),
        train_background=hydra.utils.instantiate(cfg.system.background.train),
        eval_background=hydra.utils.instantiate(cfg.system.background.eval),
        seed=cfg.seed, val_views=cfg.system.val_views,
        config=resolved_config(cfg))
    return system, prior, corpus


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain data (stored in checkpoints), without Hydra's own node."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}


def _instantiate_group(group: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def train(cfg: DictConfig) -> dict:
    """Fit the configured system and return the final metrics (also written to metrics.json)."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    system, prior, corpus = build_system(cfg)
    datamodule = PromptDataModule(system.train_prompts, corpus.unique(cfg.data.val_split),
                                  batch_size=cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
    timer = StepTimer()
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=_instantiate_group(cfg.get("logger")) or False,
        callbacks=[*_instantiate_group(cfg.get("callbacks")), timer], plugins=[AtomicCheckpointIO()])
    trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        # ModelCheckpoint saves every N steps; the final state must be last.ckpt too (all ranks call).
        trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
    metrics: dict = {}
    if trainer.is_global_zero:
        metrics = evaluate_run(system, prior, corpus, cfg.evaluation, output_dir)
        metrics["training"] = {"steps": system.batch_index, "generator_updates": trainer.global_step,
                               "nonfinite_steps": system.nonfinite_steps,
                               "seconds_per_step": statistics.median(timer.seconds[1:] or timer.seconds or [0.0]),
                               "generator": cfg.generator._target_.rsplit(".", 1)[-1],
                               "guidance": cfg.guidance.get("name")}
        atomic_write(output_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        log.info("metrics written to %s", output_dir / "metrics.json")
    return metrics
