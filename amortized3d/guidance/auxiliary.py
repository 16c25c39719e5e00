"""The one object a guidance with its own trained model (the VSD family's score model) exposes.

Everything the update-order executor (``amortized3d.update_order``) needs to train that model
lives here, so the base ``Guidance`` interface carries none of it: the model, its loss, its
optimizer settings, how many updates it takes per generator step, *when* it is updated
relative to the generator step, and whether this step's gradient of its loss is handed to the
guidance's forward (L²-VSD's lookahead) before it is used for the update.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Mapping

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from amortized3d.guidance.base import GuidanceInput, GuidanceOutput

#: When the auxiliary model is updated relative to the generator step (this step's renders):
#: ``after`` (ProlificDreamer Alg. 1), ``before`` (L-VSD, §3.2) or ``joint`` (threestudio: one backward).
AuxiliaryOrder = Literal["after", "before", "joint"]
ORDERS: tuple[str, ...] = ("after", "before", "joint")


@dataclass(frozen=True)
class HandedGradient:
    """This step's gradient of the auxiliary loss, computed before the generator step.

    ``gradients``: by parameter name, the gradient of the executor's reduction of the per-item
    losses, i.e. of their weighted MEAN over the step's renders; ``items``: how many renders that
    mean is over (N here times the DDP world size, since the gradient is averaged over ranks), so
    ``items * gradients`` is the gradient of the SUM over all ranks' renders.
    """

    gradients: Mapping[str, Tensor]
    items: int


@dataclass(eq=False)
class AuxiliaryModel:
    """A guidance's own trainable model, as the update-order executor sees it."""

    model: nn.Module
    loss: Callable[["GuidanceInput"], "GuidanceOutput"]  # per-item losses on the DETACHED renders
    optimizer: dict  # build_optimizer config ({name, lr, ...})
    order: AuxiliaryOrder = "after"
    steps: int = 1  # updates per generator step (gamma; L-VSD studies > 1)
    # With order "after": the first update's gradient is computed before the generator step and
    # handed to the guidance's forward (``handed``), then used for that update. Exact, because
    # neither the model nor the detached renders change in between (L²-VSD's lookahead direction).
    reuses_gradient: bool = False
    # ``state_dict`` keys (relative to the guidance) of frozen pretrained weights inside ``model``
    # (a LoRA's base UNet): rebuilt from config, never checkpointed.
    frozen_state_keys: frozenset[str] = frozenset()
    handed: HandedGradient | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"auxiliary order must be one of {ORDERS}, got {self.order!r}")
        if int(self.steps) < 1:
            raise ValueError(f"score_steps must be >= 1, got {self.steps}")
        if self.order == "joint" and int(self.steps) != 1:
            raise ValueError("update_order 'joint' trains the score model once per step (in the same backward); "
                             f"score_steps={self.steps} needs 'after' or 'before'")
        if self.reuses_gradient and self.order != "after":
            raise ValueError(f"a handed-over gradient is reused for the update after theta; order {self.order!r}")
        self.steps = int(self.steps)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def parameter_groups(self) -> list[dict]:
        return [{"name": "score_model", "params": list(self.trainable_parameters().values())}]

    def gradients(self) -> dict[str, Tensor]:
        """Current ``.grad`` of the trainable parameters by name (zeros where unused)."""
        return {n: (torch.zeros_like(p) if p.grad is None else p.grad) for n, p in self.trainable_parameters().items()}

    @contextlib.contextmanager
    def handing_over(self, gradients: Mapping[str, Tensor], items: int) -> Iterator[HandedGradient]:
        """``handed`` is this gradient for the duration of the block (the guidance's forward)."""
        self.handed = HandedGradient(gradients, int(items))
        try:
            yield self.handed
        finally:
            self.handed = None
