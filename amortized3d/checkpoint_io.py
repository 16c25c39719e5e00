"""Checkpoints written atomically and checksummed; loaded safely, with errors that name the file.

Atomic: written through ``amortized3d.atomic`` (temp file in the same directory, fsync'ed, moved
over the destination with ``os.replace``, the directory entry fsync'ed; a full disk reported as ENOSPC).

Checksummed: ``save_torch`` hashes the bytes as ``torch.save`` streams them out (sha256, no second
pass over the file) and stores the digest *inside* the file, as the comment of the zip archive that
``torch.save`` writes (a standard zip field: ``torch.load``, ``zipfile`` and every zip tool still
read the file). One file, so the atomic rename keeps covering checkpoint and checksum together, and
a copied checkpoint carries its checksum along. ``verify_checksum`` re-hashes the file once per load
(one sequential read at ~1.5 GB/s with hashlib's sha256 on a current x86 core, before
``torch.load`` reads it again, usually from the page cache).

Safe: ``load_torch`` always uses ``torch.load(weights_only=True)``: what the project writes is
tensors and plain containers, so a pickle payload in a crafted or foreign file never runs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from amortized3d.atomic import atomic_write

log = logging.getLogger(__name__)

CHECKSUM_TAG = b"amortized3d-sha256:"
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes + comment, last in the file
_EOCD_SIZE = 22
_COMMENT_SIZE = len(CHECKSUM_TAG) + 64
_READ_CHUNK = 4 << 20
# Globals that checkpoints may hold beyond tensors and plain containers (torch.load(weights_only=True)
# allow-list). Empty: Lightning's checkpoint dict, the state/optimizer dicts and the resolved config
# (stored as plain containers) need nothing more. Add a type here only if the project writes it.
SAFE_GLOBALS: list[Any] = []


class CheckpointError(ValueError):
    """A checkpoint (or other torch file) is missing, empty, damaged, unreadable or unsafe; names the path."""


class ChecksumMismatchError(CheckpointError):
    """The file's bytes differ from the sha256 recorded when it was written."""


# ---------------------------------------------------------------- checksummed torch files
class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save streams into it)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.tail = f, hashlib.sha256(), b""

    def write(self, data) -> int:
        n = self.f.write(data)
        self.sha.update(data)
        view = memoryview(data).cast("B")
        self.tail = (self.tail + bytes(view[-_EOCD_SIZE:]))[-_EOCD_SIZE:]  # no copy of the whole chunk
        return n

    def flush(self) -> None:
        self.f.flush()


