"""VSD / L-VSD / L²-VSD: the linearized lookahead maths, the distillation gradient and the hooks."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.func import functional_call

from amortized3d.cameras import sample_cameras
from amortized3d.guidance.base import GuidanceInput
from amortized3d.guidance.sds import SDSGuidance
from amortized3d.guidance.vsd import L2VSDGuidance, LVSDGuidance, VSDGuidance, linearized_shift
from amortized3d.priors.gaussian import GaussianPrior
from amortized3d.priors.score_models import GaussianScoreModel, ScoreModel, SmallUNetScoreModel
from amortized3d.build import build_system
from amortized3d.train import train
from conftest import compose

D = 4


def gaussian_prior(dim: int = D, shape=None, seed: int = 0) -> GaussianPrior:
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.3 + torch.eye(dim, dtype=torch.float64)
    return GaussianPrior(torch.randn(1, dim, generator=g, dtype=torch.float64), (factor @ factor.T)[None], ["p"],
                         shape=shape)


def score_model(kind: str) -> ScoreModel:
    torch.manual_seed(0)
    if kind == "gaussian":
        return GaussianScoreModel(D, torch.randn(D), torch.eye(D) + 0.2 * torch.randn(D, D)).double()
    m = SmallUNetScoreModel(in_channels=3, cond_dim=5, base_channels=8, channel_mults=(1, 2), resolution=4)
    torch.nn.init.normal_(m.conv_out.weight, std=0.05)  # off the zero init: every layer gets a gradient
    torch.nn.init.normal_(m.camera_proj.weight, std=0.05)
    return m.double()


def setup(kind: str, n: int = 3):
    """(guidance-ready prior, model, x0, x_t, t, cond, camera) in float64."""
    model = score_model(kind)
    shape = (D,) if kind == "gaussian" else (3, 4, 4)
    prior = gaussian_prior(D if kind == "gaussian" else 48, shape=shape)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    t = torch.tensor([50, 400, 900][:n])
    x_t = prior.schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    cond = torch.randn(n, 5, generator=g, dtype=torch.float64)
    camera = sample_cameras(n, 4, rng=g).embedding().double()
    return prior, model, x0, x_t, t, cond, camera


def make_input(x: torch.Tensor, n: int, seed: int = 0, step: int = 0) -> GuidanceInput:
    cams = sample_cameras(n, 4, rng=torch.Generator().manual_seed(9))
    return GuidanceInput(rgb=x, cameras=cams, prompts=["p"] * n, step=step,
                         rng=torch.Generator().manual_seed(seed), text_emb=torch.zeros(n, 5, dtype=x.dtype))


# --- L²-VSD: the linearized lookahead ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "unet"])
def test_delta_eps_first_is_the_directional_derivative(kind):
    prior, model, x0, x_t, t, cond, cam = setup(kind)
    guidance = L2VSDGuidance(prior, model, eta=0.1)
    tangent = guidance.lookahead_tangent(x0, cond, cam, torch.Generator().manual_seed(7))
    assert set(tangent) == set(model.trainable_parameters())
    eps, delta = linearized_shift(model, tangent, x_t, t, cond, cam)
    torch.testing.assert_close(eps, model.predict_noise(x_t, t, cond, cam))

    def eps_at(h: float) -> torch.Tensor:
        params = {n: p.detach() + h * tangent[n] for n, p in model.trainable_parameters().items()}
        return functional_call(model, params, (x_t, t, cond, cam))

    h = 1e-4
    finite_diff = (eps_at(h) - eps_at(-h)) / (2 * h)
    assert delta.norm() > 1e-6
    torch.testing.assert_close(delta, finite_diff, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["gaussian", "unet"])
def test_delta_eps_first_is_the_first_order_part_of_one_lookahead_sgd_step(kind):
    """eps_{phi_1}(x_t) - eps_phi(x_t) - d_eps = O(eta^2), phi_1 = one SGD step of size eta on the
    item SUM of the per-render losses (Eq. 7-9, summed over the renders)."""
    prior, model, x0, x_t, t, cond, cam = setup(kind)
    guidance = L2VSDGuidance(prior, model)
    residuals, firsts = [], []
    for eta in (0.02, 0.01, 0.005, 0.0025):
        guidance.eta = eta
        tangent = guidance.lookahead_tangent(x0, cond, cam, torch.Generator().manual_seed(7))
        eps0, delta = linearized_shift(model, tangent, x_t, t, cond, cam)
        stepped = copy.deepcopy(model)  # L-VSD's lookahead: one plain SGD step on the same (t', eps') draw
        opt = torch.optim.SGD(stepped.trainable_parameters().values(), lr=eta)
        stepped.loss(x0, cond, cam, torch.Generator().manual_seed(7)).sum().backward()
        opt.step()
        with torch.no_grad():
            residuals.append((stepped.predict_noise(x_t, t, cond, cam) - eps0 - delta).norm().item())
        firsts.append(delta.norm().item())
    for i in range(len(firsts) - 1):
        assert firsts[i] / firsts[i + 1] == pytest.approx(2.0, rel=1e-6)  # first order: linear in eta
        assert 3.5 < residuals[i] / residuals[i + 1] < 4.5  # remainder: quadratic in eta
    assert residuals[-1] < 0.05 * firsts[-1]


def test_last_layer_only_uses_only_the_last_layer():
    prior, model, x0, x_t, t, cond, cam = setup("unet")
    full = L2VSDGuidance(prior, model, eta=0.1)
    last = L2VSDGuidance(prior, model, eta=0.1, last_layer_only=True)
    tangent = last.lookahead_tangent(x0, cond, cam, torch.Generator().manual_seed(7))
    assert sorted(tangent) == sorted(model.last_layer_names())
    full_tangent = full.lookahead_tangent(x0, cond, cam, torch.Generator().manual_seed(7))
    for n in tangent:  # same gradient, restricted
        torch.testing.assert_close(tangent[n], full_tangent[n])
    masked = {n: (full_tangent[n] if n in tangent else torch.zeros_like(v)) for n, v in full_tangent.items()}
    _, delta_last = linearized_shift(model, tangent, x_t, t, cond, cam)
    _, delta_masked = linearized_shift(model, masked, x_t, t, cond, cam)
    _, delta_full = linearized_shift(model, full_tangent, x_t, t, cond, cam)
    torch.testing.assert_close(delta_last, delta_masked)
    assert not torch.allclose(delta_last, delta_full)
    # eps is affine in the output layer: a last-layer SGD step is *exactly* its linearization.
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in stepped.trainable_parameters().items():
            p += tangent.get(n, torch.zeros_like(p))
        torch.testing.assert_close(stepped.predict_noise(x_t, t, cond, cam),
                                   model.predict_noise(x_t, t, cond, cam) + delta_last)


def test_l2vsd_leaves_no_grad_and_logs_norms_linear_in_eta():
    prior, model, x0, *_ = setup("gaussian")
    logs = {}
    for eta in (0.1, 0.2):
        guidance = L2VSDGuidance(prior, model, eta=eta, guidance_scale=1.0)
        x = x0.clone().requires_grad_(True)
        out = guidance(make_input(x, 3, seed=5))
        assert all(p.grad is None for p in model.parameters())  # the system's score step starts clean
        out.losses["l2vsd"].sum().backward()
        assert all(p.grad is None for p in model.parameters())  # no generator gradient reaches phi
        logs[eta] = out.logs
    assert logs[0.2]["delta_eps_norm"] == pytest.approx(2 * logs[0.1]["delta_eps_norm"].item(), rel=1e-9)
    assert logs[0.2]["eps_phi_norm"] == pytest.approx(logs[0.1]["eps_phi_norm"].item(), rel=1e-12)


# --- the VSD gradient -------------------------------------------------------------------------------

def test_vsd_gradient_vanishes_when_the_score_model_is_the_prior():
    prior = gaussian_prior()
    mean, cov = prior.means[0], prior.covariances[0]
    exact = GaussianScoreModel(D, mean.float(), torch.linalg.cholesky(cov).float()).double()
    with torch.no_grad():  # exact float64 parameters (the constructor stores float32)
        exact.mean.copy_(mean)
        exact.scale_tril.copy_(torch.linalg.cholesky(cov))
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    VSDGuidance(prior, exact, guidance_scale=1.0)(make_input(x, 5)).losses["vsd"].sum().backward()
    assert x.grad.abs().max() < 1e-10
    other = GaussianScoreModel(D).double()  # r != p: a non-zero gradient
    x.grad = None
    VSDGuidance(prior, other, guidance_scale=1.0)(make_input(x, 5)).losses["vsd"].sum().backward()
    assert x.grad.abs().max() > 1e-3


def test_vsd_gradient_is_weighted_prior_minus_score_model_eps():
    prior, model, x0, *_ = setup("gaussian")
    guidance = VSDGuidance(prior, model, guidance_scale=3.0, t_min=0.3, t_max=0.6)
    x = x0.clone().requires_grad_(True)
    out = guidance(make_input(x, 3, seed=11))
    out.losses["vsd"].sum().backward()
    inp = make_input(x0, 3, seed=11)  # replay the same draws
    t, _, x_t = guidance.sample_noisy(x0, inp)
    assert 300 <= t.min() and t.max() <= 600
    eps_prior = prior.predict_noise(x_t, t, prior.text_condition(["p"] * 3), 3.0)
    eps_phi = model.predict_noise(x_t, t, inp.text_emb, inp.cameras.embedding().double())
    expected = guidance.weight(t).double()[:, None] * (eps_prior - eps_phi)
    torch.testing.assert_close(x.grad, expected)
    assert set(out.logs) >= {"grad_norm", "t_mean", "eps_phi_norm"}


# --- hooks and update orders ------------------------------------------------------------------------

def test_update_order_hooks():
    prior, model, *_ = setup("gaussian")
    after = VSDGuidance(prior, copy.deepcopy(model))
    joint = VSDGuidance(prior, copy.deepcopy(model), update_order="joint")
    assert (after.auxiliary.order, joint.auxiliary.order) == ("after", "joint")
    lvsd = LVSDGuidance(prior, copy.deepcopy(model), score_steps=3)
    assert (lvsd.auxiliary.order, lvsd.auxiliary.steps, lvsd.auxiliary.reuses_gradient) == ("before", 3, False)
    l2vsd = L2VSDGuidance(prior, copy.deepcopy(model))
    assert (l2vsd.auxiliary.order, l2vsd.auxiliary.reuses_gradient) == ("after", True)
    assert SDSGuidance(prior).auxiliary is None  # nothing of its own to train
    for bad in [lambda: VSDGuidance(prior, model, update_order="before"),
                lambda: LVSDGuidance(prior, model, update_order="after"),
                lambda: VSDGuidance(prior, model, update_order="joint", score_steps=2),
                lambda: VSDGuidance(prior, model, score_steps=0),
                lambda: L2VSDGuidance(prior, model, eta=0.0)]:
        with pytest.raises(ValueError):
            bad()
    (group,) = after.auxiliary.parameter_groups()
    assert [id(p) for p in group["params"]] == [id(p) for p in after.score_model.trainable_parameters().values()]
    assert after.auxiliary.optimizer == {"name": "adamw", "lr": 1e-4}
    tuned = VSDGuidance(prior, copy.deepcopy(model), score_optimizer={"lr": 1e-3, "betas": [0.9, 0.99]})
    assert tuned.auxiliary.optimizer == {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99]}


@pytest.mark.parametrize("order", ["after", "joint"])
def test_auxiliary_loss_trains_only_the_score_model(order):
    """'joint' (threestudio) adds the score loss to the generator backward; each part reaches only its own."""
    prior, model, x0, *_ = setup("gaussian")
    guidance = VSDGuidance(prior, model, update_order=order, guidance_scale=1.0)
    x = x0.clone().requires_grad_(True)
    aux = guidance.auxiliary.loss(make_input(x.detach(), 3, seed=2))
    assert set(aux.losses) == {"score"} and aux.losses["score"].shape == (3,)
    aux.losses["score"].mean().backward()
    separate = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    total = guidance(make_input(x, 3, seed=1)).losses["vsd"].sum() \
        + guidance.auxiliary.loss(make_input(x.detach(), 3, seed=2)).losses["score"].mean()
    total.backward()
    for p, g in zip(model.parameters(), separate):
        torch.testing.assert_close(p.grad, g)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_score_model_must_match_the_prior_space():
    prior = gaussian_prior(48, shape=(3, 4, 4))
    with pytest.raises(ValueError, match="x0 space"):
        VSDGuidance(prior, SmallUNetScoreModel(cond_dim=5, base_channels=8, resolution=8))
    with pytest.raises(TypeError):
        VSDGuidance(prior, torch.nn.Linear(2, 2))


def test_score_model_arrives_as_a_factory_built_with_the_prior(tmp_path, cache_dir):
    """configs/guidance/vsd.yaml: the score model is a Hydra ``_partial_`` factory; the guidance
    calls it with its prior, so it diffuses with the prior's own schedule (one phase, no bind)."""
    import functools

    import hydra
    from omegaconf import OmegaConf

    cfg = compose(tmp_path, cache_dir, "guidance=vsd")
    node = OmegaConf.to_container(cfg.guidance.score_model, resolve=True)
    factory = hydra.utils.instantiate(node)
    assert isinstance(factory, functools.partial)
    prior = gaussian_prior(3 * 16 * 16, shape=(3, 16, 16))
    model = factory(prior=prior)
    assert model.schedule is prior.schedule
    guidance = VSDGuidance(prior, factory)
    assert guidance.score_model.schedule is prior.schedule and guidance.auxiliary.model is guidance.score_model


