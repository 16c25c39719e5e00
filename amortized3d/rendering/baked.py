"""A field sampled once on a voxel grid and then evaluated by trilinear interpolation.

Evaluation renders 120 views per prompt; querying a hash-grid generator at every ray sample
of every view costs far more than sampling it once on a grid that is finer than the pixels
(a 32 px view at distance 1.5 and fovy 70 spans 0.066 world units per pixel; a 96^3 grid over
[-1, 1]^3 has 0.021-unit voxels). Both geometry and albedo are baked, so any renderer settings
apply unchanged. tests/test_rendering.py bounds the difference to direct rendering.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from amortized3d.generators.base import Field
from amortized3d.generators.trilinear import lerp_planes


#: (geometry, albedo) of the vertices a sphere-bounded bake never reads: empty space of each field kind (an SDF
#: far outside the bound, a density whose activation is ~0), black.
_EMPTY = {"sdf": (10.0, 0.0, 0.0, 0.0), "density": (-10.0, 0.0, 0.0, 0.0)}

#: The lookup of a BakedField built without ``lookup=`` (the evaluation's): "gather" (session 9) or
#: "grid_sample" (before); a module setting so that scripts/benchmark.py can time both in one run.
DEFAULT_LOOKUP = "gather"


class BakedField:
    """``Field`` protocol over a [B, 4, R, R, R] grid of (geometry, albedo) on [-bound, bound]^3."""

    def __init__(self, field: Field, resolution: int = 96, bound: float = 1.0, chunk: int = 262144,
                 device: torch.device | str = "cpu", lookup: str | None = None, sphere: float | None = None):
        """``sphere``: the radius of the ball that every point later looked up lies in (the renderer's
        ``lookup_sphere()``: its samples lie inside its bound sphere), or None (anywhere: border clamping reads the
        whole grid). With a sphere only the vertices that a trilinear lookup inside it can read are queried;
        the others (the grid's corners: 44% of a 96^3 grid around its inscribed sphere) hold the
        empty-space value ``_EMPTY`` and are never read, so renders are unchanged (tests/test_baked.py)."""
        lookup = DEFAULT_LOOKUP if lookup is None else lookup
        if lookup not in ("gather", "grid_sample"):
            raise ValueError(f"lookup must be 'gather' or 'grid_sample', got {lookup!r}")
        if sphere is not None and sphere <= 0:
            raise ValueError(f"sphere must be a positive radius or None, got {sphere}")
        self.kind = field.kind
        self.bound = float(bound)
        # gather: trilinear lookup from 1D gathers of each channel plane (_lerp_planes; 2.5-3x faster
        # than grid_sample's 3D kernel on CPU, equal to rounding); grid_sample: the path before session 9.
        self.lookup = lookup
        axis = torch.linspace(-self.bound, self.bound, resolution, device=device)
        # grid_sample's volume is indexed [z, y, x] and its coordinates are (x, y, z)
        z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
        points = torch.stack([x, y, z], dim=-1).reshape(1, -1, 3)
        readable = None
        if sphere is not None:
            # A point p reads the 8 vertices of its cell, each within one cell diagonal of p (+1% for rounding).
            reach = sphere + 1.01 * math.sqrt(3.0) * 2.0 * self.bound / (resolution - 1)
            readable = points[0].square().sum(-1) <= reach * reach
            if bool(readable.all()):
                readable = None
            else:
                points = points[:, readable]
        values = []
        with torch.no_grad():
            for start in range(0, points.shape[1], chunk):
                p = points[:, start:start + chunk].expand(field.batch_size, -1, -1)
                geometry, albedo = field.query(p)
                values.append(torch.cat([geometry[..., None], albedo], dim=-1).float())
        grid = torch.cat(values, dim=1)  # [B, R^3 or readable vertices, 4]
        if readable is not None:
            full = grid.new_tensor(_EMPTY[self.kind]).expand(field.batch_size, resolution**3, 4).clone()
            full[:, readable] = grid
            grid = full
        self.volume = grid.reshape(field.batch_size, resolution, resolution, resolution, 4).permute(0, 4, 1, 2, 3)
        # Outside the grid, border clamping repeats the boundary values: empty space for SDFs (a
        # positive distance) and for densities alike, as long as the object lies inside the grid.
        self.volume = self.volume.contiguous()

    @property
    def batch_size(self) -> int:
        return int(self.volume.shape[0])

    def _lookup(self, points: Tensor, channels: int) -> Tensor:
        """The first ``channels`` planes of the grid at ``points`` [B,N,3] -> [B,channels,N]."""
        b, n, _ = points.shape
        volume = self.volume[:, :channels]
        if self.lookup == "gather":
            out = torch.stack([_lerp_planes(volume[i], (points[i] / self.bound).to(volume)) for i in range(b)])
        else:
            grid = (points / self.bound).reshape(b, n, 1, 1, 3).to(volume)
            out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.reshape(b, channels, n)

    def query_geometry(self, points: Tensor) -> Tensor:
        return self._lookup(points, 1)[:, 0]

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        out = self._lookup(points, 4)
        return out[:, 0], out[:, 1:].transpose(1, 2)


def _lerp_planes(volume: Tensor, coords: Tensor) -> Tensor:
    """grid_sample(volume [C, R, R, R], coords [N, 3] in [-1, 1] as (x, y, z), bilinear, border,
    align_corners=True) -> [C, N], from 1D gathers of each channel plane (:func:`lerp_planes`)."""
    c, r = volume.shape[0], volume.shape[-1]
    return lerp_planes(volume.reshape(c, -1), r, (coords.t() + 1.0) * 0.5 * (r - 1))
