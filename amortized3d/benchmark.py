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

from amortized3d.benchmark_steps import make_step_runner
from amortized3d.build import build_system
from amortized3d.cameras import CameraBatch, orbit_cameras
from amortized3d.evaluation.orbit import Orbit
from amortized3d.generators import encodings
from amortized3d.generators.conv3d import Conv3dGenerator
from amortized3d.generators.encodings import HashGridEncoding
from amortized3d.rendering import baked
from amortized3d.text.cache import EmbeddingCache
from amortized3d.text.clip import CLIPTextEncoder


def time_interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
                     cpu: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin. ``cpu``: filled with the median
    process-CPU seconds per call as well (what a loaded shared machine distorts least)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    cpu_samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            samples[name].append(time.perf_counter() - t0)
            cpu_samples[name].append(time.process_time() - c0)
    if cpu is not None:
        cpu.update({k: statistics.median(v) for k, v in cpu_samples.items()})
    return {k: statistics.median(v) for k, v in samples.items()}


#: Hash-grid settings measured by :func:`bench_hash_grid`: the quickstart's (Hyper-iNGP on the
#: analytic world, prior.capacity.hash_grid in configs/prior/analytic.yaml) and the paper's
#: (configs/generator/encoding/hash_grid.yaml).
HASH_GRID_SETTINGS: dict[str, dict] = {
    "quickstart": {"n_levels": 6, "log2_hashmap_size": 18, "base_resolution": 8, "per_level_scale": 1.51,
                   "bound": 1.0},
    "paper": {"n_levels": 16, "log2_hashmap_size": 19, "base_resolution": 16, "per_level_scale": 1.447,
              "bound": 2.0},
}


