"""Backgrounds composited behind the rendered field.

A random background colour during training stops the generator from explaining the
background with semi-transparent geometry ("floaters"); evaluation always uses the solid
colour so renders are comparable across runs. Backgrounds are ``nn.Module`` s so that
``.to(device)`` moves them and learnable variants can join an optimizer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor, nn

from .sampling import uniform


class Background(nn.Module, ABC):
    """``background(n, height, width, *, generator, training) -> [n,3,H,W]`` colours in [0,1]."""

    @abstractmethod
    def forward(self, n: int, height: int, width: int, *, rng: torch.Generator | None = None,
                training: bool = False) -> Tensor:
        """Colours for ``n`` views; ``training`` selects the randomised training behaviour."""


class SolidBackground(Background):
    """One constant colour (white by default, the text-to-3D convention)."""

    color: Tensor

    def __init__(self, color: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if len(color) != 3:
            raise ValueError(f"color must have 3 components, got {tuple(color)}")
        # Non-persistent: a fixed colour is configuration, not checkpoint state.
        self.register_buffer("color", torch.tensor([float(c) for c in color]), persistent=False)

    def forward(self, n: int, height: int, width: int, *, rng: torch.Generator | None = None,
                training: bool = False) -> Tensor:
        return self.color[None, :, None, None].expand(n, 3, height, width)


class RandomColorBackground(SolidBackground):
    """Per view, with probability ``p`` a uniformly random colour when training; else solid."""

    def __init__(self, p: float = 0.5, color: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__(color)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, n: int, height: int, width: int, *, rng: torch.Generator | None = None,
                training: bool = False) -> Tensor:
        solid = self.color[None, :].expand(n, 3)
        if not training or self.p == 0.0:
            return solid[:, :, None, None].expand(n, 3, height, width)
        dev, dt = self.color.device, self.color.dtype
        pick = uniform((n, 1), rng=rng, device=dev, dtype=dt) < self.p
        random_color = uniform((n, 3), rng=rng, device=dev, dtype=dt)
        colors = torch.where(pick, random_color, solid)
        return colors[:, :, None, None].expand(n, 3, height, width)

    def extra_repr(self) -> str:
        return f"p={self.p}, color={self.color.tolist()}"
