"""scripts/evaluate.py's library end to end on a tiny checkpoint, with a random-weight open_clip model."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from amortized3d.cameras import orbit_cameras
from amortized3d.evaluation.clip import ClipEncoder, ClipWeightsError
from amortized3d.evaluation.evaluate import evaluate
from amortized3d.evaluation.orbit import evaluation_renderer, render_turntable
from amortized3d.evaluation.scorers import clip_text_embeddings
from amortized3d.train import train
from conftest import CONFIGS, ROOT, compose

# a3d-tiny-clip: a random-weight open_clip model config of the tests (tests/clip_configs), not the library's
CLIP_CONFIGS = str(ROOT / "tests" / "clip_configs")
TINY_CLIP = ["evaluator.model=a3d-tiny-clip", "evaluator.pretrained=null", f"evaluator.config_dirs=[{CLIP_CONFIGS}]"]


def compose_evaluate(output_dir, cache_dir, ckpt, *overrides):
    """The real `configs/evaluate.yaml` composition, as `scripts/evaluate.py` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    base = [f"ckpt_path={ckpt}", f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}",
            f"paths.root_dir={ROOT}", "render.num_views=4", "device=cpu"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose("evaluate", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run")
    train(compose(out, cache_dir, "evaluation.splits=[val]", "evaluation.num_views=4",
                  f"callbacks.validation_metrics.video_dir={out / 'videos' / 'val_steps'}"))
    return out / "checkpoints" / "last.ckpt"


def test_clip_metrics_match_brute_force_and_repeat_exactly(tmp_path, cache_dir, checkpoint):
    # split=val (12 prompts: 6 seen, 6 held out) keeps it fast; the default split=test runs the same code
    cfg = compose_evaluate(tmp_path / "a", cache_dir, checkpoint, *TINY_CLIP, "split=val")
    metrics = evaluate(cfg)
    clip, n = metrics["clip"], 12
    assert metrics["num_candidates"] == n and clip["overall"]["num_prompts"] == n
    assert clip["seen"]["num_prompts"] == 6 and clip["held_out"]["num_prompts"] == 6
    rows = list(csv.DictReader(open(tmp_path / "a" / "per_prompt.csv")))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in sorted(rows, key=lambda r: int(r["index"]))]
    assert len(list((tmp_path / "a" / "grids").glob("*.png"))) == n
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == metrics

    # brute force: every prompt's 4 views scored against the full 30-prompt text matrix
    from amortized3d.evaluation.checkpoint import load_model

    system, corpus, _ = load_model(checkpoint, [f"paths.cache_dir={cache_dir}"])
    prompts = list(corpus.unique("val"))
    encoder = ClipEncoder("a3d-tiny-clip", None, config_dirs=[CLIP_CONFIGS])
    cached = torch.nn.functional.normalize(clip_text_embeddings(encoder, corpus.name, prompts, cache_dir).double(),
                                           dim=-1)  # what evaluate used (fp16 cache)
    exact = encoder.encode(prompts).double()
    ev = metrics["evaluation"]
    cams = orbit_cameras(ev["num_views"], ev["resolution"])
    renderer = evaluation_renderer(system.renderer, {"num_samples": ev["samples"][0], "num_importance": ev["samples"][1]})
    bake = (ev["baked_grid"], float(system.renderer.bound_radius))
    sims, hits = [], []
    for i, p in enumerate(prompts):
        images = encoder.encode_images(render_turntable(system, p, cams, bake, renderer)).double()
        sims.append((images @ exact[i]).mean().item())
        hits.append(((images @ cached.T).argmax(dim=1) == i).double().mean().item())
    assert [float(r["sim"]) for r in rows] == pytest.approx(sims, abs=2e-3)  # fp16 cache vs fp32
    assert [float(r["r_at_1"]) for r in rows] == pytest.approx(hits, abs=1e-12)
    assert clip["overall"]["r_at_1"] == pytest.approx(sum(hits) / n, abs=1e-12)
    assert clip["overall"]["sim"] == pytest.approx(sum(sims) / n, abs=2e-3)

    again = evaluate(compose_evaluate(tmp_path / "b", cache_dir, checkpoint, *TINY_CLIP, "split=val"))
    assert again == metrics
    assert (tmp_path / "a" / "per_prompt.csv").read_text() == (tmp_path / "b" / "per_prompt.csv").read_text()


def test_oracle_evaluator_agrees_with_end_of_training_metrics(tmp_path, cache_dir, checkpoint):
    metrics = evaluate(compose_evaluate(tmp_path, cache_dir, checkpoint, "evaluator=oracle", "split=val"))
    final = json.loads((checkpoint.parents[1] / "metrics.json").read_text())["oracle"]["val"]
    for group in ("overall", "seen", "held_out"):
        for key in ("r_at_1", "psnr", "num_prompts"):
            assert metrics["oracle"][group][key] == pytest.approx(final[group][key], abs=1e-9), (group, key)


