"""End-of-training evaluation: oracle metrics of each split and turntable videos, for metrics.json.

The same scoring loop as ``scripts/evaluate.py`` (``evaluate.score_prompts``) with the oracle
scorer when the run has a ground-truth world; each prompt is rendered once, even when it is in
several splits or also gets a video.

Without a scorer (a run with no ground-truth world: a text corpus) nothing could score
the splits' renders, and rendering every train and val prompt at 120 views is ~12 min CPU on the
primitives corpus and every prompt of CP100k. Then only turntable videos of the first
``max_videos`` prompts of the ``videos`` split are rendered (the log says so); score a checkpoint
with ``scripts/evaluate.py evaluator=clip``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from amortized3d.evaluation.evaluate import score_prompts, summarize_rows
from amortized3d.evaluation.oracle import corpus_prompts
from amortized3d.evaluation.orbit import Orbit, slugify
from amortized3d.evaluation.scorers import OracleScorer
from amortized3d.export import write_video
from amortized3d.model import AmortizedModel

log = logging.getLogger(__name__)


def evaluate_run(model: AmortizedModel, world, corpus, cfg: Any, output_dir: Path, cache_dir: str | None = None) -> dict:
    """``world``: the run's ground truth (None: no scorer); ``cfg``: the run's ``evaluation:`` node
    (orbit settings, splits, videos, video_fps); ``cache_dir``: where the oracle's references are cached."""
    orbit = Orbit.from_settings(cfg, model.renderer)
    scorer = (OracleScorer(world, corpus_prompts(corpus), orbit.cameras, orbit.renderer, orbit.bake, cache_dir)
              if world else None)
    video_list = model.renderable(corpus.unique(cfg.videos)) if cfg.get("videos") else []
    if scorer is None:
        prompts_by_split = {}
        max_videos = cfg.get("max_videos", 4)
        kept = video_list if max_videos is None else video_list[:int(max_videos)]
        log.info("end-of-training evaluation: no scorer (no ground-truth world): splits %s not rendered; "
                 "turntable videos of %d of %d %s prompts only (evaluation.max_videos); score with "
                 "scripts/evaluate.py evaluator=clip", list(cfg.splits or []), len(kept), len(video_list),
                 cfg.get("videos"))
        video_list = kept
    else:
        prompts_by_split = {s: model.renderable(corpus.unique(s)) for s in (cfg.splits or [])}
    video_prompts = set(video_list)
    prompts = list(dict.fromkeys([p for ps in prompts_by_split.values() for p in ps] + video_list))
    video_dir = output_dir / "videos"

    def write_turntable(_: int, prompt: str, renders: Tensor) -> None:
        if prompt in video_prompts:
            write_video(renders, video_dir / f"{slugify(prompt)}.mp4", fps=cfg.video_fps)

    rows = score_prompts(model, prompts, range(len(prompts)), scorer, orbit, set(model.train_prompts),
                         [write_turntable])
    row_of = {row["prompt"]: row for row in rows.values()}
    metrics: dict[str, Any] = {"evaluation": {**orbit.describe(), "scorer": "oracle" if scorer else None,
                                              "rendered_prompts": len(prompts)}}
    if scorer is not None:
        metrics["oracle"] = {}
        for split, split_prompts in prompts_by_split.items():
            split_rows = [row_of[p] for p in split_prompts]
            summary = summarize_rows(split_rows, ["psnr", "r_at_1"])
            summary["per_prompt"] = {r["prompt"]: {"psnr": r["psnr"], "r_at_1": r["r_at_1"]} for r in split_rows}
            metrics["oracle"][split] = summary
            log.info("oracle %s: R@1 %.3f  PSNR %.2f dB", split, summary["overall"]["r_at_1"] or 0,
                     summary["overall"]["psnr"] or 0)
        # Particles (generator.num_particles) or set-valued prompts (data=primitives_open): where each
        # particle lands among the prompt's valid objects (evaluation/diversity.py). The oracle block
        # above is each prompt's particle 0.
        from amortized3d.evaluation.diversity import evaluate_diversity, wants_diversity, world_references

        measured = list(dict.fromkeys(p for ps in prompts_by_split.values() for p in ps))
        if wants_diversity(model.generator, world, measured):
            metrics["diversity"] = evaluate_diversity(model, measured, world, *world_references(world, scorer, orbit),
                                                      orbit.render)
            overall = metrics["diversity"]["overall"]
            log.info("diversity: modes_covered %.3f (at most %.3f), %d blends of %d particles, particle R@1 %.3f",
                     overall["modes_covered"], overall["max_modes_covered"], overall["blends"],
                     overall["num_particles"] * overall["num_prompts"], overall["particle_r_at_1"])
    if video_prompts:
        metrics["videos"] = str(video_dir)
    return metrics
