"""The toy Stable Diffusion of the primitives world (amortized3d/toy_sd): its parts, fast.

A really trained toy (minutes) is exercised by tests/test_toy_sd_slow.py; here a few-step build at
16 px shows the saved directory is SD-2.1's layout and loads through ``StableDiffusionPrior`` unchanged.
"""
from __future__ import annotations

import json

import pytest
import torch

from amortized3d.priors.analytic import AnalyticPrior, ReferenceSet
from amortized3d.scenes.primitives import PrimitivesWorld
from amortized3d.toy_sd.cache import cached_path, ensure_toy_sd, is_complete
from amortized3d.toy_sd.config import ToySDConfig, primitives_camera
from amortized3d.toy_sd.data import Captions, exact_x0
from amortized3d.toy_sd.tokenizer import build_world_tokenizer, world_words

TINY = dict(resolution=16, views_per_object=2, vae_channels=(8, 8, 8), vae_steps=2, vae_batch=4,
            text_hidden=16, text_layers=1, unet_channels=(8, 16), unet_steps=2, unet_batch=4)


def test_every_world_word_is_one_token_and_other_text_still_tokenizes(tmp_path):
    tok = build_world_tokenizer(tmp_path)
    for word in world_words():
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))
    assert tok.tokenize("an orange torus, front view") == ["an</w>", "orange</w>", "torus</w>", ",</w>",
                                                           "front</w>", "view</w>"]
    assert len(tok.tokenize("a zebra")) > 2  # not in the world: bytes, not <unk>
    assert tok.unk_token_id not in tok("a zebra").input_ids[1:-1]  # CLIP: unk is the end-of-text token