def test_converting_the_score_model_leaves_the_priors_schedule_alone():
    """The prior's schedule is shared by reference, not owned: ``score_model.double()`` (the 2D toy
    does this) must not turn the prior's float32 schedule into float64 under it."""
    prior = gaussian_prior(D, shape=(D,))
    guidance = VSDGuidance(prior, GaussianScoreModel(D))
    guidance.score_model.double()
    assert prior.schedule.alphas_cumprod.dtype == torch.float32
    built = GaussianScoreModel(D, prior=prior).double()
    assert built.schedule is prior.schedule and prior.schedule.alphas_cumprod.dtype == torch.float32


def test_a_built_score_model_must_diffuse_like_the_prior():
    from amortized3d.priors.schedule import NoiseSchedule

    prior = gaussian_prior(D, shape=(D,))
    other = NoiseSchedule(NoiseSchedule.scaled_linear().alphas_cumprod.flip(0))
    with pytest.raises(ValueError, match="noise schedule"):
        VSDGuidance(prior, GaussianScoreModel(D, schedule=other))
    with pytest.raises(TypeError, match="factory returned"):
        VSDGuidance(prior, lambda prior: torch.nn.Linear(2, 2))


# --- the real pipeline ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, overrides", [
    ("vsd", []), ("lvsd", []), ("l2vsd", []),
    pytest.param("vsd", ["guidance.update_order=joint", "prior.score_model.prediction_type=v_prediction"],
                 marks=pytest.mark.slow),
    pytest.param("l2vsd", ["guidance.last_layer_only=true", "guidance.score_steps=2"], marks=pytest.mark.slow)])
