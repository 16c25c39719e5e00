"""Exactly-once per epoch across a resume with another world size or per-rank batch (issue 15, item 8).

Ranks are simulated: each rank's stream is the datamodule's loader built under a stand-in
trainer (its rank, world size and the system's step), as Lightning builds it on each process.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from amortized3d.data import PromptDataModule


def _attach(dm: PromptDataModule, rank: int, world: int, step: int) -> None:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, lightning_module=SimpleNamespace(batch_index=step))


def _run(dm: PromptDataModule, world: int, steps: int, start: int) -> Counter:
    """Prompt ids (weight > 0) of ``steps`` steps from ``start`` over all ranks of a ``world``."""
    seen = Counter()
    for rank in range(world):
        _attach(dm, rank, world, start)
        for item in itertools.islice(iter(dm.train_dataloader()), steps):
            ids, w = item["prompt_ids"], item["weights"]
            seen.update(ids[w > 0].tolist())
    return seen


def _resume(state: dict, prompts, batch: int, step: int) -> PromptDataModule:
    """What Lightning does on resume: the system sets start_step, then the datamodule state is loaded."""
    dm = PromptDataModule(prompts, [], batch, seed=7)
    dm.start_step = step
    dm.load_state_dict(state)
    return dm


@pytest.mark.parametrize("world_a,batch_a,world_b,batch_b,steps_a", [
    (64, 8, 32, 8, 100),  # 64 -> 32 ranks, mid-epoch (51,200 of 100,000 prompts consumed)
    (8, 16, 4, 16, 300),  # 8 -> 4
    (8, 16, 16, 4, 500),  # 8 -> 16 ranks and another per-rank batch
])
def test_resume_with_another_world_keeps_every_prompt_once_at_100k(world_a, batch_a, world_b, batch_b, steps_a):
    n = 100_000
    prompts = [f"p{i}" for i in range(n)]
    a = PromptDataModule(prompts, [], batch_a, seed=7)
    seen = _run(a, world_a, steps_a, 0)
    _attach(a, 0, world_a, steps_a)
    state = a.state_dict()  # what the checkpoint at step steps_a holds
    b = _resume(state, prompts, batch_b, steps_a)
    rest = math.ceil((n - sum(seen.values())) / (world_b * batch_b))  # steps left in the epoch
    seen += _run(b, world_b, rest, steps_a)
    assert seen == Counter(range(n)), (f"{sum(1 for c in seen.values() if c > 1)} prompts repeated, "
                                       f"{n - len(seen)} skipped")
    assert state["consumed"] == steps_a * world_a * batch_a
    _attach(b, 0, world_b, steps_a + rest)
    after = b.state_dict()
    assert (after["epoch"], after["offset"], after["consumed"]) == (1, 0, n)


@pytest.mark.parametrize("n", [1, 7, 50, 97])
@pytest.mark.parametrize("plan", [[(2, 3, 5), (3, 2, 4), (1, 5, 9)], [(4, 4, 1), (1, 1, 17), (5, 2, 3)],
                                  [(3, 7, 11), (2, 7, 2)]])
def test_chained_resumes_over_several_epochs_are_exactly_once(n, plan):
    """Any sequence of (world, batch, steps) segments: every epoch's prompts are the corpus, once."""
    prompts = [f"p{i}" for i in range(n)]
    per_epoch: dict[int, Counter] = {}
    step, state = 0, None
    for world, batch, steps in plan:
        dm = PromptDataModule(prompts, [], batch, seed=7) if state is None else _resume(state, prompts, batch, step)
        for s in range(step, step + steps):
            for rank in range(world):
                layout = dm.layout(world)
                ids, w = layout.batch(s, rank)
                per_epoch.setdefault(layout.position(s).epoch, Counter()).update(ids[w > 0].tolist())
        _attach(dm, 0, world, step + steps)
        dm._world_size = world
        step += steps
        state = dm.state_dict()
    last = state["epoch"]
    for epoch, seen in per_epoch.items():
        if epoch < last:
            assert seen == Counter(range(n)), f"epoch {epoch}"
        else:  # the epoch in progress: distinct prompts, as many as the position says
            assert max(seen.values()) == 1 and sum(seen.values()) == state["offset"]
    assert state["consumed"] == sum(sum(c.values()) for c in per_epoch.values())


def test_same_world_resume_replays_the_uninterrupted_stream():
    prompts = [f"p{i}" for i in range(23)]
    full = PromptDataModule(prompts, [], 4, seed=7)
    _attach(full, 1, 2, 0)
    reference = [item["prompt_ids"] for item in itertools.islice(iter(full.train_dataloader()), 12)]
    _attach(full, 1, 2, 5)
    resumed = _resume(full.state_dict(), prompts, 4, 5)
    _attach(resumed, 1, 2, 5)
    again = [item["prompt_ids"] for item in itertools.islice(iter(resumed.train_dataloader()), 7)]
    assert all(torch.equal(x, y) for x, y in zip(reference[5:], again))


def test_a_different_corpus_or_seed_is_refused():
    prompts = [f"p{i}" for i in range(10)]
    dm = PromptDataModule(prompts, [], 2, seed=7)
    state = dm.state_dict()
    with pytest.raises(ValueError, match="exactly once"):
        PromptDataModule(prompts[:9], [], 2, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="exactly once"):
        PromptDataModule(prompts, [], 2, seed=8).load_state_dict(state)


class _Recorder(L.LightningModule):
    """Minimal stand-in for the system: keys the stream by batch_index, restores it like AmortizedSystem."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batch_index, self.seen = 0, []

    def training_step(self, batch, batch_idx):
        assert int(batch["step"]) == self.batch_index
        self.seen += batch["prompt_ids"][batch["weights"] > 0].tolist()
        self.batch_index += 1
        return (self.w ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["batch_index"] = self.batch_index

    def on_load_checkpoint(self, checkpoint):
        self.batch_index = checkpoint["batch_index"]
        self.trainer.datamodule.start_step = self.batch_index


def _trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0)


def test_lightning_checkpoint_carries_the_position_across_a_batch_change(tmp_path):
    """Through Lightning's own save/restore: 3 steps of batch 4, then batch 3 to the end of the epoch."""
    prompts = [f"p{i}" for i in range(29)]
    first, trainer = _Recorder(), _trainer(3)
    trainer.fit(first, datamodule=PromptDataModule(prompts, [], 4, seed=7))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    second = _Recorder()
    _trainer(3 + math.ceil(17 / 3)).fit(second, datamodule=PromptDataModule(prompts, [], 3, seed=7),
                                        ckpt_path=tmp_path / "a.ckpt")
    assert sorted(first.seen + second.seen) == list(range(29))
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)["PromptDataModule"]
    assert (state["step"], state["epoch"], state["offset"], state["consumed"]) == (3, 0, 12, 12)
