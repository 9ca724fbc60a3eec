"""Generated 2-D data sets ``(N, 2)`` in about [-1, 1]: moons, rings, checkerboard, gmm.

Every kind is a mixture: each sample first draws a component ``y`` with probabilities ``weights``
(uniform unless given), then a point of that component, so ``y`` is the moon, ring, board square or
Gaussian it came from. ``noise`` is the standard deviation of the isotropic Gaussian jitter added to
each point (for ``gmm`` it is the component std). Train and test are independent draws from
generators seeded by ``derive_seed(seed, "toy2d", kind, split)``.

=============  ==========  =====================  ==========================================
kind           components  default noise          geometry
=============  ==========  =====================  ==========================================
moons          2           0.05                   two interleaved half circles
rings          4 (any)     0.02                   concentric circles, radii 0.9 * j / k
checkerboard   8           0                      uniform on the dark squares of a 4x4 board
gmm            8 (any)     0.05                   Gaussians with means on the circle r = 0.8
=============  ==========  =====================  ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from condiff.data import ArrayData, DataError, check_split, generator

GMM_RADIUS = 0.8
RING_OUTER = 0.9


def _uniform(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _moons(comp: Tensor, g: torch.Generator, k: int) -> tuple[Tensor, dict]:
    theta = math.pi * _uniform(len(comp), g)
    outer = torch.stack([theta.cos(), theta.sin()], 1)
    inner = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], 1)
    x = torch.where(comp[:, None] == 0, outer, inner)
    # sklearn's make_moons spans [-1, 2] x [-0.5, 1]; centre it and fit it into [-1, 1].
    return (x - torch.tensor([0.5, 0.25], dtype=x.dtype)) / 1.5, {}


def _rings(comp: Tensor, g: torch.Generator, k: int) -> tuple[Tensor, dict]:
    radii = RING_OUTER * torch.arange(1, k + 1, dtype=torch.float64) / k
    theta = 2 * math.pi * _uniform(len(comp), g)
    r = radii[comp]
    return torch.stack([r * theta.cos(), r * theta.sin()], 1), {"radii": radii.tolist()}


def _checkerboard(comp: Tensor, g: torch.Generator, k: int) -> tuple[Tensor, dict]:
    cells = torch.tensor(
        [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float64
    )
    corner = -1 + 0.5 * cells[comp]
    offset = 0.5 * torch.stack([_uniform(len(comp), g), _uniform(len(comp), g)], 1)
    return corner + offset, {"cells": (-1 + 0.5 * cells).tolist()}


def _gmm(comp: Tensor, g: torch.Generator, k: int) -> tuple[Tensor, dict]:
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    means = GMM_RADIUS * torch.stack([angle.cos(), angle.sin()], 1)
    return means[comp], {"means": means.tolist()}


@dataclass(frozen=True)
class Kind:
    """A mixture family: ``sample(component_ids, generator, n_components) -> (points, meta)``."""

    sample: Callable[[Tensor, torch.Generator, int], tuple[Tensor, dict]]
    components: int
    noise: float
    fixed_components: bool = True


KINDS: dict[str, Kind] = {
    "moons": Kind(_moons, 2, 0.05),
    "rings": Kind(_rings, 4, 0.02, fixed_components=False),
    "checkerboard": Kind(_checkerboard, 8, 0.0),
    "gmm": Kind(_gmm, 8, 0.05, fixed_components=False),
}


def _weights(weights: Sequence[float] | Tensor | None, k: int) -> Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.shape != (k,):
        raise DataError(f"toy2d: expected {k} weights, one per component, got {w.numel()}")
    if not bool(torch.isfinite(w).all() & (w >= 0).all()) or float(w.sum()) <= 0:
        raise DataError(f"toy2d: weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


def load_toy2d(
    split: str = "train",
    kind: str = "moons",
    n: int = 4096,
    seed: int = 0,
    weights: Sequence[float] | Tensor | None = None,
    noise: float | None = None,
    components: int | None = None,
) -> ArrayData:
    """``n`` points ``(n, 2)`` of the mixture ``kind``; ``y`` is each point's component index.

    ``components`` sets the number of rings or Gaussians (``rings``, ``gmm`` only); ``weights``
    (normalised) the component probabilities. ``meta`` records weights, noise and the geometry
    (``means`` and ``std`` for ``gmm``), enough to compute exact densities and mode weights.
    """
    check_split(split, ("train", "test"), source="toy2d")
    if kind not in KINDS:
        raise DataError(f"toy2d: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    spec = KINDS[kind]
    k = spec.components if components is None else int(components)
    if k < 1 or (spec.fixed_components and k != spec.components):
        fixed = f"exactly {spec.components}" if spec.fixed_components else "at least 1"
        raise DataError(f"toy2d: {kind} takes {fixed} components, got {components}")
    if n < 1:
        raise DataError(f"toy2d: n must be at least 1, got {n}")
    std = spec.noise if noise is None else float(noise)
    if not std >= 0:
        raise DataError(f"toy2d: noise must be >= 0, got {noise}")
    w = _weights(weights, k)
    g = generator(seed, "toy2d", kind, split)
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    x, geometry = spec.sample(comp, g, k)
    x = x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
    meta = {
        "split": split,
        "kind": kind,
        "seed": seed,
        "components": k,
        "weights": w.tolist(),
        "noise": std,
        "std": std,
        **geometry,
    }
    return ArrayData(x.float(), comp, f"toy2d-{kind}", meta)
