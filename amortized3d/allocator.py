"""The CPU allocator's handling of large blocks (glibc): keep freed memory in the process for reuse.

torch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold (128 KiB,
growing up to 32 MiB) with a fresh ``mmap`` and returns them with ``munmap`` when freed, so every
large temporary of a render (the hash grid's [levels, points, 8] rows and weights: 10-400 MB at the
SD prior's 4096 rays x 192 samples) is page-faulted and zeroed by the kernel again on every op. Raising
the mmap and trim thresholds keeps those blocks in the heap, where the next op of the same size reuses
them: the full-size render forward + backward was ~1.8x faster on the 2-core CPU (docs/results.md,
session 10). The cost: the process keeps its peak heap resident (freed memory is not handed back).
Results are unchanged (only where memory comes from). No effect on CUDA tensors.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

#: glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: The largest value mallopt takes (an int): blocks above 2 GiB still get their own mmap.
_KEEP = 2**31 - 1
MODES = ("keep_freed", "default")


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None  # glibc only


def configure_cpu_allocator(mode: str) -> bool:
    """``keep_freed``: raise glibc's mmap and trim thresholds to 2 GiB for the rest of the process;
    ``default``: leave malloc as it is. Returns whether the setting was applied (False for ``default``
    and where there is no glibc, e.g. macOS, Windows, musl: nothing changes there)."""
    if mode not in MODES:
        raise ValueError(f"cpu allocator mode must be one of {MODES}, got {mode!r}")
    if mode == "default":
        return False
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, _KEEP)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _KEEP))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def large_blocks_are_mmapped(nbytes: int = 64 * 2**20) -> bool | None:
    """Whether glibc serves a ``nbytes`` block with its own mmap (its default above the threshold; False
    once ``keep_freed`` applies). None where it cannot tell (no glibc >= 2.33 mallinfo2). For tests."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(nbytes)
    try:
        return libc.mallinfo2().hblkhd >= before + nbytes
    finally:
        libc.free(block)
