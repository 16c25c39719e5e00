"""Lightning callbacks: validation render grids to disk and to the active logger."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from amortized3d.checkpoint_io import atomic_write


class ValidationRenderWriter(L.Callback):
    """Writes the system's last validation grid to ``output_dir/step_XXXXXX.png`` and logs it."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

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
        modes = [(m, m.training) for m in pl_module.modules()]  # render_turntable switches to eval
        if self._scorer is None:
            self._scorer = self._build_scorer(pl_module, list(all_val), cameras) or False
        local: dict[int, dict[str, float]] = {}
        for i in shard_indices(len(prompts), trainer.world_size, trainer.global_rank):
            prompt = prompts[i]
            renders = render_turntable(pl_module, prompt, cameras, bake=None)
            local[i] = ({f"val/{self._scorer.name}_{k}": float(v.double().mean())
                         for k, v in self._scorer.score(i, prompt, renders).items()} if self._scorer else {})
            if i == 0 and self.video_dir is not None:  # prompt 0 is in rank 0's shard
                path = write_video(renders, self.video_dir / f"step_{trainer.global_step:06d}_{slugify(prompt)}.mp4",
                                   fps=self.video_fps)
                for logger in trainer.loggers:
                    if type(logger).__name__ == "WandbLogger":
                        logger.log_video(key="val/turntable", videos=[str(path)], step=trainer.global_step)
        for module, training in modes:
            module.train(training)
        rows = gather_results(local, len(prompts))  # a collective: every rank calls it
        values: dict[str, list[float]] = {}
        for row in rows:
            for k, v in row.items():
                values.setdefault(k, []).append(v)
        metrics = {k: sum(v) / len(v) for k, v in values.items()}
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self.last_metrics = metrics
