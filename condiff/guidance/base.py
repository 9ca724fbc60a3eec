"""What the guidance methods share: the loss gradient through Tweedie's estimate, and the update
rule that turns that gradient into ``x_{t_prev}``.

A base method (DPS, FreeDoM, UGD) decides *which* gradient to take and how large a step it would
make; the :class:`Update` rule decides *how* the step is taken. :class:`GradientStep` is the
Euclidean step of the papers, ``x_{t_prev} = mean + sigma z - scale * g``; DSG
(:mod:`condiff.guidance.dsg`) swaps in the spherical step, so ``DSG(DPS(...))``,
``DSG(FreeDoM(...))`` and ``DSG(UGD(...))`` reuse the base code unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ..sample import Step, clip_bounds

Loss = Callable[[Tensor], Tensor]
"""A guidance objective: ``(B, ...) -> (B,)``, differentiable, smaller is better."""

Scalar = float | Tensor
"""A hyperparameter: a float, or a tensor broadcastable to ``(B, 1, ..., 1)`` giving each sample its
own value (one batch can then try several values, one per sample)."""


class Update(Protocol):
    """How a guidance gradient becomes ``x_{t_prev}``: the part DSG replaces."""

    def __call__(self, step: Step, grad: Tensor, scale: Scalar) -> Tensor:
        """``step``: the (possibly modified) step record; ``grad``: ``g = grad_{x_t} L``, shaped like
        ``x_t``; ``scale``: the base method's step size for ``g`` at this step."""
        ...


class GradientStep:
    """The Euclidean gradient step of DPS / FreeDoM / UGD: ``x_{t_prev} = mean + sigma z - scale g``."""

    def __call__(self, step: Step, grad: Tensor, scale: Scalar) -> Tensor:
        return step.sample() - scale * grad


EUCLIDEAN = GradientStep()


def check_scalar(name: str, value: Scalar, low: float = 0.0, high: float = math.inf) -> Scalar:
    """``value`` if it is a finite float or tensor in ``[low, high]``, else a one-line ValueError."""
    v = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
    if not bool(torch.isfinite(v).all()) or bool((v < low).any()) or bool((v > high).any()):
        shown = value if not isinstance(value, Tensor) else v.flatten().tolist()
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {shown}")
    return value if isinstance(value, Tensor) else float(value)


def per_sample(value: Scalar, like: Tensor) -> Scalar:
    """A per-sample tensor hyperparameter reshaped to broadcast against ``like`` ``(B, ...)``."""
    if isinstance(value, Tensor):
        return value.to(like).reshape(-1, *([1] * (like.dim() - 1)))
    return value


def fresh(x: Tensor) -> Tensor:
    """``x`` cut from the previous step's graph, tracking gradients anew (time travel, recurrence)."""
    return x.detach().requires_grad_(True)


class GradientGuidance:
    """Base of the loss-guidance methods: ``__call__(step)`` runs :meth:`guide` with the Euclidean
    :class:`GradientStep`. Subclasses implement ``guide(step, update) -> x_{t_prev}``.

    ``grad_evals`` counts gradient evaluations (backward passes through the network).
    """

    needs_grad = True

    def __init__(self, loss: Loss) -> None:
        if not callable(loss):
            raise ValueError(f"loss must be a callable x -> (B,) tensor, got {type(loss).__name__}")
        self.loss = loss
        self.grad_evals = 0

    def __call__(self, step: Step) -> Tensor:
        return self.guide(step, EUCLIDEAN)

    def guide(self, step: Step, update: Update) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gradient(self, step: Step) -> tuple[Tensor, Tensor]:
        """``(L(x0_hat), grad_{x_t} L(x0_hat(x_t)))``: values ``(B,)`` (detached) and the gradient
        shaped like ``x_t``. The sum over the batch is differentiated; samples do not interact, so
        each sample gets the gradient of its own loss."""
        if not step.x_t.requires_grad:
            raise RuntimeError("guidance needs x_t to track gradients: run it through condiff.sample.ddim, "
                               "which honours needs_grad, or pass x_t.requires_grad_()")
        value = self.loss(step.x0_hat)
        if value.shape != (step.x_t.shape[0],):
            raise ValueError(f"the guidance loss must return one value per sample, shape "
                             f"({step.x_t.shape[0]},), got shape {tuple(value.shape)}")
        (g,) = torch.autograd.grad(value.sum(), step.x_t)
        self.grad_evals += 1
        # one reduction per step, over the gradient that moves the samples (an overflowing loss makes
        # it inf or NaN too); the per-sample count is computed only for the message
        if not bool(torch.isfinite(g).all()):
            bad = int((~torch.isfinite(value) | ~torch.isfinite(g).flatten(1).all(1)).sum())
            x0 = step.x0_hat.detach()
            if step.clip_x0 is None:
                fix = "bound x0_hat with clip_x0, or make the loss finite there"
            else:  # the samples moved by earlier guided steps, or a loss that overflows inside the clip
                lo, hi = clip_bounds(step.clip_x0)
                fix = (f"x0_hat is clipped to [{lo:g}, {hi:g}]: clip tighter (clip_x0), lower the guidance step "
                       "size (zeta), or make the loss finite there")
            raise FloatingPointError(
                f"the guidance loss or its gradient is not finite for {bad} of {len(value)} samples at "
                f"t = {int(step.t[0])} (x0_hat in [{float(x0.min()):.3g}, {float(x0.max()):.3g}]): {fix}"
            )
        return value.detach(), g

    def hyperparameters(self) -> dict:  # pragma: no cover - overridden
        return {}

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hp})"