def bench_hash_grid(num_points: int = 65536, rounds: int = 5, fields: int = 8,
                    settings: Sequence[str] = ("quickstart", "paper"), memory: bool = True) -> list[dict]:
    """Forward+backward (table gradient) of the torch hash grid: the fused path (default) vs the
    previous autograd path (``fused=False``) and session 8's fused path (the dense levels' grid_sample
    backward, ``dense_backward="grid_sample"``), interleaved per setting. ``fields`` prompts share the
    grid (Hyper-iNGP), each querying ``num_points / fields`` points. Peak memory:
    :func:`peak_allocated_bytes`. (The loop reference is a test oracle, tests/hash_grid_reference.py.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for setting in settings:
        grid = HASH_GRID_SETTINGS[setting]
        torch.manual_seed(0)
        x = (torch.rand(fields, num_points // fields, 3, device=device) * 2 - 1) * grid["bound"]
        new = HashGridEncoding(implementation="torch", **grid).to(device)
        old = HashGridEncoding(implementation="torch", fused=False, **grid).to(device)
        s8 = HashGridEncoding(implementation="torch", dense_backward="grid_sample", **grid).to(device)
        old.load_state_dict(new.state_dict())
        s8.load_state_dict(new.state_dict())

        def step(fn, module):
            def run():
                module.zero_grad(set_to_none=True)
                fn().sum().backward()
                module.zero_grad(set_to_none=True)
            return run

        candidates = {"new: fused level-major gather": step(lambda: new(x), new),
                      "session 8: fused, dense levels' grid_sample backward": step(lambda: s8(x), s8),
                      "old: autograd gather (fused=False)": step(lambda: old(x), old)}
        times = time_interleaved(candidates, rounds=rounds)
        base = times["old: autograd gather (fused=False)"]
        for k, v in times.items():
            row = {"benchmark": f"hash grid fwd+bwd ({setting})", "variant": k, "device": device,
                   "points": x.shape[0] * x.shape[1], "seconds": v, "points_per_s": x.shape[0] * x.shape[1] / v,
                   "speedup_vs_old": base / v}
            if memory:
                row["peak_MiB"] = peak_allocated_bytes(candidates[k]) / 2**20
            rows.append(row)
    return rows


def bench_mlp(fields: int = 8, points: int = 49152, in_dim: int = 12, hidden: int = 64, rounds: int = 5,
              compile: bool = False) -> list[dict]:
    """Forward+backward of the generated MLP heads (sdf in->hidden->1, albedo in->hidden->3, per-field
    weights), as the quickstart's training render calls them (defaults: 8 prompts x 1024 rays x 48
    samples, 6 levels x 2 features): the two-head batched_mlp path ("old", ``fused_mlp=False``), both
    heads as one network in one pass, and chunked (``fused_mlp=True``), interleaved. With ``compile``, also
    ``torch.compile(dynamic=True)`` of the old path, with its start-up cost (first call, and a new
    point count: empty-space skipping changes it every step)."""
    from amortized3d.generators.mlp import batched_mlp, chunked_mlp, fuse_heads, kaiming_weights, mlp_shapes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(fields, points, in_dim, device=device, requires_grad=True)
    sdf = [w.to(device).requires_grad_() for w in kaiming_weights(mlp_shapes(in_dim, hidden, 1), fields)]
    rgb = [w.to(device).requires_grad_() for w in kaiming_weights(mlp_shapes(in_dim, hidden, 3), fields)]
    leaves = [x, *sdf, *rgb]

    def old(x, sdf, rgb):
        return torch.cat([batched_mlp(x, sdf), batched_mlp(x, rgb)], dim=-1)

    def step(fn):
        def run():
            fn(x, sdf, rgb).sum().backward()
            for t in leaves:
                t.grad = None
        return run

    candidates = {"old: two heads, batched_mlp": step(old),
                  "fused heads, one pass": step(lambda x, s, r: chunked_mlp(x, fuse_heads([s, r]), chunk=points)),
                  "new: fused heads, chunked (fused_mlp=true)": step(lambda x, s, r: chunked_mlp(x, fuse_heads([s, r])))}
    startup: dict[str, float] = {}
    if compile:
        compiled = torch.compile(old, dynamic=True)
        t0 = time.perf_counter()
        step(compiled)()
        startup["first call"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled(x[:, : points // 2 + 1], sdf, rgb).sum().backward()
        startup["new point count"] = time.perf_counter() - t0
        candidates["torch.compile(old, dynamic=True)"] = step(compiled)
    times = time_interleaved(candidates, rounds=rounds)
    base = times["old: two heads, batched_mlp"]
    rows = [{"benchmark": "mlp heads fwd+bwd", "variant": k, "device": device, "points": fields * points,
             "seconds": v, "speedup_vs_old": base / v} for k, v in times.items()]
    for k, v in startup.items():
        rows.append({"benchmark": "mlp heads fwd+bwd", "variant": f"torch.compile start-up ({k})",
                     "device": device, "seconds": v})
    return rows


def _build_systems(variants: dict[str, Sequence[str]], cache_dir: str | None = None) -> dict:
    """{name: (system, cfg)} from ``configs/train.yaml`` with each variant's Hydra overrides."""
    from hydra import compose, initialize_config_dir

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
    systems = _build_systems({g: [f"guidance={g}", *overrides] for g in guidances}, cache_dir)
    runners = {name: make_step_runner(system, cfg) for name, (system, cfg) in systems.items()}
    for _ in range(rounds):  # round-robin, so a slow moment of the machine hits every guidance
        for run in runners.values():
            run()
    times = {k: statistics.median(run.measured) for k, run in runners.items()}
    base = times.get("sds", next(iter(times.values())))
    return [{"benchmark": "training step", "variant": k, "seconds": v, "relative_to_sds": v / base}
            for k, v in times.items()]


def load_trained_fields(system, checkpoint: str | Path) -> None:
    """The model weights of a ``scripts/train.py`` checkpoint into ``system`` (built from the same config)."""
    from amortized3d.checkpoint_io import load_torch
    from amortized3d.model import model_state_dict

    state = load_torch(checkpoint)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{checkpoint} holds no state_dict: expected a checkpoint written by scripts/train.py")
    try:
        system.model.load_state_dict(model_state_dict(state["state_dict"]))
    except RuntimeError as err:
        raise ValueError(f"{checkpoint} does not fit the benchmarked model: pass the run's own overrides "
                         f"(--override ...) ({str(err).splitlines()[0]})") from err


