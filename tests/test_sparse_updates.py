"""Sparse O(batch) updates of the per-prompt iNGP (issue 15 item 5): the working set and its row-sparse
gradients, LazyAdam's per-row step counts, the guard's row backups, and the real system with them."""
from __future__ import annotations

import copy

import pytest
import torch

from amortized3d.divergence import DivergenceGuard
from amortized3d.generators.ingp import IngpGenerator, training_bytes
from amortized3d.optim import build_optimizer
from amortized3d.row_sparse import LazyAdam, gather_rows

ENCODING = dict(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0,
                bound=1.0, implementation="torch")


def _linear_loss_step(param: torch.Tensor, ids: torch.Tensor, coeff: torch.Tensor) -> None:
    """loss = sum_b <coeff_b, param[ids_b]> through the working set: d loss / d param_r = sum_{b: ids_b = r} coeff_b."""
    rows, local = torch.unique(ids, sorted=True, return_inverse=True)
    (gather_rows(param, rows)[local] * coeff).sum().backward()


@pytest.mark.parametrize("name,wd", [("adam", 0.0), ("adam", 0.05), ("adamw", 0.05)])
def test_lazy_adam_equals_one_adam_per_row_on_its_own_steps(name, wd):
    """(a) Each row's t-th update is the t-th update of a torch Adam that saw only that row's gradients."""
    rng = torch.Generator().manual_seed(0)
    P, shape, betas = 6, (3, 2), (0.9, 0.99)
    init = torch.randn(P, *shape, generator=rng, dtype=torch.float64)
    param = torch.nn.Parameter(init.clone())
    opt = build_optimizer([{"params": [param], "name": "rows", "row_sparse": True}],
                          {"name": name, "lr": 0.05, "betas": betas, "eps": 1e-8, "weight_decay": wd})
    assert isinstance(opt, LazyAdam)
    ref_cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    refs = [torch.nn.Parameter(init[r:r + 1].clone()) for r in range(P)]
    ref_opts = [ref_cls([p], lr=0.05, betas=betas, eps=1e-8, weight_decay=wd) for p in refs]
    touched_ever = set()
    for _ in range(8):
        ids = torch.randint(0, P - 1, (4,), generator=rng)  # duplicates likely; row P-1 never touched
        coeff = torch.randn(4, *shape, generator=rng, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        _linear_loss_step(param, ids, coeff)
        opt.step()
        for r in ids.unique().tolist():  # the closed-form gradient of the row, one step of its own Adam
            refs[r].grad = coeff[ids == r].sum(0, keepdim=True)
            ref_opts[r].step()
            touched_ever.add(r)
    assert len(touched_ever) >= 3
    for r in range(P):
        assert torch.allclose(param[r], refs[r][0], rtol=0, atol=1e-12), r
        expected_steps = int(ref_opts[r].state[refs[r]]["step"]) if r in touched_ever else 0
        assert int(opt.state[param]["step"][r]) == expected_steps
    assert torch.equal(param[P - 1], init[P - 1])


def test_working_set_forward_and_summed_duplicate_gradients_equal_the_dense_path():
    """Same field, same gradient (duplicate prompts' gradients summed) as the dense generator, with particles."""
    dense = IngpGenerator(5, ENCODING, mlp_hidden=8, num_particles=2).double()
    sparse = IngpGenerator(5, ENCODING, mlp_hidden=8, num_particles=2, sparse_updates=True).double()
    sparse.load_state_dict(dense.state_dict())
    ids, z = torch.tensor([3, 1, 3, 0]), torch.tensor([1, 0, 1, 1])  # instance 7 twice
    x = torch.rand(4, 50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    outs = []
    for gen in (dense, sparse):
        sdf, rgb = gen(None, ids, z=z).query(x)
        (sdf.square().sum() + rgb.sum()).backward()
        outs.append((sdf, rgb))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        assert q.grad.is_sparse and q.grad._nnz() == 3, name  # instances 0*2+1, 1*2+0, 3*2+1
        assert torch.allclose(q.grad.to_dense(), p.grad, rtol=0, atol=1e-12), name
        assert p.grad[[0, 3, 4, 5, 8, 9]].abs().sum() == 0  # the dense gradient's untouched instances: zeros


def test_a_step_leaves_rows_outside_the_batch_and_their_state_unchanged():
    """(c) Several lazy steps on the real generator: instances never in a batch keep weights, moments, step 0;
    the dense Adam (betas 0.9) moves instances of earlier batches that this step did not touch."""
    torch.manual_seed(0)
    gen = IngpGenerator(6, ENCODING, mlp_hidden=8, sparse_updates=True).double()
    dense = IngpGenerator(6, ENCODING, mlp_hidden=8).double()
    dense.load_state_dict(gen.state_dict())
    config = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-15}
    opt, dense_opt = build_optimizer(gen.parameter_groups(), config), build_optimizer(dense.parameter_groups(), config)
    before = {k: v.detach().clone() for k, v in gen.named_parameters()}
    x = torch.rand(2, 40, 3, dtype=torch.float64) * 2 - 1
    for step, ids in enumerate([torch.tensor([1, 4]), torch.tensor([4, 4]), torch.tensor([2, 4])]):
        for g_, o in ((gen, opt), (dense, dense_opt)):
            o.zero_grad(set_to_none=True)
            sdf, rgb = g_(None, ids).query(x)
            (sdf.square().mean() + rgb.square().mean()).backward()
            o.step()
        if step == 0:  # row 1 is in step 0 only: lazy keeps it from here on, dense Adam moves it (momentum)
            after0 = gen.encoding.table[1].detach().clone()
            assert torch.equal(after0, dense.encoding.table[1])
    for name, p in gen.named_parameters():
        state = opt.state[p]
        assert state["step"].tolist() == [0, 1, 1, 0, 3, 0], name
        for r in (0, 3, 5):
            assert torch.equal(p[r], before[name][r]), (name, r)
            assert state["exp_avg"][r].abs().sum() == 0 and state["exp_avg_sq"][r].abs().sum() == 0
        for r in (1, 2, 4):
            assert not torch.equal(p[r], before[name][r]), (name, r)
    assert torch.equal(gen.encoding.table[1], after0)
    assert not torch.equal(dense.encoding.table[1], after0)


def test_guard_backs_up_and_restores_only_the_touched_rows():
    param = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3))
    opt = LazyAdam([param], lr=0.1)
    guard = DivergenceGuard()
    _linear_loss_step(param, torch.tensor([2, 0]), torch.ones(2, 3))
    before = param.detach().clone()

    def poisoned_step():  # an update that writes NaN into a touched row
        opt.step()
        with torch.no_grad():
            param[2, 1] = float("nan")

    assert not guard.checked_step(opt, poisoned_step)
    assert torch.equal(param, before) and guard.nonfinite_steps == 1
    assert guard._backups.get(id(opt)) == []  # no full-size copy was kept for the row-sparse parameter
    opt.zero_grad(set_to_none=True)
    _linear_loss_step(param, torch.tensor([1]), torch.ones(1, 3))
    assert guard.checked_step(opt)
    assert torch.equal(param[[0, 2, 3]], before[[0, 2, 3]]) and not torch.equal(param[1], before[1])


