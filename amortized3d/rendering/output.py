"""What the renderer returns."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class RenderOutput:
    """Images for N = B*V cameras (prompt-major: camera n belongs to field n // V).

    ``rgb`` is composited over the background; ``normal`` holds world-space unit normals
    composited over zero. ``regularizers`` holds per-field [B] terms (sparsity, opacity,
    eikonal) already reduced over rays and samples, unweighted.
    """

    rgb: Tensor  # [N,3,H,W] in [0,1]
    opacity: Tensor  # [N,1,H,W]
    depth: Tensor  # [N,1,H,W] expected ray distance (0 where empty)
    normal: Tensor | None  # [N,3,H,W] or None when normals were not requested
    regularizers: dict[str, Tensor]  # name -> [B]
