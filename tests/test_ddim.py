"""DDIM step / inversion / sampling against exact identities and the exact Gaussian prior (float64)."""
from __future__ import annotations

import pytest
import torch

from amortized3d.priors.ddim import (abar_at, ddim_invert, ddim_invert_path, ddim_sample, ddim_sigma, ddim_step,
                                     uniform_path)
from amortized3d.priors.gaussian import GaussianPrior
from amortized3d.priors.schedule import NoiseSchedule

D = 4


def gaussian_prior(equal_cov: bool = True) -> GaussianPrior:
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[1.5, 0.0, 0.5, 0.0], [-1.5, 0.0, -0.5, 0.0]], dtype=torch.float64)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3
    cov = a @ a.T + 0.05 * torch.eye(D, dtype=torch.float64)
    covs = torch.stack([cov, cov if equal_cov else 0.5 * cov + 0.1 * torch.eye(D, dtype=torch.float64)])
    return GaussianPrior(means, covs, ["a", "b"])


def conditional_samples(prior: GaussianPrior, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(prior.covariances[0])
    return prior.means[0] + torch.randn(n, D, generator=g, dtype=torch.float64) @ chol.T


def test_ddim_step_keeps_the_noise_of_a_forward_sample():
    """The defining DDIM property: with the true eps, a step lands on the same-noise sample at t_next."""
    schedule = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t, t_next = torch.tensor([0, 10, 200, 500, 900, 999]), torch.tensor([999, 500, 20, 501, 900, -1])
    x_t = abar_at(schedule, t, x0).sqrt() * x0 + (1 - abar_at(schedule, t, x0)).sqrt() * eps
    expected = abar_at(schedule, t_next, x0).sqrt() * x0 + (1 - abar_at(schedule, t_next, x0)).sqrt() * eps
    torch.testing.assert_close(ddim_step(x_t, eps, t, t_next, schedule), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(expected[-1], x0[-1])  # t = -1 is exactly clean
    torch.testing.assert_close(ddim_step(x_t, eps, t, t, schedule), x_t, atol=1e-12, rtol=0)  # identity


def test_ddim_sigma_of_adjacent_levels_is_the_ddpm_posterior_std():
    schedule = NoiseSchedule.scaled_linear()
    a = schedule.alphas_cumprod.double()
    t = torch.tensor([1, 100, 500, 999])
    beta = 1 - a[t] / a[t - 1]
    expected = (beta * (1 - a[t - 1]) / (1 - a[t])).sqrt()
    got = ddim_sigma(schedule, t - 1, t, torch.zeros(4, 1, dtype=torch.float64)).flatten()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert ddim_sigma(schedule, t, t, torch.zeros(4, 1)).abs().max() == 0


def test_uniform_path_per_item_endpoints():
    path = uniform_path(torch.tensor([980, 250, 0]), 4)
    assert path.shape == (5, 3)
    assert path[0].tolist() == [0, 0, 0] and path[-1].tolist() == [980, 250, 0]
    assert (path[1:] >= path[:-1]).all()


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_invert_then_sample_round_trip_converges_first_order(scale):
    prior = gaussian_prior()
    x0 = conditional_samples(prior, 8)
    cond = prior.text_condition(["a"] * 8)
    errors = []
    for steps in (10, 40, 160):
        x_t = ddim_invert(x0, prior, cond, 980, steps, scale)
        back = ddim_sample(x_t, prior, cond, 980, steps, scale)
        errors.append(float((back - x0).norm(dim=1).mean()))
    # Euler in sigma: each 4x refinement cuts the error ~3-4x (measured 0.37 -> 0.12 -> 0.035 at s=1).
    assert errors[1] < 0.45 * errors[0] and errors[2] < 0.45 * errors[1], errors
    assert errors[2] < (0.05 if scale == 1.0 else 0.5), errors


def test_round_trip_of_the_exact_ode_inverts_a_conditional_sample_to_gaussian_noise():
    """Conditional DDIM inversion (s = 1) maps the conditional data to ~N(0, I) at t ~ T (exact ODE)."""
    prior = gaussian_prior()
    x0 = conditional_samples(prior, 2000, seed=3)
    cond = prior.text_condition(["a"] * 2000)
    x_t = ddim_invert(x0, prior, cond, 999, 60, 1.0)
    a = prior.alphas_cumprod[999].double()
    noise = (x_t - a.sqrt() * prior.means[0]) / (1 - a).sqrt()
    assert noise.mean(0).abs().max() < 0.1
    torch.testing.assert_close(torch.cov(noise.T), torch.eye(D, dtype=torch.float64), atol=0.15, rtol=0)


def test_inversion_is_deterministic_without_noise_and_reproducible_with_it():
    prior = gaussian_prior()
    x0 = conditional_samples(prior, 5)
    cond = prior.text_condition(["a"] * 5)
    a = ddim_invert(x0, prior, cond, 700, 7, -7.5, noise_scale=0.0, rng=torch.Generator().manual_seed(1))
    b = ddim_invert(x0, prior, cond, 700, 7, -7.5, noise_scale=0.0, rng=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    n1 = ddim_invert(x0, prior, cond, 700, 7, -7.5, noise_scale=0.3, rng=torch.Generator().manual_seed(1))
    n1b = ddim_invert(x0, prior, cond, 700, 7, -7.5, noise_scale=0.3, rng=torch.Generator().manual_seed(1))
    n2 = ddim_invert(x0, prior, cond, 700, 7, -7.5, noise_scale=0.3, rng=torch.Generator().manual_seed(2))
    assert torch.equal(n1, n1b) and not torch.equal(n1, n2)


def test_items_with_different_end_times_match_separate_inversions():
    prior = gaussian_prior()
    x0 = conditional_samples(prior, 3)
    t_end = torch.tensor([900, 300, 600])
    both = ddim_invert(x0, prior, prior.text_condition(["a", "b", "a"]), t_end, 6, 2.0)
    for i, p in enumerate(["a", "b", "a"]):
        one = ddim_invert(x0[i:i + 1], prior, prior.text_condition([p]), int(t_end[i]), 6, 2.0)
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-12, rtol=0)
    # Left-padding a path with repeated level 0 changes nothing (how SDI batches unequal schedules).
    path = uniform_path(600, 6, 3)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), path])
    cond = prior.text_condition(["a"] * 3)
    torch.testing.assert_close(ddim_invert_path(x0, prior, cond, padded, 1.0),
                               ddim_invert_path(x0, prior, cond, path, 1.0), atol=1e-12, rtol=0)


