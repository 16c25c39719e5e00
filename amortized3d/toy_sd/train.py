"""Train a toy Stable Diffusion of the primitives world and save it in SD-2.1's diffusers layout.

Stages (each a plain PyTorch loop on the project's reference renders):
1. VAE (``AutoencoderKL``): reconstruction MSE + a small KL on the world's renders, a quarter of each
   batch blended from two renders (the encoder must map off-manifold 3D renders somewhere sensible);
   then ``scaling_factor`` = 1 / std of the reference latents, as SD's VAE config carries.
2. UNet (``UNet2DConditionModel``, cross-attention) + CLIP text encoder, jointly, on the scaled reference
   latents with captions (data.py): the regression target of a noisy latent is the exact posterior mean
   of the reference latents under its caption, turned into the scheduler's prediction type:

       eps* = (x_t - sqrt(abar) x0*) / sqrt(1 - abar),   v* = sqrt(abar) eps* - sqrt(1 - abar) x0*.

   EMA weights (decay 0.998) are what is saved.
3. ``StableDiffusionPipeline.save_pretrained``: unet/ vae/ text_encoder/ tokenizer/ scheduler/ and
   model_index.json, read back by ``prior=stable_diffusion`` unchanged.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortized3d.priors.schedule import NoiseSchedule
from amortized3d.text.clip import tokenize
from amortized3d.toy_sd.config import ToySDConfig
from amortized3d.toy_sd.data import Captions, exact_x0, reference_images
from amortized3d.toy_sd.tokenizer import build_world_tokenizer

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, float], None]  # (stage, step, total, loss)


def make_scheduler(cfg: ToySDConfig):
    """SD-2.1-base's noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps) with the chosen prediction type."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                         prediction_type=cfg.prediction_type, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


def make_vae(cfg: ToySDConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=cfg.vae_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=8, sample_size=cfg.resolution)


