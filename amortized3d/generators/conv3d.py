"""3DConv-net (ScaleDreamer §3-4 after CC3D): text (+ Gaussian z) -> a generated feature voxel grid.

    z [B,64] (+ pooled text [B,E]) -> mapping -> w [B,256]
    w -> synthesis (learned 4^3 x 512 constant, x2 blocks of modulated 3x3x3 convs, ToFeatures
         skips; stylegan3d.py) -> volume [B, channels, resolution^3]   (128^3 x 32 by default)
    field(x) = heads(trilinear(volume, x)): sdf 32->64->1 (+ sphere bias), albedo 32->64->3

The volume is generated once per prompt per forward call and shared by every view and ray
sample rendered from the returned field. ``z`` is drawn fresh every training step by the
system (``sample_latent`` with the step-keyed RNG, so a resumed run draws the same z); when
no z is given (evaluation, export) the generator uses its fixed ``eval_z`` buffer, so a
prompt always maps to the same shape. The generator only consumes the text embedding tensor;
it is agnostic to which prior (and text encoder) produced it.

``num_particles`` = n > 1 is the z counterpart of the per-prompt iNGP's particles (issue 19:
"for 3DConv-net the latent z plays this role"): evaluation, export (``particle=i``) and the
diversity block see n fixed draws z_0 = eval_z, z_1..z_{n-1} ~ N(0, I) per prompt, the same
draws for every prompt (generators/particles.py selects one). Training is unchanged: every
step still draws a fresh z, so n changes nothing a run learns.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from amortized3d.generators.base import Generator
from amortized3d.generators.fields import SdfBias
from amortized3d.generators.stylegan3d import MappingNetwork, SynthesisNetwork
from amortized3d.generators.voxel_field import VoxelField


def _head(in_dim: int, hidden: int, out_dim: int, init_scale: float) -> nn.Sequential:
    """Bias-free MLP in -> hidden -> out (like threestudio's VanillaMLP); last layer scaled at init."""
    head = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, out_dim, bias=False))
    with torch.no_grad():
        head[2].weight.mul_(init_scale)
    return head


class Conv3dGenerator(Generator):
    """``forward(text_emb [B,E], prompt_ids=None, z [B,z_dim] | None) -> VoxelField``."""

    field_kind = "sdf"
    supports_unseen_prompts = True

    def __init__(
        self,
        text_dim: int = 1024,
        z_dim: int = 64,
        w_dim: int = 256,
        mapping_layers: int = 2,
        normalize_text: bool = True,
        resolution: int = 128,
        channels: int = 32,
        channel_base: int = 8192,
        channel_max: int = 512,
        channel_multiplier: int = 1,
        const_bias_resolution: int = 64,
        noise: bool = True,
        conv_clamp: float | None = 256.0,
        gradient_checkpointing: bool = False,
        mlp_hidden: int = 64,
        head_init_scale: float = 0.1,
        bound: float = 2.0,
        sdf_bias: SdfBias = "sphere",
        sdf_bias_radius: float = 0.8,
        eval_z_seed: int = 0,
        num_particles: int = 1,
    ) -> None:
        super().__init__()
        if sdf_bias not in ("sphere", "none"):
            raise ValueError(f"sdf_bias must be sphere|none, got {sdf_bias!r}")
        if int(num_particles) < 1:
            raise ValueError(f"num_particles (z draws at evaluation) must be >= 1, got {num_particles}")
        self.text_dim, self.z_dim = text_dim, z_dim
        self.mapping = MappingNetwork(z_dim, text_dim, w_dim, mapping_layers, normalize_text)
        self.synthesis = SynthesisNetwork(
            w_dim, resolution, channels, channel_base=channel_base, channel_max=channel_max,
            channel_multiplier=channel_multiplier, const_bias_resolution=const_bias_resolution, noise=noise,
            conv_clamp=conv_clamp, gradient_checkpointing=gradient_checkpointing)
        # Why scale the heads' last layers down: the generated features are O(1) at init, so full-
        # scale heads would start every prompt as a random blob instead of the bias sphere.
        self.sdf_head = _head(channels, mlp_hidden, 1, head_init_scale)
        self.rgb_head = _head(channels, mlp_hidden, 3, head_init_scale)
        # The evaluation latent: a fixed draw from N(0, I) (z = 0 is off the training distribution,
        # which lives on the sphere ||z||^2 ~ z_dim after normalisation). Stored in checkpoints.
        rng = torch.Generator().manual_seed(eval_z_seed)
        self.register_buffer("eval_z", torch.randn(z_dim, generator=rng))
        # The other evaluation draws continue the same RNG, so z_0 = eval_z is the draw a one-particle run
        # uses. Not persistent: they are a function of (eval_z_seed, n), and checkpoints keep their keys.
        self.num_particles = int(num_particles)
        self.eval_particle = 0  # which draw forward() uses without z (generators/particles.py sets it)
        self.register_buffer("particle_z", torch.randn(self.num_particles - 1, z_dim, generator=rng),
                             persistent=False)
        self.bound, self.sdf_bias, self.sdf_bias_radius = float(bound), sdf_bias, sdf_bias_radius

    def sample_latent(self, batch: int, rng: torch.Generator | None = None) -> Tensor:
        """A fresh z ~ N(0, I) per prompt, [batch, z_dim] (the system passes its step-keyed RNG)."""
        return torch.randn(batch, self.z_dim, generator=rng).to(self.eval_z)

    def evaluation_latent(self, particle: int | None = None) -> Tensor:
        """The fixed z [z_dim] of evaluation draw ``particle`` (default: ``eval_particle``); draw 0 is eval_z."""
        i = self.eval_particle if particle is None else int(particle)
        if not 0 <= i < self.num_particles:
            raise IndexError(f"z draw {i} of {self.num_particles} (generator.num_particles sets how many)")
        return self.eval_z if i == 0 else self.particle_z[i - 1]

    def generate_volume(self, text_emb: Tensor, z: Tensor | None = None) -> Tensor:
        """text [B,E] (+ z [B,z_dim]) -> feature volume [B, channels, R, R, R]."""
        if text_emb.dim() != 2 or text_emb.shape[-1] != self.text_dim:
            raise ValueError(f"text_emb must be [B,{self.text_dim}], got {tuple(text_emb.shape)}")
        b = text_emb.shape[0]
        if z is None:
            z = self.evaluation_latent().expand(b, -1)
        elif z.shape != (b, self.z_dim):
            raise ValueError(f"z must be [{b},{self.z_dim}], got {tuple(z.shape)}")
        w = self.mapping(z.to(self.eval_z.dtype), text_emb.to(self.eval_z.dtype))
        return self.synthesis(w)

    def parameter_groups(self) -> list[dict]:
        """``network`` (mapping + synthesis) and ``heads`` (the SDF / albedo MLPs), for
        ``system.optimizer.group_lr``."""
        heads = [*self.sdf_head.parameters(), *self.rgb_head.parameters()]
        head_ids = {id(p) for p in heads}
        network = [p for p in self.parameters() if id(p) not in head_ids and p.requires_grad]
        return [{"name": "network", "params": network}, {"name": "heads", "params": heads}]

    def forward(self, text_emb: Tensor, prompt_ids: Tensor | None = None, z: Tensor | None = None) -> VoxelField:
        return VoxelField(self.generate_volume(text_emb, z), self.sdf_head, self.rgb_head, self.bound,
                          self.sdf_bias, self.sdf_bias_radius)
