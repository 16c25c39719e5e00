"""amortized3d.allocator: glibc keeps freed large blocks once cpu_allocator=keep_freed applies."""
from __future__ import annotations

import subprocess
import sys

import pytest

from amortized3d import allocator

_PROBE = """
from amortized3d.allocator import configure_cpu_allocator, large_blocks_are_mmapped
before = large_blocks_are_mmapped()
applied = configure_cpu_allocator({mode!r})
print(before, applied, large_blocks_are_mmapped())
"""


@pytest.mark.parametrize("mode,expected", [("keep_freed", "True True False"), ("default", "True False True")])
def test_keep_freed_stops_mmapping_large_blocks(mode, expected):
    """In a fresh process (the setting is process-wide): a 64 MiB block is its own mmap under glibc's defaults
    and comes from the heap once keep_freed applies; default changes nothing."""
    if allocator.large_blocks_are_mmapped() is None:
        pytest.skip("no glibc >= 2.33 here")
    out = subprocess.run([sys.executable, "-c", _PROBE.format(mode=mode)], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(allocator.__file__).rsplit("/amortized3d/", 1)[0]})
    assert out.stdout.split() == expected.split()


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="cpu allocator"):
        allocator.configure_cpu_allocator("jemalloc")


def test_train_config_applies_it():
    """train.yaml publishes the switch and train() passes it on (a resume may change it: results are unchanged)."""
    from pathlib import Path

    import yaml

    from amortized3d.run_guard import MAY_CHANGE

    root = Path(allocator.__file__).resolve().parents[1]
    assert yaml.safe_load((root / "configs" / "train.yaml").read_text())["cpu_allocator"] == "keep_freed"
    assert "configure_cpu_allocator(" in (root / "amortized3d" / "train.py").read_text()
    assert "cpu_allocator" in MAY_CHANGE
