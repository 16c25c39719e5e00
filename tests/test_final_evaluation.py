"""End-of-training evaluation without a world (SD on a text corpus: no scorer): bounded, and no train prompt is rendered."""
from __future__ import annotations

import torch

from amortized3d.build import build_system
from amortized3d.evaluation.final import evaluate_run
from amortized3d.evaluation.orbit import Orbit
from amortized3d.scenes.world import build_world
from conftest import compose
from sd_helpers import sd_overrides


def test_sd_prior_final_evaluation_renders_only_a_bounded_video_subset(tmp_path, cache_dir, tiny_sd):
    # ~world: the primitives prompts as a text corpus (SD on mg15 etc. has no world either)
    cfg = compose(tmp_path, cache_dir, *sd_overrides(tiny_sd), "~world", "evaluation.splits=[train,val]",
                  "evaluation.videos=val", "evaluation.max_videos=1", "evaluation.num_views=2", tiny=False)
    system, prior, corpus = build_system(cfg)
    world = build_world(cfg)
    assert world is None  # nothing can score these renders
    rendered: list[int] = []
    hook = system.generator.register_forward_hook(lambda m, args, out: rendered.append(1))
    try:
        metrics = evaluate_run(system.model, world, corpus, cfg.evaluation, tmp_path)
        per_eval = len(rendered)
        rendered.clear()
        first_val = system.renderable(corpus.unique("val"))[0]
        with torch.no_grad():
            Orbit.from_settings(cfg.evaluation, system.renderer).render(system.model, first_val)
        per_prompt = len(rendered)
    finally:
        hook.remove()
    assert per_prompt > 0 and per_eval == per_prompt  # one prompt (the first val one), not every train + val prompt
    assert len(corpus.unique("train")) + len(corpus.unique("val")) > 1
    assert [p.name for p in (tmp_path / "videos").glob("*.mp4")] != [] and len(list((tmp_path / "videos").glob("*.mp4"))) == 1
    assert "oracle" not in metrics and metrics["evaluation"]["scorer"] is None
    assert metrics["evaluation"]["rendered_prompts"] == 1