def test_end_to_end_smoke_through_hydra_and_train(tmp_path, cache_dir, name, overrides):
    """Two real training steps through configs/guidance/<name>.yaml (tiny world); the score model
    and its optimizer state are checkpointed with the run."""
    cfg = compose(tmp_path, cache_dir, f"guidance={name}", "trainer.max_steps=2", "logger=none", *overrides)
    metrics = train(cfg)
    assert metrics["training"]["guidance"] == name and metrics["training"]["steps"] == 2
    assert metrics["training"]["nonfinite_steps"] == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "guidance.score_model.conv_out.weight" in ckpt["state_dict"]
    assert not any(k.startswith("guidance.prior.") for k in ckpt["state_dict"])
    assert ckpt["amortized3d"]["auxiliary_optimizer"]["state"]  # the score model was trained


class RecordingL2VSD(L2VSDGuidance):
    """L²-VSD that keeps what the system handed it (to check the gradient-reuse protocol)."""

    seen: list[dict[str, torch.Tensor]] = []

    def forward(self, inp):
        handed = self.auxiliary.handed
        assert handed is not None, "the system must hand L²-VSD this step's score gradient"
        assert handed.items == inp.rgb.shape[0]  # one process: the mean is over this step's renders
        RecordingL2VSD.seen.append({n: g.clone() for n, g in handed.gradients.items()})
        return super().forward(inp)


