"""With a cold text cache the SD text encoder is loaded once: the generators' encoder and the prior share it."""
from __future__ import annotations

import gc
import warnings

import torch

from amortized3d.priors.sd_random import build_tiny_sd
from amortized3d.priors.stable_diffusion import StableDiffusionPrior
from amortized3d.text.cache import EmbeddingCache
from amortized3d.text.clip import CLIPTextEncoder


def live_text_models(path) -> set[int]:
    """Distinct parameter storages of the CLIP text models loaded from ``path`` that are still alive."""
    from transformers import CLIPTextModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on every live object trips deprecated module attributes
        warnings.simplefilter("ignore")
        return {m.get_input_embeddings().weight.data_ptr() for m in gc.get_objects()
                if isinstance(m, CLIPTextModel) and str(path) in str(m.config._name_or_path)}


def test_one_text_model_after_a_cold_cache_build(tmp_path):
    sd = build_tiny_sd(tmp_path / "sd")
    prompts = ["a red cube", "a blue ball"]
    encoder = CLIPTextEncoder(str(sd), local_files_only=True, device="cpu", dtype="fp32")
    table = EmbeddingCache(tmp_path / "cache").load_or_build_shared(encoder, "two", prompts)  # cold: loads it
    prior = StableDiffusionPrior(str(sd), vae_resolution=16, local_files_only=True, dtype="fp32", device="cpu")
    assert prior.text_encoder is encoder._model
    assert len(live_text_models(sd)) == 1
    # both users still get what their own copy gave: pooled for the generators, tokens for the UNet
    pooled, tokens = encoder.encode_with_tokens(prompts)
    torch.testing.assert_close(table.float(), pooled, atol=1e-3, rtol=1e-3)  # the cache stores fp16
    torch.testing.assert_close(prior.prompt_embeddings(prompts), tokens)


def test_the_encoder_reuses_the_prior_copy_when_loaded_later(tmp_path):
    sd = build_tiny_sd(tmp_path / "sd")
    prior = StableDiffusionPrior(str(sd), vae_resolution=16, local_files_only=True, dtype="fp32", device="cpu")
    encoder = CLIPTextEncoder(str(sd), local_files_only=True, device="cpu", dtype="fp32")
    encoder.encode(["an unseen prompt"])  # e.g. evaluating a prompt outside the warm cache
    assert encoder._model is prior.text_encoder and len(live_text_models(sd)) == 1
