"""Trilinear interpolation of a vertex grid's feature planes by 1D gathers (a CPU-friendly ``grid_sample``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lerp_planes(planes: Tensor, r: int, pos: Tensor) -> Tensor:
    """``planes`` [C, r^3] (vertex x + y r + z r^2 of each channel), ``pos`` [3, N] in vertex units -> [C, N].

    ``grid_sample(..., bilinear, padding_mode="border", align_corners=True)`` of the [C, r, r, r] volume at those
    positions, to float rounding. Per channel plane (a contiguous 1D vector) the 8 corners are 8 ``index_select``s
    of the cells' base index into views shifted by each corner's offset (a tight 1D loop), combined by 7 lerps over
    contiguous N-vectors; the base index and fractions are computed once for all channels. On the 2-core EPYCs 1.4-3x
    faster than grid_sample's 3D kernel in one batch (one core), on session 12's Xeon 0.87x; on par with
    :func:`grid_sample_points` on all cores (docs/results.md, sessions 14 and 17).
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


def grid_sample_points(volume: Tensor, coords: Tensor, batches: int = 1) -> Tensor:
    """``grid_sample(volume [1, C, D, H, W], coords [M, 3] in [-1, 1], bilinear, border, align_corners=True)``
    -> [M, C], the points split into ``batches`` batches of the same (expanded, not copied) volume.

    Why: on CPU grid_sample's 3D kernel runs its batch dimension in parallel and each batch's points in one
    serial loop, so one batch of all points runs on one core. Every point's value is computed by the same
    arithmetic in any batch, so the result is bit-equal for every ``batches`` (tests/test_encodings.py); the
    ``M mod batches`` points left over go through one more small call. No autograd through it: an expanded
    volume's gradient would be summed over the batches in another order.
    """
    m, c = coords.shape[0], volume.shape[1]
    per = m // max(batches, 1)
    if batches <= 1 or per == 0:
        out = F.grid_sample(volume, coords.reshape(1, m, 1, 1, 3), mode="bilinear", padding_mode="border",
                            align_corners=True)
        return out.view(c, m).t()
    head = batches * per
    out = torch.empty(m, c, dtype=volume.dtype, device=volume.device)
    main = F.grid_sample(volume.expand(batches, -1, -1, -1, -1), coords[:head].reshape(batches, per, 1, 1, 3),
                         mode="bilinear", padding_mode="border", align_corners=True)
    out[:head].view(batches, per, c).copy_(main.view(batches, c, per).transpose(1, 2))
    if head < m:
        rest = F.grid_sample(volume, coords[head:].reshape(1, m - head, 1, 1, 3), mode="bilinear",
                             padding_mode="border", align_corners=True)
        out[head:].copy_(rest.view(c, m - head).t())
    return out
