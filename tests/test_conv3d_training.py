"""3DConv-net through the real Hydra configs: every guidance, once-per-step volumes, exact resume."""
from __future__ import annotations

import pytest
import torch

from amortized3d.benchmark_steps import make_step_runner
from amortized3d.build import build_system
from amortized3d.train import train
from conftest import compose

# The CPU test config: a 16^3 x 8 grid from 16 -> 8 channel blocks.
CONV3D = ["generator=conv3d", "generator.resolution=16", "generator.channels=8", "generator.channel_base=128",
          "generator.channel_max=16", "generator.mlp_hidden=16"]
GUIDANCES = ["sds", "csd", "vsd", "lvsd", "l2vsd", "asd", "sdi"]


def test_analytic_specialisation_is_applied_and_paper_numbers_stay_in_the_generator_file(tmp_path, cache_dir):
    cfg = compose(tmp_path, cache_dir, "generator=conv3d", tiny=False)
    assert (cfg.generator.resolution, cfg.generator.channels, cfg.generator.bound) == (32, 16, 1.0)
    assert cfg.generator.z_dim == 64 and cfg.generator.w_dim == 256 and cfg.generator.text_dim == 1024
    assert cfg.data.views_per_prompt == 2 and cfg.system.views_per_prompt == 2  # the specialisation's own
    assert compose(tmp_path, cache_dir, "generator=hyper_ingp", tiny=False).data.views_per_prompt == 1
    from omegaconf import OmegaConf
    paper = OmegaConf.load(cfg.paths.root_dir + "/configs/generator/conv3d.yaml")
    assert (paper.resolution, paper.channels, paper.channel_multiplier) == (128, 32, 1)


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_every_guidance_trains_the_conv3d_generator(tmp_path, cache_dir, guidance):
    cfg = compose(tmp_path, cache_dir, *CONV3D, f"guidance={guidance}", "trainer.max_steps=2", "logger=none")
    system, _, _ = build_system(cfg)
    before = {k: v.clone() for k, v in system.generator.state_dict().items()}
    volumes: list[torch.Size] = []
    system.generator.synthesis.register_forward_hook(lambda m, i, o: volumes.append(o.shape))
    make_step_runner(system, cfg, steps_per_call=1)()  # two real training steps under a Lightning Trainer
    assert system.batch_index == 2 and system.nonfinite_steps == 0
    # One volume per prompt per step, shared by all views (2 here) and ray samples of that step.
    b = cfg.data.batch_size
    assert cfg.data.views_per_prompt == 2
    assert volumes == [torch.Size([b, 8, 16, 16, 16])] * 2
    after = system.generator.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("synthesis.") for k in moved) and any(k.startswith("mapping.") for k in moved)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_latent_is_fresh_per_step_and_keyed_by_it_so_resume_is_exact(tmp_path, cache_dir, monkeypatch):
    """Interrupted at step 2 and resumed == one 4-step run: same z at every step, same parameters.

    (SDS: ASD's t range anneals over max_steps, which differs between the two runs by design.)
    """
    from amortized3d.generators.conv3d import Conv3dGenerator

    common = [*CONV3D, "guidance=sds", "logger=none", "callbacks.checkpoint.every_n_train_steps=2",
              "trainer.val_check_interval=2"]
    seen: list[torch.Tensor] = []
    forward = Conv3dGenerator.forward

    def recording_forward(self, text_emb, prompt_ids=None, z=None):  # the real forward, z recorded
        if self.training and torch.is_grad_enabled():
            seen.append(z.clone())
        return forward(self, text_emb, prompt_ids, z)

    monkeypatch.setattr(Conv3dGenerator, "forward", recording_forward)
    train(compose(tmp_path / "full", cache_dir, *common, "trainer.max_steps=4"))
    full_z = list(seen)
    train(compose(tmp_path / "part", cache_dir, *common, "trainer.max_steps=2"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    seen.clear()
    train(compose(tmp_path / "part", cache_dir, *common, "trainer.max_steps=4", f"ckpt_path={ckpt}"))
    assert len(full_z) == 4 and all(z.shape == (2, 64) for z in full_z)
    assert not torch.equal(full_z[0], full_z[1])  # resampled every step
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(full_z[2:], seen))

    def gen_state(run):
        state = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        return {k: v for k, v in state["state_dict"].items() if k.startswith("model.generator.")}

    full, resumed = gen_state("full"), gen_state("part")
    assert full.keys() == resumed.keys() and "model.generator.eval_z" in full
    diff = {k: (full[k] - resumed[k]).abs().max().item() for k in full if not torch.equal(full[k], resumed[k])}
    assert not diff, diff
