"""The VSD family: VSD (ProlificDreamer), L-VSD and L²-VSD (Linearized Lookahead VSD).

All three update the generator with (L²-VSD paper Eq. 5 / 8 / 11; ProlificDreamer Eq. 9)

    grad_x0 = w(t) (eps_pretrain(x_t; y, CFG s) - eps_hat(x_t; y, c)),   x_t = sqrt(a) x0 + sqrt(1-a) eps,

and train a score model eps_phi on the detached renders with the denoising loss (Eq. 2/6).
They differ only in eps_hat and in *when* phi is updated relative to theta:

- VSD:    eps_hat = eps_phi_i;        phi updated after theta (ProlificDreamer Alg. 1) or jointly
          in the same backward (threestudio).
- L-VSD:  eps_hat = eps_phi_{i+1};    phi updated gamma times *before* theta (§3.2, Eq. 7-8).
- L²-VSD: eps_hat = eps_phi_i + d_eps, d_eps = J_phi(x_t) . (-eta grad_phi sum_n L_phi(x_t'^n, t'^n)),
          the first-order part of L-VSD's lookahead (Eq. 9-12), one forward-mode product (or a
          directional finite difference: one extra forward); phi is then updated as in VSD.
          Optionally only the output layer enters (§5.4.2).

The score model lives in the prior's x0 space and is conditioned on the text embedding and the
camera (c2w, 16 numbers); it is queried with CFG 1, i.e. conditional only (ProlificDreamer).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.func import functional_call, jvp

from amortized3d.guidance.auxiliary import AuxiliaryModel, AuxiliaryOrder
from amortized3d.guidance.base import Guidance, GuidanceInput, GuidanceOutput, distillation_loss, expand_like
from amortized3d.priors.base import Prior
from amortized3d.priors.score_models import ScoreModel

DEFAULT_SCORE_OPTIMIZER = {"name": "adamw", "lr": 1e-4}  # ProlificDreamer App. F: LoRA lr 1e-4


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _norm(x: Tensor) -> Tensor:
    return x.detach().flatten(1).norm(dim=1).mean()


JVP_METHODS = ("finite_difference", "exact")
# ||h v|| / ||phi|| of the finite difference's parameter step (see ``finite_difference_step``), by
# the dtype the score model's frozen network computes in: a low-precision network rounds every
# activation to 8 (bf16) or 11 (fp16) bits, so the step must move the output well above that.
FD_RELATIVE_STEP = {torch.float32: 1e-3, torch.float64: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _tangent_primals(model: ScoreModel, tangent: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = model.trainable_parameters()
    unknown = sorted(set(tangent) - set(params))
    if unknown:
        raise KeyError(f"tangent names {unknown} are not trainable parameters of {type(model).__name__}")
    primals = {n: params[n].detach() for n in tangent}
    return primals, {n: tangent[n].detach().to(primals[n]) for n in tangent}


def finite_difference_step(primals: Mapping[str, Tensor], tangents: Mapping[str, Tensor],
                           relative_step: float) -> float:
    """h with ||h v|| = relative_step * max(||phi||, 1) over the parameters in the tangent.

    Relative to the parameters, so the step is the same fraction of phi whatever eta, N or the
    loss scale make ||v||; 0 when the tangent is 0 (then the shift is exactly 0).
    """
    v = torch.sqrt(sum(t.double().pow(2).sum() for t in tangents.values()))
    if float(v) == 0.0:
        return 0.0
    p = torch.sqrt(sum(t.double().pow(2).sum() for t in primals.values()))
    return relative_step * max(float(p), 1.0) / float(v)


def linearized_shift(model: ScoreModel, tangent: Mapping[str, Tensor], x_t: Tensor, t: Tensor,
                     cond: Tensor | None, camera: Tensor | None, method: str = "exact",
                     relative_step: float | None = None, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(eps_phi(x_t), J_phi(x_t) . tangent): the directional derivative of the score model along
    ``tangent`` (L²-VSD Eq. 9, d_eps_first = (phi_{i+1} - phi_i) J_phi^T(x_t, t, c, y)).

    ``exact``: one ``torch.func.jvp`` (forward-mode; needs plain attention, see ``forward_ad``).
    ``finite_difference``: (eps_{phi + h v}(x_t) - eps_phi(x_t)) / h, one extra no-grad forward
    at fp32 LoRA parameters (``eps`` = eps_phi(x_t) when the caller has it already, else one more
    forward); h from ``finite_difference_step`` with ``relative_step`` (default by the network's
    dtype, ``FD_RELATIVE_STEP``). Error O(h ||v||^2) plus rounding, bounded against ``exact`` in
    tests/test_vsd_fd.py. Only the parameters named in ``tangent`` move (the others are held
    fixed), so a tangent restricted to the last layer is a product through that layer only.
    """
    if method not in JVP_METHODS:
        raise ValueError(f"jvp method must be one of {JVP_METHODS}, got {method!r}")
    primals, tangents = _tangent_primals(model, tangent)

    def eps_at(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (x_t, t, cond, camera), strict=False)

    if method == "exact":
        with torch.no_grad(), model.forward_ad():  # no reverse-mode graph: forward-mode only
            return jvp(eps_at, (primals,), (tangents,))
    with torch.no_grad():
        if eps is None:
            eps = eps_at(primals)
        if relative_step is None:
            relative_step = FD_RELATIVE_STEP.get(getattr(model, "base_dtype", x_t.dtype), 1e-3)
        h = finite_difference_step(primals, tangents, relative_step)
        if h == 0.0:
            return eps, torch.zeros_like(eps)
        moved = eps_at({n: primals[n] + h * tangents[n] for n in primals})
        return eps, (moved.to(torch.float32) - eps.to(torch.float32)).div_(h).to(eps.dtype)


