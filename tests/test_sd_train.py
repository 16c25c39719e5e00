"""Every guidance trains through `prior=stable_diffusion` (a tiny SD saved to disk) and the real train()."""
from __future__ import annotations

import time

import pytest
import torch

from amortized3d.generators import compiled_levels
from amortized3d.train import train
from conftest import compose
from sd_helpers import sd_overrides

# All seven take ~18 s together on 2 shared cores; csd/asd/lvsd reuse the code paths of sds/vsd, so they
# run in the slow suite to keep the fast suite's budget.
FAST = ["sds", "vsd", "l2vsd", "sdi"]
SLOW = ["csd", "asd", "lvsd"]


def _train(tmp_path, cache_dir, tiny_sd, guidance: str, *extra: str) -> dict:
    cfg = compose(tmp_path, cache_dir, *sd_overrides(tiny_sd, f"guidance={guidance}", *extra), tiny=False)
    t0 = time.perf_counter()
    metrics = train(cfg)
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def _check(tmp_path, metrics: dict, guidance: str) -> dict:
    assert metrics["training"]["steps"] == 3 and metrics["training"]["nonfinite_steps"] == 0
    assert metrics["training"]["guidance"] == guidance
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert not any(k.startswith("guidance.prior.") for k in state)  # the frozen prior is never saved
    return state


@pytest.mark.parametrize("guidance", FAST)
def test_sd_prior_trains_fast(tmp_path, cache_dir, tiny_sd, guidance):
    metrics = _train(tmp_path, cache_dir, tiny_sd, guidance)
    state = _check(tmp_path, metrics, guidance)
    if guidance in ("vsd", "lvsd", "l2vsd"):
        lora = [k for k in state if k.startswith("guidance.score_model.")]
        # only the LoRA factors and the camera embedding are checkpointed, not the base UNet
        assert lora and all("lora_" in k or "class_embedding" in k for k in lora)
    if guidance == "vsd":
        _check_lora_round_trip(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", SLOW)
def test_sd_prior_trains_slow(tmp_path, cache_dir, tiny_sd, guidance):
    _check(tmp_path, _train(tmp_path, cache_dir, tiny_sd, guidance), guidance)


@pytest.mark.slow
def test_sd_hyper_ingp_trains_and_resumes_bit_exact_with_compiled_lookups(tmp_path, cache_dir, tiny_sd):
    """The configured SD x hyper_ingp path compiles the hash grid's render lookups (prior_generator/
    stable_diffusion_hyper_ingp.yaml); the tiny grid has dense and hashed levels, so both compiled kernels train,
    and an interrupted run resumes to exactly the uninterrupted run's generator."""
    common = [o for o in sd_overrides(tiny_sd, "guidance=sds", "trainer.max_steps=6",
                                      "callbacks.checkpoint.every_n_train_steps=3", "trainer.val_check_interval=3")
              if o != "generator.encoding.compile=false"]
    full_cfg = compose(tmp_path / "full", cache_dir, *common, tiny=False)
    assert full_cfg.generator.encoding.compile is True
    compiled_levels.compiled.cache_clear()
    train(full_cfg)
    assert compiled_levels.compiled.cache_info().currsize == 2  # the dense and the hashed levels' lookups ran
    train(compose(tmp_path / "part", cache_dir, *common, "trainer.max_steps=3", tiny=False))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    train(compose(tmp_path / "part", cache_dir, *common, f"ckpt_path={ckpt}", tiny=False))

    def generator(run: str) -> dict:
        state = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        return {k: v for k, v in state["state_dict"].items() if k.startswith("model.generator.")}
    full, resumed = generator("full"), generator("part")
    assert full.keys() == resumed.keys() and any("encoding.table" in k for k in full)
    for key, value in full.items():
        assert torch.equal(value, resumed[key]) if isinstance(value, torch.Tensor) else value == resumed[key], key


def test_sd_generator_conditioning_is_the_prior_clip_pooled_output(tmp_path, cache_dir, tiny_sd):
    from amortized3d.text.clip import CLIPTextEncoder
    from amortized3d.build import build_system

    system, prior, _ = build_system(compose(tmp_path, cache_dir, *sd_overrides(tiny_sd), tiny=False))
    assert isinstance(system.text_encoder, CLIPTextEncoder)
    expected = CLIPTextEncoder(str(tiny_sd)).encode(system.train_prompts).half().float()  # cached in fp16
    torch.testing.assert_close(system.text_table.float(), expected)  # the fp16 memory-mapped cache itself
    assert system.text_table.shape == (len(system.train_prompts), 32)


def _check_lora_round_trip(tmp_path) -> None:
    from omegaconf import OmegaConf

    from amortized3d.build import build_system

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved = dict(checkpoint["state_dict"])
    # the whole system (model + guidance) from the checkpoint's config, restored as a resume restores it
    system, *_ = build_system(OmegaConf.create(checkpoint["hyper_parameters"]["config"]))
    system.on_load_checkpoint(checkpoint)
    system.load_state_dict(checkpoint["state_dict"])
    lora = system.guidance.score_model.trainable_parameters()
    assert any(float(saved[f"guidance.score_model.{n}"].abs().max()) > 0 for n in lora if "lora_B" in n)  # trained
    for name, param in lora.items():
        torch.testing.assert_close(param.detach(), saved[f"guidance.score_model.{name}"])
    _check_render_only_load(ckpt, system)


def _check_render_only_load(ckpt, full) -> None:
    """Evaluation and export load without the SD prior (no UNet/VAE) and render exactly the same."""
    import lightning as L

    from amortized3d.cameras import orbit_cameras
    from amortized3d.evaluation.checkpoint import load_model
    from amortized3d.model import AmortizedModel

    loaded = load_model(ckpt)
    render_only = loaded.model
    assert "prior" not in loaded._fields  # nothing of the prior is built
    assert isinstance(render_only, AmortizedModel) and not isinstance(render_only, L.LightningModule)
    assert not any("unet" in k or "vae" in k for k in render_only.state_dict())
    assert not hasattr(render_only, "guidance")
    assert not any(k.startswith("guidance.") for k in render_only.state_dict())
    cams = orbit_cameras(2, 16)
    with torch.no_grad():
        expected = full.eval().render(full.train_prompts[:1], cams).rgb
        torch.testing.assert_close(render_only.render(full.train_prompts[:1], cams).rgb, expected)
