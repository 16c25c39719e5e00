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
# How the render's hot CPU loops use the intra-op threads (sessions 7, 9 and 15).
#
# The hot loops of a CPU render (the chunked MLP heads, the hash grid's dense levels and its table
# gradients) are many small ops each. Three policies, chosen by AMORTIZED3D_CPU_THREADS; each computes
# exactly what the others compute (the same ops on the same data, only scheduled differently), so results
# are bit-equal (tests/test_threads.py) and resume stays exact under any of them:
# - ``intra_op`` (default): torch's own intra-op (OpenMP) threads, as every other op runs. On 2 idle cores
#   the quickstart's trained-field training render is 1.1-1.2x faster than ``serial`` (one process,
#   interleaved; the chunked MLP forward alone 1.6x), and also faster with both cores busy with other work
#   (load 2: 337 vs 396 ms): docs/results.md session 15.
# - ``serial``: those loops on one intra-op thread. For oversubscribed boxes: at load ~20 on 2 cores
#   (session 7) every op's barrier waited for a time slice and 2-thread MLP chunks were 5-20x slower.
# - ``split``: two independent halves of the work (the MLP heads' fields, the dense levels, the hashed
#   levels' feature planes) on two threads with one intra-op thread each, one join per call (run_pair);
#   work it does not split runs as in ``serial``. Not faster than ``intra_op`` on idle cores (session 15).
#
# Under every policy the dense levels' grid_sample forward gives each intra-op thread its own batch of points
# (session 17, bit-equal): it is one large op per level, not a loop of small ones, and grid_sample's CPU kernel
# parallelises over the batch only (under ``split`` each half has one thread, so one batch).
#
# AMORTIZED3D_SPLIT_THREADS=1 (sessions 9-14) still selects ``split``.
CPU_THREAD_POLICIES = ("intra_op", "serial", "split")


def _policy_from_env() -> str:
    policy = os.environ.get("AMORTIZED3D_CPU_THREADS") or (
        "split" if os.environ.get("AMORTIZED3D_SPLIT_THREADS", "0") == "1" else "intra_op")
    if policy not in CPU_THREAD_POLICIES:
        raise ValueError(f"AMORTIZED3D_CPU_THREADS must be one of {CPU_THREAD_POLICIES}, got {policy!r}")
    return policy


CPU_THREADS = _policy_from_env()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def split_in_two(device: torch.device) -> bool:
    """Whether work on ``device`` should be split over two threads: CPU, the ``split`` policy, and at least
    two intra-op threads allowed (call it before entering :func:`loop_threads`)."""
    return CPU_THREADS == "split" and device.type == "cpu" and torch.get_num_threads() >= 2


def loop_threads(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The intra-op threads of a hot loop on ``device`` that is not split: one (:func:`single_thread`) under
    the ``serial`` and ``split`` policies on CPU, else unchanged."""
    if device.type == "cpu" and CPU_THREADS != "intra_op" and torch.get_num_threads() > 1:
        return single_thread()
    return contextlib.nullcontext()


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
