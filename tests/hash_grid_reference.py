"""The obviously-correct reference of the hash encoding (test_encodings compares both implementations to it)."""
from __future__ import annotations

import math

import torch


def naive_hash_grid_reference(x, table, instance_ids=None, *, n_levels, n_features_per_level,
                              log2_hashmap_size, base_resolution, per_level_scale, bound):
    """Obviously-correct Instant-NGP encoding: Python loops over levels and the 8 corners.

    ``table`` [I, rows, F] holds the levels one after another: (N_l+1)^3 rows for a dense
    level, T rows for a hashed one. The hash uses explicit uint32 arithmetic (mod 2^32).
    """
    size = 2**log2_hashmap_size
    b = x.shape[0]
    ids = torch.zeros(b, dtype=torch.long) if instance_ids is None else instance_ids
    u = ((x + bound) / (2 * bound)).clamp(0, 1)
    outs, offset = [], 0
    for level in range(n_levels):
        res = math.floor(base_resolution * per_level_scale**level)
        dense = (res + 1) ** 3 <= size
        pos = u * res
        cell = pos.detach().floor().clamp(max=res - 1).long()
        frac = pos - cell
        acc = torch.zeros(*x.shape[:2], n_features_per_level, dtype=x.dtype)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    cx, cy, cz = cell[..., 0] + dx, cell[..., 1] + dy, cell[..., 2] + dz
                    if dense:
                        idx = cx + cy * (res + 1) + cz * (res + 1) ** 2
                    else:
                        h = ((cx * 1) % 2**32) ^ ((cy * 2654435761) % 2**32) ^ ((cz * 805459861) % 2**32)
                        idx = (h % 2**32) % size
                    w = ((frac[..., 0] if dx else 1 - frac[..., 0])
                         * (frac[..., 1] if dy else 1 - frac[..., 1])
                         * (frac[..., 2] if dz else 1 - frac[..., 2]))
                    acc = acc + w[..., None] * table[ids[:, None], offset + idx]
        outs.append(acc)
        offset += (res + 1) ** 3 if dense else size
    return torch.cat(outs, dim=-1)
