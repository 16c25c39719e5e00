"""``train(cfg)``: build every part (:mod:`amortized3d.build`), fit, evaluate, write artifacts.

Outputs under ``cfg.paths.output_dir`` (= ``hydra.run.dir``)::

    checkpoints/last.ckpt, checkpoints/step_XXXXXX.ckpt   (atomic writes)
    csv/metrics.csv (or wandb/)                            training logs
    renders/val/step_XXXXXX.png                            validation grids
    videos/<prompt>.mp4                                    turntables of the val prompts
    metrics.json                                           final evaluation

Failures the user can act on raise :class:`amortized3d.run_guard.RunError` (``scripts/train.py``
prints one ``error: ...`` line and exits non-zero): mistyped config values (2), a run dir that
already holds checkpoints, off-world prompts, a resume into another experiment (4), divergence
(3), and preemption by SIGTERM/SIGUSR1/SIGINT (``last.ckpt`` saved, exit 128 + signal number).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from amortized3d.allocator import configure_cpu_allocator
from amortized3d.atomic import atomic_write
from amortized3d.build import build_system, load_run_corpus, resolved_config
from amortized3d.callbacks import PreemptionHandler
from amortized3d.checkpoint_io import AtomicCheckpointIO
from amortized3d.data import PromptDataModule
from amortized3d.evaluation.final import evaluate_run
from amortized3d.run_guard import (check_corpus_splits, check_run_dir, check_text_encoder,
                                   check_world_prompts, clean_stale_temp_files, compare_resume, load_checkpoint_meta,
                                   validate_config)
from amortized3d.scenes.world import build_world
from amortized3d.step_timer import StepTimer

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def _instantiate_loggers(group: DictConfig | None, meta: dict | None) -> list:
    """The configured loggers; on resume wandb continues the checkpoint's run (its id, resume=allow)."""
    loggers = []
    for c in (group or {}).values():
        if c is None or "_target_" not in c:
            continue
        extra = {}
        if meta and meta.get("wandb_id") and str(c["_target_"]).endswith("WandbLogger") and not c.get("id"):
            extra = {"id": meta["wandb_id"], "resume": "allow"}
        loggers.append(hydra.utils.instantiate(c, **extra))
    return loggers


def _continue_csv_logs(loggers: list, meta: dict) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv: keep the rows logged before the
    checkpoint (later ones are logged again by the resumed run) so the log covers every segment."""
    if rank_zero_only.rank != 0:
        return
    resume_step = meta.get("batches_that_stepped")
    resume_step = int(meta["global_step"] if resume_step is None else resume_step)
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if _csv_step(r) < resume_step]
        writer = logger.experiment  # creating Lightning's writer removes the file
        writer.metrics_keys = sorted(header)
        buffer = io.StringIO(newline="")
        out = csv.DictWriter(buffer, fieldnames=writer.metrics_keys)
        out.writeheader()
        out.writerows(rows)
        atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))
        log.info("resume: %s continues (%d rows before step %d kept)", path, len(rows), resume_step)


def _csv_step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def _checkpoint_dir(cfg: DictConfig, output_dir: Path) -> Path:
    ckpt_cfg = (cfg.get("callbacks") or {}).get("checkpoint")
    return Path(ckpt_cfg.dirpath) if ckpt_cfg is not None and ckpt_cfg.get("dirpath") else output_dir / "checkpoints"


def train(cfg: DictConfig) -> dict:
    """Fit the configured system and return the final metrics (also written to metrics.json).

    Before anything expensive: typed config values, the run dir (a fresh run refuses existing
    checkpoints unless ``overwrite=true``; stale temp files of killed writers are removed), the
    corpus against the analytic world's grammar, and on resume the checkpoint's experiment
    against this one (:mod:`amortized3d.run_guard`). Failures raise ``RunError``.
    """
    validate_config(cfg)
    configure_cpu_allocator(str(cfg.get("cpu_allocator", "default")))
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = _checkpoint_dir(cfg, output_dir)
    ckpt_path = cfg.get("ckpt_path")
    force = bool((cfg.get("resume") or {}).get("force", False))
    if rank_zero_only.rank == 0:
        for path in clean_stale_temp_files(output_dir):
            log.warning("removed %s (temp file of a killed process)", path)
    check_run_dir(checkpoint_dir, resuming=ckpt_path is not None, overwrite=bool(cfg.get("overwrite", False)),
                  delete=rank_zero_only.rank == 0)
    corpus = load_run_corpus(cfg)
    check_corpus_splits(cfg, corpus)
    check_world_prompts(cfg, corpus)
    meta, resume = None, None
    if ckpt_path is not None:
        meta = load_checkpoint_meta(ckpt_path)
        train_prompts = list(corpus.unique(cfg.data.train_split))
        with open_dict(cfg):
            cfg.data.num_train_prompts = len(train_prompts)
        resume = compare_resume(meta, resolved_config(cfg), train_prompts, force=force)
        if resume["forced"]:
            log.warning("resume forced (%s) across: %s", "resume.force=true", "; ".join(resume["forced"]))
        if resume["changed"]:
            log.warning("resume: applying changed settings: %s", "; ".join(
                f"{k} {v[0]!r} -> {v[1]!r}" for k, v in resume["changed"].items()))
    L.seed_everything(cfg.seed, workers=True)
    system, _, corpus = build_system(cfg, corpus)
    if meta is not None:
        check_text_encoder(meta, getattr(system.text_encoder, "identity", None), force=force)
        system.resume_record = {"changed": resume["changed"], "forced": resume["forced"], "from": str(ckpt_path)}
    datamodule = PromptDataModule(system.train_prompts, corpus.unique(cfg.data.val_split),
                                  batch_size=cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                  resume_forced=bool(OmegaConf.select(cfg, "resume.force", default=False)),
                                  max_val_prompts=OmegaConf.select(cfg, "data.val_max_prompts", default=None))
    timer = StepTimer()
    loggers = _instantiate_loggers(cfg.get("logger"), meta)
    if meta is not None:
        _continue_csv_logs(loggers, meta)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False,
        callbacks=[*_instantiate_group(cfg.get("callbacks")), timer, PreemptionHandler(checkpoint_dir)],
        plugins=[AtomicCheckpointIO()])
    trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        # ModelCheckpoint saves every N steps; the final state must be last.ckpt too (all ranks call).
        trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=False)
    metrics: dict = {}
    if trainer.is_global_zero:
        metrics = evaluate_run(system.model, build_world(cfg), corpus, cfg.evaluation, output_dir,
                               cache_dir=OmegaConf.select(cfg, "paths.cache_dir"))
        metrics["training"] = {"steps": system.batch_index, "generator_updates": trainer.global_step,
                               "nonfinite_steps": system.nonfinite_steps,
                               "seconds_per_step": statistics.median(timer.seconds[1:] or timer.seconds or [0.0]),
                               "generator": cfg.generator._target_.rsplit(".", 1)[-1],
                               "guidance": cfg.guidance.get("name")}
        atomic_write(output_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        log.info("metrics written to %s", output_dir / "metrics.json")
    return metrics
