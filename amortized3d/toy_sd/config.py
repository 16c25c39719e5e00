"""What determines a toy Stable Diffusion of the primitives world: one frozen dataclass, hashed for the cache.

Every field changes the saved weights, so every field is in ``digest()``; ``CODE_VERSION`` is bumped when
the training code changes what a config produces (a stale cache entry is then rebuilt, never reused).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

CODE_VERSION = 1
PREDICTION_TYPES = ("epsilon", "v_prediction")
_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def primitives_camera() -> dict[str, list[float]]:
    """The training camera distribution of ``data=primitives`` (text_corpus.yaml overlaid by primitives.yaml):
    the toy's training images are framed exactly as the 3D training renders are."""
    base = OmegaConf.load(_CONFIGS / "data" / "text_corpus.yaml").camera
    world = OmegaConf.load(_CONFIGS / "data" / "primitives.yaml").get("camera", {})
    cam = OmegaConf.to_container(OmegaConf.merge(base, world), resolve=True)
    return {k: [float(x) for x in v] for k, v in cam.items()}


@dataclass(frozen=True)
class ToySDConfig:
    prediction_type: str = "epsilon"
    seed: int = 0
    # --- data: the world's reference renders (scenes/references.py), the analytic prior's own set ---
    resolution: int = 32  # = prior.render.resolution = prior.model.vae_resolution of experiment=toy_sd
    views_per_object: int = 64  # the analytic prior's references (cache shared with it)
    reference_seed: int = 1234  # configs/prior/analytic.yaml's seed: the same 1920 renders
    camera: dict = field(default_factory=primitives_camera)
    empty_caption_fraction: float = 0.1  # classifier-free guidance's unconditional branch
    plain_caption_fraction: float = 0.1  # "a red cube" with no view phrase (prior.model.view_dependent=false)
    # --- VAE: 32 px -> 4 x 8 x 8 latents (factor 4 = 2 ** (3 - 1) down blocks) ---
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    vae_mix_fraction: float = 0.25  # images blended from two references: the encoder sees off-manifold renders
    # --- text encoder: CLIP over the world's vocabulary, trained with the UNet ---
    text_hidden: int = 64
    text_layers: int = 2
    # --- UNet: cross-attention at both levels and in the mid block (the LoRA targets) ---
    unet_channels: tuple[int, ...] = (32, 64)
    unet_steps: int = 1000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    # The regression target is the exact posterior mean of the reference latents under the caption's
    # condition (object and view bucket; all references for the empty caption): the analytic prior's
    # denoiser in latent space, a lower-variance target than the sampled x0.
    target: str = "exact_posterior_mean"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        object.__setattr__(self, "vae_channels", tuple(int(c) for c in self.vae_channels))
        object.__setattr__(self, "unet_channels", tuple(int(c) for c in self.unet_channels))

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_side(self) -> int:
        return self.resolution // self.vae_scale

    def as_dict(self) -> dict:
        return {"code_version": CODE_VERSION, **dataclasses.asdict(self)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes) -> "ToySDConfig":
        return dataclasses.replace(self, **changes)
