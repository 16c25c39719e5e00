"""Training with renderer.skip_empty_space: resume stays bit-exact (the skip adds no RNG draws)."""
from __future__ import annotations

import pytest
import torch

from amortized3d.train import train
from conftest import compose


def _generator_state(ckpt_path) -> dict:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.generator.")}


@pytest.mark.parametrize("mlp", [["generator.fused_mlp=false"], ["generator.fused_mlp=true"]],
                         ids=["two_head_mlp", "fused_mlp"])
def test_resume_with_empty_space_skipping_matches_uninterrupted_run(tmp_path, cache_dir, mlp):
    common = ["trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3", "trainer.val_check_interval=3",
              "renderer.skip_empty_space=true", *mlp]
    train(compose(tmp_path / "full", cache_dir, *common))
    train(compose(tmp_path / "part", cache_dir, *common[1:], "trainer.max_steps=3"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    train(compose(tmp_path / "part", cache_dir, *common, f"ckpt_path={ckpt}"))
    full = _generator_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    resumed = _generator_state(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert full.keys() == resumed.keys() and len(full) > 0
    for key, value in full.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed[key]), key
