"""Asynchronous Score Distillation (ScaleDreamer, Ma et al. 2024, §3, Eq. 4 and Alg. 1).

    grad = w(t) (eps_pre(x_t; t, y, CFG s) - eps_pre(x_{t+dt}; t+dt, y)),
    x_t = sqrt(abar_t) x + sqrt(1-abar_t) eps,  x_{t+dt} = sqrt(abar_{t+dt}) x + sqrt(1-abar_{t+dt}) eps

with ONE noise sample eps shared by both levels (Alg. 1, line 6). The frozen prior at the
later level t+dt stands in for VSD's fine-tuned score of the renders: a pretrained model's
noise-prediction error ||eps_pre(x_t; t) - eps||^2 falls as t grows (Eq. 3), as a fine-tuned
model's would at fixed t (Eq. 2), so no second network is trained.

dt ~ U[0, eta (t - t_min)] per item (§3.2; ``delta_t_mode: fixed`` is the deterministic ablation
dt = eta (t - t_min) of §4.3/Tab. 4), where t_min is the *current* lower end of the annealed
range (as in the public code), truncated to an integer and clamped so t+dt <= T-1.

The shifted branch is the *conditional* prediction alone (``shifted_guidance_scale`` 1, the
prior's convention): with Perp-Neg on, its negatives enter only the CFG-7.5 branch, never
eps_pre(x_{t+dt}; t+dt, y).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from amortized3d.guidance.base import (Guidance, GuidanceInput, GuidanceOutput, distillation_loss,
                                       expand_like)
from amortized3d.priors.base import Prior
from amortized3d.schedules import Scheduled


@dataclass
class ASDNoisyPair:
    """The two noisy views of one render sharing one noise sample."""

    t: Tensor  # [N] long
    t_plus: Tensor  # [N] long, t + dt clamped to T-1
    noise: Tensor  # the shared eps
    x_t: Tensor
    x_t_plus: Tensor

    @property
    def delta_t(self) -> Tensor:
        return self.t_plus - self.t


class ASDGuidance(Guidance):
    def __init__(self, prior: Prior, guidance_scale: float = 7.5, shifted_guidance_scale: float = 1.0,
                 eta: Any = 0.1, delta_t_mode: Literal["random", "fixed"] = "random",
                 t_min: Any = 0.02, t_max: Any = 0.98, weighting: str = "sds", loss_weight: Any = 1.0):
        super().__init__(prior, t_min=t_min, t_max=t_max, weighting=weighting, loss_weight=loss_weight)
        if delta_t_mode not in ("random", "fixed"):
            raise ValueError(f"delta_t_mode must be 'random' or 'fixed', got {delta_t_mode!r}")
        # eta may be a schedule ([[step, value], ...]) like the t range: a large dt makes the
        # shifted branch approach pure noise, i.e. ASD approaches SDS (eps(x_{t+dt}) -> eps).
        self.eta = Scheduled.parse(eta)
        if any(v < 0 for _, v in self.eta.milestones):
            raise ValueError(f"eta must be >= 0 at every milestone, got {eta}")
        self.guidance_scale = float(guidance_scale)
        self.shifted_guidance_scale = float(shifted_guidance_scale)
        self.delta_t_mode = delta_t_mode

    def sample_delta_t(self, t: Tensor, step: int, rng: torch.Generator | None) -> Tensor:
        """dt [N] long: U[0, eta (t - t_min)] (random) or eta (t - t_min) (fixed), floored."""
        lo, _ = self.timesteps.range(step)
        span = self.eta(step) * (t - lo).clamp(min=0).double()
        if self.delta_t_mode == "random":
            span = span * torch.rand(t.shape, generator=rng, dtype=torch.float64).to(t.device)
        return span.floor().long()

    def noisy_pair(self, x0: Tensor, inp: GuidanceInput) -> ASDNoisyPair:
        """Draw t, the shared noise and dt (in that order from ``inp.generator``) and diffuse x0 twice."""
        t, noise, x_t = self.sample_noisy(x0, inp)
        dt = self.sample_delta_t(t, inp.step, inp.rng)
        t_plus = (t + dt).clamp(max=self.prior.num_train_timesteps - 1)
        return ASDNoisyPair(t, t_plus, noise, x_t, self.prior.schedule.add_noise(x0, noise, t_plus))

    def forward(self, inp: GuidanceInput) -> GuidanceOutput:
        x0 = self.prior.encode(inp.rgb)
        pair = self.noisy_pair(x0.detach(), inp)
        with torch.no_grad():
            cond = self.condition(inp)
            eps = self.prior.predict_noise(pair.x_t, pair.t, cond, self.guidance_scale)
            eps_shift = self.prior.predict_noise(pair.x_t_plus, pair.t_plus, cond, self.shifted_guidance_scale)
            grad = (expand_like(self.weight(pair.t), x0) * (eps - eps_shift)).to(x0.dtype)
        loss = distillation_loss(x0, grad) * self.loss_weight(inp.step)
        return GuidanceOutput({"asd": loss}, {"grad_norm": grad.flatten(1).norm(dim=1).mean(),
                                             "t_mean": pair.t.float().mean(),
                                             "delta_t_mean": pair.delta_t.float().mean()})
