"""Trainable score models eps_phi(x_t, t, y, c) for the VSD family (VSD, L-VSD, L²-VSD).

VSD (ProlificDreamer, Eq. 9) estimates the score of the distribution of the *current renders*
with a second diffusion model trained by denoising score matching on those renders (Eq. 2 of
the L²-VSD paper). This module holds that model behind one small interface:

- ``predict_noise`` (= ``forward``, so ``torch.func.functional_call`` returns eps) converts a
  v-prediction to eps through the shared noise schedule;
- ``loss`` is the per-item denoising loss with t ~ U[0, T) and the camera dropped 10% of the
  time (ProlificDreamer's public code), all randomness from a caller-supplied torch.Generator (``rng``);
- ``trainable_parameters`` / ``last_layer_names`` address parameters by name, which L²-VSD
  needs for its forward-mode product (``torch.func.jvp``) and last-layer approximation (§4.2).

Models live in the prior's x0 space (pixels or VAE latents); nothing here assumes pixels.
"""
from __future__ import annotations

import abc
import contextlib
import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortized3d.priors.schedule import NoiseSchedule

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES = ("epsilon", "v_prediction")
CAMERA_DIM = 16  # CameraBatch.embedding(): flattened c2w


class ScoreModel(nn.Module, abc.ABC):
    """eps_phi(x_t, t, cond, camera) trained by denoising score matching."""

    #: Shape of one x0 sample this model accepts, or None for any (checked against the prior).
    sample_shape: tuple[int, ...] | None = None

    def __init__(self, prediction_type: PredictionType = "epsilon", camera_dropout: float = 0.1,
                 schedule: NoiseSchedule | None = None, prior=None):
        """``prior``: the prior this model scores renders for (its noise schedule is shared, so the
        model diffuses exactly like it); configs pass it by building the model as a Hydra
        ``_partial_`` factory that the guidance calls with its prior."""
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if not 0.0 <= camera_dropout <= 1.0:
            raise ValueError(f"camera_dropout must be in [0, 1], got {camera_dropout}")
        self.prediction_type = prediction_type
        self.camera_dropout = float(camera_dropout)
        if prior is not None:
            # The prior's schedule, shared by reference and not registered as this model's submodule:
            # the prior owns (and moves) it, and converting this model (``.double()``) leaves it as is.
            object.__setattr__(self, "schedule", prior.schedule)
        else:
            self.schedule = schedule if schedule is not None else NoiseSchedule.scaled_linear()

    def text_condition(self, text_emb: Tensor | None, prompts: Sequence[str], prior) -> Tensor | None:
        """The ``cond`` this model takes: by default the generator's pooled prompt embedding [N,E];
        a LoRA of the prior takes the prior's own token embeddings instead."""
        return text_emb

    def forward_ad(self) -> contextlib.AbstractContextManager:
        """Context in which ``torch.func.jvp`` runs through this model (L²-VSD); models whose fast
        kernels lack forward-mode rules (fused attention) switch to plain ones here."""
        return contextlib.nullcontext()

    def frozen_state_keys(self) -> set[str]:
        """``state_dict`` keys that are frozen copies of pretrained weights, rebuilt from config and
        never checkpointed (a LoRA's base UNet); empty for models trained from scratch."""
        return set()

    @abc.abstractmethod
    def model_output(self, x_t: Tensor, t: Tensor, cond: Tensor | None, camera: Tensor | None) -> Tensor:
        """The network's raw output: eps or v, depending on ``prediction_type``."""

    def _predicts_v(self) -> bool:
        if self.prediction_type not in PREDICTION_TYPES:  # e.g. a LoRA's "auto" before it has a base
            raise RuntimeError(f"{type(self).__name__}.prediction_type is {self.prediction_type!r}, not resolved yet "
                               "(it is set from the base network when the model is built on it)")
        return self.prediction_type == "v_prediction"

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, camera: Tensor | None = None) -> Tensor:
        out = self.model_output(x_t, t, cond, camera)
        if not self._predicts_v():
            return out
        return self.schedule.eps_from_v(x_t, out, t)  # eps = sqrt(a) v + sqrt(1-a) x_t

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None,
                      camera: Tensor | None = None) -> Tensor:
        """eps_phi at integer timesteps ``t`` [N]; ``cond`` [N,E] text embedding, ``camera`` [N,16]."""
        return self(x_t, t, cond, camera)

    def denoising_loss(self, x0: Tensor, t: Tensor, noise: Tensor, cond: Tensor | None,
                       camera: Tensor | None) -> Tensor:
        """Per-item MSE of the raw output against its target (eps or v) at given t and noise, [N]."""
        x_t = self.schedule.add_noise(x0, noise, t)
        target = self.schedule.v_target(x0, noise, t) if self._predicts_v() else noise
        return (self.model_output(x_t, t, cond, camera) - target).pow(2).flatten(1).mean(dim=1)

    def loss(self, x0: Tensor, cond: Tensor | None, camera: Tensor | None,
             rng: torch.Generator | None = None) -> Tensor:
        """Denoising loss with t ~ U[0, T), fresh noise and camera dropout drawn from ``rng``."""
        n = x0.shape[0]
        t = torch.randint(0, self.schedule.num_train_timesteps, (n,), generator=rng).to(x0.device)
        noise = torch.randn(x0.shape, generator=rng, dtype=x0.dtype).to(x0.device)
        if camera is not None and self.camera_dropout > 0:
            keep = torch.rand(n, generator=rng) >= self.camera_dropout
            camera = camera * keep.to(camera.device, camera.dtype)[:, None]
        return self.denoising_loss(x0, t, noise, cond, camera)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters the VSD-family optimizer trains, by ``named_parameters`` name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    @abc.abstractmethod
    def last_layer_names(self) -> list[str]:
        """Names of the parameters of the output layer (L²-VSD's last-layer approximation, §5.4.2)."""


