"""Export: turntable videos (mp4/gif) and marching-cubes meshes with vertex colours (obj/ply/glb).

Every writer goes through ``amortized3d.atomic.atomic_path`` (a temp file in the target directory,
fsync'ed, then ``os.replace``), so a run killed mid-export (preemption, OOM) never leaves a
truncated video or mesh that a later step or a human would mistake for a result.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Union

import numpy as np
import torch

from amortized3d.atomic import atomic_path
from amortized3d.rendering.densities import nerf_density

if TYPE_CHECKING:
    import trimesh

PathLike = Union[str, "os.PathLike[str]"]
FieldQuery = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
VIDEO_FORMATS = (".mp4", ".gif")
MESH_FORMATS = (".obj", ".ply", ".glb")


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """[T,3,H,W] or [T,H,W,3] (also 1 channel), floats in [0,1] or uint8 -> uint8 [T,H,W,3]."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4:
        raise ValueError(f"frames must be 4-D [T,3,H,W] or [T,H,W,3], got shape {tuple(array.shape)}")
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)  # channels-first -> channels-last
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"frames need 1 or 3 colour channels, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("frames contain NaN or inf; refusing to encode a broken render")
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def write_video(frames: torch.Tensor | np.ndarray, path: PathLike, fps: int = 30) -> Path:
    """Write frames as .mp4 (H.264, yuv420p) or .gif, atomically; return the path.

    H.264 with yuv420p needs even sizes, so odd heights/widths are padded by one replicated
    row/column instead of letting imageio resize (``macro_block_size=1``): a 32x32 or 33x33
    render is stored at its own resolution.
    """
    import imageio.v3 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ValueError(f"unsupported video format {path.suffix!r}; use one of {', '.join(VIDEO_FORMATS)}")
    array = to_uint8_frames(frames)
    with atomic_path(path, keep_suffix=True) as tmp:
        if suffix == ".mp4":
            _, h, w, _ = array.shape
            array = np.pad(array, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            iio.imwrite(tmp, array, plugin="FFMPEG", extension=".mp4", fps=fps, codec="libx264",
                        pixelformat="yuv420p", macro_block_size=1, quality=8)
        else:
            iio.imwrite(tmp, array, plugin="pillow", extension=".gif", duration=1000.0 / fps, loop=0)
    return path


def write_image(image: torch.Tensor | np.ndarray, path: PathLike) -> Path:
    """Write one [3,H,W] or [H,W,3] image (floats in [0,1] or uint8) as .png/.jpg, atomically."""
    import imageio.v3 as iio

    path = Path(path)
    array = to_uint8_frames(image[None])[0]
    with atomic_path(path, keep_suffix=True) as tmp:
        iio.imwrite(tmp, array, extension=path.suffix.lower())
    return path


def _grid_chunks(axis: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Grid points [<=chunk, 3] in C order (x slowest), built slab by slab: a 512^3 grid
    would not fit in memory as one tensor."""
    r = len(axis)
    slabs = max(1, chunk // (r * r))
    for start in range(0, r, slabs):
        slab = torch.meshgrid(axis[start:start + slabs], axis, axis, indexing="ij")
        yield from torch.stack(slab, dim=-1).reshape(-1, 3).split(chunk)


@torch.no_grad()
def _query(field_query: FieldQuery, chunks: Iterable[torch.Tensor], want_albedo: bool) -> torch.Tensor:
    """SDF [N] or albedo [N,3] of all chunks, concatenated on the CPU."""
    return torch.cat([field_query(points)[1 if want_albedo else 0].float().cpu() for points in chunks])


def extract_mesh(field_query: FieldQuery, resolution: int = 128, bound: float = 1.0, level: float = 0.0,
                 chunk: int = 65536, device: torch.device | str = "cpu") -> trimesh.Trimesh:
    """Marching cubes of an SDF field over [-bound, bound]^3, with albedo as vertex colours.

    ``field_query(points [M,3]) -> (sdf [M], albedo [M,3])`` with SDF negative inside and
    albedo in [0,1]; points are created on ``device``. The surface is the ``level`` set.
    PyMCubes treats larger values as inside, so it runs on -sdf: faces then wind
    counter-clockwise seen from outside (outward normals, positive volume). A shape that
    touches the grid boundary is cut open there; raise ``bound`` to keep it watertight.
    """
    import mcubes
    import trimesh

    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    r = resolution
    axis = torch.linspace(-bound, bound, r, device=device)
    sdf = _query(field_query, _grid_chunks(axis, chunk), want_albedo=False).reshape(r, r, r)
    lo, hi = float(sdf.min()), float(sdf.max())
    if not (lo < level < hi):
        raise ValueError(f"no surface at level {level}: the SDF ranges over [{lo:.4g}, {hi:.4g}] on the "
                         f"{r}^3 grid in [-{bound}, {bound}]^3 (empty or everywhere-inside field)")
    vertices, faces = mcubes.marching_cubes((-sdf).numpy().astype(np.float64), -level)
    vertices = vertices * (2.0 * bound / (r - 1)) - bound
    v = torch.as_tensor(vertices, dtype=torch.float32, device=device)
    albedo = _query(field_query, v.split(chunk), want_albedo=True)
    rgb = (albedo.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, dtype=np.uint8)], axis=1)
    return trimesh.Trimesh(vertices=vertices, faces=faces.astype(np.int64), vertex_colors=rgba, process=False)


def save_mesh(mesh: trimesh.Trimesh, path: PathLike) -> Path:
    """Save as .obj/.ply/.glb (format from the suffix, vertex colours kept), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise ValueError(f"unsupported mesh format {path.suffix!r}; use one of {', '.join(MESH_FORMATS)}")
    with atomic_path(path, keep_suffix=True) as tmp:
        mesh.export(tmp, file_type=suffix[1:])
    return path


def surface_query(field, density_threshold: float = 10.0, density_activation: str = "softplus") -> FieldQuery:
    """A one-field ``Field`` (batch 1) as ``points [M,3] -> (sdf-like [M], albedo [M,3])``.

    SDF fields are passed through (surface at 0). Density fields become
    ``threshold - density(raw)``: negative where the density exceeds ``density_threshold``.
    """
    if field.batch_size != 1:
        raise ValueError(f"export one field at a time, got a batch of {field.batch_size}")
    if field.kind not in ("sdf", "density"):
        raise ValueError(f"unknown field kind {field.kind!r}; expected 'sdf' or 'density'")

    def query(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        geometry, albedo = field.query(points[None])
        if field.kind == "density":
            geometry = density_threshold - nerf_density(geometry, density_activation)
        return geometry[0], albedo[0]

    return query


@torch.no_grad()
def export_prompt(model, prompt: str, path: PathLike, *, cameras=None, bake: tuple[int, float] | None = None,
                  renderer=None, fps: int = 30, mesh_resolution: int = 256, bound: float = 1.0,
                  level: float = 0.0, density_threshold: float = 10.0, chunk: int = 65536) -> Path:
    """Turntable video (.mp4/.gif; needs ``cameras``) or vertex-coloured mesh (.obj/.ply/.glb) of any
    prompt a prompt-amortized generator can condition on, seen in training or not, by an
    :class:`amortized3d.model.AmortizedModel` (in eval mode: a loaded one is)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_FORMATS:
        if cameras is None:
            raise ValueError("a video export needs cameras (e.g. amortized3d.cameras.orbit_cameras)")
        frames = model.render([prompt], cameras, bake=bake, renderer=renderer).rgb
        return write_video(frames, path, fps=fps)
    if suffix not in MESH_FORMATS:
        raise ValueError(f"unsupported export format {path.suffix!r}; use one of "
                         f"{', '.join(s[1:] for s in VIDEO_FORMATS + MESH_FORMATS)}")
    text_emb, ids = model.embed([prompt])
    field = model.generator(text_emb, ids)
    activation = getattr(model.renderer, "nerf_density_activation", "softplus")
    query = surface_query(field, density_threshold, activation)
    mesh = extract_mesh(query, resolution=mesh_resolution, bound=bound, level=level, chunk=chunk,
                        device=model.device)
    return save_mesh(mesh, path)
