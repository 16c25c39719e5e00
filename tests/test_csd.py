"""CSD against the prior's own CFG difference and, on the Gaussian prior, its closed-form expectation."""
from __future__ import annotations

import pytest
import torch

from amortized3d.cameras import sample_cameras
from amortized3d.guidance.base import GuidanceInput
from amortized3d.guidance.csd import CSDGuidance
from amortized3d.priors.analytic import AnalyticPrior, ReferenceSet
from amortized3d.priors.gaussian import GaussianPrior
from amortized3d.train import train
from conftest import compose


def analytic_prior() -> AnalyticPrior:
    g = torch.Generator().manual_seed(0)
    refs = ReferenceSet(torch.rand(9, 3, 8, 8, generator=g), torch.arange(9) % 3, torch.zeros(9, dtype=torch.long),
                        {"red cube": 0, "blue ball": 1, "green cone": 2})
    return AnalyticPrior(refs)


def make_input(rgb: torch.Tensor, prompts: list[str], seed: int = 7, step: int = 0) -> GuidanceInput:
    cams = sample_cameras(rgb.shape[0], 8, rng=torch.Generator().manual_seed(3))
    return GuidanceInput(rgb=rgb, cameras=cams, prompts=prompts, step=step,
                         rng=torch.Generator().manual_seed(seed))


def render_gradient(guidance, inp: GuidanceInput) -> torch.Tensor:
    rgb = inp.rgb.detach().clone().requires_grad_(True)
    inp.rgb = rgb
    out = guidance(inp)
    (name,) = out.losses
    out.losses[name].sum().backward()
    return rgb.grad


@pytest.mark.parametrize("negative_prompt", [None, "green cone"])
def test_gradient_is_the_cfg_difference_of_the_prior(negative_prompt):
    prior = analytic_prior()
    csd = CSDGuidance(prior, scale=2.0, negative_prompt=negative_prompt)
    n = 6
    rgb = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["red cube", "blue ball"] * 3
    grad_rgb = render_gradient(csd, make_input(rgb, prompts))
    # Replay the same draws (t, noise) from the same seed and ask the prior directly.
    replay = make_input(rgb, prompts)
    x0 = prior.encode(rgb)
    t, _, x_t = csd.sample_noisy(x0, replay)
    cond = prior.text_condition(prompts)
    if negative_prompt is None:  # eps_c - eps_u = (CFG(s) - CFG(1)) / (s - 1) for any s
        delta = (prior.predict_noise(x_t, t, cond, 7.5) - prior.predict_noise(x_t, t, cond, 1.0)) / 6.5
    else:
        delta = prior.predict_noise(x_t, t, cond, 1.0) - prior.predict_noise(x_t, t, prior.text_condition(
            [negative_prompt] * n), 1.0)
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    # d loss / d rgb = d loss / d x0 * 2 (x0 = 2 rgb - 1)
    torch.testing.assert_close(grad_rgb, 2 * 2.0 * w * delta, atol=2e-4, rtol=1e-4)


def gaussian_prior() -> GaussianPrior:
    means = torch.tensor([[1.0, 0.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 0.0], [0.0, -1.0, 0.0, 0.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    covs = []
    for _ in range(3):
        a = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.4
        covs.append(a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64))
    return GaussianPrior(means, torch.stack(covs), ["a", "b", "c"])


@pytest.mark.parametrize("negative_prompt", [None, "c"])
def test_expectation_on_the_gaussian_prior_matches_the_closed_form(negative_prompt):
    """E_eps[eps_k(sqrt(a) x0 + sqrt(1-a) eps)] = sqrt(a (1-a)) C_k^{-1} (x0 - mu_k), C_k = a Sigma_k + (1-a) I."""
    prior = gaussian_prior()
    t_frac, n = 0.5, 20000
    csd = CSDGuidance(prior, scale=1.5, negative_prompt=negative_prompt, t_min=t_frac, t_max=t_frac)
    x0 = torch.tensor([0.3, -0.2, 0.8, 0.1], dtype=torch.float64)
    grad = render_gradient(csd, make_input(x0.expand(n, 4).clone(), ["a"] * n, seed=11))
    t = torch.tensor([int(round(t_frac * 1000))])
    a = prior.alphas_cumprod[t].double()
    ids = torch.tensor([0, -1 if negative_prompt is None else 2])
    mean, cov = prior.marginal(t.expand(2), ids)  # rows: conditional, reference branch
    expected_eps = (1 - a).sqrt() * torch.linalg.solve(cov, (a.sqrt() * x0 - mean)[..., None])[..., 0]
    expected = 1.5 * (1 - a) * (expected_eps[0] - expected_eps[1])
    se = grad.std(0) / n ** 0.5
    assert ((grad.mean(0) - expected).abs() < 4 * se + 1e-12).all(), (grad.mean(0), expected, se)
    assert se.max() < 0.05 * expected.abs().max()  # the check has teeth


def test_blank_negative_prompt_is_plain_csd_and_logs():
    prior = analytic_prior()
    rgb = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out_none = CSDGuidance(prior)(make_input(rgb, ["red cube"] * 4))
    out_blank = CSDGuidance(prior, negative_prompt="  ")(make_input(rgb, ["red cube"] * 4))
    torch.testing.assert_close(out_none.losses["csd"], out_blank.losses["csd"])
    assert out_none.losses["csd"].shape == (4,) and set(out_none.logs) == {"grad_norm", "t_mean"}


def test_end_to_end_smoke_through_hydra_and_train(tmp_path, cache_dir):
    """Two real training steps with `guidance=csd` (the configs' own defaults, tiny world)."""
    metrics = train(compose(tmp_path, cache_dir, "guidance=csd", "trainer.max_steps=2", "logger=none"))
    assert metrics["training"]["guidance"] == "csd" and metrics["training"]["steps"] == 2
    assert metrics["training"]["nonfinite_steps"] == 0
