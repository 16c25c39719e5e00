"""A run recorded by the code before the restructure (config layout 0) resumes under today's code.

The old code is the repository's own history (``git archive`` of :data:`V0_COMMIT`, main before the
restructure of issue 16, and of :data:`UNSTAMPED_COMMIT`, the restructured main before the stamp),
run in a subprocess from a temp dir: it composes (fast tests) or trains and checkpoints (slow test)
exactly as a user's old run did. The new code then compares / resumes. Skipped only where the
checkout has no git history to take the old code from.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, ROOT, TINY, compose

V0_COMMIT = "c16c78f"  # main before the restructure (git log --first-parent: session 6's last commit)
UNSTAMPED_COMMIT = "1afc70a"  # main after the restructure, before the config_version stamp
# What each old layout's resume reports as changed (applied, may-change) settings: the validation bound
# added since, and the progress bar's class (a3fb795).
_BAR = {"callbacks.progress_bar._target_": ["lightning.pytorch.callbacks.RichProgressBar",
                                            "amortized3d.callbacks.StepProgressBar"]}
# ... and the speed-only switches of session 10 (absent before: glibc's allocator, the rows lookup).
_SESSION10 = {"cpu_allocator": ["<absent>", "keep_freed"]}
_HASHED_LOOKUP = {"generator.encoding.hashed_lookup": ["<absent>", "corners"],
                  "generator.encoding.compile": ["<absent>", False],  # session 12
                  "generator.encoding.dense_lookup": ["<absent>", "grid_sample"]}  # session 14
CHANGED = {V0_COMMIT: {"data.val_max_prompts": [None, 16], **_BAR, **_SESSION10},
           UNSTAMPED_COMMIT: {**_BAR, **_SESSION10}}
# ... and, for hyper_ingp, the render fast path on by default since (analytic: session 8, SD: session 10).
_FAST = {"generator.fused_mlp": [False, True], "renderer.skip_empty_space": [False, True]}
FAST_PATH = {("prior=analytic", "generator=hyper_ingp"): _FAST, ("prior=stable_diffusion", "generator=hyper_ingp"): _FAST}
# ... and the compiled lookups on for hyper_ingp on SD (session 12).
COMPILED = {("prior=stable_diffusion", "generator=hyper_ingp"): {"generator.encoding.compile": ["<absent>", True]}}
# ... and what skipped samples composite (session 14; the proposal's albedo, as before).
_PROPOSAL_ALBEDO = {"renderer.proposal_albedo": ["<absent>", True]}
NUM_TRAIN_PROMPTS = 24  # set by train() from the corpus; the same number on both sides
OUT = Path("/nonexistent/amortized3d-run")  # the run dir both sides' configs name (composing writes nothing)

# Composes configs in the old tree as its scripts/train.py did and prints their resolved form.
_OLD_COMPOSE = """
import json, sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
out = []
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    for overrides in json.loads(sys.argv[2]):
        cfg = compose("train", overrides=overrides)
        with open_dict(cfg):
            cfg.data.num_train_prompts = int(sys.argv[3])
        out.append({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"})
print(json.dumps(out))
"""


def _git_tree(commit: str, where: Path) -> Path:
    """The source tree at ``commit``, extracted from this checkout's git history."""
    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"needs the git history (commit {commit}) to run the earlier code")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


@pytest.fixture(scope="session")
def v0_tree(tmp_path_factory) -> Path:
    return _git_tree(V0_COMMIT, tmp_path_factory.mktemp("v0_tree"))


def _old_env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "PROJECT_ROOT": str(tree)}


def _combos() -> list[list[str]]:
    stems = lambda group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))  # noqa: E731
    return [[f"prior={p}", f"generator={g}", f"guidance={u}"]
            for p in stems("prior") for g in stems("generator") for u in stems("guidance")]


