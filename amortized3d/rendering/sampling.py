"""Sample placement along rays: stratified proposals and inverse-CDF importance samples.

Randomness always comes from an optional ``torch.Generator`` so that a seeded training step
is reproducible; draws are made on the generator's own device and then moved, which lets a
CPU generator drive a CUDA render.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform(shape: tuple[int, ...], *, rng: torch.Generator | None, device: torch.device,
            dtype: torch.dtype) -> Tensor:
    """U[0,1) draws of ``shape`` from ``rng`` (global RNG when None), on ``device``."""
    source = rng.device if rng is not None else device
    return torch.rand(shape, generator=rng, device=source, dtype=dtype).to(device)


def stratified_samples(batch_shape: tuple[int, ...], num_samples: int, near: float | Tensor, far: float | Tensor, *,
                       jitter: bool, rng: torch.Generator | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """One sample per equal bin of [near, far], sorted, shape ``batch_shape + (num_samples,)``.

    With ``jitter`` each sample is uniform inside its bin (unbiased quadrature for training);
    without it the sample is the bin midpoint, so evaluation renders are deterministic.
    """
    device = torch.device(device)
    # near/far are scalars or per-ray tensors [..., 1] (e.g. a bounding-sphere intersection).
    width = (far - near) / num_samples
    lower = near + width * torch.arange(num_samples, device=device, dtype=dtype)
    shape = (*batch_shape, num_samples)
    if jitter:
        offset = uniform(shape, rng=rng, device=device, dtype=dtype)
    else:
        offset = torch.full(shape, 0.5, device=device, dtype=dtype)
    return lower + width * offset


def blur_weights(weights: Tensor) -> Tensor:
    """Max-then-average blur over neighbouring intervals (mip-NeRF 360's proposal filter).

    With a sharp surface all proposal weight lands on the first interval *behind* the
    surface; spreading it to the neighbours makes the importance samples straddle the
    surface instead of only trailing it.
    """
    padded = F.pad(weights, (1, 1))
    pair_max = torch.maximum(padded[..., :-1], padded[..., 1:])
    return 0.5 * (pair_max[..., :-1] + pair_max[..., 1:])


def sample_pdf(bins: Tensor, weights: Tensor, num_samples: int, *, deterministic: bool,
               rng: torch.Generator | None = None, blur: bool = True,
               padding: float = 1e-5) -> Tensor:
    """Inverse-CDF samples from the piecewise-constant pdf ``weights`` [..., S] on ``bins`` [..., S+1].

    ``padding`` keeps the pdf defined on empty rays (it degrades to uniform there).
    ``deterministic`` uses evenly spaced quantiles instead of random ones. Not differentiable
    by design: callers run it under ``torch.no_grad()``.
    """
    w = blur_weights(weights) if blur else weights
    w = w + padding
    pdf = w / w.sum(dim=-1, keepdim=True)
    cdf = torch.cumsum(pdf, dim=-1).clamp(max=1.0)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], dim=-1)  # [..., S+1]
    shape = (*cdf.shape[:-1], num_samples)
    if deterministic:
        u = (torch.arange(num_samples, device=cdf.device, dtype=cdf.dtype) + 0.5) / num_samples
        u = u.expand(shape).contiguous()
    else:
        u = uniform(shape, rng=rng, device=cdf.device, dtype=cdf.dtype)
    cdf = cdf.contiguous()
    idx = torch.searchsorted(cdf, u, right=True)
    last = cdf.shape[-1] - 1
    below = (idx - 1).clamp(min=0, max=last)
    above = idx.clamp(max=last)
    cdf_lo, cdf_hi = torch.gather(cdf, -1, below), torch.gather(cdf, -1, above)
    bin_lo, bin_hi = torch.gather(bins, -1, below), torch.gather(bins, -1, above)
    span = cdf_hi - cdf_lo
    frac = torch.where(span > 1e-8, (u - cdf_lo) / span.clamp(min=1e-8), torch.zeros_like(u))
    return bin_lo + frac * (bin_hi - bin_lo)
