"""Test-only score model for tests/test_toy_sd_slow.py: the LoRA-prediction-type bug, on purpose.

``LoRAScoreModel`` refuses a prediction type that differs from its base UNet's (a build error since
the fix). This subclass re-creates the old bug: a LoRA of an epsilon UNet whose output is read as v
(ProlificDreamer's v-prediction LoRA on SD-2.1-base). Instantiated by Hydra from
``prior.score_model._target_=toy_sd_helpers.MismatchedLoRAScoreModel``.
"""
from __future__ import annotations

from amortized3d.priors.lora_score_model import LoRAScoreModel

OTHER = {"epsilon": "v_prediction", "v_prediction": "epsilon"}


class MismatchedLoRAScoreModel(LoRAScoreModel):
    def attach(self, base_unet, base_prediction_type=None, base_name="the base UNet", share_weights=True) -> None:
        super().attach(base_unet, base_prediction_type, base_name, share_weights)
        self.prediction_type = OTHER[self.prediction_type]  # what the base predicts, read as the other
