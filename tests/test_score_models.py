"""Score models of the VSD family: interface, conditioning, v-prediction identities, training."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from amortized3d.priors.gaussian import GaussianPrior
from amortized3d.priors.schedule import NoiseSchedule
from amortized3d.priors.score_models import GaussianScoreModel, ScoreModel, SmallUNetScoreModel


def tiny_unet(**kw) -> SmallUNetScoreModel:
    return SmallUNetScoreModel(**{"in_channels": 3, "cond_dim": 6, "base_channels": 8, "channel_mults": (1, 2),
                                  "resolution": 8, **kw})


def batch(n: int = 4, seed: int = 0, res: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, res, res, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 6, generator=g), torch.randn(n, 16, generator=g))


def test_unet_shapes_and_neutral_init():
    m = tiny_unet()
    x, t, cond, cam = batch()
    assert m.predict_noise(x, t, cond, cam).shape == x.shape
    assert torch.count_nonzero(m.predict_noise(x, t, cond, cam)) == 0  # zero-initialised output conv
    v = tiny_unet(prediction_type="v_prediction")
    a = v.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    # v = 0 means eps = sqrt(1-abar) x_t: the exact answer for N(0, I) data.
    torch.testing.assert_close(v.predict_noise(x, t, cond, cam), (1 - a).sqrt() * x)
    assert m.sample_shape == (3, 8, 8)
    with pytest.raises(ValueError):
        tiny_unet(resolution=7)


def test_camera_embedding_starts_neutral_but_is_used_after_training():
    m = tiny_unet()
    torch.nn.init.normal_(m.conv_out.weight, std=0.1)  # make the output depend on the embedding
    x, t, cond, cam = batch()
    torch.testing.assert_close(m(x, t, cond, cam), m(x, t, cond, None))
    torch.nn.init.normal_(m.camera_proj.weight, std=0.1)
    assert not torch.allclose(m(x, t, cond, cam), m(x, t, cond, None))
    assert not torch.allclose(m(x, t, cond, cam), m(x, t, cond * 2, cam))  # text is used too


def test_trainable_parameters_address_functional_call_and_last_layer():
    m = tiny_unet()
    params = m.trainable_parameters()
    assert set(m.last_layer_names()) <= set(params)
    x, t, cond, cam = batch()
    out = functional_call(m, {"conv_out.bias": params["conv_out.bias"].detach() + 0.01}, (x, t, cond, cam),
                          strict=False)
    torch.testing.assert_close(out, torch.full_like(out, 0.01))  # zero weight: the output is the bias
    assert torch.count_nonzero(m(x, t, cond, cam)) == 0  # the module's own parameters are untouched
    m.text_proj.requires_grad_(False)
    assert "text_proj.weight" not in m.trainable_parameters()


def test_loss_is_per_item_and_deterministic_given_generator():
    m = tiny_unet()
    torch.nn.init.normal_(m.conv_out.weight, std=0.1)
    x, _, cond, cam = batch()
    a = m.loss(x, cond, cam, torch.Generator().manual_seed(3))
    b = m.loss(x, cond, cam, torch.Generator().manual_seed(3))
    c = m.loss(x, cond, cam, torch.Generator().manual_seed(4))
    assert a.shape == (4,)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


class _CameraSpy(GaussianScoreModel):
    def model_output(self, x_t, t, cond, camera):
        self.seen = camera
        return super().model_output(x_t, t, cond, camera)


@pytest.mark.parametrize("p", [0.0, 0.1, 1.0])
def test_camera_dropout(p):
    m = _CameraSpy(2, camera_dropout=p)
    n = 4000
    m.loss(torch.randn(n, 2), None, torch.ones(n, 16), torch.Generator().manual_seed(0))
    dropped = (m.seen.abs().sum(1) == 0).float().mean().item()
    assert abs(dropped - p) < 0.02
    assert set(m.seen.unique().tolist()) <= {0.0, 1.0}  # a camera is dropped whole, never scaled
    with pytest.raises(ValueError):
        GaussianScoreModel(2, camera_dropout=1.5)


def test_v_prediction_matches_schedule_identities():
    sched = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 5, dtype=torch.float64, generator=g), torch.randn(6, 5, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(sched.eps_from_v(x_t, sched.v_target(x0, noise, t), t), noise)
    # The same Gaussian as an eps model and as a v model predicts the same eps.
    mean, tril = torch.randn(5, generator=g), torch.tril(torch.randn(5, 5, generator=g)) + 2 * torch.eye(5)
    eps_model = GaussianScoreModel(5, mean, tril).double()
    v_model = GaussianScoreModel(5, mean, tril, prediction_type="v_prediction").double()
    torch.testing.assert_close(v_model.predict_noise(x_t, t), eps_model.predict_noise(x_t, t))
    # and its raw output is the v of its own x0 estimate: v = sqrt(a) eps - sqrt(1-a) x0_hat
    eps = eps_model.predict_noise(x_t, t)
    v_expected = sched.v_target(sched.x0_from_eps(x_t, eps, t), eps, t)
    torch.testing.assert_close(v_model.model_output(x_t, t, None, None), v_expected)
    with pytest.raises(ValueError):
        GaussianScoreModel(5, prediction_type="x0")


def test_gaussian_score_model_equals_gaussian_prior():
    g = torch.Generator().manual_seed(1)
    mean, factor = torch.randn(3, generator=g), torch.randn(3, 3, generator=g) + 2 * torch.eye(3)
    tril = torch.linalg.cholesky(factor @ factor.T)  # float32: the score model stores float32 parameters
    cov = tril.double() @ tril.double().T  # so both sides describe exactly the same Gaussian
    prior = GaussianPrior(mean[None], cov[None], ["p"])
    model = GaussianScoreModel(3, mean, tril).double()
    x_t, t = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.randint(0, 1000, (8,), generator=g)
    torch.testing.assert_close(model.predict_noise(x_t, t), prior.eps_exact(x_t, t, torch.zeros(8, dtype=torch.long)))
    torch.testing.assert_close(model.covariance(), cov.float().double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model.predict_noise(torch.randn(2, 4, dtype=torch.float64), t[:2])


def _fixed_eval_loss(m: ScoreModel, x0, cond, cam) -> float:
    with torch.no_grad():
        return m.loss(x0, cond, cam, torch.Generator().manual_seed(123)).mean().item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_loss_decreases_on_fixed_samples(prediction_type):
    torch.manual_seed(0)
    m = tiny_unet(prediction_type=prediction_type)
    x0 = (torch.rand(4, 3, 1, 1) * 2 - 1).expand(4, 3, 8, 8)  # flat colours: learnable in a few steps
    _, _, cond, cam = batch()
    before = _fixed_eval_loss(m, x0, cond, cam)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for step in range(40):
        opt.zero_grad()
        m.loss(x0, cond, cam, torch.Generator().manual_seed(step)).mean().backward()
        opt.step()
    assert _fixed_eval_loss(m, x0, cond, cam) < 0.8 * before


def test_gaussian_score_model_learns_the_data_gaussian():
    torch.manual_seed(0)
    mean, factor = torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    model = GaussianScoreModel(2).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        x0 = (mean + torch.randn(256, 2, generator=g) @ factor.T).double()
        opt.zero_grad()
        model.loss(x0, None, None, g).mean().backward()
        opt.step()
    assert (model.mean.detach().float() - mean).norm() < 0.15
    assert torch.linalg.matrix_norm(model.covariance().detach().float() - factor @ factor.T) < 0.25
