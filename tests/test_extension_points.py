"""Issue 16's done-when: a new guidance and a new generator are each one .py + one .yaml, nothing else.

Each test writes the two files into a temp dir (the module importable through ``sys.path``, the config
found through ``hydra.searchpath=[file://...]``), composes the real ``configs/train.yaml`` with it and
trains 3 steps on the analytic prior through ``amortized3d.train.train``. The settings the new part
needs from the world (CFG, scene bound, capacity) come from what the prior publishes, so no third file
(no ``prior_generator`` specialisation) is written.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path


from amortized3d.train import train
from conftest import compose

GUIDANCE_PY = '''
"""SDS with another timestep weighting, w(t) = sqrt(1 - abar_t) (a user's file)."""
import torch

from amortized3d.guidance.sds import SDSGuidance

BUILT = []  # the instances Hydra built (read by the test)


class SqrtWeightSDS(SDSGuidance):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_calls = 0
        BUILT.append(self)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        self.weight_calls += 1
        return (1.0 - self.prior.alphas_cumprod.to(t.device)[t]).sqrt()
'''

GUIDANCE_YAML = '''
# SDS with w(t) = sqrt(1 - abar_t); the CFG is what the prior publishes for SDS.
_target_: {module}.SqrtWeightSDS
name: sds_sqrt
guidance_scale: ${{prior.recommended.sds_guidance_scale}}
t_min: 0.02
t_max: 0.98
'''

GENERATOR_PY = '''
"""A text-conditioned dense grid of raw NeRF densities (a user's file): text -> linear -> voxels."""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amortized3d.generators.base import Generator
from amortized3d.generators.voxel_field import trilinear_lookup

BUILT = []  # the instances Hydra built (read by the test)


@dataclass
class DensityGridField:
    volume: Tensor  # [B, 4, R, R, R]: raw density + albedo logits
    bound: float
    kind: str = "density"  # the renderer picks NeRF density for it (renderer.density: auto)

    @property
    def batch_size(self) -> int:
        return self.volume.shape[0]

    def query(self, points: Tensor):
        lead = points.shape[:-1]
        feats = trilinear_lookup(self.volume, points.reshape(self.batch_size, -1, 3), self.bound)
        # a soft ball of radius 0.5 to start from, plus what the grid learns
        ball = 5.0 * (0.5 - points.reshape(self.batch_size, -1, 3).norm(dim=-1))
        return (feats[..., 0] + ball).reshape(lead), torch.sigmoid(feats[..., 1:]).reshape(*lead, 3)


class TextGridGenerator(Generator):
    field_kind = "density"

    def __init__(self, text_dim: int, resolution: int, bound: float):
        super().__init__()
        self.resolution, self.bound = int(resolution), float(bound)
        self.to_grid = nn.Linear(text_dim, 4 * self.resolution ** 3)
        nn.init.zeros_(self.to_grid.weight)
        self.initial = [p.detach().clone() for p in self.parameters()]
        BUILT.append(self)

    def forward(self, text_emb: Tensor, prompt_ids: Tensor, z=None) -> DensityGridField:
        r = self.resolution
        volume = self.to_grid(text_emb.to(self.to_grid.weight.dtype)).reshape(-1, 4, r, r, r)
        return DensityGridField(volume, self.bound)
'''

GENERATOR_YAML = '''
# A text-conditioned density grid; its bound is the prior's one scene bound, its resolution the
# capacity the prior publishes for it (16 where it publishes none).
_target_: {module}.TextGridGenerator
text_dim: ${{prior.text_encoder.embedding_dim}}
resolution: ${{oc.select:prior.capacity.text_grid.resolution,16}}
bound: ${{prior.scene_bound}}
'''


def _plugin(tmp_path: Path, monkeypatch, module: str, code: str, group: str, name: str, yaml: str) -> list[str]:
    """Write ``<module>.py`` and ``configs/<group>/<name>.yaml`` under tmp_path: the only two files."""
    code_dir, config_dir = tmp_path / "plugin", tmp_path / "plugin_configs"
    (config_dir / group).mkdir(parents=True)
    code_dir.mkdir()
    (code_dir / f"{module}.py").write_text(textwrap.dedent(code))
    (config_dir / group / f"{name}.yaml").write_text(textwrap.dedent(yaml.format(module=module)))
    monkeypatch.syspath_prepend(str(code_dir))
    monkeypatch.delitem(sys.modules, module, raising=False)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted([f"{module}.py", f"{name}.yaml"])
    return [f"hydra.searchpath=[file://{config_dir}]", f"{group}={name}"]


def test_a_new_sds_weighting_is_one_py_and_one_yaml_and_trains_at_the_priors_cfg(tmp_path, cache_dir, monkeypatch):
    overrides = _plugin(tmp_path, monkeypatch, "a3d_user_sds_sqrt", GUIDANCE_PY, "guidance", "sds_sqrt",
                        GUIDANCE_YAML)
    run = tmp_path / "run"
    cfg = compose(run, cache_dir, *overrides)
    analytic_cfg = cfg.prior.recommended.sds_guidance_scale
    sd_cfg = compose(run, cache_dir, *overrides, "prior=stable_diffusion", tiny=False).guidance.guidance_scale
    assert (analytic_cfg, sd_cfg) == (7.5, 100.0)  # the analytic prior's, not SD's DreamFusion 100

    metrics = train(cfg)
    built = sys.modules["a3d_user_sds_sqrt"].BUILT
    assert len(built) == 1 and type(built[0]).__name__ == "SqrtWeightSDS"
    assert built[0].guidance_scale == analytic_cfg == 7.5  # the effective CFG of the trained guidance
    assert type(built[0].prior).__name__ == "AnalyticPrior"
    assert built[0].weight_calls >= 3  # its own w(t) ran at every step
    assert metrics["training"]["steps"] == 3 and metrics["training"]["guidance"] == "sds_sqrt"
    assert metrics["training"]["nonfinite_steps"] == 0


def test_a_new_generator_is_one_py_and_one_yaml_plus_a_capacity_line(tmp_path, cache_dir, monkeypatch):
    overrides = _plugin(tmp_path, monkeypatch, "a3d_user_text_grid", GENERATOR_PY, "generator", "text_grid",
                        GENERATOR_YAML)
    # the optional capacity line (in prior/analytic.yaml it would read `text_grid: {resolution: 8}`)
    cfg = compose(tmp_path / "run", cache_dir, *overrides, "+prior.capacity.text_grid.resolution=8",
                  "evaluation.splits=[val]")
    assert compose(tmp_path / "run", cache_dir, *overrides).generator.resolution == 16  # its own default

    metrics = train(cfg)
    built = sys.modules["a3d_user_text_grid"].BUILT
    assert len(built) == 1
    generator = built[0]
    assert (generator.resolution, generator.bound) == (8, 1.0)  # the capacity line; the analytic scene bound
    assert generator.bound == cfg.renderer.bound_radius  # one scene bound
    moved = [not (p.detach() == p0).all() for p, p0 in zip(generator.parameters(), generator.initial)]
    assert any(moved)  # 3 steps trained it, through the default renderer (its density kind -> NeRF)
    assert metrics["training"]["steps"] == 3 and metrics["training"]["generator"] == "TextGridGenerator"
    assert metrics["training"]["nonfinite_steps"] == 0
    assert metrics["oracle"]["val"]["overall"]["num_prompts"] == 12  # scored against the world like the others
