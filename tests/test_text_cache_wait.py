"""Issue 15 items 3, 7, 10: barrier-free cache builds, waiters that never encode, SIGTERM cleanup,
and start-up verification that does not re-hash the whole file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import amortized3d.text.cache as cache_mod
from amortized3d.text import EmbeddingCache

from test_text import PROMPTS, CountingEncoder

ROOT = Path(__file__).resolve().parents[1]


class SlowEncoder(CountingEncoder):
    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.identity = CountingEncoder().identity  # the same weights: the same cache file

    def encode(self, prompts):
        time.sleep(self.delay)
        return super().encode(prompts)


def _run_ranks(tmp_path, specs):
    """specs: [(start delay s, is_builder, encoder, kwargs)] as threads; returns results per index."""
    results, errors = {}, {}

    def rank(i, delay, is_builder, enc, kwargs):
        time.sleep(delay)
        try:
            results[i] = EmbeddingCache(tmp_path).load_or_build(enc, "toy", PROMPTS, batch_size=4,
                                                                is_builder=is_builder, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors[i] = err

    threads = [threading.Thread(target=rank, args=(i, *spec)) for i, spec in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_non_zero_local_rank_waits_for_a_stale_cache_to_be_rebuilt_and_never_encodes(tmp_path):
    """Finding 10: a stale pair and a non-builder that arrives first: it waits for rank 0, it does not encode."""
    cache = EmbeddingCache(tmp_path)
    good = cache.load_or_build(CountingEncoder(), "toy", PROMPTS)
    entry = cache.entry(CountingEncoder(), "toy", PROMPTS)
    raw = bytearray(entry.array_path.read_bytes())
    raw[-100] ^= 0x10
    entry.array_path.write_bytes(bytes(raw))  # stale: the sidecar no longer verifies
    waiter, builder = CountingEncoder(), SlowEncoder(0.2)
    results, errors = _run_ranks(tmp_path, [(0.0, False, waiter, {}), (0.5, True, builder, {})])
    assert not errors, errors
    assert waiter.calls == 0  # old code: warned and encoded the whole corpus in memory
    assert builder.prompts_encoded == len(PROMPTS)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], good)


def test_a_non_builder_with_no_builder_errors_clearly_instead_of_encoding(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    enc = CountingEncoder()
    with pytest.raises(cache_mod.CacheWaitError, match="does not encode"):
        EmbeddingCache(tmp_path).load_or_build_shared(enc, "toy", PROMPTS, timeout_s=30, poll_s=0.05,
                                                      stale_s=0.5)
    assert enc.calls == 0 and not any(tmp_path.iterdir())  # nothing encoded, nothing written


def test_the_wait_is_bounded_with_the_builders_progress_in_the_message(tmp_path):
    slow = SlowEncoder(0.6)
    results, errors = _run_ranks(tmp_path, [(0.0, True, slow, {}),
                                            (0.3, False, CountingEncoder(), {"wait_timeout_s": 0.5, "poll_s": 0.05})])
    assert isinstance(errors.get(1), cache_mod.CacheWaitError), errors
    assert "timeout" in str(errors[1]) and "/12 prompts" in str(errors[1])
    assert 0 in results and slow.prompts_encoded == len(PROMPTS)  # the builder itself was unaffected


def test_two_builders_on_one_disk_encode_once(tmp_path):
    """Each node's local rank 0 is a builder; on a shared disk the lock file makes it one build."""
    a, b = SlowEncoder(0.2), SlowEncoder(0.2)
    results, errors = _run_ranks(tmp_path, [(0.0, True, a, {"poll_s": 0.05}), (0.1, True, b, {"poll_s": 0.05})])
    assert not errors, errors
    assert a.prompts_encoded + b.prompts_encoded == len(PROMPTS)
    assert torch.equal(results[0], results[1])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_builders_lock_is_reported_to_waiters_and_taken_over_by_builders(tmp_path):
    cache, enc = EmbeddingCache(tmp_path), CountingEncoder()
    entry = cache.entry(enc, "toy", PROMPTS)
    tmp_path.mkdir(exist_ok=True)
    lock = cache.lock_path(entry)
    lock.write_text(f'{{"pid": {_dead_pid()}, "host": "{os.uname().nodename}", "done": 4, "total": 12}}')
    with pytest.raises(cache_mod.CacheWaitError, match="has exited"):
        cache.load_or_build(CountingEncoder(), "toy", PROMPTS, is_builder=False, poll_s=0.05)
    out = cache.load_or_build(enc, "toy", PROMPTS)
    assert enc.prompts_encoded == len(PROMPTS) and not lock.exists() and out.shape == (len(PROMPTS), 64)


def test_the_builder_reports_progress_per_batch(tmp_path):
    cache, enc, seen = EmbeddingCache(tmp_path), CountingEncoder(), []
    cache.build(cache.entry(enc, "toy", PROMPTS), enc, PROMPTS, batch_size=5, progress=seen.append)
    assert seen == [5, 10, 12]


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    from amortized3d.text import BagOfWordsTextEncoder, EmbeddingCache

    class Slow(BagOfWordsTextEncoder):
        def encode(self, prompts):
            time.sleep(0.3)
            return super().encode(prompts)

    EmbeddingCache(sys.argv[1]).load_or_build(Slow(embedding_dim=16), "toy", [f"p{i}" for i in range(400)],
                                              batch_size=4)
""")


def test_sigterm_during_a_build_removes_the_temp_files(tmp_path):
    """Finding 3: a process killed mid-build (e.g. by a timed-out barrier) left ``.npy.<pid>.tmp``."""
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(root)], env=env)
    deadline = time.monotonic() + 120
    while not (root.exists() and any(p.name.endswith(".tmp") for p in root.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    assert rc == 128 + signal.SIGTERM
    assert sorted(p.name for p in root.iterdir()) == []  # no temp file, no lock, nothing that looks valid


def test_startup_verification_does_not_rehash_the_file(tmp_path, monkeypatch):
    """Finding 7: a warm start re-hashed the whole table (4.5 s at 1M prompts); the sidecar's stamp suffices."""
    cache, enc = EmbeddingCache(tmp_path), CountingEncoder()
    good = cache.load_or_build(enc, "toy", PROMPTS)
    calls = []
    real = cache_mod._file_sha256
    monkeypatch.setattr(cache_mod, "_file_sha256", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(cache.load_or_build(enc, "toy", PROMPTS), good)
    assert calls == [] and enc.calls == 1
    entry = cache.entry(enc, "toy", PROMPTS)
    st = entry.array_path.stat()
    os.utime(entry.array_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: no longer trusted
    assert torch.equal(cache.load_or_build(enc, "toy", PROMPTS), good)
    assert calls == [1] and enc.calls == 1  # fully re-verified, still valid, not rebuilt
    assert torch.equal(cache.load_or_build(enc, "toy", PROMPTS, verify="full"), good) and calls == [1, 1]
