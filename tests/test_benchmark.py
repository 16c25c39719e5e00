"""scripts/benchmark.py's measurements run on the real configs and report consistent ratios."""
from __future__ import annotations

import pytest
import torch

from amortized3d.benchmark import bench_render, bench_training_steps
from amortized3d.generators import encodings
from conftest import TINY

TINY_BENCH = [o for o in TINY if not o.startswith(("callbacks.", "~callbacks", "trainer.max_steps"))]


def test_render_benchmark_rows(cache_dir):
    rows = bench_render([*TINY_BENCH, "evaluation.num_views=3"], rounds=1, views=2, cache_dir=str(cache_dir))
    by_variant = {r["variant"]: r for r in rows}
    train = by_variant["train: forward+backward"]
    assert train["rays_per_s_vs_train_render"] == 1.0 and train["samples_per_ray"] == 16
    assert {"eval: direct (no grad)", "eval: baked 32^3 grid (no grad)"} <= set(by_variant)
    # analytic hyper_ingp runs the fast path: the previous default is a row, the configured path timed once
    assert {"train: forward+backward [old]", "train: forward+backward [two-head mlp]",
            "train: forward+backward [session 16]"} <= set(by_variant)
    assert encodings.SPLIT_GRID_SAMPLE_POINTS  # the one-batch rows restore the default
    assert "train: forward+backward [fused mlp + skip]" not in by_variant
    for r in rows:
        assert r["seconds"] > 0 and r["rays_per_s"] == pytest.approx(r["rays_per_s_vs_train_render"]
                                                                     * train["rays_per_s"])


@pytest.mark.slow
def test_training_step_benchmark_is_relative_to_sds(cache_dir):
    rows = bench_training_steps(["sds", "l2vsd"], TINY_BENCH, rounds=1, cache_dir=str(cache_dir))
    rel = {r["variant"]: r["relative_to_sds"] for r in rows}
    assert rel["sds"] == 1.0 and rel["l2vsd"] > 0


def test_cache_size_benchmark_returns_its_rows():
    from amortized3d.benchmark import bench_cache_size

    rows = bench_cache_size(num_prompts=8, embedding_dim=32, tokens=False)
    assert [r["variant"] for r in rows] == ["pooled fp16, E=32"]
    assert rows[0]["bytes_per_prompt"] >= 2 * 32  # fp16 pooled embedding per prompt


def test_mlp_benchmark_rows():
    from amortized3d.benchmark import bench_mlp

    rows = bench_mlp(fields=2, points=300, rounds=1)
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["old: two heads, batched_mlp"]["speedup_vs_old"] == 1.0
    assert {"fused heads, one pass", "new: fused heads, chunked (fused_mlp=true)"} <= set(by_variant)
    assert all(r["seconds"] > 0 for r in rows)


def test_render_sd_benchmark_rows():
    """The SD-size render benchmark builds from prior=stable_diffusion without loading SD; tiny sizes here."""
    from amortized3d.benchmark import RENDER_SD_VARIANTS, bench_render_sd

    small = ["prior.render.num_samples=8", "prior.render.num_importance=4",
             "generator.encoding.n_levels=4", "generator.encoding.log2_hashmap_size=10",
             "generator.encoding.base_resolution=4", "generator.encoding.per_level_scale=1.6"]
    eager = [v for v, flags in RENDER_SD_VARIANTS.items() if not flags[3]]  # compiling: the slow encoding test
    rows = bench_render_sd(rounds=1, overrides=small, resolution=8, variants=eager)
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {f"{p} [{v}]" for p in ("train: forward+backward", "proposal (no grad)")
                               for v in eager}
    assert by_variant["train: forward+backward [session 9: fast path, rows lookup]"]["speedup_vs_session9"] == 1.0
    assert all(r["seconds"] > 0 and r["rays"] == 64 and r["samples_per_ray"] == 12 for r in rows)


def test_render_benchmark_renders_a_runs_trained_fields(cache_dir, tmp_path):
    """--checkpoint: the benchmarked system carries the checkpoint's model weights, and a checkpoint of
    another model is refused with the fix, not a shape traceback."""
    from amortized3d.benchmark import _build_systems, load_trained_fields
    from amortized3d.checkpoint_io import save_torch

    overrides = [*TINY_BENCH, "generator=hyper_ingp", "evaluation.num_views=2"]
    trained, _ = _build_systems({"run": overrides}, str(cache_dir))["run"]
    with torch.no_grad():  # stands in for training: every weight moved
        for p in trained.model.parameters():
            p.add_(torch.randn_like(p))
    ckpt = save_torch({"state_dict": trained.state_dict()}, tmp_path / "last.ckpt")

    fresh, _ = _build_systems({"run": overrides}, str(cache_dir))["run"]
    assert not torch.equal(fresh.generator.encoding.table, trained.generator.encoding.table)
    load_trained_fields(fresh, ckpt)
    for (name, a), b in zip(fresh.model.named_parameters(), trained.model.parameters()):
        assert torch.equal(a, b), name

    other, _ = _build_systems({"run": [*overrides, "generator.mlp_hidden=8"]}, str(cache_dir))["run"]
    with pytest.raises(ValueError, match="--override"):
        load_trained_fields(other, ckpt)

    rows = bench_render(overrides, rounds=1, views=2, cache_dir=str(cache_dir), compare=False, checkpoint=ckpt)
    assert {r["variant"] for r in rows} >= {"train: forward+backward", "eval: direct (no grad)"}
