"""Intra-op thread control for loops of many small CPU ops."""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, restoring the previous count afterwards.

    For loops of many tiny ops (2x2 toy problems, cache-sized MLP chunks): with several OpenMP
    threads every op ends in a barrier, and on a shared, oversubscribed CPU each barrier waits for
    another thread's next time slice (measured 5-1000x slower at load ~20 on the 2-core box).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Two halves of independent work on two threads (session 9).
#
# The hot loops of a CPU render (the chunked MLP heads, the hash grid's dense levels) run on one
# intra-op thread: OpenMP would put a barrier after every small op, and on a shared box each barrier
# waits for a time slice (see single_thread). With 2+ threads allowed, their work is split instead into
# two independent halves (the MLP heads' fields, the grid's dense levels, the feature planes of the hashed
# levels' table gradient), each run start to end on its own
# thread with one intra-op thread: one join per call instead of one barrier per op. Each half computes
# exactly what the serial loop computes for it, so results are bit-equal to the serial path
# (tests/test_threads.py) and resume stays exact.

#: Off by default: AMORTIZED3D_SPLIT_THREADS=1 turns it on. Not measured on idle cores; on the shared 2-core
#: box (load ~3, both cores busy) a 2-thread training render took 1.89 s split vs 1.15 s serial (the join
#: waits for the busier core), docs/results.md session 9.
SPLIT_THREADS = os.environ.get("AMORTIZED3D_SPLIT_THREADS", "0") == "1"
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def split_in_two(device: torch.device) -> bool:
    """Whether work on ``device`` should be split over two threads: CPU, the switch on, and at least two
    intra-op threads allowed (call it before entering :func:`single_thread`)."""
    return SPLIT_THREADS and device.type == "cpu" and torch.get_num_threads() >= 2


def _worker(fn: Callable[[], T], grad_enabled: bool) -> T:
    torch.set_num_threads(1)  # this thread's own OpenMP/MKL setting (both are per thread)
    with torch.set_grad_enabled(grad_enabled):
        return fn()


def run_pair(first: Callable[[], T], second: Callable[[], T]) -> tuple[T, T]:
    """``(first(), second())`` with ``second`` on a worker thread and ``first`` on this one (one
    intra-op thread each; this thread's grad mode in both)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="amortized3d-split")
    future = _POOL.submit(_worker, second, torch.is_grad_enabled())
    with single_thread():
        try:
            a = first()
        finally:
            b = future.result()  # always joined: the worker may still be writing a shared buffer
    return a, b
