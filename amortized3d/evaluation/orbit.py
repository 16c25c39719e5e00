"""Orbit rendering shared by every evaluation path (end of training, scripts/evaluate.py,
scripts/export.py, validation callbacks, benchmarks): the evaluation cameras, sample budget and
optional baked grid, and one prompt's turntable through them."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from amortized3d.cameras import CameraBatch, orbit_cameras
from amortized3d.slugs import slugify  # noqa: F401  (re-exported: callers import it from here)


@torch.no_grad()
def render_turntable(model, prompt: str, cameras: CameraBatch, bake: tuple[int, float] | None,
                     renderer=None) -> Tensor:
    """[V,3,H,W] renders of one prompt by an :class:`amortized3d.model.AmortizedModel`, in eval
    mode for the call (the renderer chunks rays)."""
    with model.evaluating():
        return model.render([prompt], cameras, bake=bake, renderer=renderer).rgb.cpu()


def evaluation_renderer(renderer, cfg: Any):
    """The training renderer with the evaluation sample budget (``evaluation.num_samples``...)."""
    samples, importance = cfg.get("num_samples"), cfg.get("num_importance")
    if samples is None and importance is None:
        return renderer
    out = copy.copy(renderer)
    out.num_samples = int(samples if samples is not None else renderer.num_samples)
    out.num_importance = int(importance if importance is not None else renderer.num_importance)
    return out.eval()


def bake_settings(cfg: Any, renderer) -> tuple[int, float] | None:
    """(grid resolution, bound) for evaluation renders, or None to query the field directly."""
    if not cfg.get("bake_resolution"):
        return None
    return int(cfg.bake_resolution), float(renderer.bound_radius or cfg.get("bake_bound", 1.0))


@dataclass
class Orbit:
    """Where evaluation renders come from: cameras, renderer (evaluation budget) and baking."""

    cameras: CameraBatch
    renderer: Any
    bake: tuple[int, float] | None
    settings: dict

    @classmethod
    def from_settings(cls, settings: Any, training_renderer) -> "Orbit":
        """``settings``: an ``evaluation:`` / ``render:`` node (num_views, resolution, elevation_deg,
        distance, fovy_deg, bake_resolution, num_samples, num_importance)."""
        cameras = orbit_cameras(settings.num_views, settings.resolution, settings.elevation_deg, settings.distance,
                                settings.fovy_deg)
        return cls(cameras, evaluation_renderer(training_renderer, settings), bake_settings(settings, training_renderer),
                   {k: settings.get(k) for k in ("resolution", "elevation_deg", "distance", "fovy_deg")})

    def render(self, model, prompt: str) -> Tensor:
        return render_turntable(model, prompt, self.cameras, self.bake, self.renderer)

    def describe(self) -> dict:
        """What metrics.json records about the evaluation views."""
        return {"num_views": len(self.cameras), **self.settings, "baked_grid": self.bake[0] if self.bake else None,
                "samples": [self.renderer.num_samples, self.renderer.num_importance]}
