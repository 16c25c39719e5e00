"""Batched bias-free MLPs: B different small networks evaluated in one pass.

Both iNGP generators end in the same heads (features 32 -> 64 -> 1 for the SDF, 32 -> 64 -> 3
for albedo) but with *per-field* weights: gathered per prompt (per-prompt iNGP) or generated
from text (Hyper-iNGP). Weights are therefore plain tensors [B, out, in] applied with bmm,
never nn.Linear modules.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["relu", "silu"]
LayerShape = tuple[int, int]  # (out_features, in_features), like nn.Linear.weight


def mlp_shapes(in_dim: int, hidden: int, out_dim: int, n_hidden_layers: int = 1) -> list[LayerShape]:
    """Weight shapes of a bias-free MLP in -> hidden (x n_hidden_layers) -> out."""
    dims = [in_dim] + [hidden] * n_hidden_layers + [out_dim]
    return [(dims[i + 1], dims[i]) for i in range(len(dims) - 1)]


def num_weights(shapes: Sequence[LayerShape]) -> int:
    return sum(o * i for o, i in shapes)


def kaiming_std(shape: LayerShape) -> float:
    """He-normal std sqrt(2 / fan_in). Used for SiLU too: its gain is close to ReLU's."""
    return math.sqrt(2.0 / shape[1])


def kaiming_weights(shapes: Sequence[LayerShape], batch: int | None = None) -> list[Tensor]:
    """Kaiming-normal weights, [out,in] each, or [batch,out,in] when batch is given."""
    lead = () if batch is None else (batch,)
    return [torch.randn(*lead, *s) * kaiming_std(s) for s in shapes]


def split_flat(flat: Tensor, shapes: Sequence[LayerShape]) -> list[Tensor]:
    """[B, num_weights] -> list of [B, out, in] (row-major, the layout of flatten_weights)."""
    sizes = [o * i for o, i in shapes]
    chunks = flat.split(sizes, dim=-1)
    return [c.reshape(*flat.shape[:-1], *s) for c, s in zip(chunks, shapes)]


def flatten_weights(weights: Sequence[Tensor]) -> Tensor:
    """Inverse of split_flat for unbatched [out,in] weights -> [num_weights]."""
    return torch.cat([w.reshape(-1) for w in weights])


def batched_mlp(x: Tensor, weights: Sequence[Tensor], activation: Activation = "relu") -> Tensor:
    """x [B,N,in], weights [B,out,in] each -> [B,N,out]; activation between layers only."""
    act = F.relu if activation == "relu" else F.silu
    h = x
    for i, w in enumerate(weights):
        h = torch.bmm(h, w.transpose(1, 2))
        if i < len(weights) - 1:
            h = act(h)
    return h