def test_lazy_optimizer_refuses_what_it_cannot_honour():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3, 2))], "row_sparse": True}]
    with pytest.raises(ValueError, match="optimizer 'sgd' has no lazy form"):
        build_optimizer(groups, {"name": "sgd", "lr": 0.1})
    with pytest.raises(ValueError, match=r"not \['amsgrad'\]"):
        build_optimizer(groups, {"name": "adam", "lr": 0.1, "amsgrad": True})
    assert build_optimizer(groups, {"name": "adamw", "lr": 0.1}).param_groups[0]["weight_decay"] == 1e-2  # torch's


def test_the_hash_grid_keeps_its_group_lr_under_the_lazy_optimizer():
    gen = IngpGenerator(4, ENCODING, mlp_hidden=8, sparse_updates=True)
    opt = build_optimizer(gen.parameter_groups(), {"name": "adam", "lr": 1e-3, "group_lr": {"encoding": 1e-2}})
    assert isinstance(opt, LazyAdam)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"encoding": 1e-2, "network": 1e-3}


def test_dense_adam_state_converts_to_per_row_counts():
    p = torch.nn.Parameter(torch.randn(3, 2))
    dense = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3, 2)
    dense.step()
    dense.step()
    lazy = LazyAdam([p], lr=0.1)
    with pytest.warns(RuntimeWarning, match="converted 1 dense Adam state"):
        lazy.load_state_dict(copy.deepcopy(dense.state_dict()))
    assert lazy.state[p]["step"].tolist() == [2, 2, 2]
    q = torch.nn.Parameter(p.detach().clone())
    reference = torch.optim.Adam([q], lr=0.1)
    reference.load_state_dict(copy.deepcopy(dense.state_dict()))
    q.grad = p.grad.clone()
    lazy.step()
    reference.step()
    assert torch.equal(p, q)  # the converted state continues exactly as the dense Adam would


