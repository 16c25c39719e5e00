"""Deterministic DDIM steps, inversion and sampling on top of any ``Prior`` (prior-agnostic).

DDIM (Song et al. 2021, eta = 0) moves a sample between noise levels a -> b with one noise
prediction eps = eps_theta(x_a, a):

    x_b = sqrt(abar_b) * x0_hat + sqrt(1 - abar_b) * eps,   x0_hat = (x_a - sqrt(1 - abar_a) eps) / sqrt(abar_a)

which is forward Euler on the ODE d xbar / d sigma = eps (xbar = x / sqrt(abar), sigma =
sqrt((1 - abar) / abar); SDI thesis eq. 3.1-3.2). With b > a the same formula integrates the
ODE backwards ("DDIM inversion", images -> noise); b < a is ordinary sampling.

Conventions used throughout:
- A *path* is a long tensor [K+1, N] of integer timesteps, one column per item, so items may
  follow different schedules in lockstep; a repeated level (path[k] == path[k+1]) is an exact
  identity step, which pads shorter schedules. Steps where every item repeats skip the prior.
- Level 0 stands for the clean image (abar_0 = 0.99915 for Stable Diffusion): inversion starts
  by treating x0 as the sample at t = 0 and sampling ends there, so invert -> sample are exact
  mirror images and their round trip converges to the identity as steps are refined.
- Timestep -1 means abar = 1 exactly (fully clean; the ``set_alpha_to_one`` endpoint).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amortized3d.priors.base import Prior
from amortized3d.priors.schedule import NoiseSchedule, per_item


def abar_at(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> Tensor:
    """abar_t broadcastable against ``like`` (t [N] or scalar); t < 0 gives 1 (clean)."""
    t = torch.as_tensor(t, device=like.device).long().reshape(-1)
    a = schedule.alphas_cumprod.to(like.device)[t.clamp(min=0)]
    a = torch.where(t < 0, torch.ones_like(a), a).to(like.dtype)
    return per_item(a, like)


def ddim_step(x_t: Tensor, eps: Tensor, t: Tensor, t_next: Tensor, schedule: NoiseSchedule) -> Tensor:
    """One deterministic (eta = 0) DDIM move of ``x_t`` from level ``t`` to ``t_next`` (per item)."""
    a, a_next = abar_at(schedule, t, x_t), abar_at(schedule, t_next, x_t)
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps


def ddim_sigma(schedule: NoiseSchedule, t_lo: Tensor, t_hi: Tensor, like: Tensor) -> Tensor:
    """Std of DDPM/DDIM(eta=1) posterior noise between levels lo < hi (0 where lo == hi).

    sigma^2 = (1 - abar_lo) / (1 - abar_hi) * (1 - abar_hi / abar_lo): the per-step scale of
    SDI's "entropy term" 0.3 * sigma added after every inversion step (thesis §5.2).
    """
    a_lo, a_hi = abar_at(schedule, t_lo, like), abar_at(schedule, t_hi, like)
    var = (1 - a_lo) / (1 - a_hi).clamp_min(1e-12) * (1 - a_hi / a_lo)
    return var.clamp_min(0).sqrt()


def uniform_path(t_end: Tensor | int, num_steps: int, num_items: int | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """[num_steps+1, N] path 0 -> t_end (per item), rounded to integer timesteps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_end = torch.as_tensor(t_end, device=device).long().reshape(-1)
    if num_items is not None:
        t_end = t_end.expand(num_items)
    frac = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64, device=t_end.device)
    return torch.round(frac[:, None] * t_end[None, :].double()).long()


def _check_path(path: Tensor, n: int, num_train_timesteps: int) -> Tensor:
    if path.dim() == 1:
        path = path[:, None].expand(-1, n)
    if path.dim() != 2 or path.shape[1] != n or path.shape[0] < 1:
        raise ValueError(f"path must be [K+1, {n}] timesteps, got {tuple(path.shape)}")
    if (path >= num_train_timesteps).any() or (path < -1).any():
        raise ValueError(f"path timesteps must lie in [-1, {num_train_timesteps - 1}]")
    return path.long()


@torch.no_grad()
def ddim_invert_path(x0: Tensor, prior: Prior, cond: Any, path: Tensor, guidance_scale: float,
                     noise_scale: float = 0.0, rng: torch.Generator | None = None) -> Tensor:
    """Integrate DDIM from ``x0`` (level path[0]) up the non-decreasing ``path``; returns x at path[-1].

    eps is predicted at the lower end of each step with CFG ``guidance_scale`` (diffusers
    convention; SDI inverts with -7.5). ``noise_scale`` > 0 adds noise_scale * sigma(lo, hi) * z
    after each step (SDI's entropy term), drawn from ``rng``.
    """
    path = _check_path(path, x0.shape[0], prior.num_train_timesteps).to(x0.device)
    if (path[1:] < path[:-1]).any():
        raise ValueError("an inversion path must be non-decreasing in t")
    x = x0
    for lo, hi in zip(path[:-1], path[1:]):
        if bool((lo == hi).all()):
            continue
        eps = prior.predict_noise(x, lo.clamp(min=0), cond, guidance_scale)
        x = ddim_step(x, eps, lo, hi, prior.schedule)
        if noise_scale > 0:
            z = torch.randn(x.shape, generator=rng, dtype=x.dtype).to(x.device)
            x = x + noise_scale * ddim_sigma(prior.schedule, lo, hi, x) * z
    return x


@torch.no_grad()
def ddim_sample_path(x_t: Tensor, prior: Prior, cond: Any, path: Tensor, guidance_scale: float) -> Tensor:
    """Integrate DDIM from ``x_t`` (level path[0]) down the non-increasing ``path`` (eps at the upper end)."""
    path = _check_path(path, x_t.shape[0], prior.num_train_timesteps).to(x_t.device)
    if (path[1:] > path[:-1]).any():
        raise ValueError("a sampling path must be non-increasing in t")
    if (path[:-1] < 0).any():
        raise ValueError("only the last level of a sampling path may be -1 (clean)")
    x = x_t
    for hi, lo in zip(path[:-1], path[1:]):
        if bool((lo == hi).all()):
            continue
        eps = prior.predict_noise(x, hi, cond, guidance_scale)
        x = ddim_step(x, eps, hi, lo, prior.schedule)
    return x


def ddim_invert(x0: Tensor, prior: Prior, cond: Any, t_end: Tensor | int, num_steps: int,
                guidance_scale: float, noise_scale: float = 0.0,
                rng: torch.Generator | None = None) -> Tensor:
    """DDIM inversion of ``x0`` (as level 0) to ``t_end`` ([N] or int) in ``num_steps`` uniform steps."""
    path = uniform_path(t_end, num_steps, x0.shape[0], x0.device)
    return ddim_invert_path(x0, prior, cond, path, guidance_scale, noise_scale, rng)


def ddim_sample(x_t: Tensor, prior: Prior, cond: Any, t_start: Tensor | int, num_steps: int,
                guidance_scale: float) -> Tensor:
    """DDIM sampling from ``x_t`` at ``t_start`` ([N] or int) down to level 0 in ``num_steps`` steps."""
    path = uniform_path(t_start, num_steps, x_t.shape[0], x_t.device).flip(0)
    return ddim_sample_path(x_t, prior, cond, path, guidance_scale)
