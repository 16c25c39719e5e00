"""`trainer.precision=64-true` is a float64 run end to end: the debugging mode that tells a bug from rounding
(tests/test_mlp.py compares two paths in it) must render in float64 and train every guidance family."""
from __future__ import annotations

import pytest
import torch

from amortized3d.cameras import orbit_cameras, sample_cameras
from amortized3d.train import train
from conftest import compose


def test_cameras_follow_the_default_dtype():
    """Lightning's 64-true runs each step under torch.set_default_dtype(float64); cameras built there are
    float64 (they were cast to float32, so rays, renders and everything downstream were float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cams = sample_cameras(3, 8, rng=torch.Generator().manual_seed(0))
        orbit = orbit_cameras(4, 8)
    finally:
        torch.set_default_dtype(previous)
    assert cams.c2w.dtype == torch.float64 and orbit.c2w.dtype == torch.float64
    assert sample_cameras(3, 8, rng=torch.Generator().manual_seed(0)).c2w.dtype == torch.float32  # fp32 runs as before


@pytest.mark.parametrize("guidance", ["vsd", "l2vsd"])
def test_the_vsd_family_trains_in_float64(tmp_path, cache_dir, guidance):
    """The score model (float64 under 64-true) denoises the renders: they must be float64 too (the run
    failed with 'mat1 and mat2 must have the same dtype' on float32 renders)."""
    run = tmp_path / guidance
    train(compose(run, cache_dir, f"guidance={guidance}", "trainer.precision=64-true", "logger=none",
                  "trainer.val_check_interval=100"))
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    floats = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float64 for v in floats if v.numel() > 1)
