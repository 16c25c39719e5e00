"""Speed and memory measurements reported as ratios measured in one run (machines are noisy).

Each comparison interleaves its candidates over several rounds and reports medians, so a
slow moment of the machine hits all candidates alike.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from amortized3d.generators.encodings import HashGridEncoding


def time_interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_hash_grid(num_points: int = 65536, rounds: int = 5, **grid) -> list[dict]:
    """Forward+backward of the torch hash grid (grid_sample dense levels, generic gather) vs the naive reference."""
    from amortized3d.generators.encodings_reference import naive_reference_for

    grid = {"n_levels": 8, "log2_hashmap_size": 16, "base_resolution": 8, "per_level_scale": 1.6, "bound": 1.0,
            **grid}
    torch.manual_seed(0)
    x = torch.rand(1, num_points, 3) * 2 - 1
    fast = HashGridEncoding(implementation="torch", dense_levels="grid_sample", **grid)
    gather = HashGridEncoding(implementation="torch", dense_levels="gather", **grid)
    gather.load_state_dict(fast.state_dict())

    def step(fn):
        return lambda: fn().sum().backward()

    times = time_interleaved({
        "torch (grid_sample dense levels)": step(lambda: fast(x)),
        "torch (gather all levels)": step(lambda: gather(x)),
        "naive reference (loop)": step(lambda: naive_reference_for(gather, x)),
    }, rounds=rounds)
    base = times["naive reference (loop)"]
    return [{"benchmark": "hash grid fwd+bwd", "variant": k, "seconds": v, "points_per_s": num_points / v,
             "speedup_vs_naive": base / v} for k, v in times.items()]


def _build_systems(variants: dict[str, Sequence[str]], cache_dir: str | None = None) -> dict:
    """{name: (system, cfg)} from ``configs/train.yaml`` with each variant's Hydra overrides."""
    from hydra import compose, initialize_config_dir

    from amortized3d.train import build_system

    root = Path(__file__).resolve().parents[1]
    out = {}
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        for name, overrides in variants.items():
            ov = ["paths.output_dir=/tmp/amortized3d-bench", *overrides]
            if cache_dir:
                ov.append(f"paths.cache_dir={cache_dir}")
            cfg = compose("train", overrides=ov)
            out[name] = (build_system(cfg)[0], cfg)
    return out


def bench_training_steps(guidances: Sequence[str], overrides: Sequence[str] = (), rounds: int = 5,
                         cache_dir: str | None = None) -> list[dict]:
    """Seconds per full training step (render + guidance + optimizer steps) per guidance, relative to SDS."""
    from amortized3d.benchmark_steps import make_step_runner

    systems = _build_systems({g: [f"guidance={g}", *overrides] for g in guidances}, cache_dir)
    runners = {name: make_step_runner(system, cfg) for name, (system, cfg) in systems.items()}
    for _ in range(rounds):  # round-robin, so a slow moment of the machine hits every guidance
        for run in runners.values():
            run()
    times = {k: statistics.median(run.measured) for k, run in runners.items()}
    base = times.get("sds", next(iter(times.values())))
    return [{"benchmark": "training step", "variant": k, "seconds": v, "relative_to_sds": v / base}
            for k, v in times.items()]


def bench_render(overrides: Sequence[str] = (), rounds: int = 5, views: int = 8,
                 cache_dir: str | None = None) -> list[dict]:
    """Render throughput of the configured generator + renderer (rays/s): training renders
    (forward + backward through the field) and evaluation renders (no grad, direct and from the
    baked grid the end-of-run evaluation uses, over one prompt's ``evaluation.num_views`` orbit),
    at the configured resolution and sample budget."""
    from amortized3d.cameras import CameraBatch, orbit_cameras
    from amortized3d.evaluation.final import bake_settings, evaluation_renderer

    system, cfg = _build_systems({"render": list(overrides)}, cache_dir)["render"]
    prompts = system.train_prompts[:views]
    res = int(cfg.system.resolution)
    cams = CameraBatch.cat([orbit_cameras(1, res)] * len(prompts))
    eval_renderer = evaluation_renderer(system.renderer, cfg.evaluation)
    bake = bake_settings(cfg.evaluation, system.renderer)
    eval_views = orbit_cameras(int(cfg.evaluation.num_views), res)

    def train_render():
        system.generator.zero_grad(set_to_none=True)
        system.render(prompts, cams).rgb.sum().backward()

    @torch.no_grad()
    def eval_render(bake_grid):
        return lambda: system.render(prompts[:1], eval_views, bake=bake_grid, renderer=eval_renderer)

    candidates = {"train: forward+backward": train_render, "eval: direct (no grad)": eval_render(None)}
    if bake is not None:
        candidates[f"eval: baked {bake[0]}^3 grid (no grad)"] = eval_render(bake)
    times = time_interleaved(candidates, rounds=rounds)
    rays = {k: (len(prompts) if k.startswith("train") else len(eval_views)) * res * res for k in times}
    base = rays["train: forward+backward"] / times["train: forward+backward"]
    samples = {"train": system.renderer.num_samples + system.renderer.num_importance,
               "eval": eval_renderer.num_samples + eval_renderer.num_importance}
    return [{"benchmark": "render", "variant": k, "seconds": v, "rays_per_s": rays[k] / v,
             "rays_per_s_vs_train_render": rays[k] / v / base, "samples_per_ray": samples[k.split(":")[0]]}
            for k, v in times.items()]


def bench_cache_size(num_prompts: int = 2000, embedding_dim: int = 1024, tokens: bool = True) -> list[dict]:
    """Bytes per prompt of the on-disk embedding cache (pooled fp16 [N,E], tokens fp16 [N,77,E]),
    written by the real cache code through a CLIP text encoder of SD-2.1's width (random weights,
    built from config: file sizes do not depend on weight values)."""
    import tempfile

    from amortized3d.priors.sd_tiny import build_tiny_sd
    from amortized3d.text.cache import EmbeddingCache
    from amortized3d.text.clip import CLIPTextEncoder

    words = [(c, s) for c in ("red", "green", "blue", "gold") for s in ("cube", "ball", "cone", "torus")]
    prompts = [f"a {words[i % 16][0]} {words[i % 16][1]} number {i}" for i in range(num_prompts)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd(Path(tmp) / "sd", hidden=embedding_dim)
        encoder = CLIPTextEncoder(str(model), embedding_dim=embedding_dim)
        cache = EmbeddingCache(Path(tmp) / "cache")
        for kind in ("pooled", "tokens") if tokens else ("pooled",):
            t0 = time.perf_counter()
            cache.load_or_build(encoder, "bench", prompts, kind=kind, batch_size=256)
            seconds = time.perf_counter() - t0
            size = cache.entry(encoder, "bench", prompts, kind).array_path.stat().st_size
            rows.append({"benchmark": "embedding cache size", "variant": f"{kind} fp16, E={embedding_dim}",
                         "prompts": num_prompts, "bytes_per_prompt": size / num_prompts,
                         "build_seconds": seconds})
    return rows


def write_report(rows: list[dict], path: str | Path | None) -> str:
    lines = []
    for row in rows:
        fields = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        lines.append(fields)
    if path:
        Path(path).write_text(json.dumps(rows, indent=2))
    return "\n".join(lines)
