"""The run's ground-truth world, built from its own config node (``configs/world/*.yaml``).

The world is what the analytic prior's references, the oracle scorer, the validation metrics and the
end-of-training evaluation share; each gets it from here (or as ``${world}`` in its config), none
from the prior. ``world: null`` (text corpora) means no ground truth: nothing oracle-based runs.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from amortized3d.scenes.primitives import PrimitivesWorld


def world_config(cfg: DictConfig | dict) -> Any:
    """The ``world`` node of a run config; for configs written before it existed (checkpoints), the
    world that the analytic prior named (``prior.model.world``), else None."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if "world" in cfg:
        return cfg.world
    model = OmegaConf.select(cfg, "prior.model", default=None) or {}
    if str(model.get("_target_", "")).endswith("build_analytic_prior"):
        return model.get("world", "primitives")
    return None


def build_world(cfg: DictConfig | dict) -> PrimitivesWorld | None:
    """The world of a composed run config (or a checkpoint's stored one), or None without one."""
    import hydra

    from amortized3d.scenes.references import get_world

    node = world_config(cfg)
    if node is None:
        return None
    if isinstance(node, str):
        return get_world(node)
    return hydra.utils.instantiate(node)