# --- a small conv UNet for pixel-space priors ---------------------------------------------------

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (DDPM / diffusers convention), [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (time+text+camera) embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(in_ch), in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(out_ch), out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class SmallUNetScoreModel(ScoreModel):
    """A small UNet: one ResBlock per resolution, stride-2 downsampling, nearest upsampling.

    Conditioning is added to the timestep embedding, as in ProlificDreamer's LoRA branch (App. F):
    the text embedding through a Linear, and the camera through a single zero-initialised
    Linear(16 -> emb) (neutral at the start; App. F and the LoRA model use a 2-layer MLP, a single
    layer is this from-scratch model's simplification). The output conv is zero-initialised: the
    model starts at eps = 0 (epsilon) or at the N(0, I)-data answer sqrt(1-abar) x_t (v-prediction).
    """

    def __init__(self, in_channels: int = 3, cond_dim: int = 1024, base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2), resolution: int | None = None,
                 prediction_type: PredictionType = "epsilon", camera_dropout: float = 0.1,
                 schedule: NoiseSchedule | None = None, prior=None):
        super().__init__(prediction_type, camera_dropout, schedule, prior)
        mults = [int(m) for m in channel_mults]
        if not mults:
            raise ValueError("channel_mults needs at least one resolution")
        if resolution is not None and resolution % 2 ** (len(mults) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(mults) - 1} "
                             f"({len(mults)} resolutions)")
        self.in_channels, self.cond_dim, self.base_channels = in_channels, cond_dim, base_channels
        self.sample_shape = None if resolution is None else (in_channels, resolution, resolution)
        emb = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_proj = nn.Linear(cond_dim, emb)
        self.camera_proj = nn.Linear(CAMERA_DIM, emb)
        nn.init.zeros_(self.camera_proj.weight)
        nn.init.zeros_(self.camera_proj.bias)
        chans = [base_channels * m for m in mults]
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = base_channels
        for i, c in enumerate(chans):
            self.down.append(ResBlock(ch, c, emb))
            ch = c
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(ch, ch, emb)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c in reversed(list(enumerate(chans))):
            self.up.append(ResBlock(ch + c, c, emb))
            ch = c
            if i > 0:
                self.upsample.append(nn.Conv2d(c, chans[i - 1], 3, padding=1))
                ch = chans[i - 1]
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embedding(self, t: Tensor, cond: Tensor | None, camera: Tensor | None, like: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(like))
        if cond is not None:
            emb = emb + self.text_proj(cond.to(like))
        if camera is not None:
            emb = emb + self.camera_proj(camera.to(like))
        return emb

    def model_output(self, x_t: Tensor, t: Tensor, cond: Tensor | None, camera: Tensor | None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = self.embedding(t, cond, camera, x_t)
        h = self.conv_in(x_t)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def last_layer_names(self) -> list[str]:
        return ["conv_out.weight", "conv_out.bias"]


# --- a Gaussian "score model" for the D-dimensional toys ---------------------------------------

class GaussianScoreModel(ScoreModel):
    """r(x) = N(mean, L L^T) with learnable mean and lower-triangular factor L; exact eps.

    This is the role r(x) plays in the L²-VSD paper's 2D example (§3.2, App. F): a "LoRA" whose
    parameters are a Gaussian's. For x0 ~ N(mu, S), x_t ~ N(sqrt(a) mu, C_t), C_t = a S + (1-a) I,
    and the MMSE noise prediction is eps = sqrt(1-a) C_t^{-1} (x_t - sqrt(a) mu) (as in
    ``GaussianPrior``). It is trained through the same denoising ``loss`` as any score model.
    Text and camera conditions are ignored (one distribution). Inputs of any shape [N, ...] are
    flattened to D = prod(...).
    """

    def __init__(self, dim: int, mean: Tensor | None = None, scale_tril: Tensor | None = None,
                 init_std: float = 1.0, prediction_type: PredictionType = "epsilon",
                 camera_dropout: float = 0.0, schedule: NoiseSchedule | None = None, prior=None):
        super().__init__(prediction_type, camera_dropout, schedule, prior)
        self.dim = int(dim)
        self.sample_shape = (self.dim,)
        # Identity-scaled init, not the paper's zeros: through S = L L^T a zero L has zero gradient.
        mean = torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32).clone()
        tril = init_std * torch.eye(dim) if scale_tril is None else torch.as_tensor(scale_tril, dtype=torch.float32)
        self.mean = nn.Parameter(mean.reshape(dim))
        self.scale_tril = nn.Parameter(torch.tril(tril).clone())

    def covariance(self) -> Tensor:
        L = torch.tril(self.scale_tril)
        return L @ L.T

    def model_output(self, x_t: Tensor, t: Tensor, cond: Tensor | None, camera: Tensor | None) -> Tensor:
        n = x_t.shape[0]
        x = x_t.reshape(n, -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"GaussianScoreModel of dimension {self.dim} got samples of size {x.shape[1]}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(n)
        a = self.schedule.alphas_cumprod.to(x.device)[t.long()].to(x.dtype)[:, None]  # [N,1]
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        cov_t = a[..., None] * self.covariance().to(x.dtype) + (1 - a)[..., None] * eye
        eps = (1 - a).sqrt() * torch.linalg.solve(cov_t, x - a.sqrt() * self.mean.to(x.dtype))
        if self.prediction_type == "v_prediction":  # v = (eps - sqrt(1-a) x_t) / sqrt(a), inverse of eps_from_v
            eps = (eps - (1 - a).sqrt() * x) / a.sqrt()
        return eps.reshape(x_t.shape)

    def last_layer_names(self) -> list[str]:
        # eps is affine in the mean at fixed covariance: the mean is this model's "output layer".
        return ["mean"]
