"""Multiresolution hash encoding (Instant-NGP, Müller et al. 2022), in torch or tiny-cuda-nn.

The torch path follows the paper: x in [-bound, bound]^3 is mapped to u in [0,1]^3 (clamped),
level l has resolution N_l = floor(base_resolution * per_level_scale**l) and (N_l+1)^3
vertices; a level whose vertices fit in the table (``(N_l+1)^3 <= T``) is indexed densely
(one row per vertex), finer levels through the spatial hash
``(x*1) ^ (y*2654435761) ^ (z*805459861) mod T``; the 8 corner features are trilinearly
interpolated. Dense levels only allocate the rows they use (as tiny-cuda-nn does), so all
levels live in ONE flat parameter ``table`` [num_instances, rows, F] addressed through
per-level row offsets. ``num_instances > 1`` gives every instance (e.g. every prompt of a
per-prompt iNGP) its own tables while keeping a single batched gather.

The default torch path (``fused=True``) gathers all table-indexed levels at once in
level-major order through a custom autograd.Function that saves only int32 rows and weights
and accumulates the table gradient with one ``index_add_``; dense levels of a shared table use
``grid_sample`` (one batch for all fields) forward and, when the points need no gradient (renders),
a 1D ``index_add_`` backward for the table (``dense_backward``; grid_sample's CPU 3D backward is a
scalar loop); the hashed levels of renders go through ``_HashedLevels`` (per-corner contiguous gathers and lerps,
``hashed_lookup``). The same code runs on CPU and CUDA (measured on CPU only). ``fused=False`` keeps the previous autograd path for comparison.

tiny-cuda-nn is optional and imported lazily: importing this module needs neither CUDA nor
tinycudann. Its HashGrid parameterises resolutions slightly differently (scale
``b*s^l - 1`` and a half-cell offset), so its parameters are not interchangeable with the
torch table; the resolved backend is therefore stored in the checkpoint (extra state).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortized3d.generators import compiled_levels
from amortized3d.generators.trilinear import grid_sample_points, lerp_planes
from amortized3d.threads import loop_threads, run_pair, split_in_two

Implementation = Literal["auto", "torch", "tcnn"]

#: Instant-NGP's spatial-hash primes (the first dimension's "prime" is 1 for cache coherence).
HASH_PRIMES: tuple[int, int, int] = (1, 2654435761, 805459861)


#: Whether _DenseLevels' grid_sample forward gives each CPU intra-op thread a batch of points (session 17; bit-equal
#: either way). False is the one-batch forward before it, for benchmark.bench_render's "[session 16]" rows.
SPLIT_GRID_SAMPLE_POINTS = True


@functools.lru_cache(maxsize=1)
def tcnn_status() -> tuple[bool, str]:
    """Whether ``import tinycudann`` works, and why not. Cached: the import is slow."""
    try:
        import tinycudann  # noqa: F401
    except Exception as err:  # ImportError, or OSError/RuntimeError from missing CUDA libraries
        return False, f"tinycudann cannot be imported ({type(err).__name__}: {err})"
    return True, "tinycudann is importable"


def level_resolutions(n_levels: int, base_resolution: int, per_level_scale: float) -> list[int]:
    """N_l = floor(base_resolution * per_level_scale**l), the paper's definition."""
    return [int(math.floor(base_resolution * per_level_scale**level)) for level in range(n_levels)]


def level_layout(resolutions: list[int], table_size: int) -> tuple[list[bool], list[int], list[int]]:
    """Per level: dense or hashed, number of rows, and row offset in the flat table."""
    dense = [(n + 1) ** 3 <= table_size for n in resolutions]
    rows = [(n + 1) ** 3 if d else table_size for n, d in zip(resolutions, dense)]
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    return dense, rows, offsets


