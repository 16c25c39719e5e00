"""Intra-op thread control for loops of many small CPU ops."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


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
