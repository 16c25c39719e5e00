"""Perp-Neg as threestudio implements it, on a tiny SD saved to disk, and ASD's conditional-only shifted branch.

Hand computations follow threestudio's ``get_text_embeddings_perp_neg`` (azimuth-interpolated positive,
two negatives weighted by f(r) = a exp(-b r) + c) and ``perpendicular_component``.
"""
from __future__ import annotations

import math

import pytest
import torch

from amortized3d.cameras import make_cameras
from amortized3d.guidance.asd import ASDGuidance
from amortized3d.guidance.base import GuidanceInput
from amortized3d.priors.stable_diffusion import StableDiffusionPrior

AZIMUTHS = [0.0, 45.0, -60.0, 90.0, 135.0, 180.0, 20.0]
ELEVATIONS = [10.0, 0.0, 20.0, 5.0, 30.0, 15.0, 70.0]  # the last one is an overhead view


def f(a: float, b: float, c: float, r: float) -> float:
    return a * math.exp(-b * r) + c


def cameras(n: int | None = None):
    az, el = AZIMUTHS[:n], ELEVATIONS[:n]
    k = len(az)
    return make_cameras(torch.tensor(el), torch.tensor(az), torch.full((k,), 1.5), torch.full((k,), 50.0), 8)


@pytest.fixture(scope="module")
def prior(tiny_sd):
    return StableDiffusionPrior(str(tiny_sd), vae_resolution=32, local_files_only=True, perp_neg=True)


def hand_condition(prior, prompt: str, azimuth: float, overhead: bool):
    """(positive tokens, [(negative tokens, weight)]) by threestudio's rules, one item."""
    emb = {v: prior.prompt_embeddings([f"{prompt}, {v} view"])[0] for v in ("front", "side", "back", "overhead")}
    if overhead:
        return emb["overhead"], []
    a = abs((azimuth + 180) % 360 - 180)
    if a < 90:
        r = 1 - a / 90
        return r * emb["front"] + (1 - r) * emb["side"], [(emb["front"], f(4, 0.5, -2.426, r)),
                                                           (emb["side"], f(4, 0.5, -2.426, 1 - r))]
    r = 2 - a / 90
    return r * emb["side"] + (1 - r) * emb["back"], [(emb["side"], f(1, 0.5, -0.606, r)),
                                                      (emb["front"], f(1, 0.5, 0.967, r))]


def test_threestudio_weights_at_known_azimuths():
    from amortized3d.priors.sd_conditioning import perp_neg_mixing

    mix, neg, w = perp_neg_mixing(torch.tensor(AZIMUTHS), torch.tensor(ELEVATIONS) > 60)
    # columns of mix: front, side, back, overhead; negative ids index the same views
    torch.testing.assert_close(mix[0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))  # front: positive = front
    assert neg[0].tolist() == [0, 1] and abs(w[0, 0]) < 1e-3 and w[0, 1] == pytest.approx(1.574, abs=1e-3)
    torch.testing.assert_close(mix[1], torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    assert w[1].tolist() == pytest.approx([4 * math.exp(-0.25) - 2.426] * 2)
    torch.testing.assert_close(mix[5], torch.tensor([0, 0, 1.0, 0], dtype=torch.float64))  # back view
    assert neg[5].tolist() == [1, 0] and w[5].tolist() == pytest.approx([0.394, 1.967])  # rejects side, front
    torch.testing.assert_close(mix[3], torch.tensor([0, 1.0, 0, 0], dtype=torch.float64))  # 90 deg: side
    assert w[3].tolist() == pytest.approx([math.exp(-0.5) - 0.606, math.exp(-0.5) + 0.967])
    torch.testing.assert_close(mix[6], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))  # overhead
    assert w[6].tolist() == [0.0, 0.0]


def test_perp_neg_cfg_equals_the_hand_computation(prior):
    cams = cameras()
    n = len(cams)
    prompts = ["a red cube"] * (n - 2) + ["a blue ball"] * 2
    cond = prior.camera_condition(prompts, cams)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *prior.latent_shape, generator=g)
    t = torch.tensor([37, 811, 500, 250, 999, 120, 640])
    with torch.no_grad():
        eps = prior.predict_noise(x, t, cond, 7.5)
        eps_u = prior.unet_eps(x, t, prior.prompt_embeddings([""] * n))
        for i, (p, a, e) in enumerate(zip(prompts, AZIMUTHS, ELEVATIONS)):
            pos, negs = hand_condition(prior, p, a, e > 60)
            torch.testing.assert_close(cond.cond[i], pos, rtol=1e-5, atol=1e-6)
            xi, ti = x[i:i + 1], t[i:i + 1]
            e_pos = (prior.unet_eps(xi, ti, pos[None]) - eps_u[i:i + 1]).flatten()
            total = e_pos.clone()
            for tokens, weight in negs:
                e_neg = (prior.unet_eps(xi, ti, tokens[None]) - eps_u[i:i + 1]).flatten()
                perp = e_neg - (e_neg @ e_pos) / max(float(e_pos @ e_pos), 1e-6) * e_pos
                total -= weight * perp  # threestudio: + (-f) * perp
            expected = eps_u[i].flatten() + 7.5 * total
            torch.testing.assert_close(eps[i].flatten(), expected, rtol=1e-3, atol=1e-4)  # batched vs single passes
        # the negatives change the result: without them it would be plain CFG on the interpolated positive
        plain = eps_u + 7.5 * (prior.unet_eps(x, t, cond.cond) - eps_u)
        assert (eps - plain).abs().max() > 1e-4


