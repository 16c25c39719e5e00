"""Scale benchmarks (issue 15): R@1 time per prompt and per-step data cost vs corpus size.

Old and new are measured interleaved in one run (round-robin, median over rounds), on the same
synthetic inputs, so their ratio is meaningful on a shared machine. No third-party text: the
candidate embeddings are seeded Gaussians (D=512, ViT-B-16's width), the corpus is ``range(N)``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from amortized3d.benchmark import time_interleaved
from amortized3d.data import ShardLayout, derive_seed, epoch_permutation
from amortized3d.evaluation.retrieval import CandidateIndex, retrieve


_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SHAPES = ("cube", "sphere", "torus", "cone", "cylinder", "pyramid", "ring", "capsule")


def synthetic_prompts(n: int) -> list[str]:
    """``n`` distinct made-up prompts (no third-party text): colour x shape x a number."""
    return [f"a {_COLOURS[i % 8]} {_SHAPES[(i // 8) % 8]} number {i}" for i in range(n)]


def synthetic_corpus(num_train: int, path: str | Path, num_val: int = 1000, num_test: int = 1000) -> Path:
    """A corpus file in the reference JSON format ({"train": [...], "val": [...], "test": [...]})."""
    prompts = synthetic_prompts(num_train + num_val + num_test)
    splits = {"train": prompts[:num_train], "val": prompts[num_train:num_train + num_val],
              "test": prompts[num_train + num_val:]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits))
    return path


def retrieve_float64_per_call(images: torch.Tensor, texts: torch.Tensor, own: torch.Tensor,
                               text_chunk: int = 8192) -> torch.Tensor:
    """The pre-issue-15 R@1: every call re-normalises all candidates in float64 (reference + baseline)."""
    def norm(x):
        x = x.double()
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    imgs = norm(images)
    best_val = torch.full((len(imgs),), -torch.inf, dtype=torch.float64)
    best_idx = torch.zeros(len(imgs), dtype=torch.long)
    for t0 in range(0, len(texts), text_chunk):
        val, idx = (imgs @ norm(texts[t0:t0 + text_chunk]).T).max(dim=1)
        better = val > best_val
        best_val, best_idx = torch.where(better, val, best_val), torch.where(better, idx + t0, best_idx)
    return best_idx



def bench_retrieval(sizes: Sequence[int] = (15, 1000, 10_000, 100_000), views: int = 4, dim: int = 512,
                    rounds: int = 3, prompts_per_round: int = 2) -> list[dict]:
    """Seconds per prompt (``views`` images) of CLIP R@1 against N candidates: old vs CandidateIndex.

    The index build (once per evaluation) is reported separately; results are checked identical.
    """
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(derive_seed("bench-retrieval", n))
        texts = torch.randn(n, dim, generator=g)
        own = torch.randint(0, n, (prompts_per_round,), generator=g)
        queries = [texts[o] + 5.0 * torch.randn(views, dim, generator=g) for o in own]  # ~half the views miss
        owns = [torch.full((views,), int(o)) for o in own]
        t0 = time.perf_counter()
        index = CandidateIndex(texts)
        build = time.perf_counter() - t0
        old = [retrieve_float64_per_call(q, texts, o) for q, o in zip(queries, owns)]
        new = [retrieve(q, index, o).best for q, o in zip(queries, owns)]
        identical = all(torch.equal(a, b) for a, b in zip(old, new))
        secs = time_interleaved({
            "old": lambda: [retrieve_float64_per_call(q, texts, o) for q, o in zip(queries, owns)],
            "new": lambda: [retrieve(q, index, o) for q, o in zip(queries, owns)],
        }, rounds)
        old_s, new_s = secs["old"] / prompts_per_round, secs["new"] / prompts_per_round
        rows.append({"benchmark": "R@1 per prompt", "variant": f"N={n}, {views} views, D={dim}",
                     "old_s_per_prompt": old_s, "new_s_per_prompt": new_s, "speedup": old_s / new_s,
                     "index_build_s": build, "identical": identical})
        del texts, index
    return rows


def bench_data_step(sizes: Sequence[int] = (15, 100_000, 1_000_000), world: int = 64, batch: int = 8,
                    rounds: int = 3, steps: int = 20) -> list[dict]:
    """Seconds per training step of the prompt stream (one rank): randperm per step vs once per epoch."""
    rows = []
    for n in sizes:
        layout = ShardLayout(n, batch, world, seed=0)

        def old_step(step: int, rank: int = 0):  # the pre-issue-15 batch(): a fresh randperm every call
            epoch, k = divmod(step, layout.steps_per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(0, "prompt-epoch", epoch)))
            slots = torch.arange((k * world + rank) * batch, (k * world + rank + 1) * batch)
            return perm[slots % n], (slots < n).float()

        epoch_permutation.cache_clear()
        same = all(torch.equal(old_step(s)[0], layout.batch(s, 0)[0]) for s in range(3))
        secs = time_interleaved({"old": lambda: [old_step(s) for s in range(steps)],
                             "new": lambda: [layout.batch(s, 0) for s in range(steps)]}, rounds)
        rows.append({"benchmark": "data stream per step", "variant": f"N={n}, world={world}, B={batch}",
                     "old_s_per_step": secs["old"] / steps, "new_s_per_step": secs["new"] / steps,
                     "speedup": secs["old"] / secs["new"], "identical": same})
    return rows


def bench_scale(sizes: Sequence[int] | None = None, rounds: int = 3, turntable_views: int = 120) -> list[dict]:
    """R@1 (4 views per prompt, and the turntable's views at the largest size <= 100k) and data rows."""
    retrieval_sizes = sizes or (15, 1000, 10_000, 100_000)
    data_sizes = sizes or (15, 100_000, 1_000_000)
    rows = bench_retrieval(retrieval_sizes, rounds=rounds)
    turntable = max([n for n in retrieval_sizes if n <= 100_000], default=None)
    if turntable and turntable_views:
        rows += bench_retrieval((turntable,), views=turntable_views, rounds=min(rounds, 2), prompts_per_round=1)
    return rows + bench_data_step(data_sizes, rounds=rounds)
