"""The score-distillation interface and the pieces every objective shares.

A guidance turns renders into per-item losses whose gradient w.r.t. the render is the
distillation gradient. Objectives with their own trainable model (the VSD family) expose
it as one ``AuxiliaryModel`` (``Guidance.auxiliary``: the model, its loss, its optimizer, when
it is updated); ``amortized3d.update_order`` is the one place that executes that ordering.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from amortized3d.cameras import CameraBatch
from amortized3d.guidance.auxiliary import AuxiliaryModel
from amortized3d.priors.base import Prior
from amortized3d.priors.schedule import per_item
from amortized3d.schedules import Scheduled, TimestepSampler


@dataclass
class GuidanceInput:
    rgb: Tensor  # [N,3,H,W] renders in [0,1], N = B*V (prompt-major)
    cameras: CameraBatch  # N cameras
    prompts: Sequence[str]  # N prompts (repeated per view)
    step: int  # global training step (drives schedules)
    rng: torch.Generator | None = None  # per-step RNG: reproducible and resumable
    text_emb: Tensor | None = None  # [N,E] prompt embeddings (score models condition on them)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. normals for SDI's convexity loss
    # Shared by every input the system builds from one step's renders (the guidance, its auxiliary
    # and its detached inputs): ``Guidance.encode`` keeps the encoded renders here, so the VAE runs
    # once per step however many times and in whatever order the step asks for x0. ``"rgb"``: the
    # renders *with* their graph (what the detached inputs were detached from). Empty: no sharing.
    memo: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuidanceOutput:
    losses: dict[str, Tensor]  # name -> per-item loss [N] (the system weights and reduces)
    logs: dict[str, Tensor] = field(default_factory=dict)  # scalars for the logger


def distillation_loss(x0: Tensor, grad: Tensor) -> Tensor:
    """Per-item loss whose gradient w.r.t. ``x0`` is exactly ``grad`` (the SDS reparameterisation).

    0.5 * ||x0 - sg(x0 - grad)||^2 summed over each item's elements.
    """
    target = (x0 - grad).detach()
    return 0.5 * (x0 - target).pow(2).flatten(1).sum(dim=1)


#: w(t) by name. ``fantasia3d`` is threestudio's ``weighting_strategy: fantasia3d`` (also the commented-out
#: alternative in ProlificDreamer's sd.py): sqrt(abar) (1 - abar), i.e. alpha_t sigma_t^2.
WEIGHTINGS = ("sds", "uniform", "fantasia3d")
# Names that once meant something else; rejected with the reason rather than silently reinterpreted.
_RETIRED_WEIGHTINGS = {
    "snr": "it computed sqrt(abar (1 - abar)), which is neither the SNR abar / (1 - abar) nor fantasia3d's "
           "sqrt(abar) (1 - abar); use weighting=fantasia3d for the latter",
}


def check_weighting(kind: str) -> str:
    """``kind`` if it names a weighting, else a ValueError listing the valid ones (at build time)."""
    if kind in _RETIRED_WEIGHTINGS:
        raise ValueError(f"timestep weighting {kind!r} was removed: {_RETIRED_WEIGHTINGS[kind]}")
    if kind not in WEIGHTINGS:
        raise ValueError(f"unknown timestep weighting {kind!r}; valid: {', '.join(WEIGHTINGS)}")
    return kind


def timestep_weight(kind: str, alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """w(t): ``sds`` = sigma_t^2 = 1 - abar_t (DreamFusion Eq. 3; ProlificDreamer App. F), ``uniform`` = 1,
    ``fantasia3d`` = sqrt(abar_t) (1 - abar_t) (threestudio's fantasia3d strategy)."""
    a = alphas_cumprod.to(t.device)[t]
    kind = check_weighting(kind)
    if kind == "sds":
        return 1.0 - a
    if kind == "uniform":
        return torch.ones_like(a)
    return a.sqrt() * (1.0 - a)


def expand_like(w: Tensor, x: Tensor) -> Tensor:
    return per_item(w, x).to(x.dtype)


class Guidance(nn.Module, abc.ABC):
    """Base class: holds the prior, the timestep sampler and the loss weight schedule."""

    needs_normals: bool = False  # renders must carry normals in ``extras["normal"]`` (SDI convexity)
    #: The guidance's own trainable model and how it is trained (the VSD family); None: nothing to train.
    auxiliary: AuxiliaryModel | None = None

    def __init__(self, prior: Prior, t_min: Any = 0.02, t_max: Any = 0.98, weighting: str = "sds",
                 loss_weight: Any = 1.0):
        super().__init__()
        self.prior = prior
        self.timesteps = TimestepSampler.from_config(t_min, t_max, prior.num_train_timesteps)
        self.weighting = check_weighting(weighting)  # a misspelling fails here, not at the first step
        self.loss_weight = Scheduled.parse(loss_weight)

    # --- shared pieces ------------------------------------------------------------------------
    def condition(self, inp: GuidanceInput) -> Any:
        return self.prior.camera_condition(list(inp.prompts), inp.cameras)

    def sample_noisy(self, x0: Tensor, inp: GuidanceInput) -> tuple[Tensor, Tensor, Tensor]:
        """(t [N], noise, x_t) with the annealed timestep range at this step."""
        t = self.timesteps.sample(x0.shape[0], inp.step, inp.rng, x0.device)
        noise = torch.randn(x0.shape, generator=inp.rng, dtype=x0.dtype).to(x0.device)
        return t, noise, self.prior.schedule.add_noise(x0, noise, t)

    def encode(self, inp: GuidanceInput) -> Tensor:
        """``prior.encode`` of the renders, computed once per ``inp.memo`` (once per training step).

        The first caller encodes the renders that carry the graph (``memo["rgb"]``, else
        ``inp.rgb``) with gradients; every caller gets that same x0, detached when its own
        ``inp.rgb`` does not require grad (the score model's inputs). So the VSD family's score
        loss, run before the generator's forward (L-VSD, L²-VSD) or after it (VSD), and the
        distillation loss share one VAE pass, and the values are those of separate encodes.
        """
        key = ("x0", id(self.prior))
        x0 = inp.memo.get(key)
        if x0 is None:
            source = inp.memo.get("rgb", inp.rgb)
            with torch.set_grad_enabled(torch.is_grad_enabled() and source.requires_grad):
                x0 = self.prior.encode(source)
            inp.memo[key] = x0
        return x0 if inp.rgb.requires_grad else x0.detach()

    def weight(self, t: Tensor) -> Tensor:
        return timestep_weight(self.weighting, self.prior.alphas_cumprod, t)

    @abc.abstractmethod
    def forward(self, inp: GuidanceInput) -> GuidanceOutput:  # noqa: D401
        """The distillation loss of the renders in ``inp``."""
