"""Lightning callbacks: validation render grids to disk and to the active logger, metrics during training,
the progress bar, and the preemption handler (SIGTERM / SIGUSR1 / SIGINT save ``last.ckpt`` and stop)."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
import numpy as np

from amortized3d.atomic import atomic_write
from amortized3d.run_guard import Interrupted


class ValidationRenderWriter(L.Callback):
    """Writes the system's last validation grid to ``output_dir/step_XXXXXX.png`` and logs it."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images = getattr(pl_module, "val_images", None)
        if not trainer.is_global_zero or not images:
            return
        import imageio.v3 as iio

        array = (images[0].permute(1, 2, 0).detach().cpu().numpy() * 255).round().astype(np.uint8)
        path = self.output_dir / f"step_{trainer.global_step:06d}.png"
        atomic_write(path, lambda f: iio.imwrite(f, array, extension=".png"))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="val/renders", images=[array], step=trainer.global_step)


class ValidationMetrics(L.Callback):
    """Cheap evaluation during training: a few val prompts, a few orbit views, every validation.

    ``evaluator``: ``oracle`` (against ``world``, the run's ground truth), ``clip`` (open_clip;
    ``clip`` holds model/pretrained, missing weights are an error) or ``auto`` (oracle where there is
    a world, else no metrics: auto never needs downloads). Logs ``val/<evaluator>_<metric>`` to
    every logger, writes a turntable of the first prompt to ``video_dir`` and logs it to wandb.
    The prompts are split over the ranks (issue 15: rank 0 rendered them all while the others
    waited) and the per-prompt values gathered; rank 0 logs and writes the video. The candidates
    are the datamodule's (bounded) val prompts. The fields are queried directly (no baking: few
    views are cheaper that way).
    """

    def __init__(self, evaluator: str = "auto", num_prompts: int = 4, num_views: int = 8,
                 every_n_validations: int = 1, video_dir: str | None = None, video_fps: int = 8,
                 clip: dict | None = None, world=None):
        if evaluator not in ("auto", "oracle", "clip"):
            raise ValueError(f"unknown evaluator {evaluator!r}; valid: auto, oracle, clip")
        if evaluator == "oracle" and world is None:
            raise ValueError("ValidationMetrics(evaluator=oracle) needs a ground-truth world (world: null)")
        self.world = world
        self.evaluator, self.num_prompts, self.num_views = evaluator, int(num_prompts), int(num_views)
        self.every, self.video_fps = max(1, int(every_n_validations)), int(video_fps)
        self.video_dir = Path(video_dir) if video_dir else None
        self.clip = dict(clip or {})
        self._scorer, self._validations = None, 0

    def _build_scorer(self, pl_module, prompts: list[str], cameras):
        from amortized3d.evaluation.scorers import ClipScorer, OracleScorer

        if self.evaluator in ("oracle", "auto") and self.world is not None:
            candidates = list(dict.fromkeys([*pl_module.train_prompts, *prompts]))
            return OracleScorer(self.world, candidates, cameras, pl_module.renderer, bake=None)
        if self.evaluator == "clip":
            from amortized3d.evaluation.clip import ClipEncoder

            encoder = ClipEncoder(**{"device": str(pl_module.device), **self.clip})
            return ClipScorer(encoder, prompts, encoder.encode(prompts))
        return None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from amortized3d.evaluation.shard import gather_results, shard_indices

        self._validations += 1
        datamodule = getattr(trainer, "datamodule", None)
        if (self._validations - 1) % self.every or datamodule is None:  # the same decision on every rank
            return
        from amortized3d.cameras import orbit_cameras
        from amortized3d.evaluation.orbit import render_turntable, slugify
        from amortized3d.export import write_video

        all_val = pl_module.renderable(datamodule.val_prompts)
        prompts = all_val[:self.num_prompts]
        if not prompts:
            return
        cameras = orbit_cameras(self.num_views, pl_module.val_resolution)
        if self._scorer is None:
            self._scorer = self._build_scorer(pl_module, list(all_val), cameras) or False
        local: dict[int, dict[str, float]] = {}
        for i in shard_indices(len(prompts), trainer.world_size, trainer.global_rank):
            prompt = prompts[i]
            renders = render_turntable(pl_module.model, prompt, cameras, bake=None)  # eval mode for the call
            local[i] = ({f"val/{self._scorer.name}_{k}": float(v.double().mean())
                         for k, v in self._scorer.score(i, prompt, renders).items()} if self._scorer else {})
            if i == 0 and self.video_dir is not None:  # prompt 0 is in rank 0's shard
                path = write_video(renders, self.video_dir / f"step_{trainer.global_step:06d}_{slugify(prompt)}.mp4",
                                   fps=self.video_fps)
                for logger in trainer.loggers:
                    if type(logger).__name__ == "WandbLogger":
                        logger.log_video(key="val/turntable", videos=[str(path)], step=trainer.global_step)
        rows = gather_results(local, len(prompts))  # a collective: every rank calls it
        values: dict[str, list[float]] = {}
        for row in rows:
            for k, v in row.items():
                values.setdefault(k, []).append(v)
        metrics = {k: sum(v) / len(v) for k, v in values.items()}
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, described by the step budget runs are given in.

    Runs stop at ``trainer.max_steps`` with ``max_epochs = -1``, for which the stock description reads
    "Epoch 0/-2". Here: "Epoch 0 · 300 steps" (and "Epoch 0/2" when a run is budgeted in epochs).
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            description += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            description += f" · {trainer.max_steps} steps"
        # as the stock bar: padded to the validation bar's description, so the two do not flicker
        return f"{description:{len(self.validation_description)}}"


PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                       getattr(signal, "SIGINT", None)) if s is not None)


class PreemptionHandler(L.Callback):
    """SIGTERM / SIGUSR1 / SIGINT during training: finish the step, save ``last.ckpt``, stop.

    Installed at ``on_train_start`` (after Lightning's own SIGTERM handler, which it replaces for
    the duration of training; Lightning restores the previous handlers at teardown). The request
    is reduced over ranks at each step end, so every DDP rank saves and stops at the same step.
    A second SIGINT while stopping interrupts at once.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for s in PREEMPTION_SIGNALS:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            if h is not None:
                signal.signal(s, h)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        local = self.received is not None
        stop = trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local
        if not stop:
            return
        signum = self.received or signal.SIGTERM
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        self._restore()
        name = signal.Signals(signum).name
        raise Interrupted(f"interrupted at step {trainer.global_step} ({name}); resume with ckpt_path={path}",
                          signum)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
