"""A batch of SDF fields decoded from generated feature volumes (the 3DConv-net's output)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortized3d.generators.base import FieldKind
from amortized3d.generators.fields import SdfBias, sphere_sdf


def trilinear_lookup(volume: Tensor, points: Tensor, bound: float) -> Tensor:
    """Trilinear features of ``volume`` [B,C,R,R,R] at ``points`` [B,N,3] -> [B,N,C].

    Voxel (i, j, k) = volume[:, :, k, j, i] sits at x = -bound + 2*bound*i/(R-1) (likewise y
    from j, z from k): the corner voxels lie ON the bounding box. Points outside the box read
    zero features. Prompt b only reads volume b (one grid_sample call for all B).
    """
    if volume.dim() != 5 or points.dim() != 3 or points.shape[0] != volume.shape[0] or points.shape[-1] != 3:
        raise ValueError(f"expected volume [B,C,R,R,R] and points [B,N,3], got {tuple(volume.shape)}, "
                         f"{tuple(points.shape)}")
    grid = (points / bound).to(volume.dtype).reshape(points.shape[0], -1, 1, 1, 3)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(volume.shape[0], volume.shape[1], -1).transpose(1, 2)


class VoxelField:
    """B SDF fields: sdf = sdf_head(f(x)) + sphere bias, albedo = sigmoid(rgb_head(f(x))).

    ``f(x)`` is the trilinear lookup of prompt b's feature volume; the heads are shared by all
    prompts. With bias-free heads, f = 0 outside the box leaves exactly the sphere bias there.
    """

    kind: FieldKind = "sdf"

    def __init__(self, volume: Tensor, sdf_head: nn.Module, rgb_head: nn.Module, bound: float,
                 sdf_bias: SdfBias = "sphere", sdf_bias_radius: float = 0.5) -> None:
        self.volume, self.sdf_head, self.rgb_head = volume, sdf_head, rgb_head
        self.bound, self.sdf_bias, self.sdf_bias_radius = bound, sdf_bias, sdf_bias_radius

    @property
    def batch_size(self) -> int:
        return self.volume.shape[0]

    def _sdf_and_features(self, points: Tensor) -> tuple[Tensor, Tensor]:
        if points.shape[0] != self.batch_size or points.shape[-1] != 3:
            raise ValueError(f"expected points [{self.batch_size},...,3], got {tuple(points.shape)}")
        flat = points.reshape(self.batch_size, -1, 3)
        dtype = next(self.sdf_head.parameters()).dtype
        feats = trilinear_lookup(self.volume, flat, self.bound).to(dtype)
        sdf = self.sdf_head(feats)[..., 0]
        if self.sdf_bias == "sphere":
            sdf = sdf + sphere_sdf(flat, self.sdf_bias_radius).to(sdf.dtype)
        return sdf, feats

    def query_geometry(self, points: Tensor) -> Tensor:
        """points [B,...,3] -> sdf [B,...]: ``query``'s SDF without the albedo head."""
        return self._sdf_and_features(points)[0].reshape(points.shape[:-1])

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points [B,...,3] -> (sdf [B,...], albedo [B,...,3] in [0,1])."""
        lead = points.shape[:-1]
        sdf, feats = self._sdf_and_features(points)
        albedo = torch.sigmoid(self.rgb_head(feats))
        return sdf.reshape(lead), albedo.reshape(*lead, 3)
