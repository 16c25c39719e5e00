"""Trilinear interpolation of a vertex grid's feature planes by 1D gathers (a CPU-friendly ``grid_sample``)."""
from __future__ import annotations

import torch
from torch import Tensor


def lerp_planes(planes: Tensor, r: int, pos: Tensor) -> Tensor:
    """``planes`` [C, r^3] (vertex x + y r + z r^2 of each channel), ``pos`` [3, N] in vertex units -> [C, N].

    ``grid_sample(..., bilinear, padding_mode="border", align_corners=True)`` of the [C, r, r, r] volume at those
    positions, to float rounding. Per channel plane (a contiguous 1D vector) the 8 corners are 8 ``index_select``s
    of the cells' base index into views shifted by each corner's offset (a tight 1D loop), combined by 7 lerps over
    contiguous N-vectors; the base index and fractions are computed once for all channels. On the 2-core EPYCs 1.4-3x
    faster than grid_sample's 3D kernel, on session 12's Xeon 0.87x (docs/results.md).
    """
    pos = pos.clamp(0, r - 1)                                            # border padding
    cell = torch.clamp(pos.floor(), max=r - 2)
    frac = pos - cell
    index = cell.long()
    base = index[0] + index[1] * r + index[2] * (r * r)
    fx, fy, fz = frac[0], frac[1], frac[2]
    out = torch.empty(planes.shape[0], pos.shape[1], dtype=planes.dtype, device=planes.device)
    for ch in range(planes.shape[0]):
        plane = planes[ch]

        def at(offset: int) -> Tensor:
            return plane[offset:].index_select(0, base)

        y0 = torch.lerp(torch.lerp(at(0), at(1), fx), torch.lerp(at(r), at(r + 1), fx), fy)
        y1 = torch.lerp(torch.lerp(at(r * r), at(r * r + 1), fx), torch.lerp(at(r * r + r), at(r * r + r + 1), fx), fy)
        out[ch] = torch.lerp(y0, y1, fz)
    return out
