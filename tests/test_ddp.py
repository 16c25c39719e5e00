"""Two CPU processes with DDP (gloo) train to completion and agree on the parameters."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY


@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["sds", "l2vsd"])  # l2vsd: a score model outside DDP's reducer
def test_ddp_cpu_two_processes(tmp_path, guidance):
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "trainer=ddp_cpu", f"hydra.run.dir={tmp_path}",
           f"paths.cache_dir={tmp_path / 'cache'}", *overrides, "trainer.max_steps=4",
           f"guidance={guidance}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (tmp_path / "metrics.json").is_file()
    # validation is sharded over the two ranks and gathered: rank 0's grid still has every val prompt
    import imageio.v3 as iio

    grid = iio.imread(sorted((tmp_path / "renders" / "val").glob("step_*.png"))[-1])
    assert grid.shape[0] == 12 * grid.shape[1] // 2  # 12 primitives val prompts x 2 views (system.val_views=2)
    if guidance == "l2vsd":  # the score model was trained (its optimizer state is checkpointed)
        assert ckpt["amortized3d"]["auxiliary_optimizer"]["state"]
