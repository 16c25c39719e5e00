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

Verification at start-up is O(1) in the corpus size (issue 15): the sidecar records the array
file's size, mtime and inode and a hash of its first and last MiB; when those match, the full
sha256 (4.5 s at 1M prompts) is skipped. Any rewrite of the file (a new mtime/inode) or damage
at its ends falls back to the full hash; ``verify="full"`` forces it.

DDP protocol, barrier-free (issue 15: a barrier with the process group's default timeout killed
rank 0 in the middle of a 2.6 h build): candidate builders (``is_builder=True``: rank 0, or each
node's local rank 0) take an exclusive ``.<stem>.building`` lock file, encode with progress and
publish; the lock file carries a heartbeat and the progress. Everyone else polls for a *valid*
pair, logs the builder's progress, and never encodes: it raises :class:`CacheWaitError` when
``wait_timeout_s`` passes or the builder's heartbeat is older than ``stale_s`` (it died).
A builder that finds a live lock waits the same way. SIGTERM during a build removes the temp
files and the lock (then exits with 143), as exceptions do.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from amortized3d.atomic import atomic_path, atomic_write
from amortized3d.slugs import readable
from amortized3d.text.base import TextEncoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("pooled", "tokens")
_DTYPE = np.float16
_HASH_BLOCK = 1 << 24
_EDGE_BYTES = 1 << 20  # fast verification hashes this much at each end of the data
# A waiter gives up after this long (s) by default: generous (ViT-B-16 on a CPU encodes ~10 prompts/s,
# so 100k prompts take ~2.6 h), but bounded; a dead builder is noticed much sooner through stale_s.
DEFAULT_WAIT_TIMEOUT_S = 12 * 3600.0
DEFAULT_STALE_S = 600.0  # the builder's heartbeat (once per encoded batch, at least every 30 s) is this old: dead
_HEARTBEAT_S = 5.0  # the builder rewrites its lock file's progress at most this often


class CacheWaitError(RuntimeError):
    """A rank waited for another rank's cache build and it did not arrive (timeout or dead builder)."""


class BuildTerminated(SystemExit):
    """SIGTERM arrived during a cache build; raised so that the temp files are removed on the way out."""


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


def _edge_sha256(path: Path, offset: int) -> str:
    """sha256 of the first and last ``_EDGE_BYTES`` of the data (what the fast verification reads)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        h.update(f.read(_EDGE_BYTES))
        f.seek(max(offset, size - _EDGE_BYTES))
        h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()


def _file_stamp(path: Path) -> dict:
    """What changes when the file is rewritten or replaced (recorded in the sidecar)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`BuildTerminated` (so ``finally`` clauses run).

    Python's default SIGTERM action kills the process without unwinding, which left
    ``.npy.<pid>.tmp`` files behind. Signals can only be handled on the main thread; elsewhere
    this is a no-op. The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise BuildTerminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lock_record(done: int, total: int) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "done": int(done), "total": int(total),
            "time": time.time()}


def _read_lock(path: Path) -> dict | None:
    """The lock holder's record plus ``age_s`` (seconds since its last heartbeat), or None (no lock)."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except OSError:
        return None
    try:
        record = json.loads(text)
    except ValueError:  # caught mid-rewrite: the stamp still tells its age
        record = {}
    return {**record, "age_s": age}


def _lock_dead(holder: dict, stale_s: float) -> str | None:
    """Why the lock's holder is dead (no heartbeat for ``stale_s``, or its pid is gone here), or None."""
    if holder["age_s"] > stale_s:
        return f"no heartbeat for {holder['age_s']:.0f} s (builder pid {holder.get('pid')} on {holder.get('host')})"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"builder pid {pid} on this host has exited"
        except PermissionError:
            pass
    return None


