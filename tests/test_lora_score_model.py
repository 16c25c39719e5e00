"""The VSD family's LoRA score model as the shipped configs build it (issue 13, items 1, 3 and 7).

Every model here is built from the composed Hydra config by ``build_system`` (the training path),
on a tiny random SD saved to disk: what a config says is what is tested.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call, jvp

from amortized3d.corpora import Corpus
from amortized3d.priors.lora_score_model import LoRAScoreModel
from amortized3d.priors.sd_random import build_tiny_sd
from amortized3d.build import build_system
from conftest import CONFIGS, compose
from sd_helpers import sd_overrides

PROMPTS = ("a red cube", "a blue ball", "a green cone")
CORPUS = Corpus("tiny", {"train": PROMPTS, "val": PROMPTS[:1], "test": PROMPTS}, Path("tiny.json"), "0" * 64)
T = torch.tensor([50, 300, 900])


def _score_target(selection: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(Path(tmp), Path(tmp), "prior=stable_diffusion", selection, tiny=False)
        return str(OmegaConf.select(cfg, "guidance.score_model._target_", default="") or "")


def shipped_lora_configs() -> list[str]:
    """Every shipped selection (guidance group under prior=stable_diffusion, experiment) whose composed
    config builds a LoRA score model: found by composing each, not listed by hand."""
    selections = [f"guidance={p.stem}" for p in sorted((CONFIGS / "guidance").glob("*.yaml"))]
    selections += [f"experiment={p.stem}" for p in sorted((CONFIGS / "experiment").glob("*.yaml"))]
    return [s for s in selections if _score_target(s).endswith("LoRAScoreModel")]


LORA_CONFIGS = shipped_lora_configs()


def build(tmp_path: Path, model_dir: Path, *extra: str, selection: str = "guidance=vsd"):
    """(score model, prior, guidance) of ``selection`` on the SD at ``model_dir``, via build_system."""
    overrides = [*sd_overrides(model_dir), selection, *extra]
    cfg = compose(tmp_path, tmp_path / "cache", *overrides, tiny=False)
    if OmegaConf.is_missing(cfg.data, "prompt_index"):  # per-prompt experiments: one prompt per run
        cfg = compose(tmp_path, tmp_path / "cache", *overrides, "data.prompt_index=0", tiny=False)
    system, prior, _ = build_system(cfg, corpus=CORPUS)
    return system.guidance.score_model, prior, system.guidance


def _root_cause(err: BaseException) -> BaseException:
    """Hydra wraps an error raised while instantiating in an InstantiationException."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def noisy(prior, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *prior.latent_shape, generator=torch.Generator().manual_seed(seed))


