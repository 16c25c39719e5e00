"""What a new user sees running scripts/train.py: one line per event, no advertising, where the outputs went."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

from conftest import ROOT, TINY

# A log line's prefix in any format that printed one (Hydra's "[time][name][LEVEL] - ", Lightning's
# "LEVEL: ", ours "[time][LEVEL] "): stripped so that one event printed by two handlers compares equal.
_PREFIX = re.compile(r"^(?:\[[^\]]*\])*\s*(?:-\s*)?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):?\s+)?(?:-\s*)?")
_LOGGED = re.compile(r"^(?:\[[^\]]*\]|(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):\s)")


def test_two_step_training_prints_each_event_once_without_tips_and_names_the_outputs(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, "trainer.max_steps=2",
           f"hydra.run.dir={run}", f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    screen = result.stdout + result.stderr
    logged = [_PREFIX.sub("", line) for line in screen.splitlines() if _LOGGED.match(line)]
    assert sum("Seed set to 0" in m for m in logged) == 1, screen  # Lightning's lines: once, not twice
    twice = {m: n for m, n in Counter(logged).items() if n > 1}
    assert not twice, screen
    for noise in ("Tip:", "litlogger", "lightning.ai", "weights_only", "deprecated", "eval mode"):
        assert noise not in screen, (noise, screen)
    # where the outputs went: the run dir, its checkpoint and metrics
    assert re.search(rf"outputs in {re.escape(str(run))}\b.*checkpoints/last\.ckpt.*metrics\.json", screen), screen
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.json").is_file()
