"""Checkpoints (and every other file) are written atomically: a crash mid-write leaves the previous file intact."""
import errno
import os

import pytest
import torch

from amortized3d.atomic import atomic_path, atomic_write
from amortized3d.checkpoint_io import AtomicCheckpointIO
from amortized3d.run_guard import _TMP, clean_stale_temp_files


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


def test_temp_files_are_unique_and_recognised_by_the_stale_file_cleanup(tmp_path):
    target = tmp_path / "last.ckpt"
    with atomic_path(target) as a, atomic_path(target) as b:  # two writers of one file in one process
        assert a != b and a.parent == b.parent == tmp_path
        m = _TMP.match(a.name)
        assert m and int(m.group(1)) == os.getpid()  # a live writer's: the cleanup must keep it
        a.write_bytes(b"a")
        b.write_bytes(b"b")
        assert clean_stale_temp_files(tmp_path) == []
    assert target.read_bytes() == b"a" and os.listdir(tmp_path) == ["last.ckpt"]  # the last to finish wins
    with atomic_path(tmp_path / "v.mp4", keep_suffix=True) as tmp:  # writers that pick the format by suffix
        assert tmp.suffix == ".mp4" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "v.mp4"]


def test_full_disk_is_reported_naming_the_target_and_leaves_no_temp_file(tmp_path):
    def full(f):
        f.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out" / "metrics.json"
    with pytest.raises(OSError) as err:
        atomic_write(target, full)
    assert err.value.errno == errno.ENOSPC and str(target) in str(err.value)
    assert os.listdir(target.parent) == []
    with pytest.raises(ValueError, match="not a disk problem"):  # other errors pass through unchanged
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise ValueError("not a disk problem")
    assert os.listdir(target.parent) == []
