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
import warnings
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from .. import checks
from ..constraints import not_differentiable, zero_gradient
from ..sample import Step, clip_bounds, kept_checks

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
    if not isinstance(value, Tensor) and not checks.is_number(value):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    v = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
    if not bool(torch.isfinite(v).all()) or bool((v < low).any()) or bool((v > high).any()):
        shown = value if not isinstance(value, Tensor) else v.flatten().tolist()
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {shown}")
    return value if isinstance(value, Tensor) else float(value)


def per_sample(value: Scalar, like: Tensor) -> Scalar:
    """A per-sample tensor hyperparameter reshaped to broadcast against ``like`` ``(B, ...)`` (moved to
    ``like``'s device at each call: on a GPU, pass one that is already there)."""
    if isinstance(value, Tensor):
        if value.numel() not in (1, like.shape[0]):
            raise ValueError(f"a per-sample hyperparameter must hold 1 value or one per sample ({like.shape[0]}), "
                             f"got {value.numel()}")
        return value.to(like).reshape(-1, *([1] * (like.dim() - 1)))
    return value


def _figures(value: Tensor, g: Tensor, x0_hat: Tensor, x_t: Tensor) -> Tensor:
    """``(4,)`` float64 on ``g``'s device: how many samples have a non-finite loss or gradient, ``x0_hat``'s
    min and max (what the error message reports), and whether ``x_t`` was finite."""
    bad = (~torch.isfinite(value).to(g.device) | ~torch.isfinite(g).flatten(1).all(1)).sum()
    lo, hi = torch.aminmax(x0_hat.detach())
    return torch.stack([bad, lo, hi, torch.isfinite(x_t.detach()).all()]).to(torch.float64)


def _not_finite(what: str, step_size: str, t: int, clip_x0, n: int, plain: bool, bad: float, lo: float,
                hi: float, xt_ok: float) -> FloatingPointError:
    """``plain``: the loss was taken at the model's ``x0_hat`` (not at a guided step's own point)."""
    if plain and xt_ok and not (math.isfinite(lo) and math.isfinite(hi)):  # the model's, from a finite x_t
        return FloatingPointError(
            f"the denoiser's prediction x0_hat is not finite (NaN or inf) at t = {t}, so neither is the guidance "
            f"loss{what}: check the model (its weights, or an x_t far beyond its training data, where earlier "
            f"guided steps took it: then lower the guidance step size, {step_size})")
    if clip_x0 is None:
        fix = "bound x0_hat with clip_x0, or make the loss finite there"
    else:  # the samples moved by earlier guided steps, or a loss that overflows inside the clip
        c_lo, c_hi = clip_bounds(clip_x0)
        fix = (f"x0_hat is clipped to [{c_lo:g}, {c_hi:g}]: clip tighter (clip_x0), lower the guidance step "
               f"size ({step_size}; under DSG, rate or final), or make the loss finite there")
    return FloatingPointError(
        f"the guidance loss or its gradient{what} is not finite for {int(bad)} of {n} samples at "
        f"t = {t} (x0_hat in [{lo:.3g}, {hi:.3g}]): {fix}"
    )


def _raise_if_not_ok(error: Callable[..., Exception], row: list[float]) -> None:
    """A kept check's reader: ``row = [ok, *figures]``."""
    if not row[0]:
        raise error(*row[1:])


def fresh(x: Tensor) -> Tensor:
    """``x`` cut from the previous step's graph, tracking gradients anew (time travel, recurrence)."""
    return x.detach().requires_grad_(True)


class GradientGuidance:
    """Base of the loss-guidance methods: ``__call__(step)`` runs :meth:`guide` with the Euclidean
    :class:`GradientStep`. Subclasses implement ``guide(step, update) -> x_{t_prev}``.

    ``grad_evals`` counts gradient evaluations (backward passes through the network).
    """

    needs_grad = True
    step_size = "zeta"  # the hyperparameter(s) an error message suggests lowering
    scale_key: str | None = "zeta"  # the argument that sets ``scale``, the step length DSG's own step replaces

    def __init__(self, loss: Loss) -> None:
        if not callable(loss):
            raise ValueError(f"loss must be a callable x -> (B,) tensor, got {type(loss).__name__}")
        checks.eval_mode(loss, "a guidance loss that is a network")
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
        value = checks.per_sample("the guidance loss", self.loss(step.x0_hat), step.x_t.shape[0])
        if not value.requires_grad:
            raise ValueError(not_differentiable("the guidance loss", "x0_hat"))
        if self.grad_evals == 0:  # the first: also the slope in x0_hat itself (a clip of x0_hat may flatten g)
            g0, g = torch.autograd.grad(value.sum(), [step.x0_hat, step.x_t])
            if bool((value > 0).any()) and not bool(g0.any()):  # once: a wait for the device
                warnings.warn(zero_gradient("the guidance loss", int((value > 0).sum()), len(value)) +
                              f" (at t = {step.t_host})", stacklevel=2)
        else:
            (g,) = torch.autograd.grad(value.sum(), step.x_t)
        self.grad_evals += 1
        self._note(step, value.detach(), g)
        return value.detach(), g

    def _note(self, step: Step, value: Tensor, g: Tensor, at: Callable[[], Tensor] | None = None,
              what: str = "") -> None:
        """Check that a gradient that moves the samples is finite (an overflowing loss makes it inf or
        NaN too): at once, or, in a sampler run that reads its checks in blocks (on a GPU), kept on
        the device with the error message's figures (:func:`condiff.sample.kept_checks`). ``at()``:
        where the loss was taken (default ``step.x0_hat``), made only when the figures are; ``what``
        names the gradient in the message."""
        ok = torch.isfinite(g).all()  # one reduction per step (checked at once: the figures only for a bad step)
        kept = kept_checks()
        if kept is None and bool(ok):
            return
        error = partial(_not_finite, what, self.step_size, step.t_host, step.clip_x0, len(value), at is None)
        figures = _figures(value, g, step.x0_hat if at is None else at(), step.x_t)
        if kept is None:
            raise error(*figures.tolist())
        kept.keep(torch.cat([ok[None].to(figures), figures]), partial(_raise_if_not_ok, error))

    def hyperparameters(self) -> dict:  # pragma: no cover - overridden
        return {}

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hp})"
