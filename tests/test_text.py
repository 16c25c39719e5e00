"""The offline bag-of-words encoder and the verified on-disk embedding cache."""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amortized3d.text import BagOfWordsTextEncoder, EmbeddingCache, TextEncoder

PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("cube", "sphere", "torus")]


class CountingEncoder(BagOfWordsTextEncoder):
    """A real encoder that counts how many batches and prompts it encoded."""

    def __init__(self, embedding_dim: int = 64, seed: int = 0, fail_on_call: int | None = None):
        super().__init__(embedding_dim, seed)
        self.calls, self.prompts_encoded, self.fail_on_call = 0, 0, fail_on_call

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise RuntimeError("simulated crash mid-build")
        self.prompts_encoded += len(prompts)
        return super().encode(prompts)


# -- encoder ------------------------------------------------------------------------------------
def test_encoder_is_deterministic_unit_norm_and_sized():
    a, b = BagOfWordsTextEncoder(), BagOfWordsTextEncoder()
    ea, eb = a.encode(PROMPTS), b.encode(PROMPTS)
    assert isinstance(a, TextEncoder) and ea.shape == (len(PROMPTS), 1024) and ea.dtype == torch.float32
    assert torch.equal(ea, eb)
    assert torch.allclose(ea.norm(dim=1), torch.ones(len(PROMPTS)))
    assert BagOfWordsTextEncoder(embedding_dim=32).encode(["a red cube"]).shape == (1, 32)
    assert not torch.allclose(BagOfWordsTextEncoder(seed=1).encode(["a red cube"]), a.encode(["a red cube"]))


def test_encoder_is_compositional():
    enc = BagOfWordsTextEncoder()
    green_torus, green_cube, red_cube = enc.encode(["a green torus", "a green cube", "a red cube"])
    assert F.cosine_similarity(green_torus, green_cube, dim=0) > F.cosine_similarity(green_torus, red_cube, dim=0) + 0.3
    expected = enc.word_vector("green") + enc.word_vector("torus")
    assert torch.allclose(green_torus, expected / expected.norm(), atol=1e-6)
    # stop words and case do not matter
    assert torch.equal(enc.encode(["The Green TORUS"]), enc.encode(["a green torus"]))


def test_null_embedding_and_identity():
    enc = BagOfWordsTextEncoder(embedding_dim=128, seed=3)
    null = enc.encode(["", "the", "  "])
    assert torch.equal(null[0], null[1]) and torch.equal(null[0], null[2])
    assert torch.equal(null[0], BagOfWordsTextEncoder(embedding_dim=128, seed=3).null_embedding)
    assert F.cosine_similarity(null[0], enc.encode(["a red cube"])[0], dim=0).abs() < 0.5
    assert all(s in enc.identity for s in ("BagOfWordsTextEncoder", "v1", "128", "seed3"))
    assert len({enc.identity, BagOfWordsTextEncoder(128, 4).identity, BagOfWordsTextEncoder(64, 3).identity}) == 3
    with pytest.raises(TypeError):
        enc.encode("a red cube")


# -- cache --------------------------------------------------------------------------------------
def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_build_then_load_hits_cache(tmp_path):
    enc = CountingEncoder()
    first = EmbeddingCache(tmp_path).load_or_build(enc, "toy", PROMPTS, batch_size=5)
    assert (enc.calls, enc.prompts_encoded) == (3, len(PROMPTS))  # ceil(12 / 5) batches
    again = EmbeddingCache(tmp_path).load_or_build(enc, "toy", PROMPTS, batch_size=5)
    assert enc.calls == 3 and torch.equal(first, again)
    assert first.dtype == torch.float32 and first.shape == (len(PROMPTS), 64)
    names = _files(tmp_path)
    assert len(names) == 2 and names[0].startswith("toy__countingencoder_v1_dim64_seed0__")  # class is in the identity
    half = EmbeddingCache(tmp_path).load_or_build(enc, "toy", PROMPTS, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half.float(), first) and enc.calls == 3


def test_values_match_encoder_within_fp16(tmp_path):
    enc = BagOfWordsTextEncoder(embedding_dim=256)
    cached = EmbeddingCache(tmp_path).load_or_build(enc, "toy", PROMPTS)
    torch.testing.assert_close(cached, enc.encode(PROMPTS), atol=1e-3, rtol=1e-3)
    assert torch.equal(cached, enc.encode(PROMPTS).half().float())


