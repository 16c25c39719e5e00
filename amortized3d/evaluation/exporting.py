"""``export(cfg)``: turntable video or mesh of any prompt from a checkpoint (scripts/export.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from amortized3d.corpora import check_prompt
from amortized3d.evaluation.checkpoint import load_model
from amortized3d.evaluation.evaluate import _device, render_settings
from amortized3d.evaluation.orbit import Orbit
from amortized3d.export import MESH_FORMATS, VIDEO_FORMATS, export_prompt
from amortized3d.generators.particles import rendering_particle
from amortized3d.slugs import slugify

log = logging.getLogger(__name__)
FORMATS = tuple(s[1:] for s in VIDEO_FORMATS + MESH_FORMATS)


def export(cfg: DictConfig) -> list[Path]:
    """Write ``cfg.prompt`` in every format of ``cfg.format`` (one name or a list) -> the paths."""
    check_prompt(cfg.prompt, f"export prompt={cfg.prompt!r}")  # before loading anything
    formats = [cfg.format] if isinstance(cfg.format, str) else list(cfg.format)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; valid formats: {', '.join(FORMATS)}")
    paths = [f"paths.{k}={cfg.paths[k]}" for k in ("cache_dir", "corpora_dir", "root_dir")]
    model, _, ckpt_cfg = load_model(cfg.ckpt_path, [*paths, *(cfg.get("overrides") or [])])
    model = model.to(_device(str(cfg.get("device", "auto"))))
    out_dir = Path(cfg.paths.output_dir)
    particle = cfg.get("particle")
    stem = cfg.get("name") or slugify(cfg.prompt) + ("" if particle is None else f"_particle{int(particle)}")
    written = []
    with rendering_particle(model.generator, particle):  # checked against generator.num_particles here
        for fmt in formats:
            written.append(_export_one(cfg, model, ckpt_cfg, out_dir / f"{stem}.{fmt}", fmt))
    return written


def _export_one(cfg: DictConfig, model, ckpt_cfg, path: Path, fmt: str) -> Path:
    """One format of ``cfg.prompt`` (a video through the evaluation orbit, or a marching-cubes mesh)."""
    if f".{fmt}" in VIDEO_FORMATS:
        orbit = Orbit.from_settings(render_settings(cfg, ckpt_cfg), model.renderer)
        export_prompt(model, cfg.prompt, path, cameras=orbit.cameras, bake=orbit.bake, renderer=orbit.renderer,
                      fps=int(cfg.fps))
    else:
        bound = cfg.mesh.bound if cfg.mesh.bound is not None else float(model.renderer.bound_radius or 1.0)
        export_prompt(model, cfg.prompt, path, mesh_resolution=int(cfg.mesh.resolution), bound=float(bound),
                      level=float(cfg.mesh.level), density_threshold=float(cfg.mesh.density_threshold),
                      chunk=int(cfg.mesh.chunk))
    log.info("wrote %s", path)
    return path
