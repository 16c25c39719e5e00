"""Volume renderer checked against closed forms on analytic fields (sphere SDF, constant-density ball)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from amortized3d.cameras import CameraBatch, make_cameras
from amortized3d.rendering import (RandomColorBackground, SolidBackground, VolumeRenderer, composite_weights,
                                   sample_pdf, trunc_exp, volsdf_density)
from amortized3d.rendering.regularizers import MAX_OPAQUE
from amortized3d.rendering.volume_renderer import kept_first

D, R = 1.5, 0.5  # camera distance, sphere radius


class SphereField(nn.Module):
    """B spheres at the origin with learnable radii and constant albedo; ``scale`` breaks the SDF."""

    kind = "sdf"

    def __init__(self, radii: list[float], colors: list[list[float]] | None = None, scale: float = 1.0,
                 shell: float | None = None) -> None:
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(radii))
        colors = colors or [[0.9, 0.1, 0.3]] * len(radii)
        self.color = nn.Parameter(torch.tensor(colors))
        self.scale, self.shell = scale, shell
        self.calls: list[tuple[int, ...]] = []

    @property
    def batch_size(self) -> int:
        return int(self.radius.shape[0])

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        self.calls.append(tuple(points.shape))
        sdf = torch.sqrt(points.square().sum(-1) + 1e-12) - self.radius[:, None]
        if self.shell is not None:
            sdf = sdf.abs() - self.shell
        return self.scale * sdf, self.color[:, None, :].expand(-1, points.shape[1], 3)


class BallDensity(nn.Module):
    """Constant density ``sigma`` inside a ball of radius R, ~0 outside (raw pre-activation output)."""

    kind = "density"

    def __init__(self, sigma: float, activation: str) -> None:
        super().__init__()
        raw = math.log(math.expm1(sigma)) if activation == "softplus" else math.log(sigma)
        self.raw_inside = nn.Parameter(torch.tensor([raw]))

    @property
    def batch_size(self) -> int:
        return 1

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        inside = points.norm(dim=-1) < R
        raw = torch.where(inside, self.raw_inside[:, None], torch.full_like(points[..., 0], -40.0))
        return raw, torch.full_like(points, 0.5)


def cameras(elev: list[float], azim: list[float], size: int = 33, fovy: float = 60.0) -> CameraBatch:
    n = len(elev)
    return make_cameras(torch.tensor(elev), torch.tensor(azim), torch.full((n,), D), torch.full((n,), fovy), size)


def ray_angle(cams: CameraBatch) -> Tensor:
    """Angle [N,H,W] between each pixel ray and the ray towards the origin."""
    origins, dirs = cams.rays()
    to_centre = -origins / origins.norm(dim=-1, keepdim=True)
    return torch.acos((dirs * to_centre).sum(-1).clamp(-1.0, 1.0))


def test_sphere_silhouette_depth_normal_background() -> None:
    cams = cameras([0.0, 30.0], [0.0, 120.0], size=49)  # odd size: a pixel ray hits the centre exactly
    bg = SolidBackground((0.2, 0.4, 0.6))
    renderer = VolumeRenderer(volsdf_inv_std=1000.0).eval()  # sharp surface: the silhouette is a hard disk
    out = renderer(SphereField([R]), cams, background=bg, compute_normals=True)
    assert out.rgb.shape == (2, 3, 49, 49) and out.normal.shape == (2, 3, 49, 49)

    angle, edge = ray_angle(cams), math.asin(R / D)
    opacity = out.opacity[:, 0]
    inside, outside = angle < edge - 0.02, angle > edge + 0.02
    assert opacity[inside].min() > 0.99 and opacity[outside].max() < 0.01
    # covered fraction vs the analytic projected disk of angular radius asin(r/d)
    focal_px = 0.5 * 49 / math.tan(math.radians(30.0))
    disk_fraction = math.pi * (focal_px * math.tan(edge)) ** 2 / 49**2
    assert (opacity > 0.5).float().mean().item() == pytest.approx(disk_fraction, rel=0.03)

    c = 24
    assert out.depth[:, 0, c, c].tolist() == pytest.approx([D - R] * 2, abs=5e-3)
    towards_camera = cams.c2w[:, :3, 3] / D
    assert ((out.normal[:, :, c, c] * towards_camera).sum(-1) > 0.999).all()
    assert torch.allclose(out.rgb[:, :, c, c], torch.tensor([0.9, 0.1, 0.3]).expand(2, 3), atol=1e-3)
    background_px = out.rgb.permute(0, 2, 3, 1)[outside]
    assert torch.allclose(background_px, torch.tensor([0.2, 0.4, 0.6]).expand_as(background_px), atol=1e-2)
    assert out.normal.permute(0, 2, 3, 1)[outside].norm(dim=-1).max() < 0.01


def test_default_volsdf_depth_and_white_background() -> None:
    """Defaults (inv_std 30): depth within ~beta/2 of the surface, white where empty."""
    cams = cameras([0.0], [0.0], size=33)
    out = VolumeRenderer().eval()(SphereField([R]), cams)
    assert out.depth[0, 0, 16, 16].item() == pytest.approx(D - R, abs=0.02)
    assert torch.allclose(out.rgb[0, :, 0, 0], torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("activation", ["softplus", "trunc_exp"])
def test_nerf_constant_density_opacity(activation: str) -> None:
    sigma = 2.0
    cams = cameras([20.0], [45.0], size=33)
    renderer = VolumeRenderer(density="nerf", nerf_density_activation=activation).eval()
    out = renderer(BallDensity(sigma, activation), cams)
    miss = D * torch.sin(ray_angle(cams)[0])  # closest approach of each ray to the centre
    chord = 2.0 * torch.sqrt((R**2 - miss.square()).clamp(min=0.0))
    expected = 1.0 - torch.exp(-sigma * chord)
    assert (out.opacity[0, 0] - expected).abs().max() < 0.02
    assert out.opacity[0, 0, 16, 16].item() == pytest.approx(1.0 - math.exp(-sigma * 2 * R), abs=0.01)


def test_composite_weights_closed_form() -> None:
    t = torch.linspace(0.5, 1.5, 101)[:-1]  # samples every 0.01, last interval runs to far=1.5
    weights, transmittance = composite_weights(torch.full_like(t, 3.0), t, far=1.5)
    assert weights.sum().item() == pytest.approx(1.0 - math.exp(-3.0), abs=1e-5)
    assert torch.allclose(transmittance, torch.exp(-3.0 * (t - 0.5)), atol=1e-5)


def test_densities_closed_form_and_finite_at_extremes() -> None:
    sdf = torch.tensor([-1e4, -0.1, 0.0, 0.1, 1e4], requires_grad=True)
    sigma = volsdf_density(sdf, inv_std=30.0)
    expected = 30.0 * torch.tensor([1.0, 1 - 0.5 * math.exp(-3.0), 0.5, 0.5 * math.exp(-3.0), 0.0])
    assert torch.allclose(sigma, expected, atol=1e-4)
    sigma.sum().backward()
    raw = torch.tensor([-100.0, 0.0, 100.0], requires_grad=True)
    dens = trunc_exp(raw)
    dens.sum().backward()
    assert torch.isfinite(sdf.grad).all() and torch.isfinite(dens).all() and torch.isfinite(raw.grad).all()


def test_sample_pdf_follows_weights() -> None:
    bins = torch.linspace(0.0, 1.0, 11)[None]
    weights = torch.zeros(1, 10)
    weights[0, 3] = 1.0
    samples = sample_pdf(bins, weights, 64, deterministic=True, blur=False)
    assert samples.min() >= 0.3 - 1e-4 and samples.max() <= 0.4 + 1e-4
    empty = sample_pdf(bins, torch.zeros(1, 10), 10, deterministic=True)  # degrades to uniform quantiles
    assert torch.allclose(empty, torch.linspace(0.05, 0.95, 10)[None], atol=1e-4)


def test_importance_sampling_improves_thin_surface() -> None:
    cams = cameras([0.0], [0.0], size=20)
    shell = SphereField([R], shell=0.01)  # a 2 cm thick spherical shell at the default inv_std 30
    reference = VolumeRenderer(num_samples=2048, num_importance=0).eval()(shell, cams)

    def error(samples: int, importance: int) -> tuple[float, float]:
        out = VolumeRenderer(num_samples=samples, num_importance=importance).eval()(shell, cams)
        return ((out.opacity - reference.opacity).abs().mean().item(),
                (out.depth - reference.depth).abs().mean().item())

    (op_strat, depth_strat), (op_imp, depth_imp) = error(16, 0), error(16, 48)
    assert op_imp < 0.3 * op_strat and depth_imp < 0.3 * depth_strat
    # sharp solid sphere: 16 + 48 importance beats 64 stratified samples at equal query count
    sharp = SphereField([R])
    ref = VolumeRenderer(volsdf_inv_std=200.0, num_samples=2048, num_importance=0).eval()(sharp, cams)
    depth_err = {k: (VolumeRenderer(volsdf_inv_std=200.0, num_samples=s, num_importance=i).eval()(sharp, cams).depth
                     - ref.depth).abs().mean().item() for k, (s, i) in {"imp": (16, 48), "strat": (64, 0)}.items()}
    assert depth_err["imp"] < 0.5 * depth_err["strat"]


def test_eikonal_and_other_regularizers() -> None:
    cams = cameras([0.0], [0.0], size=17)
    renderer = VolumeRenderer(num_samples=32, num_importance=16).eval()
    names = ("eikonal", "sparsity", "opaque")
    exact = renderer(SphereField([R, 0.3]), cams.index([0, 0]), regularizers=names).regularizers
    assert set(exact) == set(names) and all(v.shape == (2,) for v in exact.values())
    assert exact["eikonal"].max() < 1e-3  # only FD curvature error near the sphere centre
    scaled = renderer(SphereField([R, 0.3], scale=2.0), cams.index([0, 0]), regularizers=names).regularizers
    assert torch.allclose(scaled["eikonal"], torch.ones(2), atol=0.02)  # (|2 grad| - 1)^2 = 1
    assert ((exact["sparsity"] >= 0.1) & (exact["sparsity"] <= math.sqrt(1.01))).all()
    assert ((exact["opaque"] >= 0) & (exact["opaque"] <= MAX_OPAQUE)).all()
    with pytest.raises(ValueError, match="eikonal"):
        VolumeRenderer(density="nerf")(BallDensity(1.0, "softplus"), cams, regularizers=("eikonal",))
    with pytest.raises(ValueError, match="unknown regularizers"):
        renderer(SphereField([R]), cams, regularizers=("tv",))


def test_gradients_reach_field_parameters() -> None:
    field = SphereField([R])
    renderer = VolumeRenderer(num_samples=24, num_importance=8).train()
    out = renderer(field, cameras([10.0], [30.0], size=16), compute_normals=True,
                   regularizers=("eikonal", "sparsity", "opaque"), rng=torch.Generator().manual_seed(0))
    loss = out.rgb.mean() + out.normal.mean() + sum(v.sum() for v in out.regularizers.values())
    loss.backward()
    for p in (field.radius, field.color):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    field.zero_grad()
    renderer(field, cameras([10.0], [30.0], size=16)).opacity.sum().backward()
    assert field.radius.grad.item() > 0  # a bigger sphere covers more pixels


def test_eval_deterministic_and_train_jitter_reproducible() -> None:
    field, cams = SphereField([R]), cameras([0.0], [0.0], size=12)
    renderer = VolumeRenderer(num_samples=16, num_importance=8)
    renderer.eval()
    assert torch.equal(renderer(field, cams).rgb, renderer(field, cams).rgb)
    renderer.train()

    def render(seed: int) -> Tensor:
        return renderer(field, cams, rng=torch.Generator().manual_seed(seed)).depth

    assert torch.equal(render(3), render(3))
    assert not torch.equal(render(3), render(4))


def test_batched_fields_match_separate_renders_in_one_query_per_stage() -> None:
    radii, colors = [0.4, 0.6], [[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]]
    cams = cameras([0.0, 20.0, -5.0, 40.0], [0.0, 90.0, 200.0, -60.0], size=10)
    renderer = VolumeRenderer(num_samples=16, num_importance=8).eval()
    kwargs = dict(compute_normals=True, regularizers=("eikonal", "sparsity", "opaque"))
    batched_field = SphereField(radii, colors)
    batched = renderer(batched_field, cams, **kwargs)
    # proposal stage: V*H*W*S points per field; final stage: 7x (samples + 6 FD stencil points)
    assert batched_field.calls == [(2, 2 * 100 * 16, 3), (2, 7 * 2 * 100 * 24, 3)]
    for b in range(2):
        single = renderer(SphereField(radii[b:b + 1], colors[b:b + 1]), cams.index([2 * b, 2 * b + 1]), **kwargs)
        for key in ("rgb", "opacity", "depth", "normal"):
            assert torch.allclose(getattr(batched, key)[2 * b:2 * b + 2], getattr(single, key), atol=1e-5), key
        for name, value in single.regularizers.items():
            assert torch.allclose(batched.regularizers[name][b:b + 1], value, atol=1e-6), name


def test_chunked_render_matches_unchunked() -> None:
    field, cams = SphereField([0.4, 0.6]), cameras([0.0, 10.0], [0.0, 45.0], size=9)
    kwargs = dict(compute_normals=True, regularizers=("eikonal", "sparsity"))
    full = VolumeRenderer(num_samples=16, num_importance=8).eval()(field, cams, **kwargs)
    chunked = VolumeRenderer(num_samples=16, num_importance=8, chunk_rays=50).eval()(field, cams, **kwargs)
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.allclose(getattr(full, key), getattr(chunked, key), atol=1e-6), key
    assert torch.allclose(full.regularizers["eikonal"], chunked.regularizers["eikonal"], atol=1e-7)


def test_backgrounds() -> None:
    bg = RandomColorBackground(p=1.0, color=(0.0, 0.0, 0.0))
    drawn = bg(6, 4, 5, rng=torch.Generator().manual_seed(0), training=True)
    assert drawn.shape == (6, 3, 4, 5) and (drawn.std(dim=(2, 3)) == 0).all()  # one colour per view
    assert drawn[:, :, 0, 0].std(dim=0).min() > 0  # ... different across views
    assert torch.equal(drawn, bg(6, 4, 5, rng=torch.Generator().manual_seed(0), training=True))
    assert (bg(6, 4, 5, training=False) == 0).all()  # eval: always the solid colour
    assert (RandomColorBackground(p=0.0)(3, 2, 2, training=True) == 1).all()
    half = RandomColorBackground(p=0.5)(4000, 1, 1, rng=torch.Generator().manual_seed(1), training=True)
    assert (half != 1).any(dim=1).float().mean().item() == pytest.approx(0.5, abs=0.04)
    # through the renderer: an empty field shows exactly the background, per view in training
    empty, cams = SphereField([-1.0, -1.0]), cameras([0.0, 0.0], [0.0, 90.0], size=4)
    renderer = VolumeRenderer(num_samples=8, num_importance=0)
    out = renderer.train()(empty, cams, background=bg, rng=torch.Generator().manual_seed(5))
    assert out.opacity.max() < 1e-6 and (out.rgb.std(dim=(2, 3)) < 1e-6).all()
    assert (out.rgb[:, :, 0, 0] - out.rgb[0, :, 0, 0]).abs().max() > 0  # views got different colours
    assert (renderer.eval()(empty, cams, background=bg).rgb.abs() < 1e-6).all()


def test_rejects_mismatched_density_and_camera_count() -> None:
    with pytest.raises(ValueError, match="volsdf"):
        VolumeRenderer(density="nerf")(SphereField([R]), cameras([0.0], [0.0], size=4))
    with pytest.raises(ValueError, match="multiple"):
        VolumeRenderer()(SphereField([R, R]), cameras([0.0, 0.0, 0.0], [0.0, 1.0, 2.0], size=4))


def test_auto_density_follows_the_field_kind() -> None:
    """renderer.density=auto (the config's): VolSDF for SDF fields, NeRF for density fields, bit for bit
    what the explicit setting renders; an explicit setting that disagrees with the field still fails."""
    cams = cameras([20.0], [30.0], size=6)
    sdf, density = SphereField([R]), BallDensity(2.0, "softplus")
    for field, explicit in ((sdf, "volsdf"), (density, "nerf")):
        auto = VolumeRenderer(num_samples=16, num_importance=8).eval()
        assert auto.density == "auto" and auto.density_for(field) == explicit
        assert torch.equal(auto(field, cams).rgb,
                           VolumeRenderer(num_samples=16, num_importance=8, density=explicit).eval()(field, cams).rgb)
    with pytest.raises(ValueError, match="nerf"):
        VolumeRenderer(density="volsdf")(density, cams)
    with pytest.raises(ValueError, match="auto"):
        VolumeRenderer(density="sdf")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    field, cams = SphereField([R]), cameras([10.0], [30.0], size=16)
    renderer = VolumeRenderer(num_samples=32, num_importance=16).eval()
    cpu = renderer(field, cams, compute_normals=True)
    gpu = renderer(field.cuda(), cams.to("cuda"), compute_normals=True)
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.allclose(getattr(cpu, key), getattr(gpu, key).cpu(), atol=1e-4), key


def test_bounding_sphere_clips_rays_without_changing_the_image() -> None:
    """Samples restricted to the bounding sphere: same image in the limit, better at few samples."""
    cams = cameras([0.0, 30.0], [0.0, 90.0], size=20)
    sphere = SphereField([R, R])
    reference = VolumeRenderer(num_samples=4096, num_importance=0).eval()(sphere, cams)
    bounded = VolumeRenderer(num_samples=4096, num_importance=0, bound_radius=0.8).eval()(sphere, cams)
    assert (bounded.opacity - reference.opacity).abs().max() < 2e-3
    assert (bounded.rgb - reference.rgb).abs().max() < 2e-3

    def depth_error(renderer: VolumeRenderer) -> float:
        return (renderer.eval()(sphere, cams).depth - reference.depth).abs().mean().item()

    # the same 16 stratified samples spent on a 1.6-long chord instead of the 3.9-long [near, far]
    assert depth_error(VolumeRenderer(num_samples=16, num_importance=0, bound_radius=0.8)) < \
        0.5 * depth_error(VolumeRenderer(num_samples=16, num_importance=0))


def test_ray_bounds_of_missing_rays_are_empty() -> None:
    renderer = VolumeRenderer(bound_radius=0.5)
    origins = torch.tensor([[0.0, 0.0, 2.0], [0.0, 2.0, 2.0]])
    directions = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])  # through the centre; missing
    near, far = renderer.ray_bounds(origins, directions)
    assert torch.allclose(near[0], torch.tensor([1.5])) and torch.allclose(far[0], torch.tensor([2.5]))
    assert near[1].item() == far[1].item()


@pytest.mark.parametrize("training", [False, True])
def test_empty_space_skipping_matches_the_full_path(training: bool) -> None:
    """skip_empty_space drops samples in empty space and behind opaque surfaces before the
    gradient pass; the image and the field-parameter gradients equal the full path's."""
    radii, colors = [0.25, 0.35], [[0.9, 0.1, 0.3], [0.2, 0.7, 0.4]]  # empty space around them
    cams = cameras([0.0, 20.0, -5.0, 40.0], [0.0, 90.0, 200.0, -60.0], size=16)
    results = {}
    for skip in (False, True):
        field = SphereField(radii, colors)
        renderer = VolumeRenderer(num_samples=32, num_importance=16, bound_radius=1.0,
                                  skip_empty_space=skip).train(training)
        out = renderer(field, cams, compute_normals=True, regularizers=("sparsity",),
                       rng=torch.Generator().manual_seed(0))
        grads, color_grad = [], None
        for loss in (out.rgb.square().sum(), out.depth.sum(), out.normal.sum()):
            field.zero_grad()
            loss.backward(retain_graph=True)
            grads.append(field.radius.grad.clone())
            color_grad = field.color.grad.clone() if color_grad is None else color_grad
        results[skip] = (out, grads, color_grad, field.calls)
    (full, r0, c0, calls0), (skip, r1, c1, calls1) = results[False], results[True]
    for key in ("rgb", "opacity", "depth", "normal"):
        # rgb/opacity measured <= 2e-7 off (dropped samples composite the proposal's values);
        # normals of dropped samples are zero, and their weights < 1e-4
        atol = 1e-4 if key == "normal" else 1e-5
        torch.testing.assert_close(getattr(skip, key), getattr(full, key), rtol=0, atol=atol, msg=key)
    for g1, g0 in zip(r1, r0):  # d(rgb^2), d(depth), d(normal) / d(radius); measured <= 6e-4 relative
        torch.testing.assert_close(g1, g0, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(c1, c0, rtol=2e-3, atol=1e-3)
    # Same proposal pass; the gradient pass queries (padded to the fuller field) ~half the samples.
    assert calls1[0] == calls0[0]
    assert calls1[1][1] < 0.6 * calls0[1][1]


def test_kept_first_is_the_stable_sort_of_the_dropped() -> None:
    """kept_first (one nonzero per row on CPU) packs exactly the indices the stable argsort of ~keep does: each
    row's kept samples in order, then its dropped ones in order, cut to k; rows that keep all, none or fewer
    than k, and k = 0."""
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 257, generator=gen) < torch.tensor([0.0, 0.05, 0.3, 0.9, 1.0, 0.5])[:, None]
    for k in (0, 1, int(keep.sum(1).max()), 257):
        expected = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
        assert torch.equal(kept_first(keep, k), expected), k
    one = torch.rand(1, 100_000, generator=gen) < 0.2  # an evaluation chunk: one field, many samples
    k = int(one.sum())
    assert torch.equal(kept_first(one, k), one[0].nonzero().T)


class GeometrySphereField(SphereField):
    """SphereField with the optional geometry-only query (counted apart from ``query``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.geometry_calls: list[tuple[int, ...]] = []

    def query_geometry(self, points: Tensor) -> Tensor:
        self.geometry_calls.append(tuple(points.shape))
        return self.scale * (torch.sqrt(points.square().sum(-1) + 1e-12) - self.radius[:, None])


@pytest.mark.parametrize("training", [False, True])
def test_proposal_without_albedo_queries_geometry_only(training: bool) -> None:
    """proposal_albedo=False: the no-grad proposal calls query_geometry; skipped samples composite black, which
    changes the image by less than the skipped samples' weights; densities, opacity and depth are unchanged.
    Without skipping the proposal's albedo is never used, so it is not computed, and the image is unchanged."""
    radii, colors = [0.25, 0.35], [[0.9, 0.1, 0.3], [0.2, 0.7, 0.4]]
    cams = cameras([0.0, 20.0, -5.0, 40.0], [0.0, 90.0, 200.0, -60.0], size=16)

    def render(field_type, skip: bool, proposal_albedo: bool):
        field = field_type(radii, colors)
        renderer = VolumeRenderer(num_samples=32, num_importance=16, bound_radius=1.0, skip_empty_space=skip,
                                  proposal_albedo=proposal_albedo).train(training)
        out = renderer(field, cams, rng=torch.Generator().manual_seed(0))
        out.rgb.square().sum().backward()
        return out, field

    (with_albedo, f1), (black, f2) = render(GeometrySphereField, True, True), render(GeometrySphereField, True, False)
    assert f1.geometry_calls == [] and len(f1.calls) == 2  # proposal + gradient pass through query
    assert len(f2.geometry_calls) == 1 and len(f2.calls) == 1 and f2.geometry_calls[0] == f1.calls[0]
    assert torch.equal(black.opacity, with_albedo.opacity) and torch.equal(black.depth, with_albedo.depth)
    difference = (black.rgb - with_albedo.rgb).abs().max().item()
    assert 0.0 < difference < 1e-4  # the skipped samples' weights: < 1e-5 each, < 1e-4 behind the surface
    torch.testing.assert_close(f2.radius.grad, f1.radius.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(f2.color.grad, f1.color.grad, rtol=1e-3, atol=1e-5)

    (plain, p1), (geometry_only, p2) = render(SphereField, False, True), render(GeometrySphereField, False, True)
    assert len(p2.geometry_calls) == 1 and len(p2.calls) == 1  # no skipping: the albedo is not needed
    assert torch.equal(geometry_only.rgb, plain.rgb)
    assert torch.equal(p2.radius.grad, p1.radius.grad)


def test_empty_space_skipping_is_off_by_default_and_off_for_eikonal() -> None:
    assert VolumeRenderer().skip_empty_space is False
    field, cams = SphereField([R]), cameras([0.0], [0.0], size=8)
    renderer = VolumeRenderer(num_samples=16, num_importance=8, skip_empty_space=True).eval()
    renderer(field, cams, regularizers=("eikonal",))
    assert field.calls[1] == (1, 7 * 64 * 24, 3)  # every sample and its stencil: no skipping


def test_empty_space_skipping_on_a_density_field() -> None:
    cams = cameras([0.0, 30.0], [0.0, 120.0], size=12)
    outs, calls = [], []
    for skip in (False, True):
        field = BallDensity(8.0, "softplus")
        field.calls = []
        query = field.query
        field.query = lambda p, q=query, f=field: (f.calls.append(tuple(p.shape)), q(p))[1]
        renderer = VolumeRenderer(num_samples=32, num_importance=16, density="nerf", bound_radius=1.0,
                                  skip_empty_space=skip).eval()
        outs.append(renderer(field, cams))
        outs[-1].opacity.sum().backward()
        outs[-1] = (outs[-1], field.raw_inside.grad.clone())
        calls.append(field.calls[1][1])
    (full, g0), (skip, g1) = outs
    for key in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(getattr(skip, key), getattr(full, key), rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-5)
    assert calls[1] < 0.6 * calls[0]
