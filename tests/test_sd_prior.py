"""The Stable Diffusion prior, its CLIP text encoder and the LoRA score model on a tiny SD saved to disk."""
from __future__ import annotations

import warnings

import pytest
import torch

from amortized3d.priors.lora_score_model import LoRAScoreModel
from amortized3d.priors.sd_conditioning import combine_perp_neg, perpendicular
from amortized3d.sd_loading import MissingWeightsError
from amortized3d.priors.stable_diffusion import StableDiffusionPrior
from amortized3d.text.clip import CLIPTextEncoder


@pytest.fixture(scope="module")
def prior(tiny_sd):
    return StableDiffusionPrior(str(tiny_sd), vae_resolution=16, local_files_only=True)


def _noisy(prior, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *prior.latent_shape, generator=g)
    return x, torch.tensor([37, 811][:n])


def test_missing_local_weights_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(MissingWeightsError, match="prior.pretrained_model_name_or_path") as err:
        StableDiffusionPrior(str(missing), local_files_only=True)
    assert str(missing) in str(err.value) and "unet" in str(err.value)


def test_missing_hub_weights_offline_name_the_id_and_the_cache(tmp_path, cache_dir, monkeypatch):
    from amortized3d.build import build_system
    from conftest import compose
    from sd_helpers import sd_overrides

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    cfg = compose(tmp_path, cache_dir, *sd_overrides("nobody/not-a-model"), tiny=False)
    with pytest.raises(MissingWeightsError) as err:
        build_system(cfg)
    msg = str(err.value)
    assert "nobody/not-a-model" in msg and "huggingface-cli download" in msg and "HF_HOME" in msg


