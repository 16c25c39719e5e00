"""Prompt batches for prompt-amortized training.

The batch of step ``k`` is a pure function of (seed, k, rank, world size): resuming from a
checkpoint at step k replays exactly the batches an uninterrupted run would have seen,
independent of dataloader state. Sharding follows "every prompt once per epoch across ranks":
a prompt-epoch is a seeded permutation of the N training prompts laid out in
``ceil(N / (world*B))`` steps of ``world*B`` slots; rank r takes slots [r*B, (r+1)*B) of
each step. Slots past N are padding (weight 0) so every rank runs the same number of steps
(DDP needs that) without any prompt being dropped or counted twice.

The slots form one global sequence per epoch, independent of the world size: a step of
``world*B`` slots consumes the next ``world*B`` prompts of the epoch's permutation. A
:class:`StreamPosition` (step, epoch, offset = prompts of that epoch already consumed) is
stored in the checkpoint by :meth:`PromptDataModule.state_dict`; resuming with another world
size or per-rank batch continues the same epoch from that offset, so no prompt is skipped or
repeated. The permutation of an epoch is computed once and cached, not once per step.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any tuple of values (same on every machine and process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def validation_subset(prompts: Sequence[str], max_prompts: int | None, seed: int = 0) -> list[str]:
    """At most ``max_prompts`` of ``prompts``: a seeded sample kept in corpus order (issue 15).

    The seed is not the run's: every run and method on a corpus validates the same prompts, so
    their curves compare. A ``.txt`` corpus's val split is the whole list (100k renders per
    validation otherwise); ``None`` keeps everything.
    """
    prompts = list(prompts)
    if max_prompts is None or len(prompts) <= int(max_prompts):
        return prompts
    g = torch.Generator().manual_seed(derive_seed("validation-subset", seed, len(prompts)))
    keep = sorted(torch.randperm(len(prompts), generator=g)[:int(max_prompts)].tolist())
    return [prompts[i] for i in keep]


def step_rng(seed: int, step: int, rank: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """Per-step, per-rank RNG for one named stream (cameras, noise, ...)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, step, rank, stream))
    return g


@lru_cache(maxsize=4)
def epoch_permutation(num_prompts: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of prompt-epoch ``epoch`` (cached: computed once per epoch, not per step).

    The returned tensor is shared by every caller: read it, never write to it.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "prompt-epoch", epoch))
    return torch.randperm(num_prompts, generator=g)


@dataclass(frozen=True)
class StreamPosition:
    """Where the global prompt stream stands before ``step``: ``offset`` prompts of ``epoch`` consumed."""

    step: int = 0
    epoch: int = 0
    offset: int = 0

    def consumed(self, num_prompts: int) -> int:
        """Global prompts consumed since the start of training (padding excluded)."""
        return self.epoch * num_prompts + self.offset


@dataclass(frozen=True)
class ShardLayout:
    num_prompts: int
    batch_size: int  # per rank
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    anchor: StreamPosition = field(default_factory=StreamPosition)  # resume point (from another layout)

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("the training split has no prompts")
        if self.batch_size < 1 or self.world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {self.batch_size}, {self.world_size}")
        if not 0 <= self.anchor.offset < self.num_prompts or self.anchor.step < 0 or self.anchor.epoch < 0:
            raise ValueError(f"stream position {self.anchor} outside an epoch of {self.num_prompts} prompts")

    @property
    def slots_per_step(self) -> int:
        return self.world_size * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_prompts / self.slots_per_step)

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_prompts)
        return epoch_permutation(self.num_prompts, self.seed, epoch)

    def position(self, step: int) -> StreamPosition:
        """The stream position before global ``step`` (>= the anchor's step)."""
        a = self.anchor
        if step < a.step:
            raise ValueError(f"step {step} precedes this stream's resume point (step {a.step})")
        first = math.ceil((self.num_prompts - a.offset) / self.slots_per_step)  # steps left in the anchor epoch
        k = step - a.step
        if k < first:
            return StreamPosition(step, a.epoch, a.offset + k * self.slots_per_step)
        epoch, j = divmod(k - first, self.steps_per_epoch)
        return StreamPosition(step, a.epoch + 1 + epoch, j * self.slots_per_step)

    def batch(self, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids [B], weights [B]) of ``rank`` at global ``step``; weight 0 marks padding."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        pos = self.position(step)
        perm = self.permutation(pos.epoch)
        start = pos.offset + rank * self.batch_size
        slots = torch.arange(start, start + self.batch_size)
        real = slots < self.num_prompts
        ids = perm[slots % self.num_prompts]
        return ids, real.float()