#: A score model, or (Hydra ``_partial_: true``) a factory that builds one for the prior: it lives
#: in the prior's x0 space, diffuses with its schedule, and a LoRA builds on its UNet.
ScoreModelFactory = Callable[..., ScoreModel]


def build_score_model(score_model: ScoreModel | ScoreModelFactory, prior: Prior) -> ScoreModel:
    """``score_model(prior=prior)`` for a factory; a built model must already diffuse like the prior."""
    if not isinstance(score_model, ScoreModel):
        if isinstance(score_model, torch.nn.Module) or not callable(score_model):
            raise TypeError(f"score_model must be a ScoreModel or a factory of one (Hydra _partial_: true), "
                            f"got {type(score_model).__name__}")
        score_model = score_model(prior=prior)
        if not isinstance(score_model, ScoreModel):
            raise TypeError(f"the score_model factory returned a {type(score_model).__name__}, not a ScoreModel")
    ours, theirs = score_model.schedule.alphas_cumprod, prior.schedule.alphas_cumprod
    if ours.shape != theirs.shape or not torch.equal(ours, theirs.to(ours)):
        raise ValueError(f"{type(score_model).__name__} has another noise schedule than the prior: build it with "
                         "prior=... (or pass a factory) so that it diffuses exactly like the prior")
    return score_model


