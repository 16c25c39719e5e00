"""Geometry -> volume density, alpha compositing, and finite-difference geometry gradients.

VolSDF turns a signed distance into a density with a Laplace CDF so that an SDF generator
can be trained by volume rendering; NeRF-style fields emit a raw density that only needs a
positive activation. Both then share the same quadrature (:func:`composite_weights`).
"""
from __future__ import annotations

import torch
from torch import Tensor

DENSITY_ACTIVATIONS: tuple[str, ...] = ("softplus", "trunc_exp")


def volsdf_density(sdf: Tensor, inv_std: float) -> Tensor:
    """VolSDF density ``sigma = (1/beta) * Psi_beta(-sdf)`` with ``beta = 1/inv_std``.

    ``Psi_beta`` is the CDF of a zero-mean Laplace distribution with scale ``beta``; the
    density therefore rises from ~0 outside, through ``0.5/beta`` on the surface, to ``1/beta``
    inside. Written with ``exp(-|s|/beta)`` so neither branch of ``torch.where`` can overflow
    (an overflowing unused branch would still poison the gradient with NaN).
    """
    half_tail = 0.5 * torch.exp(sdf.abs() * -inv_std)
    psi = torch.where(sdf >= 0, half_tail, 1.0 - half_tail)  # Psi_beta(-sdf)
    return inv_std * psi


class _TruncExp(torch.autograd.Function):
    """``exp`` whose forward and backward are clamped, as in torch-ngp / instant-nsr.

    Hash-grid density heads emit large raw values early in training; an unclamped exp
    produces inf densities and NaN gradients (inf * 0) in compositing.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=15.0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(min=-15.0, max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


def nerf_density(raw: Tensor, activation: str = "softplus") -> Tensor:
    """Non-negative density from a raw field output."""
    if activation == "softplus":
        return torch.nn.functional.softplus(raw)
    if activation == "trunc_exp":
        return trunc_exp(raw)
    raise ValueError(f"unknown density activation {activation!r}; expected one of {DENSITY_ACTIVATIONS}")


def sample_deltas(t: Tensor, far: float) -> Tensor:
    """Interval lengths ``t[i+1] - t[i]``; the last sample's interval runs to ``far``.

    Sample ``i`` stands for the interval that starts at it (left Riemann sum). Ending the
    last interval at ``far`` instead of NeRF's 1e10 keeps a faint far-away density from
    turning the whole ray opaque, which matters when a background is composited behind.
    """
    last = (far - t[..., -1:]).clamp(min=0.0)
    return torch.cat([t[..., 1:] - t[..., :-1], last], dim=-1)


def composite_weights(sigma: Tensor, t: Tensor, far: float) -> tuple[Tensor, Tensor]:
    """Per-sample rendering weights and transmittance for sorted samples ``t`` [..., S].

    ``T_i = exp(-sum_{j<i} sigma_j delta_j)`` via an exclusive cumulative sum (stabler than a
    cumulative product of ``1 - alpha`` and free of in-place ops); ``w_i = T_i * alpha_i``.
    """
    tau = sigma * sample_deltas(t, far)
    alpha = -torch.expm1(-tau)  # 1 - exp(-tau), accurate for the many tiny tau of empty space
    accumulated = torch.cumsum(tau, dim=-1) - tau  # exclusive: optical depth before sample i
    transmittance = torch.exp(-accumulated)
    return transmittance * alpha, transmittance


def central_difference_points(points: Tensor, eps: float) -> Tensor:
    """The 6-point central-difference stencil around ``points`` [B,M,3] -> [B,6M,3].

    Order: (+x, -x, +y, -y, +z, -z) blocks of M points each, so one ``field.query`` call
    evaluates the whole stencil together with the samples themselves.
    """
    offsets = eps * torch.cat([torch.eye(3, device=points.device, dtype=points.dtype),
                               -torch.eye(3, device=points.device, dtype=points.dtype)], dim=-1)
    offsets = offsets.reshape(6, 3)  # rows: +x, -x, +y, -y, +z, -z
    stencil = points[:, None, :, :] + offsets[None, :, None, :]
    return stencil.reshape(points.shape[0], 6 * points.shape[1], 3)


def central_difference_gradient(stencil_values: Tensor, eps: float) -> Tensor:
    """Gradient [B,M,3] from geometry values on :func:`central_difference_points` [B,6M]."""
    b = stencil_values.shape[0]
    v = stencil_values.reshape(b, 3, 2, -1)  # [B, axis, (+,-), M]
    grad = (v[:, :, 0] - v[:, :, 1]) / (2.0 * eps)
    return grad.permute(0, 2, 1)
