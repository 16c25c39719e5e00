"""The hash grid's render lookups as plain tensor functions for ``torch.compile`` (``HashGridEncoding(compile=True)``).

A render's points need no gradient, so its forward is a pure lookup: per level and point the cell, the 8 corner
rows and a trilinear interpolation of their features. Run op by op (``_DenseLevels``, ``_HashedLevels``) every step
writes a full-size tensor, and at the SD prior's sizes (16 levels, 2^19 rows, 524k proposal samples) those passes
are the render's largest cost. Compiled with inductor, each function becomes one fused loop over (level, point)
that reads ``u`` and the table and writes only the output (and, for a backward, the rows): on the 2-core CPU 3.3x
faster for the SD grid's 11 hashed levels (docs/results.md, session 12). The values equal the eager kernels up to
rounding (tests/test_encodings.py); the backwards stay the eager ones, whose serial ``index_add_`` keeps the table
gradient deterministic (inductor's scatter adds atomically across threads, in no fixed order).

The first call of a process compiles (tens of seconds on a CPU; inductor caches the code on disk, so later
processes load it); ``dynamic=True`` keeps one graph for every point count, so empty-space skipping, which changes
the count each step, does not recompile. Tested on CPU only (no GPU was lent); on CUDA tiny-cuda-nn is preferred.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import Tensor


def hashed_levels(flat: Tensor, u: Tensor, res: tuple[int, ...], log2_t: int, primes: tuple[int, int, int],
                  with_rows: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Hashed levels of a shared table (level j's rows at j * 2^log2_t of ``flat`` [l*T, F]) at ``u`` [M, 3] in
    [0, 1], hashed with ``primes`` (encodings.HASH_PRIMES; x's is 1): features [l, M, F], the corners' rows
    [8, l, M] int32 (``with_rows``, for _HashedLevels' backward; corner c = z*4 + y*2 + x) and the cell fractions
    [l, 3, M]. The same hash, cell and lerps as ``_HashedLevels.forward``."""
    mask = (1 << log2_t) - 1
    _, prime_y, prime_z = primes
    flat = flat.to(u.dtype)
    rv = torch.tensor(res, dtype=u.dtype, device=u.device)[:, None, None]        # [l,1,1]
    pos = u.t()[None] * rv                                                       # [l,3,M]
    cell = torch.minimum(pos.floor(), rv - 1)
    frac = pos - cell
    ci = cell.long()
    level_rows = (torch.arange(len(res), device=u.device) * (mask + 1))[:, None]  # [l,1]
    x = [((ci[:, 0] + e) & mask) + level_rows for e in (0, 1)]                   # level offset folded into x
    y = [((ci[:, 1] + e) * prime_y) & mask for e in (0, 1)]
    z = [((ci[:, 2] + e) * prime_z) & mask for e in (0, 1)]
    fx, fy, fz = (frac[:, d, :, None] for d in range(3))                          # [l,M,1]
    corners = [z[cz] ^ y[cy] ^ x[cx] for cz in (0, 1) for cy in (0, 1) for cx in (0, 1)]
    feats = [flat[r] for r in corners]                                            # [l,M,F] each
    along_x = [torch.lerp(feats[i], feats[i + 1], fx) for i in (0, 2, 4, 6)]
    along_y = [torch.lerp(along_x[i], along_x[i + 1], fy) for i in (0, 2)]
    out = torch.lerp(along_y[0], along_y[1], fz)
    rows = torch.stack(corners).int() if with_rows else None
    return out, rows, frac


def dense_levels(rows: Tensor, u: Tensor, res: tuple[int, ...]) -> Tensor:
    """Dense levels stored one after another in ``rows`` [R, F] ((n+1)^3 vertex rows each, row
    x + y (n+1) + z (n+1)^2) at ``u`` [M, 3] in [0, 1]: features [M, L, F]. The trilinear lookup
    ``_DenseLevels`` does with grid_sample (align_corners, border: vertex positions u * n)."""
    rows = rows.to(u.dtype)
    out = []
    offset = 0
    for n in res:
        pos = u * n                                                               # [M,3]
        cell = torch.clamp(pos.floor(), max=n - 1)
        frac = pos - cell
        ci = cell.long()
        base = ci[:, 0] + ci[:, 1] * (n + 1) + ci[:, 2] * (n + 1) ** 2 + offset     # [M]
        fx, fy, fz = (frac[:, d, None] for d in range(3))
        feats = [rows[base + cz * (n + 1) ** 2 + cy * (n + 1) + cx]
                 for cz in (0, 1) for cy in (0, 1) for cx in (0, 1)]
        along_x = [torch.lerp(feats[i], feats[i + 1], fx) for i in (0, 2, 4, 6)]
        along_y = [torch.lerp(along_x[i], along_x[i + 1], fy) for i in (0, 2)]
        out.append(torch.lerp(along_y[0], along_y[1], fz))
        offset += (n + 1) ** 3
    return torch.stack(out, dim=1)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled once per process (inductor, one graph for all point counts). Where compiling fails (no C++
    compiler for inductor's CPU code, no triton on a GPU), one warning names the cause and ``fn`` runs eagerly from
    then on: the same values, the previous speed."""
    state: dict[str, Callable] = {"fn": torch.compile(fn, dynamic=True)}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; a genuine error re-raises from fn below
            if state["fn"] is fn:
                raise
            warnings.warn(f"generator.encoding.compile: torch.compile of {fn.__name__} failed "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                          "running it eagerly (same values, slower)", RuntimeWarning, stacklevel=2)
            state["fn"] = fn
            return fn(*args)

    return run
