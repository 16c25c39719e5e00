"""Geometry regularizers computed inside the render, one unweighted value per field.

They are reduced per field (``[B]``) rather than to a scalar so that the system can weight,
schedule and log them per prompt; the loss weights (e.g. sparsity 20, eikonal 100 -> 1) live
in the system config, not here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

REGULARIZERS: tuple[str, ...] = ("sparsity", "opaque", "eikonal")


def check_regularizer_names(names: tuple[str, ...], field_kind: str) -> None:
    unknown = [n for n in names if n not in REGULARIZERS]
    if unknown:
        raise ValueError(f"unknown regularizers {unknown}; available: {REGULARIZERS}")
    if "eikonal" in names and field_kind != "sdf":
        raise ValueError("the eikonal regularizer needs an SDF field (field.kind == 'sdf'), "
                         f"got kind {field_kind!r}")


def sparsity(opacity: Tensor) -> Tensor:
    """Mean over each field's rays of ``sqrt(opacity^2 + 0.01)``, ``[B,R] -> [B]``.

    A smooth L1 on opacity: it pushes empty space to stay empty without the infinite slope
    of ``|opacity|`` at zero.
    """
    return torch.sqrt(opacity.square() + 0.01).mean(dim=-1)


def opaque(opacity: Tensor, eps: float = 1e-4) -> Tensor:
    """Mean binary entropy (nats) of the clamped opacity, ``[B,R] -> [B]``.

    Zero for opacities of exactly 0 or 1, ``log 2`` at 0.5: minimising it removes
    semi-transparent haze. The clamp keeps ``log`` finite and its gradient bounded.
    """
    o = opacity.clamp(eps, 1.0 - eps)
    entropy = -(o * torch.log(o) + (1.0 - o) * torch.log1p(-o))
    return entropy.mean(dim=-1)


MAX_OPAQUE: float = math.log(2.0)  # the largest value :func:`opaque` can take


def eikonal_residuals(gradient: Tensor) -> Tensor:
    """Per-sample ``(||grad sdf|| - 1)^2``, ``[B,M,3] -> [B,M]``.

    The renderer averages these plainly (unweighted) over all final samples of a field, as
    VolSDF/NeuS/threestudio do: the SDF must be a distance in empty space too, otherwise the
    Laplace density of far-away points is meaningless.
    """
    # sqrt(. + tiny) instead of .norm(): a zero gradient (flat field) must not give NaN grads.
    length = torch.sqrt(gradient.square().sum(dim=-1) + 1e-12)
    return (length - 1.0).square()