def test_cfg_scale_one_is_conditional_only_and_zero_unconditional_with_perp_neg(prior):
    cams = cameras()
    n = len(cams)
    cond = prior.camera_condition(["a red cube"] * n, cams)
    assert cond.negatives is not None and (cond.negative_weights.abs() > 0.1).any()
    x = torch.randn(n, *prior.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((n,), 400)
    with torch.no_grad():
        torch.testing.assert_close(prior.predict_noise(x, t, cond, 1.0), prior.unet_eps(x, t, cond.cond))
        torch.testing.assert_close(prior.predict_noise(x, t, cond, 0.0), prior.unet_eps(x, t, cond.uncond))


def test_perp_neg_needs_the_azimuth(prior):
    with pytest.raises(ValueError, match="azimuth"):
        prior.text_condition(["a red cube"], ["front"])


def test_asd_shifted_branch_is_the_plain_conditional_eps_with_perp_neg_on(tiny_sd):
    """ScaleDreamer Eq. 4: grad = w(t) (eps(x_t; t, y, CFG 7.5) - eps(x_{t+dt}; t+dt, y)), the second term the
    conditional prediction alone; Perp-Neg's negatives may enter only the CFG-7.5 branch."""
    prior = StableDiffusionPrior(str(tiny_sd), vae_resolution=32, local_files_only=True, perp_neg=True)
    asd = ASDGuidance(prior, t_min=0.3, t_max=0.9, eta=0.5)
    cams = cameras(6)  # no overhead view: every item has weighted negatives
    rgb = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    inp = GuidanceInput(rgb=rgb, cameras=cams, prompts=["a red cube"] * 6, step=0,
                        rng=torch.Generator().manual_seed(5))
    loss = asd(inp).losses["asd"]
    with torch.no_grad():
        x0 = prior.encode(rgb)
        pair = asd.noisy_pair(x0, GuidanceInput(rgb=rgb, cameras=cams, prompts=inp.prompts, step=0,
                                                rng=torch.Generator().manual_seed(5)))
        assert (pair.delta_t > 0).all()
        cond = asd.condition(inp)
        assert cond.negatives is not None
        eps = prior.predict_noise(pair.x_t, pair.t, cond, 7.5)
        eps_shift = prior.unet_eps(pair.x_t_plus, pair.t_plus, cond.cond)  # conditional only
        w = 1 - prior.alphas_cumprod[pair.t]
        grad = w[:, None, None, None] * (eps - eps_shift)
    torch.testing.assert_close(loss, 0.5 * grad.flatten(1).pow(2).sum(1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("experiment", ["asd_hyper_ingp_mg15", "asd_conv3d_df415", "asd_conv3d_at2520",
                                        "asd_conv3d_cp100k"])
def test_asd_experiments_use_scaledreamer_perp_neg(tmp_path, tiny_sd, experiment):
    """ScaleDreamer's public asd_sd_*.yaml: use_perp_neg true, guidance_perp_neg -0.5 (threestudio's weights x 0.5);
    the prior built from the composed experiment (tiny weights) gives those weights."""
    import hydra
    from omegaconf import OmegaConf

    from conftest import compose

    cfg = compose(tmp_path, tmp_path, f"experiment={experiment}", f"prior.pretrained_model_name_or_path={tiny_sd}",
                  "prior.local_files_only=true", "prior.model.vae_resolution=32", "prior.model.dtype=fp32",
                  "prior.model.device=cpu", tiny=False)
    node = OmegaConf.to_container(cfg.prior.model, resolve=True)
    prior = hydra.utils.instantiate(node)
    assert prior.perp_neg and prior.perp_neg_weight == 0.5
    cond = prior.camera_condition(["a red cube"], cameras(6).index(slice(5, 6)))  # the back view
    assert cond.negative_weights[0].tolist() == pytest.approx([0.5 * 0.394, 0.5 * 1.967], abs=1e-3)