def write_torch(obj: Any, f: BinaryIO) -> str:
    """``torch.save(obj, f)`` plus the sha256 of its bytes in the zip comment; returns the digest."""
    out = _HashingWriter(f)
    torch.save(obj, out)
    if len(out.tail) != _EOCD_SIZE or out.tail[:4] != _EOCD or out.tail[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end with a comment-less zip record; cannot add the checksum")
    digest = out.sha.hexdigest()
    f.seek(-2, os.SEEK_END)
    f.write(struct.pack("<H", _COMMENT_SIZE) + CHECKSUM_TAG + digest.encode())
    return digest


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write ``obj`` with ``torch.save`` to ``path``, sha256 recorded inside the file."""
    return atomic_write(path, lambda f: write_torch(obj, f))


def recorded_checksum(path: str | os.PathLike) -> str | None:
    """The sha256 stored in ``path`` by ``save_torch``; None for a file written without one.

    Raises ChecksumMismatchError when the file ends in a damaged checksum record."""
    path = Path(path)
    size = path.stat().st_size
    n = _EOCD_SIZE + _COMMENT_SIZE
    with open(path, "rb") as f:
        f.seek(max(0, size - n - 256))
        window = f.read()
    tail = window[-n:]
    if len(tail) < n:
        return None
    tag = tail[_EOCD_SIZE:_EOCD_SIZE + len(CHECKSUM_TAG)]
    digest = tail[-64:].decode("ascii", "replace")
    if tail[:4] == _EOCD and tail[20:22] == struct.pack("<H", _COMMENT_SIZE) and tag == CHECKSUM_TAG \
            and all(c in "0123456789abcdef" for c in digest):
        return digest
    # our record, damaged in place or shifted (truncated / appended to)
    if CHECKSUM_TAG in window or sum(a == b for a, b in zip(tag, CHECKSUM_TAG)) > len(CHECKSUM_TAG) // 2:
        raise ChecksumMismatchError(f"{path}: its checksum record is damaged; the file is corrupt "
                                    f"(byte damage, truncation or a partial copy)")
    return None


def verify_checksum(path: str | os.PathLike) -> bool:
    """True if ``path`` matches its recorded sha256, False if it has none; raises ChecksumMismatchError.

    Reads the file once (hashlib sha256, ~1.5 GB/s per core)."""
    path = Path(path)
    expected = recorded_checksum(path)
    if expected is None:
        return False
    remaining = path.stat().st_size - _COMMENT_SIZE - 2  # the bytes torch.save wrote, up to its comment length
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while remaining > 0:
            chunk = f.read(min(_READ_CHUNK, remaining))
            if not chunk:
                break
            sha.update(chunk)
            remaining -= len(chunk)
    sha.update(b"\0\0")  # torch.save wrote an empty comment
    if sha.hexdigest() != expected:
        raise ChecksumMismatchError(f"{path}: sha256 {sha.hexdigest()} differs from the {expected} recorded when "
                                    "it was written; the file is damaged (byte damage, truncation or a partial "
                                    "copy) and is not loaded")
    return True


def load_torch(path: str | os.PathLike, map_location: Any = "cpu", *, what: str = "checkpoint",
               require_checksum: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` after checking the file: every failure is a
    CheckpointError that names ``path`` and what is wrong with it.

    A file without a recorded checksum (written before checksums, or by another tool) is loaded with
    a warning, or refused when ``require_checksum``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): its write never completed or it was truncated")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or its legacy pickle format
        raise CheckpointError(f"{what} {path} is not a torch file: it is neither the zip archive torch.save writes "
                              f"nor its legacy format (first bytes {head.hex(' ')}); damaged or another format")
    try:
        verified = verify_checksum(path)
    except ChecksumMismatchError as err:
        hint = "; an earlier checkpoints/step_*.ckpt of the run may be intact" if what == "checkpoint" else ""
        raise ChecksumMismatchError(f"{what} {err}{hint}") from None
    if not verified:
        if require_checksum:
            raise ChecksumMismatchError(f"{what} {path} carries no checksum (truncated, or not written by "
                                        "amortized3d); not loaded")
        log.warning("%s %s carries no checksum (written before checksums, or by another tool); its integrity "
                    "is not verified", what, path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        if "Unsupported global" in str(err):
            detail = next((ln.strip() for ln in first if "Unsupported global" in ln), "")
            detail = detail.split("WeightsUnpickler error:")[-1].split(" Please use")[0].strip().rstrip(".")
            raise CheckpointError(
                f"{what} {path} holds objects other than tensors and plain containers ({detail}); it was not "
                "written by amortized3d, and unpickling it could run arbitrary code, so it is refused "
                "(loaded with torch.load(weights_only=True))") from None
        after = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = after[0].strip() if after and "WeightsUnpickler error:" in str(err) else (first[0] if first else "")
        raise CheckpointError(f"{what} {path} is not a readable torch file: damaged, truncated or another format "
                              f"({type(err).__name__}: {detail})") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, AttributeError, struct.error) as err:
        if isinstance(err, torch.OutOfMemoryError) or "device" in str(err).lower():
            raise  # a good file that does not fit / map_location onto a missing device: not damage
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{what} {path} is not a readable torch file: damaged, truncated or another format "
                              f"({type(err).__name__}: {first[0] if first else ''})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO: atomic checksummed writes; verified, ``weights_only`` loads (resume)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        save_torch(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True: a checkpoint from scripts/train.py holds only tensors and plain data
        if "://" in str(path):  # fsspec remote path (s3://...): Lightning's reader, no checksum verification
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        ckpt = load_torch(path, map_location=map_location)
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a Lightning checkpoint dict")
        return ckpt
