"""Classifier Score Distillation (Yu et al. 2023): distil only the implicit-classifier term of CFG.

    grad = scale * w(t) * (eps(x_t; y) - eps(x_t; ref)),   ref = the empty prompt or a negative prompt

eps(x_t; y) - eps(x_t; empty) = -sqrt(1 - abar_t) grad_x log p_t(y | x_t) is the direction that CFG
amplifies; SDS with CFG s is w(t) (eps_u - eps + s (eps_c - eps_u)), so CSD is SDS with its
denoising term eps_u - eps dropped (ScaleDreamer Tab. 1). With a negative prompt the reference
branch becomes eps(x_t; negative): the classifier of "y versus negative".
"""
from __future__ import annotations

from typing import Any

import torch

from amortized3d.guidance.base import (Guidance, GuidanceInput, GuidanceOutput, distillation_loss,
                                       expand_like)
from amortized3d.priors.base import Prior


class CSDGuidance(Guidance):
    def __init__(self, prior: Prior, scale: float = 1.0, negative_prompt: str | None = None,
                 t_min: Any = 0.02, t_max: Any = 0.98, weighting: str = "sds", loss_weight: Any = 1.0):
        super().__init__(prior, t_min=t_min, t_max=t_max, weighting=weighting, loss_weight=loss_weight)
        self.scale = float(scale)
        # An empty/blank negative prompt is the unconditional branch, i.e. plain CSD.
        self.negative_prompt = negative_prompt if negative_prompt and negative_prompt.strip() else None

    def reference_condition(self, inp: GuidanceInput) -> Any:
        """Condition of the subtracted branch: the negative prompt (with the view labels), if any."""
        return self.prior.camera_condition([self.negative_prompt] * len(inp.cameras), inp.cameras)

    @torch.no_grad()
    def classifier_direction(self, x_t: torch.Tensor, t: torch.Tensor, inp: GuidanceInput) -> torch.Tensor:
        """eps(x_t; y) - eps(x_t; empty or negative prompt), both branches in one batch-2N prior pass
        (as SDS's CFG), not two batch-N passes."""
        cond = self.condition(inp)
        if self.negative_prompt is None:
            eps_c, eps_ref = self.prior.cond_uncond_eps(x_t, t, cond)
        else:
            eps_c, eps_ref = self.prior.conditional_eps_pair(x_t, t, cond, self.reference_condition(inp))
        return eps_c - eps_ref

    def forward(self, inp: GuidanceInput) -> GuidanceOutput:
        x0 = self.prior.encode(inp.rgb)
        t, _, x_t = self.sample_noisy(x0.detach(), inp)
        delta = self.classifier_direction(x_t, t, inp)
        grad = (self.scale * expand_like(self.weight(t), x0) * delta).to(x0.dtype)
        loss = distillation_loss(x0, grad) * self.loss_weight(inp.step)
        return GuidanceOutput({"csd": loss}, {"grad_norm": grad.flatten(1).norm(dim=1).mean(),
                                             "t_mean": t.float().mean()})
