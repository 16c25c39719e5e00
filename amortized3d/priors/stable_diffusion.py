"""Stable Diffusion (default: 2.1-base) as a frozen latent prior behind the ``Prior`` interface.

x0 space: VAE latents times the VAE's scaling factor, [4, 64, 64] for 512 px. ``encode`` resizes
renders of any resolution to ``vae_resolution`` and runs the VAE encoder *with* gradients (the
distillation gradient reaches the renders through it, as in DreamFusion-style SD guidance);
``rgb_as_latents`` instead maps a render resized to the latent resolution through a per-pixel
affine fit of the encoder (cheap low-resolution stages, threestudio's ``rgb_as_latents`` for
3-channel renders). The UNet predicts eps or v (SD-2.1 768 px is v): both are returned as eps.
CFG in the diffusers convention, eps_u + s (eps_c - eps_u), with view-dependent prompts, a
negative prompt as the unconditional branch and optional Perp-Neg (threestudio's scheme,
sd_conditioning.py; it needs the cameras' azimuths, hence ``camera_condition``). Scale 1 is the
conditional branch alone and 0 the unconditional one, with Perp-Neg on or off.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from amortized3d.checkpoint_io import CheckpointError, load_torch, save_torch
from amortized3d.fingerprint import tensors_fingerprint
from amortized3d.priors.base import Prior
from amortized3d.priors.schedule import NoiseSchedule, cfg_mix
from amortized3d.priors.sd_conditioning import (PERP_NEG_VIEWS, SDCondition, combine_perp_neg, perp_neg_mixing,
                                                view_prompt)
from amortized3d.sd_loading import (configure_attention, fit_tokenizer_length, freeze, load_component,
                                           load_unet_vae_scheduler, resolve_device, resolve_dtype)
from amortized3d.text.clip import clip_outputs, register_text_model, shared_text_model, tokenize

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
log = logging.getLogger(__name__)
# rgb_as_latents fits by VAE-weights digest: a second prior in the same process (evaluation, tests) does
# not refit; ``rgb_to_latent_cache_dir`` carries them across processes (starts and resumes).
_RGB_TO_LATENT_FITS: dict[str, Tensor] = {}
_FIT_COLOURS = 64


class StableDiffusionPrior(Prior):
    def __init__(self, pretrained_model_name_or_path: str = DEFAULT_MODEL, revision: str | None = None,
                 local_files_only: bool = False, dtype: str = "auto", device: str = "auto",
                 attention: str = "sdpa", vae_resolution: int = 512, rgb_as_latents: bool = False,
                 view_dependent: bool = True, view_template: str = "{prompt}, {view} view",
                 negative_prompt: str = "", perp_neg: bool = False, perp_neg_weight: float = 1.0,
                 perp_neg_decay: dict | None = None, text_cache_size: int = 1024,
                 rgb_to_latent_cache_dir: str | None = None):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.name_or_path = str(pretrained_model_name_or_path)
        # Loaded where the dtype is decided; Lightning moves the module to its device later.
        self.dtype = resolve_dtype(dtype, resolve_device(device))
        common = {"revision": revision, "local_files_only": local_files_only}
        self.unet, self.vae, scheduler = load_unet_vae_scheduler(self.name_or_path, self.dtype, **common)
        configure_attention(self.unet, attention)
        self.tokenizer = load_component(CLIPTokenizer, self.name_or_path, "tokenizer", **common)
        # The generators' text encoder (text/clip.py) may already hold this network (a cold embedding
        # cache loads it): use that copy, whatever its dtype (tokens are cast to ours), not a second one.
        shared = shared_text_model(self.name_or_path, revision, "text_encoder")
        self.text_encoder = shared if shared is not None else register_text_model(
            self.name_or_path, revision, "text_encoder",
            freeze(load_component(CLIPTextModel, self.name_or_path, "text_encoder", torch_dtype=self.dtype, **common)))
        fit_tokenizer_length(self.tokenizer, self.text_encoder.config)
        self.schedule = NoiseSchedule.from_diffusers(scheduler)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{self.name_or_path}: unsupported prediction_type {self.prediction_type!r}")
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if vae_resolution % self.vae_scale:
            raise ValueError(f"vae_resolution {vae_resolution} must be a multiple of {self.vae_scale}")
        self.vae_resolution, self.rgb_as_latents = int(vae_resolution), bool(rgb_as_latents)
        self.view_dependent, self.view_template = bool(view_dependent), view_template
        self.negative_prompt = negative_prompt or ""
        self.perp_neg, self.perp_neg_weight = bool(perp_neg), float(perp_neg_weight)
        self.perp_neg_decay = {k: tuple(v) for k, v in (perp_neg_decay or {}).items()}  # threestudio's by default
        if self.perp_neg and not self.view_dependent:
            raise ValueError("perp_neg needs view_dependent prompts (as threestudio asserts)")
        self.text_cache_size = int(text_cache_size)
        self._token_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.register_buffer("rgb_to_latent", torch.empty(0), persistent=False)  # [C,4] affine fit, lazy
        self.rgb_to_latent_cache_dir = Path(rgb_to_latent_cache_dir).expanduser() if rgb_to_latent_cache_dir else None

    # --- x0 space ---------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.vae_resolution // self.vae_scale
        return (int(self.unet.config.in_channels), side, side)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode(self, rgb: Tensor) -> Tensor:
        """Renders [N,3,H,W] in [0,1] -> scaled latents [N,4,h,w] (float32), differentiable."""
        if self.rgb_as_latents:
            return self._affine_latents(rgb)
        size = (self.vae_resolution, self.vae_resolution)
        if rgb.shape[-2:] != size:
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
        # The posterior mean, not a sample: deterministic (resumable) and its noise (std ~1e-2
        # of the latents) only adds variance to an already stochastic gradient.
        dist = self.vae.encode((rgb * 2.0 - 1.0).to(self.dtype)).latent_dist
        return dist.mean.float() * self.scaling_factor

    def decode(self, x0: Tensor) -> Tensor:
        img = self.vae.decode((x0 / self.scaling_factor).to(self.dtype)).sample
        return ((img.float() + 1.0) * 0.5).clamp(0.0, 1.0)

    def _affine_latents(self, rgb: Tensor) -> Tensor:
        _, h, w = self.latent_shape
        if rgb.shape[-2:] != (h, w):
            rgb = F.interpolate(rgb, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if self.rgb_to_latent.numel() == 0:
            self.rgb_to_latent = self.cached_rgb_to_latent().to(self.device)
        m = self.rgb_to_latent.to(rgb)  # [4 (r, g, b, 1), C]
        return torch.einsum("nkhw,kc->nchw", torch.cat([rgb * 2 - 1, torch.ones_like(rgb[:, :1])], 1), m)

    def vae_digest(self) -> str:
        """Fingerprint of the VAE's weights (names, dtypes, shapes, values): what the affine fit depends on."""
        return tensors_fingerprint(self.vae.state_dict())

    def cached_rgb_to_latent(self) -> Tensor:
        """``fit_rgb_to_latent`` once per VAE: from this process' memo, else the cache dir, else fit (and store).
        The fit is 72 VAE encodes (25.6-30.8 s at SD-2.1 size on a 2-core CPU), and was redone at every start;
        the weights digest costs ~1 s there."""
        key = f"{self.vae_digest()}-c{_FIT_COLOURS}-s{self.scaling_factor:g}"
        if key in _RGB_TO_LATENT_FITS:
            return _RGB_TO_LATENT_FITS[key].clone()
        path = None if self.rgb_to_latent_cache_dir is None else self.rgb_to_latent_cache_dir / f"{key}.pt"
        if path is not None and path.is_file():
            try:
                fit = load_torch(path, map_location="cpu")  # checksummed, weights_only
                log.info("rgb_as_latents: affine RGB -> latent map loaded from %s", path)
            except CheckpointError as err:  # a corrupt entry is refit, not fatal
                log.warning("rgb_as_latents: ignoring unreadable %s (%s); refitting", path, err)
                fit = None
            if fit is not None:
                _RGB_TO_LATENT_FITS[key] = fit
                return fit.clone()
        fit = self.fit_rgb_to_latent(_FIT_COLOURS).cpu()
        _RGB_TO_LATENT_FITS[key] = fit
        if path is not None:
            save_torch(fit, path)  # atomic: concurrent ranks never read half a file
            log.info("rgb_as_latents: affine RGB -> latent map fitted and stored at %s", path)
        return fit.clone()

    @torch.no_grad()
    def fit_rgb_to_latent(self, num_colours: int = _FIT_COLOURS) -> Tensor:
        """Least-squares affine map [r, g, b, 1] -> latent of flat-colour images through the VAE."""
        g = torch.Generator().manual_seed(0)
        colours = torch.cat([torch.rand(num_colours, 3, generator=g),
                             torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)]).float()])
        side = 8 * self.vae_scale
        imgs = colours[:, :, None, None].expand(-1, -1, side, side).to(self.device)
        lat = self.vae.encode((imgs * 2 - 1).to(self.dtype)).latent_dist.mean.float().mean((2, 3))
        design = torch.cat([colours * 2 - 1, torch.ones(len(colours), 1)], 1).to(lat)
        return torch.linalg.lstsq(design, lat * self.scaling_factor).solution  # [4, C]

    # --- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Token embeddings [N,77,E] of the prompts as given (no view suffix), LRU-cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._token_cache))
        if missing:
            _, tokens = clip_outputs(self.text_encoder, tokenize(self.tokenizer, missing))
            for p, emb in zip(missing, tokens):
                self._token_cache[p] = emb
        for p in prompts:
            self._token_cache.move_to_end(p)
        out = torch.stack([self._token_cache[p] for p in prompts]).to(self.device, self.dtype)
        while len(self._token_cache) > max(self.text_cache_size, len(prompts)):
            self._token_cache.popitem(last=False)
        return out

    def text_condition(self, prompts: Sequence[str], view_labels: Sequence[str] | None = None,
                       azimuth_deg: Tensor | Sequence[float] | None = None) -> SDCondition:
        """View-dependent condition; with ``perp_neg`` the cameras' azimuths (degrees) are needed too
        (threestudio's interpolated positive and weighted negatives, sd_conditioning.py)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        views: list[str | None] = [None] * len(prompts)
        if view_labels is not None and self.view_dependent:
            views = list(view_labels)
            if len(views) != len(prompts):
                raise ValueError(f"{len(views)} view labels for {len(prompts)} prompts")
        uncond = self.prompt_embeddings([self.negative_prompt] * len(prompts))
        if not (self.perp_neg and view_labels is not None):
            cond = self.prompt_embeddings([view_prompt(p, v, self.view_template) for p, v in zip(prompts, views)])
            return SDCondition(cond, uncond)
        if azimuth_deg is None:
            raise ValueError("perp_neg needs the cameras' azimuths: call camera_condition(prompts, cameras) "
                             "or text_condition(prompts, view_labels, azimuth_deg)")
        azimuth = torch.as_tensor(azimuth_deg, dtype=torch.float64).reshape(-1).cpu()
        overhead = torch.tensor([v == "overhead" for v in views])
        mix, neg_idx, weights = perp_neg_mixing(azimuth, overhead, self.perp_neg_decay)
        # [N,4,L,E]: each prompt seen from front, side, back, overhead
        per_view = self.prompt_embeddings([view_prompt(p, v, self.view_template) for p in prompts
                                           for v in PERP_NEG_VIEWS]).reshape(len(prompts), len(PERP_NEG_VIEWS),
                                                                            *uncond.shape[1:])
        cond = torch.einsum("nv,nvle->nle", mix.to(per_view), per_view).to(per_view.dtype)
        negatives = per_view[torch.arange(len(prompts))[:, None], neg_idx]  # [N,2,L,E]
        weights = (self.perp_neg_weight * weights).float()
        blank = torch.tensor([not p.strip() for p in prompts])  # the empty prompt has no views to reject
        weights[blank] = 0.0
        return SDCondition(cond, uncond, negatives, weights.to(self.device))

    def camera_condition(self, prompts: Sequence[str], cameras) -> SDCondition:
        return self.text_condition(prompts, cameras.view_labels(), torch.rad2deg(cameras.azimuth.detach()))

    # --- denoising --------------------------------------------------------------------------------
    def unet_eps(self, x_t: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        """One UNet pass in the network's dtype; eps in float32 whatever the prediction type."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0]).long()
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=tokens.to(self.dtype)).sample.float()
        if self.prediction_type == "v_prediction":
            out = self.schedule.eps_from_v(x_t.float(), out, t)
        return out

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: SDCondition, guidance_scale: float = 1.0) -> Tensor:
        """CFG eps; ``guidance_scale`` 1 is the conditional branch alone and 0 the unconditional one,
        with or without Perp-Neg (whose negatives only enter the guided combination)."""
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(n)
        if guidance_scale == 1:
            return self.unet_eps(x_t, t, cond.cond).to(x_t.dtype)
        if guidance_scale == 0:
            return self.unet_eps(x_t, t, cond.uncond).to(x_t.dtype)
        if cond.negatives is not None:  # one batch-(2+K)N pass: cond, uncond, K negatives per item
            k = cond.negatives.shape[1]
            tokens = torch.cat([cond.cond, cond.uncond, cond.negatives.flatten(0, 1)])
            x = torch.cat([x_t, x_t, x_t.repeat_interleave(k, 0)])
            eps = self.unet_eps(x, torch.cat([t, t, t.repeat_interleave(k, 0)]), tokens)
            eps_c, eps_u, eps_n = eps[:n], eps[n:2 * n], eps[2 * n:].reshape(n, k, *x_t.shape[1:])
            return combine_perp_neg(eps_u, eps_c, eps_n, cond.negative_weights, guidance_scale).to(x_t.dtype)
        eps_c, eps_u = self.cond_uncond_eps(x_t, t, cond)
        return cfg_mix(eps_u, eps_c, guidance_scale).to(x_t.dtype)

    def cond_uncond_eps(self, x_t: Tensor, t: Tensor, cond: SDCondition) -> tuple[Tensor, Tensor]:
        """(eps_c, eps_u) from ONE batch-2N UNet pass (what CFG and CSD need)."""
        return self._paired_tokens_eps(x_t, t, cond.cond, cond.uncond)

    def conditional_eps_pair(self, x_t: Tensor, t: Tensor, cond_a: SDCondition, cond_b: SDCondition
                             ) -> tuple[Tensor, Tensor]:
        """Conditional eps under two conditions from ONE batch-2N UNet pass."""
        return self._paired_tokens_eps(x_t, t, cond_a.cond, cond_b.cond)

    def _paired_tokens_eps(self, x_t: Tensor, t: Tensor, tokens_a: Tensor, tokens_b: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        eps_a, eps_b = self.unet_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([tokens_a, tokens_b])).chunk(2)
        return eps_a.to(x_t.dtype), eps_b.to(x_t.dtype)
