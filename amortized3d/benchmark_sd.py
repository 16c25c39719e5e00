"""The full-size Stable Diffusion benchmark: every guidance's training step at SD-2.1-base size.

``write_sd21_base`` writes the SD-2.1-base *architecture* with random weights in the diffusers
layout (no download: the configs are written here; UNet 865.9M, VAE 83.7M, CLIP-H text encoder
340.4M, and the real 49408-token CLIP BPE from open_clip when it is installed, else a byte-level
vocabulary of the same size). Speed and memory do not depend on weight values, so this measures
what a user with the real weights gets. ``bench_sd_fullsize`` loads it through the same
``from_pretrained`` path users hit (``prior=stable_diffusion prior.pretrained_model_name_or_path=DIR``),
builds one system per guidance around ONE shared prior, and times their real training steps
(``AmortizedSystem.training_step`` under a Lightning Trainer) interleaved in one process, so a slow
moment of the machine hits every guidance alike. Per step it reports the parts:

- ``render``: the renderer's forward (ray sampling, field queries, compositing), hash grid included;
  ``hash_grid``: the hash-grid encoding's forward alone (a part of ``render``);
- ``vae_fwd``: ``prior.encode`` (resize to 512 + VAE encoder); ``vae_bwd``: the generator's backward
  until the gradient reaches the renders; ``render_bwd``: the rest of that backward (volume
  rendering, field, hash grid, hypernetwork);
- ``unet``: the frozen prior UNet's passes (CFG: one batch-2N pass);
- ``lora_fwd``: the score model's UNet forwards outside the lookahead (VSD's eps_phi, the score loss);
  ``lora_bwd``: the score-loss backward; ``lora_jvp``: L²-VSD's ``linearized_shift`` (its eps_phi
  forward plus the jvp or the finite difference's extra forward);
- ``rest``: the step minus all of the above (optimizer steps, noise, logging, Lightning).

``sd_floor`` = ``unet + vae_fwd + vae_bwd``: what the prior's own passes cost in that step; every
guidance pays it, so ``step / sd_floor`` is a guidance's overhead over the SD passes themselves.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step, on CPU the process's peak
resident set size during the step (sampled every 20 ms), with the resident size before the step.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import amortized3d.guidance.vsd as vsd
from amortized3d.benchmark_steps import make_step_runner
from amortized3d.build import build_system
from amortized3d.generators.encodings import HashGridEncoding

# --- the SD-2.1-base architecture (stabilityai/stable-diffusion-2-1-base, model_index 0.10.0.dev0) -----
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], dual_cross_attention=False,
    use_linear_projection=True, class_embed_type=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default")
SD21_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=768, act_fn="silu", layers_per_block=2,
    block_out_channels=[128, 256, 512, 512], norm_num_groups=32, scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD21_TEXT = dict(  # OpenCLIP ViT-H/14's text tower as SD-2 uses it (penultimate layer: 23 of 24 layers)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD21_SCHEDULER = dict(  # the repo's scheduler/ is a PNDMScheduler; the prior reads its betas and prediction type
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon")
CLIP_VOCAB_SIZE = 49408
PARTS = ("render", "hash_grid", "vae_fwd", "vae_bwd", "render_bwd", "unet", "lora_fwd", "lora_bwd", "lora_jvp")


def _clip_bpe_merges() -> list[str] | None:
    """The real CLIP BPE merges (48894 of them) from an installed package, if one ships them."""
    try:
        import open_clip
    except ImportError:
        return None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        return None
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return lines[1:1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]  # open_clip: lines[1:49152 - 256 - 2 + 1]


def write_clip_tokenizer(directory: Path) -> str:
    """A CLIPTokenizer of CLIP's 49408-token vocabulary in ``directory``; returns which one."""
    from transformers import CLIPTokenizer

    from amortized3d.priors.sd_random import byte_chars

    chars = byte_chars()
    merges = _clip_bpe_merges()
    kind = "CLIP BPE (open_clip's bpe_simple_vocab_16e6)"
    if merges is None:  # same size: bytes, bytes</w>, then filler merges of byte pairs
        kind = "byte-level BPE of CLIP's vocabulary size (no package ships the CLIP merges)"
        merges = []
        for a in chars:
            for b in chars:
                if len(merges) == CLIP_VOCAB_SIZE - 2 * 256 - 2:
                    break
                merges.append(f"{a} {b}")
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    src = directory / "tokenizer_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tok = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(directory / "tokenizer")
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return kind