def test_exact_x0_is_the_analytic_priors_denoiser():
    """data.exact_x0 (latent space, any channel count) equals AnalyticPrior.posterior_mean (Diracs)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 4, 4, generator=g)
    refs = ReferenceSet(images, torch.arange(12) // 4, torch.zeros(12), {"a": 0, "b": 1, "c": 2})
    prior = AnalyticPrior(refs)
    x0 = images * 2 - 1
    t = torch.tensor([10, 300, 600, 900, 990, 500])
    x_t = prior.schedule.add_noise(x0[:6], torch.randn(6, 3, 4, 4, generator=g), t)
    mask = prior.condition_mask(prior.text_condition(["a", "b", "c", "", "a", "b"]))
    sa = prior.schedule.alphas_cumprod[t].sqrt()
    torch.testing.assert_close(exact_x0(x_t, sa, x0, mask), prior.posterior_mean(x_t, t, mask), atol=1e-5, rtol=1e-4)


def test_captions_are_the_priors_view_prompts_with_their_references():
    world = PrimitivesWorld()
    object_ids = torch.tensor([0, 0, 0, 7, 7])
    view_ids = torch.tensor([0, 1, 0, 2, 2])
    caps = Captions.build(object_ids, view_ids, world)
    assert caps.texts[caps.empty_caption] == "" and caps.masks[caps.empty_caption].all()
    assert caps.texts[caps.view_caption[1]] == f"{world.prompt(0)}, side view"
    assert caps.masks[caps.view_caption[0]].tolist() == [True, False, True, False, False]
    assert caps.texts[caps.plain_caption[3]] == world.prompt(7)
    assert caps.masks[caps.plain_caption[3]].tolist() == [False, False, False, True, True]
    drawn = caps.sample(torch.zeros(20000, dtype=torch.long), 0.1, 0.1, torch.Generator().manual_seed(0))
    empty = (drawn == caps.empty_caption).float().mean()
    plain = (drawn == caps.plain_caption[0]).float().mean()
    assert abs(empty - 0.1) < 0.01 and abs(plain - 0.1) < 0.01


def test_config_digest_and_camera():
    assert ToySDConfig().digest() == ToySDConfig().digest()
    assert ToySDConfig(seed=1).digest() != ToySDConfig().digest()
    assert ToySDConfig(prediction_type="v_prediction").digest() != ToySDConfig().digest()
    with pytest.raises(ValueError, match="prediction_type"):
        ToySDConfig(prediction_type="sample")
    cam = primitives_camera()  # the 3D training renders' framing (configs/data/primitives.yaml)
    assert cam["distance"] == [1.5, 1.5] and cam["fovy_deg"] == [70.0, 70.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_built_toy_is_sd21s_layout_and_loads_through_the_sd_prior(tmp_path, prediction_type):
    from amortized3d.priors.stable_diffusion import StableDiffusionPrior

    cfg = ToySDConfig(prediction_type=prediction_type, **TINY)
    path = ensure_toy_sd(cfg, root=tmp_path)
    assert path == cached_path(cfg, tmp_path) and is_complete(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    index = json.loads((path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"][1] == "CLIPTokenizer"
    record = json.loads((path / "toy_sd.json").read_text())
    assert record["digest"] == cfg.digest()
    prior = StableDiffusionPrior(str(path), local_files_only=True, dtype="fp32", device="cpu", vae_resolution=16)
    assert prior.prediction_type == prediction_type
    assert prior.latent_shape == (4, 4, 4)
    assert any("attn2" in n for n, _ in prior.unet.named_modules())  # cross-attention: the LoRA targets exist
    assert prior.scaling_factor == pytest.approx(record["vae"]["scaling_factor"])
    lat = prior.encode(torch.rand(2, 3, 16, 16))
    eps = prior.predict_noise(lat, torch.tensor([500, 500]), prior.text_condition(["a red cube"] * 2, ["front"] * 2), 7.5)
    assert eps.shape == lat.shape and torch.isfinite(eps).all()
    mtime = (path / "toy_sd.json").stat().st_mtime_ns
    assert ensure_toy_sd(cfg, root=tmp_path) == path  # cached: not rebuilt
    assert (path / "toy_sd.json").stat().st_mtime_ns == mtime


def test_sd_prior_on_the_primitives_corpus_is_scored_by_the_oracle(tmp_path, cache_dir, tiny_sd):
    """Deliver 4 of issue 14: a Stable Diffusion run on data=primitives writes oracle metrics at the end."""
    from amortized3d.build import build_system
    from amortized3d.evaluation.final import evaluate_run
    from amortized3d.scenes.world import build_world
    from conftest import compose
    from sd_helpers import sd_overrides

    cfg = compose(tmp_path, cache_dir, *sd_overrides(tiny_sd), "evaluation.splits=[val]", "evaluation.videos=null",
                  "evaluation.num_views=2", tiny=False)
    system, prior, corpus = build_system(cfg)
    assert getattr(prior, "world", None) is None
    metrics = evaluate_run(system.model, build_world(cfg), corpus, cfg.evaluation, tmp_path)
    assert metrics["evaluation"]["scorer"] == "oracle"
    val = metrics["oracle"]["val"]
    assert len(val["per_prompt"]) == len(corpus.unique("val")) and 0.0 <= val["overall"]["r_at_1"] <= 1.0


def test_toy_sd_experiment_composes_with_the_toys_sizes(tmp_path):
    """experiment=toy_sd: renders, VAE input and CLIP width are the toy's (ToySDConfig), on the primitives corpus."""
    from conftest import compose

    cfg = compose(tmp_path, tmp_path, "experiment=toy_sd", "prior.pretrained_model_name_or_path=/x", tiny=False)
    toy = ToySDConfig()
    assert cfg.prior.name == "stable_diffusion" and cfg.data.corpus == "primitives"
    assert cfg.prior.render.resolution == cfg.prior.model.vae_resolution == cfg.system.resolution == toy.resolution
    assert cfg.prior.text_encoder.embedding_dim == toy.text_hidden
    assert {k: list(v) for k, v in cfg.data.camera.items()} == toy.camera