def test_file_holds_two_bytes_per_dimension(tmp_path):
    enc = BagOfWordsTextEncoder(embedding_dim=96)
    cache = EmbeddingCache(tmp_path)
    cache.load_or_build(enc, "toy", PROMPTS)
    path = cache.entry(enc, "toy", PROMPTS).array_path
    header = path.stat().st_size - 2 * 96 * len(PROMPTS)
    assert 0 < header <= 256
    assert np.load(path, mmap_mode="r").dtype == np.float16


def test_changed_corpus_or_encoder_rebuilds(tmp_path):
    cache, enc = EmbeddingCache(tmp_path), CountingEncoder()
    cache.load_or_build(enc, "toy", PROMPTS)
    cache.load_or_build(enc, "toy", PROMPTS[:-1] + ["a purple cone"])
    assert enc.prompts_encoded == 2 * len(PROMPTS)
    cache.load_or_build(enc, "toy", list(reversed(PROMPTS)))  # order is part of the key
    assert enc.prompts_encoded == 3 * len(PROMPTS)
    other = CountingEncoder(seed=1)
    cache.load_or_build(other, "toy", PROMPTS)
    assert other.prompts_encoded == len(PROMPTS)
    assert len(_files(tmp_path)) == 8


def test_file_names_use_the_one_slugifier_and_stay_unique_by_key(tmp_path):
    from amortized3d.slugs import readable

    cache, enc = EmbeddingCache(tmp_path), CountingEncoder()
    a = cache.entry(enc, "My Corpus (v2)", PROMPTS)
    assert a.array_path.name == f"{readable('My Corpus (v2)')}__{readable(enc.identity)}__{a.key[:16]}.npy"
    assert set(a.array_path.stem) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")
    # same readable part, other prompts or encoder: another key, so another file
    assert cache.entry(enc, "my corpus v2", PROMPTS[:-1]).array_path != a.array_path
    assert cache.entry(CountingEncoder(seed=1), "My Corpus (v2)", PROMPTS).array_path != a.array_path


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "sidecar", "no_sidecar", "header"])
def test_corruption_is_detected_reported_and_rebuilt(tmp_path, damage):
    cache, enc = EmbeddingCache(tmp_path), CountingEncoder()
    good = cache.load_or_build(enc, "toy", PROMPTS)
    entry = cache.entry(enc, "toy", PROMPTS)
    raw = bytearray(entry.array_path.read_bytes())
    if damage == "truncate":
        entry.array_path.write_bytes(bytes(raw[:-7]))
    elif damage == "bitflip":
        raw[-100] ^= 0x10
        entry.array_path.write_bytes(bytes(raw))
    elif damage == "sidecar":
        entry.sidecar_path.write_text("{not json")
    elif damage == "no_sidecar":
        entry.sidecar_path.unlink()
    else:
        entry.array_path.write_bytes(b"garbage" + bytes(raw[7:]))
    with pytest.warns(RuntimeWarning, match=entry.array_path.name):
        rebuilt = cache.load_or_build(enc, "toy", PROMPTS)
    assert enc.prompts_encoded == 2 * len(PROMPTS) and torch.equal(rebuilt, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache.load_or_build(enc, "toy", PROMPTS), good)  # healthy again
    assert enc.prompts_encoded == 2 * len(PROMPTS)


def test_crash_mid_build_leaves_nothing_that_looks_valid(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.load_or_build(CountingEncoder(fail_on_call=2), "toy", PROMPTS, batch_size=4)
    assert _files(tmp_path) == []  # no array, no sidecar, no temp file
    enc = CountingEncoder()
    cache.load_or_build(enc, "toy", PROMPTS, batch_size=4)
    assert enc.calls == 3


def test_ddp_protocol_builder_then_barrier(tmp_path):
    """Two 'ranks' as threads: rank 0 builds then waits, rank 1 waits then loads (no encoding)."""
    barrier = threading.Barrier(2, timeout=30)
    encoders = [CountingEncoder(), CountingEncoder()]
    results: dict[int, torch.Tensor] = {}

    def rank(r: int) -> None:
        results[r] = EmbeddingCache(tmp_path).load_or_build(encoders[r], "toy", PROMPTS, barrier=barrier.wait,
                                                            is_builder=(r == 0))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert encoders[0].prompts_encoded == len(PROMPTS) and encoders[1].calls == 0
    assert torch.equal(results[0], results[1])


def test_empty_corpus(tmp_path):
    assert EmbeddingCache(tmp_path).load_or_build(CountingEncoder(), "toy", []).shape == (0, 64)
