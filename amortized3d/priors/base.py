"""The 2D diffusion prior interface shared by the analytic prior and Stable Diffusion.

One classifier-free-guidance convention everywhere (diffusers):
``eps = eps_uncond + s * (eps_cond - eps_uncond)``; ``s = 1`` is conditional only and
``s = 0`` unconditional only (each evaluates a single branch).
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

from torch import Tensor, nn

from amortized3d.priors.schedule import NoiseSchedule


class Prior(nn.Module, abc.ABC):
    """A frozen denoiser in some image space (pixels or VAE latents)."""

    schedule: NoiseSchedule

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.schedule.alphas_cumprod

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of ``encode``'s output."""

    @abc.abstractmethod
    def encode(self, rgb: Tensor) -> Tensor:
        """Differentiable map of renders [N,3,H,W] in [0,1] to the prior's x0 space."""

    @abc.abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """Map x0 back to images [N,3,h,w] in [0,1] (for visualisation and SDI)."""

    @abc.abstractmethod
    def text_condition(self, prompts: Sequence[str], view_labels: Sequence[str] | None = None) -> Any:
        """An opaque condition object for ``predict_noise`` (one entry per prompt)."""

    def camera_condition(self, prompts: Sequence[str], cameras: Any) -> Any:
        """``text_condition`` for renders from ``cameras`` (a ``CameraBatch``): by default their view
        labels; priors that need more of the camera (SD's Perp-Neg: the azimuth) override it."""
        return self.text_condition(prompts, cameras.view_labels())

    @abc.abstractmethod
    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Any, guidance_scale: float) -> Tensor:
        """Classifier-free-guided epsilon prediction at integer timesteps ``t`` [N]."""

    def cond_uncond_eps(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        """(conditional eps, unconditional eps); priors with a batched network override this with one pass."""
        return self.predict_noise(x_t, t, cond, 1.0), self.predict_noise(x_t, t, cond, 0.0)

    def conditional_eps_pair(self, x_t: Tensor, t: Tensor, cond_a: Any, cond_b: Any) -> tuple[Tensor, Tensor]:
        """Conditional-only eps under two conditions (CSD's prompt vs negative prompt)."""
        return self.predict_noise(x_t, t, cond_a, 1.0), self.predict_noise(x_t, t, cond_b, 1.0)

    def prompt_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """The denoiser's own text embedding of each prompt (no view suffix), e.g. SD's CLIP tokens
        [N,77,E]: what a score model that fine-tunes this prior (LoRA) is conditioned on.
        Optional: priors whose score models take the generator's pooled embedding need not have it."""
        raise NotImplementedError(f"{type(self).__name__} has no prompt embeddings for score models")
