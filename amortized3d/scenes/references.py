"""Reference renders of a ground-truth world, rendered by the project's own renderer.

They define the analytic prior (its finite image set) and the oracle metrics. Renders are
cached on disk keyed by everything that determines them, and written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from amortized3d.cameras import CameraBatch, CameraRanges, make_cameras
from amortized3d.checkpoint_io import CheckpointError, load_torch, save_torch
from amortized3d.priors.analytic import AnalyticPrior, ReferenceSet
from amortized3d.rendering import SolidBackground, VolumeRenderer
from amortized3d.rendering.baked import BakedField
from amortized3d.scenes.open_world import OpenPrimitivesWorld
from amortized3d.scenes.primitives import PrimitivesWorld

log = logging.getLogger(__name__)
WORLDS = {"primitives": PrimitivesWorld, "primitives_open": OpenPrimitivesWorld}
# Ground truth deserves a finer sample budget than the generators' training renders. Samples are
# confined to the world's bound (the sphere holding every object, radius 0.45): mean abs error 2.3e-4
# against a 512+128-sample render, lower than 96+48 samples over [0.1, 4] and ~20% cheaper.
REFERENCE_SAMPLES = {"num_samples": 64, "num_importance": 32, "chunk_rays": 32768}


def get_world(name: str) -> PrimitivesWorld:
    """The world registered as ``name`` with its default settings (configs/world/<name>.yaml builds it too)."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; valid worlds: {sorted(WORLDS)}")
    return WORLDS[name]()


def reference_renderer_settings(world: PrimitivesWorld) -> dict[str, Any]:
    """The reference renderer's arguments: its sample budget inside the world's bound (part of the cache key)."""
    return {**REFERENCE_SAMPLES, "bound_radius": float(world.bound)}


def reference_cameras(num_objects: int, views_per_object: int, resolution: int, ranges: CameraRanges,
                      seed: int) -> CameraBatch:
    """Object-major cameras; each object's azimuths are evenly spaced (random offset) so every
    view bucket has references, the other parameters are uniform over the training ranges."""
    g = torch.Generator().manual_seed(seed)
    n = num_objects * views_per_object

    def uniform(lo_hi) -> Tensor:
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, generator=g)

    offset = torch.rand(num_objects, 1, generator=g)
    az = ((torch.arange(views_per_object)[None] + offset) / views_per_object).reshape(-1)
    az = ranges.azimuth_deg[0] + (ranges.azimuth_deg[1] - ranges.azimuth_deg[0]) * az
    return make_cameras(uniform(ranges.elevation_deg), az, uniform(ranges.distance), uniform(ranges.fovy_deg),
                        resolution)


@torch.no_grad()
def render_objects(world: PrimitivesWorld, object_ids: Tensor, cameras: CameraBatch, renderer: VolumeRenderer,
                   objects_per_chunk: int = 4, bake: tuple[int, float] | None = None) -> Tensor:
    """Renders [len(cameras),3,H,W]; cameras are object-major, ``len(cameras) // len(object_ids)`` each."""
    renderer = renderer.eval()
    views = len(cameras) // len(object_ids)
    out = []
    for start in range(0, len(object_ids), objects_per_chunk):
        ids = object_ids[start:start + objects_per_chunk]
        cams = cameras.index(slice(start * views, (start + len(ids)) * views))
        field = world.field(ids)
        if bake is not None:
            field = BakedField(field, resolution=bake[0], bound=bake[1], sphere=renderer.lookup_sphere())
        out.append(renderer(field, cams, background=SolidBackground()).rgb.cpu())
    return torch.cat(out)


