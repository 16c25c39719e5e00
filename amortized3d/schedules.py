"""Values that change with the training step: timestep ranges, loss-weight ramps, lr warmups.

One mechanism for every guidance and regulariser. A config value is either a number
(constant) or a list of ``[step, value]`` milestones interpolated piecewise-linearly
(``interpolation: step`` holds each value until the next milestone)::

    t_max: [[0, 0.98], [5000, 0.5]]                    # linear anneal 0.98 -> 0.5 over 5k steps
    lambda_eikonal: {milestones: [[0, 100], [2000, 1]], interpolation: step}
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class Scheduled:
    """A scalar as a function of the global step."""

    milestones: tuple[tuple[int, float], ...]
    interpolation: Literal["linear", "step"] = "linear"

    def __post_init__(self) -> None:
        if not self.milestones:
            raise ValueError("a schedule needs at least one [step, value] milestone")
        steps = [s for s, _ in self.milestones]
        if steps != sorted(steps):
            raise ValueError(f"schedule milestones must have increasing steps, got {steps}")
        if self.interpolation not in ("linear", "step"):
            raise ValueError(f"interpolation must be 'linear' or 'step', got {self.interpolation!r}")

    @classmethod
    def constant(cls, value: float) -> "Scheduled":
        return cls(((0, float(value)),))

    @classmethod
    def parse(cls, spec: Any) -> "Scheduled":
        """Accept a number, a list of [step, value] pairs, or {milestones, interpolation}."""
        if isinstance(spec, Scheduled):
            return spec
        if isinstance(spec, (int, float)):
            return cls.constant(spec)
        if isinstance(spec, Mapping):
            return cls(_pairs(spec["milestones"]), spec.get("interpolation", "linear"))
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return cls(_pairs(spec))
        raise TypeError(f"cannot read a schedule from {spec!r}: use a number, [[step, value], ...] "
                        "or {milestones: [[step, value], ...], interpolation: linear|step}")

    def __call__(self, step: int) -> float:
        steps = [s for s, _ in self.milestones]
        i = bisect.bisect_right(steps, step) - 1
        if i < 0:
            return self.milestones[0][1]
        if i == len(steps) - 1 or self.interpolation == "step":
            return self.milestones[i][1]
        (s0, v0), (s1, v1) = self.milestones[i], self.milestones[i + 1]
        return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


def _pairs(items: Any) -> tuple[tuple[int, float], ...]:
    out = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"schedule milestone {item!r} is not a [step, value] pair")
        out.append((int(item[0]), float(item[1])))
    return tuple(out)


@dataclass(frozen=True)
class TimestepSampler:
    """Samples integer diffusion timesteps t ~ U[t_min, t_max] * T with an annealed range.

    ``t_min``/``t_max`` are fractions of ``num_train_timesteps`` (DreamFusion's 0.02..0.98).
    """

    t_min: Scheduled
    t_max: Scheduled
    num_train_timesteps: int = 1000

    @classmethod
    def from_config(cls, t_min: Any, t_max: Any, num_train_timesteps: int = 1000) -> "TimestepSampler":
        return cls(Scheduled.parse(t_min), Scheduled.parse(t_max), num_train_timesteps)

    def range(self, step: int) -> tuple[int, int]:
        """Inclusive integer range [lo, hi] at ``step``."""
        T = self.num_train_timesteps
        lo = int(round(self.t_min(step) * T))
        hi = int(round(self.t_max(step) * T))
        lo, hi = max(0, min(lo, T - 1)), max(0, min(hi, T - 1))
        return min(lo, hi), max(lo, hi)

    def sample(self, n: int, step: int, rng: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        lo, hi = self.range(step)
        return torch.randint(lo, hi + 1, (n,), generator=rng).to(device)
