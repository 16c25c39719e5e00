"""Split evaluation prompts over ranks and gather the per-prompt results back.

The split is :class:`amortized3d.data.ShardLayout` with one step per epoch and no shuffling:
rank r takes prompts [r*B, (r+1)*B) with B = ceil(N / world); slots past N are padding and
are dropped. Gathering checks that every prompt came back exactly once.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from amortized3d.data import ShardLayout


def shard_indices(num_items: int, world_size: int, rank: int) -> list[int]:
    """Indices of the items ``rank`` evaluates (possibly none when world_size > num_items)."""
    if num_items == 0:
        return []
    layout = ShardLayout(num_items, math.ceil(num_items / world_size), world_size, shuffle=False)
    ids, weights = layout.batch(0, rank)
    return [int(i) for i, w in zip(ids.tolist(), weights.tolist()) if w > 0]


def merge_shards(shards: Sequence[dict[int, Any]], num_items: int) -> list[Any]:
    """Per-rank ``{item index: result}`` -> results in item order; refuses duplicates and gaps."""
    merged: dict[int, Any] = {}
    for rank, shard in enumerate(shards):
        for index, value in shard.items():
            if index in merged:
                raise RuntimeError(f"item {index} was evaluated twice (again on rank {rank})")
            merged[index] = value
    missing = sorted(set(range(num_items)) - merged.keys())
    extra = sorted(merged.keys() - set(range(num_items)))
    if missing or extra:
        raise RuntimeError(f"gathered results do not cover items 0..{num_items - 1}: missing {missing[:10]}, "
                           f"unexpected {extra[:10]}")
    return [merged[i] for i in range(num_items)]


def distributed_context() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_results(local: dict[int, Any], num_items: int) -> list[Any]:
    """All ranks' results in item order, on every rank (``all_gather_object``; no-op alone)."""
    rank, world = distributed_context()
    if world == 1:
        return merge_shards([local], num_items)
    shards: list[dict[int, Any] | None] = [None] * world
    torch.distributed.all_gather_object(shards, local)
    return merge_shards([s or {} for s in shards], num_items)
