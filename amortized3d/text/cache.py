"""On-disk text-embedding cache: one memory-mapped fp16 ``.npy`` per (encoder, corpus, kind).

Why: encoding CP100k with the SD-2.1 CLIP text encoder takes minutes and every DDP rank and
every run needs the same [N, E] matrix; fp16 halves disk and page-cache use (2*E bytes per
prompt) and memory mapping lets ranks share pages.

Kinds: ``pooled`` [N, E] (what generators are conditioned on; 2*E bytes per prompt) and, for
encoders with ``encode_tokens`` (SD's CLIP), ``tokens`` [N, L, E] in a second file
(``...__tokens.npy``; 77*1024*2 bytes = 158 KB per prompt, so it is opt-in).

Files, in ``root``: ``<readable(corpus)>__<readable(identity)>__<key[:16]>[__tokens].npy``
(``slugs.readable``; the key makes the name unique) and a ``.json`` sidecar holding the full
key = sha256(identity NUL prompt_0 NUL prompt_1 ...), N, E, dtype and the sha256 of the array
bytes. Any change of encoder or corpus changes the key (a new file).
Writes go through ``amortized3d.atomic`` (temp file in the same directory, fsynced, ``os.replace``d);
the sidecar is written last, also atomically, so a crash never leaves a pair that verifies.

DDP protocol (every rank calls ``load_or_build`` once, with the same ``barrier``):
the builder (rank 0: ``is_builder=True``) loads or builds and writes, *then* calls
``barrier()``; the other ranks call ``barrier()`` first, then load. A non-builder that still
finds no valid file (e.g. node-local disks) warns and encodes in memory without writing.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from amortized3d.atomic import atomic_path, atomic_write
from amortized3d.slugs import readable
from amortized3d.text.base import TextEncoder

FORMAT_VERSION = 1
KINDS = ("pooled", "tokens")
_DTYPE = np.float16
_HASH_BLOCK = 1 << 24


def cache_key(identity: str, prompts: Sequence[str]) -> str:
    """sha256 over the encoder identity and the NUL-joined prompts (order matters)."""
    h = hashlib.sha256(identity.encode("utf-8"))
    for p in prompts:
        h.update(b"\x00")
        h.update(p.encode("utf-8"))
    return h.hexdigest()


def local_rank_from_env() -> int:
    """This process's rank on its node as set by torchrun / Lightning / SLURM (0 when not distributed)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


@dataclass(frozen=True)
class CacheEntry:
    array_path: Path
    sidecar_path: Path
    key: str
    num_prompts: int
    embedding_dim: int
    kind: str = "pooled"
    shape: tuple[int, ...] = ()  # full array shape ([N, E] pooled, [N, L, E] tokens)

    @property
    def array_shape(self) -> tuple[int, ...]:
        return self.shape or (self.num_prompts, self.embedding_dim)


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from a .npy header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        return shape, fortran, dtype, f.tell()


