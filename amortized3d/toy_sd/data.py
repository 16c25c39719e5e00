"""The toy SD's training set: the world's reference renders, their captions, and the exact latent denoiser.

Captions are what ``StableDiffusionPrior`` feeds its UNet on this world: ``view_template`` applied to
the prompt and the camera's view bucket ("a red cube, front view"), the bare prompt (``view_dependent:
false``) and the empty string (the negative prompt / CFG's unconditional branch).

``exact_x0`` is the analytic prior's denoiser (priors/analytic.py) in latent space, over Diracs at
the reference latents r_i allowed by the caption c:

    E[x0 | x_t, c] = sum_i w_i r_i,   w = softmax_{i in c}( -||x_t - sqrt(abar) r_i||^2 / (2 (1 - abar)) ).

It is the regression target of the UNet (the minimiser of the denoising loss on this data set) and the
reference its quality is measured against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from amortized3d.cameras import VIEW_LABELS
from amortized3d.priors.sd_conditioning import view_prompt
from amortized3d.scenes.primitives import PrimitivesWorld
from amortized3d.scenes.references import build_reference_set

VIEW_TEMPLATE = "{prompt}, {view} view"  # configs/prior/stable_diffusion.yaml's view_template


def reference_images(resolution: int, views_per_object: int, camera: Mapping[str, Sequence[float]],
                     cache_dir: str | None, seed: int):
    """The world's reference renders (cached and checksummed by scenes/references.py)."""
    return build_reference_set("primitives", views_per_object, resolution, camera, cache_dir, seed)


@dataclass
class Captions:
    """Every caption of the training set, and for each the references its condition allows."""

    texts: list[str]  # [C]
    masks: Tensor  # [C, M] bool
    view_caption: Tensor  # [M] index of each reference's "<prompt>, <view> view" caption
    plain_caption: Tensor  # [M] index of each reference's bare prompt
    empty_caption: int  # index of ""

    @classmethod
    def build(cls, object_ids: Tensor, view_ids: Tensor, world: PrimitivesWorld | None = None,
              template: str = VIEW_TEMPLATE) -> "Captions":
        world = world or PrimitivesWorld()
        texts: list[str] = [""]
        masks = [torch.ones_like(object_ids, dtype=torch.bool)]
        index: dict[tuple[int, int], int] = {}
        for o in sorted(set(object_ids.tolist())):
            index[(o, -1)] = len(texts)
            texts.append(world.prompt(o))
            masks.append(object_ids == o)
            for v in sorted(set(view_ids[object_ids == o].tolist())):
                index[(o, v)] = len(texts)
                texts.append(view_prompt(world.prompt(o), VIEW_LABELS[v], template))
                masks.append((object_ids == o) & (view_ids == v))
        pairs = list(zip(object_ids.tolist(), view_ids.tolist()))
        return cls(texts, torch.stack(masks), torch.tensor([index[p] for p in pairs]),
                   torch.tensor([index[(o, -1)] for o, _ in pairs]), 0)

    def sample(self, ref_idx: Tensor, empty_fraction: float, plain_fraction: float, g: torch.Generator) -> Tensor:
        """A caption index per reference: empty / bare prompt / view-dependent prompt."""
        u = torch.rand(ref_idx.shape[0], generator=g)
        caption = self.view_caption[ref_idx].clone()
        caption[u < empty_fraction + plain_fraction] = self.plain_caption[ref_idx][u < empty_fraction + plain_fraction]
        caption[u < empty_fraction] = self.empty_caption
        return caption


def exact_x0(x_t: Tensor, sqrt_abar: Tensor, references: Tensor, mask: Tensor) -> Tensor:
    """E[x0 | x_t] over Diracs at ``references`` [M,...] allowed by ``mask`` [N,M]; x_t [N,...], sqrt_abar [N]."""
    n = x_t.shape[0]
    x = x_t.reshape(n, -1).double()
    r = references.reshape(references.shape[0], -1).double()
    sa = sqrt_abar.double().reshape(n, 1)
    var = 1.0 - sa ** 2
    # -||x - sa r||^2 / 2 var, dropping the per-row ||x||^2 (cancels in the softmax)
    logits = (sa * (x @ r.T) - 0.5 * sa ** 2 * (r * r).sum(1)[None]) / var
    logits = logits.masked_fill(~mask, float("-inf"))
    return (torch.softmax(logits, 1) @ r).float().reshape(x_t.shape)