def bench_render(overrides: Sequence[str] = (), rounds: int = 5, views: int = 8,
                 cache_dir: str | None = None, compare: bool = True,
                 checkpoint: str | Path | None = None) -> list[dict]:
    """Render throughput of the configured generator + renderer (rays/s): training renders
    (forward + backward through the field) and evaluation renders (no grad, direct and from the
    baked grid the end-of-run evaluation uses, over one prompt's ``evaluation.num_views`` orbit),
    at the configured resolution and sample budget (rows without a suffix: as configured). With
    ``compare`` every row also for the previous paths, interleaved on the same system: "[old]"
    (hash grid ``fused=False``, two-head MLPs, no skipping: before session 6), "[two-head mlp]" (the
    configured grid, two-head MLPs, no skipping: the default before session 8), "[fused mlp]" (the
    configured grid with ``fused_mlp=True``) and "[fused mlp + skip]" (also
    ``renderer.skip_empty_space``), each left out where it is the configured path; generators without
    the MLP switch get "[skip]"; "[session 8]": the configured paths with session 9's kernels off (the dense
    levels' grid_sample backward, the baked grid's grid_sample lookup; "[old]" has them off too); "[session 16]":
    the configured paths with the dense levels' grid_sample forward in one batch of points
    (``encodings.SPLIT_GRID_SAMPLE_POINTS``; bit-equal, one core of grid_sample's CPU kernel);
    ``speedup_vs_old`` is each row's ratio to its "[old]" twin.

    ``checkpoint``: render the trained fields of that run (``scripts/train.py``'s ``last.ckpt`` or a
    ``step_XXXXXX.ckpt``; ``overrides`` must build the same model) instead of the untrained ones. Skipping's gain
    depends on where the fields have surface: the untrained field is a 0.5-sphere filling most of the scene
    bound, a trained one is an object (e.g. the quickstart's gradient pass keeps 66 % of the samples at step 0
    and 12-13 % at steps 150 and 300, docs/results.md session 13), so a run spends most of its steps in the
    second state."""
    system, cfg = _build_systems({"render": list(overrides)}, cache_dir)["render"]
    if checkpoint is not None:
        load_trained_fields(system, checkpoint)
    prompts = system.train_prompts[:views]
    res = int(cfg.system.resolution)
    cams = CameraBatch.cat([orbit_cameras(1, res)] * len(prompts))
    orbit = Orbit.from_settings(cfg.evaluation, system.renderer)  # exactly the end-of-run evaluation's views
    eval_renderer, bake, eval_views = orbit.renderer, orbit.bake, orbit.cameras
    eval_res = int(orbit.settings["resolution"])

    def train_render():
        system.generator.zero_grad(set_to_none=True)
        system.render(prompts, cams).rgb.sum().backward()

    @torch.no_grad()
    def eval_render(bake_grid):
        return lambda: system.render(prompts[:1], eval_views, bake=bake_grid, renderer=eval_renderer)

    grids = [m for m in system.generator.modules() if isinstance(m, HashGridEncoding)]
    gen = system.generator
    has_mlp_switch = hasattr(gen, "fused_mlp")

    def configured(fn, fused: bool, fused_mlp: bool, skip: bool, kernels: bool = True, split_points: bool = True):
        """The same system with the hash grid path, the MLP path, skipping, (``kernels``) session 9's
        kernels (dense levels' index_add_ backward, baked gather lookup; False: grid_sample's) and (``split_points``)
        session 17's per-thread grid_sample batches set per call."""
        def run():
            before = ([(g.fused, g.dense_backward) for g in grids], getattr(gen, "fused_mlp", None),
                      system.renderer.skip_empty_space, eval_renderer.skip_empty_space, baked.DEFAULT_LOOKUP,
                      encodings.SPLIT_GRID_SAMPLE_POINTS)
            for g in grids:
                g.fused, g.dense_backward = fused, ("index_add" if kernels else "grid_sample")
            if has_mlp_switch:
                gen.fused_mlp = fused_mlp
            system.renderer.skip_empty_space = eval_renderer.skip_empty_space = skip
            baked.DEFAULT_LOOKUP = "gather" if kernels else "grid_sample"
            encodings.SPLIT_GRID_SAMPLE_POINTS = split_points
            try:
                return fn()
            finally:
                for g, (f, d) in zip(grids, before[0]):
                    g.fused, g.dense_backward = f, d
                if has_mlp_switch:
                    gen.fused_mlp = before[1]
                system.renderer.skip_empty_space, eval_renderer.skip_empty_space = before[2:4]
                baked.DEFAULT_LOOKUP, encodings.SPLIT_GRID_SAMPLE_POINTS = before[4:6]
        return run

    candidates = {"train: forward+backward": train_render, "eval: direct (no grad)": eval_render(None)}
    if bake is not None:
        candidates[f"eval: baked {bake[0]}^3 grid (no grad)"] = eval_render(bake)
    if compare:  # + the previous paths and skipping on, each row's variants next to each other
        now = (all(g.fused for g in grids), bool(getattr(gen, "fused_mlp", False)))
        skip_now = system.renderer.skip_empty_space
        old_path = (False, False, False, False)
        variants = {"[old]": old_path, "": (*now, skip_now, True), "[session 8]": (*now, skip_now, False),
                    "[session 16]": (*now, skip_now, True, False), "[two-head mlp]": (now[0], False, False, True),
                    "[fused mlp]": (now[0], True, False, True), "[fused mlp + skip]": (now[0], True, True, True)}
        if not has_mlp_switch:  # e.g. 3DConv-net: no generated MLP heads to fuse
            variants = {"[old]": old_path, "": (*now, skip_now, True), "[session 8]": (*now, skip_now, False),
                        "[session 16]": (*now, skip_now, True, False), "[skip]": (*now, True, True)}
        # A variant equal to the configured path would only time it twice.
        variants = {k: v for k, v in variants.items() if k == "" or v != (*now, skip_now, True)}
        candidates = {f"{k} {v}".rstrip(): configured(fn, *flags) for k, fn in candidates.items()
                      for v, flags in variants.items()}
    times = time_interleaved(candidates, rounds=rounds)
    rays = {k: len(prompts) * res * res if k.startswith("train") else len(eval_views) * eval_res * eval_res
            for k in times}
    base = rays["train: forward+backward"] / times["train: forward+backward"]
    samples = {"train": system.renderer.num_samples + system.renderer.num_importance,
               "eval": eval_renderer.num_samples + eval_renderer.num_importance}
    rows = []
    for k, v in times.items():
        row = {"benchmark": "render", "variant": k, "seconds": v, "rays_per_s": rays[k] / v,
               "rays_per_s_vs_train_render": rays[k] / v / base, "samples_per_ray": samples[k.split(":")[0]]}
        if compare:
            row["speedup_vs_old"] = times[k.split(" [")[0] + " [old]"] / v
        rows.append(row)
    return rows


