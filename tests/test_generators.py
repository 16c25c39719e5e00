"""Per-prompt iNGP and Hyper-iNGP: batching, isolation, initialisation, configuration."""
from __future__ import annotations

import math

import pytest
import torch

from amortized3d.generators import Field, HyperIngpGenerator, IngpGenerator
from amortized3d.generators.mlp import kaiming_std

ENC = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
           per_level_scale=2.0, bound=1.0, implementation="torch")
E = 12


def hyper(**kw) -> HyperIngpGenerator:
    return HyperIngpGenerator(text_dim=E, encoding=ENC, mlp_hidden=16, **kw).double()


def ingp(num_prompts: int = 3, **kw) -> IngpGenerator:
    return IngpGenerator(num_prompts, encoding=ENC, mlp_hidden=16, **kw).double()


def randomize_grid(gen) -> None:
    """O(1) hash features, so that the MLPs (and therefore the prompts) matter."""
    with torch.no_grad():
        gen.encoding.table.normal_()


def points(b: int, n: int = 64) -> torch.Tensor:
    return torch.rand(b, n, 3, dtype=torch.float64) * 2.4 - 1.2


@pytest.mark.parametrize("kind", ["hyper", "ingp"])
def test_batched_equals_per_item(kind):
    torch.manual_seed(0)
    gen = hyper() if kind == "hyper" else ingp(4)
    randomize_grid(gen)
    text = torch.randn(3, E, dtype=torch.float64)
    ids = torch.tensor([2, 0, 3]) if kind == "ingp" else torch.arange(3)
    x = points(3)
    field = gen(text, ids)
    assert isinstance(field, Field) and field.kind == "sdf" and field.batch_size == 3
    sdf, rgb = field.query(x)
    assert sdf.shape == (3, 64) and rgb.shape == (3, 64, 3)
    for i in range(3):
        s_i, r_i = gen(text[i:i + 1], ids[i:i + 1]).query(x[i:i + 1])
        torch.testing.assert_close(sdf[i:i + 1], s_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rgb[i:i + 1], r_i, rtol=1e-12, atol=1e-12)
    # Extra leading dims ([B, rays, samples, 3]) are accepted and kept.
    s4, r4 = field.query(x.view(3, 8, 8, 3))
    torch.testing.assert_close(s4.reshape(3, 64), sdf)
    assert r4.shape == (3, 8, 8, 3)


def test_different_text_or_prompt_gives_different_fields():
    torch.manual_seed(1)
    x = points(1).expand(2, -1, -1)
    h = hyper()
    randomize_grid(h)
    sdf, rgb = h(torch.randn(2, E, dtype=torch.float64), None).query(x)
    assert (sdf[0] - sdf[1]).abs().max() > 1e-3 and (rgb[0] - rgb[1]).abs().max() > 1e-3
    g = ingp(2)
    randomize_grid(g)
    sdf, rgb = g(None, torch.tensor([0, 1])).query(x)
    assert (sdf[0] - sdf[1]).abs().max() > 1e-2 and (rgb[0] - rgb[1]).abs().max() > 1e-2


def test_ingp_prompts_are_isolated():
    torch.manual_seed(2)
    g = ingp(3)
    sdf, rgb = g(None, torch.tensor([0, 1])).query(points(2))
    (sdf[0].square().sum() + rgb[0].sum()).backward()  # a loss on prompt 0's field only
    rows = g.encoding.rows_per_instance
    table_grad = g.encoding.table.grad.abs().sum(dim=(1, 2))
    assert table_grad[0] > 0 and table_grad[1] == 0 and table_grad[2] == 0
    assert g.encoding.table.grad.shape[1] == rows
    for w in [*g.sdf_layers, *g.rgb_layers]:
        per_prompt = w.grad.abs().sum(dim=(1, 2))
        assert per_prompt[0] > 0 and per_prompt[1] == 0 and per_prompt[2] == 0
    with pytest.raises(IndexError):
        g(None, torch.tensor([3]))
    assert IngpGenerator.supports_unseen_prompts is False


@pytest.mark.parametrize("kind", ["hyper", "ingp"])
def test_initial_field_is_the_sphere_bias(kind):
    torch.manual_seed(3)
    gen = hyper(sdf_bias_radius=0.6) if kind == "hyper" else ingp(2, sdf_bias_radius=0.6)
    x = points(2, 500)
    sdf, rgb = gen(torch.randn(2, E, dtype=torch.float64), torch.tensor([0, 1])).query(x)
    # Hash features start at ~1e-4, so the bias-free heads output ~0: sdf = ||x|| - r.
    torch.testing.assert_close(sdf, x.norm(dim=-1) - 0.6, rtol=0, atol=2e-3)
    torch.testing.assert_close(rgb, torch.full_like(rgb, 0.5), rtol=0, atol=2e-3)
    plain = hyper(sdf_bias="none") if kind == "hyper" else ingp(2, sdf_bias="none")
    sdf0, _ = plain(torch.randn(2, E, dtype=torch.float64), torch.tensor([0, 1])).query(x)
    assert sdf0.abs().max() < 2e-3


