"""The oracle's reference renders (end-of-run evaluation) are cached on disk, keyed by what makes them."""
from __future__ import annotations

import torch

from amortized3d.cameras import orbit_cameras
from amortized3d.checkpoint_io import save_torch
from amortized3d.evaluation.oracle import oracle_references
from amortized3d.rendering import VolumeRenderer
from amortized3d.scenes.references import get_world

PROMPTS = ["a red cube", "a blue torus"]


def _renderer(**kw) -> VolumeRenderer:
    return VolumeRenderer(num_samples=8, num_importance=8, bound_radius=0.6, **kw)


def test_oracle_references_are_cached_and_equal_to_a_fresh_render(tmp_path):
    world, cams = get_world("primitives"), orbit_cameras(3, 8)
    fresh, ids = oracle_references(world, PROMPTS, cams, _renderer(), bake=(16, 0.6))
    cached, cached_ids = oracle_references(world, PROMPTS, cams, _renderer(), bake=(16, 0.6), cache_dir=str(tmp_path))
    assert torch.equal(fresh, cached) and torch.equal(ids, cached_ids)
    files = list((tmp_path / "references").glob("primitives-oracle_reference-*.pt"))
    assert len(files) == 1
    # The second call reads the file (here overwritten with other valid images), it does not re-render.
    save_torch(cached * 0.5, files[0])
    again, _ = oracle_references(world, PROMPTS, cams, _renderer(), bake=(16, 0.6), cache_dir=str(tmp_path))
    assert torch.equal(again, cached * 0.5)


def test_oracle_cache_key_follows_renderer_bake_cameras_and_objects(tmp_path):
    world, cams = get_world("primitives"), orbit_cameras(3, 8)
    calls = [dict(renderer=_renderer(), bake=(16, 0.6), cams=cams, prompts=PROMPTS),
             dict(renderer=_renderer(skip_empty_space=True), bake=(16, 0.6), cams=cams, prompts=PROMPTS),
             dict(renderer=_renderer(), bake=None, cams=cams, prompts=PROMPTS),
             dict(renderer=_renderer(), bake=(16, 0.6), cams=orbit_cameras(3, 8, elevation_deg=20.0), prompts=PROMPTS),
             dict(renderer=_renderer(), bake=(16, 0.6), cams=cams, prompts=PROMPTS[:1])]
    for c in calls:
        oracle_references(world, c["prompts"], c["cams"], c["renderer"], bake=c["bake"], cache_dir=str(tmp_path))
    assert len(list((tmp_path / "references").glob("*.pt"))) == len(calls)


def test_damaged_oracle_cache_is_re_rendered(tmp_path):
    world, cams = get_world("primitives"), orbit_cameras(2, 8)
    first, _ = oracle_references(world, PROMPTS, cams, _renderer(), cache_dir=str(tmp_path))
    (path,) = (tmp_path / "references").glob("*.pt")
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    second, _ = oracle_references(world, PROMPTS, cams, _renderer(), cache_dir=str(tmp_path))
    assert torch.equal(first, second)
