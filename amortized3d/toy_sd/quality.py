"""The toy SD's own quality, measured through ``StableDiffusionPrior`` (the code path 3D training uses).

1. Denoising error against the exact denoiser: for reference latents r (the prior's own ``encode`` of
   the world's renders) noised to x_t, the UNet's x0 = (x_t - sqrt(1 - abar) eps_theta) / sqrt(abar)
   against the exact posterior mean E[x0 | x_t, c] of all reference latents allowed by the caption c
   (data.exact_x0), as MSE per latent element (the latents have unit variance), at several t; also in
   eps (x0's error is eps's times (1 - abar) / abar, large at high t for any model).
2. Samples: DDIM (diffusers' DDIMScheduler, 50 steps, eta 0) with CFG 7.5 through ``predict_noise``, per
   prompt and view phrase, decoded by the VAE and scored by the oracle: the nearest reference render
   (pixel MSE over all objects' references) must be of the prompt's object (sample R@1), and of the
   caption's view bucket (view accuracy). A grid PNG of the samples.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from amortized3d.cameras import VIEW_LABELS
from amortized3d.priors.stable_diffusion import StableDiffusionPrior
from amortized3d.scenes.primitives import PrimitivesWorld
from amortized3d.toy_sd.config import ToySDConfig
from amortized3d.toy_sd.data import Captions, exact_x0, reference_images

TIMESTEPS = (50, 200, 400, 600, 800, 950)
SAMPLE_VIEWS = ("front", "side", "back")


def load_prior(model_dir: str | Path, cfg: ToySDConfig) -> StableDiffusionPrior:
    return StableDiffusionPrior(str(model_dir), local_files_only=True, dtype="fp32", device="cpu",
                                vae_resolution=cfg.resolution)


@torch.no_grad()
def denoising_error(prior: StableDiffusionPrior, refs, timesteps: Sequence[int] = TIMESTEPS,
                    per_object: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    latents = torch.cat([prior.encode(refs.images[s:s + 256]) for s in range(0, len(refs.images), 256)])
    captions = Captions.build(refs.object_ids, refs.view_ids)
    picks = torch.cat([torch.nonzero(refs.object_ids == o).flatten()[
        torch.randperm(int((refs.object_ids == o).sum()), generator=g)[:per_object]]
        for o in refs.object_ids.unique()])
    out = {}
    for t in timesteps:
        row = {}
        for kind, cap in (("view_caption", captions.view_caption[picks]),
                          ("empty_caption", torch.full_like(picks, captions.empty_caption))):
            tt = torch.full((len(picks),), int(t))
            noise = torch.randn(latents[picks].shape, generator=g)
            x_t = prior.schedule.add_noise(latents[picks], noise, tt)
            sa = prior.schedule.alphas_cumprod[tt].sqrt()
            x0_exact = exact_x0(x_t, sa, latents, captions.masks[cap])
            tokens = prior.prompt_embeddings([captions.texts[i] for i in cap.tolist()])
            eps_model = prior.unet_eps(x_t, tt, tokens)
            x0_model = prior.schedule.x0_from_eps(x_t, eps_model, tt)
            eps_exact = prior.schedule.eps_from_x0(x_t, x0_exact, tt)
            row[kind] = {"mse_model_vs_exact": float(F.mse_loss(x0_model, x0_exact)),
                         "eps_mse_model_vs_exact": float(F.mse_loss(eps_model, eps_exact)),
                         "mse_exact_vs_clean": float(F.mse_loss(x0_exact, latents[picks])),
                         "mse_model_vs_clean": float(F.mse_loss(x0_model, latents[picks]))}
        out[str(int(t))] = row
    return out


@torch.no_grad()
def sample(prior: StableDiffusionPrior, prompts: Sequence[str], views: Sequence[str | None], model_dir: str | Path,
           guidance_scale: float = 7.5, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """DDIM samples decoded to RGB [N,3,H,W] in [0,1], one per (prompt, view)."""
    from diffusers import DDIMScheduler

    # predict_noise returns eps whatever the UNet predicts, so the sampler steps in eps.
    sched = DDIMScheduler.from_pretrained(str(model_dir), subfolder="scheduler", prediction_type="epsilon")
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    cond = prior.text_condition(list(prompts), list(views) if views[0] is not None else None)
    x = torch.randn(len(prompts), *prior.latent_shape, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = prior.predict_noise(x, t.reshape(1).expand(len(prompts)), cond, guidance_scale)
        x = sched.step(eps, t, x).prev_sample
    return prior.decode(x)


def nearest_reference(images: torch.Tensor, refs) -> tuple[torch.Tensor, torch.Tensor]:
    """(object id, view id) of each image's nearest reference render (pixel MSE)."""
    a = images.flatten(1)
    r = refs.images.to(a).flatten(1)
    d = (a * a).sum(1, keepdim=True) - 2 * a @ r.T + (r * r).sum(1)[None]
    idx = d.argmin(1)
    return refs.object_ids[idx], refs.view_ids[idx]


def measure(model_dir: str | Path, cfg: ToySDConfig, cache_dir: str | None, out_dir: str | Path | None = None,
            guidance_scale: float = 7.5, steps: int = 50) -> dict:
    """Everything above; writes ``quality.json`` and ``samples.png`` to ``out_dir`` (default: model_dir)."""
    from torchvision.utils import save_image

    out_dir = Path(out_dir or model_dir)
    prior = load_prior(model_dir, cfg)
    refs = reference_images(cfg.resolution, cfg.views_per_object, cfg.camera, cache_dir, cfg.reference_seed)
    world = PrimitivesWorld()
    prompts = world.prompts()
    held = set(world.held_out_prompts())
    rep_prompts = [p for p in prompts for _ in SAMPLE_VIEWS]
    rep_views = [v for _ in prompts for v in SAMPLE_VIEWS]
    images = sample(prior, rep_prompts, rep_views, model_dir, guidance_scale, steps)
    obj, view = nearest_reference(images, refs)
    want_obj = world.object_ids(rep_prompts)
    want_view = torch.tensor([VIEW_LABELS.index(v) for v in rep_views])
    hit = (obj == want_obj).float()
    per_prompt = {p: float(hit[i * len(SAMPLE_VIEWS):(i + 1) * len(SAMPLE_VIEWS)].mean()) for i, p in enumerate(prompts)}
    corpus_train = [p for p in prompts if p not in held]
    big = F.interpolate(images, scale_factor=2, mode="nearest")
    save_image(big, out_dir / "samples.png", nrow=len(SAMPLE_VIEWS) * 6, padding=1, pad_value=0.5)
    result = {
        "model": str(model_dir),
        "sampler": {"name": "DDIM", "steps": steps, "guidance_scale": guidance_scale, "eta": 0.0,
                    "views": list(SAMPLE_VIEWS), "samples": len(rep_prompts)},
        "sample_r_at_1": float(hit.mean()),
        "sample_r_at_1_corpus_train": sum(per_prompt[p] for p in corpus_train) / len(corpus_train),
        "sample_r_at_1_corpus_held_out": sum(per_prompt[p] for p in held) / len(held),
        "sample_view_accuracy": float((view == want_view).float().mean()),
        "per_prompt_r_at_1": per_prompt,
        "denoising_error": denoising_error(prior, refs),
    }
    (out_dir / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
