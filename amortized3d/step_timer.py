"""Wall time of each training step, as a Lightning callback (training's ``seconds_per_step`` and the benchmarks)."""
from __future__ import annotations

import time
from typing import Callable

import lightning as L


class StepTimer(L.Callback):
    """Wall time of each training batch (render, guidance, backward, optimizer steps)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0
        # Called (no arguments) at each batch's start and end, e.g. to attribute a step's parts.
        self.on_start: list[Callable[[], None]] = []
        self.on_end: list[Callable[[], None]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for fn in self.on_start:
            fn()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._t0)
        for fn in self.on_end:
            fn()
