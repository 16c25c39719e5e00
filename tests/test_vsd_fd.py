"""L²-VSD's finite-difference directional derivative against the exact jvp (tiny SD LoRA)."""
from __future__ import annotations

import pytest
import torch

from amortized3d.cameras import sample_cameras
from amortized3d.guidance.vsd import FD_RELATIVE_STEP, L2VSDGuidance, finite_difference_step, linearized_shift
from amortized3d.priors.lora_score_model import LoRAScoreModel
from amortized3d.priors.stable_diffusion import StableDiffusionPrior


def _problem(tiny_sd, dtype: str):
    """A LoRA off its B = 0 start, the real lookahead tangent (-eta grad of the score loss) and an x_t."""
    torch.manual_seed(0)
    prior = StableDiffusionPrior(str(tiny_sd), dtype=dtype, device="cpu", vae_resolution=16, local_files_only=True)
    model = LoRAScoreModel(rank=4, prediction_type="epsilon", prior=prior)
    guidance = L2VSDGuidance(prior, model, eta=1e-2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.trainable_parameters().items():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    camera = sample_cameras(2, 16, rng=g).embedding()
    cond = model.text_condition(None, ["a red cube", "a blue ball"], prior)
    tangent = guidance.lookahead_tangent(x0, cond, camera, torch.Generator().manual_seed(7))
    t = torch.tensor([100, 700])
    x_t = prior.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    return model, tangent, x_t, t, cond, camera


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_finite_difference_matches_the_exact_jvp_in_fp32(tiny_sd):
    model, tangent, x_t, t, cond, cam = _problem(tiny_sd, "fp32")
    eps, exact = linearized_shift(model, tangent, x_t, t, cond, cam, method="exact")
    eps_fd, fd = linearized_shift(model, tangent, x_t, t, cond, cam, method="finite_difference")
    torch.testing.assert_close(eps_fd, eps, rtol=1e-5, atol=1e-6)  # eps_phi is the same forward
    assert exact.norm() > 0
    assert _rel(fd, exact) < 1e-2  # measured 1.5e-3 at the default step 1e-3
    errors = {}
    for rel in (1e-2, 1e-1):  # the error is first order in the step (truncation, not rounding)
        errors[rel] = _rel(linearized_shift(model, tangent, x_t, t, cond, cam, "finite_difference", rel)[1], exact)
    assert 5 < errors[1e-1] / errors[1e-2] < 20


def test_finite_difference_in_bf16_is_below_bf16_resolution_of_eps(tiny_sd):
    """bf16 rounds every activation to 8 bits, so no difference quotient is as exact as in fp32;
    the default step keeps its error (vs the fp32 exact jvp) far below the 2^-8 relative
    resolution of eps_phi itself, and within 25 % of the correction (measured ~11 %)."""
    model32, tangent, x_t, t, cond, cam = _problem(tiny_sd, "fp32")
    eps32, exact32 = linearized_shift(model32, tangent, x_t, t, cond, cam, method="exact")
    model16, *_ = _problem(tiny_sd, "bf16")
    assert model16.base_dtype == torch.bfloat16
    eps16, fd16 = linearized_shift(model16, tangent, x_t, t, cond, cam, method="finite_difference")
    assert _rel(fd16, exact32) < 0.25
    assert (fd16.float() - exact32).norm() < 2 ** -8 * eps32.norm()
    tiny = linearized_shift(model16, tangent, x_t, t, cond, cam, "finite_difference", 1e-4)[1]
    assert _rel(tiny, exact32) > 1.0  # an fp32-sized step drowns in bf16 rounding: why the step is per dtype
    assert FD_RELATIVE_STEP[torch.bfloat16] > FD_RELATIVE_STEP[torch.float32]


def test_finite_difference_of_a_zero_tangent_is_zero(tiny_sd):
    model, tangent, x_t, t, cond, cam = _problem(tiny_sd, "fp32")
    zero = {n: torch.zeros_like(v) for n, v in tangent.items()}
    assert finite_difference_step({n: p.detach() for n, p in model.trainable_parameters().items()}, zero, 1e-3) == 0
    _, delta = linearized_shift(model, zero, x_t, t, cond, cam, method="finite_difference")
    assert delta.abs().max() == 0


def test_jvp_method_is_validated():
    from amortized3d.guidance.vsd import JVP_METHODS

    assert JVP_METHODS == ("finite_difference", "exact")
    with pytest.raises(ValueError, match="jvp"):
        linearized_shift(None, {}, None, None, None, None, method="central")  # type: ignore[arg-type]


def test_shipped_l2vsd_config_selects_the_finite_difference(tmp_path, cache_dir):
    from conftest import compose

    for overrides, expected in (([], "finite_difference"), (["guidance.jvp=exact"], "exact")):
        cfg = compose(tmp_path, cache_dir, "guidance=l2vsd", *overrides)
        assert cfg.guidance.jvp == expected and cfg.guidance.fd_relative_step is None
