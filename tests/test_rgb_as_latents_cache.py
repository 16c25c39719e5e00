"""rgb_as_latents: the affine RGB -> latent fit is made once per VAE (by its weights) and reused across builds."""
from __future__ import annotations

import torch

import amortized3d.priors.stable_diffusion as sd_module
from amortized3d.priors.stable_diffusion import StableDiffusionPrior


def build(path, cache):
    return StableDiffusionPrior(str(path), vae_resolution=16, local_files_only=True, rgb_as_latents=True,
                                rgb_to_latent_cache_dir=str(cache))


def encode_counting_vae_passes(prior) -> tuple[torch.Tensor, int]:
    calls = []
    hook = prior.vae.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        x0 = prior.encode(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    finally:
        hook.remove()
    return x0, len(calls)


def test_fit_is_not_redone_on_a_second_build_or_a_new_process_and_follows_the_vae(tiny_sd, tmp_path):
    sd_module._RGB_TO_LATENT_FITS.clear()
    first = build(tiny_sd, tmp_path)
    x_first, fits = encode_counting_vae_passes(first)
    assert fits >= 1  # fitted through the VAE once
    assert len(list(tmp_path.glob("*.pt"))) == 1
    second = build(tiny_sd, tmp_path)  # same process (e.g. evaluation after training)
    x_second, fits = encode_counting_vae_passes(second)
    assert fits == 0
    assert torch.equal(second.rgb_to_latent, first.rgb_to_latent) and torch.equal(x_second, x_first)
    sd_module._RGB_TO_LATENT_FITS.clear()  # a new process (a resume) has only the cache dir
    third = build(tiny_sd, tmp_path)
    _, fits = encode_counting_vae_passes(third)
    assert fits == 0 and torch.equal(third.rgb_to_latent, first.rgb_to_latent)
    # other VAE weights (fine-tuned, another model) at the same path: a new fit, not the stored one
    fourth = build(tiny_sd, tmp_path)
    with torch.no_grad():
        fourth.vae.encoder.conv_in.weight.mul_(1.5)
    _, fits = encode_counting_vae_passes(fourth)
    assert fits >= 1 and not torch.equal(fourth.rgb_to_latent, first.rgb_to_latent)
    assert len(list(tmp_path.glob("*.pt"))) == 2
