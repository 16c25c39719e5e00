"""Score Distillation via DDIM Inversion (SDI; Lukoianov, MIT thesis 2024, ch. 4-6 and Alg. 3).

SDS is a re-parametrised DDIM on x0(t) whose noise term is re-drawn i.i.d. every step (eq. 4.6);
SDI infers that noise instead, kappa^{t+tau}(x0), by DDIM-inverting the current render:

1. t decays linearly over training (Alg. 3; §5.2 says 1 -> 0.2, the public code and our default
   0.98 -> 0.25 — configurable), shared by all views of a step;
2. invert x0 (as level 0) on the grid 0, T/n, 2T/n, ... < t (n = 10: ~int(10 t) steps, §6.2,
   Fig. 6.6) plus a final jump to t + tau, tau ~ U[0, tau_max T) (§5.1; the thesis text says
   U(0, 1/30), the public code T // n, i.e. tau_max = 0.1), with CFG -7.5 (§6.2: gamma_inv =
   -gamma_fwd) and entropy noise 0.3 * sigma after every step (§5.2);
3. kappa = (x_{t+tau} - sqrt(abar_{t+tau}) x0) / sqrt(1 - abar_{t+tau});
   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) kappa (Alg. 3: the inferred noise, re-applied at t);
4. target = DDIM x0 prediction from x_t with CFG +7.5; loss = 0.5 ||x0 - sg(target)||^2, whose
   gradient x0 - target = sigma(t) (eps_fwd(x_t) - kappa), sigma = sqrt((1-abar)/abar), is exactly
   Alg. 3's update (sigma(t) is SDI's implicit weighting).

``renoise: false`` reproduces the public code instead, which feeds x_{t+tau} itself to the
denoiser at timestep t. CFG values are in the diffusers convention used everywhere here (thesis
eq. 3.3: gamma = 0 unconditional, 1 conditional); the public code's non-perp-neg branch uses
eps_c + s (eps_c - eps_u), i.e. s + 1 in ours — the thesis runs used perp-neg, whose CFG is ours.

Loss normalisation (``reduction``). ``sum``: 0.5 ||x0 - sg(target)||^2 summed over each item's
elements, whose gradient is Alg. 3's update above exactly. ``mean`` (the public code,
``0.5 * F.mse_loss(latents, target, reduction="mean") / batch_size`` at batch 1): the same divided
by the item's element count, 4 x 64 x 64 = 16384 latents at 512 px. With Adam the scale of the SDI
term alone does not matter; what it changes is its weight against the convexity loss and the
renderer's regularisers, which are means of O(1) terms (the public weights -- convexity 1 -> 0.1,
sparsity 0.15, opacity 0.1 -- are in ``mean`` units; under ``sum`` they are 16384x weaker).

Convexity (§5.2, against the hollow-face illusion): the signed sine between horizontally and
vertically adjacent normals (camera frame), negative where the surface bulges towards the
camera, minimised ("as negative as possible"); the thesis text uses weight 0.1 for the first 40%
of training, the public code (threestudio ``lambda_convex: [0, 1., 0.1, 4000]``) 1 -> 0.1 linearly
over the first 4000 of 10k steps and 0.1 after (configs/guidance/sdi.yaml follows the code). Pixel pairs are weighted by the (detached) normal magnitudes, i.e. the opacities, so
background and silhouettes count little and the loss cannot be lowered by fading the object.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from amortized3d.cameras import CameraBatch
from amortized3d.guidance.base import Guidance, GuidanceInput, GuidanceOutput, distillation_loss
from amortized3d.priors.base import Prior
from amortized3d.priors.ddim import ddim_invert_path
from amortized3d.schedules import Scheduled


def convexity_loss(normal: Tensor, cameras: CameraBatch) -> Tensor:
    """Per-item [N] weighted mean signed sine between adjacent normals; convex surfaces give < 0.

    ``normal``: world-space normals composited over zero, [N,3,H,W]. In the camera frame
    (right, up, back), moving right across a convex surface turns the normal from -right to
    +right; the signed sine of that turn in the (right, back) plane, a_r b_z - a_z b_r, is
    negative. Moving down the image the same holds in the (down, back) plane.
    """
    rot = cameras.c2w[:, :3, :3].to(normal)  # columns: right, up, back (world)
    n_cam = torch.einsum("nji,njhw->nihw", rot, normal)  # components along right, up, back
    weight = n_cam.norm(dim=1).detach()  # ~ opacity: composited normals are short where empty
    unit = F.normalize(n_cam, dim=1, eps=1e-8)
    right, down, back = unit[:, 0], -unit[:, 1], unit[:, 2]
    sin_h = right[:, :, :-1] * back[:, :, 1:] - back[:, :, :-1] * right[:, :, 1:]
    sin_v = down[:, :-1, :] * back[:, 1:, :] - back[:, :-1, :] * down[:, 1:, :]
    w_h = weight[:, :, :-1] * weight[:, :, 1:]
    w_v = weight[:, :-1, :] * weight[:, 1:, :]
    num = (w_h * sin_h).flatten(1).sum(1) + (w_v * sin_v).flatten(1).sum(1)
    den = w_h.flatten(1).sum(1) + w_v.flatten(1).sum(1)
    return num / den.clamp_min(1e-8)


class SDIGuidance(Guidance):
    def __init__(self, prior: Prior, guidance_scale: float = 7.5, inversion_guidance_scale: float = -7.5,
                 inversion_steps: int = 10, inversion_noise: float = 0.3, tau_max: float = 0.1,
                 t_schedule: Any = ((0, 0.98), (10000, 0.25)), renoise: bool = True,
                 lambda_convexity: Any = 0.0, reduction: str = "sum", loss_weight: Any = 1.0):
        # One deterministic t per step: the sampler's range collapses to the schedule's value
        # (default: linear over the thesis' 10k-step runs; configs/guidance/sdi.yaml uses max_steps).
        super().__init__(prior, t_min=t_schedule, t_max=t_schedule, weighting="uniform", loss_weight=loss_weight)
        if inversion_steps < 1:
            raise ValueError(f"inversion_steps must be >= 1, got {inversion_steps}")
        if not 0.0 <= tau_max <= 1.0 or inversion_noise < 0:
            raise ValueError(f"need 0 <= tau_max <= 1 and inversion_noise >= 0, got {tau_max}, {inversion_noise}")
        self.guidance_scale = float(guidance_scale)
        self.inversion_guidance_scale = float(inversion_guidance_scale)
        self.inversion_steps = int(inversion_steps)
        self.inversion_noise = float(inversion_noise)
        self.tau_max = float(tau_max)
        self.renoise = bool(renoise)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' (Alg. 3's update) or 'mean' (public code), got {reduction!r}")
        self.reduction = reduction
        self.lambda_convexity = Scheduled.parse(lambda_convexity)
        self.needs_normals = any(v != 0 for _, v in self.lambda_convexity.milestones)

    def timestep(self, n: int, step: int, device: torch.device | str = "cpu") -> Tensor:
        """The annealed t at ``step`` for all n items (no randomness)."""
        return torch.full((n,), self.timesteps.range(step)[0], dtype=torch.long, device=device)

    def inversion_path(self, t: Tensor, rng: torch.Generator | None = None) -> Tensor:
        """[K+1, N] path: grid k*T//n below t (left-padded with 0), then the jump to t + tau."""
        T = self.prior.num_train_timesteps
        stride = max(T // self.inversion_steps, 1)
        n_grid = ((t + stride - 1) // stride).clamp(min=1)  # #{k >= 0 : k*stride < t}, at least level 0
        k_max = int(n_grid.max())
        k = torch.arange(k_max, device=t.device)[:, None]
        grid = ((k - (k_max - n_grid)[None, :]).clamp(min=0) * stride)
        tau = (torch.rand(t.shape, generator=rng, dtype=torch.float64) * self.tau_max * T).floor().long()
        t_end = (t + tau.to(t.device)).clamp(max=T - 1)
        return torch.cat([grid, t_end[None, :]], dim=0)

    @torch.no_grad()
    def infer_noise(self, x0: Tensor, t: Tensor, cond: Any, rng: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """(kappa, x at t + tau, t + tau): the noise DDIM inversion attributes to ``x0``."""
        path = self.inversion_path(t, rng)
        x_end = ddim_invert_path(x0, self.prior, cond, path, self.inversion_guidance_scale,
                                 self.inversion_noise, rng)
        t_end = path[-1]
        return self.prior.schedule.eps_from_x0(x_end, x0, t_end), x_end, t_end

    @torch.no_grad()
    def target(self, x0: Tensor, t: Tensor, cond: Any, rng: torch.Generator | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
        """The DDIM x0 prediction that the render is pulled towards, plus diagnostics."""
        kappa, x_end, t_end = self.infer_noise(x0, t, cond, rng)
        x_t = self.prior.schedule.add_noise(x0, kappa, t) if self.renoise else x_end
        eps = self.prior.predict_noise(x_t, t, cond, self.guidance_scale)
        target = self.prior.schedule.x0_from_eps(x_t, eps, t)
        return target, {"t": t.float().mean(), "tau_mean": (t_end - t).float().mean(),
                        "kappa_std": kappa.flatten(1).std(dim=1).mean()}

    def forward(self, inp: GuidanceInput) -> GuidanceOutput:
        x0 = self.prior.encode(inp.rgb)
        t = self.timestep(x0.shape[0], inp.step, x0.device)
        target, logs = self.target(x0.detach(), t, self.condition(inp), inp.rng)
        grad = (x0.detach() - target).to(x0.dtype)
        loss = distillation_loss(x0, grad)
        if self.reduction == "mean":  # public code: mean over the item's elements
            loss = loss / x0[0].numel()
        losses = {"sdi": loss * self.loss_weight(inp.step)}
        if self.needs_normals:
            losses["convexity"] = self._convexity(inp)
        logs["grad_norm"] = grad.flatten(1).norm(dim=1).mean()
        return GuidanceOutput(losses, logs)

    def _convexity(self, inp: GuidanceInput) -> Tensor:
        lam = self.lambda_convexity(inp.step)
        n = inp.rgb.shape[0]
        if lam == 0:
            return inp.rgb.new_zeros(n)
        normal = inp.extras.get("normal")
        if normal is None:
            raise ValueError("lambda_convexity > 0 needs normals: render with compute_normals=True "
                             "(the system does so when guidance.needs_normals)")
        return lam * convexity_loss(normal, inp.cameras.to(normal.device))