class VSDGuidance(Guidance):
    """Variational Score Distillation (ProlificDreamer): score model updated after theta (or jointly)."""

    loss_name = "vsd"
    allowed_orders: tuple[str, ...] = ("after", "joint")
    default_order: AuxiliaryOrder = "after"

    def __init__(self, prior: Prior, score_model: ScoreModel | ScoreModelFactory, guidance_scale: float = 7.5,
                 t_min: Any = 0.02, t_max: Any = 0.98, weighting: str = "sds", loss_weight: Any = 1.0,
                 update_order: AuxiliaryOrder | None = None, score_steps: int = 1,
                 score_optimizer: Mapping[str, Any] | None = None):
        super().__init__(prior, t_min=_plain(t_min), t_max=_plain(t_max), weighting=weighting,
                         loss_weight=_plain(loss_weight))
        order = update_order or type(self).default_order
        if order not in self.allowed_orders:
            raise ValueError(f"{type(self).__name__} supports update_order in {self.allowed_orders}, got {order!r}")
        score_model = build_score_model(score_model, prior)
        shape = tuple(prior.latent_shape)
        if score_model.sample_shape is not None and tuple(score_model.sample_shape) != shape:
            raise ValueError(f"score model expects samples of shape {tuple(score_model.sample_shape)} but the prior's "
                             f"x0 space is {shape}: size the score model from the prior config")
        self.guidance_scale = float(guidance_scale)
        self.score_model = score_model
        self.auxiliary = AuxiliaryModel(
            model=score_model, loss=self.score_loss,
            optimizer={**DEFAULT_SCORE_OPTIMIZER, **dict(_plain(score_optimizer) or {})},
            order=order, steps=score_steps, reuses_gradient=self._reuses_score_gradient() and order == "after",
            frozen_state_keys=frozenset(f"score_model.{k}" for k in score_model.frozen_state_keys()))

    def score_loss(self, inp: GuidanceInput) -> GuidanceOutput:
        """Denoising loss of the score model on the detached renders (Eq. 6), t ~ U[0, T)."""
        x0 = self.encode(inp).detach()  # shared with forward: one VAE pass per step
        cond, camera = self.score_condition(inp, x0)
        loss = self.score_model.loss(x0, cond, camera, inp.rng)
        return GuidanceOutput({"score": loss}, {})

    def _reuses_score_gradient(self) -> bool:
        """Whether the forward takes this step's score gradient (L²-VSD's lookahead, AuxiliaryModel)."""
        return False

    # --- the distillation gradient ---------------------------------------------------------------
    def score_condition(self, inp: GuidanceInput, like: Tensor) -> tuple[Tensor | None, Tensor]:
        """(the score model's text condition, camera embedding [N,16]) for the score model."""
        text_emb = None if inp.text_emb is None else inp.text_emb.to(like.device, like.dtype)
        cond = self.score_model.text_condition(text_emb, inp.prompts, self.prior)
        return cond, inp.cameras.embedding().to(like.device, like.dtype)

    def score_estimate(self, x_t: Tensor, t: Tensor, x0: Tensor, cond: Tensor | None, camera: Tensor,
                       inp: GuidanceInput) -> tuple[Tensor, Tensor | None]:
        """(eps_phi(x_t), lookahead correction or None); VSD and L-VSD use eps_phi as is."""
        with torch.no_grad():
            return self.score_model.predict_noise(x_t, t, cond, camera), None

    def forward(self, inp: GuidanceInput) -> GuidanceOutput:
        x0 = self.encode(inp)
        t, _, x_t = self.sample_noisy(x0.detach(), inp)
        cond, camera = self.score_condition(inp, x0)
        with torch.no_grad():
            eps_prior = self.prior.predict_noise(x_t, t, self.condition(inp), self.guidance_scale)
        eps_phi, correction = self.score_estimate(x_t, t, x0.detach(), cond, camera, inp)
        eps_hat = eps_phi if correction is None else eps_phi + correction
        with torch.no_grad():
            grad = expand_like(self.weight(t), x0) * (eps_prior - eps_hat.to(eps_prior.dtype))
        loss = distillation_loss(x0, grad) * self.loss_weight(inp.step)
        logs = {"grad_norm": _norm(grad), "t_mean": t.float().mean(), "eps_phi_norm": _norm(eps_phi)}
        if correction is not None:
            logs["delta_eps_norm"] = _norm(correction)  # L²-VSD Fig. 4: ||d_eps_first|| vs ||eps_phi||
        return GuidanceOutput({self.loss_name: loss}, logs)


class LVSDGuidance(VSDGuidance):
    """Lookahead VSD (§3.2): the score model takes its gamma steps on the renders *before* theta."""

    loss_name = "lvsd"
    allowed_orders = ("before",)
    default_order: AuxiliaryOrder = "before"