def _old_configs(tree: Path, combos: list[list[str]]) -> list[dict]:
    args = [[f"paths.output_dir={OUT}", f"paths.cache_dir={OUT}", f"paths.root_dir={tree}"] + c for c in combos]
    result = subprocess.run([sys.executable, "-c", _OLD_COMPOSE, str(tree / "configs"), json.dumps(args),
                             str(NUM_TRAIN_PROMPTS)], capture_output=True, text=True, cwd=tree,
                            env=_old_env(tree), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _new_config(*overrides: str) -> dict:
    from amortized3d.build import resolved_config

    return resolved_config(compose(OUT, OUT, f"data.num_train_prompts={NUM_TRAIN_PROMPTS}", *overrides,
                                   tiny=False))


@pytest.fixture(scope="module", params=[V0_COMMIT, UNSTAMPED_COMMIT])
def old_configs(request, tmp_path_factory) -> tuple[str, dict[tuple[str, ...], dict]]:
    """(commit, {combo: the config that commit's code records}) for every shipped combination."""
    tree = _git_tree(request.param, tmp_path_factory.mktemp(f"tree_{request.param}"))
    combos = _combos()
    return request.param, dict(zip(map(tuple, combos), _old_configs(tree, combos)))


@pytest.fixture(scope="module")
def new_configs() -> dict[tuple[str, ...], dict]:
    return {tuple(c): _new_config(*c) for c in _combos()}


def _meta(config: dict, version: int) -> dict:
    return {"path": "old.ckpt", "config": config, "config_version": version, "global_step": 0}


def test_every_pre_restructure_config_resumes_as_the_same_experiment(old_configs, new_configs):
    """Every shipped prior x generator x guidance, recorded by the old code, against today's
    composition of the same command line: nothing blocks, and the recorded changes are the
    may-change settings whose defaults changed since (:data:`CHANGED`)."""
    from amortized3d.run_guard import ResumeMismatchError, compare_resume

    commit, configs = old_configs
    assert set(configs) == set(new_configs)
    for combo, old in configs.items():
        new = new_configs[combo]
        result = compare_resume(_meta(old, 0), new, None)
        assert result["forced"] == [], combo
        lookup = _HASHED_LOOKUP if "encoding" in (new.get("generator") or {}) else {}
        assert result["changed"] == {**CHANGED[commit], **FAST_PATH.get(combo[:2], {}), **lookup,
                                     **COMPILED.get(combo[:2], {}), **_PROPOSAL_ALBEDO}, combo
        with pytest.raises(ResumeMismatchError, match=r"was trained as a different experiment"):
            compare_resume(_meta(old, 1), new, None)  # read as today's layout, the moved keys differ


@pytest.mark.parametrize("override, expected", [
    ("seed=1", r"seed: 0 -> 1"),
    ("prior.recommended.guidance_scale=10", r"guidance\.guidance_scale: 7\.5 -> 10"),  # a published CFG
    ("prior.recommended.score_model_lr=0.01", r"guidance\.score_optimizer\.lr: 0\.001 -> 0\.01"),
    ("prior.score_model.base_channels=16", r"guidance\.score_model\.base_channels: 32 -> 16"),
    ("prior.capacity.hash_grid.n_levels=5", r"generator\.encoding\.n_levels: 6 -> 5"),  # a published capacity
    ("data=primitives_open", r"world\._target_: 'amortized3d\.scenes\.primitives\.PrimitivesWorld' -> "
                             r"'amortized3d\.scenes\.open_world\.OpenPrimitivesWorld'"),
    ("renderer.density=nerf", r"renderer\.density: 'auto' -> 'nerf'"),
])
def test_a_different_experiment_is_still_refused_after_migration(old_configs, override, expected):
    from amortized3d.run_guard import ResumeMismatchError, compare_resume

    old = old_configs[1][("prior=analytic", "generator=hyper_ingp", "guidance=vsd")]
    new = _new_config("prior=analytic", "generator=hyper_ingp", "guidance=vsd", override)
    with pytest.raises(ResumeMismatchError, match=expected):
        compare_resume(_meta(old, 0), new, None)


def test_a_current_config_migrates_to_itself(new_configs):
    """Checkpoints of the restructured code written before the stamp carry no version (read as 0):
    the version-0 migration must leave a current-layout config as it is."""
    from amortized3d.config_version import migrate_config

    for combo, new in new_configs.items():
        assert migrate_config(new, 0).config == new, combo
    assert migrate_config(new, 1).config == new


def test_an_unknown_config_version_is_a_clear_error():
    from amortized3d.config_version import CONFIG_VERSION, migrate_config
    from amortized3d.run_guard import ResumeMismatchError, compare_resume

    with pytest.raises(ValueError, match=rf"config_version {CONFIG_VERSION + 1} is not one this code knows"):
        migrate_config({}, CONFIG_VERSION + 1)
    with pytest.raises(ResumeMismatchError, match=r"ckpt_path=old\.ckpt: config_version 'x'"):
        compare_resume(_meta({"seed": 0}, "x"), {"seed": 0}, None)


# Smaller than the analytic world's 2^18 table: a 2-step checkpoint of a few MB.
_SMALL = ["generator.encoding.log2_hashmap_size=12", "guidance=l2vsd"]


@pytest.mark.slow
def test_a_checkpoint_written_by_the_old_code_resumes_and_loads(tmp_path, v0_tree, cache_dir):
    """The old code trains L²-VSD (score model + its optimizer) 2 steps and checkpoints; today's
    train() resumes it to step 3 without force, the model loads for evaluation, and a resume that
    changes the experiment is still refused."""
    from amortized3d.evaluation.checkpoint import load_model
    from amortized3d.run_guard import ResumeMismatchError
    from amortized3d.train import train

    run = tmp_path / "run"
    old = subprocess.run([sys.executable, str(v0_tree / "scripts" / "train.py"), *TINY, *_SMALL,
                          f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'old_cache'}", "trainer.max_steps=2"],
                         capture_output=True, text=True, cwd=v0_tree, env=_old_env(v0_tree), timeout=900)
    assert old.returncode == 0, old.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert "config_version" not in torch.load(ckpt, map_location="cpu", weights_only=False)["amortized3d"]

    loaded = load_model(ckpt, [f"paths.cache_dir={cache_dir}"])
    assert loaded.cfg.world.bound == 1.0 and loaded.cfg.renderer.density == "auto"

    with pytest.raises(ResumeMismatchError, match=r"seed: 0 -> 1"):
        train(compose(run, cache_dir, *_SMALL, "trainer.max_steps=3", f"ckpt_path={ckpt}", "seed=1"))
    train(compose(run, cache_dir, *_SMALL, "trainer.max_steps=3", f"ckpt_path={ckpt}"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    record = state["amortized3d"]["resumes"][-1]
    assert state["global_step"] == 3 and record["step"] == 2 and record["forced"] == []
    from amortized3d.config_version import CONFIG_VERSION

    assert state["amortized3d"]["config_version"] == CONFIG_VERSION  # re-stamped in today's layout


def test_a_conv3d_run_recorded_before_z_draws_resumes_at_any_version(new_configs):
    """generator.num_particles of 3DConv-net (issue 19's z draws) came with version 2: a run recorded
    without it (v0 or v1) is the same experiment; a different n is refused
    (it changes what the run's evaluation measures)."""
    from amortized3d.run_guard import ResumeMismatchError, compare_resume

    new = new_configs[("prior=analytic", "generator=conv3d", "guidance=asd")]
    recorded = json.loads(json.dumps(new))
    del recorded["generator"]["num_particles"]
    for version in (0, 1):
        assert compare_resume(_meta(recorded, version), new, None) == {"changed": {}, "forced": []}
    with pytest.raises(ResumeMismatchError, match=r"generator\.num_particles: 1 -> 4"):
        compare_resume(_meta(recorded, 1), _new_config("prior=analytic", "generator=conv3d", "guidance=asd",
                                                      "generator.num_particles=4"), None)