def test_sparse_training_memory_estimate_drops_the_gradient_and_rollback_copy():
    per_dense, per_sparse = training_bytes(10), training_bytes(10, sparse_updates=True)
    assert per_sparse < 0.61 * per_dense  # 12 (+ step counts) instead of 20 bytes per parameter


# --- the real system (analytic prior, tiny settings) ----------------------------------------------------------
# A small hash grid: 24 prompts' tables at the world's capacity make 200 MB checkpoints (most of the test's time).
SMALL_GRID = ["generator.encoding.n_levels=4", "generator.encoding.log2_hashmap_size=10"]
def _optimizer_state(ckpt) -> list[torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_states"][0]["state"]
    return [t for k in sorted(state) for _, t in sorted(state[k].items())]


def _generator(ckpt) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.generator.") and isinstance(v, torch.Tensor)}


def test_every_instance_in_every_batch_sparse_equals_dense_training(tmp_path, cache_dir):
    """(b) With all 24 prompts in every batch, 3 steps of the real system: the sparse path's weights and
    Adam moments equal the dense path's bit for bit (per-row step counts = the dense step)."""
    from amortized3d.train import train
    from conftest import compose

    common = ["generator=ingp", "data.batch_size=24", "trainer.max_steps=3", "system.optimizer.betas=[0.9,0.99]",
              *SMALL_GRID, "+trainer.limit_val_batches=0"]
    train(compose(tmp_path / "dense", cache_dir, *common))
    train(compose(tmp_path / "sparse", cache_dir, *common, "generator.sparse_updates=true"))
    dense, sparse = (_generator(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("dense", "sparse"))
    assert dense.keys() == sparse.keys()
    for k in dense:
        assert torch.equal(dense[k], sparse[k]), k
    d_state = torch.load(tmp_path / "dense/checkpoints/last.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    s_state = torch.load(tmp_path / "sparse/checkpoints/last.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    for i in d_state:
        assert torch.equal(d_state[i]["exp_avg"], s_state[i]["exp_avg"])
        assert d_state[i]["exp_avg"].abs().sum() > 0  # trained, not trivially equal
        assert torch.equal(d_state[i]["exp_avg_sq"], s_state[i]["exp_avg_sq"])
        assert s_state[i]["step"].tolist() == [int(d_state[i]["step"])] * 24


def test_optimizer_kind_change_on_resume_is_refused_or_converted(tmp_path, cache_dir):
    from amortized3d.run_guard import ResumeMismatchError
    from amortized3d.train import train
    from conftest import compose

    common = ["generator=ingp", "callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2",
              *SMALL_GRID]
    train(compose(tmp_path / "lazy", cache_dir, *common, "generator.sparse_updates=true", "trainer.max_steps=2"))
    ckpt = tmp_path / "lazy" / "checkpoints" / "last.ckpt"
    with pytest.raises(ResumeMismatchError, match="generator.sparse_updates"):  # the config diff
        train(compose(tmp_path / "lazy", cache_dir, *common, "trainer.max_steps=3", f"ckpt_path={ckpt}"))
    with pytest.raises(ResumeMismatchError, match="lazy Adam of generator.sparse_updates=true"):  # forced: no dense form
        train(compose(tmp_path / "lazy", cache_dir, *common, "trainer.max_steps=3", f"ckpt_path={ckpt}",
                      "resume.force=true"))
    train(compose(tmp_path / "dense", cache_dir, *common, "trainer.max_steps=2"))
    ckpt = tmp_path / "dense" / "checkpoints" / "last.ckpt"
    with pytest.warns(RuntimeWarning, match="converted 5 dense Adam state"):
        train(compose(tmp_path / "dense", cache_dir, *common, "trainer.max_steps=3", f"ckpt_path={ckpt}",
                      "generator.sparse_updates=true", "resume.force=true"))
    state = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"]
    assert all(s["step"].dim() == 1 and int(s["step"].min()) >= 2 for s in state.values())


def test_a_run_recorded_before_the_switch_resumes_as_the_dense_path():
    """A version-1 config (before sparse_updates existed) migrates to sparse_updates=false: no resume diff."""
    from amortized3d.config_version import migrate_config
    from amortized3d.run_guard import compare_resume

    recorded = {"generator": {"_target_": "amortized3d.generators.ingp.IngpGenerator", "num_particles": 1}}
    assert migrate_config(recorded, 1).config["generator"]["sparse_updates"] is False
    current = {"generator": {**recorded["generator"], "sparse_updates": False, "fused_mlp": False}}  # ingp.yaml's
    meta = {"path": "old.ckpt", "config": recorded, "config_version": 1, "global_step": 0}
    assert compare_resume(meta, current, None) == {"changed": {}, "forced": []}