def cameras(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """A tiny SD whose scheduler (hence UNet) is v-prediction, other weights than ``tiny_sd``."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction", seed=1)


# --- item 1: the LoRA starts as its base -------------------------------------------------------------

def test_the_lora_configs_are_found():
    assert {"guidance=vsd", "guidance=lvsd", "guidance=l2vsd"} <= set(LORA_CONFIGS)
    assert {"experiment=vsd_ingp_per_prompt", "experiment=l2vsd_ingp_per_prompt"} <= set(LORA_CONFIGS)


@pytest.mark.parametrize("selection", LORA_CONFIGS)
def test_every_shipped_lora_config_starts_as_the_prior(tmp_path, tiny_sd, selection):
    model, prior, _ = build(tmp_path, tiny_sd, selection=selection)
    assert isinstance(model, LoRAScoreModel)
    params = model.trainable_parameters()
    assert all(torch.count_nonzero(p) == 0 for n, p in params.items() if ".lora_B." in n)  # at initialisation
    x = noisy(prior)
    with torch.no_grad():
        eps_phi = model.predict_noise(x, T, model.text_condition(None, PROMPTS, prior), cameras())
        eps_pre = prior.predict_noise(x, T, prior.text_condition(list(PROMPTS)), 1.0)  # conditional only
    torch.testing.assert_close(eps_phi, eps_pre)
    assert model.prediction_type == prior.prediction_type == "epsilon"


def test_v_prediction_prior_gives_a_v_lora_that_starts_as_the_prior(tmp_path, tiny_sd_v):
    model, prior, _ = build(tmp_path, tiny_sd_v, selection="guidance=l2vsd")
    assert prior.prediction_type == model.prediction_type == "v_prediction"
    x = noisy(prior)
    with torch.no_grad():
        eps_phi = model.predict_noise(x, T, model.text_condition(None, PROMPTS, prior), cameras())
        eps_pre = prior.predict_noise(x, T, prior.text_condition(list(PROMPTS)), 1.0)
        raw = model.model_output(x, T, model.text_condition(None, PROMPTS, prior), None)
    torch.testing.assert_close(eps_phi, eps_pre)
    assert (raw - eps_pre).norm() > 0.1 * eps_pre.norm()  # the raw output is v, not eps: it was converted


@pytest.mark.parametrize("requested, base", [("v_prediction", "eps"), ("epsilon", "v")])
def test_a_prediction_type_other_than_the_bases_is_a_build_error_naming_both(tmp_path, tiny_sd, tiny_sd_v,
                                                                             requested, base):
    model_dir = tiny_sd if base == "eps" else tiny_sd_v
    other = "epsilon" if base == "eps" else "v_prediction"
    with pytest.raises(Exception, match=f"prediction_type='{requested}'.*predicts '{other}'") as err:
        build(tmp_path, model_dir, f"prior.score_model.prediction_type={requested}")
    assert str(model_dir) in str(err.value) and isinstance(_root_cause(err.value), ValueError)


def test_a_separate_v_base_model_is_selectable_and_shares_no_weights(tmp_path, tiny_sd, tiny_sd_v):
    """threestudio's pretrained_model_name_or_path_lora: an eps prior, a LoRA on a separate v-model."""
    from diffusers import UNet2DConditionModel

    model, prior, guidance = build(tmp_path, tiny_sd, f"prior.score_model.base_model_name_or_path={tiny_sd_v}",
                                   selection="guidance=vsd")
    assert prior.prediction_type == "epsilon" and model.prediction_type == "v_prediction"
    prior_tensors = {t.data_ptr() for t in prior.parameters()}
    assert not any(p.data_ptr() in prior_tensors for p in model.parameters())
    assert not any("lora_" in n for n, _ in prior.unet.named_parameters())
    # its frozen base is never checkpointed, only the LoRA and camera MLP are
    frozen = guidance.auxiliary.frozen_state_keys
    assert "score_model.unet.conv_in.weight" in frozen and not any("lora_" in k for k in frozen)

    base = UNet2DConditionModel.from_pretrained(str(tiny_sd_v), subfolder="unet").eval()
    x, cond = noisy(prior), model.text_condition(None, PROMPTS, prior)
    with torch.no_grad():
        v = base(x, T, encoder_hidden_states=cond).sample
        eps_phi = model.predict_noise(x, T, cond, cameras())
        eps_prior = prior.predict_noise(x, T, prior.text_condition(list(PROMPTS)), 1.0)
    torch.testing.assert_close(eps_phi, model.schedule.eps_from_v(x, v, T))  # eps = sqrt(a) v + sqrt(1-a) x_t
    assert (eps_phi - eps_prior).norm() > 0.1 * eps_prior.norm()  # another network than the prior's
    # and it is trained on the v target (Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1-a) x0)
    x0, noise = noisy(prior, seed=2), noisy(prior, seed=3)
    x_t = model.schedule.add_noise(x0, noise, T)
    with torch.no_grad():
        expected = (base(x_t, T, encoder_hidden_states=cond).sample - model.schedule.v_target(x0, noise, T))
        got = model.denoising_loss(x0, T, noise, cond, None)
    torch.testing.assert_close(got, expected.pow(2).flatten(1).mean(1))


def test_a_separate_base_must_take_the_priors_tokens(tmp_path, tiny_sd):
    narrow = build_tiny_sd(tmp_path / "narrow", hidden=16)
    with pytest.raises(Exception, match="cross_attention_dim=16") as err:
        build(tmp_path, tiny_sd, f"prior.score_model.base_model_name_or_path={narrow}")
    assert isinstance(_root_cause(err.value), ValueError)


# --- item 3: the last layer in data-flow order -------------------------------------------------------

def test_last_layer_is_the_adapted_layer_nearest_the_output(tmp_path, tiny_sd):
    model, prior, guidance = build(tmp_path, tiny_sd, "guidance.last_layer_only=true", selection="guidance=l2vsd")
    cfg = model.unet.config
    # diffusers runs down_blocks -> mid_block -> up_blocks; the last up block has layers_per_block + 1
    # attentions, and in a transformer block attn2 (cross) runs after attn1, to_out after to_q/k/v.
    last = (f"unet.up_blocks.{len(cfg.up_block_types) - 1}.attentions.{cfg.layers_per_block}"
            ".transformer_blocks.0.attn2.to_out.0")
    assert sorted(model.last_layer_names()) == [f"{last}.lora_A.default.weight", f"{last}.lora_B.default.weight"]
    order = model.adapted_layers_in_call_order()
    assert order[-1] == last and any(n.startswith("unet.mid_block.") for n in order)
    assert order.index(next(n for n in order if n.startswith("unet.mid_block."))) < order.index(last)

    # The lookahead jvp through only those factors (L²-VSD §5.4.2) is nonzero and is the directional
    # derivative of eps_phi along them: -eta grad_phi L at LoRA B = 0 is nonzero on B.
    names = model.last_layer_names()
    params = model.trainable_parameters()
    x0, cond, cam = noisy(prior, seed=4), model.text_condition(None, PROMPTS, prior), cameras()
    loss = model.loss(x0, cond, cam, torch.Generator().manual_seed(0)).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    tangent = {n: -guidance.eta * g for n, g in zip(names, grads)}
    primals = {n: params[n].detach() for n in names}
    x = noisy(prior, seed=5)

    def eps(p):
        return functional_call(model, p, (x, T, cond, cam), strict=False)

    with torch.no_grad(), model.forward_ad():
        _, correction = jvp(eps, (primals,), (tangent,))
    assert correction.abs().max() > 0
    h = 1e-2 / max(t.abs().max() for t in tangent.values())  # entries move by <= 1e-2: above fp32 noise
    with torch.no_grad():
        plus = eps({n: primals[n] + h * tangent[n] for n in names})
        minus = eps({n: primals[n] - h * tangent[n] for n in names})
    fd = (plus - minus) / (2 * h)
    assert (fd - correction).abs().max() < 1e-2 * correction.abs().max()


# --- item 7: the camera MLP --------------------------------------------------------------------------

def test_camera_embedding_is_the_papers_two_layer_mlp_neutral_at_init(tmp_path, tiny_sd):
    model, prior, _ = build(tmp_path, tiny_sd)
    emb = model.unet.class_embedding
    width = int(model.unet.time_embedding.linear_2.out_features)
    linears = [m for m in emb.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, width), (width, width)]
    assert any(isinstance(m, torch.nn.SiLU) for m in emb.modules())
    x, cond, cam = noisy(prior), model.text_condition(None, PROMPTS, prior), cameras()
    with torch.no_grad():
        torch.testing.assert_close(model.predict_noise(x, T, cond, cam), model.predict_noise(x, T, cond, None))
    # trainable from the first step (the zero last layer gets a gradient), and then camera-dependent
    model.loss(x, cond, cam, torch.Generator().manual_seed(0)).mean().backward()
    assert linears[1].weight.grad is not None and linears[1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.nn.init.normal_(linears[1].weight, std=0.1)
        assert not torch.allclose(model.predict_noise(x, T, cond, cam), model.predict_noise(x, T, cond, None))


def test_training_on_a_separate_base_checkpoints_only_the_lora(tmp_path, tiny_sd, tiny_sd_v):
    from amortized3d.train import train

    cfg = compose(tmp_path, tmp_path / "cache", *sd_overrides(tiny_sd), "guidance=vsd",
                  f"prior.score_model.base_model_name_or_path={tiny_sd_v}", tiny=False)
    metrics = train(cfg)
    assert metrics["training"]["steps"] == 3 and metrics["training"]["nonfinite_steps"] == 0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    score = [k for k in state if k.startswith("guidance.score_model.")]
    assert score and all("lora_" in k or "class_embedding" in k for k in score)
    assert any(".lora_B." in k and state[k].abs().sum() > 0 for k in score)  # the LoRA was trained
