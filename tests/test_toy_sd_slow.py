"""3D training through the trained toy Stable Diffusion (slow: the toy is built once, then cached).

The toy (amortized3d/toy_sd, default ToySDConfig) comes from ``ensure_toy_sd``: restored from
``~/.cache/amortized3d/toy_sd/<digest>/`` when CI or a developer built it before, else trained here
(measured: docs/results.md, "Toy Stable Diffusion"). Every run goes through the real SD code path
(``experiment=toy_sd``): VAE encode with gradients, CFG, view-dependent prompts, the LoRA score model.
"""
from __future__ import annotations

import json

import pytest
import torch

from amortized3d.toy_sd.cache import ensure_toy_sd
from amortized3d.toy_sd.config import ToySDConfig
from amortized3d.train import train
from conftest import compose


@pytest.fixture(scope="module")
def toy_sd():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the build's measured budget is single-threaded (spin-free on a shared machine)
    try:
        return ensure_toy_sd(ToySDConfig())
    finally:
        torch.set_num_threads(threads)


def train_on_toy(out, cache_dir, toy, *overrides: str) -> dict:
    cfg = compose(out, cache_dir, "experiment=toy_sd", f"prior.pretrained_model_name_or_path={toy}",
                  "~callbacks.progress_bar", "evaluation.splits=[train,val]", "evaluation.num_views=8",
                  "evaluation.videos=null", *overrides, tiny=False)
    train(cfg)
    return json.loads((out / "metrics.json").read_text())


def score_losses(run_dir) -> list[float]:
    """The score model's own denoising loss on the renders (``aux/loss/score``), per logged step."""
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["aux/loss/score"]) for r in csv.DictReader(f) if r.get("aux/loss/score")]


@pytest.mark.slow
def test_a_mismatched_score_model_prediction_type_scores_worse(tmp_path, cache_dir, toy_sd):
    """The regression the LoRA-as-v-on-an-eps-UNet bug lacked: VSD's LoRA read with the other prediction
    type than its base fits the renders' noise measurably worse. Measured (40 steps, LoRA lr 1e-4; it also passes at
    the 1e-3 experiment=toy_sd now publishes): score loss 0.17-0.42
    matched, 1.30-1.74 mismatched. The generator's oracle score is NOT the signal at this budget: there the
    matched run scored train R@1 0.20 / 9.6 dB and the mismatched 0.76 / 19.7 dB (docs/results.md: an
    untrained LoRA equals the prior, so early VSD is the CFG direction alone, CSD-like; the mismatched
    eps_phi = sqrt(abar) eps + sqrt(1 - abar) x_t carries an SDS-like noise-residual term)."""
    common = ["guidance=vsd", "trainer.max_steps=30", "trainer.log_every_n_steps=1", "trainer.val_check_interval=30",
              "evaluation.splits=[]"]
    train_on_toy(tmp_path / "matched", cache_dir, toy_sd, *common)
    train_on_toy(tmp_path / "mismatched", cache_dir, toy_sd, *common,
                 "prior.score_model._target_=toy_sd_helpers.MismatchedLoRAScoreModel")
    matched, wrong = score_losses(tmp_path / "matched"), score_losses(tmp_path / "mismatched")
    assert len(matched) >= 20 and len(wrong) >= 20
    assert sum(matched) / len(matched) * 2 < sum(wrong) / len(wrong), (matched, wrong)


@pytest.mark.slow
def test_sds_through_the_toy_sd_learns_the_primitives_world(tmp_path, cache_dir, toy_sd):
    """hyper_ingp + SDS (CFG 7.5, as on the analytic world), 150 steps (half the default: CI time), scored
    by the oracle on 8 orbit views."""
    metrics = train_on_toy(tmp_path, cache_dir, toy_sd, "guidance=sds", "guidance.guidance_scale=7.5",
                           "trainer.max_steps=150")
    assert metrics["training"]["nonfinite_steps"] == 0
    seen = metrics["oracle"]["train"]["overall"]
    assert seen["r_at_1"] >= 0.6 and seen["psnr"] >= 18.0, seen  # measured (12 views): 0.913 / 21.2 dB
