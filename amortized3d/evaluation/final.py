"""End-of-run evaluation: turntable videos and oracle metrics, gathered into metrics.json."""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from amortized3d.cameras import CameraBatch, orbit_cameras
from amortized3d.evaluation.oracle import corpus_prompts, oracle_references, oracle_views, summarize
from amortized3d.export import write_video

log = logging.getLogger(__name__)


def slugify(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:80] or "prompt"


@torch.no_grad()
def render_turntable(system, prompt: str, cameras: CameraBatch, bake: tuple[int, float] | None,
                     renderer=None) -> Tensor:
    """[V,3,H,W] renders of one prompt (the renderer chunks rays)."""
    system.eval()
    return system.render([prompt], cameras, bake=bake, renderer=renderer).rgb.cpu()


def evaluation_renderer(renderer, cfg: Any):
    """The training renderer with the evaluation sample budget (``evaluation.num_samples``...)."""
    samples, importance = cfg.get("num_samples"), cfg.get("num_importance")
    if samples is None and importance is None:
        return renderer
    out = copy.copy(renderer)
    out.num_samples = int(samples if samples is not None else renderer.num_samples)
    out.num_importance = int(importance if importance is not None else renderer.num_importance)
    return out.eval()


def bake_settings(cfg: Any, renderer) -> tuple[int, float] | None:
    """(grid resolution, bound) for evaluation renders, or None to query the field directly."""
    if not cfg.get("bake_resolution"):
        return None
    return int(cfg.bake_resolution), float(renderer.bound_radius or cfg.get("bake_bound", 1.0))


def evaluate_run(system, prior, corpus, cfg: Any, output_dir: Path) -> dict:
    cameras = orbit_cameras(cfg.num_views, cfg.resolution, cfg.elevation_deg, cfg.distance, cfg.fovy_deg)
    splits: Sequence[str] = list(cfg.splits or [])
    prompts_by_split = {s: list(corpus.unique(s)) for s in splits}
    renderable = {s: system.renderable(ps) for s, ps in prompts_by_split.items()}
    bake = bake_settings(cfg, system.renderer)
    renderer = evaluation_renderer(system.renderer, cfg)
    renders: dict[str, Tensor] = {}
    for prompt in dict.fromkeys(p for ps in renderable.values() for p in ps):
        renders[prompt] = render_turntable(system, prompt, cameras, bake, renderer)
    metrics: dict[str, Any] = {"evaluation": {"num_views": cfg.num_views, "resolution": cfg.resolution,
                                              "baked_grid": bake[0] if bake else None,
                                              "samples": [renderer.num_samples, renderer.num_importance]}}
    world = getattr(prior, "world", None)
    if world is not None:
        metrics["oracle"] = _oracle(world, renderer, corpus, cameras, renders, renderable, bake)
    if cfg.get("videos"):
        video_dir = output_dir / "videos"
        for prompt in renderable.get(cfg.videos) or system.renderable(corpus.unique(cfg.videos)):
            frames = renders.get(prompt)
            if frames is None:
                frames = render_turntable(system, prompt, cameras, bake, renderer)
            write_video(frames, video_dir / f"{slugify(prompt)}.mp4", fps=cfg.video_fps)
        metrics["videos"] = str(video_dir)
    return metrics


def _oracle(world, renderer, corpus, cameras: CameraBatch, renders: dict[str, Tensor],
            renderable: dict[str, list[str]], bake: tuple[int, float] | None) -> dict:
    references, reference_objects = oracle_references(world, corpus_prompts(corpus), cameras, renderer, bake)
    train = set(corpus.unique("train"))
    out = {}
    for split, prompts in renderable.items():
        per_prompt = {p: oracle_views(renders[p], references, reference_objects, world.object_for_prompt(p))
                      for p in prompts}
        out[split] = summarize(per_prompt, {"seen": [p for p in prompts if p in train],
                                            "held_out": [p for p in prompts if p not in train]})
        log.info("oracle %s: R@1 %.3f  PSNR %.2f dB", split, out[split]["overall"]["r_at_1"] or 0,
                 out[split]["overall"]["psnr"] or 0)
    return out
