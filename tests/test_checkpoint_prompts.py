"""Evaluation and export load the model alone, bound to the checkpoint's own prompt list (issues
18, 16): a per-prompt generator loaded against an edited corpus still renders each prompt from its
own field and the change is reported; a checkpoint still loads when its corpus file is gone; a
checkpoint of the layout before the model/system split loads and resumes exactly."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from amortized3d.cameras import orbit_cameras
from amortized3d.checkpoint_io import load_torch, save_torch
from amortized3d.evaluation.checkpoint import load_model
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
    system, *_ = load_model(ckpt)
    before = {p: _render(system, p) for p in PROMPTS}
    assert not torch.equal(before[PROMPTS[0]], before[PROMPTS[-1]])  # distinct fields, or the test is void
    corpus.write_text(json.dumps({"train": PROMPTS[::-1], "val": PROMPTS[:1]}))
    system, *_ = load_model(ckpt)
    assert list(system.train_prompts) == PROMPTS
    for p in PROMPTS:
        torch.testing.assert_close(_render(system, p), before[p], rtol=0, atol=0)


def test_a_checkpoint_loads_without_its_corpus_file(tmp_path, cache_dir):
    corpus, ckpt = _trained(tmp_path, cache_dir)
    system, *_ = load_model(ckpt)
    expected = _render(system, PROMPTS[2])
    corpus.unlink()
    system, loaded, _ = load_model(ckpt)
    assert list(loaded.unique("train")) == PROMPTS
    torch.testing.assert_close(_render(system, PROMPTS[2]), expected, rtol=0, atol=0)


def test_an_edited_corpus_is_reported_by_name_and_cannot_rebind_a_field(tmp_path, cache_dir, caplog):
    """The issue's case: a per-prompt iNGP loaded against an edited corpus (one prompt replaced,
    the order changed). Each kept prompt renders from its own field, the new prompt renders from
    none, and the log says which prompts differ."""
    corpus, ckpt = _trained(tmp_path, cache_dir)
    model, *_ = load_model(ckpt)
    before = {p: _render(model, p) for p in PROMPTS}
    edited = ["a purple cone", PROMPTS[3], PROMPTS[0], PROMPTS[2]]  # PROMPTS[1] replaced, order changed
    corpus.write_text(json.dumps({"train": edited, "val": edited[:1]}))
    with caplog.at_level(logging.WARNING, logger="amortized3d.evaluation.checkpoint"):
        model, loaded, _ = load_model(ckpt)
    report = " ".join(r.getMessage() for r in caplog.records)
    assert "differs from the 4 prompts" in report
    assert "1 trained prompt(s) not in it ('a blue sphere')" in report
    assert "1 prompt(s) the model was not trained on ('a purple cone')" in report
    assert list(loaded.unique("train")) == edited  # the corpus supplies candidates ...
    assert model.train_prompts == PROMPTS  # ... the checkpoint's list binds the fields
    for p in PROMPTS:
        torch.testing.assert_close(_render(model, p), before[p], rtol=0, atol=0)
    assert model.renderable(edited) == [PROMPTS[3], PROMPTS[0], PROMPTS[2]]
    with pytest.raises(ValueError, match="cannot render prompts it was not trained on"):
        model.embed(["a purple cone"])


def test_an_unchanged_corpus_is_not_reported(tmp_path, cache_dir, caplog):
    _, ckpt = _trained(tmp_path, cache_dir)
    with caplog.at_level(logging.WARNING, logger="amortized3d.evaluation.checkpoint"):
        load_model(ckpt)
    assert not [r for r in caplog.records if "differs" in r.getMessage()]


def _trained_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The generator's and the score model's weights (the guidance's trainable state)."""
    return {k: v for k, v in load_torch(ckpt)["state_dict"].items() if k.startswith(("model.", "guidance."))}


def test_a_checkpoint_of_the_pre_split_layout_loads_and_resumes_exactly(tmp_path, cache_dir):
    """Checkpoints written before the model/system split keep the model's parts at the top level
    (generator.*; guidance.* as now). They load for evaluation and resume bit-exactly, the VSD
    score model included."""
    common = ["guidance=vsd", "callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2"]
    train(compose(tmp_path / "full", cache_dir, *common, "trainer.max_steps=4"))
    train(compose(tmp_path / "part", cache_dir, *common, "trainer.max_steps=2"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    checkpoint = load_torch(ckpt)
    state = checkpoint["state_dict"]
    assert any(k.startswith("model.generator.") for k in state) and any(k.startswith("guidance.") for k in state)
    checkpoint["state_dict"] = {k.removeprefix("model."): v for k, v in state.items()}  # the old layout
    assert not any(k.startswith("model.") for k in checkpoint["state_dict"])
    legacy = tmp_path / "part" / "checkpoints" / "legacy.ckpt"
    save_torch(checkpoint, legacy)

    new_model, *_ = load_model(ckpt)
    old_model, *_ = load_model(legacy)
    for p in ("a red cube", "a purple torus"):  # a train prompt and a held-out one
        torch.testing.assert_close(_render(old_model, p), _render(new_model, p), rtol=0, atol=0)

    ckpt.unlink()  # resume from the legacy file only
    train(compose(tmp_path / "part", cache_dir, *common, "trainer.max_steps=4", f"ckpt_path={legacy}"))
    full, resumed = (_trained_state(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("full", "part"))
    assert full.keys() == resumed.keys() and len(full) > 0
    for key in full:
        assert torch.equal(full[key], resumed[key]) if isinstance(full[key], torch.Tensor) else full[key] == resumed[key]
    assert any(not torch.equal(v, state[k]) for k, v in full.items() if isinstance(v, torch.Tensor))  # it trained on
