"""The embedding cache with SD's CLIP encoder: pooled and token files, invalidation, corruption, precompute."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from amortized3d.text.cache import EmbeddingCache
from amortized3d.text.clip import CLIPTextEncoder

PROMPTS = ["a red cube", "a blue ball", "a green cone", "a yellow torus", "a purple cube"]


@pytest.fixture()
def encoder(tiny_sd):
    return CLIPTextEncoder(str(tiny_sd), local_files_only=True)


def test_token_embeddings_get_their_own_verified_file(tmp_path, encoder):
    cache = EmbeddingCache(tmp_path)
    tokens = cache.load_or_build(encoder, "toy", PROMPTS, batch_size=2, kind="tokens")
    pooled = cache.load_or_build(encoder, "toy", PROMPTS, batch_size=2)
    ref_pooled, ref_tokens = encoder.encode_with_tokens(PROMPTS)
    assert tokens.shape == (5, 77, 32) and pooled.shape == (5, 32)
    torch.testing.assert_close(tokens, ref_tokens.half().float())
    torch.testing.assert_close(pooled, ref_pooled.half().float())
    t_entry, p_entry = cache.entry(encoder, "toy", PROMPTS, "tokens"), cache.entry(encoder, "toy", PROMPTS)
    assert t_entry.array_path != p_entry.array_path and t_entry.key != p_entry.key
    assert np.load(t_entry.array_path, mmap_mode="r").dtype == np.float16


def test_changed_corpus_rebuilds_and_corrupt_token_file_is_detected(tmp_path, encoder):
    cache = EmbeddingCache(tmp_path)
    good = cache.load_or_build(encoder, "toy", PROMPTS, kind="tokens")
    entry = cache.entry(encoder, "toy", PROMPTS, "tokens")
    changed = cache.entry(encoder, "toy", PROMPTS[:-1] + ["a white cone"], "tokens")
    assert changed.array_path != entry.array_path
    raw = entry.array_path.read_bytes()
    entry.array_path.write_bytes(raw[:-100])  # truncated
    with pytest.warns(RuntimeWarning, match="truncated"):
        torch.testing.assert_close(cache.load_or_build(encoder, "toy", PROMPTS, kind="tokens"), good)
    flipped = bytearray(entry.array_path.read_bytes())
    flipped[-1] ^= 0xFF
    entry.array_path.write_bytes(bytes(flipped))
    with pytest.warns(RuntimeWarning, match="checksum"):
        torch.testing.assert_close(cache.load_or_build(encoder, "toy", PROMPTS, kind="tokens"), good)


def test_precompute_fills_the_cache_that_training_reads(tmp_path, cache_dir, tiny_sd):
    from amortized3d.text.precompute import precompute_text_embeddings
    from amortized3d.build import build_system
    from conftest import compose
    from sd_helpers import sd_overrides

    cfg = compose(tmp_path, tmp_path / "cache", *sd_overrides(tiny_sd), tiny=False)
    facts = precompute_text_embeddings(cfg, tokens=True)
    path = facts["train/pooled"]["path"]
    assert facts["train/tokens"]["shape"][1:] == [77, 32]
    mtime = os.stat(path).st_mtime_ns
    system, _, _ = build_system(cfg)
    assert os.stat(path).st_mtime_ns == mtime  # a cache hit: nothing rebuilt
    assert system.text_table.shape == tuple(facts["train/pooled"]["shape"])
