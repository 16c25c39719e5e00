"""Time real training steps (the system's own ``training_step`` under a Lightning Trainer)."""
from __future__ import annotations

from typing import Callable

import lightning as L

from amortized3d.data import PromptDataModule
from amortized3d.step_timer import StepTimer


def make_step_runner(system, cfg, steps_per_call: int = 2) -> Callable[[], None]:
    """A callable that trains ``steps_per_call`` more steps; ``runner.timer.seconds`` collects step times.

    The first step of each call is dropped (Trainer setup effects); calls continue the same run.
    """
    timer = StepTimer()
    datamodule = PromptDataModule(system.train_prompts, system.train_prompts[:1], batch_size=cfg.data.batch_size,
                                  seed=cfg.seed)
    measured: list[float] = []

    def run() -> None:
        datamodule.start_step = system.batch_index
        timer.seconds.clear()
        trainer = L.Trainer(max_steps=steps_per_call + 1, accelerator=cfg.trainer.accelerator, devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            use_distributed_sampler=False, callbacks=[timer])
        trainer.fit(system, datamodule=datamodule)
        measured.extend(timer.seconds[1:])

    run.measured = measured  # type: ignore[attr-defined]
    run.timer = timer  # type: ignore[attr-defined]
    return run
