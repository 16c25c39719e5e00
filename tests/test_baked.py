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