def test_l2vsd_lookahead_gradient_is_the_score_step_the_system_then_takes(tmp_path, cache_dir):
    """The system back-propagates the score loss once, before theta: L²-VSD's lookahead tangent is
    -eta times exactly the gradient of the score-model step taken after theta (SGD, lr 1:
    phi_0 - phi_1 = that gradient), so the lookahead costs no extra backward pass."""
    RecordingL2VSD.seen.clear()
    cfg = compose(tmp_path, cache_dir, "guidance=l2vsd", "trainer.max_steps=1", "logger=none",
                  f"guidance._target_={__name__}.RecordingL2VSD",
                  "guidance.score_optimizer={name: sgd, lr: 1.0}")
    L.seed_everything(cfg.seed, workers=True)  # as train() does: the same initial score model
    phi0 = {n: p.detach().clone() for n, p in build_system(cfg)[0].guidance.score_model.trainable_parameters().items()}
    train(cfg)
    assert len(RecordingL2VSD.seen) == 1
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    seen = RecordingL2VSD.seen[0]
    assert set(seen) == set(phi0) and any(g.abs().sum() > 0 for g in seen.values())
    for name, before in phi0.items():
        torch.testing.assert_close(before - state[f"guidance.score_model.{name}"], seen[name], rtol=1e-5, atol=1e-7)


