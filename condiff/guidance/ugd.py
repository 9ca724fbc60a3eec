"""Universal guidance, UGD (Bansal et al., 2023).

Per step, up to ``recurrence`` times (self-recurrence re-noises ``x_{t_prev}`` back to ``x_t``):

1. backward guidance: ``m`` gradient steps on ``Delta`` to lower ``L(x0_hat + Delta)`` (no network
   call), then ``x0_hat <- x0_hat + Delta`` with ``eps_hat`` made consistent
   (``eps_hat <- eps_hat - sqrt(abar_t / (1 - abar_t)) Delta``, paper eq. 8);
2. forward guidance: ``eps_hat <- eps_hat + s sqrt(1 - abar_t) g``, ``g = grad_{x_t} L(x0_hat(x_t))``.

The DDIM mean ``sqrt(abar_s) x0_hat(eps) + c eps`` (``c = sqrt(1 - abar_s - sigma^2)``) is affine in
``eps_hat`` at fixed ``x_t``, so forward guidance moves it by ``-kappa s sqrt(1 - abar_t) g`` with
``kappa = sqrt(abar_s (1 - abar_t) / abar_t) - c >= 0``: a gradient step of size
``kappa s sqrt(1 - abar_t)``, handed to the update rule like DPS's, so DSG can replace it.
Backward guidance starts from the network's ``x0_hat`` (the paper starts from the forward-guided one)
so that the forward part stays a pure gradient step around a fixed mean.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from .. import checks
from ..sample import Step
from .base import GradientGuidance, Loss, Scalar, Update, check_scalar, fresh, per_sample


def forward_kappa(step: Step) -> float:
    """``-d mean / d eps_hat`` of the DDIM step (see the module docstring)."""
    a, s = step.abar_t, step.abar_prev
    c = math.sqrt(max(1.0 - s - step.sigma**2, 0.0))
    return math.sqrt(s * (1.0 - a) / a) - c


class UGD(GradientGuidance):
    """Universal guidance.

    Args:
        loss: ``x -> (B,)`` objective.
        forward: forward-guidance strength ``s``.
        backward_steps: ``m``, gradient steps of backward guidance (0 = off; no network call).
        backward_lr: step size of those inner steps.
        recurrence: self-recurrence ``k`` (1 = none); each costs one forward + backward.
    The defaults equal ``GENERIC["ugd"]`` in defaults.py.
    """

    step_size = "forward or backward_lr"
    scale_key = "forward"

    def __init__(self, loss: Loss, forward: Scalar = 1.0, backward_steps: int = 3,
                 backward_lr: Scalar = 0.1, recurrence: int = 2) -> None:
        super().__init__(loss)
        self.forward = check_scalar("UGD forward", forward)
        self.backward_lr = check_scalar("UGD backward_lr", backward_lr)
        self.backward_steps = checks.integer("UGD backward_steps", backward_steps, 0)
        self.recurrence = checks.integer("UGD recurrence", recurrence, 1)
        # backward guidance with a zero step (a float 0, as the tuned defaults have) leaves x0_hat as it is
        self._backward_off = not isinstance(self.backward_lr, Tensor) and self.backward_lr == 0

    def backward(self, x0: Tensor, step: Step | None = None) -> Tensor:
        """``x0 + Delta`` after ``m`` gradient steps on ``L(x0 + Delta)`` from ``Delta = 0``. With the
        sampler's ``step``, each inner gradient is checked as the outer one is, naming that step."""
        lr = per_sample(self.backward_lr, x0)
        delta = torch.zeros_like(x0)
        for _ in range(self.backward_steps):
            with torch.enable_grad():
                d = delta.requires_grad_(True)
                value = self.loss(x0 + d)
                (gd,) = torch.autograd.grad(value.sum(), d)
            if step is not None:
                self._note(step, value.detach(), gd, partial(torch.add, x0, delta), " in backward guidance")
            delta = (delta - lr * gd).detach()
        return x0 + delta

    def guide(self, step: Step, update: Update) -> Tensor:
        for j in range(self.recurrence):
            _, g = self.gradient(step)
            if self.backward_steps and not self._backward_off:
                step = step.with_x0(self.backward(step.x0_hat.detach(), step))
            scale = per_sample(self.forward, g) * forward_kappa(step) * math.sqrt(1.0 - step.abar_t)
            x_prev = update(step, g, scale)
            if j + 1 < self.recurrence:  # self-recurrence: x_{t_prev} -> x_t, then the step again
                step = step.remake(fresh(step.renoise(x_prev.detach())))
        return x_prev

    def hyperparameters(self) -> dict:
        return {"forward": self.forward, "backward_steps": self.backward_steps,
                "backward_lr": self.backward_lr, "recurrence": self.recurrence}