def make_text_encoder(cfg: ToySDConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    h = cfg.text_hidden
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=4 * h, num_hidden_layers=cfg.text_layers,
        num_attention_heads=4, max_position_embeddings=int(tokenizer.model_max_length), projection_dim=h,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def make_unet(cfg: ToySDConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_side, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=8, norm_num_groups=8)


def _cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


class _EMA:
    def __init__(self, modules: list[nn.Module], decay: float = 0.998):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train_vae(cfg: ToySDConfig, images: Tensor, progress: Progress | None = None) -> tuple[nn.Module, dict]:
    """images [M,3,H,W] in [0,1] -> trained VAE (with ``scaling_factor`` set) and its final losses."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    x_all = images * 2 - 1
    n_mix = int(round(cfg.vae_batch * cfg.vae_mix_fraction))
    rec_ema = None
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _cosine_lr(step, cfg.vae_steps)
        x = x_all[torch.randint(len(x_all), (cfg.vae_batch,), generator=g)]
        if n_mix:
            lam = torch.rand(n_mix, 1, 1, 1, generator=g)
            other = x_all[torch.randint(len(x_all), (n_mix,), generator=g)]
            x = torch.cat([lam * x[:n_mix] + (1 - lam) * other, x[n_mix:]])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec_ema = float(rec_loss.detach()) if rec_ema is None else 0.98 * rec_ema + 0.02 * float(rec_loss.detach())
        if progress:
            progress("vae", step, cfg.vae_steps, rec_ema)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[s:s + 256]).latent_dist.mean for s in range(0, len(x_all), 256)])
        recon = torch.cat([vae.decode(means[s:s + 256]).sample for s in range(0, len(means), 256)])
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    stats = {"reconstruction_mse_refs": float(F.mse_loss(recon, x_all)),
             "reconstruction_psnr_refs_db": float(10 * torch.log10(4.0 / F.mse_loss(recon, x_all))),
             "scaling_factor": scaling}
    return vae, stats


@torch.no_grad()
def encode_latents(vae: nn.Module, images: Tensor) -> Tensor:
    """Scaled posterior-mean latents, exactly what ``StableDiffusionPrior.encode`` computes."""
    sf = float(vae.config.scaling_factor)
    x = images * 2 - 1
    return torch.cat([vae.encode(x[s:s + 256]).latent_dist.mean for s in range(0, len(x), 256)]) * sf


def train_unet(cfg: ToySDConfig, latents: Tensor, captions: Captions, tokenizer,
               progress: Progress | None = None) -> tuple[nn.Module, nn.Module, dict]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    schedule = NoiseSchedule.from_diffusers(make_scheduler(cfg))
    abar = schedule.alphas_cumprod.double()
    unet, text = make_unet(cfg).train(), make_text_encoder(cfg, tokenizer).train()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ema = _EMA([unet, text])
    ids = tokenize(tokenizer, captions.texts)  # [C, 77], the prior's own tokenization
    loss_ema = None
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _cosine_lr(step, cfg.unet_steps)
        ref = torch.randint(len(latents), (cfg.unet_batch,), generator=g)
        cap = captions.sample(ref, cfg.empty_caption_fraction, cfg.plain_caption_fraction, g)
        t = torch.randint(0, schedule.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noise = torch.randn(latents[ref].shape, generator=g)
        sa, s1 = abar[t].sqrt().float(), (1 - abar[t]).sqrt().float()
        x_t = sa[:, None, None, None] * latents[ref] + s1[:, None, None, None] * noise
        x0 = exact_x0(x_t, sa, latents, captions.masks[cap])
        eps = (x_t - sa[:, None, None, None] * x0) / s1[:, None, None, None]
        target = eps if cfg.prediction_type == "epsilon" else sa[:, None, None, None] * eps - s1[:, None, None, None] * x0
        used, inverse = torch.unique(cap, return_inverse=True)
        tokens = text(ids[used]).last_hidden_state[inverse]
        pred = unet(x_t, t, encoder_hidden_states=tokens).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        loss_ema = float(loss.detach()) if loss_ema is None else 0.98 * loss_ema + 0.02 * float(loss.detach())
        if progress:
            progress("unet", step, cfg.unet_steps, loss_ema)
    ema.copy_to()
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return unet, text, {"final_loss_ema": loss_ema}


def rich_progress() -> tuple[Progress, Callable[[], None]]:
    """A rich progress bar per stage (Lightning's RichProgressBar uses the same library)."""
    from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
    tasks: dict[str, int] = {}
    bar.start()

    def update(stage: str, step: int, total: int, loss: float) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"toy SD {stage}", total=total, loss=loss)
        if step % 10 == 0 or step == total - 1:
            bar.update(tasks[stage], completed=step + 1, loss=loss)

    return update, bar.stop


def train_toy_sd(cfg: ToySDConfig, out: str | Path, cache_dir: str | None = None,
                 progress: Progress | None = None) -> dict:
    """Train all components and write the diffusers directory ``out``; returns the training record
    (also written to ``out/toy_sd.json``)."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    t0, c0 = time.time(), time.process_time()
    refs = reference_images(cfg.resolution, cfg.views_per_object, cfg.camera, cache_dir, cfg.reference_seed)
    t_refs = time.time()
    tokenizer = build_world_tokenizer(out / ".tokenizer_src")
    vae, vae_stats = train_vae(cfg, refs.images, progress)
    t_vae = time.time()
    latents = encode_latents(vae, refs.images)
    captions = Captions.build(refs.object_ids, refs.view_ids)
    unet, text, unet_stats = train_unet(cfg, latents, captions, tokenizer, progress)
    t_unet = time.time()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(cfg), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    for f in (out / ".tokenizer_src").iterdir():
        f.unlink()
    (out / ".tokenizer_src").rmdir()
    record = {"config": cfg.as_dict(), "digest": cfg.digest(), "vae": vae_stats, "unet": unet_stats,
              "num_references": len(refs.images), "num_captions": len(captions.texts),
              "seconds": {"references": t_refs - t0, "vae": t_vae - t_refs, "unet": t_unet - t_vae,
                          "total_wall": time.time() - t0},
              "cpu_seconds": time.process_time() - c0, "torch_threads": torch.get_num_threads()}
    (out / "toy_sd.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
