"""FreeDoM (Yu et al., ICCV 2023): DPS's gradient step with a time-dependent
step size, plus time travel.

Step size: ``rho_t = zeta * sqrt(abar_t)`` (the rule of the official face-guidance code: the
gradient through Tweedie's estimate grows like ``1 / sqrt(abar_t)`` at high noise, and this factor
keeps early steps from overshooting).
Time travel: at steps with ``t`` in ``[lo * T, hi * T]`` the guided step ``x_t -> x_{t_prev}`` is
repeated ``repeats`` times, re-noising ``x_{t_prev}`` back to ``x_t`` in between
(``x_t = sqrt(abar_t / abar_prev) x_{t_prev} + sqrt(1 - abar_t / abar_prev) z``), which lets the
sample settle back onto the data manifold after each gradient step.
"""

from __future__ import annotations

import math

from torch import Tensor

from .. import checks
from ..sample import Step
from .base import GradientGuidance, Loss, Scalar, Update, check_scalar, fresh, per_sample


class FreeDoM(GradientGuidance):
    """FreeDoM guidance.

    Args:
        loss: ``x -> (B,)`` objective.
        zeta: step-size scale; ``rho_t = zeta * sqrt(abar_t)``.
        repeats: time-travel repeats ``r`` (1 = none); each repeat costs one forward + backward.
        travel: ``(lo, hi)`` fractions of ``T``: time travel runs where ``lo * T <= t <= hi * T``
            (the official ImageNet setting is 500..800 of 1000).
    """

    def __init__(self, loss: Loss, zeta: Scalar = 1.0, repeats: int = 2,
                 travel: tuple[float, float] = (0.5, 0.8)) -> None:
        super().__init__(loss)
        self.zeta = check_scalar("FreeDoM zeta", zeta)
        repeats = checks.integer("FreeDoM repeats", repeats, 1)
        bounds = checks.pair(travel)
        if bounds is None or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
            raise ValueError(f"FreeDoM travel must be (lo, hi) with 0 <= lo <= hi <= 1, got {travel}")
        self.repeats, self.travel = repeats, bounds

    def n_repeats(self, step: Step) -> int:
        """How many times the step at ``step.t`` is taken (time travel inside the range)."""
        T, t = step.denoiser.schedule.T, step.t_host
        lo, hi = self.travel
        return self.repeats if lo * T <= t <= hi * T else 1

    def guide(self, step: Step, update: Update) -> Tensor:
        r = self.n_repeats(step)
        for j in range(r):
            _, g = self.gradient(step)
            rho = per_sample(self.zeta, g) * math.sqrt(step.abar_t)   # rho_t = zeta sqrt(abar_t)
            x_prev = update(step, g, rho)
            if j + 1 < r:  # time travel: x_{t_prev} -> x_t, then the same step again
                step = step.remake(fresh(step.renoise(x_prev.detach())))
        return x_prev

    def hyperparameters(self) -> dict:
        return {"zeta": self.zeta, "repeats": self.repeats, "travel": list(self.travel)}
