"""Prompt sharding: every prompt exactly once per epoch across ranks; step-keyed determinism."""
from collections import Counter

import pytest
import torch

from amortized3d.data import PromptStream, ShardLayout, derive_seed, step_rng


@pytest.mark.parametrize("num_prompts,batch_size,world", [(24, 8, 1), (24, 8, 2), (30, 4, 4), (7, 3, 2), (5, 8, 3),
                                                          (1, 1, 1), (100, 7, 8)])
def test_every_prompt_once_per_epoch_across_ranks(num_prompts, batch_size, world):
    layout = ShardLayout(num_prompts, batch_size, world, seed=3)
    for epoch in range(3):
        seen = Counter()
        for k in range(layout.steps_per_epoch):
            step = epoch * layout.steps_per_epoch + k
            for rank in range(world):
                ids, weights = layout.batch(step, rank)
                assert ids.shape == weights.shape == (batch_size,)  # same shape on every rank (DDP)
                seen.update(ids[weights > 0].tolist())
        assert seen == Counter(range(num_prompts)), f"epoch {epoch}: dropped or duplicated prompts"


def test_epochs_are_reshuffled_and_padding_is_weightless():
    layout = ShardLayout(10, 4, 1, seed=0)
    first = torch.cat([layout.batch(k, 0)[0] for k in range(layout.steps_per_epoch)])[:10]
    second = torch.cat([layout.batch(layout.steps_per_epoch + k, 0)[0] for k in range(layout.steps_per_epoch)])[:10]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    assert layout.batch(2, 0)[1].tolist() == [1.0, 1.0, 0.0, 0.0]  # slots 8, 9 real; 10, 11 padding


def test_stream_resumes_at_any_step():
    layout = ShardLayout(13, 3, 2, seed=1)
    full = PromptStream(layout, rank=1)
    it = iter(full)
    batches = [next(it) for _ in range(9)]
    resumed = PromptStream(layout, rank=1)
    resumed.start_step = 5
    again = next(iter(resumed))
    assert int(again["step"]) == 5
    assert torch.equal(again["prompt_ids"], batches[5]["prompt_ids"])


def test_step_rngs_are_stable_and_independent():
    a = torch.rand(4, generator=step_rng(0, 10, 0, "noise"))
    assert torch.equal(a, torch.rand(4, generator=step_rng(0, 10, 0, "noise")))
    for other in [step_rng(0, 11, 0, "noise"), step_rng(0, 10, 1, "noise"),
                  step_rng(0, 10, 0, "cameras"), step_rng(1, 10, 0, "noise")]:
        assert not torch.equal(a, torch.rand(4, generator=other))
    assert derive_seed("x", 1) == derive_seed("x", 1) != derive_seed("x", 2)


def test_invalid_layouts_are_rejected():
    with pytest.raises(ValueError, match="no prompts"):
        ShardLayout(0, 4)
    with pytest.raises(ValueError, match="rank 2"):
        ShardLayout(4, 2, world_size=2).batch(0, 2)


def test_the_permutation_is_computed_once_per_epoch_not_per_step(monkeypatch):
    import amortized3d.data as data

    getattr(data, "epoch_permutation", None) and data.epoch_permutation.cache_clear()
    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or real(*a, **k))
    layout = ShardLayout(1000, 10, 4, seed=5)
    batches = [layout.batch(step, rank) for step in range(2 * layout.steps_per_epoch) for rank in range(4)]
    assert len(calls) == 2  # one permutation per epoch, shared by every step and rank
    first = torch.cat([ids for ids, _ in batches[:4 * layout.steps_per_epoch]])
    assert sorted(first.tolist()) == list(range(1000))  # and the cached permutation is not corrupted
