"""The analytic prior against closed forms, a float64 brute force and Monte Carlo."""
from __future__ import annotations

import math

import pytest
import torch

from amortized3d.cameras import VIEW_LABELS
from amortized3d.priors.analytic import AnalyticCondition, AnalyticPrior, ReferenceSet
from amortized3d.priors.schedule import NoiseSchedule
from amortized3d.scenes import PrimitivesWorld


def make_refs(m: int = 6, hw: tuple[int, int] = (4, 4), seed: int = 0, n_objects: int = 3) -> ReferenceSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(m, 3, *hw, generator=g)
    objects = torch.arange(m) % n_objects
    views = (torch.arange(m) // n_objects) % len(VIEW_LABELS)
    return ReferenceSet(images, objects, views, {f"object {i}": i for i in range(n_objects)})


def brute_force_x0(x_t: torch.Tensor, abar: torch.Tensor, refs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float64, one sample at a time, explicit logsumexp."""
    out = []
    for n in range(x_t.shape[0]):
        x, a = x_t[n].double().flatten(), float(abar[n])
        allowed = [i for i in range(refs.shape[0]) if mask[n, i]]
        logp = torch.stack([-((x - math.sqrt(a) * refs[i].double().flatten()) ** 2).sum() / (2 * (1 - a))
                            for i in allowed])
        w = torch.exp(logp - torch.logsumexp(logp, 0))
        out.append(sum(w[k] * refs[i].double().flatten() for k, i in enumerate(allowed)))
    return torch.stack(out).reshape(x_t.shape)


def test_single_image_is_recovered_exactly():
    refs = make_refs(m=1, n_objects=1)
    prior = AnalyticPrior(refs)
    x0 = refs.images * 2 - 1
    t = torch.tensor([0, 250, 600, 999])
    eps = torch.randn(4, *x0.shape[1:])
    x_t = prior.schedule.add_noise(x0.expand(4, -1, -1, -1), eps, t)
    cond = prior.text_condition(["object 0"] * 4)
    for s in (0.0, 1.0, 7.5):
        torch.testing.assert_close(prior.predict_x0(x_t, t, cond, s), x0.expand(4, -1, -1, -1), atol=1e-5, rtol=0)
    eps_hat = prior.predict_noise(x_t, t, cond, 1.0)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps_hat, x_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=2e-3, rtol=0)  # the only x0 -> the true noise


def test_high_noise_limit_is_the_set_mean():
    refs = make_refs(m=8)
    prior = AnalyticPrior(refs, schedule=NoiseSchedule(torch.tensor([0.5, 1e-12], dtype=torch.float64)))
    x_t = torch.randn(5, 3, 4, 4)
    t = torch.ones(5, dtype=torch.long)
    expected = (refs.images * 2 - 1).mean(0).expand(5, -1, -1, -1)
    torch.testing.assert_close(prior.posterior_mean(x_t, t), expected, atol=1e-5, rtol=0)
    cond_mean = (refs.images[refs.object_ids == 1] * 2 - 1).mean(0)
    got = prior.predict_x0(x_t, t, prior.text_condition(["object 1"] * 5), 1.0)
    torch.testing.assert_close(got, cond_mean.expand(5, -1, -1, -1), atol=1e-5, rtol=0)


def test_tiny_noise_returns_nearest_reference():
    refs = make_refs(m=8, hw=(8, 8))
    prior = AnalyticPrior(refs)
    x0 = refs.images * 2 - 1
    t = torch.zeros(8, dtype=torch.long)
    x_t = prior.schedule.add_noise(x0, torch.randn_like(x0), t)
    torch.testing.assert_close(prior.posterior_mean(x_t, t), x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [3, 256])
def test_matches_float64_brute_force(chunk_size):
    refs = make_refs(m=10, hw=(4, 4), seed=1)
    prior = AnalyticPrior(refs, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(2)
    n = 16
    t = torch.linspace(0, 999, n).long()
    picks = torch.randint(0, 10, (n,), generator=g)
    x_t = prior.schedule.add_noise(refs.images[picks] * 2 - 1, torch.randn(n, 3, 4, 4, generator=g), t)
    mask = torch.rand(n, 10, generator=g) < 0.5
    mask[torch.arange(n), picks] = True
    expected = brute_force_x0(x_t, prior.alphas_cumprod[t].double(), refs.images * 2 - 1, mask)
    torch.testing.assert_close(prior.posterior_mean(x_t, t, mask).double(), expected, atol=1e-5, rtol=0)
    full = torch.ones(n, 10, dtype=torch.bool)
    torch.testing.assert_close(prior.posterior_mean(x_t, t, None), prior.posterior_mean(x_t, t, full))


def test_eps_and_x0_predictions_are_consistent_and_cfg_is_linear():
    refs = make_refs(m=9)
    prior = AnalyticPrior(refs)
    x_t, t = torch.randn(6, 3, 4, 4), torch.tensor([10, 100, 300, 500, 700, 900])
    cond = prior.text_condition(["object 0", "object 1", "object 2"] * 2)
    eps_u, eps_c = prior.predict_noise(x_t, t, cond, 0.0), prior.predict_noise(x_t, t, cond, 1.0)
    torch.testing.assert_close(eps_u, prior.schedule.eps_from_x0(x_t, prior.posterior_mean(x_t, t, None), t))
    torch.testing.assert_close(eps_c, prior.schedule.eps_from_x0(
        x_t, prior.posterior_mean(x_t, t, prior.condition_mask(cond)), t))
    for s in (0.0, 1.0, 7.5):
        eps = prior.predict_noise(x_t, t, cond, s)
        torch.testing.assert_close(eps, eps_u + s * (eps_c - eps_u), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(prior.schedule.x0_from_eps(x_t, eps, t), prior.predict_x0(x_t, t, cond, s),
                                   atol=1e-3, rtol=1e-4)


class CountingPrior(AnalyticPrior):
    def posterior_mean(self, x_t, t, mask=None):
        self.branches.append("uncond" if mask is None else "cond")
        return super().posterior_mean(x_t, t, mask)


def test_guidance_scale_one_and_zero_evaluate_one_branch():
    prior = CountingPrior(make_refs())
    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([100, 200])
    cond = prior.text_condition(["object 0", "object 1"])
    for s, expected in ((1.0, ["cond"]), (0.0, ["uncond"]), (7.5, ["cond", "uncond"])):
        prior.branches = []
        prior.predict_noise(x_t, t, cond, s)
        assert prior.branches == expected


def test_view_bucket_restricts_conditional_references():
    # 2 objects x 3 buckets (front, side, back); object 1 has no "overhead" reference either.
    images = torch.rand(6, 3, 4, 4)
    refs = ReferenceSet(images, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2]),
                        lambda p: int(p.split()[-1]))
    schedule = NoiseSchedule(torch.tensor([0.5, 1e-12], dtype=torch.float64))
    prior = AnalyticPrior(refs, schedule=schedule, view_dependent=True)
    cond = prior.text_condition(["obj 0", "obj 1", "obj 1", "obj 0"], ["side", "front", "overhead", "back"])
    assert cond.view_ids.tolist() == [1, 0, 3, 2]
    mask = prior.condition_mask(cond)
    assert mask.tolist() == [[False, True, False, False, False, False],
                             [False, False, False, True, False, False],
                             [False, False, False, True, True, True],  # empty bucket: all of object 1
                             [False, False, True, False, False, False]]
    x_t, t = torch.randn(4, 3, 4, 4), torch.ones(4, dtype=torch.long)
    x0 = images * 2 - 1
    expected = torch.stack([x0[1], x0[3], x0[3:].mean(0), x0[2]])
    torch.testing.assert_close(prior.predict_x0(x_t, t, cond, 1.0), expected, atol=1e-5, rtol=0)
    # the unconditional branch ignores views and objects
    torch.testing.assert_close(prior.predict_x0(x_t, t, cond, 0.0), x0.mean(0).expand(4, -1, -1, -1),
                               atol=1e-5, rtol=0)
    # without view dependence the bucket is ignored
    plain = AnalyticPrior(refs, schedule=schedule, view_dependent=False)
    torch.testing.assert_close(plain.predict_x0(x_t, t, cond, 1.0),
                               torch.stack([x0[:3].mean(0), x0[3:].mean(0), x0[3:].mean(0), x0[:3].mean(0)]),
                               atol=1e-5, rtol=0)


def test_monte_carlo_tweedie_two_images():
    """Low dimension (D=3), two references: check E[x0|x_t] three independent ways."""
    images = torch.tensor([[0.1, 0.8, 0.3], [0.9, 0.2, 0.6]]).view(2, 3, 1, 1)
    prior = AnalyticPrior(ReferenceSet(images, torch.zeros(2), torch.zeros(2), {"x": 0}), chunk_size=1 << 17)
    r = (images * 2 - 1).flatten(1).double()
    t = 500
    a = float(prior.alphas_cumprod[t])
    x_t = torch.tensor([[0.3, -0.1, 0.2]], dtype=torch.float64)
    mean = prior.posterior_mean(x_t.float().view(1, 3, 1, 1), torch.tensor([t])).view(3).double()
    # 1. sample the reference index from the exact Gaussian-mixture posterior and average x0
    comps = torch.distributions.MultivariateNormal(math.sqrt(a) * r, (1 - a) * torch.eye(3, dtype=torch.float64))
    post = torch.softmax(comps.log_prob(x_t), 0)
    idx = torch.multinomial(post.float(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r[idx].mean(0), mean, atol=1e-2, rtol=0)
    # 2. Tweedie: E[x0|x_t] = (x_t + (1 - a) grad log p(x_t)) / sqrt(a)
    x = x_t.clone().requires_grad_()
    (score,) = torch.autograd.grad(torch.logsumexp(comps.log_prob(x), 0), x)
    torch.testing.assert_close(((x_t + (1 - a) * score) / math.sqrt(a))[0], mean, atol=1e-5, rtol=0)
    # 3. the regression property on joint samples: residual x0 - E[x0|x_t] is orthogonal to x_t
    g = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = r[torch.randint(0, 2, (n,), generator=g)]
    xs = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(n, 3, generator=g, dtype=torch.float64)
    resid = x0 - prior.posterior_mean(xs.float().view(n, 3, 1, 1), torch.full((n,), t)).view(n, 3).double()
    assert resid.mean(0).abs().max() < 0.01
    assert (resid[:, :, None] * xs[:, None, :]).mean(0).abs().max() < 0.01


def test_encode_decode_buffers_and_conditions():
    refs = make_refs(m=3, hw=(8, 8))
    prior = AnalyticPrior(refs)
    assert prior.latent_shape == (3, 8, 8) and prior.num_train_timesteps == 1000
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    x0 = prior.encode(rgb)
    assert x0.shape == (2, 3, 8, 8) and x0.min() >= -1 and x0.max() <= 1
    x0.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    small = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(prior.decode(prior.encode(small)), small)
    assert prior.state_dict() == {} and not any(p.requires_grad for p in prior.parameters())
    cond = prior.text_condition(["object 2", ""])
    assert isinstance(cond, AnalyticCondition) and cond.object_ids.tolist() == [2, -1] and cond.view_ids is None
    assert prior.condition_mask(cond)[1].all()  # the empty prompt is unconditional
    assert cond.repeat_interleave(2).object_ids.tolist() == [2, 2, -1, -1] and len(cond.index([1])) == 1
    with pytest.raises(ValueError):
        prior.text_condition(["unknown prompt"])
    x64 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert prior.predict_noise(x64, torch.tensor([5, 6]), cond, 7.5).dtype == torch.float64


def test_reference_set_from_primitives_world():
    world = PrimitivesWorld()
    ids = torch.tensor([world.object_id("cube", "red"), world.object_id("torus", "blue")])
    refs = ReferenceSet(torch.rand(2, 3, 4, 4), ids, torch.zeros(2), world.object_for_prompt)
    prior = AnalyticPrior(refs)
    assert prior.text_condition(["a red cube", "a blue torus, side view"]).object_ids.tolist() == ids.tolist()
    with pytest.raises(ValueError, match="no reference images"):
        prior.condition_mask(prior.text_condition(["a green cone"]))


def test_data_std_single_reference_is_the_exact_gaussian_denoiser():
    """One reference with data_std s is the data distribution N(r, s^2 I): its noise prediction must
    equal the independent closed form of ``GaussianPrior`` at every noise level, including t = 0."""
    from amortized3d.priors.gaussian import GaussianPrior

    refs = make_refs(m=1, hw=(2, 2), n_objects=1)
    s = 0.2
    prior = AnalyticPrior(refs, data_std=s)
    r = (refs.images * 2 - 1).flatten(1).double()
    gauss = GaussianPrior(r, (s ** 2 * torch.eye(12, dtype=torch.float64))[None], ["object 0"], shape=(3, 2, 2))
    t = torch.tensor([0, 5, 50, 300, 999])
    x_t = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    got = prior.predict_noise(x_t, t, prior.text_condition(["object 0"] * 5), 1.0).double()
    expected = gauss.predict_noise(x_t.double(), t, gauss.text_condition(["object 0"] * 5), 1.0)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert got[0].abs().max() < 5.0  # bounded at t = 0 for an off-reference x (Diracs: ~ (x - r) / 0.03)


def test_data_std_mixture_satisfies_tweedie():
    images = torch.tensor([[0.1, 0.8, 0.3], [0.9, 0.2, 0.6]]).view(2, 3, 1, 1)
    s = 0.3
    prior = AnalyticPrior(ReferenceSet(images, torch.zeros(2), torch.zeros(2), {"x": 0}), data_std=s)
    r = (images * 2 - 1).flatten(1).double()
    for t in (0, 40, 500):
        a = float(prior.alphas_cumprod[t])
        comps = torch.distributions.MultivariateNormal(
            math.sqrt(a) * r, (a * s * s + 1 - a) * torch.eye(3, dtype=torch.float64))
        x = torch.tensor([[0.3, -0.1, 0.2]], dtype=torch.float64, requires_grad=True)
        (score,) = torch.autograd.grad(torch.logsumexp(comps.log_prob(x), 0), x)
        mean = prior.posterior_mean(x.detach().float().view(1, 3, 1, 1), torch.tensor([t])).view(3).double()
        torch.testing.assert_close(((x.detach() + (1 - a) * score) / math.sqrt(a))[0], mean, atol=2e-5, rtol=0)
