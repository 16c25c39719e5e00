"""SDI: the inversion schedule, Alg. 3's update, behaviour on the exact Gaussian prior, the convexity loss."""
from __future__ import annotations

import pytest
import torch

from amortized3d.cameras import make_cameras, sample_cameras
from amortized3d.guidance.base import GuidanceInput
from amortized3d.guidance.sdi import SDIGuidance, convexity_loss
from amortized3d.priors.analytic import AnalyticPrior, ReferenceSet
from amortized3d.priors.gaussian import GaussianPrior
from amortized3d.train import train
from conftest import compose

SCHEDULE = [[0, 0.98], [100, 0.25]]


def gaussian_prior() -> GaussianPrior:
    means = torch.tensor([[1.5, 0.0, 0.0, 0.0], [-1.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    cov = torch.diag(torch.tensor([0.05, 0.1, 0.2, 0.1], dtype=torch.float64))
    return GaussianPrior(means, torch.stack([cov, cov]), ["a", "b"])


def analytic_prior() -> AnalyticPrior:
    g = torch.Generator().manual_seed(0)
    refs = ReferenceSet(torch.rand(8, 3, 8, 8, generator=g), torch.arange(8) % 2, torch.zeros(8, dtype=torch.long),
                        {"object 0": 0, "object 1": 1})
    return AnalyticPrior(refs)


def make_input(rgb, prompt="a", step=0, seed=5, extras=None) -> GuidanceInput:
    cams = sample_cameras(rgb.shape[0], 8, rng=torch.Generator().manual_seed(3))
    return GuidanceInput(rgb=rgb, cameras=cams, prompts=[prompt] * rgb.shape[0], step=step,
                         rng=torch.Generator().manual_seed(seed), extras=extras or {})


def test_t_decays_linearly_and_the_inversion_path_follows_the_thesis_grid():
    sdi = SDIGuidance(gaussian_prior(), t_schedule=SCHEDULE)
    assert [int(sdi.timestep(1, s)[0]) for s in (0, 50, 100, 500)] == [980, 615, 250, 250]
    g = torch.Generator().manual_seed(0)
    path = sdi.inversion_path(torch.full((64,), 980), g)
    assert path.shape == (11, 64)  # ~int(10 t) = 10 DDIM steps: 0, 100, ..., 900, then the jump
    assert path[:-1, 0].tolist() == list(range(0, 1000, 100))
    assert (path[-1] >= 980).all() and (path[-1] <= 999).all()
    path = sdi.inversion_path(torch.full((256,), 250), g)
    assert path[:-1, 0].tolist() == [0, 100, 200]
    tau = path[-1] - 250
    assert tau.min() >= 0 and tau.max() <= 99 and 35 < tau.float().mean() < 65  # U[0, 0.1 T)
    mixed = sdi.inversion_path(torch.tensor([980, 250]), g)  # unequal grids are left-padded with level 0
    assert mixed[:, 1].tolist()[:-1] == [0] * 7 + [0, 100, 200]
    assert (mixed[1:] >= mixed[:-1]).all()


def test_update_is_algorithm_3_with_the_inverted_noise():
    """x0 - target = sigma(t) (eps_fwd(x_t) - kappa) with x_t = sqrt(a) x0 + sqrt(1-a) kappa (renoise)."""
    prior = gaussian_prior()
    sdi = SDIGuidance(prior, t_schedule=SCHEDULE)
    x0 = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rgb = x0.clone().requires_grad_(True)
    out = sdi(make_input(rgb, step=30, seed=8))
    out.losses["sdi"].sum().backward()
    t = sdi.timestep(6, 30)
    cond = prior.text_condition(["a"] * 6)
    kappa, _, t_end = sdi.infer_noise(x0, t, cond, torch.Generator().manual_seed(8))  # replay
    a = prior.alphas_cumprod[t].double()[:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * kappa
    sigma = ((1 - a) / a).sqrt()
    expected = sigma * (prior.predict_noise(x_t, t, cond, 7.5) - kappa)
    torch.testing.assert_close(rgb.grad, expected, atol=1e-9, rtol=1e-7)
    assert (t_end >= t).all()
    assert set(out.logs) == {"t", "tau_mean", "kappa_std", "grad_norm"}


def test_randomness_comes_only_from_tau_and_the_entropy_noise():
    prior = gaussian_prior()
    x0 = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    quiet = SDIGuidance(prior, tau_max=0.0, inversion_noise=0.0, t_schedule=SCHEDULE)
    assert torch.equal(quiet(make_input(x0, seed=1)).losses["sdi"], quiet(make_input(x0, seed=2)).losses["sdi"])
    noisy = SDIGuidance(prior, t_schedule=SCHEDULE)
    a, b, c = (noisy(make_input(x0, seed=s)).losses["sdi"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def run_sdi_2d(sdi: SDIGuidance, x: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """SDI as a 2D sampler: the 'render' is the point itself (thesis §4.1)."""
    for i in range(steps):
        xr = x.clone().requires_grad_(True)
        sdi(make_input(xr, step=i, seed=100 + i)).losses["sdi"].sum().backward()
        x = x - lr * xr.grad
    return x


def test_without_cfg_sdi_converges_into_the_conditional_distribution():
    prior = gaussian_prior()
    steps = 60
    sdi = SDIGuidance(prior, guidance_scale=1.0, inversion_guidance_scale=1.0, t_schedule=[[0, 0.98], [steps, 0.25]])
    x = 1.5 * torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    std = prior.covariances[0].diagonal().sqrt()
    start = ((x - prior.means[0]) / std).norm(dim=1)
    x = run_sdi_2d(sdi, x, steps, lr=0.2)
    end = ((x - prior.means[0]) / std).norm(dim=1)
    assert start.mean() > 8 and end.max() < 1.0, (start.mean(), end)


@pytest.mark.parametrize("t_frac", [0.98, 0.6, 0.3])
def test_default_update_moves_renders_towards_the_conditional(t_frac):
    """gamma_inv = -7.5, gamma_fwd = +7.5: from samples of the *other* component, -grad points to y's side."""
    prior = gaussian_prior()
    sdi = SDIGuidance(prior, t_schedule=t_frac)
    g = torch.Generator().manual_seed(4)
    x0 = prior.means[1] + torch.randn(32, 4, dtype=torch.float64, generator=g) * prior.covariances[1].diagonal().sqrt()
    rgb = x0.clone().requires_grad_(True)
    sdi(make_input(rgb, seed=6)).losses["sdi"].sum().backward()
    towards = (-rgb.grad) @ (prior.means[0] - prior.means[-1])  # along conditional - unconditional mean
    assert (towards > 0).all()


def sphere_normals(size: int = 16, concave: bool = False) -> tuple[torch.Tensor, object]:
    """World-space normals of a sphere facing the camera (or its hollow mould), zero outside the disk."""
    cams = make_cameras(torch.tensor([20.0]), torch.tensor([35.0]), torch.tensor([2.0]), torch.tensor([60.0]), size)
    c = (torch.arange(size) + 0.5) / size * 2 - 1
    v, u = -c[:, None].expand(size, size), c[None, :].expand(size, size)  # up, right
    inside = (u ** 2 + v ** 2) < 0.8
    z = (1 - u ** 2 - v ** 2).clamp(min=0).sqrt()
    sign = -1.0 if concave else 1.0
    n_cam = torch.stack([sign * u, sign * v, z]) * inside
    return torch.einsum("ij,jhw->ihw", cams.c2w[0, :3, :3], n_cam)[None], cams


def test_convexity_loss_is_negative_for_convex_and_positive_for_concave_surfaces():
    convex, cams = sphere_normals()
    concave, _ = sphere_normals(concave=True)
    flat = torch.einsum("ij,jhw->ihw", cams.c2w[0, :3, :3], torch.tensor([0.0, 0.0, 1.0])[:, None, None]
                        .expand(3, 16, 16))[None]
    lc, lh, lf = convexity_loss(convex, cams), convexity_loss(concave, cams), convexity_loss(flat, cams)
    assert lc.item() < -0.05 and lh.item() > 0.05
    torch.testing.assert_close(lc, -lh)
    assert abs(lf.item()) < 1e-6


def test_convexity_schedule_and_normals_flag():
    prior = analytic_prior()
    assert not SDIGuidance(prior).needs_normals
    sdi = SDIGuidance(prior, t_schedule=SCHEDULE, lambda_convexity={"milestones": [[0, 0.1], [40, 0.0]],
                                                                    "interpolation": "step"})
    assert sdi.needs_normals
    normal, cams = sphere_normals(8)
    normal = normal.expand(2, -1, -1, -1).clone().requires_grad_(True)
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inp = make_input(rgb, "object 0", step=10, extras={"normal": normal})
    inp.cameras = make_cameras(*(x.expand(2) for x in (torch.tensor([20.0]), torch.tensor([35.0]),
                                                        torch.tensor([2.0]), torch.tensor([60.0]))), 8)
    out = sdi(inp)
    torch.testing.assert_close(out.losses["convexity"], 0.1 * convexity_loss(normal, inp.cameras))
    out.losses["convexity"].sum().backward()
    assert normal.grad.abs().sum() > 0
    late = sdi(make_input(rgb, "object 0", step=50, extras={"normal": None}))
    assert torch.equal(late.losses["convexity"], torch.zeros(2))  # off after 40%: normals not needed
    with pytest.raises(ValueError, match="needs normals"):
        sdi(make_input(rgb, "object 0", step=10))


def test_runs_on_the_analytic_prior():
    prior = analytic_prior()
    rgb = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = SDIGuidance(prior, t_schedule=SCHEDULE)(make_input(rgb, "object 1", step=20))
    assert out.losses["sdi"].shape == (3,) and torch.isfinite(out.losses["sdi"]).all()
    out.losses["sdi"].sum().backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_public_code_variant_denoises_the_inverted_latent_itself():
    """renoise=False: target = DDIM x0 prediction of x_{t+tau} evaluated at timestep t (public code)."""
    prior = gaussian_prior()
    sdi = SDIGuidance(prior, t_schedule=SCHEDULE, renoise=False)
    x0 = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rgb = x0.clone().requires_grad_(True)
    sdi(make_input(rgb, step=60, seed=2)).losses["sdi"].sum().backward()
    t = sdi.timestep(5, 60)
    cond = prior.text_condition(["a"] * 5)
    _, x_end, _ = sdi.infer_noise(x0, t, cond, torch.Generator().manual_seed(2))
    target = prior.schedule.x0_from_eps(x_end, prior.predict_noise(x_end, t, cond, 7.5), t)
    torch.testing.assert_close(rgb.grad, x0 - target, atol=1e-9, rtol=1e-7)


def test_end_to_end_smoke_through_hydra_and_train(tmp_path, cache_dir):
    """Two real training steps with `guidance=sdi` (the config's defaults plus convexity, tiny world)."""
    metrics = train(compose(tmp_path, cache_dir, "guidance=sdi", "trainer.max_steps=2", "logger=none",
                            "guidance.lambda_convexity=0.1"))  # with normals rendered, as the thesis
    assert metrics["training"]["guidance"] == "sdi" and metrics["training"]["steps"] == 2
    assert metrics["training"]["nonfinite_steps"] == 0


def test_inferred_noise_is_noise_like_on_a_smoothed_finite_set_prior():
    """On Dirac references the exact denoiser's eps at t = 0 is (x - r_nearest) / sqrt(1 - abar_0),
    so inverting any render that is not exactly a reference infers noise of std >> 1; with the
    kernel-density prior (data_std) the inferred kappa is noise-like again (std ~ 1)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=g)
    refs = ReferenceSet(images, torch.arange(4), torch.zeros(4), {f"o{i}": i for i in range(4)})
    render = (0.8 * images + 0.2 * torch.rand(4, 3, 8, 8, generator=g)) * 2 - 1  # near, not on, the set
    t = torch.full((4,), 500)
    stds = {}
    for s in (0.0, 0.1):
        sdi = SDIGuidance(AnalyticPrior(refs, data_std=s), tau_max=0.0)
        kappa, _, _ = sdi.infer_noise(render, t, sdi.prior.text_condition([f"o{i}" for i in range(4)]),
                                      torch.Generator().manual_seed(1))
        stds[s] = float(kappa.flatten(1).std(1).mean())
    assert stds[0.0] > 4.0
    assert 0.3 < stds[0.1] < 2.5
