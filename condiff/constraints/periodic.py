"""Periodic tiling: the image is a ``2 x 2`` tiling of one tile.

With quadrants ``q_1..q_4`` of an ``(H, W)`` image (``H``, ``W`` even) and their mean ``tile``,
``l(x) = sum_q mean |q - tile|`` (as in the NAMM paper); it is zero exactly when the four quadrants agree.
"""

from __future__ import annotations

import torch
from torch import Tensor

from condiff import checks
from condiff.constraints import Constraint, register_constraint


@register_constraint("periodic")
class PeriodicTiling(Constraint):
    """``x (B, C, H, W) -> (B,)``: sum over the ``reps x reps`` tiles of ``mean |tile_q - mean tile|``."""

    def __init__(self, reps: int = 2) -> None:
        super().__init__()
        self.reps = checks.integer("periodic: reps (tiles per axis)", reps, 2)
        self.config = {"name": type(self).family, "reps": self.reps}

    def tiles(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, reps*reps, C, H/reps, W/reps)."""
        self._check_image(x)
        B, C, H, W = x.shape
        r = self.reps
        if H % r or W % r:
            raise ValueError(
                f"periodic constraint with {r}x{r} tiles needs H and W divisible by {r}, got {H}x{W}"
            )
        t = x.reshape(B, C, r, H // r, r, W // r).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(B, r * r, C, H // r, W // r)

    def deviation(self, x: Tensor) -> Tensor:
        t = self.tiles(x)
        return t - t.mean(1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.deviation(x).abs().flatten(2).mean(2).sum(1)

    def violation_map(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            d = self.deviation(x).abs().sum(2)  # (B, r*r, h, w)
            B, _, h, w = d.shape
            r = self.reps
            return d.reshape(B, r, r, h, w).permute(0, 1, 3, 2, 4).reshape(B, r * h, r * w)
