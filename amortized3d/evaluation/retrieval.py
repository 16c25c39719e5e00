"""CLIP R@1 and CLIP similarity from embeddings, chunked so that 100k prompts fit in memory.

Definitions (ScaleDreamer Tables 2-3, L2-VSD Table 1, SDI Table 6.1):
- Sim  = cosine(image, own prompt), per view.
- R@1  = per view, 1 if the own prompt is the argmax of cosine(image, t) over *all* candidate
  prompts t of the corpus split, else 0.
Both are averaged over the views of a prompt, then over prompts (:func:`prompt_means`).

Ties: scores that are exactly equal go to the lowest candidate index (``torch.argmax``'s rule),
so the result is deterministic and identical to a brute-force argmax over the full score
matrix. Scores are computed in float64 so chunking cannot reorder nearly-equal candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RetrievalResult:
    similarity: Tensor  # [N] cosine(image, own prompt), float64
    hit: Tensor  # [N] 1.0 where the own prompt is the argmax over all candidates
    best: Tensor  # [N] long: the retrieved candidate index


def normalize(x: Tensor) -> Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def retrieve(image_emb: Tensor, text_emb: Tensor, own: Tensor, image_chunk: int = 2048,
             text_chunk: int = 8192) -> RetrievalResult:
    """Per-image Sim and R@1 of ``image_emb`` [N,D] against candidates ``text_emb`` [P,D].

    ``own`` [N] is each image's own candidate index. Embeddings need not be normalised. Beyond
    the inputs, peak memory is one [image_chunk, text_chunk] float64 block (128 MiB at the
    defaults); candidates are normalised chunk by chunk, never copied whole to float64.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must be [N,D] and [P,D] with the same D, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    own = torch.as_tensor(own, dtype=torch.long).cpu()
    if own.shape != (image_emb.shape[0],):
        raise ValueError(f"own must have one index per image ({image_emb.shape[0]}), got shape {tuple(own.shape)}")
    num_text = text_emb.shape[0]
    if len(own) and (own.min() < 0 or own.max() >= num_text):
        raise ValueError(f"own indices must lie in [0, {num_text}), got [{int(own.min())}, {int(own.max())}]")
    if image_chunk < 1 or text_chunk < 1:
        raise ValueError("chunk sizes must be >= 1")
    text_emb = text_emb.cpu()
    sims, bests = [], []
    for start in range(0, image_emb.shape[0], image_chunk):
        images = normalize(image_emb[start:start + image_chunk].cpu())
        own_chunk = own[start:start + image_chunk]
        sims.append((images * normalize(text_emb[own_chunk])).sum(-1))
        best_val = torch.full((len(images),), -torch.inf, dtype=torch.float64)
        best_idx = torch.zeros(len(images), dtype=torch.long)
        for t0 in range(0, num_text, text_chunk):
            val, idx = (images @ normalize(text_emb[t0:t0 + text_chunk]).T).max(dim=1)  # first maximum within the chunk
            better = val > best_val  # strict: an earlier chunk keeps a tie
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + t0, best_idx)
        bests.append(best_idx)
    best = torch.cat(bests) if bests else torch.zeros(0, dtype=torch.long)
    similarity = torch.cat(sims) if sims else torch.zeros(0, dtype=torch.float64)
    return RetrievalResult(similarity=similarity, hit=(best == own).double(), best=best)


def prompt_means(values: Tensor, views_per_prompt: int) -> Tensor:
    """[P*V] per-view values (prompt-major) -> [P] per-prompt means over views."""
    if views_per_prompt < 1 or values.numel() % views_per_prompt:
        raise ValueError(f"{values.numel()} values do not split into prompts of {views_per_prompt} views")
    return values.reshape(-1, views_per_prompt).mean(dim=1)
