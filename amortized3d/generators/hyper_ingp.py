"""Hyper-iNGP (ATT3D, Lorraine et al. 2023; the ScaleDreamer variant): text -> MLP weights.

One hash grid is shared by all prompts; a small hypernetwork maps the pooled text embedding
to the weights of two bias-free MLPs that read the grid features:

    text [B,E] -> Linear(E,64,bias=False) -> LayerNorm(64) -> SiLU -> Linear(64, W)
    W = weights of  sdf: 32 -> 64 -> 1   and   albedo: 32 -> 64 -> 3   (4352 by default)

Hidden activation of the generated MLPs: ReLU by default (as the fully-fused MLPs of
Instant-NGP/threestudio that the papers use; the grid is only C0 anyway, so SiLU buys no
smoothness), ``activation="silu"`` is available.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from amortized3d.generators.base import Generator
from amortized3d.generators.encodings import HashGridEncoding
from amortized3d.generators.fields import HashGridField, SdfBias
from amortized3d.generators.mlp import (
    Activation, flatten_weights, kaiming_std, kaiming_weights, mlp_shapes, num_weights, split_flat)


class HyperIngpGenerator(Generator):
    """``forward(text_emb [B,E], prompt_ids) -> HashGridField``; prompt_ids are ignored."""

    field_kind = "sdf"
    supports_unseen_prompts = True

    def __init__(
        self,
        text_dim: int = 1024,
        encoding: Mapping[str, Any] | None = None,
        hyper_hidden: int = 64,
        mlp_hidden: int = 64,
        spectral_norm: bool = False,
        text_modulation: float = 0.1,
        activation: Activation = "relu",
        sdf_bias: SdfBias = "sphere",
        sdf_bias_radius: float = 0.5,
        fused_mlp: bool = False,
    ) -> None:
        super().__init__()
        enc_kwargs = dict(encoding or {})
        if enc_kwargs.get("num_instances", 1) != 1:
            raise ValueError("Hyper-iNGP shares one hash grid across prompts (num_instances=1)")
        self.text_dim = text_dim
        self.encoding = HashGridEncoding(**enc_kwargs)
        feat = self.encoding.output_dim
        self.sdf_shapes = mlp_shapes(feat, mlp_hidden, 1)
        self.rgb_shapes = mlp_shapes(feat, mlp_hidden, 3)
        shapes = self.sdf_shapes + self.rgb_shapes
        n_out = num_weights(shapes)

        self.inp = nn.Linear(text_dim, hyper_hidden, bias=False)
        self.norm = nn.LayerNorm(hyper_hidden)
        self.act = nn.SiLU()
        self.out = nn.Linear(hyper_hidden, n_out)
        # Why this init: with a default init, the generated weights' scale is set by the
        # hypernetwork's fan-in, not by the generated layers' (Chang et al. 2020), so some
        # prompts would start with exploding or vanishing MLPs. Instead the bias is ONE
        # Kaiming-initialised weight vector, i.e. every prompt starts from the same working
        # network, and the text term W h (h = SiLU(LN(.)), RMS <= 1) is scaled to a fraction
        # `text_modulation` of each generated layer's Kaiming std, so prompts differ from
        # step 0 (distinct fields, distinct gradients) without text noise dominating.
        row_std = torch.cat([torch.full((o * i,), kaiming_std((o, i))) for o, i in shapes])
        with torch.no_grad():
            self.out.bias.copy_(flatten_weights(kaiming_weights(shapes)))
            self.out.weight.copy_(torch.randn(n_out, hyper_hidden) * (
                text_modulation * row_std[:, None] / hyper_hidden**0.5))
        # Spectral norm (ATT3D needs it with SDS) divides W by sigma(W), which would undo
        # the scaled init above; a fixed gain sigma(W_init) restores the initial function
        # exactly and turns the constraint into a constant Lipschitz bound of the text term.
        gain = torch.linalg.matrix_norm(self.out.weight.detach(), ord=2) if spectral_norm else 1.0
        self.register_buffer("out_gain", torch.as_tensor(gain, dtype=torch.float32))
        if spectral_norm:
            # LayerNorm makes the first layer's scale irrelevant; SN there bounds its gradient.
            self.inp = _spectral_norm(self.inp)
            self.out = _spectral_norm(self.out)
        self.activation: Activation = activation
        self.sdf_bias: SdfBias = sdf_bias
        self.sdf_bias_radius = sdf_bias_radius
        # True: both heads as one chunked network (fields.HashGridField; 2-3x faster MLPs on CPU,
        # equal to the two-head path in float64, also over whole training runs: tests/test_mlp.py).
        # False here; the configs turn it on where quality over seeds was measured
        # (configs/prior_generator/*_hyper_ingp.yaml). In fp32 either path's run is one draw of
        # a process chaotic in rounding (docs/results.md, session 8).
        self.fused_mlp = bool(fused_mlp)

    def generate_weights(self, text_emb: Tensor) -> Tensor:
        """text [B,E] -> flat MLP weights [B, num_weights]."""
        if text_emb.dim() != 2 or text_emb.shape[-1] != self.text_dim:
            raise ValueError(f"text_emb must be [B,{self.text_dim}], got {tuple(text_emb.shape)}")
        h = self.act(self.norm(self.inp(text_emb.to(self.out.bias.dtype))))
        return nn.functional.linear(h, self.out.weight) * self.out_gain + self.out.bias

    def forward(self, text_emb: Tensor, prompt_ids: Tensor | None = None, z: Tensor | None = None) -> HashGridField:
        flat = self.generate_weights(text_emb)
        n_sdf = num_weights(self.sdf_shapes)
        return HashGridField(
            self.encoding, None,
            sdf_weights=split_flat(flat[:, :n_sdf], self.sdf_shapes),
            rgb_weights=split_flat(flat[:, n_sdf:], self.rgb_shapes),
            activation=self.activation, sdf_bias=self.sdf_bias,
            sdf_bias_radius=self.sdf_bias_radius, fused_mlp=self.fused_mlp)

    def parameter_groups(self) -> list[dict]:
        enc = list(self.encoding.parameters())
        enc_ids = {id(p) for p in enc}
        net = [p for p in self.parameters() if id(p) not in enc_ids and p.requires_grad]
        return [{"name": "encoding", "params": enc}, {"name": "network", "params": net}]
