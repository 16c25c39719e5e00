"""Fault injection for the training loop (issue 18): never run forever, fail loudly and early,
never resume into a different experiment, stop cleanly on preemption.

Each test injects one fault of the issue's table into a real run (real Hydra configs, real
Lightning Trainer, real subprocess + real signals) and checks what the user sees. Exceptions
are matched by class name so the module imports (and the tests fail) on code without the guards.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amortized3d.train import train
from conftest import ROOT, TINY, compose

MAX_TIME = "+trainer.max_time='00:00:00:25'"  # code without the guard would loop until here, then "pass"


def _raises(name: str, fn, *args, match: str | None = None) -> Exception:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - matched by name below
        assert type(e).__name__ == name, f"expected {name}, got {type(e).__name__}: {e}"
        if match is not None:
            assert re.search(match, str(e)), f"{match!r} not in: {e}"
        return e
    pytest.fail(f"{name} not raised")


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir) -> Path:
    """hyper_ingp + sds, 2 steps, checkpoints at step 2 (step_000002.ckpt and last.ckpt)."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(compose(out, cache_dir, "trainer.max_steps=2"))
    return out


def test_corrupt_score_model_optimizer_state_is_rolled_back(tmp_path, cache_dir):
    """l2vsd's own score model: a step that would write NaN into it is undone; training goes on."""
    from amortized3d.checkpoint_io import AtomicCheckpointIO

    train(compose(tmp_path, cache_dir, "guidance=l2vsd", "trainer.max_steps=2"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = _load(last)
    states = ckpt["amortized3d"]["auxiliary_optimizer"]["state"]
    assert states
    for state in states.values():
        state["exp_avg_sq"].fill_(-1.0)
    AtomicCheckpointIO().save_checkpoint(ckpt, last)
    train(compose(tmp_path, cache_dir, "guidance=l2vsd", "trainer.max_steps=4", f"ckpt_path={last}", MAX_TIME))
    after = _load(last)
    assert after["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in after["state_dict"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


# ---------------------------------------------------------------- row 1: the divergence guard
def test_lr_overflow_stops_with_cause_instead_of_looping(tmp_path, cache_dir):
    start = time.monotonic()
    e = _raises("DivergenceError", train, compose(tmp_path, cache_dir, "system.optimizer.lr=1e30",
                                                    "trainer.max_steps=50", MAX_TIME),
                match=r"5 consecutive non-finite steps")
    assert "lr=1e+30" in str(e) and "system.max_consecutive_nonfinite=5" in str(e)
    assert "last good checkpoint: none" in str(e)
    assert "\n" not in str(e)  # one line
    assert time.monotonic() - start < 20


def test_nan_pixel_in_prior_references_stops_naming_the_prior(tmp_path, cache_dir):
    import lightning as L

    from amortized3d.data import PromptDataModule
    from amortized3d.priors.analytic import AnalyticPrior
    from amortized3d.build import build_system

    system, prior, corpus = build_system(compose(tmp_path, cache_dir))  # default limit: 5
    images = prior.references.images.clone()
    images[0, 0, 0, 0] = float("nan")  # one pixel, as a damaged reference cache would hold
    bad = AnalyticPrior(dataclasses.replace(prior.references, images=images),
                        view_dependent=prior.view_dependent, data_std=prior.data_std)
    system.guidance.prior = bad
    before = {k: v.clone() for k, v in system.generator.state_dict().items() if isinstance(v, torch.Tensor)}
    dm = PromptDataModule(system.train_prompts, corpus.unique("val"), batch_size=2)
    trainer = L.Trainer(max_steps=20, max_time={"seconds": 25}, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False)
    e = _raises("DivergenceError", trainer.fit, system, dm, match="prior / guidance output is non-finite")
    assert "5 consecutive non-finite steps (steps 0-4," in str(e)
    assert trainer.global_step == 0 and system.nonfinite_steps == 5
    after = system.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_corrupt_adam_state_is_rolled_back_then_stops(tmp_path, cache_dir, base_run):
    """Finite-but-wrong optimizer state (negative exp_avg_sq: what flipped bytes did) makes
    every step write NaN into the weights: each step is undone, then the run stops."""
    from amortized3d.checkpoint_io import AtomicCheckpointIO

    run = _copy(base_run, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    ckpt = _load(last)
    for state in ckpt["optimizer_states"][0]["state"].values():
        state["exp_avg_sq"].fill_(-1.0)  # finite, and sqrt() of it is NaN
    AtomicCheckpointIO().save_checkpoint(ckpt, last)
    e = _raises("DivergenceError", train,
                compose(run, cache_dir, "trainer.max_steps=50", f"ckpt_path={last}", MAX_TIME),
                match="rolled back")
    assert "corrupt optimizer state (negative exp_avg_sq" in str(e)
    assert f"last good checkpoint: {run / 'checkpoints' / 'step_000002.ckpt'}" in str(e)
    # nothing non-finite was written: last.ckpt is still the resumed state
    assert all(torch.isfinite(v).all() for k, v in _load(last)["state_dict"].items()
               if k.startswith("model.generator.") and isinstance(v, torch.Tensor) and v.is_floating_point())


# ---------------------------------------------------------------- row 3: resume guard
@pytest.mark.parametrize("override, expected", [
    ("guidance=csd", r"guidance\.name: 'sds' -> 'csd'"),
    ("seed=1", r"seed: 0 -> 1"),
    ("prior.text_encoder.embedding_dim=512", r"prior\.text_encoder\.embedding_dim: 1024 -> 512"),
    ("generator=ingp", r"generator\._target_: 'amortized3d\.generators\.hyper_ingp"),
    ("guidance=l2vsd", r"guidance\.name: 'sds' -> 'l2vsd'"),
])
def test_resume_into_another_experiment_fails_with_a_readable_diff(tmp_path, cache_dir, base_run, override, expected):
    run = _copy(base_run, tmp_path / "run")
    e = _raises("ResumeMismatchError", train,
                compose(run, cache_dir, "trainer.max_steps=4", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                        override), match=expected)
    assert "resume.force=true" in str(e) and "state_dict" not in str(e)


def test_resume_with_another_text_encoder_identity_fails(base_run):
    """Same config keys, other embeddings (e.g. another revision of the encoder): the identity."""
    from amortized3d.run_guard import check_text_encoder, load_checkpoint_meta
    from amortized3d.text.analytic import BagOfWordsTextEncoder

    meta = load_checkpoint_meta(base_run / "checkpoints" / "last.ckpt")
    check_text_encoder(meta, BagOfWordsTextEncoder(embedding_dim=1024).identity)  # the same: fine
    _raises("ResumeMismatchError", check_text_encoder, meta, BagOfWordsTextEncoder(embedding_dim=1024, seed=7).identity,
            match=r"text encoder 'BagOfWordsTextEncoder-v\d+-dim1024-seed0'.*seed7.*resume\.force=true")


def test_resume_force_continues_and_records_what_was_forced(tmp_path, cache_dir, base_run):
    run = _copy(base_run, tmp_path / "run")
    train(compose(run, cache_dir, "trainer.max_steps=3", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                  "seed=1", "resume.force=true"))
    record = _load(run / "checkpoints" / "last.ckpt")["amortized3d"]["resumes"][-1]
    assert record["step"] == 2 and record["forced"] == ["seed: 0 -> 1"]


def test_resume_applies_a_changed_lr_and_records_it(tmp_path, cache_dir, base_run):
    run = _copy(base_run, tmp_path / "run")
    train(compose(run, cache_dir, "trainer.max_steps=4", "system.optimizer.lr=1e-3",
                  f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    ckpt = _load(run / "checkpoints" / "last.ckpt")
    lrs = {g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert lrs == {1e-3}, lrs  # not the checkpoint's 4e-3
    record = ckpt["amortized3d"]["resumes"][-1]
    assert record["changed"]["system.optimizer.lr"] == [4e-3, 1e-3]
    assert record["changed"]["trainer.max_steps"] == [2, 4]
    assert ckpt["hyper_parameters"]["config"]["system"]["optimizer"]["lr"] == 1e-3


def test_resume_with_reordered_corpus_for_per_prompt_generator_fails(tmp_path, cache_dir):
    prompts = ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": prompts, "val": prompts[:1]}))
    run = tmp_path / "run"
    train(compose(run, cache_dir, "generator=ingp", f"data.corpus_path={corpus}", "trainer.max_steps=2"))
    corpus.write_text(json.dumps({"train": prompts[::-1], "val": prompts[:1]}))
    _raises("ResumeMismatchError", train,
            compose(run, cache_dir, "generator=ingp", f"data.corpus_path={corpus}", "trainer.max_steps=4",
                    f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"),
            match=r"same 4 prompts in another order \(first at #0: 'a red cube' -> 'a yellow torus'\)")


def test_resume_with_other_max_steps_fails_when_it_moves_asd_schedules(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(compose(run, cache_dir, "guidance=asd", "trainer.max_steps=2"))
    e = _raises("ResumeMismatchError", train,
                compose(run, cache_dir, "guidance=asd", "trainer.max_steps=4",
                        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"),
                match=r"schedules end at trainer\.max_steps")
    assert "guidance.t_max: [[0, 0.98], [2, 0.5]] -> [[0, 0.98], [4, 0.5]]" in str(e)


# ---------------------------------------------------------------- row 4: preemption
def _train_cmd(run: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, f"hydra.run.dir={run}",
            f"paths.cache_dir={cache_dir}", *overrides]


@pytest.mark.parametrize("signum", [
    signal.SIGTERM,
    pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, marks=pytest.mark.slow),
])
def test_signal_saves_last_ckpt_and_exits_nonzero(tmp_path, cache_dir, signum):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(run, cache_dir, "trainer.max_steps=100000", "trainer.val_check_interval=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step_000002.ckpt").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not reach step 2"
            time.sleep(0.2)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    m = re.search(rf"interrupted at step (\d+) \({signal.Signals(signum).name}\); resume with ckpt_path=(\S+)", stderr)
    assert m, stderr[-3000:]
    step, path = int(m.group(1)), Path(m.group(2))
    assert path == run / "checkpoints" / "last.ckpt" and step >= 2
    assert _load(path)["global_step"] == step


# ---------------------------------------------------------------- row 5: logs across resumes
def test_resume_continues_the_csv_log(tmp_path, cache_dir):
    common = ["callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=100"]
    train(compose(tmp_path, cache_dir, *common, "trainer.max_steps=4"))
    train(compose(tmp_path, cache_dir, *common, "trainer.max_steps=8",
                  f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"))
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == sorted(set(steps)), steps  # each step once, in order
    assert min(steps) < 4 <= max(steps) and max(steps) >= 7, steps


def test_resume_continues_the_wandb_run(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    wandb.finish()  # a live run of an earlier test in this process would be reused
    common = ["logger=wandb", "logger.wandb.offline=true", "trainer.val_check_interval=100"]
    train(compose(tmp_path, cache_dir, *common, "trainer.max_steps=2"))
    wandb.finish()  # the first segment's process ends here (else wandb reuses its live run in-process)
    time.sleep(1.1)  # offline run dirs are named by the second
    try:
        train(compose(tmp_path, cache_dir, *common, "trainer.max_steps=4",
                      f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"))
    finally:
        wandb.finish()  # leave no live run to later tests of this process
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    ids = {r.name.rsplit("-", 1)[-1] for r in runs}
    assert len(runs) == 2 and len(ids) == 1, runs  # both segments log to one wandb run


def test_resume_with_max_steps_not_past_the_checkpoint_fails(tmp_path, cache_dir, base_run):
    run = _copy(base_run, tmp_path / "run")
    _raises("ResumeMismatchError", train,
            compose(run, cache_dir, "trainer.max_steps=2", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"),
            match=r"trainer\.max_steps: 2 is not past the checkpoint's step 2")


# ---------------------------------------------------------------- row 6: run dir history
def test_copied_run_dir_resume_keeps_last_ckpt_newest(tmp_path, cache_dir, base_run):
    run = _copy(base_run, tmp_path / "moved")
    train(compose(run, cache_dir, "trainer.max_steps=6", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert not [n for n in names if n.startswith("last-")], names
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_fresh_run_into_a_dir_with_checkpoints_refuses_unless_overwrite(tmp_path, cache_dir, base_run):
    run = _copy(base_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    _raises("ConfigError", train, compose(run, cache_dir), match=r"already holds checkpoints.*overwrite=true")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    train(compose(run, cache_dir, "overwrite=true"))
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert "amortized3d" in _load(run / "checkpoints" / "step_000002.ckpt")


# ---------------------------------------------------------------- row 9: stale temp files
def test_stale_checkpoint_temp_files_are_removed_at_start(tmp_path, cache_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        ckpts = tmp_path / "checkpoints"
        ckpts.mkdir()
        stale = ckpts / f".last.ckpt.{dead.pid}.tmp"
        live = ckpts / f".step_000002.ckpt.{alive.pid}.tmp"
        stale.write_bytes(b"x" * 1000)
        live.write_bytes(b"x" * 1000)
        train(compose(tmp_path, cache_dir, "trainer.max_steps=1"))
        assert not stale.exists()
        assert live.exists()  # its writer may still be writing
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------- row 7: off-world prompts
def test_off_world_prompt_is_rejected_before_any_rendering(tmp_path):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": ["a red cube", "a blue sphere", "a dog"], "val": ["a red cube"]}))
    cache = tmp_path / "fresh_cache"
    start = time.monotonic()
    _raises("ConfigError", train, compose(tmp_path / "run", cache, f"data.corpus_path={corpus}"),
            match=r"train\[2\] 'a dog'.*valid shapes")
    assert time.monotonic() - start < 5
    assert not cache.exists() or not any(cache.rglob("*")), "work was done before the check"


@pytest.mark.parametrize("splits, overrides, message", [
    # No 'val' list: the data module's validation split (was a KeyError traceback after the text encoding).
    ({"train": ["a red cube", "a blue sphere"]}, (),
     r"no split 'val' \(its splits: train\), named by data\.val_split.*data\.val_split=train"),
    # A split only the end-of-run evaluation reads (was a KeyError after all of training).
    ({"train": ["a red cube"], "val": ["a red cube"]}, ("evaluation.splits=[train,test]",),
     r"no split 'test' \(its splits: train, val\), named by evaluation\.splits"),
])
def test_corpus_without_a_split_the_run_reads_fails_at_once(tmp_path, splits, overrides, message):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps(splits))
    cache = tmp_path / "fresh_cache"
    start = time.monotonic()
    _raises("ConfigError", train, compose(tmp_path / "run", cache, f"data.corpus_path={corpus}", *overrides),
            match=message)
    assert time.monotonic() - start < 5
    assert not cache.exists() or not any(cache.rglob("*")), "work was done before the check"


# ---------------------------------------------------------------- row 11: typed config values
@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=abc", "trainer.max_steps='abc' must be a positive integer"),
    ("seed=abc", "seed='abc' must be a non-negative integer"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be a positive integer"),
    ("cpu_allocator=jemalloc", "cpu_allocator='jemalloc' must be one of keep_freed, default"),
])
def test_mistyped_config_value_fails_at_once_naming_key_and_value(tmp_path, override, message):
    cache = tmp_path / "fresh_cache"
    start = time.monotonic()
    _raises("ConfigError", train, compose(tmp_path / "run", cache, override), match=re.escape(message))
    assert time.monotonic() - start < 5
    assert not cache.exists()


def test_train_script_reports_a_config_error_in_one_line(tmp_path, cache_dir):
    """... before Lightning is imported (the library and Lightning took ~12 s to import on the AVX2 EPYC): here a
    ``lightning`` that fails to import is first on the path, so the old order (import, then validate) ends in a
    traceback."""
    unimportable = tmp_path / "no_lightning" / "lightning"
    unimportable.mkdir(parents=True)
    (unimportable / "__init__.py").write_text("raise ImportError('lightning imported before the config was checked')\n")
    result = subprocess.run(_train_cmd(tmp_path / "run", cache_dir, "trainer.max_steps=abc"), capture_output=True,
                            text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(unimportable.parent), str(ROOT)])})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "error: invalid config: trainer.max_steps='abc' must be a positive integer" in result.stderr


@pytest.mark.slow
def test_train_script_reports_divergence_in_one_line(tmp_path, cache_dir):
    result = subprocess.run(_train_cmd(tmp_path / "run", cache_dir, "system.optimizer.lr=1e30", "trainer.max_steps=50",
                                       MAX_TIME), capture_output=True, text=True, cwd=ROOT, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "training diverged: 5 consecutive non-finite steps" in lines[0], result.stderr[-3000:]
    assert "lr=1e+30" in lines[0] and "last good checkpoint: none" in lines[0]
