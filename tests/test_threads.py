"""The CPU thread policies of the render's hot loops (threads.py) change nothing but the wall time: the
intra-op threads, one thread, or two independent halves on two threads (threads.run_pair: the MLP heads'
fields, the hash grid's dense levels and its hashed levels' feature planes in backward) give bit-equal
values and gradients."""
from __future__ import annotations

import threading

import pytest
import torch

from amortized3d import threads
from amortized3d.generators.encodings import HashGridEncoding
from amortized3d.generators.mlp import chunked_mlp, fuse_heads, kaiming_weights, mlp_shapes


@pytest.fixture
def two_threads(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest runs tests on one thread
    yield monkeypatch
    torch.set_num_threads(before)


def _mlp_run(x, sdf, rgb):
    leaves = [x, *sdf, *rgb]
    for t in leaves:
        t.grad = None
    out = chunked_mlp(x, fuse_heads([sdf, rgb]), chunk=100)  # several chunks per half
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out.detach().clone(), *[t.grad.clone() for t in leaves]]


def _grid_run(enc, x):
    enc.zero_grad(set_to_none=True)
    out = enc(x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return [out.detach().clone(), enc.table.grad.clone()]


def test_thread_policies_are_bit_equal(two_threads):
    torch.manual_seed(0)
    x = torch.randn(5, 333, 12, requires_grad=True)  # odd batch: halves of 2 and 3 fields
    sdf = [w.requires_grad_() for w in kaiming_weights(mlp_shapes(12, 16, 1), 5)]
    rgb = [w.requires_grad_() for w in kaiming_weights(mlp_shapes(12, 16, 3), 5)]
    enc = HashGridEncoding(n_levels=5, log2_hashmap_size=14, base_resolution=4, per_level_scale=1.6, bound=1.0,
                           implementation="torch")
    with torch.no_grad():
        enc.table.normal_()
    pts = torch.rand(3, 2000, 3) * 2.2 - 1.1
    results = {}
    for policy in threads.CPU_THREAD_POLICIES:
        two_threads.setattr(threads, "CPU_THREADS", policy)
        assert threads.split_in_two(x.device) == (policy == "split")
        with threads.loop_threads(x.device):  # what a loop that is not split runs on
            assert torch.get_num_threads() == (2 if policy == "intra_op" else 1)
        results[policy] = _mlp_run(x, sdf, rgb) + _grid_run(enc, pts)
    for policy in ("serial", "split"):
        for a, b in zip(results[policy], results["intra_op"]):
            assert torch.equal(a, b), policy


@pytest.mark.parametrize("env, policy", [({}, "intra_op"), ({"AMORTIZED3D_CPU_THREADS": "serial"}, "serial"),
                                         ({"AMORTIZED3D_SPLIT_THREADS": "1"}, "split"),
                                         ({"AMORTIZED3D_CPU_THREADS": "serial", "AMORTIZED3D_SPLIT_THREADS": "1"},
                                          "serial")])
def test_policy_from_the_environment(monkeypatch, env, policy):
    for name in ("AMORTIZED3D_CPU_THREADS", "AMORTIZED3D_SPLIT_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert threads._policy_from_env() == policy


def test_an_unknown_policy_is_refused(monkeypatch):
    monkeypatch.setenv("AMORTIZED3D_CPU_THREADS", "four")
    with pytest.raises(ValueError, match="intra_op"):
        threads._policy_from_env()


def test_no_split_on_one_thread(monkeypatch):
    monkeypatch.setattr(threads, "CPU_THREADS", "split")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert not threads.split_in_two(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_run_pair_runs_the_second_on_a_worker_with_this_grad_mode():
    seen = {}

    def second():
        seen["thread"] = threading.current_thread().name
        seen["grad"] = torch.is_grad_enabled()
        seen["threads"] = torch.get_num_threads()
        return 2

    with torch.no_grad():
        assert threads.run_pair(lambda: 1, second) == (1, 2)
    assert seen["thread"].startswith("amortized3d-split") and seen["grad"] is False and seen["threads"] == 1
    with pytest.raises(ZeroDivisionError):  # an error in either half reaches the caller
        threads.run_pair(lambda: 1, lambda: 1 / 0)