def write_sd21_base(directory: str | Path, seed: int = 0) -> dict:
    """Write SD-2.1-base's architecture with random weights (diffusers layout) to ``directory``.

    Returns a summary: parameter counts per component and the tokenizer kind."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"tokenizer": write_clip_tokenizer(root)}
    torch.manual_seed(seed)
    for name, build in (("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**SD21_TEXT))),
                        ("vae", lambda: AutoencoderKL(**SD21_BASE_VAE)),
                        ("unet", lambda: UNet2DConditionModel(**SD21_BASE_UNET))):
        model = build()
        summary[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / name)
        del model
    PNDMScheduler(**SD21_SCHEDULER).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "random_weights": True, **summary}, indent=1))
    return summary


def write_tiny_sd(directory: str | Path) -> dict:
    """The tiny SD of the tests (``sd_random.build_tiny_sd``): the benchmark machinery in seconds."""
    from amortized3d.priors.sd_random import build_tiny_sd

    build_tiny_sd(directory)
    return {"tokenizer": "tiny byte-level BPE"}


# --- timing the parts of a step ------------------------------------------------------------------------

class PartTimer:
    """Wall time of the parts of a training step (see the module docstring), by patching forwards."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inside: set[str] = set()
        self._undo: list[Callable[[], None]] = []

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def part(self, name: str, skip_if_inside: Sequence[str] = ()) -> Iterator[None]:
        if name in self._inside or any(s in self._inside for s in skip_if_inside):
            yield
            return
        self._inside.add(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self._inside.discard(name)

    def wrap(self, obj: Any, attr: str, name: str, skip_if_inside: Sequence[str] = ()) -> None:
        original = getattr(obj, attr)
        had_own = attr in vars(obj)

        def wrapped(*args, **kwargs):
            with self.part(name, skip_if_inside):
                return original(*args, **kwargs)

        setattr(obj, attr, wrapped)
        self._undo.append(lambda: setattr(obj, attr, original) if had_own else delattr(obj, attr))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def instrument(self, system) -> None:
        """Patch this system's prior, score model, renderer, hash grid and backward passes."""
        guidance, prior = system.guidance, system.guidance.prior
        self.wrap(system.renderer, "forward", "render")
        for module in system.generator.modules():
            if isinstance(module, HashGridEncoding):
                self.wrap(module, "forward", "hash_grid")
        self.wrap(prior, "encode", "vae_fwd")
        self.wrap(prior.unet, "forward", "unet")
        score_model = getattr(guidance, "score_model", None)
        if score_model is not None and getattr(score_model, "unet", None) is not None:
            # the LoRA's forwards inside the lookahead count as lora_jvp, inside a backward never happen
            self.wrap(score_model.unet, "forward", "lora_fwd", skip_if_inside=("lora_jvp",))
        if hasattr(guidance, "tangent_from_gradient"):  # L²-VSD: the whole linearized_shift
            original = vsd.linearized_shift
            timer = self

            def shift(*args, **kwargs):
                with timer.part("lora_jvp"):
                    return original(*args, **kwargs)

            vsd.linearized_shift = shift
            self._undo.append(lambda: setattr(vsd, "linearized_shift", original))
        self._wrap_backward(system)

    def _wrap_backward(self, system) -> None:
        original_aux = system._auxiliary_backward
        original_backward = system.manual_backward
        timer, state = self, {"aux": False}

        def aux_backward(*args, **kwargs):
            state["aux"] = True
            try:
                return original_aux(*args, **kwargs)
            finally:
                state["aux"] = False

        def manual_backward(loss, *args, **kwargs):
            if state["aux"]:
                with timer.part("lora_bwd"):
                    return original_backward(loss, *args, **kwargs)
            rgb = system._render_memo.get("rgb")
            t0 = time.perf_counter()
            reached: list[float] = []
            handle = rgb.register_hook(lambda g: reached.append(time.perf_counter()) or g) \
                if rgb is not None and rgb.requires_grad else None
            try:
                return original_backward(loss, *args, **kwargs)
            finally:
                end = time.perf_counter()
                if handle is not None:
                    handle.remove()
                split = reached[0] if reached else end
                timer.seconds["vae_bwd"] += split - t0  # the distillation loss -> latents -> VAE -> renders
                timer.seconds["render_bwd"] += end - split

        system._auxiliary_backward = aux_backward
        system.manual_backward = manual_backward
        self._undo.append(lambda: (delattr(system, "manual_backward"), delattr(system, "_auxiliary_backward")))


class PeakMemory:
    """Peak memory during a block: CUDA allocated bytes, or the process RSS sampled every 20 ms."""

    def __init__(self, device: str):
        self.device = device
        self.peak = self.before = 0

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self.before = self.peak = self.rss()
        stop = threading.Event()

        def sample():
            while not stop.wait(0.02):
                self.peak = max(self.peak, self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


# --- building the systems ---------------------------------------------------------------------------

def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("PROJECT_ROOT", str(root))
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


#: Top-level config nodes a variant's ``@`` setting may name whole (anything else is under ``guidance.``).
ABSOLUTE_NODES = ("generator", "renderer", "prior", "system", "trainer")


def build_guidance_systems(model_dir: str | Path, guidances: Sequence[str], dtype: str, device: str,
                           overrides: Sequence[str] = (), cache_dir: str | Path | None = None) -> dict:
    """{guidance: (system, cfg)} around ONE Stable Diffusion prior loaded from ``model_dir``.

    A guidance may carry its own settings after ``@``: ``l2vsd@jvp=exact`` (guidance.jvp=exact); a key under
    another top-level node is given whole, e.g. ``sds@generator.fused_mlp=true,renderer.skip_empty_space=true``
    (the render fast path next to the default one, in one interleaved run).

    Each system is what ``build.build_system`` builds from ``prior=stable_diffusion
    prior.pretrained_model_name_or_path=DIR guidance=<g>`` (generator hyper_ingp, 64 px renders
    encoded at 512 px), except that the prior (UNet, VAE, text encoder) is loaded once and shared.
    """
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="a3d-bench-cache-")
    base = [f"paths.output_dir={tempfile.gettempdir()}/amortized3d-bench", f"paths.cache_dir={cache_dir}",
            "prior=stable_diffusion", f"prior.pretrained_model_name_or_path={model_dir}", "prior.local_files_only=true",
            f"prior.model.dtype={dtype}", f"prior.model.device={device}", "generator=hyper_ingp", "data.batch_size=1",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "logger=none"]
    prior, out = None, {}
    for g in guidances:
        name, _, options = g.partition("@")  # "l2vsd@jvp=exact,eta=0.1": that guidance with these settings
        own = [o if o.split("=", 1)[0].split(".", 1)[0] in ABSOLUTE_NODES else f"guidance.{o}"
               for o in options.split(",") if o]
        cfg = _compose([*base, f"guidance={name}", *own, *overrides])
        system, prior, _ = build_system(cfg, prior=prior)  # the first builds the prior, the others share it
        out[g] = (system, cfg)
    return out


def bench_sd_fullsize(guidances: Sequence[str] = ("sds", "vsd", "l2vsd"), dtype: str = "fp32", device: str = "cpu",
                      steps: int = 1, overrides: Sequence[str] = (), model_dir: str | Path | None = None,
                      size: str = "full", log: Callable[[str], None] | None = print) -> list[dict]:
    """Time each guidance's training step at SD-2.1-base size, interleaved (see the module docstring).

    ``steps``: measured steps per guidance (each round trains two steps per guidance, the first
    one warm-up, dropped); ``model_dir``: reuse a model written by ``write_sd21_base`` (else a
    temporary one is written and deleted); ``size="tiny"``: the tests' tiny SD (smoke test).
    """
    log = log or (lambda s: None)
    tmp = None
    t_start = time.perf_counter()
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="a3d-sd-")
        model_dir = Path(tmp.name) / "sd"
        t0 = time.perf_counter()
        summary = (write_sd21_base if size == "full" else write_tiny_sd)(model_dir)
        log(f"wrote {size} SD with random weights to {model_dir} in {time.perf_counter() - t0:.0f} s: {summary}")
    summary = json.loads((Path(model_dir) / "model_index.json").read_text()) \
        if (Path(model_dir) / "model_index.json").exists() else {}
    try:
        extra = list(overrides)
        if size == "tiny":  # the tests' tiny SD: 16 px latents, small renders, eager lookups (no compile to wait for)
            extra = ["prior.model.vae_resolution=16", "prior.text_encoder.embedding_dim=32",
                     "prior.render.resolution=16", "prior.render.num_samples=8", "prior.render.num_importance=8",
                     "generator.encoding.compile=false", *extra]
        t0 = time.perf_counter()
        systems = build_guidance_systems(model_dir, guidances, dtype, device, extra)
        log(f"built {len(systems)} systems in {time.perf_counter() - t0:.0f} s")
        rows = _run_interleaved(systems, steps, device, make_step_runner, log)
    finally:
        if tmp is not None:
            tmp.cleanup()
    params = {k: v for k, v in summary.items() if k.endswith("_params")}
    for r in rows:
        r.update({"dtype": dtype, "device": device, "size": size, "tokenizer": summary.get("tokenizer"),
                  "threads": torch.get_num_threads(), **params,
                  "benchmark_wall_s": time.perf_counter() - t_start})
    return rows


