"""VSD's particles (issue 19): n independent fields per prompt of the per-prompt iNGP, one shared score
model; independence, the Algorithm-1 draw, exact resume, export and the diversity block."""
from __future__ import annotations

import json

import pytest
import torch

from amortized3d.cameras import sample_cameras, CameraRanges
from amortized3d.generators.ingp import IngpGenerator
from amortized3d.generators.particles import num_particles, rendering_particle
from amortized3d.rendering import VolumeRenderer

ENCODING = dict(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0,
                bound=1.0, implementation="torch")


def _params(gen: IngpGenerator) -> dict[str, torch.Tensor]:
    """Every parameter, leading dim = instance (prompt * n + particle)."""
    return {name: p for name, p in gen.named_parameters()}


def test_one_particles_gradient_does_not_move_another_particles_field():
    torch.manual_seed(0)
    gen = IngpGenerator(num_prompts=3, encoding=ENCODING, mlp_hidden=16, num_particles=4)
    params = _params(gen)
    assert all(p.shape[0] == 12 for p in params.values())
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2, betas=(0.0, 0.99), eps=1e-15)  # the system's optimizer
    ids, particles = torch.tensor([0, 2]), torch.tensor([1, 3])
    renderer = VolumeRenderer(num_samples=8, num_importance=0, bound_radius=1.0)
    cams = sample_cameras(2, 8, CameraRanges(), rng=torch.Generator().manual_seed(0))
    for _ in range(2):  # twice: Adam's running state must not move the others either
        out = renderer(gen(None, ids, z=particles), cams)
        opt.zero_grad()
        (out.rgb - 0.3).square().mean().backward()
        trained = {0 * 4 + 1, 2 * 4 + 3}
        for name, p in params.items():
            for inst in range(12):
                if inst not in trained:
                    assert not p.grad[inst].any(), (name, inst)
        opt.step()
    for name, p in params.items():
        for inst in range(12):
            moved = not torch.equal(p.detach()[inst], before[name][inst])
            assert moved == (inst in trained), (name, inst)


