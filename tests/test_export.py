"""Export: marching-cubes meshes of an analytic SDF, video round trips, atomic writes."""
from __future__ import annotations

import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

from amortized3d.export import extract_mesh, save_mesh, to_uint8_frames, write_video

RADIUS = 0.5
COLOUR = torch.tensor([0.2, 0.4, 0.8])


def sphere(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return points.norm(dim=-1) - RADIUS, COLOUR.expand(len(points), 3)


@pytest.fixture(scope="module")
def sphere_mesh() -> trimesh.Trimesh:
    return extract_mesh(sphere, resolution=96, bound=1.0, chunk=50_000)  # chunk not dividing 96^3


def test_sphere_mesh_geometry(sphere_mesh):
    mesh = sphere_mesh
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals: positive signed volume
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * RADIUS ** 3, rel=0.02)
    assert np.abs(mesh.center_mass).max() < 1e-3
    assert np.linalg.norm(mesh.vertices, axis=1) == pytest.approx(RADIUS, abs=0.01)
    # each face normal points away from the centre
    assert (np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center) > 0).all()


def test_sphere_mesh_colours_and_level(sphere_mesh):
    expected = [round(0.2 * 255), round(0.4 * 255), round(0.8 * 255), 255]
    assert (sphere_mesh.visual.vertex_colors == np.array(expected, dtype=np.uint8)).all()
    bigger = extract_mesh(sphere, resolution=48, level=0.1)  # the 0.1 level set is a radius-0.6 sphere
    assert np.linalg.norm(bigger.vertices, axis=1).mean() == pytest.approx(RADIUS + 0.1, abs=0.01)


def test_offset_sphere_lands_at_its_centre():
    # an off-centre shape catches axis-order mistakes; chunk < one 48x48 slab exercises splitting
    centre = torch.tensor([0.3, -0.2, 0.1])
    mesh = extract_mesh(lambda p: ((p - centre).norm(dim=-1) - 0.3, torch.zeros(len(p), 3)),
                        resolution=48, chunk=1000)
    assert mesh.is_watertight and mesh.volume > 0
    assert mesh.center_mass == pytest.approx(centre.numpy(), abs=2e-3)


def test_extract_mesh_rejects_empty_field():
    with pytest.raises(ValueError, match="no surface"):
        extract_mesh(lambda p: (torch.ones(len(p)), torch.zeros(len(p), 3)), resolution=8)


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".glb"])
def test_save_mesh_round_trip(sphere_mesh, tmp_path, suffix):
    path = save_mesh(sphere_mesh, tmp_path / "out" / f"sphere{suffix}")
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.vertices) == len(sphere_mesh.vertices) and len(loaded.faces) == len(sphere_mesh.faces)
    assert loaded.volume == pytest.approx(sphere_mesh.volume, rel=1e-4)
    assert (loaded.visual.vertex_colors[:, :3] == sphere_mesh.visual.vertex_colors[:, :3]).all()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def _frames() -> torch.Tensor:
    """10 frames, 32x32, channels-first: red constant, green ramping 0 -> 1 over time."""
    frames = torch.zeros(10, 3, 32, 32)
    frames[:, 0] = 0.9
    frames[:, 1] = torch.linspace(0, 1, 10)[:, None, None]
    return frames


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_round_trip(tmp_path, suffix):
    frames = _frames()
    path = write_video(frames, tmp_path / f"turntable{suffix}", fps=10)
    video = iio.imread(path, index=None)
    assert video.shape == (10, 32, 32, 3) and video.dtype == np.uint8
    expected = to_uint8_frames(frames).astype(float)
    assert np.abs(video.astype(float).mean(axis=(1, 2)) - expected.mean(axis=(1, 2))).max() < 8
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_video_accepts_layouts_and_odd_sizes(tmp_path):
    channels_last = np.random.default_rng(0).integers(0, 256, (4, 33, 31, 3), dtype=np.uint8)
    video = iio.imread(write_video(channels_last, tmp_path / "odd.mp4"), index=None)
    assert video.shape == (4, 34, 32, 3)  # padded to even, never resized
    gif = iio.imread(write_video(channels_last, tmp_path / "odd.gif"), index=None)
    assert gif.shape == (4, 33, 31, 3)
    assert to_uint8_frames(torch.full((2, 1, 4, 4), 2.0)).tolist() == np.full((2, 4, 4, 3), 255).tolist()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_video(torch.full((2, 3, 8, 8), float("nan")), tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="unsupported video format"):
        write_video(_frames(), tmp_path / "bad.avi")

    class Broken(trimesh.Trimesh):
        def export(self, *args, **kwargs):
            with open(args[0], "wb") as f:
                f.write(b"partial")
            raise RuntimeError("crash mid-write")

    triangle = dict(vertices=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], faces=[[0, 1, 2]])
    good = save_mesh(trimesh.Trimesh(**triangle), tmp_path / "m.obj").read_bytes()
    with pytest.raises(RuntimeError):
        save_mesh(Broken(**triangle), tmp_path / "m.obj")
    assert [p.name for p in tmp_path.iterdir()] == ["m.obj"]  # no temp file, old result intact
    assert (tmp_path / "m.obj").read_bytes() == good


class SphereField:
    """An analytic one-prompt ``Field``: a sphere as an SDF, or as a raw density (softplus^-1 of a
    density that crosses ``threshold`` exactly at the radius)."""

    def __init__(self, kind: str, radius: float = RADIUS):
        self.kind, self.radius = kind, radius

    @property
    def batch_size(self) -> int:
        return 1

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sdf = points.norm(dim=-1) - self.radius
        if self.kind == "density":  # density = 10 * exp(-sdf / 0.05): 10 on the surface
            density = 10.0 * torch.exp(-sdf / 0.05)
            geometry = density + torch.log(-torch.expm1(-density))  # inverse softplus
        else:
            geometry = sdf
        return geometry, COLOUR.expand(*points.shape[:-1], 3)


@pytest.mark.parametrize("kind", ["sdf", "density"])
def test_surface_of_an_analytic_sphere_field_has_the_right_volume(kind):
    from amortized3d.export import surface_query

    mesh = extract_mesh(surface_query(SphereField(kind), density_threshold=10.0), resolution=64, bound=1.0)
    assert mesh.is_watertight and mesh.volume > 0
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * RADIUS ** 3, rel=0.02)
    assert (mesh.visual.vertex_colors[:, :3] == np.array([51, 102, 204], dtype=np.uint8)).all()


def test_export_of_a_prompt_never_seen_in_training(tmp_path, cache_dir):
    from amortized3d.build import build_model, load_run_corpus
    from amortized3d.cameras import orbit_cameras
    from amortized3d.export import export_prompt
    from conftest import compose

    cfg = compose(tmp_path, cache_dir)
    model = build_model(cfg, load_run_corpus(cfg))  # what export builds: the model, no prior or guidance
    prompt = "a purple torus"  # held out of the training split
    assert prompt not in model.train_prompts
    mesh_path = export_prompt(model.eval(), prompt, tmp_path / "t.ply", mesh_resolution=32)
    mesh = trimesh.load(mesh_path, force="mesh")
    # the untrained generator's SDF starts as a 0.5 sphere (renderer config): about its volume
    assert 0.2 < (3 * mesh.volume / (4 * math.pi)) ** (1 / 3) < 0.8
    video = export_prompt(model, prompt, tmp_path / "t.gif", cameras=orbit_cameras(5, 16), fps=5)
    assert iio.imread(video, index=None).shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match="mp4, gif, obj, ply, glb"):
        export_prompt(model, prompt, tmp_path / "t.stl")
