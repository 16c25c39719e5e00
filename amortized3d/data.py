"""Prompt batches for prompt-amortized training.

The batch of step ``k`` is a pure function of (seed, k, rank, world size): resuming from a
checkpoint at step k replays exactly the batches an uninterrupted run would have seen,
independent of dataloader state. Sharding follows "every prompt once per epoch across ranks":
a prompt-epoch is a seeded permutation of the N training prompts laid out in
``ceil(N / (world*B))`` steps of ``world*B`` slots; rank r takes slots [r*B, (r+1)*B) of
each step. Slots past N are padding (weight 0) so every rank runs the same number of steps
(DDP needs that) without any prompt being dropped or counted twice.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any tuple of values (same on every machine and process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """Per-step, per-rank RNG for one named stream (cameras, noise, ...)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, step, rank, stream))
    return g


@dataclass(frozen=True)
class ShardLayout:
    num_prompts: int
    batch_size: int  # per rank
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("the training split has no prompts")
        if self.batch_size < 1 or self.world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {self.batch_size}, {self.world_size}")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_prompts / (self.world_size * self.batch_size))

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_prompts)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "prompt-epoch", epoch))
        return torch.randperm(self.num_prompts, generator=g)

    def batch(self, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids [B], weights [B]) of ``rank`` at global ``step``; weight 0 marks padding."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        start = (k * self.world_size + rank) * self.batch_size
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
                 seed: int = 0, shuffle: bool = True):
        super().__init__()
        self.train_prompts, self.val_prompts = list(train_prompts), list(val_prompts)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.start_step = 0  # set from the checkpoint on resume, before the loader is built

    def layout(self, world_size: int) -> ShardLayout:
        return ShardLayout(len(self.train_prompts), self.batch_size, world_size, self.seed, self.shuffle)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = PromptStream(self.layout(world), rank)
        stream.start_step = self.start_step
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ValidationTick(), batch_size=None, num_workers=0)
