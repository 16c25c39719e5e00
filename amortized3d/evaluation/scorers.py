"""Per-prompt scorers: the renders of one prompt's orbit -> per-view metric values.

A scorer is prepared once with every candidate prompt of the evaluated split (CLIP: their text
embeddings; oracle: reference renders of their objects) and then scores prompts one at a
time, so a rank only ever holds the renders of the prompt it is working on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from amortized3d.evaluation.oracle import ReferenceRows, oracle_references, oracle_views
from amortized3d.evaluation.retrieval import CandidateIndex, retrieve
from amortized3d.text.cache import EmbeddingCache

EVALUATORS = ("clip", "oracle")


class Scorer(Protocol):
    name: str

    def score(self, index: int, prompt: str, renders: Tensor) -> dict[str, Tensor]:
        """``renders`` [V,3,H,W] of candidate ``index`` -> {metric: per-view values [V]}."""


class ClipScorer:
    """CLIP Sim and R@1 of a prompt's views against all candidate prompts."""

    name = "clip"

    def __init__(self, encoder, candidates: Sequence[str], text_emb: Tensor, image_chunk: int = 2048,
                 text_chunk: int = 8192):
        if len(text_emb) != len(candidates):
            raise ValueError(f"{len(text_emb)} text embeddings for {len(candidates)} candidates")
        # normalised once for the whole evaluation, on the encoder's device (issue 15: was per prompt)
        self.encoder, self.text_emb = encoder, CandidateIndex(text_emb.float(), getattr(encoder, "device", "cpu"),
                                                              chunk=text_chunk)
        self.image_chunk, self.text_chunk = image_chunk, text_chunk

    def score(self, index: int, prompt: str, renders: Tensor) -> dict[str, Tensor]:
        images = self.encoder.encode_images(renders)
        own = torch.full((len(images),), index, dtype=torch.long)
        res = retrieve(images, self.text_emb, own, self.image_chunk, self.text_chunk)
        return {"r_at_1": res.hit, "sim": res.similarity}


class OracleScorer:
    """Oracle PSNR and R@1 against ground-truth renders of a procedural world."""

    name = "oracle"

    def __init__(self, world, all_prompts: Sequence[str], cameras, renderer, bake: tuple[int, float] | None,
                 cache_dir: str | Path | None = None):
        self.world = world
        self.references, self.objects = oracle_references(world, all_prompts, cameras, renderer, bake,
                                                          None if cache_dir is None else str(cache_dir))
        self.reference_rows = ReferenceRows(self.references)  # float64 once, not per scored prompt

    def score(self, index: int, prompt: str, renders: Tensor) -> dict[str, Tensor]:
        from amortized3d.scenes.open_world import prompt_objects

        res = oracle_views(renders, self.reference_rows, self.objects, prompt_objects(self.world, prompt))
        return {"r_at_1": res.r_at_1, "psnr": res.psnr}


def clip_text_embeddings(encoder, corpus_name: str, candidates: Sequence[str], cache_dir: str | Path | None,
                         batch_size: int = 256, wait_timeout_s: float | None = None) -> Tensor:
    """Candidate text embeddings, computed once in batches and cached on disk (keyed by model+prompts).

    Every rank calls this. No barrier (issue 15: one with the process group's default timeout killed
    rank 0 during a 2.6 h ViT-B-16 build at 100k): each node's local rank 0 takes the cache's build
    lock and encodes with progress; the other ranks poll for the published file, log the builder's
    progress, and raise a clear error after ``wait_timeout_s`` (default: the cache's generous one)
    or when the builder dies. They never encode the candidates themselves.
    """
    from amortized3d.text.cache import DEFAULT_WAIT_TIMEOUT_S, local_rank_from_env

    if cache_dir is None:
        return torch.cat([encoder.encode(list(candidates[i:i + batch_size]))
                          for i in range(0, len(candidates), batch_size)])
    return EmbeddingCache(Path(cache_dir) / "clip_text").load_or_build(
        encoder, corpus_name, list(candidates), batch_size=batch_size, is_builder=local_rank_from_env() == 0,
        wait_timeout_s=DEFAULT_WAIT_TIMEOUT_S if wait_timeout_s is None else float(wait_timeout_s))


def build_scorer(cfg: Any, *, candidates: Sequence[str], corpus, world, orbit,
                 cache_dir: str | Path | None, device: str | torch.device = "cpu") -> Scorer:
    """The scorer named by ``cfg.name`` (an ``evaluator/*.yaml`` config); ``orbit``: an ``orbit.Orbit``;
    ``world``: the run's ground truth (``scenes.world.build_world``), needed by the oracle only."""
    name = cfg.get("name")
    if name == "clip":
        from amortized3d.evaluation.clip import ClipEncoder

        encoder = ClipEncoder(cfg.model, cfg.get("pretrained"), device=str(device), cache_dir=cfg.get("cache_dir"),
                              seed=int(cfg.get("seed", 0)), config_dirs=list(cfg.get("config_dirs") or []),
                              image_batch=int(cfg.get("image_batch", 64)))
        text = clip_text_embeddings(encoder, corpus.name, candidates, cache_dir, int(cfg.get("text_batch", 256)),
                                    cfg.get("text_cache_timeout_s"))
        return ClipScorer(encoder, candidates, text, int(cfg.get("image_chunk", 2048)), int(cfg.get("text_chunk", 8192)))
    if name == "oracle":
        if world is None:
            raise ValueError("evaluator=oracle needs a ground-truth world, but the checkpoint's run has none "
                             "(world: null); use evaluator=clip")
        from amortized3d.evaluation.oracle import corpus_prompts

        return OracleScorer(world, corpus_prompts(corpus), orbit.cameras, orbit.renderer, orbit.bake, cache_dir)
    raise ValueError(f"unknown evaluator {name!r}; valid evaluators: {', '.join(EVALUATORS)}")
