"""Per-prompt VSD-family experiments run one prompt per run (ProlificDreamer): own iNGP, own LoRA.

At 3125a41 they trained every corpus prompt in one run with one shared LoRA score model, while
calling the prompts independent runs (issue 13, item 6).
"""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf.errors import MissingMandatoryValue

from amortized3d.corpora import Corpus
from amortized3d.build import build_system
from amortized3d.train import train
from conftest import CONFIGS, compose
from sd_helpers import sd_overrides

PROMPTS = ["a red cube", "a blue ball", "a green cone"]
# Every per-prompt experiment of the VSD family (SDI's has no score model and is configured elsewhere).
VSD_PER_PROMPT = sorted(p.stem for p in (CONFIGS / "experiment").glob("*_per_prompt.yaml")
                        if "vsd" in p.stem.split("_")[0])


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"train": PROMPTS, "val": PROMPTS, "test": PROMPTS}))
    return path


def _cfg(tmp_path, tiny_sd, corpus_file, experiment, *extra):
    return compose(tmp_path, tmp_path / "cache", *sd_overrides(tiny_sd), f"experiment={experiment}",
                   f"data.corpus_path={corpus_file}", *extra, tiny=False)


def test_the_vsd_family_per_prompt_experiments_are_found():
    assert {"vsd_ingp_per_prompt", "l2vsd_ingp_per_prompt"} <= set(VSD_PER_PROMPT)


@pytest.mark.parametrize("experiment", VSD_PER_PROMPT)
def test_one_prompt_per_run_with_its_own_score_model(tmp_path, tiny_sd, corpus_file, experiment):
    plain = compose(tmp_path, tmp_path, f"experiment={experiment}", tiny=False)
    assert plain.data.batch_size == 1  # App. F: batch size 1, the run's one prompt every step
    with pytest.raises(MissingMandatoryValue, match="prompt_index"):  # no silent "prompt 0" default
        build_system(_cfg(tmp_path, tiny_sd, corpus_file, experiment))
    systems = [build_system(_cfg(tmp_path, tiny_sd, corpus_file, experiment, f"data.prompt_index={i}"))[0]
               for i in (0, 2)]
    for system, prompt in zip(systems, [PROMPTS[0], PROMPTS[2]]):
        assert system.train_prompts == [prompt] and system.generator.num_prompts == 1
    a, b = (s.guidance.score_model.trainable_parameters() for s in systems)
    assert set(a) == set(b) and all(a[n] is not b[n] for n in a)  # a score model per prompt
    with pytest.raises(IndexError, match="3 unique prompts"):
        build_system(_cfg(tmp_path, tiny_sd, corpus_file, experiment, "data.prompt_index=3"))


def test_a_per_prompt_run_trains_only_its_prompt(tmp_path, tiny_sd, corpus_file):
    cfg = _cfg(tmp_path, tiny_sd, corpus_file, "vsd_ingp_per_prompt", "data.prompt_index=1", "data.batch_size=1")
    metrics = train(cfg)
    assert metrics["training"]["steps"] == 3 and metrics["training"]["nonfinite_steps"] == 0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["config"]["data"]["prompt_index"] == 1  # evaluation rebuilds the same run
    assert state["state_dict"]["model.generator.sdf_layers.0"].shape[0] == 1  # one iNGP, not one per corpus prompt
    system, _, corpus = build_system(cfg)
    assert system.train_prompts == [PROMPTS[1]] and corpus.unique("test") == tuple(PROMPTS)  # candidates kept


def test_with_train_prompt_keeps_the_other_splits():
    corpus = Corpus("c", {"train": ("a", "b", "a", "c"), "val": ("v",), "test": ("a", "b", "c")}, None, "")
    one = corpus.with_train_prompt(2)
    assert one.split("train") == ("c",) and one.split("val") == ("v",) and one.split("test") == ("a", "b", "c")
    assert corpus.with_train_prompt(1).split("train") == ("b",)  # indices count unique prompts
    with pytest.raises(IndexError):
        corpus.with_train_prompt(-1)


@pytest.mark.parametrize("experiment", VSD_PER_PROMPT)
def test_the_documented_multirun_sweeps_every_mg15_prompt(experiment):
    """The command in the config's comment is what Hydra expands to one run per train prompt."""
    import re
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    line = next(ln for ln in text.splitlines() if "scripts/train.py -m" in ln and f"experiment={experiment}" in ln)
    override = next(a for a in shlex.split(line.lstrip("# ")) if a.startswith("data.prompt_index="))
    sweep = OverridesParser.create().parse_overrides([override])[0]
    assert sweep.is_sweep_override() and list(sweep.sweep_iterator()) == list(range(15))  # mg15: 15 prompts
    assert re.search(r"override /data: mg15", (CONFIGS / "experiment" / "vsd_ingp_per_prompt.yaml").read_text())
