"""The one executor of the update order (``amortized3d.update_order``) and the divergence guard.

The system (Lightning) and the 2D toy (plain torch) both train through ``UpdateOrderExecutor``;
these tests check that the Lightning path adds nothing to the arithmetic (the system's steps are
bit-identical to the executor's on plain torch pieces), that each order is the written-out
sequence of its paper, and the guard's skip / rollback / stop decisions on their own.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import lightning as L
import pytest
import torch

from amortized3d.cameras import sample_cameras
from amortized3d.data import PromptDataModule, ShardLayout, step_rng
from amortized3d.divergence import DivergenceGuard
from amortized3d.guidance.base import GuidanceInput
from amortized3d.optim import all_finite, build_optimizer
from amortized3d.toys import gaussian_2d
from amortized3d.build import build_system
from amortized3d.update_order import StepParts, UpdateOrderExecutor, build_auxiliary_optimizer
from conftest import ROOT, compose

STEPS = 2


def _lightning_run(cfg, corpus_steps: int = STEPS):
    L.seed_everything(cfg.seed, workers=True)
    system, prior, corpus = build_system(cfg)
    dm = PromptDataModule(system.train_prompts, corpus.unique("val"), batch_size=cfg.data.batch_size)
    trainer = L.Trainer(max_steps=corpus_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(system, datamodule=dm)
    return system


def _plain_torch_run(cfg, steps: int = STEPS):
    """The system's training step written with plain torch pieces (``loss.backward``, torch
    optimizers, no trainer) and the same executor: what the toy does."""
    L.seed_everything(cfg.seed, workers=True)
    system, prior, corpus = build_system(cfg)
    opt = build_optimizer(system.generator.parameter_groups(), dict(system.optimizer_config))
    executor = UpdateOrderExecutor(system.guidance, opt, build_auxiliary_optimizer(system.guidance), DivergenceGuard())
    layout = ShardLayout(len(system.train_prompts), cfg.data.batch_size, 1, seed=0)
    V, seed = system.views_per_prompt, system.seed
    for step in range(steps):
        ids, weights = layout.batch(step, 0)
        prompts = [system.train_prompts[i] for i in ids.tolist() for _ in range(V)]
        cameras = sample_cameras(len(prompts), system.resolution, system.camera_ranges,
                                 rng=step_rng(seed, step, 0, "cameras"))
        text_emb = system.text_table[ids]
        z = system.generator.sample_latent(len(ids), step_rng(seed, step, 0, "latent"))
        out = system.renderer(system.generator(text_emb, ids, z=z), cameras, background=system.train_background,
                              regularizers=system._active_regularizers(),
                              compute_normals=system.guidance.needs_normals,
                              rng=step_rng(seed, step, 0, "render"))
        text_emb = text_emb.repeat_interleave(V, dim=0)
        memo = {"rgb": out.rgb}

        def inputs(stream: str, detach: bool, out=out, cameras=cameras, prompts=prompts, text_emb=text_emb,
                   memo=memo, step=step) -> GuidanceInput:
            extras = {"opacity": out.opacity, "normal": out.normal}
            if detach:
                extras = {k: (v.detach() if v is not None else None) for k, v in extras.items()}
            return GuidanceInput(rgb=out.rgb.detach() if detach else out.rgb, cameras=cameras, prompts=prompts,
                                 step=step, text_emb=text_emb, extras=extras, memo=memo,
                                 rng=step_rng(seed, step, 0, stream))

        def generator_step() -> None:
            system._apply_lr_scale(opt)
            opt.step()

        result = executor.step(StepParts(inputs=inputs, reduce=lambda losses, w=weights: system._reduce(losses, w),
                                         backward=torch.Tensor.backward, generator_step=generator_step,
                                         items=out.rgb.shape[0], extra_losses=out.regularizers))
        assert result.stepped
        system.batch_index += 1
    return system


@pytest.mark.parametrize("overrides", [
    ["guidance=vsd"],  # after
    ["guidance=l2vsd"],  # after, the score gradient handed over and reused
    pytest.param(["guidance=lvsd", "guidance.score_steps=2"], marks=pytest.mark.slow),  # before, gamma 2
    pytest.param(["guidance=vsd", "guidance.update_order=joint"], marks=pytest.mark.slow),  # joint
    pytest.param(["guidance=sds"], marks=pytest.mark.slow),  # no model of its own
])
def test_system_steps_are_the_executors_steps_on_plain_torch(tmp_path, cache_dir, overrides):
    """Lightning's manual optimisation (manual_backward, LightningOptimizer, step counters) adds
    nothing to the arithmetic: the system's parameters after two steps, generator and score model,
    are bit-identical to the executor driven with plain torch pieces, as the toy drives it."""
    cfg = compose(tmp_path, cache_dir, *overrides, f"trainer.max_steps={STEPS}")
    lightning = dict(_lightning_run(cfg).named_parameters())
    plain = dict(_plain_torch_run(cfg).named_parameters())
    assert set(lightning) == set(plain)
    changed = [n for n, p in plain.items() if p.requires_grad and not n.startswith("guidance.prior.")]
    assert changed
    for name in changed:
        assert torch.equal(lightning[name], plain[name]), name


def _toy_reference(method: str, cfg: gaussian_2d.ToyConfig) -> dict:
    """The toy's orders written out as in the papers, without the executor (the toy before it)."""
    prior, q = gaussian_2d.make_problem(cfg)
    guidance = gaussian_2d.build_guidance(method, prior, cfg)
    opt = torch.optim.Adam(q.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, gaussian_2d._cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    aux = guidance.auxiliary
    aux_opt = build_auxiliary_optimizer(guidance)
    n = cfg.num_particles
    cameras = sample_cameras(n, 1, rng=torch.Generator().manual_seed(cfg.seed))
    text_emb = torch.zeros(n, 1, dtype=torch.float64)

    def inputs(x, step, stream, detach=False):
        return GuidanceInput(rgb=x.detach() if detach else x, cameras=cameras, prompts=[gaussian_2d.PROMPT] * n,
                             step=step, rng=step_rng(cfg.seed, step, 0, stream), text_emb=text_emb)

    def score_backward(x, step, i):
        loss = sum(v.mean() for v in aux.loss(inputs(x, step, f"aux{i}", detach=True)).losses.values())
        aux_opt.zero_grad(set_to_none=True)
        loss.backward()

    for step in range(cfg.steps):
        x = q.sample(n, step_rng(cfg.seed, step, 0, "particles"))
        if aux is not None and aux.order == "before":  # L-VSD: phi first
            for i in range(aux.steps):
                score_backward(x, step, i)
                aux_opt.step()
        if aux is not None and aux.reuses_gradient:  # L²-VSD: phi's gradient, then theta with it
            score_backward(x, step, 0)
            with aux.handing_over(aux.gradients(), n):
                out = guidance(inputs(x, step, "guidance"))
        else:
            out = guidance(inputs(x, step, "guidance"))
        loss = sum(v.mean() for v in out.losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if aux is not None and aux.order == "after":  # VSD: phi on the renders of the updated step
            for i in range(aux.steps):
                if not (i == 0 and aux.reuses_gradient):
                    score_backward(x, step, i)
                aux_opt.step()
    return gaussian_2d.distances(q, prior)


@pytest.mark.parametrize("method, changes", [
    ("sds", {}), ("vsd", {}), ("lvsd", {"score_steps": 2}), ("l2vsd", {}), ("l2vsd", {"reuse_score_gradient": True}),
    ("l2vsd", {"reuse_score_gradient": True, "score_steps": 2})])
def test_toy_through_the_executor_is_the_written_out_order(method, changes):
    cfg = replace(gaussian_2d.ToyConfig(), steps=25, **changes)
    with gaussian_2d.single_thread():
        expected = _toy_reference(method, cfg)
    got = gaussian_2d.run(method, cfg)
    assert {k: got[k] for k in expected} == expected


def test_toy_lookahead_draw_matters_but_both_beat_vsd():
    """The handed-over gradient (the system's) and the toy's own draw are different samples of the
    same lookahead: different trajectories, both far closer to p than VSD."""
    cfg = replace(gaussian_2d.ToyConfig(), steps=100)
    own, handed = gaussian_2d.run("l2vsd", cfg), gaussian_2d.run("l2vsd", replace(cfg, reuse_score_gradient=True))
    vsd = gaussian_2d.run("vsd", cfg)
    assert own["w2"] != handed["w2"]
    assert max(own["w2"], handed["w2"]) < 0.8 * vsd["w2"]


# --- the divergence guard on its own -----------------------------------------------------------

def _sgd(lr: float) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    w = torch.nn.Parameter(torch.ones(3))
    return w, torch.optim.SGD([w], lr=lr)


def test_guard_skips_nonfinite_gradients_and_drops_them():
    guard = DivergenceGuard()
    w, opt = _sgd(0.1)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert not guard.all_finite(opt) and w.grad is None and guard.nonfinite_steps == 1
    w.grad = torch.ones(3)
    assert guard.all_finite(opt) and guard.nonfinite_steps == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_elementwise_finiteness_where_a_sum_would_overflow(dtype):
    """The guard's check (a float64 sum per tensor) against ``isfinite().all()``: the largest finite values
    (whose sum in their own dtype overflows), one inf or NaN anywhere, +inf with -inf, empty tensors."""
    big = torch.finfo(dtype).max
    cases = {"largest finite": [torch.full((1000,), big, dtype=dtype), torch.full((7,), -big, dtype=dtype)],
             "empty": [torch.zeros(0, dtype=dtype)], "none": []}
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.full((4, 5), big, dtype=dtype)
        t[2, 3] = bad
        cases[f"one {bad}"] = [torch.ones(3, dtype=dtype), t]
    cases["inf and -inf"] = [torch.tensor([float("inf"), float("-inf")], dtype=dtype)]
    for name, tensors in cases.items():
        expected = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert bool(all_finite(tensors)) == expected, name
    assert not bool(all_finite([torch.ones(3), torch.tensor([float("nan")])]))  # mixed dtypes in one call


def test_guard_rolls_back_an_update_that_makes_weights_nonfinite():
    guard = DivergenceGuard()
    w, opt = _sgd(float("inf"))
    w.grad = torch.ones(3)
    assert not guard.checked_step(opt)
    assert torch.equal(w.detach(), torch.ones(3)) and guard.nonfinite_steps == 1 and guard.streak["rolled_back"]
    opt.param_groups[0]["lr"] = 0.5
    assert guard.checked_step(opt) and torch.equal(w.detach(), torch.full((3,), 0.5))


def test_guard_stops_after_the_streak_and_a_step_resets_it():
    guard = DivergenceGuard(max_consecutive=3)
    assert not guard.record(False, step=10, global_step=4, renders_finite=True, nonfinite_losses=["vsd"])
    assert not guard.record(False, step=11, global_step=4, renders_finite=True, nonfinite_losses=["vsd"])
    assert guard.streak["start"] == 10 and guard.streak["global_step"] == 4
    assert not guard.record(True, step=12, global_step=5, renders_finite=True, nonfinite_losses=[])
    assert guard.consecutive == 0
    assert [guard.record(False, s, 5, False, []) for s in (13, 14, 15)] == [False, False, True]
    w, opt = _sgd(0.1)
    assert "renders are non-finite" in guard.diagnose(opt, None, {id(w): "w"})


def test_executor_and_guards_import_without_lightning():
    code = ("import sys, amortized3d.update_order, amortized3d.divergence, amortized3d.run_guard; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