def _run_interleaved(systems: dict, steps: int, device: str, make_step_runner, log) -> list[dict]:
    timers, runners, memory = {}, {}, {}
    samples: dict[str, list[dict]] = {g: [] for g in systems}
    parts: dict[str, list[dict]] = {g: [] for g in systems}
    for g, (system, cfg) in systems.items():
        timer = PartTimer()
        timer.instrument(system)
        timers[g] = timer
        run = make_step_runner(system, cfg, steps_per_call=1)  # 2 steps per call, the first dropped
        run.timer.on_start.append(timer.reset)
        run.timer.on_end.append(lambda t=timer, p=parts[g]: p.append(dict(t.seconds)))
        runners[g] = run
        memory[g] = PeakMemory(device)
    try:
        for round_ in range(steps):
            for g, run in runners.items():  # round-robin: a slow moment of the machine hits every guidance
                mem = memory[g]
                t0 = time.perf_counter()
                with mem.measure():
                    run()
                step, step_parts = run.measured[-1], parts[g][-1]
                samples[g].append({"step": step, "parts": step_parts, "peak": mem.peak, "before": mem.before})
                log(f"round {round_ + 1}/{steps} {g}: step {step:.2f} s (call {time.perf_counter() - t0:.0f} s, "
                    f"peak {mem.peak / 2**30:.2f} GiB), " + ", ".join(f"{k} {v:.2f}" for k, v in step_parts.items()))
    finally:
        for timer in timers.values():
            timer.restore()
    return _rows(samples, device)