def test_lookahead_tangent_from_a_given_gradient_equals_the_standalone_lookahead():
    prior, model, x0, x_t, t, cond, cam = setup("unet")
    guidance = L2VSDGuidance(prior, model, eta=0.05)
    standalone = guidance.lookahead_tangent(x0, cond, cam, torch.Generator().manual_seed(7))
    model.loss(x0, cond, cam, torch.Generator().manual_seed(7)).mean().backward()  # the system's item mean
    handed = guidance.tangent_from_gradient(guidance.auxiliary.gradients(), num_items=x0.shape[0])
    for n in standalone:
        torch.testing.assert_close(handed[n], standalone[n])


# --- L²-VSD: the size of each render's correction (issue 13 item 2) --------------------------------

def _jacobian(model: ScoreModel, x_t, t) -> torch.Tensor:
    """J_phi(x_t) [N*D, P]: d eps_phi / d phi over all trainable parameters (flattened)."""
    params = model.trainable_parameters()
    names = list(params)

    def eps(*flat):
        return functional_call(model, dict(zip(names, flat)), (x_t, t, None, None)).reshape(-1)

    jac = torch.autograd.functional.jacobian(eps, tuple(p.detach() for p in params.values()))
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def test_l2vsd_single_render_is_eq_12_on_the_closed_form_gaussian():
    """N = 1, r = the closed-form Gaussian score model: eps_hat = eps_phi(x_t) + 2 eta_p (eps_phi(x_t', t')
    - eps') [J_phi(x_t', t') J_phi^T(x_t, t)] (Eq. 12, jacobians by reverse mode), with eta_p = eta / D:
    the per-item loss is the element mean (threestudio's reduction), so 2 eta_p Delta = eta grad l."""
    prior, model, x0, *_ = setup("gaussian", n=1)
    eta = 0.3
    guidance = L2VSDGuidance(prior, model, eta=eta, guidance_scale=1.0)  # jvp: exact (the class default)
    x = x0.clone().requires_grad_(True)
    guidance(make_input(x, 1, seed=5)).losses["l2vsd"].sum().backward()
    # Replay the step's draws: (t, eps) of the distillation, then (t', eps') of the lookahead.
    inp = make_input(x0, 1, seed=5)
    t, _, x_t = guidance.sample_noisy(x0, inp)
    t2 = torch.randint(0, 1000, (1,), generator=inp.rng)
    noise2 = torch.randn(x0.shape, generator=inp.rng, dtype=x0.dtype)
    x_t2 = prior.schedule.add_noise(x0, noise2, t2)
    with torch.no_grad():
        residual = model.predict_noise(x_t2, t2) - noise2  # eps_phi(x_t') - eps'  [1, D]
        eq12 = 2 * (eta / D) * residual.reshape(1, -1) @ _jacobian(model, x_t2, t2) @ _jacobian(model, x_t, t).T
        eps_hat = model.predict_noise(x_t, t) - eq12.reshape(x_t.shape)  # Eq. 9: eps_phi + d_eps_first
        eps_prior = prior.predict_noise(x_t, t, prior.text_condition(["p"]), 1.0)
    assert eq12.abs().max() > 1e-4
    torch.testing.assert_close(x.grad, guidance.weight(t).double()[:, None] * (eps_prior - eps_hat))


