"""Scale benchmarks (issue 15): R@1 time per prompt and per-step data cost vs corpus size.

Old and new are measured interleaved in one run (round-robin, median over rounds), on the same
synthetic inputs, so their ratio is meaningful on a shared machine. No third-party text: the
candidate embeddings are seeded Gaussians (D=512, ViT-B-16's width), the corpus is ``range(N)``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

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
    return [_retrieval_row(n, views, dim, rounds, prompts_per_round) for n in sizes]


def _retrieval_row(n: int, views: int, dim: int, rounds: int, prompts_per_round: int) -> dict:
    # One size per call: its candidates and index are freed on return, before the next (larger) size.
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
    return {"benchmark": "R@1 per prompt", "variant": f"N={n}, {views} views, D={dim}",
            "old_s_per_prompt": old_s, "new_s_per_prompt": new_s, "speedup": old_s / new_s,
            "index_build_s": build, "identical": identical}


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
    rows += bench_data_step(data_sizes, rounds=rounds)
    table_sizes = [n for n in (sizes or (100_000, 1_000_000)) if n >= 1000]
    rows += bench_text_table(table_sizes, rounds=rounds) + bench_ingp_memory()
    return rows + (bench_ingp_step(rounds=rounds) if sizes is None else [])  # 13,551 fields: ~2.4 GB, full runs only


class _SyntheticEncoder:
    """Seeded Gaussian rows (a stand-in with the SD-2.1 text width): builds a 1M-row cache in seconds."""

    def __init__(self, dim: int = 1024):
        self.embedding_dim, self.identity = dim, f"bench-synthetic-dim{dim}"

    def encode(self, prompts):
        g = torch.Generator().manual_seed(derive_seed("bench-text", prompts[0], len(prompts)))
        return torch.randn(len(prompts), self.embedding_dim, generator=g)


_MEMORY_PROBE = """
import sys, time
import numpy as np, torch
from pathlib import Path

def anon_pss():
    f = dict(l.split(':') for l in Path('/proc/self/smaps_rollup').read_text().splitlines()[1:])
    kb = lambda k: int(f[k].split()[0]) * 1024
    return kb('Anonymous'), kb('Pss')

path, mode, ready, go = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
a0, p0 = anon_pss()
table = torch.from_numpy(np.load(path, mmap_mode='c'))  # what the cache returns for dtype=float16
if mode == 'old':
    table = table.float()  # the pre-issue-15 system: register_buffer(text_table.float())
