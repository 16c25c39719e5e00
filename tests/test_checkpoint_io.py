"""Checkpoints are written atomically: a crash mid-write leaves the previous file intact."""
import os

import pytest
import torch

from amortized3d.checkpoint_io import AtomicCheckpointIO, atomic_write


def test_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(5)}, tmp_path / "ckpts" / "last.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "ckpts" / "last.ckpt")["w"], torch.arange(5))


def test_crash_during_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def crash_halfway(f):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash_halfway)
    assert torch.load(path)["step"] == 1  # untouched and loadable
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temp file left behind