@pytest.mark.parametrize("jvp", ["exact", "finite_difference"])
def test_l2vsd_amortized_batch_gives_each_render_its_full_correction_plus_cross_terms(jvp):
    """N renders, the system's protocol (it hands over the gradient of the item MEAN): render n's
    correction is J(x_t^n) (-eta sum_m grad l_m) = its own Eq. 7-9 correction (the one it gets as the
    only render) + the cross terms from the other renders. Under the old item-mean lookahead each
    render got 1/N of that."""
    prior, model, x0, x_t, t, cond, cam = setup("unet", n=3)
    n, eta = 3, 0.05
    guidance = L2VSDGuidance(prior, model, eta=eta, **({"jvp": jvp} if jvp != "exact" else {}))
    per_item = model.loss(x0, cond, cam, torch.Generator().manual_seed(7))  # one draw of (t', eps', dropout)
    params = model.trainable_parameters()
    grads = [torch.autograd.grad(per_item[m], list(params.values()), retain_graph=True) for m in range(n)]
    grads = [dict(zip(params, g)) for g in grads]
    mean_grad = {k: sum(g[k] for g in grads) / n for k in params}  # what the system hands over
    with guidance.auxiliary.handing_over(mean_grad, items=n):
        _, delta = guidance.score_estimate(x_t, t, x0, cond, cam, make_input(x0, n))
    assert guidance.auxiliary.handed is None  # only for the duration of the forward

    def shift(tangent):
        return linearized_shift(model, tangent, x_t, t, cond, cam)[1]  # exact jvp

    terms = [shift({k: -eta * g[k] for k in params}) for g in grads]  # [m][n]: render m's lookahead at every x_t^n
    if jvp == "exact":
        torch.testing.assert_close(delta, sum(terms), rtol=1e-6, atol=1e-9)
    else:  # first order in the step; this UNet's time embedding is float32, hence not 1e-5
        assert (delta - sum(terms)).norm() < 3e-3 * sum(terms).norm()
    for k in range(n):
        own = terms[k][k]
        # Alone (N = 1, the same draw): exactly the own term.
        alone = guidance.tangent_from_gradient(grads[k])  # the gradient of a one-render sum
        torch.testing.assert_close(shift(alone)[k], own)
        assert own.norm() > 1e-6
    # The cross terms are there (3 different renders): the correction is not the own term alone.
    own_only = torch.stack([terms[k][k] for k in range(n)])
    assert (delta - own_only).norm() > 1e-3 * own_only.norm()


def test_l2vsd_standalone_lookahead_is_on_the_item_sum():
    """Standalone (the 2D toy's path) and the system's hand-over give the same tangent: -eta grad sum_n l_n."""
    prior, model, x0, x_t, t, cond, cam = setup("unet", n=3)
    guidance = L2VSDGuidance(prior, model, eta=0.05)
    standalone = guidance.lookahead_tangent(x0, cond, cam, torch.Generator().manual_seed(7))
    loss_sum = model.loss(x0, cond, cam, torch.Generator().manual_seed(7)).sum()
    grads = torch.autograd.grad(loss_sum, list(model.trainable_parameters().values()))
    for (name, g) in zip(model.trainable_parameters(), grads):
        torch.testing.assert_close(standalone[name], -0.05 * g)


def test_l2vsd_jvp_option_is_validated_and_shipped():
    prior, model, *_ = setup("gaussian")
    with pytest.raises(ValueError, match="jvp"):
        L2VSDGuidance(prior, model, jvp="central")
    with pytest.raises(ValueError, match="fd_relative_step"):
        L2VSDGuidance(prior, model, fd_relative_step=0.0)


def test_l2vsd_scales_a_rank_averaged_gradient_by_all_ranks_items():
    """Under DDP the system hands over the gradient averaged over ranks (the mean over N x world
    renders) and says so (``HandedGradient.items``): the lookahead is then on the sum over all
    ranks' renders, so each render keeps its full Eq. 7 term instead of 1/world of it."""
    prior, model, x0, x_t, t, cond, cam = setup("unet", n=3)
    guidance = L2VSDGuidance(prior, model, eta=0.05)
    mean_grad = {k: torch.randn_like(p) for k, p in model.trainable_parameters().items()}
    with guidance.auxiliary.handing_over(mean_grad, items=3):  # one rank, 3 renders
        _, delta_one = guidance.score_estimate(x_t, t, x0, cond, cam, make_input(x0, 3))
    with guidance.auxiliary.handing_over(mean_grad, items=6):  # 3 renders here x world size 2
        _, delta_two = guidance.score_estimate(x_t, t, x0, cond, cam, make_input(x0, 3))
    torch.testing.assert_close(delta_two, 2 * delta_one, rtol=1e-5, atol=1e-9)