#: bench_render_sd's variants: (generator.fused_mlp, renderer.skip_empty_space, generator.encoding.hashed_lookup,
#: generator.encoding.compile).
RENDER_SD_VARIANTS: dict[str, tuple[bool, bool, str, bool]] = {
    "compiled lookups: fast path, corners lookup, torch.compile": (True, True, "corners", True),
    "new: fast path, corners lookup": (True, True, "corners", False),
    "session 9: fast path, rows lookup": (True, True, "rows", False),
    "no fast path, rows lookup": (False, False, "rows", False),  # the SD configs' render before session 10
}


def bench_render_sd(rounds: int = 3, overrides: Sequence[str] = (), resolution: int | None = None,
                    variants: Sequence[str] = tuple(RENDER_SD_VARIANTS)) -> list[dict]:
    """The training render at the Stable Diffusion prior's sizes without loading SD: hyper_ingp and the renderer
    built from ``prior=stable_diffusion`` (64 px, 128 + 64 samples, a 128-sample no-grad proposal, scene bound 2,
    the paper hash grid), one field (the SD benchmark's batch), one front orbit view; forward + backward of the
    image's sum, and the no-grad proposal pass alone (``VolumeRenderer._proposal``), for each of
    :data:`RENDER_SD_VARIANTS`, interleaved; ``speedup_vs_session9`` is the session-9 fast path's time over each
    row's. The untrained field is the sdf bias's sphere of radius 0.5
    (a stand-in for a field early in training: its occupancy, not its features, sets the skipped samples).
    The process-wide CPU allocator (scripts/benchmark.py --cpu-allocator) is the same for every row."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from amortized3d.rendering.sampling import stratified_samples

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["prior=stable_diffusion", "generator=hyper_ingp", *overrides])
    torch.manual_seed(0)
    gen = instantiate(cfg.generator)
    renderer = instantiate(cfg.renderer).train()
    res = int(resolution or cfg.prior.render.resolution)
    cams = orbit_cameras(1, res)
    emb = torch.randn(1, int(cfg.generator.text_dim))
    origins, directions = cams.rays()
    origins, directions = origins.reshape(1, -1, 3), directions.reshape(1, -1, 3)
    near, far = renderer.ray_bounds(origins, directions)
    t = stratified_samples((1, origins.shape[1]), renderer.num_samples, near, far, jitter=True,
                           rng=torch.Generator().manual_seed(0), dtype=origins.dtype)

    def configured(fn, fused_mlp: bool, skip: bool, lookup: str, compiled: bool):
        def run():
            before = gen.fused_mlp, renderer.skip_empty_space, gen.encoding.hashed_lookup, gen.encoding.compile
            gen.fused_mlp, renderer.skip_empty_space, gen.encoding.hashed_lookup, gen.encoding.compile = (
                fused_mlp, skip, lookup, compiled)
            try:
                return fn()
            finally:
                gen.fused_mlp, renderer.skip_empty_space, gen.encoding.hashed_lookup, gen.encoding.compile = before
        return run

    def train_render():
        gen.zero_grad(set_to_none=True)
        renderer(gen(emb, None), cams, rng=torch.Generator().manual_seed(0)).rgb.sum().backward()

    @torch.no_grad()
    def proposal():
        renderer._proposal(gen(emb, None), origins, directions, t, far, torch.Generator().manual_seed(0),
                           with_albedo=renderer.proposal_needs_albedo())

    candidates = {f"{part} [{v}]": configured(fn, *RENDER_SD_VARIANTS[v])
                  for part, fn in (("train: forward+backward", train_render), ("proposal (no grad)", proposal))
                  for v in variants}
    times = time_interleaved(candidates, rounds=rounds)
    base = "session 9: fast path, rows lookup"
    rows = []
    for k, v in times.items():
        part = k.split(" [")[0]
        row = {"benchmark": "render at SD size", "variant": k, "seconds": v, "rays": res * res,
               "samples_per_ray": renderer.num_samples + renderer.num_importance,
               "proposal_samples": renderer.num_samples}
        if f"{part} [{base}]" in times:
            row["speedup_vs_session9"] = times[f"{part} [{base}]"] / v
        rows.append(row)
    return rows


def bench_cache_size(num_prompts: int = 2000, embedding_dim: int = 1024, tokens: bool = True) -> list[dict]:
    """Bytes per prompt of the on-disk embedding cache (pooled fp16 [N,E], tokens fp16 [N,77,E]),
    written by the real cache code through a CLIP text encoder of SD-2.1's width (random weights,
    built from config: file sizes do not depend on weight values)."""
    import tempfile

    from amortized3d.priors.sd_random import build_tiny_sd

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


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of live tensors during ``fn()`` above those live before it (CPU or CUDA).

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the torch profiler's allocation
    events (``profile_memory=True``), whose ``total_allocated`` is the allocator's live total
    after each event; tracemalloc would not see tensor memory (not allocated by Python).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int, int]] = []  # (time, bytes allocated (<0: freed), live bytes after)

    def walk(event) -> None:
        fields = event.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0
    events.sort()
    base = events[0][2] - events[0][1]  # live bytes before the first event
    return max(e[2] for e in events) - base


def bench_conv3d_memory(resolution: int = 128, channels: int = 32, text_dim: int = 1024,
                        precisions: Sequence[str] = ("fp32", "bf16"), checkpointing: Sequence[bool] = (False,),
                        num_points: int = 64 * 64 * 192, **generator) -> list[dict]:
    """Parameters and peak memory per prompt (B=1) of one 3DConv-net forward+backward.

    The step measured: generate the feature grid, query it at ``num_points`` points (default: a
    64x64 render with 192 samples per ray, ScaleDreamer's 3DConv-net setting), backward. bf16 =
    autocast of the whole step; parameters and their gradients stay fp32. Peak = activations,
    gradients and temporaries above what was live before (parameters excluded; see params_bytes).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for ckpt in checkpointing:
        torch.manual_seed(0)
        gen = Conv3dGenerator(text_dim=text_dim, resolution=resolution, channels=channels,
                              gradient_checkpointing=ckpt, **generator).to(device)
        n_params = sum(p.numel() for p in gen.parameters())
        n_buffers = sum(b.numel() for b in gen.buffers())
        text = torch.randn(1, text_dim, device=device)
        points = torch.rand(1, num_points, 3, device=device) * 2 - 1

        for precision in precisions:
            dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

            def step() -> None:
                gen.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                    sdf, rgb = gen(text, None, z=gen.sample_latent(1)).query(points)
                    loss = sdf.float().square().mean() + rgb.float().mean()
                loss.backward()
                gen.zero_grad(set_to_none=True)  # gradients are freed again: not part of the next baseline

            t0 = time.perf_counter()
            peak = peak_allocated_bytes(step)
            rows.append({"benchmark": "conv3d memory per prompt", "variant": f"{resolution}^3x{channels} {precision}"
                         + (" checkpointed" if ckpt else ""), "device": device, "parameters": n_params,
                         "params_bytes": 4 * n_params, "buffers": n_buffers, "peak_bytes": peak,
                         "peak_GiB": peak / 2**30, "seconds": time.perf_counter() - t0,
                         "method": "torch.cuda.max_memory_allocated" if device == "cuda" else "torch.profiler allocations"})
    return rows


def write_report(rows: list[dict], path: str | Path | None) -> str:
    lines = []
    for row in rows:
        fields = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        lines.append(fields)
    if path:
        Path(path).write_text(json.dumps(rows, indent=2))
    return "\n".join(lines)
