"""Per-prompt instant-NGP: one hash grid and one pair of MLP heads per training prompt.

This is the non-amortized baseline (DreamFusion/Magic3D-style optimisation of one field per
prompt), batched so that B prompts still train in one pass: the P hash grids are instances
of one HashGridEncoding and the P networks are stacked parameters [P, out, in] gathered by
prompt id. It cannot represent prompts it was not trained on.

``num_particles`` = n > 1 gives every prompt n independent fields (ProlificDreamer §3.2: VSD's
particles {theta^(i)}, sharing the guidance's one score model): instance ``prompt * n + i`` is particle
i of the prompt, so n = 1 is exactly the previous generator (same shapes, same initial draw). Each
training step renders ONE particle per prompt, drawn uniformly from the step-keyed RNG, as
ProlificDreamer's Algorithm 1 does ("randomly sample theta ~ {theta^(i)}", App. E): a step costs what an
n = 1 step costs, and a resumed run draws the same particles. ``z`` carries the particle ids [B];
without it (evaluation, export) the field is particle ``eval_particle`` (generators/particles.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
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
        num_particles: int = 1,
    ) -> None:
        super().__init__()
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        self.num_particles = int(num_particles)
        self.eval_particle = 0  # the particle forward() returns without z (not state: set per call)
        instances = num_prompts * self.num_particles
        enc_kwargs = dict(encoding or {})
        enc_kwargs["num_instances"] = instances  # one table per prompt and particle, whatever the config
        self.num_prompts = num_prompts
        self.encoding = HashGridEncoding(**enc_kwargs)
        feat = self.encoding.output_dim
        self.sdf_layers = nn.ParameterList(
            [nn.Parameter(w) for w in kaiming_weights(mlp_shapes(feat, mlp_hidden, 1), instances)])
        self.rgb_layers = nn.ParameterList(
            [nn.Parameter(w) for w in kaiming_weights(mlp_shapes(feat, mlp_hidden, 3), instances)])
        self.activation: Activation = activation
        self.sdf_bias: SdfBias = sdf_bias
        self.sdf_bias_radius = sdf_bias_radius
        # True: both heads as one chunked network (fields.HashGridField; 2-3x faster MLPs on CPU,
        # equal to the two-head path to 1e-10 in float64). Off by default: one 300-step quickstart
        # with it (and skipping off) ended at R@1 0.69 (docs/results.md, session 7) and it has not
        # been re-run on idle cores; with renderer.skip_empty_space it reached 1.000 / 0.926.
        self.fused_mlp = bool(fused_mlp)

    def sample_latent(self, batch: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Which particle each of ``batch`` prompts renders this step (uniform, Alg. 1 line 3); None for
        n = 1, where nothing is drawn, so one-particle runs consume the RNG exactly as before."""
        if self.num_particles == 1:
            return None
        return torch.randint(self.num_particles, (batch,), generator=generator)

    def forward(self, text_emb: Tensor | None, prompt_ids: Tensor, z: Tensor | None = None) -> HashGridField:
        ids = prompt_ids.long()
        if ids.dim() != 1:
            raise ValueError(f"prompt_ids must be [B], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_prompts):
            raise IndexError(f"prompt ids must lie in [0, {self.num_prompts}); per-prompt iNGP "
                             "cannot represent unseen prompts")
        particle = (z.to(ids.device).long().reshape(-1) if z is not None
                    else torch.full_like(ids, int(self.eval_particle)))
        if particle.shape != ids.shape or (particle.numel() and (int(particle.min()) < 0
                                                                or int(particle.max()) >= self.num_particles)):
            raise IndexError(f"particle ids {particle.tolist()} for prompts {ids.tolist()}: need one per prompt in "
                             f"[0, {self.num_particles})")
        ids = ids * self.num_particles + particle  # the instance of (prompt, particle)
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
