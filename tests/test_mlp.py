"""The fused, chunked MLP path equals the reference batched MLPs (values and gradients)."""
from __future__ import annotations

import pytest
import torch

from amortized3d.generators import HyperIngpGenerator, IngpGenerator
from amortized3d.generators.mlp import (batched_mlp, chunked_mlp, fuse_heads, kaiming_weights,
                                        mlp_shapes)
from amortized3d.train import train
from conftest import compose

ENC = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
           per_level_scale=2.0, bound=1.0, implementation="torch")


def _weights(b: int, shapes, dtype=torch.float64) -> list[torch.Tensor]:
    return [w.to(dtype).requires_grad_() for w in kaiming_weights(shapes, b)]


def _grads(out: torch.Tensor, leaves, upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, upstream))


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("hidden_layers", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_mlp_matches_batched_mlp(activation, hidden_layers, chunk):
    """Any depth, activation and chunk size (including chunks that do not divide N)."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 8, dtype=torch.float64, requires_grad=True)
    ws = _weights(3, mlp_shapes(8, 16, 5, hidden_layers) if hidden_layers else [(5, 8)])
    up = torch.randn(3, 50, 5, dtype=torch.float64)
    ref = batched_mlp(x, ws, activation)
    new = chunked_mlp(x, ws, activation, chunk=chunk)
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(new, [x, *ws], up), _grads(ref, [x, *ws], up)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_mlp_gradient_of_weights_only_and_of_input_only():
    torch.manual_seed(1)
    x = torch.randn(2, 33, 8, dtype=torch.float64)
    ws = _weights(2, mlp_shapes(8, 16, 4))
    up = torch.randn(2, 33, 4, dtype=torch.float64)
    ref = _grads(batched_mlp(x, ws), ws, up)
    for a, b in zip(_grads(chunked_mlp(x, ws, chunk=10), ws, up), ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    x.requires_grad_()
    frozen = [w.detach() for w in ws]
    (gx,) = _grads(chunked_mlp(x, frozen, chunk=10), [x], up)
    torch.testing.assert_close(gx, _grads(batched_mlp(x, frozen), [x], up)[0], rtol=1e-10, atol=1e-12)


def test_chunked_mlp_passes_gradcheck():
    torch.manual_seed(2)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    ws = _weights(2, mlp_shapes(3, 4, 2))
    assert torch.autograd.gradcheck(lambda x, *w: chunked_mlp(x, list(w), "silu", chunk=4), (x, *ws))


def test_fused_heads_compute_each_head_on_its_own_slice():
    """fuse_heads([sdf, rgb]) == cat(sdf(x), rgb(x)), gradients into both heads' weights included."""
    torch.manual_seed(3)
    x = torch.randn(4, 40, 6, dtype=torch.float64)
    for hidden_layers in (1, 2):
        sdf, rgb = _weights(4, mlp_shapes(6, 10, 1, hidden_layers)), _weights(4, mlp_shapes(6, 12, 3, hidden_layers))
        if hidden_layers == 2:  # heads of different widths only at depth 1 (block-diagonal needs equal depth)
            rgb = _weights(4, mlp_shapes(6, 10, 3, hidden_layers))
        ref = torch.cat([batched_mlp(x, sdf), batched_mlp(x, rgb)], dim=-1)
        new = chunked_mlp(x, fuse_heads([sdf, rgb]), chunk=16)
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
        up = torch.randn_like(ref)
        for a, b in zip(_grads(new, [*sdf, *rgb], up), _grads(ref, [*sdf, *rgb], up)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="same depth"):
        fuse_heads([_weights(1, mlp_shapes(6, 10, 1)), _weights(1, mlp_shapes(6, 10, 3, 2))])


def _saved_bytes(fn) -> int:
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_chunked_mlp_saves_only_input_and_weights_for_backward():
    """The reference keeps the [B,N,hidden] activations alive until backward; the chunked path
    keeps x [B,N,in] and the weights (here 64 hidden vs 32 in: under half the bytes)."""
    x = torch.randn(2, 4096, 32, requires_grad=True)
    ws = [w.requires_grad_() for w in kaiming_weights(mlp_shapes(32, 64, 4), 2)]
    new, ref = _saved_bytes(lambda: chunked_mlp(x, ws)), _saved_bytes(lambda: batched_mlp(x, ws))
    weights = sum(w.numel() * 4 for w in ws)
    assert new == x.numel() * 4 + weights
    assert new < 0.5 * ref


def test_chunked_mlp_under_autocast_runs_in_the_autocast_dtype():
    torch.manual_seed(4)
    x = torch.randn(2, 300, 8, requires_grad=True)
    ws = [w.requires_grad_() for w in kaiming_weights(mlp_shapes(8, 16, 4), 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_mlp(x, ws, chunk=64)
        ref = batched_mlp(x, ws)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), batched_mlp(x, ws), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(w.grad is not None and w.grad.dtype == torch.float32 for w in ws)


@pytest.mark.parametrize("kind", ["hyper", "ingp"])
def test_fused_field_equals_the_previous_two_head_path(kind):
    """Generators with fused_mlp=True and False (the class default) give the same field and gradients."""
    torch.manual_seed(5)
    if kind == "hyper":
        gen = HyperIngpGenerator(text_dim=12, encoding=ENC, mlp_hidden=16).double()
        args = (torch.randn(3, 12, dtype=torch.float64), None)
    else:
        gen = IngpGenerator(4, encoding=ENC, mlp_hidden=16).double()
        args = (None, torch.tensor([2, 0, 3]))
    assert not gen.fused_mlp  # the class default; configs turn it on where measured
    with torch.no_grad():
        gen.encoding.table.normal_()
    x = torch.rand(3, 200, 3, dtype=torch.float64) * 2 - 1
    results = []
    for fused in (True, False):
        gen.fused_mlp = fused
        gen.zero_grad(set_to_none=True)
        sdf, rgb = gen(*args).query(x)
        (sdf.square().sum() + (rgb * torch.linspace(0, 1, 3, dtype=torch.float64)).sum()).backward()
        results.append([sdf, rgb] + [p.grad.clone() for p in gen.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_mlp_weight_gradient_under_bf16_autocast_sums_chunks_in_fp32():
    """Many chunks under bf16 autocast: the weight gradient is as accurate as ONE bf16 pass
    (the per-chunk partials are summed in fp32, not rounded into a bf16 running total)."""
    torch.manual_seed(6)
    x = torch.randn(1, 8192, 8)
    ws = [w.requires_grad_() for w in kaiming_weights(mlp_shapes(8, 16, 4), 1)]
    up = torch.randn(1, 8192, 4)
    exact = _grads(batched_mlp(x.double(), [w.double() for w in ws]), ws, up.double())
    errors = {}
    for chunk in (8192, 16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = chunked_mlp(x, ws, chunk=chunk)
        grads = _grads(out.float(), ws, up)
        errors[chunk] = [((g.double() - e).norm() / e.norm()).item() for g, e in zip(grads, exact)]
    # per layer (the first layer's error is dominated by x rounded to bf16; measured on the last
    # layer: 0.0033 in one pass, 0.0034 in 512 chunks here, 0.030 with bf16 running totals)
    for chunked, one_pass in zip(errors[16], errors[8192]):
        assert chunked < 1.5 * one_pass, errors


def _float_state(ckpt_path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def test_fused_mlp_training_equals_the_two_head_path_in_float64(tmp_path, cache_dir):
    """The whole training loop (init, RNG draws, parameter groups, Adam, gradient path), same seed,
    3 optimizer steps in float64: fused_mlp changes nothing but summation order. (In fp32 the two
    runs then drift apart at the rate one run does from a 1e-7 perturbation of its weights: the
    quickstart is chaotic in rounding, docs/results.md session 8.)"""
    states = []
    for fused in ("false", "true"):
        run = tmp_path / fused
        train(compose(run, cache_dir, "generator=hyper_ingp", "guidance=sds", "trainer.precision=64-true",
                      "logger=none", "trainer.val_check_interval=100", f"generator.fused_mlp={fused}"))
        states.append(_float_state(run / "checkpoints" / "last.ckpt"))
    two_head, fused_state = states
    assert two_head.keys() == fused_state.keys() and any(v.dtype == torch.float64 for v in two_head.values())
    for key, value in two_head.items():
        torch.testing.assert_close(fused_state[key], value, rtol=1e-10, atol=1e-12, msg=key)
