"""Total brightness: every image carries the same total flux.

Images are stored in ``[lo, hi]`` (``[-1, 1]``) and mean intensities ``I = (x - lo) / (hi - lo)`` in
``[0, 1]``; the set is ``{x : sum(I(x)) = flux}`` and the distance ``l(x) = |sum(I(x)) - flux|``
(the NAMM paper: ``|sum(x) - 120|`` on 64x64 black-hole images).
"""

from __future__ import annotations

from torch import Tensor

from condiff import checks
from condiff.constraints import Constraint, register_constraint


@register_constraint("brightness")
class TotalBrightness(Constraint):
    """``x (B, C, H, W) -> (B,)``: ``|sum((x - lo) / (hi - lo)) - flux|``."""

    def __init__(self, flux: float, lo: float = -1.0, hi: float = 1.0) -> None:
        super().__init__()
        flux = checks.number("brightness: flux", flux, ">= 0")  # a string or inf was taken and gave nonsense
        lo, hi = checks.number("brightness: lo", lo), checks.number("brightness: hi", hi)
        if not hi > lo:
            raise ValueError(f"brightness needs hi > lo, got lo={lo}, hi={hi}")
        self.flux, self.lo, self.hi = flux, lo, hi
        self.config = {"name": type(self).family, "flux": self.flux, "lo": self.lo, "hi": self.hi}

    def intensity(self, x: Tensor) -> Tensor:
        return (x - self.lo) / (self.hi - self.lo)

    def total(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B,) total flux."""
        return self.intensity(x).flatten(1).sum(1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"brightness constraint expects a batch (B, ...), got shape {tuple(x.shape)}")
        return (self.total(x) - self.flux).abs()
