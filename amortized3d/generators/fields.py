"""The field shared by the iNGP-style generators: hash-grid features + per-field MLP heads."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from amortized3d.generators.base import FieldKind
from amortized3d.generators.encodings import HashGridEncoding
from amortized3d.generators.mlp import Activation, batched_mlp, chunked_mlp, fuse_heads

SdfBias = Literal["sphere", "none"]


def sphere_sdf(points: Tensor, radius: float) -> Tensor:
    """Signed distance to a sphere at the origin (negative inside): ||x|| - r."""
    return points.norm(dim=-1) - radius


class HashGridField:
    """B SDF fields: sdf = mlp_sdf(enc(x)) + bias(x), albedo = sigmoid(mlp_rgb(enc(x))).

    The sphere bias makes an untrained generator (tiny hash features, so MLP outputs ~0)
    a sphere of radius ``sdf_bias_radius``, the usual starting shape for SDF distillation.
    Field b uses encoding instance ``instance_ids[b]`` (None: a shared grid) and weights
    ``w[b]`` of every [B,out,in] weight tensor; all B fields are evaluated in one pass. ``table``
    (optional): the encoding reads these instances' rows instead of its own (a step's working set).

    ``fused_mlp`` (False by default here; on in the analytic hyper_ingp config, see HyperIngpGenerator) evaluates both heads as one network in cache-sized chunks
    (:func:`~amortized3d.generators.mlp.chunked_mlp` on :func:`~amortized3d.generators.mlp.fuse_heads`;
    2-3x faster forward+backward on CPU); False keeps the previous two
    :func:`~amortized3d.generators.mlp.batched_mlp` passes (equal within fp32 rounding; tests).
    """

    kind: FieldKind = "sdf"

    def __init__(
        self,
        encoding: HashGridEncoding,
        instance_ids: Tensor | None,
        sdf_weights: Sequence[Tensor],
        rgb_weights: Sequence[Tensor],
        activation: Activation = "relu",
        sdf_bias: SdfBias = "sphere",
        sdf_bias_radius: float = 0.5,
        fused_mlp: bool = False,
        table: Tensor | None = None,
    ) -> None:
        if sdf_bias not in ("sphere", "none"):
            raise ValueError(f"sdf_bias must be sphere|none, got {sdf_bias!r}")
        self.encoding = encoding
        self.instance_ids = instance_ids
        self.sdf_weights = list(sdf_weights)
        self.rgb_weights = list(rgb_weights)
        self.activation: Activation = activation
        self.sdf_bias = sdf_bias
        self.sdf_bias_radius = sdf_bias_radius
        self.fused_mlp = bool(fused_mlp)
        self.table = table

    @property
    def batch_size(self) -> int:
        return self.sdf_weights[0].shape[0]

    def _features(self, points: Tensor) -> tuple[Tensor, Tensor]:
        if points.shape[0] != self.batch_size or points.shape[-1] != 3:
            raise ValueError(f"expected points [{self.batch_size},...,3], got {tuple(points.shape)}")
        flat = points.reshape(self.batch_size, -1, 3)
        return flat, self.encoding(flat, self.instance_ids, table=self.table).to(self.sdf_weights[0].dtype)

    def query_geometry(self, points: Tensor) -> Tensor:
        """points [B,...,3] -> sdf [B,...]: ``query``'s SDF (to rounding) without the albedo head."""
        flat, feats = self._features(points)
        mlp = chunked_mlp if self.fused_mlp else batched_mlp
        sdf = mlp(feats, self.sdf_weights, self.activation)[..., 0]
        if self.sdf_bias == "sphere":
            sdf = sdf + sphere_sdf(flat, self.sdf_bias_radius)
        return sdf.reshape(points.shape[:-1])

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points [B,...,3] -> (sdf [B,...], albedo [B,...,3] in [0,1])."""
        lead = points.shape[:-1]
        flat, feats = self._features(points)
        if self.fused_mlp:
            out = chunked_mlp(feats, fuse_heads([self.sdf_weights, self.rgb_weights]), self.activation)
            sdf, albedo = out[..., 0], torch.sigmoid(out[..., 1:])
        else:
            sdf = batched_mlp(feats, self.sdf_weights, self.activation)[..., 0]
            albedo = torch.sigmoid(batched_mlp(feats, self.rgb_weights, self.activation))
        if self.sdf_bias == "sphere":
            sdf = sdf + sphere_sdf(flat, self.sdf_bias_radius)
        return sdf.reshape(lead), albedo.reshape(*lead, 3)
