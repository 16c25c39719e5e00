"""SDI as the public code normalises and schedules it (threestudio's SDI integration), and the per-prompt
experiments' bounded checkpoints."""
from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from amortized3d.cameras import sample_cameras
from amortized3d.guidance.base import GuidanceInput
from amortized3d.guidance.sdi import SDIGuidance
from amortized3d.priors.stable_diffusion import StableDiffusionPrior
from amortized3d.schedules import Scheduled
from conftest import compose


def build_guidance(cfg, prior):
    node = OmegaConf.to_container(cfg.guidance, resolve=True)
    node.pop("name", None)
    return hydra.utils.instantiate(node, prior=prior)


def test_mean_reduction_is_the_public_mse_mean(tiny_sd):
    """Public: 0.5 * F.mse_loss(latents, target, reduction="mean") / B with B = 1; here per item."""
    prior = StableDiffusionPrior(str(tiny_sd), vae_resolution=32, local_files_only=True)
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cams = sample_cameras(2, 16, rng=torch.Generator().manual_seed(1))

    def loss(reduction: str) -> torch.Tensor:
        sdi = SDIGuidance(prior, t_schedule=0.5, reduction=reduction)
        inp = GuidanceInput(rgb=rgb, cameras=cams, prompts=["a red cube"] * 2, step=0,
                            rng=torch.Generator().manual_seed(3))
        return sdi(inp).losses["sdi"]

    total, mean = loss("sum"), loss("mean")
    numel = prior.latent_shape[0] * prior.latent_shape[1] * prior.latent_shape[2]
    torch.testing.assert_close(mean, total / numel)
    # one item (the public code's batch 1) against torch's own mean-reduced mse
    sdi = SDIGuidance(prior, t_schedule=0.5, reduction="mean")
    one = GuidanceInput(rgb=rgb[:1], cameras=cams.index(slice(0, 1)), prompts=["a red cube"], step=0,
                        rng=torch.Generator().manual_seed(3))
    got = sdi(one).losses["sdi"]
    with torch.no_grad():
        x0 = prior.encode(rgb[:1])
        target, _ = sdi.target(x0, sdi.timestep(1, 0), sdi.condition(one), torch.Generator().manual_seed(3))
    torch.testing.assert_close(got[0], 0.5 * torch.nn.functional.mse_loss(x0, target, reduction="mean"))
    with pytest.raises(ValueError, match="reduction"):
        SDIGuidance(prior, reduction="avg")


@pytest.mark.parametrize("experiment", [None, "sdi_ingp_per_prompt"])
def test_sdi_configs_follow_the_public_normalisation_and_convexity_schedule(tmp_path, experiment):
    """Public configs/sdi.yaml: lambda_convex [0, 1., 0.1, 4000] (1 -> 0.1 linearly, then 0.1 and on), loss mean."""
    overrides = ["guidance=sdi"] + ([f"experiment={experiment}"] if experiment else ["prior=stable_diffusion"])
    cfg = compose(tmp_path, tmp_path, *overrides, tiny=False)
    assert cfg.guidance.reduction == "mean"
    lam = Scheduled.parse(OmegaConf.to_container(cfg.guidance.lambda_convexity, resolve=True))
    assert [lam(s) for s in (0, 2000, 4000, 9999)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    if experiment:
        assert cfg.guidance.tau_max == 0.1  # public T // n (thesis text: 1/30)
        assert list(cfg.data.camera.distance) == [1.5, 2.0]  # public camera_distance_range
        t_end = OmegaConf.to_container(cfg.guidance.t_schedule, resolve=True)[-1]
        assert t_end == [10000, 0.25]
        weights = OmegaConf.to_container(cfg.system.loss_weights, resolve=True)
        assert weights["opaque"] == 0.1 and Scheduled.parse(weights["sparsity"])(0) == 0.15
        assert Scheduled.parse(weights["sparsity"])(3000) == 0.0


@pytest.mark.parametrize("experiment", ["sdi_ingp_per_prompt", "vsd_ingp_per_prompt", "l2vsd_ingp_per_prompt"])
def test_per_prompt_experiments_keep_a_bounded_number_of_checkpoints(tmp_path, experiment):
    cfg = compose(tmp_path, tmp_path, f"experiment={experiment}", tiny=False)
    ckpt = hydra.utils.instantiate(cfg.callbacks.checkpoint)  # Lightning validates monitor / save_top_k here
    assert ckpt.save_top_k == 2 and ckpt.save_last and ckpt.monitor == "step" and ckpt.mode == "max"


def test_top_k_by_step_keeps_only_the_latest_checkpoints(tmp_path, cache_dir):
    """A real run (analytic world) with the per-prompt experiments' checkpoint settings: 4 saves, 2 kept + last."""
    from amortized3d.train import train

    train(compose(tmp_path, cache_dir, "trainer.max_steps=8", "logger=none", "callbacks.checkpoint.save_top_k=2",
                  "+callbacks.checkpoint.monitor=step", "+callbacks.checkpoint.mode=max"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_000006.ckpt", "step_000008.ckpt"], names


def test_analytic_world_keeps_its_sdi_settings(tmp_path, cache_dir):
    """prior/analytic.yaml publishes Alg. 3's sum and no convexity for the CPU world (no normals)."""
    from amortized3d.build import build_system

    cfg = compose(tmp_path, cache_dir, "guidance=sdi")
    assert cfg.guidance.reduction == "sum" and cfg.guidance.lambda_convexity == 0.0
    system, _, _ = build_system(cfg)
    assert system.guidance.reduction == "sum" and not system.guidance.needs_normals
