"""CLIP R@1 and CLIP similarity from embeddings, chunked so that 100k prompts fit in memory.

Definitions (ScaleDreamer Tables 2-3, L2-VSD Table 1, SDI Table 6.1):
- Sim  = cosine(image, own prompt), per view.
- R@1  = per view, 1 if the own prompt is the argmax of cosine(image, t) over *all* candidate
  prompts t of the corpus split, else 0.
Both are averaged over the views of a prompt, then over prompts (:func:`prompt_means`).

Ties: scores that are exactly equal go to the lowest candidate index (``torch.argmax``'s rule),
so the result is deterministic and identical to a brute-force argmax over the full float64
score matrix.

Speed at scale (issue 15): the candidates are normalised ONCE into a :class:`CandidateIndex`
(built once per evaluation, on the scoring device, stored in float16: half the memory traffic
of float32, which bounds the CPU) and scored in chunks in float32. The float32 argmax is not
trusted: every candidate whose float32 score lies within twice a rigorous error bound
(:func:`score_error_bound`, 5e-4 for float16 storage at D=512) of the best float32 score is
re-scored in float64 from the raw embeddings, and the float64 maximum (lowest index on ties) is
the answer, so R@1 equals the float64 reference; Sim is computed in float64 as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: unit roundoff of each scoring dtype (inputs rounded to it; products accumulated in it)
_UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11}
_UPCAST_BLOCK = 2048  # candidates upcast float16 -> float32 at a time (a 4 MiB buffer at D=512, cache-resident)
_SLACK = 1e-12  # covers float64 rounding differences between ways of computing the same cosine


@dataclass
class RetrievalResult:
    similarity: Tensor  # [N] cosine(image, own prompt), float64
    hit: Tensor  # [N] 1.0 where the own prompt is the argmax over all candidates
    best: Tensor  # [N] long: the retrieved candidate index


def normalize(x: Tensor) -> Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def score_error_bound(dim: int, storage: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """Bound on |float32 score - exact cosine| for unit vectors of ``dim`` (any summation order).

    Candidates are stored in ``storage`` (float32, or float16 and upcast exactly to float32 for
    the matmul), queries are rounded to float32. Rounding both unit vectors moves their dot product
    by <= (u_c + u_q + u_c*u_q) (Cauchy-Schwarz: sum |x_i y_i| <= 1), float16 underflow of tiny
    components by <= sqrt(dim) * 2^-25; accumulating ``dim`` float32 products adds
    <= gamma_dim = dim*u / (1 - dim*u) (u = 2^-24). On CUDA with TF32 allowed, matmul inputs are
    rounded to 10 mantissa bits (u = 2^-11).
    """
    if storage not in _UNIT_ROUNDOFF:
        raise ValueError(f"candidate storage dtype must be one of {list(_UNIT_ROUNDOFF)}, got {storage}")
    u = 2.0 ** -24
    u_c, u_q = max(_UNIT_ROUNDOFF[storage], u), u
    if storage == torch.float64:
        u = u_c = u_q = _UNIT_ROUNDOFF[torch.float64]
    elif torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u_c, u_q = max(u_c, 2.0 ** -11), 2.0 ** -11
    underflow = math.sqrt(dim) * 2.0 ** -25 if storage == torch.float16 else 0.0
    gamma = dim * u / (1 - dim * u)
    return (u_c + u_q + u_c * u_q + underflow) * (1 + gamma) + gamma


class CandidateIndex:
    """Candidate text embeddings, normalised once (on the scoring device) for many queries.

    ``dtype`` is the storage of the normalised candidates: float16 (default: half the memory
    traffic per query, the bottleneck on a CPU; upcast exactly to float32 block by block for the
    matmul), float32 or float64. Keeps a reference to the raw embeddings (on the CPU) so that the
    few candidates whose score is within the error bound of the best are re-scored in float64.
    """

    def __init__(self, text_emb: Tensor, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float16,
                 chunk: int = 8192):
        if text_emb.ndim != 2:
            raise ValueError(f"candidate embeddings must be [P,D], got {tuple(text_emb.shape)}")
        self.raw = text_emb.detach().cpu()
        self.device, self.dtype = torch.device(device), dtype
        self.bound = score_error_bound(text_emb.shape[1], dtype, self.device)
        self.scoring = torch.empty(text_emb.shape, dtype=dtype, device=self.device)
        for t0 in range(0, len(self.raw), chunk):
            self.scoring[t0:t0 + chunk] = normalize(self.raw[t0:t0 + chunk]).to(self.device, dtype)

    def __len__(self) -> int:
        return self.raw.shape[0]

    @property
    def dim(self) -> int:
        return self.raw.shape[1]

    def exact(self, idx: Tensor) -> Tensor:
        """float64 normalised candidates ``idx`` (the reference's values, bit for bit)."""
        return normalize(self.raw[idx])

    def best(self, images64: Tensor, text_chunk: int = 8192) -> Tensor:
        """[n] index of the float64 argmax (lowest index on ties) for normalised float64 ``images64`` [n,D]."""
        n = len(images64)
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        queries = images64.to(self.device, work)
        margin = 2 * self.bound + _SLACK
        upcast = self.dtype != work
        step = min(text_chunk, _UPCAST_BLOCK) if upcast else text_chunk
        buffer = torch.empty((min(step, len(self)), self.dim), dtype=work, device=self.device) if upcast else None

        def block(t0: int) -> Tensor:
            rows = self.scoring[t0:t0 + step]
            return buffer[:len(rows)].copy_(rows) if upcast else rows  # exact: every float16 is a float32

        # pass 1: the best score of every block, per query (one matmul + max per block, nothing else)
        starts = range(0, len(self), step)
        maxes = torch.empty((n, len(starts)), dtype=work, device=self.device)
        for b, t0 in enumerate(starts):
            maxes[:, b] = (queries @ block(t0).T).amax(dim=1)
        threshold = maxes.amax(dim=1) - margin  # NaN queries: no candidate passes, best stays 0
        # pass 2: only the blocks that can hold a candidate within the margin, for the queries concerned
        hot = maxes >= threshold[:, None]
        rows, cols = [], []
        for b in torch.nonzero(hot.any(dim=0)).flatten().tolist():
            q = torch.nonzero(hot[:, b]).flatten()
            r, c = torch.nonzero((queries[q] @ block(starts[b]).T) >= threshold[q, None], as_tuple=True)
            rows.append(q[r]), cols.append(c + starts[b])
        rows = torch.cat(rows).cpu() if rows else torch.zeros(0, dtype=torch.long)
        cols = torch.cat(cols).cpu() if cols else torch.zeros(0, dtype=torch.long)
        exact = (images64[rows] * self.exact(cols)).sum(-1)  # float64 re-check of the shortlist
        # per row: the largest float64 score, then the lowest index
        order = torch.argsort(cols, stable=True)
        order = order[torch.argsort(-exact[order], stable=True)]
        order = order[torch.argsort(rows[order], stable=True)]
        rows, cols = rows[order], cols[order]
        first = torch.ones(len(rows), dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        best = torch.zeros(n, dtype=torch.long)  # rows without a finite score keep 0, as the float64 loop did
        best[rows[first]] = cols[first]
        return best


def retrieve(image_emb: Tensor, text_emb: Tensor | CandidateIndex, own: Tensor, image_chunk: int = 2048,
             text_chunk: int = 8192) -> RetrievalResult:
    """Per-image Sim and R@1 of ``image_emb`` [N,D] against candidates ``text_emb`` [P,D].

    ``own`` [N] is each image's own candidate index. Embeddings need not be normalised. Pass a
    :class:`CandidateIndex` (built once) when scoring many queries against the same candidates;
    a plain tensor is indexed here, for this call only. Beyond the index, peak memory is one
    [image_chunk, text_chunk] block of scores in the scoring dtype (64 MiB at the defaults).
    """
    index = text_emb if isinstance(text_emb, CandidateIndex) else None
    shape = (len(index), index.dim) if index is not None else tuple(text_emb.shape)
    if image_emb.ndim != 2 or len(shape) != 2 or image_emb.shape[1] != shape[1]:
        raise ValueError(f"embeddings must be [N,D] and [P,D] with the same D, got {tuple(image_emb.shape)} "
                         f"and {shape}")
    own = torch.as_tensor(own, dtype=torch.long).cpu()
    if own.shape != (image_emb.shape[0],):
        raise ValueError(f"own must have one index per image ({image_emb.shape[0]}), got shape {tuple(own.shape)}")
    num_text = shape[0]
    if len(own) and (own.min() < 0 or own.max() >= num_text):
        raise ValueError(f"own indices must lie in [0, {num_text}), got [{int(own.min())}, {int(own.max())}]")
    if image_chunk < 1 or text_chunk < 1:
        raise ValueError("chunk sizes must be >= 1")
    if index is None:
        index = CandidateIndex(text_emb, chunk=text_chunk)
    sims, bests = [], []
    for start in range(0, image_emb.shape[0], image_chunk):
        images = normalize(image_emb[start:start + image_chunk].cpu())
        own_chunk = own[start:start + image_chunk]
        sims.append((images * index.exact(own_chunk)).sum(-1))
        bests.append(index.best(images, text_chunk))
    best = torch.cat(bests) if bests else torch.zeros(0, dtype=torch.long)
    similarity = torch.cat(sims) if sims else torch.zeros(0, dtype=torch.float64)
    return RetrievalResult(similarity=similarity, hit=(best == own).double(), best=best)


def prompt_means(values: Tensor, views_per_prompt: int) -> Tensor:
    """[P*V] per-view values (prompt-major) -> [P] per-prompt means over views."""
    if views_per_prompt < 1 or values.numel() % views_per_prompt:
        raise ValueError(f"{values.numel()} values do not split into prompts of {views_per_prompt} views")
    return values.reshape(-1, views_per_prompt).mean(dim=1)
