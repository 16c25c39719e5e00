"""An offline, deterministic, compositional text encoder for the analytic world.

Why: the Hyper-iNGP / 3DConv generators are conditioned on a pooled text embedding, and
without internet there is no CLIP. A bag of fixed random word vectors is enough for the
primitives world and, unlike a per-prompt lookup table, it is *compositional*: the embedding
of an unseen combination ("a green torus") is the normalised sum of word vectors that were
seen in training ("green" in "a green cube", "torus" in "a red torus"), so amortized
generalisation to held-out prompts is possible and measurable.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

import torch
from torch import Tensor

from amortized3d.text.base import TextEncoder

STOP_WORDS: frozenset[str] = frozenset(
    {"a", "an", "the", "of", "and", "with", "in", "on", "at", "to", "for", "by", "is", "its"})
_NULL_TOKEN = "\x00<null>"  # cannot collide with a tokenised word


class BagOfWordsTextEncoder(TextEncoder):
    """prompt -> L2-normalised sum of fixed unit Gaussian word vectors, [N, embedding_dim] float32.

    Word vectors are seeded from sha256(seed, word), so they are identical across processes,
    machines and library versions (no global RNG state is touched). Prompts with no content
    words (e.g. "", the unconditional prompt) map to a fixed "null" vector.
    """

    VERSION = 1
    _MAX_CACHED_WORDS = 50_000

    def __init__(self, embedding_dim: int = 1024, seed: int = 0):
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        self.embedding_dim = int(embedding_dim)
        self.seed = int(seed)
        self.identity = f"{type(self).__name__}-v{self.VERSION}-dim{self.embedding_dim}-seed{self.seed}"
        self._vectors: dict[str, Tensor] = {}

    @staticmethod
    def tokens(prompt: str) -> list[str]:
        """Lower-cased alphanumeric words minus stop words (order kept, repeats kept)."""
        return [w for w in re.findall(r"[a-z0-9]+", prompt.lower()) if w not in STOP_WORDS]

    def word_vector(self, word: str) -> Tensor:
        """The fixed unit-norm Gaussian vector of ``word``, [embedding_dim] float32."""
        vec = self._vectors.get(word)
        if vec is None:
            digest = hashlib.sha256(f"{self.seed}\x00{word}".encode("utf-8")).digest()
            gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            vec = torch.randn(self.embedding_dim, generator=gen, dtype=torch.float64)
            vec = (vec / vec.norm()).float()
            if len(self._vectors) >= self._MAX_CACHED_WORDS:  # bound memory on huge corpora
                self._vectors.clear()
            self._vectors[word] = vec
        return vec

    @property
    def null_embedding(self) -> Tensor:
        return self.word_vector(_NULL_TOKEN)

    def encode_one(self, prompt: str) -> Tensor:
        words = self.tokens(prompt)
        if not words:
            return self.null_embedding.clone()
        total = torch.stack([self.word_vector(w) for w in words]).double().sum(0)
        return (total / total.norm().clamp_min(1e-12)).float()

    def encode(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            raise TypeError("encode expects a sequence of prompts, not a single string")
        if len(prompts) == 0:
            return torch.zeros(0, self.embedding_dim)
        return torch.stack([self.encode_one(p) for p in prompts])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(embedding_dim={self.embedding_dim}, seed={self.seed})"
