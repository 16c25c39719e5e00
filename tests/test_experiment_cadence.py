"""Shipped experiments keep a bounded number of checkpoints and validations (issue 15 item 4):
at the papers' step counts, a checkpoint every 150 steps kept forever is thousands of files."""
from __future__ import annotations

import pytest

from conftest import CONFIGS, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_checkpoints_and_validations_are_bounded(tmp_path, cache_dir, experiment):
    cfg = compose(tmp_path, cache_dir, f"experiment={experiment}", "+data.prompt_index=0", tiny=False)
    steps, ckpt = int(cfg.trainer.max_steps), cfg.callbacks.checkpoint
    kept = steps // int(ckpt.every_n_train_steps) if int(ckpt.save_top_k) < 0 else int(ckpt.save_top_k)
    assert kept <= 20, f"{experiment}: keeps {kept} step checkpoints over {steps} steps"
    assert steps // int(cfg.trainer.val_check_interval) <= 200, f"{experiment}: validates every " \
                                                               f"{cfg.trainer.val_check_interval} of {steps} steps"


def test_derived_conv3d_experiments_differ_from_df415_only_where_they_say():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        base = hydra_compose("train", overrides=["experiment=asd_conv3d_df415"])
        cp = hydra_compose("train", overrides=["experiment=asd_conv3d_cp100k"])
    assert cp.data.corpus == "cp100k" and cp.trainer.max_steps == 300000 and cp.trainer.devices == 8
    assert cp.generator.channel_multiplier == 2 and base.generator.channel_multiplier == 1
    from omegaconf import OmegaConf

    # the same guidance config (its schedules interpolate max_steps, so compare it unresolved)
    assert cp.prior.model.perp_neg and OmegaConf.to_container(cp.guidance) == OmegaConf.to_container(base.guidance)
    assert cp.callbacks.checkpoint == base.callbacks.checkpoint
