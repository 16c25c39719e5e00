"""The generator interface: text (and optionally a latent z) in, a batched 3D field out."""
from __future__ import annotations

import abc

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

FieldKind = Literal["sdf", "density"]


@runtime_checkable
class Field(Protocol):
    """B radiance fields evaluated together (one per prompt in the batch).

    ``query(points [B,N,3]) -> (geometry [B,N], albedo [B,N,3])`` where geometry is a signed
    distance (``kind == "sdf"``, negative inside) or a raw pre-activation density
    (``kind == "density"``) and albedo lies in [0, 1]. Field ``b`` is evaluated at ``points[b]``.

    A field may also define ``query_geometry(points) -> geometry``: the same geometry without computing
    albedo (the renderer's no-grad proposal pass needs only densities); :func:`query_geometry` falls back
    to ``query`` for fields without it.
    """

    kind: FieldKind

    @property
    def batch_size(self) -> int: ...

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]: ...


class Generator(nn.Module, abc.ABC):
    """Maps a batch of prompts to a batch of fields.

    ``text_emb`` [B,E] is the (cached) text embedding, ``prompt_ids`` [B] the indices of the
    prompts in the training corpus (used by per-prompt generators), ``z`` an optional latent.
    Generators that cannot represent prompts they were not trained on set
    ``supports_unseen_prompts = False``.
    """

    field_kind: FieldKind = "sdf"
    supports_unseen_prompts: bool = True
    latent_dim: int = 0  # > 0: forward takes a z [B, latent_dim], drawn per step by sample_latent

    def sample_latent(self, batch: int, rng: torch.Generator | None = None) -> Tensor | None:
        """A fresh latent per prompt for one training step (None: the generator has no latent).

        The system passes its step-keyed RNG, so a resumed run draws the same z; without a z
        (evaluation) latent generators use a fixed one.
        """
        return None

    @abc.abstractmethod
    def forward(self, text_emb: Tensor, prompt_ids: Tensor, z: Tensor | None = None) -> Field:  # noqa: D401
        """The Field of each prompt of the batch."""

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups; subclasses override to give parts their own lr."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "name": "generator"}]


def query_geometry(field: Field, points: Tensor) -> Tensor:
    """``field``'s geometry at ``points`` [B,N,3] -> [B,N]: its ``query_geometry`` where it has one (no albedo
    computed), else the first output of ``query``."""
    geometry_only = getattr(field, "query_geometry", None)
    return geometry_only(points) if geometry_only is not None else field.query(points)[0]