def _cache_key(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _load_cached(path: Path, shape: tuple[int, ...]) -> Tensor | None:
    """The cached renders, or None (with a warning: they are rebuilt) when the file is damaged.

    The sha256 recorded in the file when it was written is checked on every load (one read of the
    file: ~1.5 GB/s; the default 64-view 32 px cache is 6 MB, a few ms)."""
    try:
        images = load_torch(path, what="reference cache", require_checksum=True)
    except CheckpointError as err:
        log.warning("%s; re-rendering the references", err)
        return None
    if not isinstance(images, Tensor) or tuple(images.shape) != shape:
        log.warning("reference cache %s holds %s, expected a tensor of shape %s; re-rendering the references",
                    path, tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__, shape)
        return None
    if not torch.isfinite(images).all():
        log.warning("reference cache %s holds %d non-finite values; re-rendering the references", path,
                    int((~torch.isfinite(images)).sum()))
        return None
    return images


#: Modules whose code produces the cached renders: their source is part of every cache key, so a change
#: to the renderer or the world re-renders instead of reading stale images.
RENDER_SOURCES = ("rendering/volume_renderer.py", "rendering/densities.py", "rendering/sampling.py",
                  "rendering/baked.py", "rendering/backgrounds.py", "scenes/primitives.py", "scenes/open_world.py",
                  "cameras.py")


def _render_source_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in RENDER_SOURCES:
        path = root / name
        h.update(name.encode() + (path.read_bytes() if path.exists() else b""))
    return h.hexdigest()[:20]


def oracle_cache_path(world: PrimitivesWorld, payload: Mapping[str, Any], cache_dir: str | Path, what: str) -> Path:
    """``cache_dir/references/<world>-<what>-<key>.pt``; the key hashes ``payload`` and the render code's digest."""
    key = _cache_key({**payload, "source": _render_source_digest()})
    return Path(cache_dir) / "references" / f"{world.name}-{what.replace(' ', '_')}-{key}.pt"


def cached_renders(path: Path | None, shape: tuple[int, ...], render: Callable[[], Tensor], what: str) -> Tensor:
    """``render()`` [shape], cached at ``path`` (None: not cached); a damaged or mismatching file is
    re-rendered, a failed write only logged."""
    images = _load_cached(path, shape) if path is not None and path.exists() else None
    if images is None:
        images = render()
        if path is not None:
            try:
                save_torch(images, path)
            except OSError as err:  # e.g. a full disk: the renders are good, only the cache is lost
                log.warning("could not write the %s cache %s (%s); continuing with the renders in memory (they "
                            "will be rendered again next time)", what, path, err)
    return images


def build_reference_set(world: PrimitivesWorld | str, views_per_object: int, resolution: int,
                        camera: Mapping[str, Any], cache_dir: str | None, seed: int) -> ReferenceSet:
    world = get_world(world) if isinstance(world, str) else world
    ranges = CameraRanges(**{k: tuple(v) for k, v in dict(camera).items()})
    renderer = reference_renderer_settings(world)
    payload = {"version": 1, "world": repr(world), "views": views_per_object, "resolution": resolution,
               "ranges": ranges, "seed": seed, "renderer": renderer}
    path = Path(cache_dir) / "references" / f"{world.name}-{_cache_key(payload)}.pt" if cache_dir else None
    object_ids = torch.arange(world.num_objects)
    cameras = reference_cameras(world.num_objects, views_per_object, resolution, ranges, seed)
    shape = (len(cameras), 3, resolution, resolution)

    def render() -> Tensor:
        log.info("rendering %d reference views of %d objects", len(cameras), world.num_objects)
        return render_objects(world, object_ids, cameras, VolumeRenderer(**renderer))

    images = cached_renders(path, shape, render, "reference")
    return ReferenceSet(images=images, object_ids=object_ids.repeat_interleave(views_per_object),
                        view_ids=cameras.view_label_ids(), prompt_to_object=world.object_for_prompt,
                        object_sets=getattr(world, "object_sets", None))


def build_analytic_prior(world: PrimitivesWorld | str | None, views_per_object: int = 64, resolution: int = 32,
                         view_dependent: bool = True, camera: Mapping[str, Any] | None = None,
                         cache_dir: str | None = None, seed: int = 1234, data_std: float = 0.0) -> AnalyticPrior:
    """The CPU default prior: exact denoiser of ``world``'s reference renders (``data_std``: see AnalyticPrior).

    ``world``: the run's world node (``configs/world/*.yaml``, passed as ``prior.model.world: ${world}``)
    or a registered name. The prior does not keep it: whatever needs the ground truth gets the world itself.
    """
    if world is None:
        raise ValueError("the analytic prior needs a ground-truth world (world: null); use data=primitives")
    world = get_world(world) if isinstance(world, str) else world
    refs = build_reference_set(world, views_per_object, resolution, camera or {}, cache_dir, seed)
    return AnalyticPrior(refs, view_dependent=view_dependent, data_std=data_std)
