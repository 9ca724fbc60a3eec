"""Schedules for plug-and-play inference: the timestep ``t_i`` and the constraint weight ``w_i`` at
optimisation step ``i`` of ``S``.

Both are small frozen objects called as ``schedule(i, S)`` (time schedules also take ``T``), so an
inference run is configured with objects, never with strings. The paper's presets (Graikos et al.
2022) are :data:`PAPER_MNIST` and :data:`PAPER_TSP`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .. import checks


class TimeSchedule(Protocol):
    """``(i, S, T) -> t_i``: the DDPM step (an int in ``[0, T)``) at optimisation step ``i`` of ``S``."""

    def __call__(self, i: int, steps: int, T: int) -> int: ...


class WeightSchedule(Protocol):
    """``(i, S) -> w_i``: the constraint weight at optimisation step ``i`` of ``S``."""

    def __call__(self, i: int, steps: int) -> float: ...


def _clip(t: float, low: int, T: int) -> int:
    if not 0 <= low < T:
        raise ValueError(f"t_min={low} must be in [0, T) for a schedule of T={T} steps")
    return int(min(max(int(t), low), T - 1))


@dataclass(frozen=True)
class PaperAnneal:
    """The paper's wobbling anneal from ``T`` down to ``t_min``:

    ``t_i = ((S - i) + floor((S - i) / divisor) * cos(i / period)) / S * T``, clipped to ``[t_min, T-1]``.

    The cosine term makes ``t`` revisit higher noise levels while it decreases, which the paper
    found helps the search escape poor early decisions. ``divisor = 4`` for MNIST, ``3`` for TSP.
    """

    divisor: float = 4.0
    period: float = 50.0
    t_min: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "divisor", checks.number("PaperAnneal: divisor", self.divisor, "> 0"))
        object.__setattr__(self, "period", checks.number("PaperAnneal: period", self.period, "> 0"))
        object.__setattr__(self, "t_min", checks.integer("PaperAnneal: t_min", self.t_min, 0))

    def __call__(self, i: int, steps: int, T: int) -> int:
        r = steps - i
        t = (r + math.floor(r / self.divisor) * math.cos(i / self.period)) / steps * T
        return _clip(t, self.t_min, T)


@dataclass(frozen=True)
class LinearAnneal:
    """``t`` falls linearly from ``start * T`` to ``end * T``, within ``[t_min, T-1]``."""

    start: float = 1.0
    end: float = 0.0
    t_min: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", checks.number("LinearAnneal: start", self.start, "[0, 1]"))
        object.__setattr__(self, "end", checks.number("LinearAnneal: end", self.end, "[0, 1]"))
        object.__setattr__(self, "t_min", checks.integer("LinearAnneal: t_min", self.t_min, 0))

    def __call__(self, i: int, steps: int, T: int) -> int:
        p = i / max(steps - 1, 1)
        return _clip(round((self.start + (self.end - self.start) * p) * T), self.t_min, T)


@dataclass(frozen=True)
class ConstantTime:
    """A fixed timestep ``t`` (tests, and the analysis of a single noise level)."""

    t: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", checks.integer("ConstantTime: t", self.t, 0))  # 20.7 was read as 20

    def __call__(self, i: int, steps: int, T: int) -> int:
        if not 0 <= self.t < T:
            raise ValueError(f"ConstantTime: t={self.t} is outside [0, {T})")
        return int(self.t)


@dataclass(frozen=True)
class ConstantWeight:
    """``w_i = w``."""

    w: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", checks.number("ConstantWeight: w", self.w, ">= 0"))

    def __call__(self, i: int, steps: int) -> float:
        return float(self.w)


@dataclass(frozen=True)
class LinearWeight:
    """``w_i = start + (end - start) * i / S``; the paper's MNIST weight is ``LinearWeight(0.01, 0)``,
    i.e. ``0.01 (S - i) / S``: the constraint steers early and the prior has the last word."""

    start: float = 1.0
    end: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", checks.number("LinearWeight: start", self.start, ">= 0"))
        object.__setattr__(self, "end", checks.number("LinearWeight: end", self.end, ">= 0"))

    def __call__(self, i: int, steps: int) -> float:
        return float(self.start + (self.end - self.start) * i / steps)


PAPER_MNIST = PaperAnneal(divisor=4.0, period=50.0)
PAPER_TSP = PaperAnneal(divisor=3.0, period=50.0)
PAPER_MNIST_WEIGHT = LinearWeight(0.01, 0.0)


def timesteps(schedule: TimeSchedule, steps: int, T: int) -> Tensor:
    """The whole schedule as a ``(steps,)`` long tensor (for plots and tests)."""
    return torch.tensor([schedule(i, steps, T) for i in range(steps)], dtype=torch.long)