def test_one_particle_is_exactly_the_previous_generator():
    torch.manual_seed(3)
    old = IngpGenerator(num_prompts=3, encoding=ENCODING, mlp_hidden=16)
    torch.manual_seed(3)
    new = IngpGenerator(num_prompts=3, encoding=ENCODING, mlp_hidden=16, num_particles=1)
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(p.shape[0] == 3 for p in new.parameters())  # one instance per prompt, as before particles
    for (k, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k
    assert new.sample_latent(8, torch.Generator().manual_seed(0)) is None  # nothing drawn: the RNG is untouched


def test_draw_is_uniform_keyed_by_the_generator_and_selects_the_instance():
    gen = IngpGenerator(num_prompts=2, encoding=ENCODING, mlp_hidden=16, num_particles=3)
    a = gen.sample_latent(4000, torch.Generator().manual_seed(7))
    assert torch.equal(a, gen.sample_latent(4000, torch.Generator().manual_seed(7)))
    counts = torch.bincount(a, minlength=3).double() / 4000
    assert counts.min() > 0.3 and counts.max() < 0.37
    pts = torch.rand(1, 50, 3) * 2 - 1
    sdf_z = gen(None, torch.tensor([1]), z=torch.tensor([2])).query(pts)[0]
    with rendering_particle(gen, 2):
        sdf_ctx = gen(None, torch.tensor([1])).query(pts)[0]
    assert gen.eval_particle == 0
    torch.testing.assert_close(sdf_z, sdf_ctx, rtol=0, atol=0)
    assert not torch.equal(sdf_ctx, gen(None, torch.tensor([1])).query(pts)[0])  # particle 0 differs
    with pytest.raises(IndexError):
        gen(None, torch.tensor([0]), z=torch.tensor([3]))
    with pytest.raises(ValueError, match="valid: 0..2"):
        with rendering_particle(gen, 3):
            pass
    assert num_particles(torch.nn.Linear(1, 1)) == 1


def _state(ckpt) -> dict:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


PARTICLES = ["generator=ingp", "generator.num_particles=3", "generator.encoding.n_levels=2",
             "generator.encoding.log2_hashmap_size=10", "data=primitives_open", "data.batch_size=3"]


def test_a_training_step_moves_only_the_drawn_particle_of_each_prompt(tmp_path, cache_dir):
    import lightning as L

    from amortized3d.build import build_system
    from amortized3d.train import train
    from conftest import compose

    cfg = compose(tmp_path, cache_dir, *PARTICLES, "guidance=vsd", "trainer.max_steps=1")
    L.seed_everything(cfg.seed, workers=True)  # as train() does before build_system
    from amortized3d.corpora import load_corpus
    corpus = load_corpus("primitives_open")
    cfg.data.num_train_prompts = len(corpus.unique("train"))
    start = {k: v.detach().clone() for k, v in build_system(cfg, corpus)[0].generator.named_parameters()}
    train(compose(tmp_path, cache_dir, *PARTICLES, "guidance=vsd", "trainer.max_steps=1"))
    after = {k[len("model.generator."):]: v for k, v in _state(tmp_path / "checkpoints" / "last.ckpt").items()
             if k.startswith("model.generator.")}
    moved = {i for k, v in start.items() for i in range(v.shape[0]) if not torch.equal(v[i], after[k][i])}
    prompts = {i // 3 for i in moved}
    assert len(moved) == 3 and len(prompts) == 3  # 3 prompts, each moved in exactly one of its particles


def test_particle_resume_is_bit_exact(tmp_path, cache_dir):
    from amortized3d.train import train
    from conftest import compose

    common = [*PARTICLES, "guidance=vsd", "callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2"]
    train(compose(tmp_path / "full", cache_dir, *common, "trainer.max_steps=4"))
    train(compose(tmp_path / "part", cache_dir, *common, "trainer.max_steps=2"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    train(compose(tmp_path / "part", cache_dir, *common, "trainer.max_steps=4", f"ckpt_path={ckpt}"))
    full, resumed = _state(tmp_path / "full" / "checkpoints" / "last.ckpt"), _state(ckpt)
    assert full.keys() == resumed.keys() and any(k.startswith("guidance.") for k in full)  # + the score model
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_training_on_the_open_world_writes_the_diversity_block_and_exports_particles(tmp_path, cache_dir):
    import imageio.v3 as iio

    from amortized3d.evaluation.exporting import export
    from amortized3d.train import train
    from conftest import compose
    from test_integrity import compose_task

    metrics = train(compose(tmp_path, cache_dir, *PARTICLES, "guidance=sds", "evaluation.splits=[train]"))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    div = on_disk["diversity"]
    assert len(div["per_prompt"]) == 11 and div["overall"]["num_particles"] == 3
    cube = div["per_prompt"]["a cube"]
    assert len(cube["valid_objects"]) == 6 and len(cube["particles"]) == 3
    assert cube["max_modes_covered"] == pytest.approx(3 / 6)
    assert 0 <= cube["modes_covered"] <= cube["max_modes_covered"]
    assert cube["blends"] == sum(not p["landed"] for p in cube["particles"])
    assert metrics["diversity"] == div
    from amortized3d.evaluation.evaluate import evaluate
    from test_integrity import compose_task as task

    again = evaluate(task("evaluate", tmp_path / "ev", cache_dir, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}",
                          "evaluator=oracle", "split=train"))
    assert again["diversity"] == div  # scripts/evaluate.py measures the same particles the same way
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    frames = []
    for particle in (0, 2):
        (path,) = export(compose_task("export", tmp_path / "x", cache_dir, f"ckpt_path={ckpt}", "prompt=a cube",
                                      "format=gif", f"particle={particle}", "render.resolution=16"))
        assert path.stem.endswith(f"_particle{particle}")
        frames.append(iio.imread(path, index=None))
    assert not (frames[0] == frames[1]).all()  # two particles, two fields
    with pytest.raises(ValueError, match="valid: 0..2"):
        export(compose_task("export", tmp_path / "x", cache_dir, f"ckpt_path={ckpt}", "prompt=a cube",
                            "format=gif", "particle=3"))


def test_conv3d_z_draws_are_the_particles_of_the_diversity_block(tmp_path, cache_dir):
    """generator=conv3d generator.num_particles=n: the diversity block measures n z draws per prompt (issue
    19: "for 3DConv-net the latent z plays this role"), at the end of training and in scripts/evaluate.py."""
    import imageio.v3 as iio

    from amortized3d.evaluation.evaluate import evaluate
    from amortized3d.evaluation.exporting import export
    from amortized3d.train import train
    from conftest import compose
    from test_conv3d_training import CONV3D
    from test_integrity import compose_task

    metrics = train(compose(tmp_path, cache_dir, *CONV3D, "generator.num_particles=3", "guidance=asd",
                            "data=primitives_open", "data.batch_size=3", "evaluation.splits=[train]"))
    div = metrics["diversity"]
    assert len(div["per_prompt"]) == 11 and div["overall"]["num_particles"] == 3
    cube = div["per_prompt"]["a cube"]
    assert len(cube["particles"]) == 3 and cube["max_modes_covered"] == pytest.approx(3 / 6)
    assert json.loads((tmp_path / "metrics.json").read_text())["diversity"] == div
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    again = evaluate(compose_task("evaluate", tmp_path / "ev", cache_dir, f"ckpt_path={ckpt}", "evaluator=oracle",
                                  "split=train"))
    assert again["diversity"] == div  # the same draws, rebuilt from the checkpoint's config
    more = evaluate(compose_task("evaluate", tmp_path / "ev5", cache_dir, f"ckpt_path={ckpt}", "evaluator=oracle",
                                 "split=train", "overrides=['generator.num_particles=5']"))
    assert more["diversity"]["overall"]["num_particles"] == 5  # more z draws of the same trained generator
    first = [p["object_id"] for p in more["diversity"]["per_prompt"]["a cube"]["particles"][:3]]
    assert first == [p["object_id"] for p in cube["particles"]]  # z_0..z_2 are the draws measured above
    frames = [iio.imread(export(compose_task("export", tmp_path / "x", cache_dir, f"ckpt_path={ckpt}",
                                             "prompt=a cube", "format=gif", f"particle={i}",
                                             "render.resolution=16"))[0], index=None) for i in (0, 1)]
    assert not (frames[0] == frames[1]).all()  # two z draws, two shapes
