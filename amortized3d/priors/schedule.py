"""Discrete DDPM noise schedule (1000 steps), the conversions every guidance needs, and the two
per-item operations every prior and guidance shares: broadcasting one value per item
(:func:`per_item`) and classifier-free guidance mixing (:func:`cfg_mix`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def per_item(values: Tensor, like: Tensor) -> Tensor:
    """``values`` [N] (or a scalar) as [N, 1, ..., 1]: one value per item of ``like`` [N, ...]
    (abar_t, a loss weight w(t), a Perp-Neg weight), broadcastable against it. No dtype cast."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def cfg_mix(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in the diffusers convention, u + s (c - u): s = 1 is the conditional
    prediction, s = 0 the unconditional one. Linear, so it holds for eps and x0 predictions alike."""
    return uncond + scale * (cond - uncond)


class NoiseSchedule(nn.Module):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in {0..T-1}."""

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "NoiseSchedule":
        """Stable Diffusion's schedule (``beta_schedule="scaled_linear"``)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        return cls(torch.as_tensor(scheduler.alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        return per_item(self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype), like)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a = self._abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        a = self._abar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a = self._abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def eps_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        a = self._abar(t, x_t)
        return a.sqrt() * v + (1 - a).sqrt() * x_t
