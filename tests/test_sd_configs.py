"""The Stable Diffusion configs compose: the score model each prior publishes, paper experiments."""
from __future__ import annotations

import pytest

from conftest import CONFIGS, compose

SD = ["prior=stable_diffusion"]
# The papers' settings (toy_sd is the CPU toy of the primitives world: tests/test_toy_sd*.py)
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml") if p.stem != "toy_sd")


@pytest.mark.parametrize("guidance", ["vsd", "lvsd", "l2vsd"])
def test_vsd_family_selects_the_lora_on_sd_and_the_small_unet_on_analytic(tmp_path, guidance):
    sd = compose(tmp_path, tmp_path, *SD, f"guidance={guidance}", tiny=False).guidance
    assert sd.score_model._target_.endswith("LoRAScoreModel") and sd.score_optimizer.lr == 1e-4
    assert "in_channels" not in sd.score_model  # the node is replaced, not merged with the small UNet's
    analytic = compose(tmp_path, tmp_path, f"guidance={guidance}").guidance
    assert analytic.score_model._target_.endswith("SmallUNetScoreModel")


NEW_VSD_LIKE = """
# A user's VSD-like guidance: the score model and its lr are what the prior publishes (no per-prior file).
_target_: amortized3d.guidance.vsd.VSDGuidance
name: vsd_like
guidance_scale: ${prior.recommended.guidance_scale}
score_optimizer: {name: adamw, lr: "${prior.recommended.score_model_lr}"}
score_model: ${prior.score_model}
"""


def test_a_new_vsd_like_guidance_gets_the_prior_s_score_model_without_a_third_file(tmp_path):
    """SD: the LoRA of its UNet at App. F's 1e-4; analytic: the small UNet at 1e-3 (issue 16)."""
    (tmp_path / "guidance").mkdir()
    (tmp_path / "guidance" / "vsd_like.yaml").write_text(NEW_VSD_LIKE)
    search = f"hydra.searchpath=[file://{tmp_path}]"
    for prior, target, lr in [("stable_diffusion", "LoRAScoreModel", 1e-4), ("analytic", "SmallUNetScoreModel", 1e-3)]:
        g = compose(tmp_path, tmp_path, search, f"prior={prior}", "guidance=vsd_like", tiny=False).guidance
        assert g.score_model._target_.endswith(target) and g.score_optimizer.lr == lr, prior


def test_sd_generator_conditioning_is_the_clip_pooled_width(tmp_path):
    cfg = compose(tmp_path, tmp_path, *SD, tiny=False)
    assert cfg.generator.text_dim == 1024 and cfg.prior.text_encoder._target_.endswith("CLIPTextEncoder")
    assert cfg.system.resolution == cfg.prior.render.resolution == 64


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_experiments_compose(tmp_path, name):
    cfg = compose(tmp_path, tmp_path, f"experiment={name}", tiny=False)
    assert cfg.prior.name == "stable_diffusion" and cfg.trainer.max_steps >= 10000
