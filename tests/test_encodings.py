"""HashGridEncoding against a naive loop reference, finite differences and grid mathematics."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from amortized3d.generators import encodings as enc_mod
from amortized3d.generators.encodings import HashGridEncoding
from amortized3d.generators.trilinear import grid_sample_points, lerp_planes
from hash_grid_reference import naive_hash_grid_reference

# Small config with both dense and hashed levels: resolutions 4, 6, 10, 16, 26, 41;
# T = 1024, so levels 0-1 are dense ((N+1)^3 = 125, 343) and levels 2-5 hashed.
SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
             per_level_scale=1.6, bound=1.5)


def make(**kw) -> HashGridEncoding:
    """float64 encoding with O(1) table entries so that differences are visible."""
    enc = HashGridEncoding(**{**SMALL, "implementation": "torch", **kw}).double()
    with torch.no_grad():
        enc.table.normal_()
    return enc


def test_layout_has_dense_and_hashed_levels():
    enc = make()
    assert enc._res.tolist() == [4, 6, 10, 16, 26, 41]
    assert enc._dense.tolist() == [True, True, False, False, False, False]
    assert enc.table.shape == (1, 125 + 343 + 4 * 1024, 2)
    default = HashGridEncoding(implementation="torch")
    assert default.output_dim == 32 and default._res[-1].item() == 4084  # "max ~ 4096"


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_instances", [1, 3])
@pytest.mark.parametrize("dense_levels", ["grid_sample", "gather"])
def test_matches_naive_reference_values_and_gradients(num_instances, dense_levels, fused):
    torch.manual_seed(0)
    enc = make(num_instances=num_instances, dense_levels=dense_levels, fused=fused)
    x = (torch.rand(4, 300, 3, dtype=torch.float64) * 2 - 1) * 1.7  # some points outside bound
    ids = torch.tensor([2, 0, 2, 1]) % num_instances
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    table_ref = enc.table.detach().clone().requires_grad_()
    upstream = torch.randn(4, 300, 12, dtype=torch.float64)

    out = enc(x1, ids if num_instances > 1 else None)
    ref = naive_hash_grid_reference(x2, table_ref, ids, **SMALL)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(enc.table.grad, table_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
    assert x1.grad.abs().sum() > 0 and enc.table.grad.abs().sum() > 0


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    enc = make()
    x = ((torch.rand(2, 5, 3, dtype=torch.float64) * 2 - 1) * 1.4).requires_grad_()
    table = enc.table
    assert torch.autograd.gradcheck(lambda p: enc(p), (x,), eps=1e-7, atol=1e-6)
    # Table gradient: the encoding is linear in the table, so J^T g is exact.
    sel = torch.randn(2, 5, 12, dtype=torch.float64)
    (enc(x.detach()) * sel).sum().backward()
    with torch.no_grad():
        delta = torch.randn_like(table)
        lhs = (enc.table.grad * delta).sum()
        enc.table += delta
        plus = (enc(x.detach()) * sel).sum()
        enc.table -= delta
        base = (enc(x.detach()) * sel).sum()
    torch.testing.assert_close(plus - base, lhs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("base_resolution,log2", [(8, 12), (64, 10)])  # dense, hashed
def test_exact_at_grid_vertices(base_resolution, log2):
    enc = make(n_levels=1, base_resolution=base_resolution, log2_hashmap_size=log2, bound=2.0)
    res, size = base_resolution, 2**log2
    torch.manual_seed(2)
    k = torch.randint(0, res + 1, (1, 50, 3))
    x = k.double() / res * 4.0 - 2.0
    if (res + 1) ** 3 <= size:
        rows = k[..., 0] + k[..., 1] * (res + 1) + k[..., 2] * (res + 1) ** 2
    else:
        h = k[..., 0] ^ (k[..., 1] * 2654435761) ^ (k[..., 2] * 805459861)
        rows = h % size
    expected = enc.table[0, rows.reshape(-1)].reshape(1, 50, 2)
    torch.testing.assert_close(enc(x), expected, rtol=1e-10, atol=1e-10)


def test_continuous_across_cell_boundaries_of_every_level():
    enc = make()
    torch.manual_seed(3)
    delta = 1e-9
    for res in enc._res.tolist():
        x = (torch.rand(1, 64, 3, dtype=torch.float64) * 2 - 1) * 1.5
        k = torch.randint(1, res, (64,)).double()
        x[0, :, 0] = k / res * 3.0 - 1.5  # on a cell face of this level along x
        lo, hi = x.clone(), x.clone()
        lo[..., 0] -= delta
        hi[..., 0] += delta
        # Slope <= N_max / (2*bound) * 2*max|table| ~ 1e2, so a jump of 2e-9 moves < 1e-6;
        # a discontinuity (wrong corner or index at the face) would move O(1).
        assert (enc(hi) - enc(lo)).abs().max() < 1e-6


def test_clamps_outside_the_bound():
    enc = make()
    torch.manual_seed(4)
    x = (torch.rand(2, 100, 3, dtype=torch.float64) * 2 - 1) * 4.0
    inside = x.clamp(-1.5, 1.5)
    torch.testing.assert_close(enc(x), enc(inside), rtol=0, atol=1e-12)
    x.requires_grad_()
    enc(x).sum().backward()
    outside = x.detach().abs() > 1.5
    assert outside.any() and (x.grad[outside] == 0).all()


def test_instances_are_isolated():
    enc = make(num_instances=4)
    x = torch.rand(3, 50, 3, dtype=torch.float64) * 3 - 1.5
    enc(x, torch.tensor([0, 2, 0])).sum().backward()
    grad_norm = enc.table.grad.abs().sum(dim=(1, 2))
    assert grad_norm[0] > 0 and grad_norm[2] > 0
    assert grad_norm[1] == 0 and grad_norm[3] == 0
    with pytest.raises(ValueError):
        enc(x)  # ids are required with several instances


def test_tcnn_request_warns_and_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "tinycudann", None)  # import raises ImportError
    real_status = enc_mod.tcnn_status
    real_status.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="tinycudann cannot be imported"):
            enc = HashGridEncoding(**SMALL, implementation="tcnn")
        assert enc.implementation == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert HashGridEncoding(**SMALL, implementation="auto").implementation == "torch"
        # Even when the import works, CPU-only machines and multi-instance grids fall back.
        monkeypatch.setattr(enc_mod, "tcnn_status", lambda: (True, "ok"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.warns(RuntimeWarning, match="CUDA is not available"):
            assert HashGridEncoding(**SMALL, implementation="tcnn").implementation == "torch"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.warns(RuntimeWarning, match="num_instances=2"):
            assert HashGridEncoding(**SMALL, num_instances=2, implementation="tcnn").implementation == "torch"
    finally:
        real_status.cache_clear()


def test_state_dict_round_trip_keeps_implementation_tag():
    enc = make()
    state = enc.state_dict()
    assert state["_extra_state"]["implementation"] == "torch"
    other = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(state)
    torch.testing.assert_close(other.table, enc.table)
    state["_extra_state"] = {"implementation": "tcnn", "format": 1}
    with pytest.warns(RuntimeWarning, match="not interchangeable"):
        other.load_state_dict(state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_cpu():
    enc = make(num_instances=2).float()
    x = torch.rand(2, 4096, 3) * 3 - 1.5
    ids = torch.tensor([1, 0])
    cpu = enc(x, ids)
    gpu = enc.cuda()(x.cuda(), ids.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tcnn_backend_agrees_with_torch():
    """tcnn's HashGrid places its vertices differently (scale b*s^l - 1, half-cell offset),
    so tables cannot be copied; compare what does not depend on the layout instead."""
    pytest.importorskip("tinycudann")
    enc_mod.tcnn_status.cache_clear()
    cfg = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
               per_level_scale=1.447, bound=2.0)
    tc = HashGridEncoding(**cfg, implementation="tcnn").cuda()
    th = HashGridEncoding(**cfg, implementation="torch").cuda()
    assert tc.implementation == "tcnn" and th.implementation == "torch"
    x = (torch.rand(2, 8192, 3, device="cuda") * 2 - 1) * 2.0
    # 1) Trilinear weights are a partition of unity: a constant table gives that constant.
    with torch.no_grad():
        tc.tcnn_encoding.params.fill_(0.5)
        th.table.fill_(0.5)
    torch.testing.assert_close(tc(x), torch.full_like(tc(x), 0.5), rtol=0, atol=1e-3)
    torch.testing.assert_close(th(x), torch.full_like(th(x), 0.5), rtol=0, atol=1e-6)
    # 2) Same init distribution -> same output statistics, and gradients reach both tables.
    with torch.no_grad():
        tc.tcnn_encoding.params.normal_(0, 1.0)
        th.table.normal_(0, 1.0)
    a, b = tc(x), th(x)
    assert a.shape == b.shape == (2, 8192, 32)
    assert abs(a.std().item() - b.std().item()) < 0.15 * b.std().item()
    a.square().sum().backward()
    assert tc.tcnn_encoding.params.grad.abs().sum() > 0
    assert tc.state_dict()["_extra_state"]["implementation"] == "tcnn"


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while running ``fn`` (new storages only)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("points_need_grad", [False, True])
@pytest.mark.parametrize("dense_levels", ["grid_sample", "gather"])
def test_fused_path_saves_less_for_backward(dense_levels, points_need_grad):
    """The fused path saves int32 rows + weights, never the gathered [..., 8, F] corner
    features (the old path saved them whenever the points needed a gradient). Measured
    ratios fused/old (float32): 0.68 (points without grad), 0.53 (with)."""
    torch.manual_seed(5)
    x = (torch.rand(2, 4096, 3) * 3 - 1.5).requires_grad_(points_need_grad)
    fused, old = make(dense_levels=dense_levels).float(), make(dense_levels=dense_levels, fused=False).float()
    old.load_state_dict(fused.state_dict())
    ratio = _saved_bytes(lambda: fused(x)) / _saved_bytes(lambda: old(x))
    assert ratio < (0.6 if points_need_grad else 0.75)


def test_fused_path_under_autocast_matches_the_old_path():
    torch.manual_seed(6)
    fused, old = make(dense_levels="gather").float(), make(dense_levels="gather", fused=False).float()
    old.load_state_dict(fused.state_dict())
    x = torch.rand(2, 500, 3) * 3 - 1.5
    outs = []
    for enc in (fused, old):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = enc(x)
        out.float().square().sum().backward()
        outs.append((out.float(), enc.table.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-1)


@pytest.mark.parametrize("features", [2, 3])
def test_dense_index_add_backward_matches_reference_and_grid_sample(features):
    """Points without gradient (every render): the dense levels' table gradient comes from
    _DenseLevels' index_add_ backward; equal to the loop reference (float64) and to grid_sample's own
    backward (float32, summation order only), values bit-equal to grid_sample's."""
    torch.manual_seed(7)
    small = {**SMALL, "n_features_per_level": features, "log2_hashmap_size": 12}  # levels 0-2 dense
    new = HashGridEncoding(**{**small, "implementation": "torch"}).double()
    with torch.no_grad():
        new.table.normal_()
    assert new._dense.tolist() == [True, True, True, False, False, False]
    x = (torch.rand(3, 700, 3, dtype=torch.float64) * 2 - 1) * 1.7  # some points outside the bound
    upstream = torch.randn(3, 700, 6 * features, dtype=torch.float64)
    table_ref = new.table.detach().clone().requires_grad_()
    out = new(x)
    assert _graph_has(out, "_DenseLevelsBackward")
    (out * upstream).sum().backward()
    ref = naive_hash_grid_reference(x, table_ref, None, **small)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.table.grad, table_ref.grad, rtol=1e-12, atol=1e-12)

    fp32 = [HashGridEncoding(**{**small, "implementation": "torch", "dense_backward": m}) for m in
            ("index_add", "grid_sample")]
    fp32[1].load_state_dict(fp32[0].state_dict())
    with torch.no_grad():
        fp32[0].table.copy_(new.table.float())
        fp32[1].table.copy_(new.table.float())
    outs = [enc(x.float()) for enc in fp32]
    assert torch.equal(outs[0], outs[1])
    assert _graph_has(outs[0], "_DenseLevelsBackward") and not _graph_has(outs[1], "_DenseLevelsBackward")
    for o in outs:
        (o * upstream.float()).sum().backward()
    torch.testing.assert_close(fp32[0].table.grad, fp32[1].table.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_sample_points_is_bit_equal_for_every_batch_count(dtype):
    """The points split into batches of one expanded volume (grid_sample's CPU kernel is parallel over the batch
    only) give grid_sample's values bit for bit: uneven splits, more batches than points, points outside."""
    torch.manual_seed(11)
    volume = torch.randn(1, 3, 5, 6, 7, dtype=dtype)
    coords = (torch.rand(1001, 3, dtype=dtype) * 2 - 1) * 1.2
    expected = F.grid_sample(volume, coords.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
                             align_corners=True).view(3, -1).t()
    for batches in (1, 2, 3, 7, 1001, 5000):
        assert torch.equal(grid_sample_points(volume, coords, batches), expected), batches
    assert torch.equal(grid_sample_points(volume, coords.t().contiguous().t(), 2), expected)  # strided points


def test_dense_levels_split_points_over_the_intra_op_threads(monkeypatch):
    """_DenseLevels' grid_sample forward gives each intra-op thread a batch of points; the encoding's values
    and table gradient are bit-equal to one batch (one thread)."""
    torch.manual_seed(5)
    small = {**SMALL, "log2_hashmap_size": 12}  # levels 0-2 dense
    enc = HashGridEncoding(**{**small, "implementation": "torch"})
    with torch.no_grad():
        enc.table.normal_()
    x = (torch.rand(2, 777, 3) * 2 - 1) * 1.3
    upstream = torch.randn(2, 777, enc.output_dim)
    batches = []
    monkeypatch.setattr(enc_mod, "grid_sample_points", lambda v, c, b: batches.append(b) or grid_sample_points(v, c, b))
    threads = torch.get_num_threads()
    results = []
    try:
        for count, split in ((1, True), (3, True), (3, False)):  # False: the one-batch forward (benchmarks)
            torch.set_num_threads(count)
            monkeypatch.setattr(enc_mod, "SPLIT_GRID_SAMPLE_POINTS", split)
            enc.table.grad = None
            out = enc(x)
            (out * upstream).sum().backward()
            results.append((out.detach(), enc.table.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert batches == [1, 1, 1, 3, 3, 3, 1, 1, 1]
    for out, grad in results[1:]:
        assert torch.equal(results[0][0], out) and torch.equal(results[0][1], grad)


def test_dense_backward_rejects_unknown_mode():
    with pytest.raises(ValueError, match="dense_backward"):
        HashGridEncoding(implementation="torch", dense_backward="scatter")


def _graph_has(out: torch.Tensor, name: str) -> bool:
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == name:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def _matches_the_loop_reference(enc: HashGridEncoding, out: torch.Tensor, x: torch.Tensor, table: torch.Tensor,
                                settings: dict) -> torch.Tensor:
    """``out = enc(x)`` and the table gradient of a random upstream equal the float64 loop reference on ``table``
    (the table's values before the call); returns the upstream."""
    table_ref = table.detach().clone().requires_grad_()
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    ref = naive_hash_grid_reference(x, table_ref, None, **settings)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(enc.table.grad, table_ref.grad, rtol=1e-12, atol=1e-12)
    return upstream


def _fp32_twins(settings: dict, key: str, modes: tuple[str, ...], table: torch.Tensor) -> list[HashGridEncoding]:
    """float32 encodings that differ only in ``key`` (one per mode), all holding ``table``."""
    twins = [HashGridEncoding(**{**settings, "implementation": "torch", key: m}) for m in modes]
    for enc in twins:
        with torch.no_grad():
            enc.table.copy_(table.float())
    return twins


@pytest.mark.parametrize("features", [1, 2, 3])
@pytest.mark.parametrize("log2", [10, 17])  # levels 0-1 dense and 2-5 hashed / every level dense
def test_hashed_corners_match_reference_and_rows_path(features, log2):
    """Points without gradient: the hashed levels go through _HashedLevels (hashed_lookup="corners"); equal
    to the loop reference (float64, the 2D gather: 16-byte rows) and to the rows path (float32: the packed
    4/8-byte gather for 1/2 features, the 2D one for 3), values and table gradient."""
    torch.manual_seed(11)
    small = {**SMALL, "n_features_per_level": features, "log2_hashmap_size": log2}
    new = HashGridEncoding(**{**small, "implementation": "torch"}).double()
    with torch.no_grad():
        new.table.normal_()
    x = (torch.rand(3, 500, 3, dtype=torch.float64) * 2 - 1) * 1.7  # some points outside the bound
    table = new.table.detach().clone()
    out = new(x)
    assert _graph_has(out, "_HashedLevelsBackward") == (log2 == 10)
    upstream = _matches_the_loop_reference(new, out, x, table, small)

    fp32 = _fp32_twins(small, "hashed_lookup", ("corners", "rows"), table)
    outs = [enc(x.float()) for enc in fp32]
    assert not _graph_has(outs[1], "_HashedLevelsBackward")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for o in outs:
        (o * upstream.float()).sum().backward()
    torch.testing.assert_close(fp32[0].table.grad, fp32[1].table.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the proposal pass: nothing saved, same values
        torch.testing.assert_close(fp32[0](x.float()), outs[0].detach(), rtol=0, atol=0)


def test_hashed_corners_only_for_points_without_gradient():
    """Points with a gradient (normals, eikonal) keep the rows path, whose backward reaches the points."""
    enc = make()
    x = (torch.rand(2, 50, 3, dtype=torch.float64) * 2 - 1).requires_grad_()
    out = enc(x)
    assert not _graph_has(out, "_HashedLevelsBackward") and _graph_has(out, "_InterpolateRowsBackward")
    with pytest.raises(ValueError, match="hashed_lookup"):
        HashGridEncoding(implementation="torch", hashed_lookup="planes")


def _compiled_render_lookup(dtype: torch.dtype, log2: int, features: int = 2) -> None:
    """HashGridEncoding(compile=True) against the loop reference: values and table gradient of a render's points
    (no gradient: the dense levels' and hashed levels' kernels)."""
    torch.manual_seed(12)
    small = {**SMALL, "n_features_per_level": features, "log2_hashmap_size": log2}
    enc = HashGridEncoding(**{**small, "implementation": "torch", "compile": True}).to(dtype)
    with torch.no_grad():
        enc.table.normal_()
    table_ref = enc.table.detach().clone().requires_grad_()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for points in (500, 333):  # a second point count (skipping changes it every step)
        x = (torch.rand(3, points, 3, dtype=dtype) * 2 - 1) * 1.7  # some points outside the bound
        upstream = torch.randn(3, points, 6 * features, dtype=dtype)
        enc.table.grad = table_ref.grad = None
        out = enc(x)
        assert _graph_has(out, "_DenseLevelsBackward") and _graph_has(out, "_HashedLevelsBackward") == (log2 == 10)
        (out * upstream).sum().backward()
        ref = naive_hash_grid_reference(x, table_ref, None, **small)
        (ref * upstream).sum().backward()
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(enc.table.grad, table_ref.grad, rtol=tol, atol=tol)
        with torch.no_grad():  # the proposal pass: no rows kept, same values
            torch.testing.assert_close(enc(x), out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("features", [1, 2])
@pytest.mark.parametrize("log2", [10, 17])  # levels 0-1 dense and 2-5 hashed / every level dense
def test_compiled_lookup_functions_match_reference(monkeypatch, features, log2):
    """compiled_levels' functions, run eagerly (the math torch.compile is given), equal the loop reference."""
    monkeypatch.setattr(enc_mod.compiled_levels, "compiled", lambda fn: fn)
    _compiled_render_lookup(torch.float64, log2, features)


@pytest.mark.slow
def test_compiled_lookups_match_reference_through_torch_compile():
    """The same through inductor on the CPU (the dense and the hashed lookups, the latter with and without saved
    rows, in float64 and float32), and a new point count does not compile again (dynamic shapes)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    enc_mod.compiled_levels.compiled.cache_clear()
    for dtype in (torch.float64, torch.float32):
        _compiled_render_lookup(dtype, 10)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 4
    _compiled_render_lookup(torch.float32, 10)  # other points, the same shapes' graphs
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.fixture
def fresh_compile_cache():
    enc_mod.compiled_levels.compiled.cache_clear()
    yield
    enc_mod.compiled_levels.compiled.cache_clear()  # no broken compiler left for later tests


def test_compile_failure_warns_once_and_runs_eagerly(monkeypatch, fresh_compile_cache):
    """A machine where inductor cannot compile (no C++ compiler, no triton): one warning naming the cause, then
    the eager functions (the same values as compile=False)."""
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    encs = [HashGridEncoding(**{**SMALL, "implementation": "torch", "compile": c}) for c in (True, False)]
    encs[1].load_state_dict(encs[0].state_dict())
    x = torch.rand(2, 300, 3) * 2 - 1
    with pytest.warns(RuntimeWarning, match="torch.compile of .* failed .*no working C\\+\\+ compiler.*eagerly"):
        out = encs[0](x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per function, not per call
        again = encs[0](x)
    torch.testing.assert_close(out, encs[1](x), rtol=1e-6, atol=1e-7)
    assert torch.equal(out, again)


@pytest.mark.parametrize("features", [2, 3])
def test_dense_planes_lookup_matches_reference_and_grid_sample(features, monkeypatch):
    """dense_lookup="planes": the dense levels' render forward from 1D gathers of each feature plane equals the
    loop reference (float64, points outside the bound and on vertices included) and grid_sample's (float32, to
    rounding); the backward is the same index_add_ one."""
    torch.manual_seed(3)
    small = {**SMALL, "n_features_per_level": features, "log2_hashmap_size": 12}  # levels 0-2 dense
    enc = HashGridEncoding(**{**small, "implementation": "torch", "dense_lookup": "planes"}).double()
    with torch.no_grad():
        enc.table.normal_()
    vertices = (torch.arange(5, dtype=torch.float64) / 4 * 2 - 1) * small["bound"]  # level 0's (n=4) vertices
    grid = torch.stack(torch.meshgrid(vertices, vertices, vertices, indexing="ij"), -1).reshape(1, -1, 3)
    x = torch.cat([(torch.rand(1, 700, 3, dtype=torch.float64) * 2 - 1) * 1.7, grid], dim=1).expand(2, -1, -1)
    table = enc.table.detach().clone()
    calls = []
    monkeypatch.setattr(enc_mod, "lerp_planes", lambda *a: calls.append(a[1]) or lerp_planes(*a))
    out = enc(x)
    assert calls == [5, 7, 11] and _graph_has(out, "_DenseLevelsBackward")  # vertices per side of levels 4, 6, 10
    _matches_the_loop_reference(enc, out, x, table, small)

    planes, sampled = (e(x.float()) for e in _fp32_twins(small, "dense_lookup", ("planes", "grid_sample"), table))
    torch.testing.assert_close(planes, sampled, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dense_lookup"):
        HashGridEncoding(implementation="torch", dense_lookup="nearest")
