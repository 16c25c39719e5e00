"""Timestep weightings w(t): what each name computes, and a bad name fails when the guidance is built."""
from __future__ import annotations

import pytest
import torch

from amortized3d.guidance.asd import ASDGuidance
from amortized3d.guidance.base import timestep_weight
from amortized3d.guidance.csd import CSDGuidance
from amortized3d.guidance.sds import SDSGuidance
from amortized3d.guidance.vsd import L2VSDGuidance, VSDGuidance
from amortized3d.priors.gaussian import GaussianPrior
from amortized3d.priors.schedule import NoiseSchedule
from amortized3d.priors.score_models import GaussianScoreModel


def _prior() -> GaussianPrior:
    return GaussianPrior(torch.zeros(1, 2), torch.eye(2)[None], ["p"])


BUILDERS = {
    "sds": lambda w: SDSGuidance(_prior(), weighting=w),
    "csd": lambda w: CSDGuidance(_prior(), weighting=w),
    "asd": lambda w: ASDGuidance(_prior(), weighting=w),
    "vsd": lambda w: VSDGuidance(_prior(), GaussianScoreModel(2), weighting=w),
    "l2vsd": lambda w: L2VSDGuidance(_prior(), GaussianScoreModel(2), weighting=w),
}


def test_each_weighting_is_the_formula_its_name_says():
    from amortized3d.guidance.base import WEIGHTINGS

    a = NoiseSchedule.scaled_linear().alphas_cumprod.double()
    t = torch.tensor([20, 200, 500, 980])
    abar = a[t]
    torch.testing.assert_close(timestep_weight("sds", a, t), 1 - abar)  # sigma_t^2 (DreamFusion, App. F)
    torch.testing.assert_close(timestep_weight("uniform", a, t), torch.ones_like(abar))
    # threestudio's weighting_strategy "fantasia3d": alphas[t] ** 0.5 * (1 - alphas[t])
    torch.testing.assert_close(timestep_weight("fantasia3d", a, t), abar.sqrt() * (1 - abar))
    assert set(WEIGHTINGS) == {"sds", "uniform", "fantasia3d"}


def test_the_old_snr_name_is_refused_with_the_reason():
    a = NoiseSchedule.scaled_linear().alphas_cumprod
    with pytest.raises(ValueError, match="neither the SNR.*fantasia3d"):
        timestep_weight("snr", a, torch.tensor([10]))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("weighting", ["sdss", "snr"])
def test_a_bad_weighting_fails_when_the_guidance_is_built(name, weighting):
    with pytest.raises(ValueError, match=f"weighting '{weighting}'"):
        BUILDERS[name](weighting)
    assert BUILDERS[name]("fantasia3d").weighting == "fantasia3d"
