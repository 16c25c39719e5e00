"""The ground-truth world is its own config node, chosen by the data config and handed to what needs it."""
from __future__ import annotations

import hydra
import pytest

from amortized3d.run_guard import ConfigError
from amortized3d.scenes.primitives import PrimitivesWorld
from amortized3d.scenes.world import build_world
from amortized3d.train import train
from conftest import compose


def test_data_primitives_selects_the_world_and_every_consumer_gets_that_node(tmp_path):
    cfg = compose(tmp_path, tmp_path)
    world = build_world(cfg)
    assert world == PrimitivesWorld() and world.bound == cfg.prior.scene_bound == cfg.renderer.bound_radius
    # the analytic prior and the validation metrics get the world node itself, not the prior's attribute
    assert cfg.prior.model.world == cfg.world
    assert hydra.utils.instantiate(cfg.callbacks.validation_metrics).world == world


def test_a_world_less_run_with_the_analytic_prior_fails_before_any_work(tmp_path, cache_dir):
    cfg = compose(tmp_path, cache_dir, "~world")
    assert build_world(cfg) is None
    with pytest.raises(ConfigError, match="world"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoint_configs_without_a_world_node_fall_back_to_the_priors_name():
    """Checkpoints written before the world node existed named it in prior.model.world."""
    legacy = {"prior": {"model": {"_target_": "amortized3d.scenes.references.build_analytic_prior",
                                  "world": "primitives"}}}
    assert build_world(legacy) == PrimitivesWorld()
    assert build_world({"prior": {"model": {"_target_": "amortized3d.priors.stable_diffusion.X"}}}) is None
