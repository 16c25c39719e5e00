"""The full-size SD benchmark's machinery, on the tests' tiny SD (the full size takes minutes per step)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from amortized3d.benchmark_sd import (PARTS, SD21_BASE_UNET, SD21_BASE_VAE, SD21_TEXT, bench_sd_fullsize,
                                      format_table, write_clip_tokenizer)


def test_sd21_base_architecture_sizes():
    """The configs written here are SD-2.1-base's: UNet 865.9M, VAE 83.7M, CLIP-H text 340.4M (meta tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        sizes = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(**SD21_BASE_UNET), AutoencoderKL(**SD21_BASE_VAE),
            CLIPTextModel(CLIPTextConfig(**SD21_TEXT)))]
    assert [round(n / 1e6, 1) for n in sizes] == [865.9, 83.7, 340.4]


def test_clip_tokenizer_has_clip_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    kind = write_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    if kind.startswith("CLIP BPE"):  # the real merges: CLIP's own ids
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sd_benchmark_rows_on_the_tiny_sd():
    rows = bench_sd_fullsize(["sds", "vsd", "l2vsd@jvp=finite_difference"], size="tiny", steps=1, log=None)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"sds", "vsd", "l2vsd@jvp=finite_difference"}
    for r in rows:
        assert r["seconds"] > 0 and r["peak_GiB"] >= r["before_GiB"] > 0
        assert r["unet_s"] > 0 and r["vae_fwd_s"] > 0 and r["render_s"] > 0 and r["sd_floor_s"] > 0
        assert r["step_over_sd_floor"] == pytest.approx(r["seconds"] / r["sd_floor_s"])
        assert r["rest_s"] == pytest.approx(r["seconds"] - sum(r[f"{p}_s"] for p in PARTS if p != "hash_grid"))
    assert by["sds"]["lora_fwd_s"] == by["sds"]["lora_bwd_s"] == by["sds"]["lora_jvp_s"] == 0
    assert by["vsd"]["lora_fwd_s"] > 0 and by["vsd"]["lora_bwd_s"] > 0 and by["vsd"]["lora_jvp_s"] == 0
    assert by["l2vsd@jvp=finite_difference"]["lora_jvp_s"] > 0
    assert by["vsd"]["relative_to_vsd"] == 1.0 and by["sds"]["relative_to_sds"] == 1.0
    table = format_table(rows)
    assert "step ÷ SD floor" in table and table.count("\n") == 1 + len(rows)


def test_a_variant_may_set_keys_outside_the_guidance():
    """``sds@renderer.skip_empty_space=false``: the previous render path timed next to the default (the SD configs'
    hyper_ingp has the fast path on since main's session 10)."""
    from amortized3d.benchmark_sd import build_guidance_systems
    from amortized3d.priors.sd_random import build_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd(Path(tmp) / "sd")
        tiny = ["prior.model.vae_resolution=16", "prior.text_encoder.embedding_dim=32", "prior.render.resolution=16"]
        systems = build_guidance_systems(model, ["sds", "sds@renderer.skip_empty_space=false,guidance_scale=3"],
                                         "fp32", "cpu", tiny, cache_dir=tmp)
        (default, _), (fast, cfg) = systems["sds"], systems["sds@renderer.skip_empty_space=false,guidance_scale=3"]
        assert default.renderer.skip_empty_space and not fast.renderer.skip_empty_space
        assert cfg.guidance.guidance_scale == 3  # a bare key is still the guidance's