float(table[::max(1, 4096 // table.shape[1])].float().sum())  # touch every page
ready.touch()
while not go.exists():  # hold the pages until every rank has touched them (shared pages split the Pss)
    time.sleep(0.05)
a1, p1 = anon_pss()
print(a1 - a0, p1 - p0)
"""


def _memory_per_rank(path: Path, mode: str, ranks: int) -> tuple[float, float]:
    """(private anonymous bytes, Pss bytes) added per rank by holding the table, ``ranks`` processes at once."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        readies = [Path(tmp) / f"ready{r}" for r in range(ranks)]
        procs = [subprocess.Popen([sys.executable, "-c", _MEMORY_PROBE, str(path), mode, str(r), str(go)],
                                  stdout=subprocess.PIPE, text=True) for r in readies]
        while not all(r.exists() for r in readies):
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("memory probe failed")
            time.sleep(0.05)
        go.touch()
        out = [tuple(map(int, p.communicate()[0].split())) for p in procs]
    return sum(a for a, _ in out) / ranks, sum(p for _, p in out) / ranks


def bench_text_table(sizes: Sequence[int] = (100_000, 1_000_000), dim: int = 1024, ranks: int = 2,
                     rounds: int = 3, cache_root: str | Path | None = None, old_memory_max: int = 100_000) -> list[dict]:
    """Start-up (warm-cache load + verification) and text-table memory per rank, old vs new.

    Old: the full sha256 of the file at every start and a private fp32 copy per rank; new: the
    sidecar's stamp + edge hash, and the fp16 memmap shared through the page cache. The old
    memory is measured up to ``old_memory_max`` prompts and computed (N x E x 4 bytes) above it.
    """
    import tempfile

    from amortized3d.text.cache import EmbeddingCache

    rows = []
    with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
        cache, encoder = EmbeddingCache(tmp), _SyntheticEncoder(dim)
        for n in sizes:
            prompts = [str(i) for i in range(n)]
            t0 = time.perf_counter()
            cache.load_or_build(encoder, "bench", prompts, batch_size=65536, dtype=torch.float16)
            build = time.perf_counter() - t0
            secs = time_interleaved({
                "old": lambda: cache.load_or_build(encoder, "bench", prompts, dtype=torch.float16, verify="full"),
                "new": lambda: cache.load_or_build(encoder, "bench", prompts, dtype=torch.float16)}, rounds)
            rows.append({"benchmark": "text table start-up (warm cache)", "variant": f"N={n}, E={dim}, fp16",
                         "old_s": secs["old"], "new_s": secs["new"], "speedup": secs["old"] / secs["new"],
                         "build_s": build})
            path = cache.entry(encoder, "bench", prompts).array_path
            new_anon, new_pss = _memory_per_rank(path, "new", ranks)
            if n <= old_memory_max:
                old_anon, old_pss = _memory_per_rank(path, "old", ranks)
                old_note = "measured"
            else:
                old_anon = old_pss = float(n * dim * 4)
                old_note = "computed (N x E x 4 B)"
            rows.append({"benchmark": "text table memory per rank", "variant": f"N={n}, E={dim}, {ranks} ranks",
                         "old_private_MiB": old_anon / 2**20, "old_pss_MiB": old_pss / 2**20, "old": old_note,
                         "new_private_MiB": new_anon / 2**20, "new_pss_MiB": new_pss / 2**20})
            path.unlink()
    return rows


def bench_ingp_memory(sizes: Sequence[int] = (15, 415, 13_551)) -> list[dict]:
    """What the per-prompt iNGP's pre-flight check computes at the paper's encoding (no allocation)."""
    from amortized3d.generators.ingp import parameters_per_prompt, training_bytes

    # A checkpoint holds the weights and Adam's two moments (fp32): 12 of the 20 training bytes.
    return [{"benchmark": "per-prompt iNGP training memory (estimate)", "variant": f"{n} prompts, paper grid",
             "parameters_per_prompt": parameters_per_prompt(), "GiB": training_bytes(n) / 2**30,
             "checkpoint_GiB": n * parameters_per_prompt() * 12 / 2**30} for n in sizes]


_INGP_SMALL = {"n_levels": 2, "log2_hashmap_size": 12, "base_resolution": 8, "implementation": "torch"}


def bench_ingp_step(sizes: Sequence[int] = (15, 1000, 13_551), batch: int = 2, points: int = 4096, rounds: int = 3,
                    encoding: dict | None = None) -> list[dict]:
    """Seconds per per-prompt iNGP update vs the number of prompts: dense vs ``sparse_updates``, interleaved.

    One update as the system takes it: query B fields, backward, the divergence guard's finite check
    and checked step (its pre-step copy) around Adam. Dense: gradient, Adam and copy over every
    prompt's table, O(prompts); sparse: the batch's working set, row-sparse gradient, LazyAdam and
    the copy of the touched rows, O(batch). The batch is the same at every size, so an O(batch)
    step is flat. A small grid (2 levels, ~5.7k parameters per prompt) keeps 13,551 prompts in
    ~1.5 GB (dense) + ~0.9 GB (sparse), both held at once so their rounds interleave.
    """
    encoding = dict(encoding or _INGP_SMALL)
    return [_ingp_step_row(n, batch, points, rounds, encoding) for n in sizes]


def _ingp_step_row(n: int, batch: int, points: int, rounds: int, encoding: dict) -> dict:
    # One size per call: its generators and Adam states (GBs at 13,551 prompts) are freed on return.
    from amortized3d.divergence import DivergenceGuard
    from amortized3d.generators.ingp import IngpGenerator, parameters_per_prompt
    from amortized3d.optim import build_optimizer

    rng = torch.Generator().manual_seed(derive_seed("bench-ingp", n))
    x = torch.rand(batch, points, 3, generator=rng) * 2 - 1
    ids = torch.randperm(n, generator=rng)[:batch]
    steps = {}
    for name in ("dense", "sparse"):
        gen = IngpGenerator(n, encoding, mlp_hidden=64, sparse_updates=name == "sparse")
        opt = build_optimizer(gen.parameter_groups(), {"name": "adam", "lr": 1e-3})
        steps[name] = _ingp_update(gen, opt, DivergenceGuard(), ids, x)
    cpu: dict[str, float] = {}
    wall = time_interleaved(steps, rounds, cpu=cpu)
    return {"benchmark": "per-prompt iNGP step", "variant": f"{n} prompts, batch {batch}, {points} points",
            "parameters": n * parameters_per_prompt(encoding, 64), "dense_s_per_step": wall["dense"],
            "sparse_s_per_step": wall["sparse"], "speedup": wall["dense"] / wall["sparse"],
            "dense_cpu_s_per_step": cpu["dense"], "sparse_cpu_s_per_step": cpu["sparse"],
            "cpu_speedup": cpu["dense"] / cpu["sparse"]}


def _ingp_update(gen, opt, guard, ids: torch.Tensor, x: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sigma, rgb = gen(None, ids).query(x)
        (sigma.square().mean() + rgb.square().mean()).backward()
        if guard.all_finite(opt):
            guard.checked_step(opt)
    return step
