"""CLIP R@1 / Sim from embeddings, and the shard/gather of evaluation prompts (pure functions)."""
from __future__ import annotations

import math

import pytest
import torch

from amortized3d.benchmark_scale import retrieve_float64_per_call
from amortized3d.data import ShardLayout
from amortized3d.evaluation.retrieval import prompt_means, retrieve
from amortized3d.evaluation.shard import merge_shards, shard_indices


def brute_force(images: torch.Tensor, texts: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the full cosine matrix, torch.argmax (first maximum) per row."""
    scores = torch.nn.functional.normalize(images.double(), dim=-1) @ torch.nn.functional.normalize(
        texts.double(), dim=-1).T
    return scores[torch.arange(len(own)), own], (scores.argmax(dim=1) == own).double()


def test_orthogonal_embeddings_give_known_answers():
    texts = torch.eye(4) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]  # scale must not matter
    # image i points at text perm[i]; own prompt is i: hits exactly where perm[i] == i
    perm = torch.tensor([0, 2, 1, 3])
    images = torch.eye(4)[perm] * 5.0
    res = retrieve(images, texts, torch.arange(4), image_chunk=3, text_chunk=3)
    assert res.hit.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert res.similarity.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert res.best.tolist() == perm.tolist()
    # an image halfway between texts 1 and 3: cosine 1/sqrt(2) with each
    half = retrieve(torch.tensor([[0.0, 1.0, 0.0, 1.0]]), texts, torch.tensor([3]))
    assert half.similarity.item() == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_ties_go_to_the_lowest_index_in_every_chunking():
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # 0, 1, 3 identical
    images = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
    own = torch.tensor([0, 1, 3, 2])
    for text_chunk in (1, 2, 3, 4):
        res = retrieve(images, texts, own, image_chunk=2, text_chunk=text_chunk)
        assert res.best.tolist() == [0, 0, 0, 2]
        assert res.hit.tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("image_chunk,text_chunk", [(1, 1), (7, 5), (1000, 1000), (16, 3)])
def test_chunked_retrieval_equals_brute_force(image_chunk, text_chunk):
    g = torch.Generator().manual_seed(0)
    texts = torch.randn(37, 16, generator=g)
    own = torch.randint(0, 37, (53,), generator=g)
    # images near their own text, with enough noise that many views miss
    images = texts[own] + 1.5 * torch.randn(53, 16, generator=g)
    sim, hit = brute_force(images, texts, own)
    res = retrieve(images, texts, own, image_chunk=image_chunk, text_chunk=text_chunk)
    assert torch.allclose(res.similarity, sim, atol=1e-12)
    assert torch.equal(res.hit, hit)
    assert 0 < hit.sum() < len(hit)  # the case is not degenerate


def test_views_then_prompts_average_and_bad_input():
    per_view = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # 2 prompts x 3 views
    assert prompt_means(per_view, 3).tolist() == pytest.approx([1 / 3, 1.0])
    with pytest.raises(ValueError, match="views"):
        prompt_means(per_view, 4)
    with pytest.raises(ValueError, match="own indices"):
        retrieve(torch.ones(2, 3), torch.ones(4, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="same D"):
        retrieve(torch.ones(2, 3), torch.ones(4, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("num_items", [1, 2, 5, 7, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shards_cover_every_item_once_with_the_data_layout(num_items, world):
    shards = [shard_indices(num_items, world, r) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(num_items)) and len(flat) == num_items
    per_rank = math.ceil(num_items / world)
    assert all(len(s) <= per_rank for s in shards)
    # the same slots (and padding rule) as the training prompt stream without shuffling
    layout = ShardLayout(num_items, per_rank, world, shuffle=False)
    for r, s in enumerate(shards):
        ids, w = layout.batch(0, r)
        assert s == ids[w > 0].tolist()
    gathered = merge_shards([{i: f"row{i}" for i in s} for s in shards], num_items)
    assert gathered == [f"row{i}" for i in range(num_items)]


def test_merge_refuses_duplicates_and_losses():
    with pytest.raises(RuntimeError, match="twice"):
        merge_shards([{0: "a", 1: "b"}, {1: "b"}], 2)
    with pytest.raises(RuntimeError, match=r"missing \[2\]"):
        merge_shards([{0: "a"}, {1: "b"}], 3)
    with pytest.raises(RuntimeError, match=r"unexpected \[5\]"):
        merge_shards([{0: "a", 5: "x"}], 1)


def float64_reference(images: torch.Tensor, texts: torch.Tensor, own: torch.Tensor, text_chunk: int = 8192):
    """Today's (pre-issue-15) algorithm: float64 scores, strict > across chunks, first max within one."""
    def norm(x):
        return x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (norm(images) * norm(texts[own])).sum(-1)
    return sim, retrieve_float64_per_call(images, texts, own, text_chunk)


def _near_ties(num_text=3000, dim=64, num_images=200, scale=1e-9, seed=0):
    """Candidates within ~scale of a few centres, images 0.1 away from them: their cosines differ by
    ~scale/10, which float64 resolves (1e-16) and float32 does not (6e-8) for scale <= 1e-6."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(5, dim, generator=g, dtype=torch.float64), dim=-1)
    texts = centres[torch.randint(0, 5, (num_text,), generator=g)]
    texts = texts + scale * torch.randn(num_text, dim, generator=g, dtype=torch.float64)
    images = centres[torch.randint(0, 5, (num_images,), generator=g)] + 0.1 * torch.nn.functional.normalize(
        torch.randn(num_images, dim, generator=g, dtype=torch.float64), dim=-1)
    return images, texts, torch.randint(0, num_text, (num_images,), generator=g)


@pytest.mark.parametrize("scale", [1e-9, 1e-6, 1e-4, 1e-2])
@pytest.mark.parametrize("text_chunk", [512, 8192])
def test_float32_scoring_with_float64_recheck_equals_the_float64_reference(scale, text_chunk):
    from amortized3d.evaluation.retrieval import CandidateIndex

    images, texts, own = _near_ties(scale=scale)
    sim, best = float64_reference(images, texts, own, text_chunk)
    dtypes = (torch.float16, torch.float32, torch.float64)
    indexes = [CandidateIndex(texts, chunk=text_chunk, dtype=dt) for dt in dtypes]
    for candidates in (texts, *indexes):
        res = retrieve(images, candidates, own, image_chunk=64, text_chunk=text_chunk)
        assert torch.equal(res.best, best) and torch.equal(res.similarity, sim)
        assert torch.equal(res.hit, (best == own).double())
    if scale <= 1e-6:  # the case has teeth: a plain float32 argmax gets many of these wrong
        f32 = torch.nn.functional.normalize(images.float(), dim=-1) @ torch.nn.functional.normalize(
            texts.float(), dim=-1).T
        assert (f32.argmax(dim=1) != best).sum() > 10


@pytest.mark.parametrize("text_chunk", [512, 1000, 8192])
def test_exact_duplicate_candidates_go_to_the_lowest_index_across_ragged_chunks(text_chunk):
    g = torch.Generator().manual_seed(3)
    texts = torch.randn(3000, 64, generator=g)
    for i in (700, 1500, 2999):  # copies of candidate 3 in other (and the last, shorter) chunks
        texts[i] = texts[3]
    images = texts[3] * torch.tensor([[1.0], [0.5], [3.0], [7.0]])
    res = retrieve(images, texts, torch.full((4,), 2999), image_chunk=2, text_chunk=text_chunk)
    assert res.best.tolist() == [3] * 4 and res.hit.tolist() == [0.0] * 4


def test_random_clip_like_retrieval_equals_the_float64_reference():
    g = torch.Generator().manual_seed(1)
    texts = torch.randn(20000, 512, generator=g)
    own = torch.randint(0, 20000, (64,), generator=g)
    images = texts[own] + 5.3 * torch.randn(64, 512, generator=g)  # about half the views miss
    sim, best = float64_reference(images, texts, own)
    res = retrieve(images, texts, own)
    assert torch.equal(res.best, best) and torch.equal(res.similarity, sim)
    assert 0 < res.hit.sum() < len(own)


def test_the_clip_scorer_normalises_the_candidates_once_not_per_prompt(monkeypatch):
    import amortized3d.evaluation.retrieval as retrieval
    from amortized3d.evaluation.scorers import ClipScorer

    rows = []
    real = retrieval.normalize
    monkeypatch.setattr(retrieval, "normalize", lambda x: rows.append(len(x)) or real(x))
    g = torch.Generator().manual_seed(2)
    texts = torch.randn(1000, 8, generator=g)

    class Encoder:
        def encode_images(self, renders):  # 4 views near candidate 7
            return texts[7] + 0.01 * torch.randn(len(renders), 8, generator=g)

    scorer = ClipScorer(Encoder(), [f"p{i}" for i in range(1000)], texts)
    built = sum(rows)
    for _ in range(5):
        out = scorer.score(7, "p7", torch.zeros(4, 3, 2, 2))
        assert out["r_at_1"].tolist() == [1.0] * 4
    assert built <= 1000 and sum(rows) - built <= 5 * 3 * 4  # per prompt: its views, never the candidates


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_error_bound_covers_the_observed_scoring_error(dtype):
    from amortized3d.evaluation.retrieval import CandidateIndex, normalize, score_error_bound

    g = torch.Generator().manual_seed(4)
    texts = torch.randn(4000, 512, generator=g) * torch.rand(4000, 1, generator=g)  # any norms
    images = normalize(torch.randn(16, 512, generator=g))
    index = CandidateIndex(texts, dtype=dtype)
    err = (images.float() @ index.scoring.float().T).double() - images @ normalize(texts).T
    bound = score_error_bound(512, dtype)
    assert err.abs().max() <= bound
    assert err.abs().max() > bound / 1000  # the bound is not vacuous either


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_index_equals_the_float64_reference(monkeypatch, tf32):
    from amortized3d.evaluation.retrieval import CandidateIndex

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    images, texts, own = _near_ties(scale=1e-6)
    sim, best = float64_reference(images, texts, own)
    for dtype in (torch.float16, torch.float32):
        res = retrieve(images, CandidateIndex(texts, device="cuda", dtype=dtype), own, image_chunk=64)
        assert torch.equal(res.best, best) and torch.equal(res.similarity, sim)
