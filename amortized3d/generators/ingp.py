"""Per-prompt instant-NGP: one hash grid and one pair of MLP heads per training prompt.

This is the non-amortized baseline (DreamFusion/Magic3D-style optimisation of one field per
prompt), batched so that B prompts still train in one pass: the P hash grids are instances
of one HashGridEncoding and the P networks are stacked parameters [P, out, in] gathered by
prompt id. It cannot represent prompts it was not trained on.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from amortized3d.generators.base import Generator
from amortized3d.generators.encodings import HashGridEncoding
from amortized3d.generators.fields import HashGridField, SdfBias
from amortized3d.generators.mlp import Activation, kaiming_weights, mlp_shapes


class IngpGenerator(Generator):
    """``forward(text_emb, prompt_ids) -> HashGridField``; uses prompt_ids, ignores text."""

    field_kind = "sdf"
    supports_unseen_prompts = False

    def __init__(
        self,
        num_prompts: int,
        encoding: Mapping[str, Any] | None = None,
        mlp_hidden: int = 64,
        activation: Activation = "relu",
        sdf_bias: SdfBias = "sphere",
        sdf_bias_radius: float = 0.5,
        fused_mlp: bool = False,
    ) -> None:
        super().__init__()
        enc_kwargs = dict(encoding or {})
        enc_kwargs["num_instances"] = num_prompts  # one table per prompt, whatever the config
        self.num_prompts = num_prompts
        self.encoding = HashGridEncoding(**enc_kwargs)
        feat = self.encoding.output_dim
        self.sdf_layers = nn.ParameterList(
            [nn.Parameter(w) for w in kaiming_weights(mlp_shapes(feat, mlp_hidden, 1), num_prompts)])
        self.rgb_layers = nn.ParameterList(
            [nn.Parameter(w) for w in kaiming_weights(mlp_shapes(feat, mlp_hidden, 3), num_prompts)])
        self.activation: Activation = activation
        self.sdf_bias: SdfBias = sdf_bias
        self.sdf_bias_radius = sdf_bias_radius
        # True: both heads as one chunked network (fields.HashGridField; 2-3x faster MLPs on CPU,
        # equal to the two-head path to 1e-10 in float64). Off by default: one 300-step quickstart
        # with it (and skipping off) ended at R@1 0.69 (docs/results.md, session 7) and it has not
        # been re-run on idle cores; with renderer.skip_empty_space it reached 1.000 / 0.926.
        self.fused_mlp = bool(fused_mlp)

    def forward(self, text_emb: Tensor | None, prompt_ids: Tensor, z: Tensor | None = None) -> HashGridField:
        ids = prompt_ids.long()
        if ids.dim() != 1:
            raise ValueError(f"prompt_ids must be [B], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_prompts):
            raise IndexError(f"prompt ids must lie in [0, {self.num_prompts}); per-prompt iNGP "
                             "cannot represent unseen prompts")
        return HashGridField(
            self.encoding, ids,
            sdf_weights=[w[ids] for w in self.sdf_layers],
            rgb_weights=[w[ids] for w in self.rgb_layers],
            activation=self.activation, sdf_bias=self.sdf_bias,
            sdf_bias_radius=self.sdf_bias_radius, fused_mlp=self.fused_mlp)

    def parameter_groups(self) -> list[dict]:
        return [
            {"name": "encoding", "params": list(self.encoding.parameters())},
            {"name": "network", "params": [*self.sdf_layers, *self.rgb_layers]},
        ]
