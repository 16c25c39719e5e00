"""``evaluate(cfg)``: a checkpoint's orbit renders of a corpus split, scored by CLIP or the oracle.

Outputs under ``cfg.paths.output_dir``::

    metrics.json       overall means (views, then prompts), also for seen / held-out prompts
    per_prompt.csv     one row per prompt
    grids/<NNNNNN>_<slug>.png   ``grid_views`` evenly spaced views of each prompt

Under ``torchrun`` every rank renders and scores its shard of the prompts (``shard.py``);
rows are gathered on every rank and rank 0 writes the files.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from amortized3d.cameras import orbit_cameras
from amortized3d.checkpoint_io import atomic_write
from amortized3d.evaluation.final import bake_settings, evaluation_renderer, render_turntable, slugify
from amortized3d.evaluation.scorers import Scorer, build_scorer
from amortized3d.evaluation.shard import distributed_context, gather_results, shard_indices
from amortized3d.export import write_image

log = logging.getLogger(__name__)


def view_grid(renders: torch.Tensor, num_views: int) -> torch.Tensor:
    """``num_views`` evenly spaced views of [V,3,H,W] side by side -> [3,H,num_views*W]."""
    picked = renders[torch.linspace(0, len(renders), num_views + 1)[:-1].long()]
    return torch.cat(list(picked.clamp(0, 1)), dim=-1)


def score_prompts(system, candidates: Sequence[str], indices: Sequence[int], scorer: Scorer, cameras,
                  bake, renderer, train_prompts: set[str], grid_dir: Path | None = None,
                  grid_views: int = 8) -> dict[int, dict]:
    """Render and score ``candidates[i]`` for each ``i`` in ``indices`` -> {i: row}."""
    rows = {}
    for n, i in enumerate(indices):
        prompt = candidates[i]
        renders = render_turntable(system, prompt, cameras, bake, renderer)
        values = scorer.score(i, prompt, renders)
        rows[i] = {"index": i, "prompt": prompt, "seen": prompt in train_prompts,
                   **{k: float(v.double().mean()) for k, v in values.items()}}
        if grid_dir is not None and grid_views > 0:
            write_image(view_grid(renders, min(grid_views, len(renders))), grid_dir / f"{i:06d}_{slugify(prompt)}.png")
        if n % 50 == 0:
            log.info("scored %d/%d prompts", n + 1, len(indices))
    return rows


def summarize_rows(rows: Sequence[dict], metrics: Sequence[str]) -> dict:
    """Means over prompts (each row already averaged over views), overall and seen / held-out."""
    def mean(subset: list[dict]) -> dict:
        out: dict[str, Any] = {m: (sum(r[m] for r in subset) / len(subset) if subset else None) for m in metrics}
        out["num_prompts"] = len(subset)
        return out

    return {"overall": mean(list(rows)), "seen": mean([r for r in rows if r["seen"]]),
            "held_out": mean([r for r in rows if not r["seen"]])}


def write_csv(rows: Sequence[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["index", "prompt", "seen"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def render_settings(cfg: DictConfig, ckpt_cfg: DictConfig) -> DictConfig:
    """The checkpoint's evaluation settings, replaced by every non-null ``cfg.render`` value."""
    base = OmegaConf.to_container(ckpt_cfg.get("evaluation") or {}, resolve=True)
    own = {k: v for k, v in OmegaConf.to_container(cfg.render, resolve=True).items() if v is not None}
    merged = {**base, **own}
    if merged.get("resolution") is None:
        raise ValueError("render.resolution is null and the checkpoint's config has no evaluation.resolution")
    return OmegaConf.create(merged)


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's corpus (or ``cfg.data``'s)."""
    from amortized3d.corpora import load_corpus
    from amortized3d.evaluation.checkpoint import load_system

    output_dir = Path(cfg.paths.output_dir)
    rank, world = distributed_context()
    device = _device(str(cfg.get("device", "auto")))
    paths = [f"paths.{k}={cfg.paths[k]}" for k in ("cache_dir", "corpora_dir", "root_dir")]
    system, prior, corpus, ckpt_cfg = load_system(cfg.ckpt_path, [*paths, *(cfg.get("overrides") or [])])
    system = system.to(device)
    if cfg.get("data") is not None:  # another corpus' prompts, conditioned by the checkpoint's text encoder
        corpus = load_corpus(cfg.data.get("corpus_path") or cfg.data.corpus, search_dirs=[cfg.paths.corpora_dir])
    candidates = list(corpus.unique(cfg.split))
    renderable = set(system.renderable(candidates))
    evaluated = [i for i, p in enumerate(candidates) if p in renderable]
    position = {i: k for k, i in enumerate(evaluated)}
    if not evaluated:
        raise ValueError(f"no prompt of split {cfg.split!r} of corpus {corpus.name!r} can be rendered by this "
                         f"{type(system.generator).__name__} checkpoint")
    settings = render_settings(cfg, ckpt_cfg)
    cameras = orbit_cameras(settings.num_views, settings.resolution, settings.elevation_deg, settings.distance,
                            settings.fovy_deg)
    bake = bake_settings(settings, system.renderer)
    renderer = evaluation_renderer(system.renderer, settings)
    scorer = build_scorer(cfg.evaluator, candidates=candidates, corpus=corpus, prior=prior, cameras=cameras,
                          renderer=renderer, bake=bake, cache_dir=cfg.paths.cache_dir, device=device)
    mine = [evaluated[k] for k in shard_indices(len(evaluated), world, rank)]
    local = score_prompts(system, candidates, mine, scorer, cameras, bake, renderer, set(system.train_prompts),
                          output_dir / "grids", int(cfg.get("grid_views", 8)))
    gathered = gather_results({position[i]: row for i, row in local.items()}, len(evaluated))
    names = [k for k in gathered[0] if k not in ("index", "prompt", "seen")]
    metrics = {"checkpoint": str(cfg.ckpt_path), "corpus": corpus.name, "split": cfg.split,
               "num_candidates": len(candidates), "world_size": world,
               "evaluation": {"num_views": len(cameras), "resolution": settings.resolution,
                              "elevation_deg": settings.elevation_deg, "distance": settings.distance,
                              "fovy_deg": settings.fovy_deg, "baked_grid": bake[0] if bake else None,
                              "samples": [renderer.num_samples, renderer.num_importance]},
               scorer.name: {**_evaluator_info(cfg.evaluator), **summarize_rows(gathered, names)}}
    if rank == 0:
        write_csv(gathered, output_dir / "per_prompt.csv")
        atomic_write(output_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        overall = metrics[scorer.name]["overall"]
        log.info("%s on %s/%s (%d prompts): %s", scorer.name, corpus.name, cfg.split, overall["num_prompts"],
                 ", ".join(f"{k} {overall[k]:.4f}" for k in names))
    return metrics


def _evaluator_info(cfg: DictConfig) -> dict:
    if cfg.get("name") == "clip":
        return {"model": cfg.model, "pretrained": cfg.get("pretrained")}
    return {}