def _rows(samples: dict[str, list[dict]], device: str) -> list[dict]:
    rows = []
    for g, ss in samples.items():
        step = statistics.median(s["step"] for s in ss)
        parts = {p: statistics.median(s["parts"].get(p, 0.0) for s in ss) for p in PARTS}
        accounted = sum(v for k, v in parts.items() if k != "hash_grid")  # hash_grid is inside render
        floor = parts["unet"] + parts["vae_fwd"] + parts["vae_bwd"]
        row = {"benchmark": "sd_fullsize training step", "variant": g, "seconds": step,
               **{f"{p}_s": v for p, v in parts.items()}, "rest_s": step - accounted, "sd_floor_s": floor,
               "step_over_sd_floor": step / floor if floor > 0 else float("nan"),
               "peak_GiB": max(s["peak"] for s in ss) / 2**30, "before_GiB": min(s["before"] for s in ss) / 2**30,
               "memory": "torch.cuda.max_memory_allocated" if device == "cuda" else "process RSS (sampled)"}
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        if "sds" in by:
            r["relative_to_sds"] = r["seconds"] / by["sds"]["seconds"]
        if "vsd" in by:
            r["relative_to_vsd"] = r["seconds"] / by["vsd"]["seconds"]
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of the rows (seconds per part, ratios, peak memory)."""
    cols = ["variant", "seconds", "render_s", "hash_grid_s", "vae_fwd_s", "vae_bwd_s", "render_bwd_s", "unet_s",
            "lora_fwd_s", "lora_bwd_s", "lora_jvp_s", "rest_s", "step_over_sd_floor", "relative_to_vsd", "peak_GiB"]
    names = ["guidance", "step s", "render", "(hash grid)", "VAE fwd", "VAE bwd", "render bwd", "UNet", "LoRA fwd",
             "LoRA bwd", "LoRA jvp", "rest", "step ÷ SD floor", "÷ VSD", "peak GiB"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
