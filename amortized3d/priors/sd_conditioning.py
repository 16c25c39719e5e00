"""Text conditions for Stable Diffusion: view-dependent prompts, negative prompt, Perp-Neg.

View-dependent prompting (DreamFusion §3.2): the camera's view bucket (front / side / back /
overhead, thresholds in ``amortized3d.cameras.ViewThresholds``: |azimuth| < 30 deg front,
> 150 deg back, elevation > 60 deg overhead) is appended to the prompt, "<prompt>, front view".

Perp-Neg (Armandpour et al. 2023, Eq. 8): the other views' prompts act as negatives, but only
through the component of their guidance direction perpendicular to the positive one, so they
remove "front-ness" from a back view without cancelling the prompt itself:

    eps = eps_u + s * (e_pos - sum_k w_k * perp(e_k, e_pos)),   e = eps_prompt - eps_u,
    perp(x, y) = x - <x, y> / ||y||^2 * y   (per item).

Negatives per view (front <-> back are the Janus confusions; a side view rejects both): front:
[back], back: [front], side: [front, back], overhead: none. One weight w for all negatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

PERP_NEG_NEGATIVES: dict[str, tuple[str, ...]] = {"front": ("back",), "back": ("front",),
                                                   "side": ("front", "back"), "overhead": ()}


def view_prompt(prompt: str, view: str | None, template: str = "{prompt}, {view} view") -> str:
    """The prompt as seen from ``view``; blank prompts (the unconditional branch) stay blank."""
    if view is None or not prompt.strip():
        return prompt
    return template.format(prompt=prompt, view=view)


@dataclass
class SDCondition:
    """Per-item token embeddings: ``cond``/``uncond`` [N,L,E]; Perp-Neg ``negatives`` [N,K,L,E] with
    ``negative_weights`` [N,K] (0 marks padding where an item has fewer than K negatives)."""

    cond: Tensor
    uncond: Tensor
    negatives: Tensor | None = None
    negative_weights: Tensor | None = None

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def index(self, idx) -> "SDCondition":
        neg = None if self.negatives is None else self.negatives[idx]
        w = None if self.negative_weights is None else self.negative_weights[idx]
        return SDCondition(self.cond[idx], self.uncond[idx], neg, w)

    def repeat_interleave(self, repeats: int) -> "SDCondition":
        def rep(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.repeat_interleave(repeats, dim=0)

        return SDCondition(rep(self.cond), rep(self.uncond), rep(self.negatives), rep(self.negative_weights))


def perp_neg_prompts(prompts: Sequence[str], views: Sequence[str], template: str
                     ) -> tuple[list[list[str]], int]:
    """Negative prompts per item (padded by repetition to the max count K) and K."""
    lists = [[view_prompt(p, v, template) for v in PERP_NEG_NEGATIVES.get(view, ())] if p.strip() else []
             for p, view in zip(prompts, views)]
    k = max((len(x) for x in lists), default=0)
    return lists, k


def perpendicular(x: Tensor, y: Tensor) -> Tensor:
    """Component of x perpendicular to y, per item (flattened over all but the first dim)."""
    xf, yf = x.flatten(1), y.flatten(1)
    coef = (xf * yf).sum(1) / yf.pow(2).sum(1).clamp_min(1e-12)
    return x - coef.reshape(-1, *([1] * (x.dim() - 1))) * y


def combine_perp_neg(eps_u: Tensor, eps_c: Tensor, eps_neg: Tensor, weights: Tensor, scale: float) -> Tensor:
    """eps_u + s (e_pos - sum_k w_k perp(e_k, e_pos)); ``eps_neg`` [N,K,...], ``weights`` [N,K]."""
    e_pos = eps_c - eps_u
    acc = torch.zeros_like(e_pos)
    for k in range(eps_neg.shape[1]):
        w = weights[:, k].reshape(-1, *([1] * (e_pos.dim() - 1))).to(e_pos)
        acc = acc + w * perpendicular(eps_neg[:, k] - eps_u, e_pos)
    return eps_u + scale * (e_pos - acc)