def test_hypernetwork_generates_kaiming_scale_weights_for_every_prompt():
    torch.manual_seed(4)
    # The paper's sizes (16 levels x 2 features = 32 -> 64 -> 1 | 3), with a tiny table.
    gen = HyperIngpGenerator(text_dim=1024, encoding={**ENC, "n_levels": 16, "base_resolution": 16,
                                                      "per_level_scale": 1.447, "log2_hashmap_size": 8})
    flat = gen.generate_weights(torch.randn(64, 1024) * 3.0)  # scale is normalised away
    assert flat.shape == (64, 32 * 64 + 64 + 32 * 64 + 3 * 64) == (64, 4352)
    first = flat[:, :32 * 64]
    per_prompt_std = first.std(dim=1)
    expected = kaiming_std((64, 32))  # sqrt(2/32)
    assert ((per_prompt_std / expected - 1).abs() < 0.15).all()
    # Text modulates around the shared base by a small fraction of that scale.
    spread = (flat - flat.mean(0)).std() / flat.std()
    assert 0.01 < spread < 0.2


def test_spectral_norm_builds_runs_and_keeps_the_initial_function():
    torch.manual_seed(5)
    plain = HyperIngpGenerator(text_dim=E, encoding=ENC, mlp_hidden=16)
    torch.manual_seed(5)
    sn = HyperIngpGenerator(text_dim=E, encoding=ENC, mlp_hidden=16, spectral_norm=True)
    text = torch.randn(4, E)
    a, b = plain.generate_weights(text), sn.generate_weights(text)
    assert (a - b).norm() / a.norm() < 1e-2  # the fixed gain undoes W / sigma(W) at init
    sigma = torch.linalg.matrix_norm(sn.out.weight.detach(), ord=2)
    assert math.isclose(sigma.item(), 1.0, rel_tol=0.05)
    sdf, rgb = sn(text, None).query(torch.rand(4, 32, 3))
    (sdf.sum() + rgb.sum()).backward()
    assert sn.out.parametrizations.weight.original.grad is not None
    assert torch.isfinite(sdf).all()


@pytest.mark.parametrize("kind", ["hyper", "ingp"])
def test_parameter_groups_partition_the_parameters(kind):
    gen = hyper(spectral_norm=True) if kind == "hyper" else ingp(2)
    groups = gen.parameter_groups()
    assert [g["name"] for g in groups] == ["encoding", "network"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in gen.parameters()}


def test_hydra_instantiation_from_config():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "_target_": "amortized3d.generators.hyper_ingp.HyperIngpGenerator",
        "text_dim": E, "encoding": ENC, "hyper_hidden": 8, "mlp_hidden": 16,
        "spectral_norm": False, "sdf_bias": "sphere", "sdf_bias_radius": 0.5})
    gen = instantiate(cfg)
    assert isinstance(gen, HyperIngpGenerator) and gen.encoding.n_levels == 4
    cfg = OmegaConf.create({"_target_": "amortized3d.generators.ingp.IngpGenerator",
                            "num_prompts": 2, "encoding": ENC})
    gen = instantiate(cfg)
    assert gen.encoding.num_instances == 2 and gen.sdf_layers[0].shape == (2, 64, 8)


def test_state_dict_round_trip():
    torch.manual_seed(6)
    a, b = hyper(spectral_norm=True), hyper(spectral_norm=True)
    randomize_grid(a)
    b.load_state_dict(a.state_dict())
    text, x = torch.randn(2, E, dtype=torch.float64), points(2)
    a.eval(), b.eval()
    torch.testing.assert_close(a(text).query(x)[0], b(text).query(x)[0])
    assert a.state_dict()["encoding._extra_state"]["implementation"] == "torch"


@pytest.mark.parametrize("kind,fused_mlp", [("hyper", False), ("hyper", True), ("ingp", False), ("ingp", True)])
def test_query_geometry_is_the_sdf_of_query(kind, fused_mlp):
    """The proposal pass's geometry-only query: query's SDF (both MLP paths) without the albedo head."""
    from amortized3d.generators.base import query_geometry

    torch.manual_seed(0)
    gen = hyper(fused_mlp=fused_mlp) if kind == "hyper" else ingp(3, fused_mlp=fused_mlp)
    randomize_grid(gen)
    field = gen(torch.randn(3, E, dtype=torch.float64), torch.tensor([2, 0, 1]))
    x = points(3).view(3, 8, 8, 3)
    sdf, _ = field.query(x)
    torch.testing.assert_close(field.query_geometry(x), sdf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(query_geometry(field, x), sdf, rtol=1e-12, atol=1e-12)