def _file_sha256(path: Path, offset: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class EmbeddingCache:
    """Verified, atomically written fp16 embedding matrices under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, encoder: TextEncoder, corpus_name: str, prompts: Sequence[str], kind: str = "pooled"
              ) -> CacheEntry:
        if kind not in KINDS:
            raise ValueError(f"unknown embedding kind {kind!r}; valid: {', '.join(KINDS)}")
        if kind == "tokens" and not hasattr(encoder, "encode_tokens"):
            raise TypeError(f"{type(encoder).__name__} has no token embeddings (encode_tokens)")
        key = cache_key(encoder.identity if kind == "pooled" else f"{encoder.identity}#{kind}", prompts)
        stem = (f"{readable(corpus_name, fallback='x')}__{readable(encoder.identity, fallback='x')}__{key[:16]}"
                + ("" if kind == "pooled" else f"__{kind}"))
        dim = int(encoder.embedding_dim)
        shape = (len(prompts), dim) if kind == "pooled" else (len(prompts), *map(int, encoder.token_shape))
        return CacheEntry(self.root / f"{stem}.npy", self.root / f"{stem}.json", key, len(prompts), dim, kind, shape)

    def load_or_build(self, encoder: TextEncoder, corpus_name: str, prompts: Sequence[str],
                      batch_size: int = 256, barrier: Callable[[], None] | None = None,
                      is_builder: bool = True, dtype: torch.dtype = torch.float32, kind: str = "pooled") -> Tensor:
        """Embeddings [N, E] (``kind="tokens"``: [N, L, E]) of ``prompts`` (float32 copy;
        ``dtype=torch.float16`` returns a zero-copy, copy-on-write memory-mapped view instead)."""
        prompts = list(prompts)
        entry = self.entry(encoder, corpus_name, prompts, kind)
        if not prompts:
            if barrier is not None:
                barrier()
            return torch.zeros(entry.array_shape, dtype=dtype)
        if is_builder:
            array = self.load(entry)
            if array is None:
                self.build(entry, encoder, prompts, batch_size)
                array = self.load(entry)
            if barrier is not None:
                barrier()
        else:
            if barrier is not None:
                barrier()
            array = self.load(entry)
        if array is None:
            warnings.warn(f"embedding cache {entry.array_path} unavailable after build; encoding in memory",
                          RuntimeWarning, stacklevel=2)
            return self._encode_all(encoder, prompts, batch_size, kind).to(dtype)
        if dtype == torch.float16:
            return torch.from_numpy(array)
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(dtype)

    def load_or_build_shared(self, encoder: TextEncoder, corpus_name: str, prompts: Sequence[str],
                             timeout_s: float = 3600.0, poll_s: float = 1.0, **kwargs) -> Tensor:
        """``load_or_build`` before the process group exists: local rank 0 of each node builds (node-
        local disks get their own copy), the other ranks wait for its sidecar, then load and verify."""
        if local_rank_from_env() == 0:
            return self.load_or_build(encoder, corpus_name, prompts, **kwargs)
        entry = self.entry(encoder, corpus_name, list(prompts), kwargs.get("kind", "pooled"))
        deadline = time.monotonic() + timeout_s
        while not entry.sidecar_path.exists() and time.monotonic() < deadline:
            time.sleep(poll_s)
        return self.load_or_build(encoder, corpus_name, prompts, is_builder=False, **kwargs)

    def load(self, entry: CacheEntry) -> np.ndarray | None:
        """The verified memmap (copy-on-write), or None on a miss; corrupt entries are reported."""
        if not entry.array_path.exists() and not entry.sidecar_path.exists():
            return None
        reason = self._verify(entry)
        if reason is not None:
            warnings.warn(f"embedding cache {entry.array_path} is invalid ({reason}); rebuilding",
                          RuntimeWarning, stacklevel=3)
            return None
        return np.load(entry.array_path, mmap_mode="c")

    def _verify(self, entry: CacheEntry) -> str | None:
        if not entry.array_path.exists():
            return "array file missing"
        if not entry.sidecar_path.exists():
            return "sidecar missing (interrupted build?)"
        try:
            meta = json.loads(entry.sidecar_path.read_text())
            shape, fortran, dtype, offset = _npy_header(entry.array_path)
        except (OSError, ValueError) as err:
            return f"unreadable: {err}"
        expected = {"format_version": FORMAT_VERSION, "key": entry.key, "num_prompts": entry.num_prompts,
                    "embedding_dim": entry.embedding_dim, "dtype": np.dtype(_DTYPE).name,
                    "shape": list(entry.array_shape)}
        for name, value in expected.items():
            if meta.get(name) != value:
                return f"sidecar {name}={meta.get(name)!r}, expected {value!r}"
        if shape != entry.array_shape or fortran or dtype != np.dtype(_DTYPE):
            return f"header shape={shape} dtype={dtype} fortran={fortran}"
        size = entry.array_path.stat().st_size
        if size != offset + int(np.prod(entry.array_shape)) * np.dtype(_DTYPE).itemsize:
            return f"file size {size} does not match shape (truncated?)"
        if _file_sha256(entry.array_path, offset) != meta.get("sha256"):
            return "checksum mismatch"
        return None

    def build(self, entry: CacheEntry, encoder: TextEncoder, prompts: Sequence[str], batch_size: int = 256) -> None:
        """Encode in batches into a temp file, fsync, atomically publish array then sidecar."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry.sidecar_path.unlink(missing_ok=True)  # never pair a stale sidecar with new bytes
        with atomic_path(entry.array_path) as tmp_array:
            mm = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=_DTYPE,
                                           shape=entry.array_shape)
            digest = hashlib.sha256()
            for start in range(0, len(prompts), batch_size):
                block = self._encode_batch(encoder, prompts[start:start + batch_size], entry.kind)
                block = np.ascontiguousarray(block.numpy().astype(_DTYPE))
                mm[start:start + block.shape[0]] = block
                digest.update(block.tobytes())  # row-major blocks concatenate to the array bytes
            mm.flush()
            offset = int(mm.offset)
            del mm
        meta = {"format_version": FORMAT_VERSION, "key": entry.key, "identity": encoder.identity,
                "num_prompts": entry.num_prompts, "embedding_dim": entry.embedding_dim,
                "dtype": np.dtype(_DTYPE).name, "shape": list(entry.array_shape), "kind": entry.kind,
                "data_offset": offset, "sha256": digest.hexdigest()}
        atomic_write(entry.sidecar_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))

    @staticmethod
    def _encode_batch(encoder: TextEncoder, prompts: Sequence[str], kind: str = "pooled") -> Tensor:
        with torch.no_grad():
            emb = encoder.encode(list(prompts)) if kind == "pooled" else encoder.encode_tokens(list(prompts))
        expected = ((len(prompts), encoder.embedding_dim) if kind == "pooled"
                    else (len(prompts), *map(int, encoder.token_shape)))
        if tuple(emb.shape) != tuple(expected):
            raise ValueError(f"{encoder.identity} returned {tuple(emb.shape)} for {len(prompts)} prompts, "
                             f"expected {tuple(expected)}")
        return emb.detach().float().cpu()

    def _encode_all(self, encoder: TextEncoder, prompts: Sequence[str], batch_size: int, kind: str = "pooled"
                    ) -> Tensor:
        blocks = [self._encode_batch(encoder, prompts[i:i + batch_size], kind)
                  for i in range(0, len(prompts), batch_size)]
        # Same fp16 rounding as the cache, so every rank sees identical values.
        return torch.cat(blocks).half().float()
