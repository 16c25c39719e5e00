"""Baked evaluation renders agree with direct rendering (the approximation is bounded)."""
import math

import pytest
import torch

from amortized3d.cameras import CameraBatch, orbit_cameras
from amortized3d.generators.hyper_ingp import HyperIngpGenerator
from amortized3d.rendering import VolumeRenderer
from amortized3d.rendering.baked import BakedField
from amortized3d.scenes.primitives import PrimitivesWorld


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(((a - b) ** 2).mean().item())


def test_baked_world_objects_render_like_the_exact_sdf():
    world = PrimitivesWorld()
    renderer = VolumeRenderer(num_samples=24, num_importance=24, bound_radius=1.0).eval()
    ids = torch.tensor([world.object_id("cube", "red"), world.object_id("torus", "blue"),
                        world.object_id("cone", "green")])
    cams = CameraBatch.cat([orbit_cameras(4, 32)] * len(ids))
    direct = renderer(world.field(ids), cams).rgb
    baked = renderer(BakedField(world.field(ids), resolution=96, bound=1.0), cams).rgb
    assert psnr(direct, baked) > 35.0
    coarse = renderer(BakedField(world.field(ids), resolution=24, bound=1.0), cams).rgb
    assert psnr(direct, coarse) < psnr(direct, baked)  # and it converges with resolution


@pytest.mark.parametrize("skip_empty_space", [False, True])
def test_baked_generator_field_matches_direct_queries(skip_empty_space):
    torch.manual_seed(0)
    gen = HyperIngpGenerator(text_dim=16, encoding=dict(n_levels=4, log2_hashmap_size=14, base_resolution=8,
                                                        per_level_scale=1.5, bound=1.0, implementation="torch"))
    field = gen(torch.randn(2, 16), torch.arange(2))
    baked = BakedField(field, resolution=96, bound=1.0)
    pts = torch.rand(2, 500, 3) * 1.6 - 0.8
    with torch.no_grad():
        g_direct, a_direct = field.query(pts)
    g_baked, a_baked = baked.query(pts)
    assert (g_direct - g_baked).abs().max() < 0.05  # trilinear of a (piecewise-trilinear) hash field
    assert (a_direct - a_baked).abs().max() < 0.05
    renderer = VolumeRenderer(num_samples=24, num_importance=24, bound_radius=1.0,
                              skip_empty_space=skip_empty_space).eval()
    cams = CameraBatch.cat([orbit_cameras(3, 24)] * 2)
    with torch.no_grad():
        assert psnr(renderer(field, cams).rgb, renderer(baked, cams).rgb) > 35.0


