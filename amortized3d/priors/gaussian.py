"""An exact Gaussian prior: data ~ N(mu_y, Sigma_y) per prompt, closed-form noise prediction.

For x_t = sqrt(a) x0 + sqrt(1-a) eps with x0 ~ N(mu, Sigma), x_t ~ N(sqrt(a) mu, C_t) with
C_t = a Sigma + (1-a) I, so the exact (MMSE) noise prediction is
eps_hat = sqrt(1-a) C_t^{-1} (x_t - sqrt(a) mu). Used by the 2D toy experiments of the
L²-VSD paper (appendix F) and by tests that need a prior whose answers are known.
Images are flattened: x has shape [N, D] or [N, C, H, W] with C*H*W = D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from amortized3d.priors.base import Prior
from amortized3d.priors.schedule import NoiseSchedule, cfg_mix, per_item


@dataclass
class GaussianCondition:
    component_ids: Tensor  # [N] index into the prior's components; -1 = unconditional

    def __len__(self) -> int:
        return int(self.component_ids.shape[0])


class GaussianPrior(Prior):
    """Components k = 0..K-1 (one per prompt) plus an unconditional Gaussian."""

    def __init__(self, means: Tensor, covariances: Tensor, prompts: Sequence[str],
                 uncond_mean: Tensor | None = None, uncond_covariance: Tensor | None = None,
                 schedule: NoiseSchedule | None = None, shape: tuple[int, ...] | None = None):
        super().__init__()
        means, covs = means.double(), covariances.double()
        if means.dim() != 2 or covs.shape != (*means.shape, means.shape[1]):
            raise ValueError(f"means [K,D] and covariances [K,D,D] expected, got {tuple(means.shape)}, "
                             f"{tuple(covs.shape)}")
        if len(prompts) != means.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {means.shape[0]} components")
        self.prompts = list(prompts)
        um = means.mean(0) if uncond_mean is None else uncond_mean.double()
        uc = covs.mean(0) if uncond_covariance is None else uncond_covariance.double()
        self.register_buffer("means", torch.cat([means, um[None]]), persistent=False)
        self.register_buffer("covariances", torch.cat([covs, uc[None]]), persistent=False)
        self.schedule = schedule if schedule is not None else NoiseSchedule.scaled_linear()
        self.dim = int(means.shape[1])
        self._shape = tuple(shape) if shape is not None else (self.dim,)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._shape

    def encode(self, rgb: Tensor) -> Tensor:
        return rgb

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def text_condition(self, prompts: Sequence[str], view_labels: Sequence[str] | None = None) -> GaussianCondition:
        index = {p: i for i, p in enumerate(self.prompts)}
        unknown = [p for p in prompts if p and p not in index]
        if unknown:
            raise ValueError(f"prompts {unknown} are not components of this Gaussian prior; valid: {self.prompts}")
        return GaussianCondition(torch.tensor([index[p] if p else -1 for p in prompts], dtype=torch.long))

    def _component(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        ids = torch.where(ids < 0, torch.full_like(ids, len(self.prompts)), ids).to(self.means.device)
        return self.means[ids], self.covariances[ids]

    def marginal(self, t: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Mean [N,D] and covariance [N,D,D] of x_t for components ``ids``."""
        mu, cov = self._component(ids)
        a = per_item(self.schedule.alphas_cumprod.to(mu.device).double()[t.long().to(mu.device)], mu)
        eye = torch.eye(self.dim, dtype=mu.dtype, device=mu.device)
        return a.sqrt() * mu, a[..., None] * cov + (1 - a)[..., None] * eye

    def eps_exact(self, x_t: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        shape, dtype = x_t.shape, x_t.dtype
        x = x_t.reshape(shape[0], -1).double()
        mean, cov = self.marginal(t, ids)
        a = per_item(self.schedule.alphas_cumprod.to(x.device).double()[t.long().to(x.device)], x)
        eps = (1 - a).sqrt() * torch.linalg.solve(cov, (x - mean)[..., None])[..., 0]
        return eps.to(dtype).reshape(shape)

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: GaussianCondition, guidance_scale: float) -> Tensor:
        ids = cond.component_ids.to(x_t.device)
        if guidance_scale == 1.0:
            return self.eps_exact(x_t, t, ids)
        eps_u = self.eps_exact(x_t, t, torch.full_like(ids, -1))
        if guidance_scale == 0.0:
            return eps_u
        return cfg_mix(eps_u, self.eps_exact(x_t, t, ids), guidance_scale)

    def score(self, x_t: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        """grad log p_t(x_t) = -eps_hat / sqrt(1 - abar_t)."""
        a = per_item(self.schedule.alphas_cumprod.to(x_t.device)[t.long()], x_t)
        return -self.eps_exact(x_t, t, ids) / (1 - a).sqrt().to(x_t.dtype)