def test_cfg_is_the_diffusers_convention_and_perp_neg_reduces_to_it(prior):
    x, t = _noisy(prior)
    cond = prior.text_condition(["a red cube", "a blue ball"], ["front", "side"])
    with torch.no_grad():
        eps_c, eps_u = prior.predict_noise(x, t, cond, 1.0), prior.predict_noise(x, t, cond, 0.0)
        eps = prior.predict_noise(x, t, cond, 7.5)
    torch.testing.assert_close(eps, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    # Perp-Neg with zero weights is plain CFG; negatives parallel to e_pos have no perpendicular part.
    neg = torch.stack([eps_c, 3 * eps_c - 2 * eps_u], 1)
    torch.testing.assert_close(combine_perp_neg(eps_u, eps_c, neg, torch.zeros(2, 2), 7.5), eps)
    par = (eps_u + 2.0 * (eps_c - eps_u))[:, None]
    torch.testing.assert_close(combine_perp_neg(eps_u, eps_c, par, torch.ones(2, 1), 7.5), eps, rtol=1e-4, atol=1e-4)
    p = perpendicular(torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    assert p.shape == (3, 4, 5)


def test_view_dependent_prompts_change_the_condition(prior):
    front = prior.text_condition(["a red cube"], ["front"]).cond
    back = prior.text_condition(["a red cube"], ["back"]).cond
    plain = prior.prompt_embeddings(["a red cube"])
    assert not torch.allclose(front, back)
    torch.testing.assert_close(prior.prompt_embeddings(["a red cube, front view"]), front)
    torch.testing.assert_close(prior.text_condition(["a red cube"]).cond, plain)  # no cameras: no suffix


def test_encode_is_differentiable_at_any_render_resolution(prior):
    rgb = torch.rand(2, 3, 24, 24, requires_grad=True)
    x0 = prior.encode(rgb)
    assert x0.shape == (2, *prior.latent_shape) and x0.dtype == torch.float32
    x0.square().sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert prior.decode(x0.detach()).shape == (2, 3, 16, 16)


def test_rgb_as_latents_skips_the_vae_and_stays_differentiable(tiny_sd):
    prior = StableDiffusionPrior(str(tiny_sd), vae_resolution=16, rgb_as_latents=True, local_files_only=True)
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    x0 = prior.encode(rgb)
    assert x0.shape == (2, *prior.latent_shape)
    x0.sum().backward()
    assert rgb.grad.abs().sum() > 0 and prior.rgb_to_latent.shape == (4, 4)


def test_long_prompts_are_truncated_keeping_eos_with_a_warning_naming_them(tiny_sd):
    enc = CLIPTextEncoder(str(tiny_sd), embedding_dim=32, local_files_only=True)
    long = "a red cube on a blue ball " * 20
    with pytest.warns(UserWarning, match="a red cube on a blue ball") as rec:
        ids = enc.tokenize([long, "a cube"])
    assert "1 prompt(s) exceed" in str(rec[0].message)
    eos = enc._tokenizer.eos_token_id
    assert ids.shape == (2, 77) and ids[0, -1] == eos
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pooled, tokens = enc.encode_with_tokens([long, "a cube"])
    # the pooled output is the final hidden state of the (kept) end-of-text token
    torch.testing.assert_close(pooled[0], tokens[0, -1])
    first_eos = int((ids[1] == eos).int().argmax())
    torch.testing.assert_close(pooled[1], tokens[1, first_eos])


def test_text_encoder_identity_follows_the_weights(tiny_sd, tmp_path):
    from amortized3d.priors.sd_random import build_tiny_sd

    other = build_tiny_sd(tmp_path / "other", seed=1)
    a = CLIPTextEncoder(str(tiny_sd), local_files_only=True)
    b = CLIPTextEncoder(str(other), local_files_only=True)
    assert a.embedding_dim == 32 and a.identity == CLIPTextEncoder(str(tiny_sd)).identity
    assert a.identity != b.identity
    with pytest.raises(ValueError, match="embedding_dim=1024"):
        CLIPTextEncoder(str(tiny_sd), embedding_dim=1024).encode(["x"])


def test_lora_score_model_starts_at_the_prior_and_shares_its_weights(prior):
    model = LoRAScoreModel(rank=2, prediction_type="epsilon", prior=prior)
    assert not any("lora" in n for n, _ in prior.unet.named_parameters())  # the prior never sees the adapter
    assert model.unet.conv_in.weight is prior.unet.conv_in.weight  # frozen weights shared, not copied
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters().values())
    x, t = _noisy(prior)
    prompts = ["a red cube", "a blue ball"]
    cond = model.text_condition(None, prompts, prior)
    with torch.no_grad():
        eps_phi = model.predict_noise(x, t, cond, torch.randn(2, 16))
        eps_pre = prior.predict_noise(x, t, prior.text_condition(prompts), 1.0)
    torch.testing.assert_close(eps_phi, eps_pre)  # LoRA B = 0 and a zero camera embedding
    keys = model.frozen_state_keys()
    assert keys and not any("lora_" in k or "class_embedding" in k for k in keys)


def test_lora_jvp_matches_finite_differences(prior):
    from amortized3d.guidance.vsd import linearized_shift

    model = LoRAScoreModel(rank=2, prior=prior)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    x, t = _noisy(prior)
    cond, cam = model.text_condition(None, ["a", "b"], prior), torch.randn(2, 16, generator=g)
    tangent = {n: torch.randn(p.shape, generator=g) for n, p in model.trainable_parameters().items()}
    eps, jvp_out = linearized_shift(model, tangent, x, t, cond, cam)
    params = model.trainable_parameters()
    h = 1e-3
    with torch.no_grad():
        for n, p in params.items():
            p.add_(h * tangent[n])
        plus = model.predict_noise(x, t, cond, cam)
        for n, p in params.items():
            p.sub_(2 * h * tangent[n])
        minus = model.predict_noise(x, t, cond, cam)
        for n, p in params.items():
            p.add_(h * tangent[n])
    fd = (plus - minus) / (2 * h)
    assert (fd - jvp_out).abs().max() < 1e-2 * jvp_out.abs().max()
    torch.testing.assert_close(eps, model.predict_noise(x, t, cond, cam))
    assert type(next(iter(model.unet.attn_processors.values()))).__name__ != "AttnProcessor"  # restored


def test_lora_under_fp16_weights_keeps_fp32_parameters(tiny_sd):
    prior = StableDiffusionPrior(str(tiny_sd), vae_resolution=16, dtype="fp16", local_files_only=True)
    model = LoRAScoreModel(rank=2, prior=prior)
    assert prior.unet.conv_in.weight.dtype == torch.float16
    assert {p.dtype for p in model.trainable_parameters().values()} == {torch.float32}
    x, t = _noisy(prior)
    loss = model.loss(x, model.text_condition(None, ["a", "b"], prior), torch.randn(2, 16),
                      torch.Generator().manual_seed(0))
    loss.mean().backward()
    grads = [p.grad for p in model.trainable_parameters().values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_lora_exports_in_diffusers_format(prior, tmp_path):
    from diffusers import UNet2DConditionModel

    model = LoRAScoreModel(rank=2, camera_condition=False, prior=prior)
    with torch.no_grad():
        for n, p in model.trainable_parameters().items():
            p.normal_(0, 0.1)
    out = model.save_lora(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    fresh = UNet2DConditionModel.from_pretrained(prior.name_or_path, subfolder="unet")
    fresh.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    x, t = _noisy(prior)
    cond = model.text_condition(None, ["a", "b"], prior)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, encoder_hidden_states=cond).sample, model.predict_noise(x, t, cond))


def test_a_tokenizer_saved_without_model_max_length_uses_the_encoders_positions(tmp_path, prior):
    """transformers reports ~1e30 for such a tokenizer; padding to it raised OverflowError."""
    import shutil

    from transformers import CLIPTokenizer

    from amortized3d.priors.sd_random import build_tiny_sd, write_tokenizer_files

    root = build_tiny_sd(tmp_path / "sd")  # the same seed, hence the same weights, as the fixture's
    vocab, merges = write_tokenizer_files(tmp_path / "src")
    shutil.rmtree(root / "tokenizer")
    CLIPTokenizer(vocab=str(vocab), merges=str(merges)).save_pretrained(root / "tokenizer")
    assert CLIPTokenizer.from_pretrained(str(root), subfolder="tokenizer").model_max_length > 1e20
    unbounded = StableDiffusionPrior(str(root), vae_resolution=16, local_files_only=True)
    emb = unbounded.prompt_embeddings(["a red cube"])
    assert emb.shape == (1, 77, 32)  # the text encoder's max_position_embeddings
    torch.testing.assert_close(emb, prior.prompt_embeddings(["a red cube"]))
    enc = CLIPTextEncoder(str(root), local_files_only=True)
    pooled, tokens = enc.encode_with_tokens(["a red cube"])
    assert tokens.shape == (1, 77, 32) and pooled.shape == (1, 32) and enc.token_shape == (77, 32)
