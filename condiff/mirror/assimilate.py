"""Constrained inverse problems with DPS: data assimilation for space-time and flow fields.

Observations are masks (:class:`condiff.operators.Inpainting`) with Gaussian noise ``sigma_y``:

- :func:`first_rows`: the first ``rows`` time states of a space-time image (Burgers: observe the
  start of the trajectory, infer the rest);
- :func:`sparse_points`: a fixed random subset of grid points, all channels (flow probes);
- :func:`frames`: whole snapshots of a multi-frame flow sample (observe two snapshots).

:func:`assimilate` draws one posterior sample per measurement with DPS from a vanilla model, from a
mirror model (mirror DPS) or with an added constraint penalty (constraint-guided DPS).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from condiff import checks
from condiff.constraints import Distance
from condiff.denoiser import Denoiser
from condiff.guidance import DPS
from condiff.mirror.dps import mirror_dps, normalised_measurement_loss, with_constraint
from condiff.mirror.map import MirrorMap
from condiff.mirror.sample import check_space
from condiff.operators import Inpainting, Operator
from condiff.sample import sample


def _shape3(who: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """One sample's shape ``(C, H, W)`` (no batch dimension), as positive integers."""
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 3 and all(checks.is_integer(s, 1)
                                                                                     for s in shape)):
        raise ValueError(f"{who}: shape must be one sample's (C, H, W), three integers >= 1 (no batch), got {shape!r}")
    return tuple(int(s) for s in shape)


def first_rows(shape: Sequence[int], rows: int, sigma_y: float) -> Inpainting:
    """Observe rows ``0 .. rows-1`` of ``(C, T, N)`` images."""
    C, T, N = _shape3("first_rows", shape)
    rows = checks.integer("first_rows: rows", rows, 1, T + 1)
    if rows == T:
        raise ValueError(f"first_rows: observing all {T} rows leaves nothing to infer; observe fewer")
    mask = torch.zeros(1, 1, T, N)
    mask[:, :, : int(rows)] = 1
    return Inpainting(mask, sigma_y, kind=f"first_rows({rows})")


def sparse_points(shape: Sequence[int], fraction: float, sigma_y: float, seed: int = 0) -> Inpainting:
    """Observe ``fraction`` of the grid points of ``(C, H, W)`` images (all channels), drawn with ``seed``."""
    fraction = checks.number("sparse_points: fraction", fraction, "(0, 1]")
    seed = checks.seed("sparse_points: seed", seed)
    C, H, W = _shape3("sparse_points", shape)
    k = max(1, round(fraction * H * W))
    if k == H * W:
        raise ValueError(f"sparse_points: fraction {fraction} observes all {H * W} points, leaving nothing to "
                         "infer; observe fewer")
    idx = torch.randperm(H * W, generator=torch.Generator().manual_seed(seed))[:k]
    mask = torch.zeros(H * W)
    mask[idx] = 1
    return Inpainting(mask.view(1, 1, H, W), sigma_y, kind=f"points({k})")


def frames(shape: Sequence[int], observed: Sequence[int], sigma_y: float) -> Inpainting:
    """Observe whole velocity snapshots ``observed`` of ``(2F, H, W)`` flow samples."""
    C, H, W = _shape3("frames", shape)
    if C % 2:
        raise ValueError(f"frames: flow samples have 2 velocity channels per snapshot, got {C} channels (frames "
                         "observes flow data: observe rows or points of other data)")
    if not isinstance(observed, (list, tuple)) or not len(observed):
        raise ValueError(f"frames: a non-empty list of snapshot indices, got {observed!r}")
    observed = [checks.integer("frames: snapshot", f, 0) for f in observed]
    if len(set(observed)) != len(observed):
        raise ValueError(f"frames: snapshots {observed} repeat one")
    mask = torch.zeros(1, C, H, W)
    for f in observed:  # integers >= 0 (checked above)
        if f >= C // 2:
            raise ValueError(f"frames: snapshot {f} does not exist in samples with {C // 2} snapshots")
        mask[:, 2 * f : 2 * f + 2] = 1
    if bool(mask.all()):
        raise ValueError(f"frames: observing snapshots {observed} observes the whole sample "
                         f"({C // 2} snapshot(s)), leaving nothing to infer; observe points instead")
    return Inpainting(mask, sigma_y, kind=f"frames({observed})")


def assimilate(
    denoiser: Denoiser,
    operator: Operator,
    y: Tensor,
    shape: tuple[int, ...],
    zeta: float,
    steps: int = 1000,
    eta: float = 1.0,
    mirror: MirrorMap | None = None,
    constraint: Distance | None = None,
    constraint_weight: float = 0.0,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    clip_x0: float | tuple[float, float] | str | None = "auto",
    progress: bool = False,
) -> Tensor:
    """One posterior sample per measurement in ``y`` (B, C, H, W), by DPS with the loss
    ``||(y - A(x0_hat)) / sigma_y||_2``.

    ``operator``: any :class:`~condiff.operators.Operator` (the measurement ``A(x)`` with noise ``sigma_y``:
    :class:`~condiff.operators.Inpainting` for the observations :func:`sparse_points` and
    :func:`frames` make, or a subclass of one's own implementing ``A``).
    ``mirror``: ``denoiser`` is a mirror diffusion model; run mirror DPS and return ``f(y)``.
    ``constraint_weight > 0``: constraint-guided DPS (loss + weight * l(x0_hat)).
    ``clip_x0``: clamp Tweedie's estimate (the sampler's option); early, very noisy estimates can
    be far outside the data range, where a nonlinear constraint (a PDE stepper) overflows. ``"auto"``
    (the default): ``[-1, 1]``, or the range of ``denoiser``'s training data where it reaches beyond
    (:func:`~condiff.sample.default_clip`, as :func:`~condiff.guidance.guided_sample` clips; for a
    mirror DM, the mirror data's range, where the clamp acts); ``None``: no clamp.
    """
    checks.number("constraint_weight", constraint_weight, ">= 0")
    check_space("assimilate", denoiser, mirror)
    if not isinstance(operator, Operator):
        raise TypeError(f"assimilate: the operator must be a condiff.operators.Operator (Inpainting, or a subclass of "
                        f"Operator of your own with A(x) and sigma_y), got {type(operator).__name__}")
    if constraint is not None and constraint_weight == 0:
        warnings.warn("assimilate: a constraint was given with constraint_weight = 0, so it is not used; give a "
                      "weight > 0 for constraint-guided DPS (the paper's 200)", stacklevel=2)
    device = checks.param_device(denoiser) if device is None else device  # default: where the model is
    operator = operator.to(device)
    loss = normalised_measurement_loss(operator, checks.floating("assimilate: the measurement y", y).to(device))
    if constraint_weight > 0:
        if constraint is None:
            raise ValueError("constraint-guided DPS needs a constraint")
        loss = with_constraint(loss, constraint, constraint_weight)
    guide = mirror_dps(mirror, loss, zeta) if mirror is not None else DPS(loss, zeta)
    out = sample(
        denoiser,
        (y.shape[0], *shape),
        steps=steps,
        eta=eta,
        generator=generator,
        device=device,
        guidance=guide,
        clip_x0=clip_x0,  # "auto" resolved by ddim
        progress=progress,
    )
    if mirror is not None:
        with torch.no_grad():
            out = mirror.inverse_map(out)
    return out.detach()