def test_negative_inversion_cfg_moves_the_latent_up_the_implicit_classifier():
    """Sign convention of SDI's gamma_inv = -7.5 (thesis §6.2), derived for equal covariances.

    One inversion step lo -> hi adds c * s * (eps_c - eps_u) with c = sqrt(abar_hi)(sigma_hi - sigma_lo) > 0
    and eps_c - eps_u = -sqrt(1 - abar) grad log p_t(y | x). With equal covariances that difference is
    constant in x, so the inverted latent is exactly affine in s, and the implicit classifier
    r_t(x) = log N(x; sqrt(a) mu_c, C_t) - log N(x; sqrt(a) mu_u, C_t) (linear in x) strictly *decreases* in s:
    inverting with -s pushes the noisy latent towards the conditional (away from the unconditional)
    by exactly as much as +s pushes it the other way.
    """
    prior = gaussian_prior(equal_cov=True)
    n, t_end = 16, 600
    x0 = conditional_samples(prior, n, seed=5)
    cond = prior.text_condition(["a"] * n)
    lat = {s: ddim_invert(x0, prior, cond, t_end, 12, s) for s in (-7.5, 0.0, 1.0, 7.5)}
    torch.testing.assert_close(lat[-7.5] - lat[0.0], -7.5 * (lat[1.0] - lat[0.0]), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lat[7.5] - lat[0.0], -(lat[-7.5] - lat[0.0]), atol=1e-9, rtol=1e-9)
    t = torch.full((n,), t_end)
    mean_c, cov = prior.marginal(t, torch.zeros(n, dtype=torch.long))
    mean_u, _ = prior.marginal(t, torch.full((n,), -1))
    prec = torch.linalg.inv(cov[0])

    def classifier(x):  # log p_t(x | y) - log p_t(x | empty)
        return 0.5 * (((x - mean_u) @ prec) * (x - mean_u)).sum(1) - 0.5 * (((x - mean_c) @ prec) * (x - mean_c)).sum(1)

    r = {s: classifier(x) for s, x in lat.items()}
    assert (r[-7.5] > r[0.0]).all() and (r[0.0] > r[1.0]).all() and (r[1.0] > r[7.5]).all()
    # Unequal covariances: no longer exactly affine, but the ordering holds on average.
    prior2 = gaussian_prior(equal_cov=False)
    lat_neg = ddim_invert(x0, prior2, cond, t_end, 12, -7.5)
    lat_pos = ddim_invert(x0, prior2, cond, t_end, 12, 7.5)
    direction = (prior2.means[0] - prior2.means[-1])  # conditional minus unconditional mean
    assert float(((lat_neg - lat_pos) @ direction).mean()) > 0
