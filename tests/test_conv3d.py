"""3DConv-net: building blocks against closed forms, batching, determinism, checkpointing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amortized3d.generators import GENERATORS, Conv3dGenerator, Field
from amortized3d.generators.stylegan3d import channels_at, modulated_conv3d, upsample2
from amortized3d.generators.voxel_field import trilinear_lookup

E = 12
SMALL = dict(text_dim=E, z_dim=8, w_dim=16, resolution=16, channels=4, channel_base=64, channel_max=8,
             const_bias_resolution=8, mlp_hidden=8, bound=1.0, sdf_bias_radius=0.5)


def small(**kw) -> Conv3dGenerator:
    gen = Conv3dGenerator(**{**SMALL, **kw}).double()
    with torch.no_grad():  # exercise the noise inputs (their strength starts at 0)
        for name, p in gen.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
    return gen


def test_channel_schedule_is_the_public_table():
    table = {r: channels_at(r, 8192, 512, 1) for r in (4, 8, 16, 32, 64, 128, 256)}
    assert table == {4: 512, 8: 512, 16: 512, 32: 256, 64: 128, 128: 64, 256: 32}
    assert {r: channels_at(r, 8192, 512, 2) for r in (32, 64, 128)} == {32: 512, 64: 256, 128: 128}
    assert GENERATORS["conv3d"] == "amortized3d.generators.conv3d.Conv3dGenerator"


def test_trilinear_lookup_is_exact_for_a_linear_function():
    """Trilinear interpolation reproduces affine functions exactly: checks axis order and extent."""
    r, bound = 9, 2.0
    axis = torch.linspace(-bound, bound, r, dtype=torch.float64)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")  # volume[..., k, j, i] at (x_i, y_j, z_k)
    vol = torch.stack([xx + 2 * yy - 3 * zz + 0.5, -xx]).unsqueeze(0).expand(2, -1, -1, -1, -1) * torch.tensor(
        [1.0, -1.0], dtype=torch.float64).view(2, 1, 1, 1, 1)
    p = (torch.rand(2, 50, 3, dtype=torch.float64) * 2 - 1) * bound
    f = trilinear_lookup(vol, p, bound)
    expect = torch.stack([p[..., 0] + 2 * p[..., 1] - 3 * p[..., 2] + 0.5, -p[..., 0]], dim=-1)
    torch.testing.assert_close(f[0], expect[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(f[1], -expect[1], rtol=0, atol=1e-12)
    outside = trilinear_lookup(vol, torch.full((2, 1, 3), 3.0 * bound, dtype=torch.float64), bound)
    assert outside.abs().max() == 0


def test_upsample2_is_trilinear_interpolation():
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    ref = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
    torch.testing.assert_close(upsample2(x), ref, rtol=1e-12, atol=1e-12)


def test_modulated_conv3d_equals_per_sample_reference():
    """Grouped batch conv == the definition, sample by sample: w' = w s / ||w s||, then conv3d."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, 5, dtype=torch.float64)
    weight = torch.randn(6, 4, 3, 3, 3, dtype=torch.float64)
    styles = torch.randn(3, 4, dtype=torch.float64)
    for demod in (True, False):
        out = modulated_conv3d(x, weight, styles, demodulate=demod)
        for b in range(3):
            w = weight * styles[b].view(1, 4, 1, 1, 1)
            if demod:
                w = w / (w.square().sum(dim=(1, 2, 3, 4), keepdim=True) + 1e-8).sqrt()  # eps as StyleGAN2
            torch.testing.assert_close(out[b:b + 1], F.conv3d(x[b:b + 1], w, padding=1), rtol=1e-10, atol=1e-10)


