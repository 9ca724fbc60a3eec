"""DPS, diffusion posterior sampling (Chung et al., ICLR 2023).

``x_{t_prev} = x'_{t_prev} - zeta * grad_{x_t} L(x0_hat(x_t))`` with ``x'_{t_prev}`` the unconditional
step and, for inverse problems, ``L = ||y - A(x0_hat)||_2`` (the norm, not its square, with a fixed
``zeta``, as in the official code).
"""

from __future__ import annotations

from torch import Tensor

from ..sample import Step
from .base import GradientGuidance, Loss, Scalar, Update, check_scalar, per_sample


class DPS(GradientGuidance):
    """DPS with a fixed step size ``zeta`` (a float, or a ``(B,)`` tensor of per-sample values).

    Cost: one network forward and one backward per step.
    """

    def __init__(self, loss: Loss, zeta: Scalar = 1.0) -> None:
        super().__init__(loss)
        self.zeta = check_scalar("DPS zeta", zeta)

    def guide(self, step: Step, update: Update) -> Tensor:
        _, g = self.gradient(step)
        return update(step, g, per_sample(self.zeta, g))

    def hyperparameters(self) -> dict:
        return {"zeta": self.zeta}
