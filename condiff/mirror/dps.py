"""Mirror DPS and constraint-guided DPS, composed from :class:`condiff.guidance.DPS`.

Mirror DPS (NAMM, Feng et al., ICLR 2025) runs DPS in mirror space with the forward model ``A(f(.))``:
the data-space loss is composed with the inverse map, ``loss_m(y0_hat) = loss(f(y0_hat))``, and the
ordinary DPS step ``x_{t-1} = x'_{t-1} - zeta grad_{x_t} loss_m(x0_hat)`` is taken in mirror space.
Constraint-guided DPS (the paper's baseline) adds ``weight * l(x0_hat)`` to the data-space loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from condiff import checks
from condiff.constraints import Distance, check_sign
from condiff.guidance import DPS
from condiff.guidance.base import check_scalar
from condiff.mirror.map import MirrorMap, check_mirror
from condiff.operators import Operator
from condiff.sample import kept_checks

Loss = Callable[[Tensor], Tensor]


def normalised_measurement_loss(operator: Operator, y: Tensor) -> Loss:
    """``x -> ||(y - A(x)) / sigma_y||_2`` per sample (NAMM's DPS loss: the norm, not its square)."""
    if not operator.sigma_y > 0:
        raise ValueError(
            f"the measurement loss divides by sigma_y, which must be > 0, got {operator.sigma_y}"
        )
    base = operator.loss(y)
    return lambda x: base(x) / operator.sigma_y


def with_constraint(loss: Loss, constraint: Distance, weight: float = 200.0) -> Loss:
    """Constraint-guided loss ``loss(x) + weight * l(x)`` (the NAMM paper's baseline uses 200)."""
    weight = check_scalar("constraint weight", weight)  # a number, or a (B,) tensor of per-sample weights
    if not callable(constraint):
        raise TypeError(f"the guiding constraint must be a distance x -> (B,), a callable, got "
                        f"{type(constraint).__name__}")
    checks.eval_mode(constraint, "a guiding constraint that is a network")

    def guided(x: Tensor) -> Tensor:
        dist = checks.per_sample("the guiding constraint", constraint(x), x.shape[0])
        kept = kept_checks()  # a sampler on a GPU reads its steps' checks in blocks
        if kept is None:
            check_sign(dist.detach(), "the guiding constraint")
        else:
            kept.keep(dist.detach().min()[None], lambda row: check_sign(torch.tensor(row), "the guiding constraint"))
        return loss(x) + weight * dist

    return guided


def mirror_dps(mirror: MirrorMap, loss: Loss, zeta: float) -> DPS:
    """DPS in mirror space: the data-space ``loss`` is applied to ``f(y0_hat)``."""
    check_mirror("mirror_dps", mirror)
    return DPS(lambda y0: loss(mirror.inverse_map(y0)), zeta)