def test_gather_lookup_equals_grid_sample_lookup():
    """BakedField's default 1D-gather trilinear lookup is grid_sample's (bilinear, border,
    align_corners=True) to float rounding, inside and outside the grid and exactly on vertices."""
    torch.manual_seed(1)
    world = PrimitivesWorld()
    field = world.field(torch.tensor([world.object_id("torus", "blue"), world.object_id("cube", "red")]))
    fast, ref = BakedField(field, resolution=24, bound=1.0), BakedField(field, resolution=24, bound=1.0,
                                                                         lookup="grid_sample")
    assert torch.equal(fast.volume, ref.volume)
    axis = torch.linspace(-1.0, 1.0, 24)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)[:, ::7]
    pts = torch.cat([torch.rand(2, 3000, 3) * 2.6 - 1.3, vertices.expand(2, -1, -1),
                     torch.tensor([[[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [2.0, -3.0, 0.5]]]).expand(2, -1, -1)], dim=1)
    for a, b in zip(fast.query(pts), ref.query(pts)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for baked in (fast, ref):  # the proposal's geometry-only lookup reads the geometry plane alone
        assert torch.equal(baked.query_geometry(pts), baked.query(pts)[0])
    cams = CameraBatch.cat([orbit_cameras(3, 16)] * 2)
    renderer = VolumeRenderer(num_samples=16, num_importance=16, bound_radius=1.0).eval()
    torch.testing.assert_close(renderer(fast, cams).rgb, renderer(ref, cams).rgb, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lookup"):
        BakedField(field, resolution=8, lookup="nearest")


class CountingField:
    """A field that counts the points it is queried at."""

    def __init__(self, field):
        self.field, self.kind, self.batch_size, self.points = field, field.kind, field.batch_size, 0

    def query(self, points):
        self.points += points.shape[1]
        return self.field.query(points)


@pytest.mark.parametrize("lookup", ["gather", "grid_sample"])
def test_sphere_bake_queries_only_the_vertices_a_render_reads(monkeypatch, lookup):
    """With ``sphere`` (the renderer's bound sphere) the bake queries ~56% of the vertices, and the others are
    never read: filled with NaN, which any lookup weight (even 0) would spread, the renders, normals and
    lookups inside the sphere equal the full bake's bit for bit (eval and jittered training samples, with and
    without skipping; with normals the sphere is widened by their stencil, as AmortizedModel.render does)."""
    torch.manual_seed(0)
    gen = HyperIngpGenerator(text_dim=16, encoding=dict(n_levels=4, log2_hashmap_size=14, base_resolution=8,
                                                        per_level_scale=1.5, bound=1.0, implementation="torch"))
    world = PrimitivesWorld()
    fields = {"generator": gen(torch.randn(2, 16), torch.arange(2)),
              "world": world.field(torch.tensor([world.object_id("torus", "blue"), world.object_id("cube", "red")]))}
    monkeypatch.setattr("amortized3d.rendering.baked._EMPTY", {"sdf": (math.nan,) * 4, "density": (math.nan,) * 4})
    cams = CameraBatch.cat([orbit_cameras(3, 24, elevation_deg=30.0, distance=1.3)] * 2)
    for name, field in fields.items():
        full = CountingField(field)
        reference = BakedField(full, resolution=40, bound=1.0, lookup=lookup)
        for normals in (False, True):
            renderer = VolumeRenderer(num_samples=24, num_importance=24, bound_radius=1.0, skip_empty_space=True)
            counted = CountingField(field)
            baked = BakedField(counted, resolution=40, bound=1.0, lookup=lookup,
                               sphere=1.0 + (renderer.normal_eps if normals else 0.0))
            assert 0.5 * 40**3 < counted.points < 0.65 * 40**3, (name, counted.points)
            assert torch.isnan(baked.volume).any() and full.points == 40**3
            for training, skip in ((False, True), (True, True), (False, False)):
                renderer.train(training).skip_empty_space = skip
                a, b = (renderer(f, cams, compute_normals=normals, rng=torch.Generator().manual_seed(1))
                        for f in (reference, baked))
                assert torch.equal(a.rgb, b.rgb) and torch.equal(a.depth, b.depth), (name, normals, training)
                assert not normals or torch.equal(a.normal, b.normal)
        inside = torch.nn.functional.normalize(torch.randn(2, 4000, 3), dim=-1) * torch.rand(2, 4000, 1)
        for x, y in zip(reference.query(inside), baked.query(inside)):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="sphere"):
        BakedField(fields["world"], resolution=8, sphere=0.0)


def test_model_render_bakes_inside_the_renderers_sphere(monkeypatch, tmp_path, cache_dir):
    """AmortizedModel.render (the quickstart's model) gives BakedField the renderer's bound sphere, widened by
    normal_eps with normals, and None for a renderer without a sphere (border clamping reads the whole grid)."""
    from conftest import compose

    from amortized3d import model as model_module
    from amortized3d.build import build_system

    seen = []
    real = model_module.BakedField

    def spy(field, **kwargs):
        seen.append(kwargs.get("sphere"))
        return real(field, **kwargs)

    monkeypatch.setattr(model_module, "BakedField", spy)
    model = build_system(compose(tmp_path, cache_dir, "generator=hyper_ingp"))[0].model
    prompt, cams, bound = model.train_prompts[:1], orbit_cameras(1, 8), model.renderer.bound_radius
    with torch.no_grad(), model.evaluating():
        model.render(prompt, cams, bake=(16, 1.0))
        model.render(prompt, cams, bake=(16, 1.0), compute_normals=True)
        model.render(prompt, cams, bake=(16, 1.0), renderer=VolumeRenderer(num_samples=8, num_importance=8))
    assert bound is not None and seen == [bound, bound + model.renderer.normal_eps, None]
