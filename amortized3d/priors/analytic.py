"""The exact denoiser of a finite image set: the CPU default prior.

Why: with no pretrained diffusion model available offline, the prior whose data distribution
is a uniform mixture of Diracs at reference renders r_i of a known world has a closed-form
optimal denoiser,

    E[x0 | x_t] = sum_i w_i r_i,   w = softmax_i( -||x_t - sqrt(abar) r_i||^2 / (2 (1 - abar)) ),

over the references allowed by the condition (the prompt's object, optionally only the
camera's view bucket; all references for the unconditional branch). This is exactly what a
perfectly trained diffusion model on that data set would predict, so score distillation
against it behaves like SDS/VSD against a real prior, on a world whose ground truth we know.
Pixel space, 3 channels, values in [-1, 1] (x0 = 2*rgb - 1).

``data_std`` = s > 0 replaces each Dirac by an isotropic Gaussian N(r_i, s^2 I) (a kernel density
estimate of the world instead of its samples). Still exact in closed form: with
v = abar s^2 + 1 - abar, w = softmax_i(-||x_t - sqrt(abar) r_i||^2 / 2v) and

    E[x0 | x_t] = sum_i w_i (r_i + c (x_t - sqrt(abar) r_i)),   c = sqrt(abar) s^2 / v.

Why: with Diracs, eps at t -> 0 is (x_t - sqrt(abar) r_nearest) / sqrt(1 - abar), which explodes for
any render that is not exactly a reference (a real model is smooth there); SDI's DDIM inversion
starts at t = 0 and inherits that blow-up. s only matters where the noise std falls below it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from amortized3d.cameras import VIEW_LABELS
from amortized3d.priors.base import Prior
from amortized3d.priors.schedule import NoiseSchedule, cfg_mix

UNCONDITIONAL = -1  # object id of the empty prompt: every reference is allowed


@dataclass
class ReferenceSet:
    """Reference renders of a world: ``images`` [M,3,h,w] in [0,1] of objects ``object_ids`` [M]
    seen from view buckets ``view_ids`` [M] (index into ``VIEW_LABELS``).

    ``object_sets`` [K, num_objects] bool (None: every condition is one object): a prompt's id k then
    names the SET of objects row k holds (scenes/open_world.py), and its conditional branch is the
    uniform mixture over the references of all of them."""

    images: Tensor
    object_ids: Tensor
    view_ids: Tensor
    prompt_to_object: Callable[[str], int] | Mapping[str, int] = field(repr=False)
    object_sets: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        m = self.images.shape[0]
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be [M,3,h,w], got {tuple(self.images.shape)}")
        self.object_ids = torch.as_tensor(self.object_ids, dtype=torch.long).reshape(-1)
        self.view_ids = torch.as_tensor(self.view_ids, dtype=torch.long).reshape(-1)
        if m == 0 or self.object_ids.shape[0] != m or self.view_ids.shape[0] != m:
            raise ValueError(f"need M>0 images with M object and view ids, got {m}, "
                             f"{self.object_ids.shape[0]}, {self.view_ids.shape[0]}")

    def object_of(self, prompt: str) -> int:
        """Object id of ``prompt``; the empty prompt is the unconditional branch."""
        if not prompt.strip():
            return UNCONDITIONAL
        if callable(self.prompt_to_object):
            return int(self.prompt_to_object(prompt))
        if prompt not in self.prompt_to_object:
            raise ValueError(f"prompt {prompt!r} has no reference object")
        return int(self.prompt_to_object[prompt])


@dataclass
class AnalyticCondition:
    """Per-sample condition: object ids [N] (-1 = unconditional) and view buckets [N] or None."""

    object_ids: Tensor
    view_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.object_ids.shape[0])

    def to(self, device: torch.device | str) -> "AnalyticCondition":
        views = None if self.view_ids is None else self.view_ids.to(device)
        return AnalyticCondition(self.object_ids.to(device), views)

    def index(self, idx: Tensor | slice | Sequence[int]) -> "AnalyticCondition":
        views = None if self.view_ids is None else self.view_ids[idx]
        return AnalyticCondition(self.object_ids[idx], views)

    def repeat_interleave(self, repeats: int) -> "AnalyticCondition":
        """Expand a per-prompt condition [B] to prompt-major renders [B*repeats]."""
        views = None if self.view_ids is None else self.view_ids.repeat_interleave(repeats)
        return replace(self, object_ids=self.object_ids.repeat_interleave(repeats), view_ids=views)


class AnalyticPrior(Prior):
    """Exact posterior-mean denoiser of a ``ReferenceSet`` in [-1,1] pixel space (frozen)."""

    def __init__(self, references: ReferenceSet, schedule: NoiseSchedule | None = None,
                 view_dependent: bool = False, chunk_size: int = 256, data_std: float = 0.0):
        super().__init__()
        if data_std < 0:
            raise ValueError(f"data_std must be >= 0, got {data_std}")
        self.data_std = float(data_std)
        self.references = references
        self.schedule = schedule if schedule is not None else NoiseSchedule.scaled_linear()
        self.view_dependent = view_dependent
        self.chunk_size = int(chunk_size)
        refs = (references.images.float() * 2.0 - 1.0).flatten(1)  # [M, D]
        # Centring keeps the float32 dot products well conditioned (any shift cancels exactly).
        mean = refs.mean(0)
        centred = refs - mean
        # Non-persistent: rebuilt from the world, never checkpointed.
        self.register_buffer("ref_centred", centred, persistent=False)
        self.register_buffer("ref_mean", mean, persistent=False)
        self.register_buffer("ref_sqnorm", (centred * centred).sum(1), persistent=False)
        self.register_buffer("ref_object_ids", references.object_ids.clone(), persistent=False)
        self.register_buffer("ref_view_ids", references.view_ids.clone(), persistent=False)
        # [K, M]: which references each object set allows (None: a condition is one object id).
        sets = references.object_sets
        self.register_buffer("set_ref_mask", None if sets is None else
                             torch.as_tensor(sets, dtype=torch.bool)[:, references.object_ids], persistent=False)
        self._shape = tuple(references.images.shape[1:])
        self.requires_grad_(False)
        self.eval()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def num_references(self) -> int:
        return int(self.ref_centred.shape[0])

    def encode(self, rgb: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] -> [N,3,h,w] in [-1,1]; antialiased (differentiable) resize."""
        h, w = self._shape[1:]
        if rgb.shape[-2:] != (h, w):
            rgb = F.interpolate(rgb, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return rgb * 2.0 - 1.0

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0 + 1.0) * 0.5).clamp(0.0, 1.0)

    def text_condition(self, prompts: Sequence[str], view_labels: Sequence[str] | Tensor | None = None
                       ) -> AnalyticCondition:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.tensor([self.references.object_of(p) for p in prompts], dtype=torch.long)
        views = None
        if view_labels is not None:
            if isinstance(view_labels, Tensor):
                views = view_labels.long().reshape(-1).cpu()
            else:
                views = torch.tensor([VIEW_LABELS.index(v) if isinstance(v, str) else int(v)
                                      for v in view_labels], dtype=torch.long)
            if views.shape[0] != ids.shape[0]:
                raise ValueError(f"{len(views)} view labels for {len(ids)} prompts")
        return AnalyticCondition(ids.to(self.ref_centred.device),
                                 None if views is None else views.to(self.ref_centred.device))

    def condition_mask(self, cond: AnalyticCondition) -> Tensor:
        """[N, M] bool: references each sample's conditional branch may use."""
        obj = cond.object_ids.to(self.ref_object_ids.device)
        if self.set_ref_mask is None:
            mask = (self.ref_object_ids[None, :] == obj[:, None]) | (obj[:, None] == UNCONDITIONAL)
        else:  # an open world: id k allows the references of every object of set k
            if int(obj.max()) >= self.set_ref_mask.shape[0]:
                raise ValueError(f"object-set ids {obj[obj >= self.set_ref_mask.shape[0]].unique().tolist()} "
                                 f"outside the world's {self.set_ref_mask.shape[0]} sets")
            mask = self.set_ref_mask[obj.clamp(min=0)] | (obj[:, None] == UNCONDITIONAL)
        empty = ~mask.any(1)
        if empty.any():
            raise ValueError(f"no reference images for object ids {obj[empty].unique().tolist()}")
        if self.view_dependent and cond.view_ids is not None:
            views = cond.view_ids.to(mask.device)
            in_bucket = mask & (self.ref_view_ids[None, :] == views[:, None])
            # Fall back to all of the object's views where its bucket has no reference.
            mask = torch.where(in_bucket.any(1, keepdim=True), in_bucket, mask)
        return mask

    def posterior_mean(self, x_t: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        """Exact E[x0 | x_t] over the references allowed by ``mask`` [N,M] (None: all), float32."""
        n = x_t.shape[0]
        x = x_t.reshape(n, -1).float()
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(n).long()
        abar = self.schedule.alphas_cumprod.to(x.device)[t].double()
        sa = abar.sqrt().float()
        var = abar * self.data_std ** 2 + (1.0 - abar)  # of x_t given the component (float64: 1 - abar ~ 1e-12)
        inv_var = (1.0 / var).float()
        shrink = (abar.sqrt() * self.data_std ** 2 / var).float()  # c: pull of x_t inside a component
        chunks = []
        for s in range(0, n, self.chunk_size):
            e = slice(s, s + self.chunk_size)
            # -||x - sa (mu + c)||^2 / 2(1-a) = const_row + (sa <x - sa mu, c> - a/2 ||c||^2) / (1-a)
            xc = x[e] - sa[e, None] * self.ref_mean
            logits = (sa[e, None] * (xc @ self.ref_centred.T)
                      - 0.5 * (sa[e, None] ** 2) * self.ref_sqnorm[None, :]) * inv_var[e, None]
            if mask is not None:
                logits = logits.masked_fill(~mask[e].to(logits.device), float("-inf"))
            weights = torch.softmax(logits, dim=1)  # max-subtracted, i.e. logsumexp-stable
            mixture_mean = self.ref_mean + weights @ self.ref_centred
            if self.data_std > 0:  # sum_i w_i (r_i + c (x_t - sa r_i))
                mixture_mean = mixture_mean + shrink[e, None] * (x[e] - sa[e, None] * mixture_mean)
            chunks.append(mixture_mean)
        return torch.cat(chunks).reshape(x_t.shape)

    def _x0_branches(self, x_t: Tensor, t: Tensor, cond: AnalyticCondition, guidance_scale: float
                     ) -> tuple[Tensor | None, Tensor | None]:
        x0_c = self.posterior_mean(x_t, t, self.condition_mask(cond)) if guidance_scale != 0 else None
        x0_u = self.posterior_mean(x_t, t, None) if guidance_scale != 1 else None
        return x0_c, x0_u

    def predict_x0(self, x_t: Tensor, t: Tensor, cond: AnalyticCondition, guidance_scale: float = 1.0) -> Tensor:
        """CFG in x0 space; identical to CFG in eps space since eps is affine in x0 at fixed x_t."""
        x0_c, x0_u = self._x0_branches(x_t, t, cond, guidance_scale)
        if x0_u is None:
            x0 = x0_c
        elif x0_c is None:
            x0 = x0_u
        else:
            x0 = cfg_mix(x0_u, x0_c, guidance_scale)
        return x0.to(x_t.dtype)

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: AnalyticCondition, guidance_scale: float = 1.0) -> Tensor:
        """eps_u + s (eps_c - eps_u) with eps_* = (x_t - sqrt(abar) x0_*) / sqrt(1 - abar)."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        x0_c, x0_u = self._x0_branches(x_t, t, cond, guidance_scale)
        xf = x_t.float()
        eps_c = None if x0_c is None else self.schedule.eps_from_x0(xf, x0_c, t)
        eps_u = None if x0_u is None else self.schedule.eps_from_x0(xf, x0_u, t)
        if eps_u is None:
            eps = eps_c
        elif eps_c is None:
            eps = eps_u
        else:
            eps = cfg_mix(eps_u, eps_c, guidance_scale)
        return eps.to(x_t.dtype)
