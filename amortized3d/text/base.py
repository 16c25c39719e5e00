"""The text-encoder interface shared by the analytic-world encoder and SD's CLIP encoder."""
from __future__ import annotations

import abc

from typing import Sequence

from torch import Tensor


class TextEncoder(abc.ABC):
    """Deterministic prompt -> pooled embedding [N, E] (and optionally token embeddings).

    ``identity`` must change whenever the embeddings would change (model, revision,
    dimensions): it keys the on-disk embedding cache.
    """

    identity: str
    embedding_dim: int

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Pooled embeddings [N, E] of ``prompts``."""
