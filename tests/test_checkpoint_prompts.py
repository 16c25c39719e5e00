"""Evaluation and export bind prompts from the checkpoint's own list (issue 18): a per-prompt
generator loaded against an edited corpus still renders each prompt from its own field, and a
checkpoint still loads when its corpus file is gone."""
from __future__ import annotations

import json

import torch

from amortized3d.cameras import orbit_cameras
from amortized3d.evaluation.checkpoint import load_system
from amortized3d.train import train
from conftest import compose

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]


def _render(system, prompt: str) -> torch.Tensor:
    with torch.no_grad():  # 2 views of one prompt
        return system.render([prompt], orbit_cameras(2, height=16)).rgb


def _trained(tmp_path, cache_dir):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": PROMPTS, "val": PROMPTS[:1]}))
    run = tmp_path / "run"
    train(compose(run, cache_dir, "generator=ingp", f"data.corpus_path={corpus}", "trainer.max_steps=2"))
    return corpus, run / "checkpoints" / "last.ckpt"


def test_per_prompt_fields_stay_with_their_prompts_when_the_corpus_is_reordered(tmp_path, cache_dir):
    corpus, ckpt = _trained(tmp_path, cache_dir)
    system, *_ = load_system(ckpt, with_guidance=False)
    before = {p: _render(system, p) for p in PROMPTS}
    assert not torch.equal(before[PROMPTS[0]], before[PROMPTS[-1]])  # distinct fields, or the test is void
    corpus.write_text(json.dumps({"train": PROMPTS[::-1], "val": PROMPTS[:1]}))
    system, *_ = load_system(ckpt, with_guidance=False)
    assert list(system.train_prompts) == PROMPTS
    for p in PROMPTS:
        torch.testing.assert_close(_render(system, p), before[p], rtol=0, atol=0)


def test_a_checkpoint_loads_without_its_corpus_file(tmp_path, cache_dir):
    corpus, ckpt = _trained(tmp_path, cache_dir)
    system, *_ = load_system(ckpt, with_guidance=False)
    expected = _render(system, PROMPTS[2])
    corpus.unlink()
    system, _, loaded, _ = load_system(ckpt, with_guidance=False)
    assert list(loaded.unique("train")) == PROMPTS
    torch.testing.assert_close(_render(system, PROMPTS[2]), expected, rtol=0, atol=0)
