"""DSG, guidance with a spherical Gaussian constraint (Yang et al., ICML 2024).

In ``n`` dimensions the unconditional draw ``x_{t_prev} ~ N(mean, sigma^2 I)`` concentrates on the
sphere of radius ``r = sqrt(n) sigma`` around ``mean``. DSG keeps the guided step on that sphere:

    d_star   = -r g / ||g||                      steepest descent direction on the sphere
                                                 (d_sample where g = 0: a flat loss has none)
    d_sample = sigma z                           the unconditional sampling direction
    d_m      = d_sample + w (d_star - d_sample)  guidance rate w in [0, 1]
    x_prev   = mean + r d_m / ||d_m||            (norms per sample)

DSG is an update rule (:class:`SphericalStep`) that replaces the Euclidean gradient step of a base
method; :class:`DSG` wraps any :class:`~condiff.guidance.base.GradientGuidance`, so DPS + DSG,
FreeDoM + DSG and UGD + DSG run the base code (its gradient, time travel, backward guidance,
self-recurrence) with only the step changed. The base's step size is not used: the sphere fixes the
step length. Guidance runs every ``interval`` steps (``step.i % interval == 0``); other steps are
unconditional.

DSG needs ``sigma > 0``: with a deterministic sampler (DDIM ``eta = 0``) the sphere has radius 0 and
the step would ignore the guidance, so DSG refuses it. At the sampler's final step
(``t_prev = -1``) every DDIM step has ``sigma = 0``; there the sphere is the point ``mean`` and DSG
returns it without computing a gradient.

``final`` (an extension, 0 = the paper's DSG) adds one Euclidean gradient step of that size at the
final step, ``x_0 = mean - final * g``, with the base method's gradient: the step a DPS sampler
takes there and DSG, having no sphere, cannot. It is what data consistency gets at the very end,
and matters most when the sampler has few steps (docs/guidance.md, "The final step").

``between`` (an extension) says what the steps off the interval do: ``"sample"`` (the default, the
paper's and the official code's) draws them unconditionally; ``"base"`` runs the base method there
with its own Euclidean step (DPS's ``zeta``, FreeDoM's schedule, ...), so DSG becomes an occasional
spherical step inside an otherwise ordinary DPS / FreeDoM / UGD run. That costs a gradient at every
step, as the base method does (docs/guidance.md, "Between the DSG steps").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks
from ..sample import Step
from .base import GradientGuidance, Scalar, check_scalar, per_sample

_TINY = 1e-12  # guards the norms of an exactly zero gradient or mixed direction
BETWEEN = ("sample", "base")  # what DSG's off-interval steps do (module docstring)


def _norm(x: Tensor) -> Tensor:
    """Per-sample Euclidean norm, shaped ``(B, 1, ..., 1)``."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).reshape(-1, *([1] * (x.dim() - 1)))


class SphericalStep:
    """DSG's closed-form step with guidance rate ``rate`` (``w``); see the module docstring."""

    def __init__(self, rate: Scalar = 0.2) -> None:
        self.rate = check_scalar("DSG rate", rate, 0.0, 1.0)

    def __call__(self, step: Step, grad: Tensor, scale: Scalar = 1.0) -> Tensor:
        if step.sigma == 0:
            return step.mean
        r = math.sqrt(step.n) * step.sigma                          # radius sqrt(n) sigma_t
        d_sample = step.sigma * step.noise
        g_norm = _norm(grad)
        # where the loss is flat (g = 0) there is no descent direction: take the sampling one, so that
        # w = 1 still steps onto the sphere rather than stopping at the mean
        d_star = torch.where(g_norm > 0, -r * grad / g_norm.clamp_min(_TINY), d_sample)
        d_m = d_sample + per_sample(self.rate, grad) * (d_star - d_sample)
        return step.mean + r * d_m / _norm(d_m).clamp_min(_TINY)


class FinalStep:
    """The last step's update when ``sigma = 0``: ``mean - final * g`` (the base's own scale unused)."""

    def __init__(self, final: Scalar) -> None:
        self.final = final

    def __call__(self, step: Step, grad: Tensor, scale: Scalar = 1.0) -> Tensor:
        return step.mean - per_sample(self.final, grad) * grad


def _is_zero(v: Scalar) -> bool:
    return not bool((v != 0).any()) if isinstance(v, Tensor) else v == 0


class DSG:
    """``DSG(base, rate, interval)``: the base method with its gradient step made spherical.

    Args:
        base: DPS, FreeDoM, UGD or any :class:`GradientGuidance`.
        rate: guidance rate ``w`` in [0, 1] (float or ``(B,)`` tensor); 1 is the pure closed form.
        interval: guide every ``interval`` steps (``k``); the others are unconditional.
        final: size of a Euclidean gradient step at the sampler's last step (module docstring);
            0 (the default) is the paper's DSG. A float or a ``(B,)`` tensor.
        between: the steps off the interval: ``"sample"`` (unconditional, the paper's) or ``"base"``
            (the base method's own step; module docstring).
    """

    needs_grad = True
    needs_noise = True  # refused by guided_sample with eta = 0 before any work is done

    def __init__(self, base: GradientGuidance, rate: Scalar = 0.2, interval: int = 1,
                 final: Scalar = 0.0, between: str = "sample") -> None:
        if not isinstance(base, GradientGuidance):
            raise ValueError(f"DSG wraps a gradient-guidance method (DPS, FreeDoM, UGD), "
                             f"got {type(base).__name__}")
        interval = checks.integer("DSG interval", interval, 1)
        if between not in BETWEEN:
            raise ValueError(f"DSG between must be one of {list(BETWEEN)}, got {between!r}")
        self.between = between
        self.base, self.interval = base, interval
        self.step_rule = SphericalStep(rate)
        self.final = check_scalar("DSG final", final)

    @property
    def rate(self) -> Scalar:
        return self.step_rule.rate

    @property
    def loss(self):
        return self.base.loss

    @property
    def grad_evals(self) -> int:
        return self.base.grad_evals

    def needs_grad_at(self, i: int, t_prev: int) -> bool:
        """Whether step ``i`` (to ``t_prev``) takes a gradient: off the interval with ``between = "sample"``
        and at a final step with ``final = 0`` it does not, so the sampler builds no graph there."""
        if t_prev < 0:
            return not _is_zero(self.final)
        return self.between == "base" or i % self.interval == 0

    def __call__(self, step: Step) -> Tensor:
        if step.sigma == 0:
            if step.t_prev_host >= 0:
                raise ValueError(f"DSG needs a stochastic sampler: sigma_t = 0 at t = {step.t_host} "
                                 f"(eta = {step.eta:g}); use eta > 0 (the DSG paper uses eta = 1)")
            if _is_zero(self.final):
                return step.mean  # final step: the sphere has radius 0
            return self.base.guide(step, FinalStep(self.final))
        if step.i % self.interval:
            return step.sample() if self.between == "sample" else self.base(step)
        return self.base.guide(step, self.step_rule)

    def _extensions(self) -> dict:
        """``final`` and ``between``, each only where it departs from the paper's DSG."""
        out = {} if _is_zero(self.final) else {"final": self.final}
        return out if self.between == "sample" else {**out, "between": self.between}

    def hyperparameters(self) -> dict:
        return {"rate": self.rate, "interval": self.interval, **self.base.hyperparameters(),
                **self._extensions()}

    def describe(self) -> str:
        ext = "".join(f", {k}={v}" for k, v in self._extensions().items())
        return f"DSG(rate={self.rate}, interval={self.interval}{ext}) + {self.base.describe()}"
