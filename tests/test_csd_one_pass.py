"""CSD on a tiny SD: both branches in ONE batch-2N UNet pass (as SDS's CFG), equal to the two-pass result."""
from __future__ import annotations

import pytest
import torch

from amortized3d.cameras import sample_cameras
from amortized3d.guidance.base import GuidanceInput
from amortized3d.guidance.csd import CSDGuidance
from amortized3d.priors.stable_diffusion import StableDiffusionPrior


@pytest.fixture(scope="module")
def prior(tiny_sd):
    return StableDiffusionPrior(str(tiny_sd), vae_resolution=32, local_files_only=True)


@pytest.mark.parametrize("negative_prompt", [None, "a blurry photo"])
def test_csd_makes_one_unet_pass_and_matches_the_two_pass_direction(prior, negative_prompt):
    csd = CSDGuidance(prior, negative_prompt=negative_prompt)
    n = 3
    cams = sample_cameras(n, 8, rng=torch.Generator().manual_seed(3))
    inp = GuidanceInput(rgb=torch.rand(n, 3, 8, 8), cameras=cams, prompts=["a red cube", "a blue ball", "a red cube"],
                        step=0, rng=torch.Generator().manual_seed(7))
    x_t = torch.randn(n, *prior.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 500, 900])
    batches = []
    hook = prior.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        delta = csd.classifier_direction(x_t, t, inp)
    finally:
        hook.remove()
    assert batches == [2 * n]  # one batch-2N pass, not two batch-N passes
    with torch.no_grad():  # the previous two-pass computation
        cond = csd.condition(inp)
        eps_c = prior.predict_noise(x_t, t, cond, 1.0)
        if negative_prompt is None:
            eps_ref = prior.predict_noise(x_t, t, cond, 0.0)
        else:
            eps_ref = prior.predict_noise(x_t, t, prior.text_condition([negative_prompt] * n, cams.view_labels()), 1.0)
    torch.testing.assert_close(delta, eps_c - eps_ref, rtol=1e-4, atol=1e-5)
    assert delta.abs().max() > 1e-4
