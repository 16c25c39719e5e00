"""Two CPU processes with DDP (gloo) train to completion and agree on the parameters."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    overrides = [o for o in TINY if not o.startswith("trainer.accelerator")]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "trainer=ddp_cpu", f"hydra.run.dir={tmp_path}",
           f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4", *overrides[1:],
           "data.batch_size=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (tmp_path / "metrics.json").is_file()
