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
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from amortized3d.atomic import atomic_write
from amortized3d.corpora import load_corpus
from amortized3d.evaluation.checkpoint import load_model, warn_if_prompts_differ
from amortized3d.evaluation.orbit import Orbit
from amortized3d.evaluation.scorers import Scorer, build_scorer
from amortized3d.evaluation.shard import distributed_context, gather_results, shard_indices
from amortized3d.scenes.world import build_world
from amortized3d.export import write_image
from amortized3d.slugs import slugify

log = logging.getLogger(__name__)


def view_grid(renders: torch.Tensor, num_views: int) -> torch.Tensor:
    """``num_views`` evenly spaced views of [V,3,H,W] side by side -> [3,H,num_views*W]."""
    picked = renders[torch.linspace(0, len(renders), num_views + 1)[:-1].long()]
    return torch.cat(list(picked.clamp(0, 1)), dim=-1)


RenderSink = Callable[[int, str, torch.Tensor], None]


class NonFiniteRenderError(ValueError):
    """A prompt's renders (or its scores) hold NaN/inf: the checkpoint is broken, nothing is scored."""


def check_finite_renders(prompt: str, renders: torch.Tensor) -> None:
    bad = ~torch.isfinite(renders)
    if bad.any():
        views = int(bad.flatten(1).any(1).sum()) if renders.ndim > 1 else 1
        raise NonFiniteRenderError(
            f"renders of prompt {prompt!r} hold {int(bad.sum())} non-finite values (NaN/inf) in {views} of "
            f"{len(renders)} views: the checkpoint's weights are broken (diverged training or a damaged "
            "file); refusing to score it")


def score_prompts(model, candidates: Sequence[str], indices: Sequence[int], scorer: Scorer | None, orbit: Orbit,
                  train_prompts: set[str], on_renders: Sequence[RenderSink] = ()) -> dict[int, dict]:
    """Render ``candidates[i]`` for each ``i`` in ``indices``, score it -> {i: row}.

    Each prompt's renders are handed to every ``on_renders(i, prompt, renders)`` (grids, videos)
    and then dropped, so memory does not grow with the number of prompts. Without a scorer the
    rows hold only index, prompt and seen. Non-finite renders or scores raise NonFiniteRenderError
    naming the prompt: a broken checkpoint never gets a score.
    """
    rows = {}
    for n, i in enumerate(indices):
        prompt = candidates[i]
        renders = orbit.render(model, prompt)
        check_finite_renders(prompt, renders)
        values = scorer.score(i, prompt, renders) if scorer is not None else {}
        scores = {k: float(v.double().mean()) for k, v in values.items()}
        bad = {k: v for k, v in scores.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteRenderError(f"scores of prompt {prompt!r} are not finite ({bad}); refusing to report them")
        rows[i] = {"index": i, "prompt": prompt, "seen": prompt in train_prompts, **scores}
        for sink in on_renders:
            sink(i, prompt, renders)
        if n % 50 == 0:
            log.info("rendered %d/%d prompts", n + 1, len(indices))
    return rows


def grid_writer(grid_dir: Path, grid_views: int) -> RenderSink:
    """``grid_views`` evenly spaced views of each prompt to ``grid_dir/<index>_<slug>.png``."""
    def write(i: int, prompt: str, renders: torch.Tensor) -> None:
        write_image(view_grid(renders, min(grid_views, len(renders))), grid_dir / f"{i:06d}_{slugify(prompt)}.png")
    return write


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
    output_dir = Path(cfg.paths.output_dir)
    rank, world = distributed_context()
    device = _device(str(cfg.get("device", "auto")))
    paths = [f"paths.{k}={cfg.paths[k]}" for k in ("cache_dir", "corpora_dir", "root_dir")]
    # Neither scorer needs the prior: the oracle scores against the run's world (its own config node).
    model, corpus, ckpt_cfg = load_model(cfg.ckpt_path, [*paths, *(cfg.get("overrides") or [])])
    model = model.to(device)
    if cfg.get("data") is not None:  # another corpus' prompts, conditioned by the checkpoint's text encoder
        corpus = load_corpus(cfg.data.get("corpus_path") or cfg.data.corpus, search_dirs=[cfg.paths.corpora_dir])
        warn_if_prompts_differ(corpus, ckpt_cfg.data.train_split, model.train_prompts, cfg.ckpt_path)
    candidates = list(corpus.unique(cfg.split))
    renderable = set(model.renderable(candidates))
    evaluated = [i for i, p in enumerate(candidates) if p in renderable]
    position = {i: k for k, i in enumerate(evaluated)}
    if not evaluated:
        raise ValueError(f"no prompt of split {cfg.split!r} of corpus {corpus.name!r} can be rendered by this "
                         f"{type(model.generator).__name__} checkpoint")
    orbit = Orbit.from_settings(render_settings(cfg, ckpt_cfg), model.renderer)
    ground_truth = build_world(ckpt_cfg) if cfg.evaluator.get("name") == "oracle" else None
    scorer = build_scorer(cfg.evaluator, candidates=candidates, corpus=corpus, world=ground_truth, orbit=orbit,
                          cache_dir=cfg.paths.cache_dir, device=device)
    mine = [evaluated[k] for k in shard_indices(len(evaluated), world, rank)]
    grid_views = int(cfg.get("grid_views", 8))
    sinks = [grid_writer(output_dir / "grids", grid_views)] if grid_views > 0 else []
    local = score_prompts(model, candidates, mine, scorer, orbit, set(model.train_prompts), sinks)
    gathered = gather_results({position[i]: row for i, row in local.items()}, len(evaluated))
    names = [k for k in gathered[0] if k not in ("index", "prompt", "seen")]
    metrics = {"checkpoint": str(cfg.ckpt_path), "corpus": corpus.name, "split": cfg.split,
               "num_candidates": len(candidates), "world_size": world,
               "evaluation": orbit.describe(),
               scorer.name: {**_evaluator_info(cfg.evaluator), **summarize_rows(gathered, names)}}
    if rank == 0 and scorer.name == "oracle":  # particles / set-valued prompts: evaluation/diversity.py
        from amortized3d.evaluation.diversity import evaluate_diversity, wants_diversity, world_references

        measured = [candidates[i] for i in evaluated]
        if wants_diversity(model.generator, ground_truth, measured):
            metrics["diversity"] = evaluate_diversity(model, measured, ground_truth,
                                                      *world_references(ground_truth, scorer, orbit), orbit.render)
    if rank == 0:
        write_csv(gathered, output_dir / "per_prompt.csv")
        text = json.dumps(metrics, indent=2, allow_nan=False)  # strict JSON: NaN/inf never reach the file
        atomic_write(output_dir / "metrics.json", lambda f: f.write(text.encode()))
        overall = metrics[scorer.name]["overall"]
        log.info("%s on %s/%s (%d prompts): %s", scorer.name, corpus.name, cfg.split, overall["num_prompts"],
                 ", ".join(f"{k} {overall[k]:.4f}" for k in names))
    return metrics


def _evaluator_info(cfg: DictConfig) -> dict:
    if cfg.get("name") == "clip":
        return {"model": cfg.model, "pretrained": cfg.get("pretrained")}
    return {}
