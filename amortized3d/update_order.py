"""The update order of score distillation, executed in one place (framework-free).

A guidance with its own trainable model (``Guidance.auxiliary``, the VSD family's score model
phi) needs that model updated in a specific order relative to the generator step theta on the
same renders:

- ``after``  (VSD, ProlificDreamer Alg. 1): theta, then ``steps`` updates of phi;
- ``before`` (L-VSD, L²-VSD paper §3.2): ``steps`` updates of phi, then theta (it sees phi_{i+1});
- ``joint``  (threestudio): phi's loss is added to theta's and both step after one backward;
- ``after`` with ``reuses_gradient`` (L²-VSD, §4.2): phi's first gradient is computed *before*
  theta, handed to the guidance's forward as the lookahead direction, and then used for phi's
  update after theta. Exact: neither phi nor the detached renders change in between.

``UpdateOrderExecutor.step`` runs one training step in that order. It owns the order, the
gradient reuse, the number of score updates and the finite-gradient skip / rollback decisions
(through a ``DivergenceGuard``); the caller supplies the pieces that depend on its framework
(``StepParts``: how inputs are built, losses reduced, backward run, the generator stepped, and
gradients averaged over ranks). The Lightning system (``amortized3d.system``) and the 2D
Gaussian toy (``amortized3d.toys.gaussian_2d``) both train through it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from amortized3d.divergence import DivergenceGuard
from amortized3d.guidance.base import Guidance, GuidanceInput, GuidanceOutput
from amortized3d.optim import build_optimizer


def _nothing(*_: Any) -> None:
    return None


@dataclass
class StepParts:
    """The caller's side of one training step."""

    #: (stream, detached) -> the guidance input of this step's renders; ``stream`` keys its RNG
    #: ("guidance", "aux0", "aux1", ...), ``detached``: renders without their graph (phi's loss).
    inputs: Callable[[str, bool], GuidanceInput]
    #: per-item losses by name -> (scalar loss, logs); the executor back-propagates that scalar.
    reduce: Callable[[Mapping[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]
    backward: Callable[[Tensor], None]  # of the generator's loss (joint: with phi's added)
    #: The generator's optimizer step (lr schedule included); undone by the guard if it made a weight non-finite.
    generator_step: Callable[[], Any]
    #: How many renders the reduction's mean is over, on all ranks (N x world size): the
    #: handed-over gradient is of that mean (``HandedGradient.items``).
    items: int
    auxiliary_backward: Callable[[Tensor], None] | None = None  # of phi's own loss (default: ``backward``)
    average_auxiliary_gradients: Callable[[], None] = _nothing  # over DDP ranks (phi is outside the reducer)
    on_generator_rollback: Callable[[], None] = _nothing  # the generator step was undone
    #: Called right after the generator step (stepped?, the losses): the caller's divergence stop.
    on_generator_step: Callable[[bool, Mapping[str, Tensor]], None] = _nothing
    extra_losses: Mapping[str, Tensor] = field(default_factory=dict)  # e.g. the renderer's regularizers


@dataclass
class StepResult:
    loss: Tensor  # the generator's reduced loss (detached)
    losses: dict[str, Tensor]  # the per-item losses it was reduced from
    output: GuidanceOutput  # the guidance's forward
    logs: dict[str, Tensor]  # reduced losses by name, and phi's ("aux/...")
    stepped: bool  # the generator took its update


class UpdateOrderExecutor:
    """One training step of ``guidance`` in its update order (see the module docstring)."""

    def __init__(self, guidance: Guidance, generator_optimizer: torch.optim.Optimizer,
                 auxiliary_optimizer: torch.optim.Optimizer | None, guard: DivergenceGuard):
        self.guidance, self.guard = guidance, guard
        self.generator_optimizer, self.auxiliary_optimizer = generator_optimizer, auxiliary_optimizer
        aux = guidance.auxiliary
        if aux is not None and auxiliary_optimizer is None:
            raise ValueError(f"{type(guidance).__name__} trains its own model: pass its optimizer "
                             "(build_auxiliary_optimizer)")

    @property
    def order(self) -> str:
        aux = self.guidance.auxiliary
        return "none" if aux is None else aux.order

    # --- the auxiliary model -------------------------------------------------------------------
    def auxiliary_backward(self, parts: StepParts, index: int) -> dict[str, Tensor]:
        """Gradient of phi's ``index``-th loss on the detached renders, left in phi's ``.grad``
        (averaged over ranks); returns its logs."""
        aux = self.guidance.auxiliary
        out = aux.loss(parts.inputs(f"aux{index}", True))
        loss, loss_logs = parts.reduce(out.losses)
        self.auxiliary_optimizer.zero_grad(set_to_none=True)
        (parts.auxiliary_backward or parts.backward)(loss)
        parts.average_auxiliary_gradients()
        return {**{f"aux/{k}": v for k, v in loss_logs.items()}, **{f"aux/{k}": v for k, v in out.logs.items()}}

    def auxiliary_steps(self, parts: StepParts, first_logs: dict | None = None) -> dict[str, Tensor]:
        """``auxiliary.steps`` updates of phi; ``first_logs``: the first gradient is already in
        ``.grad`` (computed before the generator step, ``reuses_gradient``)."""
        logs: dict = {}
        for i in range(self.guidance.auxiliary.steps):
            logs = first_logs if i == 0 and first_logs is not None else self.auxiliary_backward(parts, i)
            self._auxiliary_update()
        return logs

    def _auxiliary_update(self) -> None:
        if self.guard.all_finite(self.auxiliary_optimizer):
            self.guard.checked_step(self.auxiliary_optimizer)

    # --- one step ------------------------------------------------------------------------------
    def step(self, parts: StepParts) -> StepResult:
        aux, order = self.guidance.auxiliary, self.order
        logs: dict[str, Tensor] = {}
        if order == "before":  # L-VSD: phi looks ahead at the current renders first
            logs.update(self.auxiliary_steps(parts))
        early_logs, handing = None, contextlib.nullcontext()
        if order == "after" and aux.reuses_gradient:
            # L²-VSD: phi's gradient of this step is the lookahead direction; computed once here and
            # reused for phi's update after theta (phi and the detached renders are unchanged).
            early_logs = self.auxiliary_backward(parts, 0)
            handing = aux.handing_over(aux.gradients(), parts.items)
        with handing:
            output = self.guidance(parts.inputs("guidance", False))
        losses = {**output.losses, **parts.extra_losses}
        if order == "joint":
            joint = aux.loss(parts.inputs("aux0", True))
            losses.update({f"aux_{k}": v for k, v in joint.losses.items()})
        loss, loss_logs = parts.reduce(losses)
        logs.update(loss_logs)
        opt = self.generator_optimizer
        opt.zero_grad(set_to_none=True)
        if order == "joint":
            self.auxiliary_optimizer.zero_grad(set_to_none=True)
        parts.backward(loss)
        if order == "joint":
            parts.average_auxiliary_gradients()
        stepped = False
        if self.guard.all_finite(opt):
            stepped = self.guard.checked_step(opt, parts.generator_step)
            if not stepped:
                parts.on_generator_rollback()
            if order == "joint":
                self._auxiliary_update()
        parts.on_generator_step(stepped, losses)
        if order == "after":  # ProlificDreamer: phi trained on the renders of the updated step
            logs.update(self.auxiliary_steps(parts, early_logs))
        return StepResult(loss.detach(), losses, output, logs, stepped)


def build_auxiliary_optimizer(guidance: Guidance) -> torch.optim.Optimizer | None:
    """The optimizer of the guidance's own model (None without one)."""
    aux = guidance.auxiliary
    return None if aux is None else build_optimizer(aux.parameter_groups(), aux.optimizer)