def test_batched_generation_equals_per_item():
    torch.manual_seed(1)
    gen = small()
    text = torch.randn(3, E, dtype=torch.float64)
    z = gen.sample_latent(3).double()
    x = torch.rand(3, 64, 3, dtype=torch.float64) * 2.4 - 1.2
    field = gen(text, None, z=z)
    assert isinstance(field, Field) and field.kind == "sdf" and field.batch_size == 3
    assert field.volume.shape == (3, 4, 16, 16, 16)
    sdf, rgb = field.query(x)
    assert sdf.shape == (3, 64) and rgb.shape == (3, 64, 3)
    for i in range(3):
        s_i, r_i = gen(text[i:i + 1], None, z=z[i:i + 1]).query(x[i:i + 1])
        torch.testing.assert_close(sdf[i:i + 1], s_i, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(rgb[i:i + 1], r_i, rtol=1e-10, atol=1e-10)
    s4, _ = field.query(x.view(3, 8, 8, 3))  # extra leading dims kept
    torch.testing.assert_close(s4.reshape(3, 64), sdf)
    assert torch.equal(field.query_geometry(x.view(3, 8, 8, 3)), s4)  # the proposal's query: no albedo head
    # Prompts and latents both matter.
    assert (sdf[0] - gen(text[1:2], None, z=z[0:1]).query(x[0:1])[0][0]).abs().max() > 1e-4
    assert (sdf[0] - gen(text[0:1], None, z=z[1:2]).query(x[0:1])[0][0]).abs().max() > 1e-4


def test_deterministic_for_fixed_z_and_text_and_eval_latent_is_fixed():
    torch.manual_seed(2)
    gen = small()
    text = torch.randn(2, E, dtype=torch.float64)
    z = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(gen.generate_volume(text, z), gen.generate_volume(text, z), rtol=0, atol=0)
    v_eval = gen.generate_volume(text)  # no z: the fixed evaluation latent, same for every prompt
    torch.testing.assert_close(v_eval, gen.generate_volume(text, gen.eval_z.expand(2, -1)), rtol=0, atol=0)
    torch.testing.assert_close(v_eval, gen.generate_volume(text), rtol=0, atol=0)
    # The step-keyed sampler is reproducible from its RNG.
    a = gen.sample_latent(2, torch.Generator().manual_seed(5))
    assert torch.equal(a, gen.sample_latent(2, torch.Generator().manual_seed(5)))
    # eval_z and the noise volumes travel in the state dict: a reloaded generator reproduces the field.
    torch.manual_seed(99)
    other = small(eval_z_seed=7)
    other.load_state_dict(gen.state_dict())
    torch.testing.assert_close(other.generate_volume(text), v_eval, rtol=0, atol=0)


def test_untrained_field_is_close_to_the_bias_sphere():
    torch.manual_seed(3)
    gen = small()
    x = torch.rand(2, 256, 3, dtype=torch.float64) * 2 - 1
    sdf, rgb = gen(torch.randn(2, E, dtype=torch.float64), None).query(x)
    sphere = x.norm(dim=-1) - 0.5
    assert (sdf - sphere).abs().mean() < 0.1 and (rgb - 0.5).abs().mean() < 0.1
    far = torch.full((2, 1, 3), 1.5, dtype=torch.float64)  # outside the box: exactly the sphere, grey
    s_far, r_far = gen(torch.randn(2, E, dtype=torch.float64), None).query(far)
    torch.testing.assert_close(s_far, far.norm(dim=-1) - 0.5)
    torch.testing.assert_close(r_far, torch.full_like(r_far, 0.5))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    plain = small()
    ckpt = small(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    text, z = torch.randn(2, E, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    x = torch.rand(2, 32, 3, dtype=torch.float64) * 2 - 1
    for gen in (plain, ckpt):
        sdf, rgb = gen(text, None, z=z).query(x)
        (sdf.square().sum() + rgb.sum()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(resolution=24), "power of two"),
    (dict(sdf_bias="box"), "sphere|none"),
])
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv3dGenerator(**{**SMALL, **kwargs})


def test_bad_inputs_are_rejected():
    gen = small()
    with pytest.raises(ValueError, match=r"text_emb must be \[B,12\]"):
        gen(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z must be \[2,8\]"):
        gen(torch.randn(2, E, dtype=torch.float64), None, z=torch.randn(3, 8, dtype=torch.float64))


def test_peak_memory_measurement_and_benchmark_row():
    from amortized3d.benchmark import bench_conv3d_memory, peak_allocated_bytes

    n = 1 << 20
    peak = peak_allocated_bytes(lambda: torch.empty(n, dtype=torch.float32).fill_(1.0).sum())
    assert 4 * n <= peak <= 4 * n + 65536  # the 4 MiB tensor (plus the scalar sum)
    rows = bench_conv3d_memory(resolution=8, channels=4, text_dim=E, channel_base=32, channel_max=8,
                               num_points=512, precisions=("fp32",))
    gen = Conv3dGenerator(text_dim=E, resolution=8, channels=4, channel_base=32, channel_max=8)
    assert rows[0]["parameters"] == sum(p.numel() for p in gen.parameters()) and rows[0]["peak_bytes"] > 0


def test_parameter_groups_split_heads_from_the_network_and_cover_every_parameter():
    gen = small()
    groups = gen.parameter_groups()
    assert [g["name"] for g in groups] == ["network", "heads"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in gen.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for m in (gen.sdf_head, gen.rgb_head) for p in m.parameters()}


def test_z_draws_are_the_particles_of_evaluation_and_draw_0_is_eval_z():
    """generator.num_particles=n on 3DConv-net: n fixed z per prompt at evaluation (issue 19), selected by
    rendering_particle like the iNGP's fields; n = 1 is the generator as it was (same eval_z, same keys)."""
    from amortized3d.generators.particles import num_particles, rendering_particle

    torch.manual_seed(5)
    one = small()
    torch.manual_seed(5)
    three = small(num_particles=3)
    assert num_particles(one) == 1 and num_particles(three) == 3
    assert one.state_dict().keys() == three.state_dict().keys()  # the draws are not checkpoint state
    assert torch.equal(one.eval_z, three.eval_z)
    text = torch.randn(2, E, dtype=torch.float64)
    volumes = []
    for i in range(3):
        with rendering_particle(three, i):
            v = three.generate_volume(text)
        # the same z for every prompt, and exactly the network at that z
        torch.testing.assert_close(v, three.generate_volume(text, three.evaluation_latent(i).expand(2, -1)),
                                   rtol=0, atol=0)
        volumes.append(v)
    assert three.eval_particle == 0
    torch.testing.assert_close(volumes[0], one.generate_volume(text), rtol=0, atol=0)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(three.evaluation_latent(a), three.evaluation_latent(b))
            assert (volumes[a] - volumes[b]).abs().max() > 1e-4  # three draws, three shapes
    # Reproducible from (eval_z_seed, n): a rebuilt generator draws the same z.
    assert torch.equal(three.particle_z, small(num_particles=3).particle_z)
    with pytest.raises(ValueError, match="valid: 0..2"):
        with rendering_particle(three, 3):
            pass
    with pytest.raises(ValueError, match="num_particles"):
        small(num_particles=0)
