"""1D viscous Burgers' equation on a periodic domain, as a constraint on space-time images.

``u_t = -u u_x + nu u_xx`` on ``[0, length)`` with ``N`` grid points, second-order central
differences (periodic), classical RK4 in time with step ``dt``; one saved state every ``substeps``
steps. An image ``x (B, 1, T, N)`` holds ``T`` saved states as rows (time runs down), in image
units ``x = (u - shift) / scale``.

The distance is the mean one-step residual of the very stepper that made the data
(as in the NAMM paper): ``l(x) = mean_{k,i} |x_{k+1,i} - S(x_k)_i|`` with ``S`` the stepper in image units.

The explicit stepper blows up (to inf, then NaN) on rough states a little beyond the data's range: at the
default physics a row of ``u = +-3`` with alternating signs overflows within one saved step. So the rows
that enter the stepper are clipped to ``|x| <= CLIP`` (three times the data's ``[-1, 1]``), and what is
clipped off is added to the distance: ``l(x) = mean_{k,i} (|x_{k+1,i} - S(c(x_k))_i| + |x_{k,i} - c(x_k)_i|)``
with ``c`` the clip. On the data, and on anything within the clip, that is the residual above, unchanged;
beyond it the distance stays positive, finite and with finite gradients, which pull the rows back
(tested at the default physics on three grid spacings, for inputs up to 1e6; other ``nu``, ``dt`` or
``shift`` and ``scale`` move the stepper's stable range, which the clip does not follow).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from condiff import checks
from condiff.constraints import Constraint, register_constraint

#: Rows fed to the stepper are clipped to this many image units (see the module docstring).
CLIP = 3.0


def _rhs(u: Tensor, nu: float, dx: float) -> Tensor:
    # -u u_x + nu u_xx with periodic central differences along the last axis
    up, um = torch.roll(u, -1, -1), torch.roll(u, 1, -1)
    return -u * (up - um) / (2 * dx) + nu * (up - 2 * u + um) / (dx * dx)


def rk4(rhs: Callable[[Tensor], Tensor], u: Tensor, dt: float) -> Tensor:
    """One classical Runge-Kutta step of ``u_t = rhs(u)`` (also the Kolmogorov-flow solver's step)."""
    k1 = rhs(u)
    k2 = rhs(u + 0.5 * dt * k1)
    k3 = rhs(u + 0.5 * dt * k2)
    k4 = rhs(u + dt * k3)
    return u + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def burgers_step(u: Tensor, nu: float, dx: float, dt: float, substeps: int) -> Tensor:
    """Advance ``u (..., N)`` by ``substeps`` RK4 steps of size ``dt``; differentiable."""
    for _ in range(substeps):
        u = rk4(lambda v: _rhs(v, nu, dx), u, dt)
    return u


@register_constraint("burgers")
class BurgersResidual(Constraint):
    """``x (B, 1, T, N) -> (B,)``: mean ``|x_{k+1} - S(x_k)|`` over the ``T - 1`` transitions.

    The stepper's grid spacing is ``length / N``: the defaults describe the paper's 64-point domain
    ``[0, 10)``. For data of another width ``N`` pass ``length = 10 N / 64``, as the data set's own
    constraint does (``load_dataset("burgers", size=N).meta["constraint"]``): with ``length = 10`` on
    16-point rows the residual of exact data is about 0.1, not 0.
    """

    def __init__(
        self,
        nu: float = 0.05,
        length: float = 10.0,
        dt: float = 0.025,
        substeps: int = 5,
        shift: float = 1.0,
        scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.nu, self.length, self.dt, self.scale = (
            checks.number(f"burgers: {name}", v, "> 0")
            for name, v in (("nu", nu), ("length", length), ("dt", dt), ("scale", scale)))
        self.substeps = checks.integer("burgers: substeps", substeps)
        self.shift = checks.number("burgers: shift", shift)
        self.config = {
            "name": type(self).family,
            "nu": self.nu,
            "length": self.length,
            "dt": self.dt,
            "substeps": self.substeps,
            "shift": self.shift,
            "scale": self.scale,
        }

    def step(self, x: Tensor) -> Tensor:
        """One saved-state step in image units: ``(..., N) -> (..., N)``."""
        dx = self.length / x.shape[-1]
        u = self.shift + self.scale * x
        return (burgers_step(u, self.nu, dx, self.dt, self.substeps) - self.shift) / self.scale

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 1, T-1, N) twice: the signed residual ``x_{k+1} - S(c(x_k))`` (``c`` the clip to ``CLIP``) and
        the part of each predecessor row clipped off, ``x_k - c(x_k)``."""
        self._check_image(x, 1)
        if x.shape[2] < 2:
            raise ValueError(f"burgers constraint needs at least 2 time rows, got shape {tuple(x.shape)}")
        prev = x[:, :, :-1]
        clipped = prev.clamp(-CLIP, CLIP)
        return x[:, :, 1:] - self.step(clipped), prev - clipped

    def residual(self, x: Tensor) -> Tensor:
        """(B, 1, T, N) -> (B, 1, T-1, N) signed residual ``x_{k+1} - S(c(x_k))``, ``c`` the clip to ``CLIP``."""
        return self._parts(x)[0]

    def _terms(self, x: Tensor) -> Tensor:
        """(B, 1, T-1, N): ``|residual|`` plus the part of each predecessor row clipped off."""
        r, excess = self._parts(x)
        return r.abs() + excess.abs()

    def forward(self, x: Tensor) -> Tensor:
        return self._terms(x).flatten(1).mean(1)

    def violation_map(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            r = self._terms(x)[:, 0]
            return torch.cat([torch.zeros_like(r[:, :1]), r], 1)  # row 0 has no predecessor