def _beat(path: Path, done: int, total: int) -> None:
    """Heartbeat + progress into the lock file, at most every ``_HEARTBEAT_S``."""
    try:
        if time.time() - path.stat().st_mtime < _HEARTBEAT_S and done < total:
            return
        path.write_text(json.dumps(_lock_record(done, total)))
    except OSError:
        pass


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "no build lock yet"
    done, total = holder.get("done"), holder.get("total")
    return (f"builder pid {holder.get('pid')} on {holder.get('host')}: {done}/{total} prompts, "
            f"heartbeat {holder['age_s']:.0f} s ago")


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
                      is_builder: bool = True, dtype: torch.dtype = torch.float32, kind: str = "pooled",
                      wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, stale_s: float = DEFAULT_STALE_S,
                      poll_s: float = 1.0, verify: str = "fast") -> Tensor:
        """Embeddings [N, E] (``kind="tokens"``: [N, L, E]) of ``prompts`` (float32 copy;
        ``dtype=torch.float16`` returns a zero-copy, copy-on-write memory-mapped view instead).

        ``is_builder=False`` never encodes: it waits for a builder's valid pair (see the module
        docstring) and raises :class:`CacheWaitError` when none arrives. ``barrier`` (optional, kept
        for callers that have one) is called by the builder after publishing and by the others
        before loading.
        """
        prompts = list(prompts)
        entry = self.entry(encoder, corpus_name, prompts, kind)
        if not prompts:
            if barrier is not None:
                barrier()
            return torch.zeros(entry.array_shape, dtype=dtype)
        wait = dict(timeout_s=wait_timeout_s, stale_s=stale_s, poll_s=poll_s, verify=verify)
        if is_builder:
            array = self._load_or_build_locked(entry, encoder, prompts, batch_size, wait)
            if barrier is not None:
                barrier()
        else:
            if barrier is not None:
                barrier()
            array = self.wait_for(entry, **wait)
        if dtype == torch.float16:
            return torch.from_numpy(array)
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(dtype)

    def load_or_build_shared(self, encoder: TextEncoder, corpus_name: str, prompts: Sequence[str],
                             timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, poll_s: float = 1.0, **kwargs) -> Tensor:
        """``load_or_build`` before the process group exists: local rank 0 of each node builds (node-
        local disks get their own copy; on a shared disk the lock file makes it one build), the other
        ranks wait for a valid pair, bounded by ``timeout_s``, and never encode themselves."""
        return self.load_or_build(encoder, corpus_name, prompts, is_builder=local_rank_from_env() == 0,
                                  wait_timeout_s=timeout_s, poll_s=poll_s, **kwargs)

    # --- build lock: who builds, and how far it got -------------------------------------------
    @staticmethod
    def lock_path(entry: CacheEntry) -> Path:
        return entry.array_path.with_name(f".{entry.array_path.stem}.building")

    def _try_lock(self, entry: CacheEntry, stale_s: float) -> bool:
        """Take the build lock (exclusive create); a dead holder's lock is removed and retaken."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.lock_path(entry)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is None or _lock_dead(holder, stale_s) is None:
                    return False  # alive (or it just vanished: the caller then finds the pair or waits)
                log.warning("removing the build lock %s of a dead builder (%s)", path, _lock_dead(holder, stale_s))
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_lock_record(0, entry.num_prompts), f)
            return True
        return False

    def _load_or_build_locked(self, entry: CacheEntry, encoder: TextEncoder, prompts: list[str],
                              batch_size: int, wait: dict) -> np.ndarray:
        array = self.load(entry, wait["verify"])
        if array is not None:
            return array
        if not self._try_lock(entry, wait["stale_s"]):
            log.info("another process is building %s; waiting for it", entry.array_path.name)
            return self.wait_for(entry, **wait)
        path = self.lock_path(entry)
        try:
            with _sigterm_raises():
                if self._verify(entry) is not None:  # nobody published between our load and our lock
                    self.build(entry, encoder, prompts, batch_size, progress=lambda done: _beat(path, done, len(prompts)))
        finally:
            path.unlink(missing_ok=True)
        array = self.load(entry, wait["verify"])
        if array is None:
            raise RuntimeError(f"embedding cache {entry.array_path} does not verify right after building it")
        return array

    def wait_for(self, entry: CacheEntry, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
                 stale_s: float = DEFAULT_STALE_S, poll_s: float = 1.0, verify: str = "fast",
                 log_every_s: float = 60.0) -> np.ndarray:
        """Poll until a valid pair exists (another process builds it); never encodes.

        Raises :class:`CacheWaitError` after ``timeout_s``, when the builder's heartbeat is older
        than ``stale_s`` (or its pid is gone, on this host), or when no build lock has been seen for
        ``stale_s`` (nobody is building). Logs the builder's progress every ``log_every_s``.
        """
        start = last_log = time.monotonic()
        last_holder_seen = start
        while True:
            reason = self._verify(entry, full=verify == "full")
            if reason is None:
                return np.load(entry.array_path, mmap_mode="c")
            now = time.monotonic()
            holder = _read_lock(self.lock_path(entry))
            hint = ("; build it first with `python scripts/precompute_text_embeddings.py` (training text) or on one "
                    "rank, or raise the wait timeout")
            if holder is not None:
                last_holder_seen = now
                dead = _lock_dead(holder, stale_s)
                if dead is not None:
                    raise CacheWaitError(f"the build of {entry.array_path} stopped: {dead}; remove "
                                         f"{self.lock_path(entry)} and rerun{hint}")
            elif now - last_holder_seen > stale_s:
                raise CacheWaitError(f"no process has been building {entry.array_path} for {now - last_holder_seen:.0f} s "
                                     f"(state: {reason}); this rank does not encode the corpus itself{hint}")
            if now - start > timeout_s:
                raise CacheWaitError(f"waited {now - start:.0f} s (timeout {timeout_s:.0f} s) for {entry.array_path} "
                                     f"({_describe(holder)}){hint}")
            if now - last_log >= log_every_s:
                log.info("waiting %.0f s for %s: %s", now - start, entry.array_path.name, _describe(holder))
                last_log = now
            time.sleep(poll_s)

    def load(self, entry: CacheEntry, verify: str = "fast") -> np.ndarray | None:
        """The verified memmap (copy-on-write), or None on a miss; corrupt entries are reported.

        ``verify="fast"`` trusts the sidecar's recorded file stamp plus a hash of the data's ends
        (O(1)); ``"full"`` re-hashes every byte.
        """
        if verify not in ("fast", "full"):
            raise ValueError(f"verify must be 'fast' or 'full', got {verify!r}")
        if not entry.array_path.exists() and not entry.sidecar_path.exists():
            return None
        reason = self._verify(entry, full=verify == "full")
        if reason is not None:
            warnings.warn(f"embedding cache {entry.array_path} is invalid ({reason}); rebuilding",
                          RuntimeWarning, stacklevel=3)
            return None
        return np.load(entry.array_path, mmap_mode="c")

    def _verify(self, entry: CacheEntry, full: bool = False) -> str | None:
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
        if (not full and meta.get("stamp") == _file_stamp(entry.array_path)
                and meta.get("edge_sha256") == _edge_sha256(entry.array_path, offset)):
            return None  # the file is the one the sidecar describes (not rewritten, ends intact)
        if _file_sha256(entry.array_path, offset) != meta.get("sha256"):
            return "checksum mismatch"
        return None

    def build(self, entry: CacheEntry, encoder: TextEncoder, prompts: Sequence[str], batch_size: int = 256,
              progress: Callable[[int], None] | None = None) -> None:
        """Encode in batches into a temp file, fsync, atomically publish array then sidecar.

        ``progress(prompts_done)`` is called after every batch; progress is logged every 30 s.
        SIGTERM (main thread) and exceptions remove the temp files.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        entry.sidecar_path.unlink(missing_ok=True)  # never pair a stale sidecar with new bytes
        with _sigterm_raises():  # SIGTERM unwinds through atomic_path's cleanup instead of killing outright
            self._write(entry, encoder, prompts, batch_size, progress)

    def _write(self, entry: CacheEntry, encoder: TextEncoder, prompts: Sequence[str], batch_size: int,
               progress: Callable[[int], None] | None) -> None:
        started = last_log = time.monotonic()
        with atomic_path(entry.array_path) as tmp_array:
            mm = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=_DTYPE,
                                           shape=entry.array_shape)
            digest = hashlib.sha256()
            for start in range(0, len(prompts), batch_size):
                block = self._encode_batch(encoder, prompts[start:start + batch_size], entry.kind)
                block = np.ascontiguousarray(block.numpy().astype(_DTYPE))
                mm[start:start + block.shape[0]] = block
                digest.update(block.tobytes())  # row-major blocks concatenate to the array bytes
                done = start + block.shape[0]
                if progress is not None:
                    progress(done)
                if time.monotonic() - last_log >= 30.0 or done == len(prompts):
                    last_log = time.monotonic()
                    rate = done / max(last_log - started, 1e-9)
                    log.info("encoding %s: %d/%d prompts (%.1f/s, %.0f s left)", entry.array_path.name, done,
                             len(prompts), rate, (len(prompts) - done) / rate)
            mm.flush()
            offset = int(mm.offset)
            del mm
        fast = {"stamp": _file_stamp(entry.array_path), "edge_sha256": _edge_sha256(entry.array_path, offset)}
        meta = {"format_version": FORMAT_VERSION, "key": entry.key, "identity": encoder.identity,
                "num_prompts": entry.num_prompts, "embedding_dim": entry.embedding_dim,
                "dtype": np.dtype(_DTYPE).name, "shape": list(entry.array_shape), "kind": entry.kind,
                "data_offset": offset, "sha256": digest.hexdigest(), **fast}
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
