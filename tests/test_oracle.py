"""Oracle metrics against hand-computable answers."""
import math

import torch

from amortized3d.evaluation.evaluate import summarize_rows
from amortized3d.evaluation.oracle import ReferenceRows, oracle_views, pairwise_mse


def test_pairwise_mse_matches_brute_force():
    a, b = torch.rand(5, 12), torch.rand(7, 12)
    brute = ((a[:, None] - b[None]) ** 2).mean(-1)
    assert torch.allclose(pairwise_mse(a, b), brute.double(), atol=1e-12)


def test_reference_rows_built_once_give_the_per_call_scores_bit_for_bit():
    """The scorer's float64 rows + norms, built once, give every prompt's MSE, PSNR and R@1 exactly as the
    per-call conversion does (the formula of pairwise_mse, whose brute-force check is above)."""
    gen = torch.Generator().manual_seed(0)
    refs, objects = torch.rand(40, 3, 4, 4, generator=gen), torch.arange(40) // 4
    rows = ReferenceRows(refs)
    assert rows.rows.dtype == torch.float64 and rows.rows.shape == (40, 48)
    for own in (0, [3, 7]):
        views = torch.rand(6, 3, 4, 4, generator=gen)
        a, b = views.flatten(1).double(), refs.flatten(1).double()  # pairwise_mse before session 18
        per_call = ((a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0.0) / 48
        assert torch.equal(rows.mse(views.flatten(1)), per_call)
        once, each = oracle_views(views, rows, objects, own), oracle_views(views, refs, objects, own)
        assert torch.equal(once.psnr, each.psnr) and torch.equal(once.r_at_1, each.r_at_1)


def test_psnr_to_nearest_own_reference_and_r_at_1():
    refs = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.5, 1.0, 0.2)])  # objects 0,0,1,1
    objects = torch.tensor([0, 0, 1, 1])
    views = torch.stack([torch.full((3, 2, 2), 0.45), torch.full((3, 2, 2), 0.9)])
    res = oracle_views(views, refs, objects, own_object=0)
    # view 0: nearest own ref 0.5 (mse 0.0025); nearest overall is also 0.5 -> hit
    assert abs(res.psnr[0].item() - 10 * math.log10(1 / 0.0025)) < 1e-4
    # view 1: nearest own ref 0.5 (mse 0.16) but nearest overall is 1.0 (object 1) -> miss
    assert abs(res.psnr[1].item() - 10 * math.log10(1 / 0.16)) < 1e-4
    assert res.r_at_1.tolist() == [1.0, 0.0]
    rows = [{"prompt": "a", "seen": True, "r_at_1": float(res.r_at_1.mean()), "psnr": float(res.psnr.mean())}]
    summary = summarize_rows(rows, ["r_at_1", "psnr"])
    assert summary["overall"]["r_at_1"] == 0.5 and summary["held_out"]["num_prompts"] == 0