class HashGridEncoding(nn.Module):
    """x [B,N,3] (+ instance ids [B]) -> features [B,N,n_levels*n_features_per_level]."""

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.447,
        bound: float = 2.0,
        num_instances: int = 1,
        implementation: Implementation = "auto",
        init_std: float = 1e-4,
        dense_levels: str = "grid_sample",
        fused: bool = True,
        dense_backward: str = "index_add",
        hashed_lookup: str = "corners",
        compile: bool = False,
        dense_lookup: str = "grid_sample",
    ) -> None:
        super().__init__()
        if implementation not in ("auto", "torch", "tcnn"):
            raise ValueError(f"implementation must be auto|torch|tcnn, got {implementation!r}")
        if num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = float(per_level_scale)
        self.bound = float(bound)
        self.num_instances = num_instances
        self.init_std = init_std
        if dense_levels not in ("grid_sample", "gather"):
            raise ValueError(f"dense_levels must be 'grid_sample' or 'gather', got {dense_levels!r}")
        # Dense (non-hashed) levels are plain voxel grids; F.grid_sample interpolates them with one
        # fused kernel per level, ~3x faster on CPU than the generic gather (scripts/benchmark.py).
        self.dense_levels = dense_levels
        # fused: level-major gather through _InterpolateRows (no [..., 8, F] corner features kept
        # for backward, table gradient by one index_add_); False: the previous autograd path,
        # kept for comparison (scripts/benchmark.py) and as a fallback.
        self.fused = bool(fused)
        if dense_backward not in ("index_add", "grid_sample"):
            raise ValueError(f"dense_backward must be 'index_add' or 'grid_sample', got {dense_backward!r}")
        # The table gradient of the grid_sample'd dense levels (fused path, shared table, points without
        # gradient, i.e. every render): "index_add" scatters all levels' corner weights in one 1D
        # index_add_ (3-4x faster on CPU than grid_sample's scalar 3D backward, equal to rounding);
        # "grid_sample": its own backward, the path before session 9, kept for comparison.
        self.dense_backward = dense_backward
        if hashed_lookup not in ("corners", "rows"):
            raise ValueError(f"hashed_lookup must be 'corners' or 'rows', got {hashed_lookup!r}")
        # The hashed levels of a shared table when the points need no gradient (every render): "corners"
        # builds each of the 8 corners' rows as a contiguous [levels, points] vector and interpolates them
        # by 7 lerps (_HashedLevels: ~2x faster on CPU, equal to rounding); "rows": one [levels, points, 8]
        # gather through _InterpolateRows, the path before session 10, kept for comparison.
        self.hashed_lookup = hashed_lookup
        # The forward of those two render kernels (dense levels by index_add backward, hashed levels by corners)
        # through torch.compile (compiled_levels.py): one fused loop each instead of a full-size tensor per op;
        # the same values up to rounding, the same backward. Off by default: the first call of a process compiles.
        self.compile = bool(compile)
        if dense_lookup not in ("grid_sample", "planes"):
            raise ValueError(f"dense_lookup must be 'grid_sample' or 'planes', got {dense_lookup!r}")
        # The eager forward of those dense levels: "grid_sample" (its 3D kernel) or "planes" (1D gathers of each
        # feature plane + lerps, trilinear.lerp_planes): equal to rounding; faster than grid_sample in one batch on the
        # AMD CPUs measured and slower on an Intel one (session 14), no faster than grid_sample's per-thread batches
        # (session 17, docs/results.md). compile=True replaces both.
        self.dense_lookup = dense_lookup
        self.output_dim = n_levels * n_features_per_level
        self.implementation: str = self._resolve(implementation)
        if self.implementation == "tcnn":
            self._build_tcnn()
        else:
            self._build_torch()

    # ------------------------------------------------------------------ construction
    def _resolve(self, requested: str) -> str:
        """Pick the backend once, at construction, so the optimizer sees the final parameters.

        tcnn needs CUDA (its parameters are created on the GPU) and has one table per module,
        so it is used only for a single instance on a machine with CUDA.
        """
        if requested == "torch":
            return "torch"
        ok, reason = tcnn_status()
        if ok and not torch.cuda.is_available():
            ok, reason = False, "CUDA is not available"
        if ok and self.num_instances != 1:
            ok, reason = False, f"num_instances={self.num_instances} (tcnn holds one table)"
        if requested == "tcnn" and not ok:
            warnings.warn(f"HashGridEncoding: tcnn requested but {reason}; using the torch "
                          "implementation", RuntimeWarning, stacklevel=3)
        return "tcnn" if ok else "torch"

    def _build_torch(self) -> None:
        table_size = 2**self.log2_hashmap_size
        res = level_resolutions(self.n_levels, self.base_resolution, self.per_level_scale)
        dense, rows, offsets = level_layout(res, table_size)
        self.rows_per_instance = sum(rows)
        self.table = nn.Parameter(
            torch.randn(self.num_instances, self.rows_per_instance, self.n_features_per_level)
            * self.init_std)
        n = torch.tensor(res, dtype=torch.long)
        strides = torch.stack([torch.ones_like(n), n + 1, (n + 1) ** 2], dim=-1)  # [L,3]
        # Buffers are derived from the config: non-persistent, but they follow .to(device).
        self.register_buffer("_res", n, persistent=False)
        self.register_buffer("_dense", torch.tensor(dense), persistent=False)
        self.register_buffer("_strides", strides, persistent=False)
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("_primes", torch.tensor(HASH_PRIMES, dtype=torch.long), persistent=False)

    def _build_tcnn(self) -> None:
        import tinycudann as tcnn

        config = {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }
        self.tcnn_encoding = tcnn.Encoding(n_input_dims=3, encoding_config=config)
        with torch.no_grad():  # same initial distribution as the torch table
            self.tcnn_encoding.params.normal_(0.0, self.init_std)

    # ------------------------------------------------------------------ forward
    def normalize(self, x: Tensor) -> Tensor:
        """[-bound, bound] -> [0, 1], clamped (points outside see the boundary's features)."""
        return ((x + self.bound) / (2.0 * self.bound)).clamp(0.0, 1.0)

    def forward(self, x: Tensor, instance_ids: Tensor | None = None, table: Tensor | None = None) -> Tensor:
        """``table``: read these instances' rows [I', rows, F] instead of ``self.table`` (instance_ids then
        index into it): the per-prompt iNGP's working set of one step (generators/ingp.py, sparse_updates).
        Every other decision (which levels go through grid_sample, int32 rows) stays the module's."""
        if x.shape[-1] != 3 or x.dim() != 3:
            raise ValueError(f"expected points [B,N,3], got {tuple(x.shape)}")
        if instance_ids is None:
            if self.num_instances != 1:
                raise ValueError("instance_ids are required when num_instances > 1")
        elif instance_ids.shape != (x.shape[0],):
            raise ValueError(f"instance_ids must be [B]={x.shape[0]}, got {tuple(instance_ids.shape)}")
        if self.implementation == "tcnn":
            if table is not None:
                raise ValueError("this HashGridEncoding uses tcnn, which holds its own table: a working-set "
                                 "table needs implementation=torch")
            return self._forward_tcnn(x)
        if table is not None and (table.dim() != 3 or tuple(table.shape[1:]) != tuple(self.table.shape[1:])):
            raise ValueError(f"table must be [I, {self.rows_per_instance}, {self.n_features_per_level}], "
                             f"got {tuple(table.shape)}")
        return self._forward_torch(x, instance_ids, self.table if table is None else table)

    def _forward_tcnn(self, x: Tensor) -> Tensor:
        if not x.is_cuda:
            raise RuntimeError("this HashGridEncoding uses tcnn and needs CUDA inputs")
        b, n, _ = x.shape
        out = self.tcnn_encoding(self.normalize(x).reshape(-1, 3).float())
        return out.float().reshape(b, n, self.output_dim)

    def _forward_torch(self, x: Tensor, instance_ids: Tensor | None, table: Tensor) -> Tensor:
        if self.fused:
            return self._forward_fused(x, instance_ids, table)
        if self.dense_levels == "gather" or not bool(self._dense.any()):
            return self._forward_gather(x, instance_ids, torch.arange(self.n_levels, device=x.device), table)
        dense = self._dense.nonzero().flatten().tolist()
        hashed = (~self._dense).nonzero().flatten()
        parts = {level: self._dense_level(x, instance_ids, level, table) for level in dense}
        if hashed.numel():
            feats = self._forward_gather(x, instance_ids, hashed, table).unflatten(-1, (-1, self.n_features_per_level))
            parts.update({level: feats[..., i, :] for i, level in enumerate(hashed.tolist())})
        return torch.cat([parts[level] for level in range(self.n_levels)], dim=-1)

    def _dense_level(self, x: Tensor, instance_ids: Tensor | None, level: int, table: Tensor) -> Tensor:
        """One dense level as a trilinear voxel-grid lookup: [B,N,3] -> [B,N,F].

        Row ``x + y (n+1) + z (n+1)^2`` of the level is voxel [z, y, x]; with
        ``align_corners=True`` grid coordinate -1/+1 is vertex 0/n, i.e. exactly the
        reference's ``u * n`` vertex positions.
        """
        b, n_pts, _ = x.shape
        n = int(self._res[level]) + 1
        start = int(self._offsets[level])
        vol = table[:, start:start + n**3].view(table.shape[0], n, n, n, self.n_features_per_level)
        vol = vol.permute(0, 4, 1, 2, 3)  # [I,F,z,y,x]
        if self.num_instances > 1:
            vol = vol.index_select(0, instance_ids.long())
        else:
            vol = vol.expand(b, -1, -1, -1, -1)
        grid = (self.normalize(x) * 2.0 - 1.0).view(b, n_pts, 1, 1, 3)
        out = F.grid_sample(vol.to(x.dtype), grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(b, self.n_features_per_level, n_pts).transpose(1, 2)

    def _forward_gather(self, x: Tensor, instance_ids: Tensor | None, levels: Tensor, table: Tensor) -> Tensor:
        """All levels and corners at once: index/weight tensors of shape [B,N,L,8].

        Per-dimension terms are built for the two corner offsets ([...,L,3,2]) and combined
        by broadcasting into the 8 corners (corner c has offsets (c&1, c>>1&1, c>>2&1)), which
        avoids materialising [...,L,8,3] integer tensors.
        """
        b, n, _ = x.shape
        res = self._res[levels].to(x.dtype)                              # [L]
        pos = self.normalize(x)[:, :, None, :] * res[:, None]            # [B,N,L,3]
        # Clamp the cell so that u == 1 lands on the last cell with frac == 1.
        cell = torch.minimum(pos.detach().floor(), (res - 1)[:, None]).long()
        frac = pos - cell.to(x.dtype)                                    # grads flow to x here
        ends = torch.stack([cell, cell + 1], dim=-1)                     # [B,N,L,3,2]
        w = torch.stack([1.0 - frac, frac], dim=-1)                      # [B,N,L,3,2]
        weight = _corners(w, torch.mul)                                  # [B,N,L,8]
        dense_idx = _corners(ends * self._strides[levels][..., None], torch.add)
        # Products fit in int64 (coords < 2^31, primes < 2^32); & (T-1) == mod T, T = 2^k,
        # and equals the reference's uint32 arithmetic since T divides 2^32.
        hashed_idx = _corners(ends * self._primes[:, None], torch.bitwise_xor)
        hashed_idx = hashed_idx & (2**self.log2_hashmap_size - 1)
        rows = torch.where(self._dense[levels][:, None], dense_idx, hashed_idx) + self._offsets[levels][:, None]
        if instance_ids is not None and self.num_instances > 1:
            rows = rows + (instance_ids.long() * self.rows_per_instance).view(b, 1, 1, 1)
        flat = table.reshape(-1, self.n_features_per_level)
        feats = flat.index_select(0, rows.reshape(-1)).view(*rows.shape, self.n_features_per_level)
        out = torch.matmul(weight.unsqueeze(-2), feats.to(weight.dtype))  # [B,N,L,1,F]
        return out.reshape(b, n, len(levels) * self.n_features_per_level)

    def _forward_fused(self, x: Tensor, instance_ids: Tensor | None, table: Tensor) -> Tensor:
        """Level-major fast path: [B,N,3] -> [B,N,L*F].

        All gathered levels (dense and hashed rows built separately, then concatenated) go
        through ONE gather with a level-major [L, B*N, 8] row tensor: consecutive lookups stay inside one
        level's rows, which on CPU is ~2x faster than the point-major order (cache). Trilinear
        weights are built once per group from per-dimension terms; the hash is masked per
        dimension ((a&m)^(b&m)^(c&m) == (a^b^c)&m), so the full-size tensors see one xor
        and one add. With ``dense_levels="grid_sample"`` the dense levels instead use one
        fused grid_sample each when the table is shared (one instance: all fields' points are
        ONE batch, so its backward accumulates into one [F, n^3] volume, not a dense copy per
        field); with several instances all levels go through the gather.
        """
        b, n, _ = x.shape
        feat = self.n_features_per_level
        u = self.normalize(x).reshape(b * n, 3)
        dense = self._dense.tolist()
        # Level blocks [BN, l, F] joined by ONE cat: a per-level select of a stacked output would
        # zero-fill the whole [l, BN, F] gradient once per level in backward.
        blocks: list[Tensor] = []
        flat = table.reshape(-1, feat)
        first = 0  # first gathered level; dense levels come first (resolutions increase)
        if self.dense_levels == "grid_sample" and self.num_instances == 1 and any(dense):
            # ONE split of the table (its backward concatenates the pieces' gradients) instead
            # of a slice per level (each slice's backward would zero-fill a full-size table).
            first = sum(dense)
            sizes = [int((self._res[lv] + 1) ** 3) for lv in range(first)]
            if self.dense_backward == "index_add" and not u.requires_grad:
                # Same grid_sample forward; the table gradient by index_add_ (see _DenseLevels).
                dense_rows, flat = table[0].split([sum(sizes), self.rows_per_instance - sum(sizes)], dim=0)
                blocks.append(_DenseLevels.apply(dense_rows, u, self._res[:first].tolist(), self.compile,
                                                 self.dense_lookup))
            else:
                pieces = table[0].split([*sizes, self.rows_per_instance - sum(sizes)], dim=0)
                blocks.append(torch.stack([self._dense_level_fused(u, pieces[lv], lv) for lv in range(first)], dim=1))
                flat = pieces[-1]
        if (first < self.n_levels and self.hashed_lookup == "corners" and self.num_instances == 1
                and not u.requires_grad and not any(dense[first:])):
            # Every level left is hashed, level j's rows at j * T of ``flat`` (see _HashedLevels).
            # Under no_grad (the proposal pass) autograd still reports needs_input_grad: say so, or 8 rows per
            # point and level are built for a backward that never runs.
            keep_rows = torch.is_grad_enabled() and flat.requires_grad
            blocks.append(_HashedLevels.apply(flat, u, self._res[first:].tolist(), self.log2_hashmap_size,
                                              self.compile, keep_rows))
        elif first < self.n_levels:
            rows, weight = [], []
            for hashed in (False, True):
                levels = [lv for lv in range(first, self.n_levels) if dense[lv] != hashed]
                if levels:
                    r, w = self._rows_and_weights(u, torch.tensor(levels, device=x.device), hashed)
                    rows.append(r)
                    weight.append(w)
            rows_all = torch.cat(rows) if len(rows) > 1 else rows[0]      # [l, BN, 8]
            weight_all = torch.cat(weight) if len(weight) > 1 else weight[0]
            if first:
                rows_all = rows_all - int(self._offsets[first])
            if instance_ids is not None and self.num_instances > 1:
                start = (instance_ids.long() * self.rows_per_instance).repeat_interleave(n)
                rows_all = rows_all + start.to(rows_all.dtype)[None, :, None]
            blocks.append(_InterpolateRows.apply(flat, rows_all, weight_all).transpose(0, 1))  # [BN, l, F]
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return out.reshape(b, n, self.output_dim)

    def _rows_and_weights(self, u: Tensor, levels: Tensor, hashed: bool) -> tuple[Tensor, Tensor]:
        """Rows [l, M, 8] (int64, with level offsets) and trilinear weights [l, M, 8] of u [M, 3]."""
        res = self._res[levels].to(u.dtype)[:, None, None]                 # [l,1,1]
        pos = u[None] * res                                                # [l,M,3]
        cell = torch.minimum(pos.detach().floor(), res - 1).long()
        frac = pos - cell.to(u.dtype)                                      # grads flow to x here
        weight = _corners(torch.stack([1.0 - frac, frac], dim=-1), torch.mul)
        ends = torch.stack([cell, cell + 1], dim=-1)                       # [l,M,3,2]
        if hashed:  # products in int64 (coords < 2^31, primes < 2^32), then masked below 2^31
            terms = (ends * self._primes[:, None]) & (2**self.log2_hashmap_size - 1)
        else:
            terms = ends * self._strides[levels][:, None, :, None]
        # The full-size [l,M,8] arithmetic runs in int32 when every row number fits (half the
        # memory traffic and half the saved index memory); the backward widens for index_add_.
        small = self.num_instances * self.rows_per_instance < 2**31
        terms = terms.int() if small else terms
        rows = _corners(terms, torch.bitwise_xor if hashed else torch.add)
        return rows + self._offsets[levels][:, None, None].to(rows.dtype), weight

    def _dense_level_fused(self, u: Tensor, rows: Tensor, level: int) -> Tensor:
        """One dense level of a shared table (its rows [(n+1)^3, F]) by grid_sample: u [M,3] -> [M,F].

        All fields' points form ONE batch, so the backward accumulates into one [F, n^3] volume.
        """
        m = u.shape[0]
        n = int(self._res[level]) + 1
        vol = rows.view(1, n, n, n, self.n_features_per_level).permute(0, 4, 1, 2, 3).to(u.dtype)
        grid = (u * 2.0 - 1.0).view(1, m, 1, 1, 3)
        out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(self.n_features_per_level, m).t()

    # ------------------------------------------------------------------ checkpointing
    def get_extra_state(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "format": 1}

    def set_extra_state(self, state: Any) -> None:
        stored = state.get("implementation") if isinstance(state, dict) else None
        if stored is not None and stored != self.implementation:
            warnings.warn(
                f"HashGridEncoding: checkpoint was written by the {stored!r} implementation but "
                f"this module uses {self.implementation!r}; their parameters are not "
                "interchangeable (rebuild with implementation="
                f"{stored!r} to load it)", RuntimeWarning, stacklevel=2)

    def extra_repr(self) -> str:
        return (f"implementation={self.implementation}, levels={self.n_levels}x"
                f"{self.n_features_per_level}, log2_T={self.log2_hashmap_size}, "
                f"base={self.base_resolution}, scale={self.per_level_scale}, "
                f"bound={self.bound}, instances={self.num_instances}, fused={self.fused}, compile={self.compile}, "
                f"dense_lookup={self.dense_lookup}")


class _InterpolateRows(torch.autograd.Function):
    """out[..., f] = sum_c weight[..., c] * table[rows[..., c], f] with a lean backward.

    Autograd of ``index_select`` + ``matmul`` keeps the gathered corner features [..., 8, F]
    alive until backward and scatters through an expanded [..., 8, F] index; here only rows
    and weights are saved, the table gradient is ONE ``index_add_`` of ``weight * grad``
    into a zero table, and the corner features are re-gathered in backward only when the
    weights (i.e. the points) need a gradient. Computes in the weights' dtype.
    """

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        flat_rows = rows.reshape(-1)
        feats = table.index_select(0, flat_rows).view(*rows.shape, table.shape[-1]).to(weight.dtype)
        ctx.save_for_backward(table, rows, weight)
        return torch.matmul(weight.unsqueeze(-2), feats).squeeze(-2)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        table, rows, weight = ctx.saved_tensors
        grad_table = grad_weight = None
        if ctx.needs_input_grad[0]:
            values = (weight.unsqueeze(-1) * grad.unsqueeze(-2)).reshape(-1, table.shape[-1])
            # int64 index: CPU index_add_ is several times slower with an int32 one.
            grad_table = torch.zeros_like(table).index_add_(0, rows.reshape(-1).long(), values.to(table.dtype))
        if ctx.needs_input_grad[2]:
            feats = table.index_select(0, rows.reshape(-1)).view(*rows.shape, table.shape[-1])
            grad_weight = torch.matmul(feats.to(grad.dtype), grad.unsqueeze(-1)).squeeze(-1)
        return grad_table, None, grad_weight


class _DenseLevels(torch.autograd.Function):
    """The dense levels of a shared table: grid_sample forward, a scatter backward for the table.

    ``rows`` [R, F] holds the levels' vertex rows one after another ((n+1)^3 each, row
    ``x + y (n+1) + z (n+1)^2``), ``u`` [M, 3] in [0, 1] has no gradient. The forward is exactly
    :meth:`HashGridEncoding._dense_level_fused` per level (one vectorised kernel each), so the values
    are bit-equal to the grid_sample path (``compile``: ``compiled_levels.dense_levels``, equal to rounding).
    On CPU grid_sample's 3D backward is a scalar loop over points x corners x features (~50% of the
    quickstart's fused training render in a profile); here the
    corners and trilinear weights of all levels are rebuilt from ``u`` and the table gradient is ONE
    1D index_add_ per feature into feature planes (the 1D index_add_ is a tight loop, the [R, F] one
    ~2x slower). Only ``u`` is saved. Equal to grid_sample's
    gradient up to the summation order (tests/test_encodings.py).
    """

    @staticmethod
    def forward(ctx, rows: Tensor, u: Tensor, res: list[int], compile: bool = False,  # type: ignore[override]
                lookup: str = "grid_sample") -> Tensor:
        ctx.save_for_backward(u)
        ctx.res, ctx.rows_shape, ctx.rows_dtype = res, rows.shape, rows.dtype
        if compile:  # the same lookup as one fused loop (compiled_levels.py)
            return compiled_levels.compiled(compiled_levels.dense_levels)(rows, u, tuple(res))
        sizes = [(n + 1) ** 3 for n in res]
        pieces = rows.split(sizes, dim=0)
        coords = u * 2.0 - 1.0

        def levels(idx: range) -> list[Tensor]:
            if lookup == "planes":  # the same trilinear lookup from 1D gathers of each feature plane
                return [lerp_planes(pieces[i].t().contiguous(), res[i] + 1, u.t() * res[i]).t() for i in idx]
            # One batch of points per intra-op thread (grid_sample's CPU kernel parallelises over the batch
            # only; bit-equal); one thread each under the split policy, whose halves already run in parallel.
            batches = torch.get_num_threads() if u.device.type == "cpu" and SPLIT_GRID_SAMPLE_POINTS else 1
            return [_DenseLevels._level(pieces[i], res[i], coords, batches) for i in idx]

        half = len(res) // 2
        if half and split_in_two(u.device):  # the levels' two halves on two threads (threads.py)
            low, high = run_pair(lambda: levels(range(half)), lambda: levels(range(half, len(res))))
            out = low + high
        else:
            out = levels(range(len(res)))
        return torch.stack(out, dim=1)                                     # [M, L, F]

    @staticmethod
    def _level(piece: Tensor, n: int, coords: Tensor, batches: int) -> Tensor:
        feat = piece.shape[-1]
        vol = piece.view(1, n + 1, n + 1, n + 1, feat).permute(0, 4, 1, 2, 3).to(coords.dtype)
        return grid_sample_points(vol, coords, batches)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # No [L, 8, M] corner tensor is built (at this size every full-size pass costs as much as the
        # scatter itself): per level, corner and feature ONE 1D index_add_ of M values whose index is the
        # cell's base row; the corner offset shifts the target view instead of the index.
        (u,) = ctx.saved_tensors
        total, feat = ctx.rows_shape
        planes = torch.zeros(feat, total, dtype=ctx.rows_dtype, device=u.device)  # feature-major gradient
        grad_t = grad.to(ctx.rows_dtype).permute(1, 2, 0).contiguous()      # [L, F, M]
        res = ctx.res
        offsets = [sum((m + 1) ** 3 for m in res[:i]) for i in range(len(res))]

        def scatter(idx: range) -> None:  # levels own disjoint rows: the halves never write the same row
            for i in idx:
                _DenseLevels._scatter_level(planes, u, grad_t[i], res[i], offsets[i])

        half = len(res) // 2
        if half and split_in_two(u.device):
            run_pair(lambda: scatter(range(half)), lambda: scatter(range(half, len(res))))
        else:
            # ~100 ops of M elements, each index_add_ serial anyway; the products between them use the intra-op
            # threads unless the policy is serial (threads.py: on a shared, loaded box barriers cost 1.3x here).
            with loop_threads(u.device):
                scatter(range(len(res)))
        return planes.t(), None, None, None, None

    @staticmethod
    def _scatter_level(planes: Tensor, u: Tensor, grad: Tensor, n: int, offset: int) -> None:
        """planes[f, offset + row] += trilinear weight x grad[f] for one level (grad [F, M])."""
        itype = torch.int32 if planes.shape[1] < 2**31 else torch.long  # int32 index arithmetic where rows fit
        pos = u.t() * n                                                     # [3, M]
        cell = torch.clamp(pos.floor(), max=n - 1)
        frac = (pos - cell).to(planes.dtype)
        stride = (1, n + 1, (n + 1) ** 2)
        ci = cell.to(itype)
        base = ci[0] + ci[1] * stride[1] + ci[2] * stride[2]                # [M]
        w = (1.0 - frac, frac)                                              # per dimension: weight of end 0 / 1
        wzy = {(cz, cy): w[cz][2] * w[cy][1] for cz in (0, 1) for cy in (0, 1)}  # shared by the features
        for f in range(planes.shape[0]):
            gx = [w[e][0] * grad[f] for e in (0, 1)]                         # x weight x upstream gradient
            for (cz, cy), weight in wzy.items():
                for cx in (0, 1):
                    start = offset + cz * stride[2] + cy * stride[1] + cx
                    planes[f, start:].index_add_(0, base, weight * gx[cx])


class _HashedLevels(torch.autograd.Function):
    """Hashed levels of a shared table, points without gradient: ``flat`` [l*T, F] holds level j's T rows
    at j*T, ``u`` [M, 3] in [0, 1] -> [M, l, F]. The same spatial hash, cell and trilinear interpolation as
    :meth:`HashGridEncoding._rows_and_weights` + :class:`_InterpolateRows`, laid out for CPU vector loops.

    That path builds [l, M, 8] rows and weights from per-dimension terms by broadcasting over tiny inner
    dimensions (2 and 8), which torch's CPU kernels run as scalar loops (the hash's xor and the weights'
    products were ~40 % of the full-size render in a profile), and interpolates with a [l*M] batch of
    1x8 @ 8xF matmuls. Here every full-size tensor is a contiguous [l, M] (or [l, M, F]) vector: per
    dimension the two ends' hash terms (int64 products, masked, then int32; the level's j*T folded into the
    x term: both terms are < T, so xor and add commute with it), per corner one xor and one gather of its
    F features as one 4- or 8-byte word, then 7 lerps. Backward (table gradient only): per corner and
    feature one 1D ``index_add_`` of trilinear weight x gradient into feature planes, the rows saved in
    int32. Equal to the rows path up to rounding (lerp vs weighted sum; tests/test_encodings.py).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, u: Tensor, res: list[int], log2_t: int,  # type: ignore[override]
                compile: bool = False, keep_rows: bool = True) -> Tensor:
        save = keep_rows and ctx.needs_input_grad[0]
        ctx.flat_shape, ctx.flat_dtype = flat.shape, flat.dtype
        if compile:  # the same lookup as one fused loop (compiled_levels.py)
            fn = compiled_levels.compiled(compiled_levels.hashed_levels)
            out, rows, frac = fn(flat, u, tuple(res), log2_t, HASH_PRIMES, save)
            if save:
                ctx.save_for_backward(rows, frac)
            return out.transpose(0, 1)
        n_levels, m, feat = len(res), u.shape[0], flat.shape[-1]
        mask = 2**log2_t - 1
        rv = torch.tensor(res, dtype=u.dtype, device=u.device)[:, None, None]      # [l,1,1]
        pos = u.t().contiguous()[None] * rv                                       # [l,3,M]
        cell = torch.minimum(pos.floor(), rv - 1)
        frac = pos - cell                                                         # [l,3,M]
        ci = cell.long()
        primes = torch.tensor(HASH_PRIMES, device=u.device)[None, :, None]
        ends = [(ci + e) * primes & mask for e in (0, 1)]                         # [l,3,M] int64 each
        level_rows = (torch.arange(n_levels, device=u.device) * (mask + 1))[:, None]
        x = [(e[:, 0] + level_rows).int() for e in ends]
        y = [e[:, 1].int() for e in ends]
        z = [e[:, 2].int() for e in ends]
        rows = torch.empty(8, n_levels, m, dtype=torch.int32, device=u.device) if save else None
        word = {4: torch.int32, 8: torch.int64}.get(feat * flat.element_size())
        packed = flat.contiguous().view(word).view(-1) if word is not None else None
        weights = frac.unsqueeze(-1).expand(-1, -1, -1, feat).contiguous()       # [l,3,M,F]
        wx, wy, wz = weights[:, 0], weights[:, 1], weights[:, 2]

        def gather(r: Tensor) -> Tensor:                                          # rows [l,M] -> [l,M,F]
            if packed is not None:
                return packed.index_select(0, r.view(-1)).view(flat.dtype).view(n_levels, m, feat)
            return flat.index_select(0, r.view(-1)).view(n_levels, m, feat)

        along_y = []
        for cz in (0, 1):
            along_x = []
            for cy in (0, 1):
                zy = z[cz] ^ y[cy]
                ends_x = []
                for cx in (0, 1):
                    r = torch.bitwise_xor(zy, x[cx], out=rows[cz * 4 + cy * 2 + cx]) if save else zy ^ x[cx]
                    ends_x.append(gather(r))
                along_x.append(torch.lerp(ends_x[0], ends_x[1], wx))
            along_y.append(torch.lerp(along_x[0], along_x[1], wy))
        out = torch.lerp(along_y[0], along_y[1], wz)                               # [l,M,F]
        if save:
            ctx.save_for_backward(rows, frac)
        return out.transpose(0, 1)                                                # [M,l,F]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rows, frac = ctx.saved_tensors
        total, feat = ctx.flat_shape
        planes = torch.zeros(feat, total, dtype=ctx.flat_dtype, device=grad.device)  # feature-major
        grad_t = grad.to(ctx.flat_dtype).permute(2, 1, 0).contiguous()               # [F,l,M]
        frac = frac.to(ctx.flat_dtype)
        w = [(1.0 - frac[:, d], frac[:, d]) for d in range(3)]                        # [l,M] per end

        def scatter(features: range) -> None:  # features own disjoint planes: two halves never write the same row
            for cz in (0, 1):
                for cy in (0, 1):
                    wzy = w[2][cz] * w[1][cy]
                    for cx in (0, 1):
                        weight = wzy * w[0][cx]
                        index = rows[cz * 4 + cy * 2 + cx].view(-1).long()  # CPU index_add_: int32 several x slower
                        for f in features:
                            planes[f].index_add_(0, index, (weight * grad_t[f]).view(-1))

        half = feat // 2
        if half and split_in_two(grad.device):  # the features' two halves on two threads (threads.py), bit-equal
            run_pair(lambda: scatter(range(half)), lambda: scatter(range(half, feat)))
        else:
            # index_add_ is serial anyway; the products use the intra-op threads unless the policy is serial
            # (threads.py: on the shared, loaded 2-core box this backward took 1.4 s instead of 0.8 s on 2 threads
            # in the full-size SD step).
            with loop_threads(grad.device):
                scatter(range(feat))
        return planes.t(), None, None, None, None, None


def _corners(per_dim: Tensor, combine) -> Tensor:
    """[..., 3, 2] per-dimension terms -> [..., 8] corner values, corner c = z*4 + y*2 + x."""
    tx, ty, tz = per_dim[..., 0, :], per_dim[..., 1, :], per_dim[..., 2, :]
    zy = combine(tz[..., :, None], ty[..., None, :])                     # [..., 2(z), 2(y)]
    return combine(zy[..., None], tx[..., None, None, :]).flatten(-3)   # [..., 8]
