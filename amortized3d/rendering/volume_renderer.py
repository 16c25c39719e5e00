"""Differentiable two-stage volume renderer for batches of fields (one per prompt).

All rays of all views of field ``b`` go through a single ``field.query`` call per stage, so a
hypernetwork or 3D-conv generator evaluates its B fields in one batched pass; the only
Python loop is over ray chunks, used when ``chunk_rays`` bounds memory for large renders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cameras import CameraBatch
from ..generators.base import Field, query_geometry
from . import regularizers as regs
from .backgrounds import Background, SolidBackground
from .densities import (DENSITY_ACTIVATIONS, central_difference_gradient, central_difference_points,
                        composite_weights, nerf_density, sample_deltas, volsdf_density)
from .output import RenderOutput
from .sampling import sample_pdf, stratified_samples

_DENSITY_FOR_KIND = {"sdf": "volsdf", "density": "nerf"}


def kept_first(keep: Tensor, k: int) -> Tensor:
    """Per row of ``keep`` [B, N] (bool), the indices of its True entries in order, then of its False ones in
    order, cut to the first ``k`` [B, k]: the stable ``argsort`` of ``~keep``, which packs each field's kept
    samples first (padded to the largest count ``k``).

    On CPU it is one ``nonzero`` per row (two where a row keeps fewer than ``k``): the same indices, 2.8x faster
    than the stable sort for the quickstart's training render and 8-13x for the evaluation's [1, 524288] chunks
    (docs/results.md, session 18). Elsewhere (CUDA) the sort, which needs no host sync per row.
    """
    if keep.device.type != "cpu":
        return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    rows = []
    for row in keep:
        first = row.nonzero().squeeze(1)[:k]
        if first.numel() < k:
            first = torch.cat([first, (~row).nonzero().squeeze(1)[:k - first.numel()]])
        rows.append(first)
    return torch.stack(rows)


@dataclass
class _RayResults:
    """Composited quantities for a chunk of rays, laid out [B, R, ...]."""

    color: Tensor  # [B,R,3] sum of w * albedo (before the background)
    opacity: Tensor  # [B,R]
    depth: Tensor  # [B,R]
    normal: Tensor | None  # [B,R,3]
    eikonal_sum: Tensor | None  # [B] sum of per-sample residuals
    num_samples: int  # samples per field in this chunk (for the eikonal mean)


class VolumeRenderer(nn.Module):
    """Stratified + importance-sampled alpha compositing of VolSDF or NeRF densities.

    ``self.training`` selects jittered samples and random quantiles (unbiased, needs a
    generator for reproducibility); eval mode uses bin midpoints and fixed quantiles, so eval
    renders are deterministic.
    """

    def __init__(self, near: float = 0.1, far: float = 4.0, num_samples: int = 128, num_importance: int = 64,
                 density: str = "auto", volsdf_inv_std: float = 30.0,
                 nerf_density_activation: str = "softplus", normal_eps: float = 0.01,
                 chunk_rays: int | None = None, bound_radius: float | None = None,
                 skip_empty_space: bool = False, skip_tau_threshold: float = 1e-5,
                 skip_transmittance: float = 1e-4, proposal_albedo: bool = True) -> None:
        super().__init__()
        if not 0.0 <= near < far:
            raise ValueError(f"need 0 <= near < far, got near={near}, far={far}")
        if num_samples < 1 or num_importance < 0:
            raise ValueError(f"need num_samples >= 1 and num_importance >= 0, got {num_samples}, {num_importance}")
        if density != "auto" and density not in _DENSITY_FOR_KIND.values():
            raise ValueError(f"density must be 'auto', 'volsdf' or 'nerf', got {density!r}")
        if nerf_density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(f"nerf_density_activation must be one of {DENSITY_ACTIVATIONS}")
        if volsdf_inv_std <= 0 or normal_eps <= 0:
            raise ValueError("volsdf_inv_std and normal_eps must be positive")
        if chunk_rays is not None and chunk_rays < 1:
            raise ValueError(f"chunk_rays must be positive or None, got {chunk_rays}")
        self.near, self.far = float(near), float(far)
        self.num_samples, self.num_importance = int(num_samples), int(num_importance)
        self.density = density
        self.volsdf_inv_std = float(volsdf_inv_std)
        self.nerf_density_activation = nerf_density_activation
        self.normal_eps = float(normal_eps)
        self.chunk_rays = chunk_rays
        if bound_radius is not None and bound_radius <= 0:
            raise ValueError(f"bound_radius must be positive or None, got {bound_radius}")
        # Samples only where the scene can be: [near, far] clipped to this sphere per ray.
        self.bound_radius = bound_radius
        if skip_tau_threshold < 0 or not 0.0 <= skip_transmittance < 1.0:
            raise ValueError("need skip_tau_threshold >= 0 and 0 <= skip_transmittance < 1")
        # Empty-space skipping + early ray termination from the (gradient-free) proposal pass,
        # which is each generated field's own coarse occupancy estimate: see _occupied.
        self.skip_empty_space = bool(skip_empty_space)
        self.skip_tau_threshold = float(skip_tau_threshold)
        self.skip_transmittance = float(skip_transmittance)
        # Where skipping drops a sample it composites the proposal's values: its density and (True) its albedo,
        # so the proposal queries the whole field; False: albedo 0 (black) there, so the proposal queries the
        # geometry alone (one head fewer in the largest no-grad pass). See _occupied for the size of the change.
        self.proposal_albedo = bool(proposal_albedo)

    def extra_repr(self) -> str:
        return (f"near={self.near}, far={self.far}, samples={self.num_samples}+{self.num_importance}, "
                f"density={self.density}, inv_std={self.volsdf_inv_std}, "
                f"activation={self.nerf_density_activation}, chunk_rays={self.chunk_rays}, "
                f"bound_radius={self.bound_radius}, skip_empty_space={self.skip_empty_space}, "
                f"proposal_albedo={self.proposal_albedo}")

    def ray_bounds(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """Per-ray [near, far] as [...,1] tensors: the global range clipped to the bounding sphere.

        Rays that miss the sphere get an empty interval (near == far), so every sample has a zero
        interval length and the ray stays transparent at no extra cost in code paths.
        """
        near = torch.full_like(origins[..., :1], self.near)
        far = torch.full_like(origins[..., :1], self.far)
        if self.bound_radius is None:
            return near, far
        b = (origins * directions).sum(-1, keepdim=True)  # unit directions
        c = (origins * origins).sum(-1, keepdim=True) - self.bound_radius**2
        disc = b * b - c
        root = disc.clamp(min=0.0).sqrt()
        near = torch.maximum(near, -b - root)
        far = torch.minimum(far, -b + root)
        far = torch.where(disc > 0, torch.maximum(far, near), near)
        return near, far

    def density_for(self, field: Field) -> str:
        """The density that renders ``field``: its kind's (``auto``), or the configured one if it matches."""
        expected = _DENSITY_FOR_KIND.get(field.kind)
        if expected is None:
            raise ValueError(f"unknown field kind {field.kind!r}; expected 'sdf' or 'density'")
        if self.density not in ("auto", expected):
            raise ValueError(f"renderer density {self.density!r} cannot render a field of kind "
                             f"{field.kind!r}; set the renderer's density to {expected!r} (or auto)")
        return expected

    def sigma(self, geometry: Tensor, density: str | None = None) -> Tensor:
        """Density from the field's geometry output (SDF or raw density); ``density``: see density_for."""
        density = density or self.density
        if density == "volsdf":
            return volsdf_density(geometry, self.volsdf_inv_std)
        if density == "nerf":
            return nerf_density(geometry, self.nerf_density_activation)
        raise ValueError("density 'auto' follows a field: pass density_for(field)")

    def forward(self, field: Field, cameras: CameraBatch, background: Background | None = None,
                compute_normals: bool = False, regularizers: Sequence[str] = (),
                rng: torch.Generator | None = None) -> RenderOutput:
        """Render ``len(cameras) = B * V`` prompt-major views of ``field`` (B fields).

        ``chunk_rays`` (if set) bounds the rays (summed over the B fields) per query call.
        """
        names = tuple(regularizers)
        self._check_field(field)
        regs.check_regularizer_names(names, field.kind)
        b, n = field.batch_size, len(cameras)
        if b < 1 or n % b != 0:
            raise ValueError(f"len(cameras)={n} must be a positive multiple of field.batch_size={b}")
        h, w = cameras.height, cameras.width
        origins, directions = cameras.rays()
        rays = n // b * h * w
        origins, directions = origins.reshape(b, rays, 3), directions.reshape(b, rays, 3)
        with_gradient = compute_normals or "eikonal" in names

        chunk = rays if self.chunk_rays is None else max(1, self.chunk_rays // b)
        parts = [self._render_rays(field, origins[:, s:s + chunk], directions[:, s:s + chunk],
                                   with_gradient, compute_normals, rng, skip="eikonal" not in names)
                 for s in range(0, rays, chunk)]

        def image(key: str) -> Tensor:  # [B,R,C] or [B,R] chunks -> [N,C,H,W]
            x = torch.cat([getattr(p, key) for p in parts], dim=1)
            x = x if x.dim() == 3 else x[..., None]
            return x.reshape(n, h, w, x.shape[-1]).permute(0, 3, 1, 2)

        opacity = image("opacity")
        if background is None:
            background = SolidBackground().to(opacity.device)
        bg = background(n, h, w, rng=rng, training=self.training).to(opacity)
        rgb = image("color") + (1.0 - opacity) * bg
        normal = image("normal") if compute_normals else None

        flat_opacity = opacity.reshape(b, rays)
        terms: dict[str, Tensor] = {}
        if "sparsity" in names:
            terms["sparsity"] = regs.sparsity(flat_opacity)
        if "opaque" in names:
            terms["opaque"] = regs.opaque(flat_opacity)
        if "eikonal" in names:
            total = sum(p.num_samples for p in parts)
            terms["eikonal"] = torch.stack([p.eikonal_sum for p in parts]).sum(dim=0) / total
        return RenderOutput(rgb=rgb, opacity=opacity, depth=image("depth"), normal=normal, regularizers=terms)

    def lookup_sphere(self, compute_normals: bool = False) -> float | None:
        """The radius of the ball every point this renderer queries lies in, or None (unbounded): its samples lie
        in the bound sphere, and with ``compute_normals`` the normals' stencil reaches ``normal_eps`` beyond it.
        A baked field needs only the vertices a lookup inside it can read (rendering/baked.py)."""
        if self.bound_radius is None:
            return None
        return self.bound_radius + (self.normal_eps if compute_normals else 0.0)

    def proposal_needs_albedo(self, skip: bool = True) -> bool:
        """Whether the no-grad proposal must query albedo: only skipped samples read it (``skip``: skipping is
        allowed for this render, i.e. no eikonal term), and only with ``proposal_albedo``."""
        return self.skip_empty_space and skip and self.proposal_albedo

    def _check_field(self, field: Field) -> None:
        self.density_for(field)

    def _proposal(self, field: Field, origins: Tensor, directions: Tensor, t: Tensor, far: Tensor,
                  rng: torch.Generator | None, with_albedo: bool = True) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Importance samples [B,R,num_importance] from the stratified proposal ``t``, and the
        proposal's (optical depth, transmittance, density [B,R,S], albedo [B,R,S,3] or None) for
        :meth:`_occupied` and the stand-ins of skipped samples. Without ``with_albedo`` the field's
        geometry alone is queried (the importance samples need only densities).

        Gradient-free: sample positions are not differentiated, and skipping the graph here
        halves the activation memory of a training step.
        """
        b, r, s = t.shape
        with torch.no_grad():
            points = (origins[:, :, None, :] + t[..., None] * directions[:, :, None, :]).reshape(b, r * s, 3)
            if with_albedo:
                geometry, albedo = field.query(points)
                albedo = albedo.to(t.dtype).reshape(b, r, s, 3)
            else:
                geometry, albedo = query_geometry(field, points), None
            sigma = self.sigma(geometry.to(t.dtype).reshape(b, r, s), self.density_for(field))
            weights, transmittance = composite_weights(sigma, t, far)
            bins = torch.cat([t, far.expand_as(t[..., :1])], dim=-1)
            t_fine = sample_pdf(bins, weights, self.num_importance, deterministic=not self.training,
                                rng=rng)
            return t_fine, (sigma * sample_deltas(t, far), transmittance, sigma, albedo)

    def _occupied(self, t_coarse: Tensor, tau: Tensor, transmittance: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Which samples ``t`` [B,R,S'] the expensive (gradient) pass must query: [B,R,S'] bool,
        and each sample's proposal interval j [B,R,S'].

        From the proposal pass, i.e. a coarse occupancy estimate of each generated field at
        this step (no per-prompt grid to store): a sample in proposal interval j is kept when
        the largest proposal optical depth among intervals j-1..j+1 exceeds
        ``skip_tau_threshold`` (empty space is dropped; the dilation keeps a surface that falls
        between two proposal samples) and the proposal transmittance at the start of interval
        j-1 is above ``skip_transmittance`` (early ray termination, one interval of margin).
        A dropped sample is composited with the proposal's density and albedo (no gradient) at
        the start of its interval; that is exact for the stratified samples (they ARE the
        proposal's samples), so only the gradient of the dropped samples is missing. With
        ``proposal_albedo=False`` a dropped sample's albedo is 0 instead: the image then misses the
        colour of the dropped samples' weights, each < ``skip_tau_threshold`` in empty space and
        < ``skip_transmittance`` in all behind a surface (tests/test_rendering.py measures it).
        """
        s = t_coarse.shape[-1]
        j = (torch.searchsorted(t_coarse.contiguous(), t.contiguous(), right=True) - 1).clamp(0, s - 1)
        padded = torch.nn.functional.pad(tau, (1, 1))
        dilated = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
        alive = torch.cat([transmittance[..., :1], transmittance[..., :-1]], dim=-1)  # T at j-1
        keep = (dilated > self.skip_tau_threshold) & (alive > self.skip_transmittance)
        return torch.gather(keep, -1, j), j

    def _render_rays(self, field: Field, origins: Tensor, directions: Tensor, with_gradient: bool,
                     compute_normals: bool, rng: torch.Generator | None,
                     skip: bool = True) -> _RayResults:
        b, r, _ = origins.shape
        near, far = self.ray_bounds(origins, directions)
        t = stratified_samples((b, r), self.num_samples, near, far, jitter=self.training,
                               rng=rng, device=origins.device, dtype=origins.dtype)
        keep = None
        if self.num_importance > 0:
            # The eikonal term is a mean over all samples, empty space included: no skipping then.
            skipping = self.skip_empty_space and skip
            t_fine, (tau, transmittance, sigma_c, albedo_c) = self._proposal(
                field, origins, directions, t, far, rng, with_albedo=self.proposal_needs_albedo(skip))
            t_sorted = torch.sort(torch.cat([t, t_fine], dim=-1), dim=-1).values
            if skipping:
                keep, j = self._occupied(t, tau, transmittance, t_sorted)
                fill_sigma = sigma_c.gather(-1, j)                                      # [B,R,S']
                fill_albedo = (albedo_c.gather(2, j[..., None].expand(-1, -1, -1, 3)) if albedo_c is not None
                               else fill_sigma.new_zeros(*fill_sigma.shape, 3))        # [B,R,S',3]
            t = t_sorted
        s = t.shape[-1]
        points = (origins[:, :, None, :] + t[..., None] * directions[:, :, None, :]).reshape(b, r * s, 3)
        order = valid = None
        if keep is not None:
            flat_keep = keep.reshape(b, r * s)
            k = int(flat_keep.sum(dim=1).max())
            if k < r * s:  # pack each field's kept samples first (stable), pad to the largest count
                order = kept_first(flat_keep, k)
                valid = flat_keep.gather(1, order)
                points = points.gather(1, order[..., None].expand(-1, -1, 3))
        m = points.shape[1]
        if with_gradient:
            stencil = central_difference_points(points, self.normal_eps)
            geometry, albedo = field.query(torch.cat([points, stencil], dim=1))
            gradient = central_difference_gradient(geometry[:, m:], self.normal_eps)  # [B,M,3]
            geometry, albedo = geometry[:, :m], albedo[:, :m]
        else:
            geometry, albedo = field.query(points)
        # Composite in the rays' dtype (fp32) even when the field ran under autocast:
        # cumulative optical depth in fp16/bf16 loses the transmittance of long rays.
        geometry, albedo = geometry.to(t.dtype), albedo.to(t.dtype)
        sigma = self.sigma(geometry, self.density_for(field))
        if order is not None:  # dropped samples: the proposal's values (constants)
            fill_sigma, fill_albedo = fill_sigma.reshape(b, r * s), fill_albedo.reshape(b, r * s, 3)
            order3 = order[..., None].expand(-1, -1, 3)
            sigma = fill_sigma.scatter(1, order, torch.where(valid, sigma, fill_sigma.gather(1, order)))
            albedo = fill_albedo.scatter(1, order3, torch.where(valid[..., None], albedo, fill_albedo.gather(1, order3)))
            if compute_normals:
                mask = valid.to(t.dtype)
                gradient = gradient.new_zeros(b, r * s, 3).scatter(1, order[..., None].expand(-1, -1, 3),
                                                                   gradient * mask[..., None])
        weights, _ = composite_weights(sigma.reshape(b, r, s), t, far)  # [B,R,S]

        color = (weights[..., None] * albedo.reshape(b, r, s, 3)).sum(dim=2)
        normal = eikonal_sum = None
        if compute_normals:
            # Density increases inwards, so the outward normal is the negative density gradient.
            oriented = gradient if field.kind == "sdf" else -gradient
            unit = F.normalize(oriented, dim=-1, eps=1e-8).reshape(b, r, s, 3)
            normal = (weights[..., None] * unit).sum(dim=2)
        if with_gradient and field.kind == "sdf":
            eikonal_sum = regs.eikonal_residuals(gradient).sum(dim=-1)
        return _RayResults(color=color, opacity=weights.sum(dim=-1), depth=(weights * t).sum(dim=-1),
                           normal=normal, eikonal_sum=eikonal_sum, num_samples=r * s)