class L2VSDGuidance(VSDGuidance):
    """Linearized Lookahead VSD (§4.2, Eq. 10-12): eps_phi + J_phi(x_t) . (-eta grad_phi L_phi(x_t', t')).

    The paper, per prompt (one render, Eq. 7 and 9):

        phi_{i+1} = phi_i - 2 eta Delta_{phi_i},  Delta_{phi_i} := (eps_phi_i(x_t', t', c, y) - eps') J_phi_i(x_t', t', c, y)
        d_eps_first = -2 eta Delta_{phi_i} J_phi_i^T(x_t, t, c, y)

    where Delta is "exactly the gradient to update the LoRA model" (§4.2). Here that gradient is
    the one of the score model's per-item denoising loss l = mean over elements of
    (model output - target)^2 (ProlificDreamer / threestudio: ``mse_loss(reduction="mean")``),
    so the lookahead step is v = -eta grad_phi l: Eq. 7 with the paper's 2 eta Delta written
    as eta grad l (the 2 and the 1/D of the element mean are inside eta, whose range 1e-3..1,
    §5.4.1, is for that loss). With one render (N = 1) eps_hat is Eq. 9-12 exactly.

    An amortized batch of N renders (B prompts x V views) takes the lookahead on the item SUM:
    v = -eta grad_phi sum_n w_n l_n, the step an SGD update of the score model on the SUM of the
    per-render losses would take. Render n's correction is then J_phi(x_t^n) v = its own full
    Eq. 7-9 correction (-eta J(x_t^n) grad l_n, what it gets when alone) plus the cross terms
    -eta J(x_t^n) grad l_m, m != n (the other renders' lookahead seen through render n's
    Jacobian; for one prompt's V views these are that prompt's own other views). A mean over N
    would shrink each render's own term to 1/N of Eq. 7. In training the update-order executor
    hands over the gradient of its item MEAN (``self.auxiliary.handed``), which is reused, not
    recomputed, and scaled by the number of renders it averages here.
    """

    loss_name = "l2vsd"

    def __init__(self, prior: Prior, score_model: ScoreModel | ScoreModelFactory, eta: float = 1e-2,
                 last_layer_only: bool = False, jvp: str = "exact", fd_relative_step: float | None = None,
                 reuse_score_gradient: bool = True, **kwargs: Any):
        # reuse_score_gradient: the lookahead direction is the gradient of the score step taken after
        # theta (handed over by the executor: no extra backward). False: a draw of its own
        # (``lookahead_tangent``, one more backward), equal in distribution.
        self.reuse_score_gradient = bool(reuse_score_gradient)
        super().__init__(prior, score_model, **kwargs)
        if eta <= 0:
            raise ValueError(f"eta must be positive, got {eta}")
        if jvp not in JVP_METHODS:
            raise ValueError(f"jvp must be one of {JVP_METHODS}, got {jvp!r}")
        if fd_relative_step is not None and not fd_relative_step > 0:
            raise ValueError(f"fd_relative_step must be positive, got {fd_relative_step}")
        self.eta = float(eta)
        self.last_layer_only = bool(last_layer_only)
        self.jvp = jvp
        self.fd_relative_step = None if fd_relative_step is None else float(fd_relative_step)

    def _reuses_score_gradient(self) -> bool:
        return self.reuse_score_gradient

    def lookahead_tangent(self, x0: Tensor, cond: Tensor | None, camera: Tensor | None,
                          rng: torch.Generator | None) -> dict[str, Tensor]:
        """v = -eta * grad_phi sum_n l_n(phi; x_t'^n, t'^n) at a fresh (t', eps') draw (Eq. 7, summed
        over the renders, see the class docstring). ``torch.autograd.grad`` leaves ``.grad``
        untouched. Used when no gradient was handed over (standalone use of the guidance)."""
        params = self.score_model.trainable_parameters()
        names = self._tangent_names()
        with torch.enable_grad():
            loss = self.score_model.loss(x0.detach(), cond, camera, rng).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return self.tangent_from_gradient({n: g for n, g in zip(names, grads) if g is not None})

    def tangent_from_gradient(self, gradients: Mapping[str, Tensor], num_items: int = 1) -> dict[str, Tensor]:
        """-eta * num_items * gradient on the parameters entering the jvp (only the output layer
        with ``last_layer_only``; a parameter without gradient gets a zero tangent).

        ``num_items``: N when ``gradients`` is of the item-mean loss (the system's), which turns
        it into the gradient of the item sum; 1 when it already is of the sum."""
        params = self.score_model.trainable_parameters()
        scale = -self.eta * float(num_items)
        return {n: (scale * gradients[n].detach() if n in gradients else torch.zeros_like(params[n]))
                for n in self._tangent_names()}

    def _tangent_names(self) -> list[str]:
        params = self.score_model.trainable_parameters()
        return self.score_model.last_layer_names() if self.last_layer_only else list(params)

    def score_estimate(self, x_t: Tensor, t: Tensor, x0: Tensor, cond: Tensor | None, camera: Tensor,
                       inp: GuidanceInput) -> tuple[Tensor, Tensor | None]:
        # In training the executor hands over this step's score gradient of the item mean (it is
        # reused for the score step after theta, so the lookahead costs no extra backward pass).
        handed = self.auxiliary.handed
        if handed is not None:  # items: all ranks' renders under DDP
            tangent = self.tangent_from_gradient(handed.gradients, num_items=handed.items)
        else:
            tangent = self.lookahead_tangent(x0, cond, camera, inp.rng)
        # Both methods return eps_phi(x_t) too: the finite difference costs one forward more than VSD.
        return linearized_shift(self.score_model, tangent, x_t, t, cond, camera, method=self.jvp,
                                relative_step=self.fd_relative_step)
