"""Cameras: training-range sampling, the evaluation orbit, rays and view-direction labels.

Conventions (used everywhere in the project):
- World is z-up; objects live around the origin inside a sphere of radius ~1.
- A camera at spherical (distance d, elevation el, azimuth az) sits at
  d * (cos el cos az, cos el sin az, sin el) and looks at the origin.
- Azimuth 0 is the *front* of an object (camera on +x); angles are radians internally,
  degrees only in configs.
- Camera frames follow OpenGL: the camera looks along its local -z, +x right, +y up.
  ``c2w`` is the 4x4 camera-to-world matrix with columns (right, up, back, position).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor

VIEW_LABELS: tuple[str, ...] = ("front", "side", "back", "overhead")


@dataclass(frozen=True)
class CameraRanges:
    """Ranges (degrees / world units) of the training camera distribution."""

    distance: tuple[float, float] = (1.0, 1.5)
    fovy_deg: tuple[float, float] = (40.0, 70.0)
    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)


@dataclass(frozen=True)
class ViewThresholds:
    """View-dependent prompting buckets (DreamFusion / threestudio convention)."""

    front_deg: float = 30.0  # |azimuth| < front  -> front
    back_deg: float = 30.0  # |azimuth| > 180 - back -> back
    overhead_deg: float = 60.0  # elevation > overhead -> overhead (takes precedence)


@dataclass
class CameraBatch:
    """N pinhole cameras looking at the origin, rendered at ``height`` x ``width``."""

    c2w: Tensor  # [N, 4, 4]
    fovy: Tensor  # [N] radians
    elevation: Tensor  # [N] radians
    azimuth: Tensor  # [N] radians, wrapped to [-pi, pi)
    distance: Tensor  # [N]
    height: int
    width: int

    def __len__(self) -> int:
        return int(self.c2w.shape[0])

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device: torch.device | str) -> "CameraBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def index(self, idx: Tensor | slice | Sequence[int]) -> "CameraBatch":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def with_resolution(self, height: int, width: int | None = None) -> "CameraBatch":
        return replace(self, height=height, width=width or height)

    @staticmethod
    def cat(batches: Sequence["CameraBatch"]) -> "CameraBatch":
        first = batches[0]
        return replace(first, **{f.name: torch.cat([getattr(b, f.name) for b in batches])
                                 for f in fields(first) if isinstance(getattr(first, f.name), Tensor)})

    def rays(self) -> tuple[Tensor, Tensor]:
        """World-space ray origins and unit directions through pixel centres, [N, H, W, 3]."""
        n, h, w = len(self), self.height, self.width
        dev, dt = self.c2w.device, self.c2w.dtype
        focal = 0.5 * h / torch.tan(0.5 * self.fovy)  # [N] pixels
        j, i = torch.meshgrid(torch.arange(h, device=dev, dtype=dt) + 0.5,
                              torch.arange(w, device=dev, dtype=dt) + 0.5, indexing="ij")
        # camera-space direction: x right, y up (image rows go down), looking along -z
        x = (i[None] - 0.5 * w) / focal[:, None, None]
        y = -(j[None] - 0.5 * h) / focal[:, None, None]
        d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [N,H,W,3]
        d_world = torch.einsum("nij,nhwj->nhwi", self.c2w[:, :3, :3], d_cam)
        d_world = d_world / d_world.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, None, None, :3, 3].expand(n, h, w, 3)
        return origins, d_world

    def view_labels(self, thresholds: ViewThresholds = ViewThresholds()) -> list[str]:
        return [VIEW_LABELS[i] for i in self.view_label_ids(thresholds).tolist()]

    def view_label_ids(self, thresholds: ViewThresholds = ViewThresholds()) -> Tensor:
        """Index into :data:`VIEW_LABELS` for each camera, [N] long."""
        az = torch.rad2deg(self.azimuth).abs()
        el = torch.rad2deg(self.elevation)
        ids = torch.full_like(az, VIEW_LABELS.index("side"), dtype=torch.long)
        ids[az < thresholds.front_deg] = VIEW_LABELS.index("front")
        ids[az > 180.0 - thresholds.back_deg] = VIEW_LABELS.index("back")
        ids[el > thresholds.overhead_deg] = VIEW_LABELS.index("overhead")
        return ids

    def embedding(self) -> Tensor:
        """Flattened c2w [N, 16]: the camera condition of VSD-family score models."""
        return self.c2w.reshape(len(self), 16)


def wrap_angle(a: Tensor) -> Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def look_at_origin(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """c2w [N,4,4] for cameras on a sphere around the origin, z-up world."""
    pos = torch.stack([distance * torch.cos(elevation) * torch.cos(azimuth),
                       distance * torch.cos(elevation) * torch.sin(azimuth),
                       distance * torch.sin(elevation)], dim=-1)
    back = pos / pos.norm(dim=-1, keepdim=True)  # camera +z points away from the target
    world_up = torch.tensor([0.0, 0.0, 1.0], dtype=pos.dtype, device=pos.device).expand_as(back)
    right = torch.linalg.cross(world_up, back)
    # Straight overhead the up vector is degenerate; any right vector orthogonal to back works.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=pos.dtype, device=pos.device).expand_as(back), back)
    right = torch.where(degenerate, alt, right)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(back, right)
    c2w = torch.zeros(pos.shape[0], 4, 4, dtype=pos.dtype, device=pos.device)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, back, pos
    c2w[:, 3, 3] = 1.0
    return c2w


def make_cameras(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fovy_deg: Tensor,
                 height: int, width: int | None = None) -> CameraBatch:
    # torch's default dtype, not float32: Lightning's trainer.precision=64-true runs each step with it set to
    # float64, and the rays (hence renders, latents, score-model inputs) follow the cameras' dtype.
    dt = torch.get_default_dtype()
    el, az = torch.deg2rad(elevation_deg.to(dt)), wrap_angle(torch.deg2rad(azimuth_deg.to(dt)))
    dist = distance.to(dt)
    return CameraBatch(c2w=look_at_origin(el, az, dist), fovy=torch.deg2rad(fovy_deg.to(dt)),
                       elevation=el, azimuth=az, distance=dist, height=height, width=width or height)


def sample_cameras(n: int, height: int, ranges: CameraRanges = CameraRanges(),
                   rng: torch.Generator | None = None, width: int | None = None) -> CameraBatch:
    """``n`` cameras drawn uniformly from ``ranges`` (elevation uniform in angle)."""
    def uniform(lo_hi: tuple[float, float]) -> Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=rng)

    return make_cameras(uniform(ranges.elevation_deg), uniform(ranges.azimuth_deg),
                        uniform(ranges.distance), uniform(ranges.fovy_deg), height, width)


def orbit_cameras(num_views: int = 120, height: int = 64, elevation_deg: float = 15.0,
                  distance: float = 1.5, fovy_deg: float = 70.0, width: int | None = None) -> CameraBatch:
    """The evaluation turntable: ``num_views`` azimuths evenly spaced over 360 deg, starting at front."""
    az = torch.arange(num_views, dtype=torch.get_default_dtype()) * (360.0 / num_views)
    full = torch.ones(num_views)
    return make_cameras(full * elevation_deg, az, full * distance, full * fovy_deg, height, width)