class PromptStream(IterableDataset):
    """Infinite stream of step-indexed batches starting at ``start_step`` (set on resume)."""

    def __init__(self, layout: ShardLayout, rank: int):
        self.layout, self.rank, self.start_step = layout, rank, 0

    def __iter__(self) -> Iterator[dict]:
        step = self.start_step
        while True:
            ids, weights = self.layout.batch(step, self.rank)
            yield {"step": torch.tensor(step), "prompt_ids": ids, "weights": weights}
            step += 1


class ValidationTick(torch.utils.data.Dataset):
    """One item per validation run: the system renders ``datamodule.val_prompts`` itself."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, idx: int) -> dict:
        return {"index": idx}


class PromptDataModule(L.LightningDataModule):
    """Train prompts (sharded stream) and validation prompts of a corpus."""

    def __init__(self, train_prompts: Sequence[str], val_prompts: Sequence[str], batch_size: int,
                 seed: int = 0, shuffle: bool = True, resume_forced: bool = False,
                 max_val_prompts: int | None = None):
        super().__init__()
        self.train_prompts = list(train_prompts)
        self.val_prompts = validation_subset(val_prompts, max_val_prompts)  # bounded: renders per validation
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        # resume.force=true: the user accepted a changed stream (seed, corpus); continue at the
        # saved step instead of refusing, without the exactly-once guarantee for that epoch.
        self.resume_forced = bool(resume_forced)
        self.start_step = 0  # set from the checkpoint on resume, before the loader is built
        self.anchor = StreamPosition()  # stream position at start_step (from the checkpoint's state_dict)
        self._world_size = 1  # of the last layout built: the one the saved position refers to

    def layout(self, world_size: int) -> ShardLayout:
        return ShardLayout(len(self.train_prompts), self.batch_size, world_size, self.seed, self.shuffle,
                           self.anchor)

    def _current_step(self) -> int:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        step = getattr(module, "batch_index", None)
        return int(step) if step is not None else self.start_step

    def state_dict(self) -> dict[str, Any]:
        """The global stream position of the next training step (saved in every checkpoint).

        ``consumed`` prompts of the global sequence are done; a resume with any world size or
        per-rank batch continues from there (:meth:`load_state_dict`).
        """
        step = self._current_step()
        pos = self.layout(self._world_size).position(max(step, self.anchor.step))
        n = len(self.train_prompts)
        return {"step": pos.step, "epoch": pos.epoch, "offset": pos.offset, "consumed": pos.consumed(n),
                "num_prompts": n, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self._world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(self.train_prompts)
        saved = (int(state["num_prompts"]), int(state["seed"]), bool(state["shuffle"]))
        offset = int(state["offset"])
        if saved != (n, self.seed, self.shuffle):
            message = (f"the checkpoint's prompt stream (num_prompts, seed, shuffle) = {saved} differs from "
                       f"this run's {(n, self.seed, self.shuffle)}: the epoch cannot continue exactly once")
            if not self.resume_forced:
                raise ValueError(message)
            log.warning("%s; continuing at step %s as forced (resume.force=true)", message, state["step"])
            offset = offset if saved[0] == n else 0  # another corpus size: its epoch starts afresh
        self.anchor = StreamPosition(int(state["step"]), int(state["epoch"]), offset)
        self.start_step = self.anchor.step

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.start_step < self.anchor.step:
            raise RuntimeError(f"training resumes at step {self.start_step} but the checkpoint's data stream is at "
                               f"step {self.anchor.step}")
        self._world_size = world
        stream = PromptStream(self.layout(world), rank)
        stream.start_step = self.start_step
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ValidationTick(), batch_size=None, num_workers=0)
