"""Text conditions for Stable Diffusion: view-dependent prompts, negative prompt, Perp-Neg.

View-dependent prompting (DreamFusion §3.2): the camera's view bucket (front / side / back /
overhead, thresholds in ``amortized3d.cameras.ViewThresholds``: |azimuth| < 30 deg front,
> 150 deg back, elevation > 60 deg overhead) is appended to the prompt, "<prompt>, front view".

Perp-Neg (Armandpour et al. 2023, Eq. 8), as threestudio implements it (``get_text_embeddings_perp_neg``
and ``perpendicular_component``; SDI's and ScaleDreamer's public configs use it):

    eps = eps_u + s * (e_pos - sum_k w_k * perp(e_k, e_pos)),   e = eps_prompt - eps_u,
    perp(x, y) = x - <x, y> / max(||y||^2, 1e-6) * y   (per item).

The positive prompt embedding is interpolated along the azimuth a (degrees, 0 = front), and the
two negatives and their weights follow a shifted exponential decay f(r) = alpha exp(-beta r) + c:

- |a| < 90: r = 1 - |a|/90 (1 front, 0 side); positive r E_front + (1-r) E_side;
  negatives E_front with w = f_fs(r), E_side with w = f_sf(1 - r);
- |a| >= 90: r = 2 - |a|/90 (1 side, 0 back); positive r E_side + (1-r) E_back;
  negatives E_side with w = f_sb(r), E_front with w = f_fsb(r);
- overhead views: positive E_overhead, no negatives (weights 0).

threestudio's defaults (alpha, beta, c): f_fs = f_sf = (4, 0.5, -2.426), f_sb = (1, 0.5, -0.606),
f_fsb = (1, 0.5, 0.967), so e.g. f_fs(1) = 0 (a front view does not push away "front") and a back
view rejects "front" with weight f_fsb(0) = 1.967. threestudio stores -f and adds; same thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from amortized3d.priors.schedule import per_item

# threestudio PromptProcessor.Config defaults: (alpha, beta, c) of f(r) = alpha exp(-beta r) + c.
PERP_NEG_DECAY: dict[str, tuple[float, float, float]] = {
    "f_sb": (1.0, 0.5, -0.606), "f_fsb": (1.0, 0.5, 0.967), "f_fs": (4.0, 0.5, -2.426), "f_sf": (4.0, 0.5, -2.426)}
PERP_NEG_VIEWS = ("front", "side", "back", "overhead")  # the prompt embeddings Perp-Neg mixes


def view_prompt(prompt: str, view: str | None, template: str = "{prompt}, {view} view") -> str:
    """The prompt as seen from ``view``; blank prompts (the unconditional branch) stay blank."""
    if view is None or not prompt.strip():
        return prompt
    return template.format(prompt=prompt, view=view)


@dataclass
class SDCondition:
    """Per-item token embeddings: ``cond``/``uncond`` [N,L,E]; Perp-Neg ``negatives`` [N,K,L,E] with
    ``negative_weights`` [N,K] (the w_k above; 0 where an item has no negative)."""

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


def shifted_exponential_decay(params: Sequence[float], r: Tensor) -> Tensor:
    alpha, beta, c = params
    return alpha * torch.exp(-beta * r) + c


def perp_neg_mixing(azimuth_deg: Tensor, overhead: Tensor, decay: dict[str, Sequence[float]] | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """threestudio's Perp-Neg interpolation per item, over the views ``PERP_NEG_VIEWS``.

    Returns (positive mixing weights [N,4], negative view indices [N,2], negative weights w [N,2]).
    ``azimuth_deg`` [N] (any range; wrapped to [-180, 180)), ``overhead`` [N] bool.
    """
    d = {**PERP_NEG_DECAY, **(decay or {})}
    a = torch.remainder(azimuth_deg.double() + 180.0, 360.0) - 180.0
    n = a.shape[0]
    front, side, back, top = range(4)
    mix = torch.zeros(n, 4, dtype=torch.float64)
    neg = torch.zeros(n, 2, dtype=torch.long)
    w = torch.zeros(n, 2, dtype=torch.float64)
    fs = a.abs() < 90
    r = torch.where(fs, 1 - a.abs() / 90, 2 - a.abs() / 90)
    # front-side: r E_front + (1 - r) E_side; negatives front (f_fs(r)), side (f_sf(1 - r))
    mix[fs, front], mix[fs, side] = r[fs], 1 - r[fs]
    neg[fs] = torch.tensor([front, side])
    w[fs, 0], w[fs, 1] = shifted_exponential_decay(d["f_fs"], r[fs]), shifted_exponential_decay(d["f_sf"], 1 - r[fs])
    sb = ~fs  # side-back: r E_side + (1 - r) E_back; negatives side (f_sb(r)), front (f_fsb(r))
    mix[sb, side], mix[sb, back] = r[sb], 1 - r[sb]
    neg[sb] = torch.tensor([side, front])
    w[sb, 0], w[sb, 1] = shifted_exponential_decay(d["f_sb"], r[sb]), shifted_exponential_decay(d["f_fsb"], r[sb])
    over = overhead.to(torch.bool).reshape(-1)
    mix[over] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    w[over] = 0.0
    return mix, neg, w


def perpendicular(x: Tensor, y: Tensor) -> Tensor:
    """Component of x perpendicular to y, per item (flattened over all but the first dim);
    ||y||^2 floored at 1e-6 as threestudio's ``perpendicular_component``."""
    xf, yf = x.flatten(1), y.flatten(1)
    coef = (xf * yf).sum(1) / yf.pow(2).sum(1).clamp_min(1e-6)
    return x - per_item(coef, x) * y


def combine_perp_neg(eps_u: Tensor, eps_c: Tensor, eps_neg: Tensor, weights: Tensor, scale: float) -> Tensor:
    """eps_u + s (e_pos - sum_k w_k perp(e_k, e_pos)); ``eps_neg`` [N,K,...], ``weights`` [N,K]."""
    e_pos = eps_c - eps_u
    acc = torch.zeros_like(e_pos)
    for k in range(eps_neg.shape[1]):
        w = per_item(weights[:, k], e_pos).to(e_pos)
        acc = acc + w * perpendicular(eps_neg[:, k] - eps_u, e_pos)
    return eps_u + scale * (e_pos - acc)

