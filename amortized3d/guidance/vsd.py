"""The VSD family: VSD (ProlificDreamer), L-VSD and L²-VSD (Linearized Lookahead VSD).

All three update the generator with (L²-VSD paper Eq. 5 / 8 / 11; ProlificDreamer Eq. 9)

    grad_x0 = w(t) (eps_pretrain(x_t; y, CFG s) - eps_hat(x_t; y, c)),   x_t = sqrt(a) x0 + sqrt(1-a) eps,

and train a score model eps_phi on the detached renders with the denoising loss (Eq. 2/6).
They differ only in eps_hat and in *when* phi is updated relative to theta:

- VSD:    eps_hat = eps_phi_i;        phi updated after theta (ProlificDreamer Alg. 1) or jointly
          in the same backward (threestudio).
- L-VSD:  eps_hat = eps_phi_{i+1};    phi updated gamma times *before* theta (§3.2, Eq. 7-8).
- L²-VSD: eps_hat = eps_phi_i + d_eps, d_eps = J_phi(x_t) . (-eta grad_phi L_phi(x_t', t')), the
          first-order part of L-VSD's lookahead (Eq. 9-12), one forward-mode product; phi is
          then updated as in VSD. Optionally only the output layer enters (§5.4.2).

The score model lives in the prior's x0 space and is conditioned on the text embedding and the
camera (c2w, 16 numbers); it is queried with CFG 1, i.e. conditional only (ProlificDreamer).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.func import functional_call, jvp

from amortized3d.guidance.base import (Guidance, GuidanceInput, GuidanceOutput, UpdateOrder, distillation_loss,
                                       expand_like)
from amortized3d.priors.base import Prior
from amortized3d.priors.score_models import ScoreModel

DEFAULT_SCORE_OPTIMIZER = {"name": "adamw", "lr": 1e-4}  # ProlificDreamer App. F: LoRA lr 1e-4


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _norm(x: Tensor) -> Tensor:
    return x.detach().flatten(1).norm(dim=1).mean()


def linearized_shift(model: ScoreModel, tangent: Mapping[str, Tensor], x_t: Tensor, t: Tensor,
                     cond: Tensor | None, camera: Tensor | None) -> tuple[Tensor, Tensor]:
    """(eps_phi(x_t), J_phi(x_t) . tangent): one ``torch.func.jvp`` through the score model.

    Only the parameters named in ``tangent`` are differentiated (the others are held fixed), so a
    tangent restricted to the last layer costs a forward-mode product through that layer only.
    """
    params = model.trainable_parameters()
    unknown = sorted(set(tangent) - set(params))
    if unknown:
        raise KeyError(f"tangent names {unknown} are not trainable parameters of {type(model).__name__}")
    primals = {n: params[n].detach() for n in tangent}
    tangents = {n: tangent[n].detach().to(primals[n]) for n in tangent}

    def eps(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (x_t, t, cond, camera), strict=False)

    with torch.no_grad(), model.forward_ad():  # no reverse-mode graph: forward-mode only
        return jvp(eps, (primals,), (tangents,))


class VSDGuidance(Guidance):
    """Variational Score Distillation (ProlificDreamer): score model updated after theta (or jointly)."""

    loss_name = "vsd"
    allowed_orders: tuple[str, ...] = ("after", "joint")
    update_order: UpdateOrder = "after"

    def __init__(self, prior: Prior, score_model: ScoreModel, guidance_scale: float = 7.5, t_min: Any = 0.02,
                 t_max: Any = 0.98, weighting: str = "sds", loss_weight: Any = 1.0,
                 update_order: UpdateOrder | None = None, score_steps: int = 1,
                 score_optimizer: Mapping[str, Any] | None = None):
        super().__init__(prior, t_min=_plain(t_min), t_max=_plain(t_max), weighting=weighting,
                         loss_weight=_plain(loss_weight))
        order = update_order or type(self).update_order
        if order not in self.allowed_orders:
            raise ValueError(f"{type(self).__name__} supports update_order in {self.allowed_orders}, got {order!r}")
        if int(score_steps) < 1:
            raise ValueError(f"score_steps must be >= 1, got {score_steps}")
        if order == "joint" and int(score_steps) != 1:
            raise ValueError("update_order 'joint' trains the score model once per step (in the same backward); "
                             f"score_steps={score_steps} needs 'after' or 'before'")
        if not isinstance(score_model, ScoreModel):
            raise TypeError(f"score_model must be a ScoreModel, got {type(score_model).__name__}")
        shape = tuple(prior.latent_shape)
        if score_model.sample_shape is not None and tuple(score_model.sample_shape) != shape:
            raise ValueError(f"score model expects samples of shape {tuple(score_model.sample_shape)} but the prior's "
                             f"x0 space is {shape}: size the score model from the prior config")
        self.update_order = order
        self.score_steps = int(score_steps)
        self.guidance_scale = float(guidance_scale)
        self.score_model = score_model
        score_model.bind_prior(prior)  # shares the schedule (a LoRA also builds on the prior's UNet)
        self.score_optimizer = {**DEFAULT_SCORE_OPTIMIZER, **dict(_plain(score_optimizer) or {})}

    # --- hooks used by the system ----------------------------------------------------------------
    def auxiliary_parameter_groups(self) -> list[dict]:
        return [{"name": "score_model", "params": list(self.score_model.trainable_parameters().values())}]

    def auxiliary_optimizer_config(self) -> dict:
        return dict(self.score_optimizer)

    def auxiliary_gradients(self) -> dict[str, Tensor]:
        return {n: (torch.zeros_like(p) if p.grad is None else p.grad)
                for n, p in self.score_model.trainable_parameters().items()}

    def frozen_state_keys(self) -> set[str]:
        return {f"score_model.{k}" for k in self.score_model.frozen_state_keys()}

    def auxiliary_loss(self, inp: GuidanceInput) -> GuidanceOutput:
        """Denoising loss of the score model on the detached renders (Eq. 6), t ~ U[0, T)."""
        with torch.no_grad():
            x0 = self.prior.encode(inp.rgb.detach())
        cond, camera = self.score_condition(inp, x0)
        loss = self.score_model.loss(x0, cond, camera, inp.generator)
        return GuidanceOutput({"score": loss}, {})

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
        x0 = self.prior.encode(inp.rgb)
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
    update_order: UpdateOrder = "before"


class L2VSDGuidance(VSDGuidance):
    """Linearized Lookahead VSD (§4.2, Eq. 11-12): eps_phi + J_phi(x_t) . (-eta grad_phi L_phi(x_t', t'))."""

    loss_name = "l2vsd"
    wants_auxiliary_gradient = True

    def __init__(self, prior: Prior, score_model: ScoreModel, eta: float = 1e-2, last_layer_only: bool = False,
                 **kwargs: Any):
        super().__init__(prior, score_model, **kwargs)
        if eta <= 0:
            raise ValueError(f"eta must be positive, got {eta}")
        self.eta = float(eta)
        self.last_layer_only = bool(last_layer_only)

    def lookahead_tangent(self, x0: Tensor, cond: Tensor | None, camera: Tensor | None,
                          generator: torch.Generator | None) -> dict[str, Tensor]:
        """-eta * grad_phi of the score model's batch-mean loss at a fresh (t', eps') draw.

        This is exactly one plain SGD step of size eta (Eq. 7; our loss is a mean, so the paper's
        factor 2 is inside eta). ``torch.autograd.grad`` leaves ``.grad`` untouched. Used when the
        system has not already computed this step's score gradient (standalone use, the 2D toy).
        """
        params = self.score_model.trainable_parameters()
        names = self._tangent_names()
        with torch.enable_grad():
            loss = self.score_model.loss(x0.detach(), cond, camera, generator).mean()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return self.tangent_from_gradient({n: g for n, g in zip(names, grads) if g is not None})

    def tangent_from_gradient(self, gradients: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """-eta * gradient on the parameters entering the jvp (only the output layer with
        ``last_layer_only``; a parameter without gradient gets a zero tangent)."""
        params = self.score_model.trainable_parameters()
        return {n: (-self.eta * gradients[n].detach() if n in gradients else torch.zeros_like(params[n]))
                for n in self._tangent_names()}

    def _tangent_names(self) -> list[str]:
        params = self.score_model.trainable_parameters()
        return self.score_model.last_layer_names() if self.last_layer_only else list(params)

    def score_estimate(self, x_t: Tensor, t: Tensor, x0: Tensor, cond: Tensor | None, camera: Tensor,
                       inp: GuidanceInput) -> tuple[Tensor, Tensor | None]:
        # In training the system hands over this step's score gradient (it is reused for the
        # score step after theta, so the lookahead costs one jvp and no extra backward pass).
        if inp.auxiliary_gradients is not None:
            tangent = self.tangent_from_gradient(inp.auxiliary_gradients)
        else:
            tangent = self.lookahead_tangent(x0, cond, camera, inp.generator)
        return linearized_shift(self.score_model, tangent, x_t, t, cond, camera)
