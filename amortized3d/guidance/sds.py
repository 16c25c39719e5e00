"""Score Distillation Sampling (DreamFusion): grad = w(t) (eps_cfg(x_t) - eps)."""
from __future__ import annotations

from typing import Any

import torch

from amortized3d.guidance.base import (Guidance, GuidanceInput, GuidanceOutput, distillation_loss,
                                       expand_like)
from amortized3d.priors.base import Prior


class SDSGuidance(Guidance):
    def __init__(self, prior: Prior, guidance_scale: float = 100.0, t_min: Any = 0.02, t_max: Any = 0.98,
                 weighting: str = "sds", loss_weight: Any = 1.0):
        super().__init__(prior, t_min=t_min, t_max=t_max, weighting=weighting, loss_weight=loss_weight)
        self.guidance_scale = guidance_scale

    def forward(self, inp: GuidanceInput) -> GuidanceOutput:
        x0 = self.prior.encode(inp.rgb)
        t, noise, x_t = self.sample_noisy(x0.detach(), inp)
        with torch.no_grad():
            eps = self.prior.predict_noise(x_t, t, self.condition(inp), self.guidance_scale)
            grad = expand_like(self.weight(t), x0) * (eps - noise)
        loss = distillation_loss(x0, grad) * self.loss_weight(inp.step)
        return GuidanceOutput({"sds": loss}, {"grad_norm": grad.flatten(1).norm(dim=1).mean(),
                                             "t_mean": t.float().mean()})