def test_oracle_evaluation_builds_neither_prior_nor_guidance(tmp_path, cache_dir, checkpoint, monkeypatch):
    """The oracle scores against the run's world (its own config node), so the prior is never built."""
    import amortized3d.guidance.sds as sds
    import amortized3d.scenes.references as references

    def refuse(*args, **kwargs):
        raise AssertionError("the oracle evaluation built the prior or the guidance")

    monkeypatch.setattr(references, "build_analytic_prior", refuse)
    monkeypatch.setattr(sds.SDSGuidance, "__init__", refuse)
    metrics = evaluate(compose_evaluate(tmp_path, cache_dir, checkpoint, "evaluator=oracle", "split=val"))
    assert metrics["oracle"]["overall"]["num_prompts"] == 12


def test_another_corpus_by_path(tmp_path, cache_dir, checkpoint):
    corpus = tmp_path / "other.json"
    corpus.write_text(json.dumps({"train": ["a red cube"], "test": ["a blue torus", "a green cube", "a red cube"]}))
    metrics = evaluate(compose_evaluate(tmp_path / "out", cache_dir, checkpoint, *TINY_CLIP, "data=primitives",
                                        f"data.corpus_path={corpus}", "grid_views=0"))
    assert metrics["num_candidates"] == 3 and metrics["clip"]["overall"]["num_prompts"] == 3
    assert not (tmp_path / "out" / "grids").exists()


def test_clip_weights_from_a_local_file_and_missing_weights_error(tmp_path):
    random = ClipEncoder("a3d-tiny-clip", None, seed=3, config_dirs=[CLIP_CONFIGS])
    path = tmp_path / "weights.bin"
    torch.save(random.model.state_dict(), path)
    loaded = ClipEncoder("a3d-tiny-clip", str(path), config_dirs=[CLIP_CONFIGS])
    prompts = ["a red cube", "a blue sphere"]
    assert torch.equal(loaded.encode(prompts), random.encode(prompts))
    assert loaded.identity != random.identity
    again = ClipEncoder("a3d-tiny-clip", None, seed=3, config_dirs=[CLIP_CONFIGS])
    assert torch.equal(again.encode(prompts), random.encode(prompts))
    with pytest.raises(ClipWeightsError, match=r"a3d-tiny-clip.*evaluator.pretrained=/path/to"):
        ClipEncoder("a3d-tiny-clip", str(tmp_path / "missing.bin"), config_dirs=[CLIP_CONFIGS])
    with pytest.raises(ValueError, match="ViT-L-14"):
        ClipEncoder("ViT-Nope", "openai")


@pytest.mark.slow
def test_missing_pretrained_tag_offline_names_model_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipWeightsError, match=r"'ViT-B-16'.*openai.*Hugging Face cache.*evaluator.pretrained="):
        ClipEncoder("ViT-B-16", "openai", cache_dir=str(tmp_path))


def test_training_logs_validation_metrics_and_turntables(checkpoint):
    run = checkpoint.parents[1]
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    logged = [r for r in rows if r.get("val/oracle_r_at_1")]
    assert len(logged) == 1  # one validation (step 2) in the tiny run
    assert 0.0 <= float(logged[0]["val/oracle_r_at_1"]) <= 1.0 and float(logged[0]["val/oracle_psnr"]) > 5
    assert len(list((run / "videos" / "val_steps").glob("step_000002_*.mp4"))) == 1


def test_validation_metrics_with_clip(tmp_path, cache_dir):
    clip = "callbacks.validation_metrics.clip={model: a3d-tiny-clip, pretrained: null}"
    train(compose(tmp_path, cache_dir, "callbacks.validation_metrics.evaluator=clip", clip,
                  f"+callbacks.validation_metrics.clip.config_dirs=[{CLIP_CONFIGS}]",
                  "callbacks.validation_metrics.num_prompts=2", "callbacks.validation_metrics.video_dir=null",
                  "trainer.max_steps=2", "~callbacks.checkpoint"))
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("val/clip_sim")]
    assert len(rows) == 1 and -1 <= float(rows[0]["val/clip_sim"]) <= 1
    assert float(rows[0]["val/clip_r_at_1"]) in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@pytest.mark.slow
def test_two_process_gloo_evaluation_matches_one_process(tmp_path, cache_dir, checkpoint):
    """torchrun --nproc_per_node=2 scripts/evaluate.py: each rank scores its shard, gathered = single run."""
    import subprocess
    import sys

    # A cold cache for the two ranks: rank 1 waits for rank 0's text and CLIP caches (no barrier, no re-encode).
    args = [f"ckpt_path={checkpoint}", f"paths.cache_dir={tmp_path / 'cold_cache'}", "render.num_views=4",
            "device=cpu", "split=val", *TINY_CLIP]
    single = evaluate(compose_evaluate(tmp_path / "one", cache_dir, checkpoint, *TINY_CLIP, "split=val"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "evaluate.py"), *args, f"hydra.run.dir={tmp_path / 'two'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    assert two["clip"] == single["clip"]
    cold = tmp_path / "cold_cache"
    assert {p.parent.name for p in cold.rglob("*.npy")} >= {"text", "clip_text"}  # both built cold, once
    assert not list(cold.rglob("*.tmp")) and not list(cold.rglob("*.building"))
    assert (tmp_path / "two" / "per_prompt.csv").read_text() == (tmp_path / "one" / "per_prompt.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "grids").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "grids").iterdir())
