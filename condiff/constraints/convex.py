"""Simple convex sets with closed-form Euclidean projections: box, ball, simplex (for tests and toys).

Each distance is ``l(x) = ||x - P(x)||_2`` per sample, with ``P`` the Euclidean projection. The
projection is computed without autograd: by Danskin's theorem the gradient of the distance is
``(x - P(x)) / ||x - P(x)||`` whether or not ``P`` is differentiated, and a detached ``P`` keeps the
gradient finite at the kinks of the projection. Inside the set the distance and its gradient are 0.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from condiff import checks
from condiff.constraints import Constraint, register_constraint, safe_norm


class _Projected(Constraint):
    def project(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, ...) -> (B,)`` Euclidean distance to the set."""
        if x.dim() < 2:
            raise ValueError(f"{self.family} constraint expects a batch (B, ...), got shape {tuple(x.shape)}")
        with torch.no_grad():
            p = self.project(x)
        return safe_norm(x - p)

    def violation_map(self, x: Tensor) -> Tensor | None:
        if x.dim() != 4:
            return None
        with torch.no_grad():
            return (x - self.project(x)).abs().sum(1)


@register_constraint("box")
class Box(_Projected):
    """``lo <= x <= hi`` elementwise; ``P(x) = clamp(x, lo, hi)``."""

    def __init__(self, lo: float = -1.0, hi: float = 1.0) -> None:
        super().__init__()
        bounds = [checks.scalar(v) for v in (lo, hi)]  # +-inf allowed: a half-open box (x >= 0, say)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v) for v in bounds):
            raise ValueError(f"box: lo and hi must be numbers (inf allowed), got lo={lo!r}, hi={hi!r}")
        self.lo, self.hi = float(bounds[0]), float(bounds[1])
        if not self.lo < self.hi:
            raise ValueError(f"box needs lo < hi, got lo={lo}, hi={hi}")
        self.config = {"name": type(self).family, "lo": self.lo, "hi": self.hi}

    def project(self, x: Tensor) -> Tensor:
        return x.clamp(self.lo, self.hi)


@register_constraint("ball")
class Ball(_Projected):
    """``||x - center|| <= radius`` per sample (``center`` a scalar broadcast to every element)."""

    def __init__(self, radius: float = 1.0, center: float = 0.0) -> None:
        super().__init__()
        self.radius = checks.number("ball: radius", radius, "> 0")
        self.center = checks.number("ball: center", center)
        self.config = {"name": type(self).family, "radius": self.radius, "center": self.center}

    def project(self, x: Tensor) -> Tensor:
        v = x - self.center
        r = v.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        return self.center + v * (self.radius / r.clamp_min(self.radius))

    def forward(self, x: Tensor) -> Tensor:
        # closed form, ||x - c|| - r outside, which is exact and cheaper than the projection
        if x.dim() < 2:
            raise ValueError(f"ball constraint expects a batch (B, ...), got shape {tuple(x.shape)}")
        return (safe_norm(x - self.center) - self.radius).clamp_min(0.0)


@register_constraint("simplex")
class Simplex(_Projected):
    """``x >= 0`` and ``sum(x) = total`` over all elements of each sample."""

    def __init__(self, total: float = 1.0) -> None:
        super().__init__()
        self.total = checks.number("simplex: total", total, "> 0")
        self.config = {"name": type(self).family, "total": self.total}

    def project(self, x: Tensor) -> Tensor:
        # Held, Wolfe & Crowder (1974) / Duchi et al. (2008): sort, find the threshold theta such
        # that sum(max(x - theta, 0)) = total.
        v = x.flatten(1).double()
        u = v.sort(dim=1, descending=True).values
        css = u.cumsum(1) - self.total
        k = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
        rho = ((u - css / k) > 0).sum(1, keepdim=True).clamp_min(1)  # number of positive entries
        theta = css.gather(1, rho - 1) / rho.to(v.dtype)
        p = (v - theta).clamp_min(0).to(x.dtype).view_as(x)
        # a point on the simplex is its own projection: the computed one differs from it by rounding,
        # which the norm would turn into a unit gradient (a kick to every guided step on the set)
        # (a normalised point's sum is off by at most about (1 + log2 D) eps, measured for D from 64 to 12288)
        tol = (2 + math.log2(v.shape[1])) * torch.finfo(x.dtype).eps * max(1.0, self.total)
        on = (v.min(1).values >= 0) & ((v.sum(1) - self.total).abs() <= tol)
        return torch.where(on.view(-1, *([1] * (x.dim() - 1))), x, p)
