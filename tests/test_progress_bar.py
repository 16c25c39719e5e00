"""The training progress bar names the step budget (the stock rich bar read "Epoch 0/-2" under max_steps)."""
from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT


def _description(max_steps: int, max_epochs: int | None) -> str:
    node = OmegaConf.load(ROOT / "configs" / "callbacks" / "default.yaml").progress_bar
    bar = instantiate(node)
    trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                        callbacks=[bar], accelerator="cpu", devices=1)
    bar.setup(trainer, None, "fit")
    return bar._get_train_description(0).strip()


def test_a_step_budgeted_run_shows_its_steps_not_a_negative_epoch_count():
    text = _description(300, None)
    assert "-2" not in text and "-1" not in text, text
    assert text == "Epoch 0 · 300 steps"


def test_an_epoch_budgeted_run_still_shows_its_epochs():
    assert _description(-1, 3) == "Epoch 0/2"
