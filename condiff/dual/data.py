"""Building the data sets of a constrained problem: class subsets, imbalanced copies, disjoint
slices, and samples drawn from a trained model (``q_1`` of constrained fine-tuning).

Every selection is a seeded permutation, so the same arguments pick the same examples everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import checks
from ..data import ArrayData, DataError, derive_seed
from ..denoiser import Denoiser
from ..sample import generate


def _perm(n: int, seed: int, *tags: object) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "dual", *tags)))


def _need_labels(data: ArrayData, what: str) -> Tensor:
    if data.y is None:
        raise DataError(f"{data.name}: {what} needs class labels, but the data set has none")
    return data.y


def select(data: ArrayData, classes: Sequence[int] | None = None, n: int | None = None, offset: int = 0,
           seed: int = 0) -> ArrayData:
    """Examples of ``classes`` (all if None), shuffled with ``seed``, then ``[offset : offset + n]``.

    Two calls with the same ``classes`` and ``seed`` and non-overlapping ranges give disjoint sets
    (e.g. a 30-image fine-tuning set and the pretraining set it was taken from).
    """
    if offset < 0 or (n is not None and n < 1):
        raise DataError(f"{data.name}: need offset >= 0 and n >= 1, got offset={offset}, n={n}")
    idx = torch.arange(len(data))
    tags: list[int] = []  # the classes, as plain ints in the order given, seed the shuffle
    if classes is not None:
        y = _need_labels(data, "selecting classes")
        wanted = torch.as_tensor(list(classes), dtype=torch.long)  # a tensor or array of classes too
        tags = wanted.tolist()
        idx = idx[torch.isin(y, wanted)]
        if len(idx) == 0:
            raise DataError(f"{data.name}: no examples of classes {tags}")
    idx = idx[_perm(len(idx), seed, "select", *tags)]
    stop = len(idx) if n is None else offset + n
    if stop > len(idx) or offset >= len(idx):
        raise DataError(f"{data.name}: asked for examples [{offset}, {stop}) of {len(idx)} available")
    return data.subset(idx[offset:stop].sort().values)


def keep_fraction(data: ArrayData, keep: Mapping[int, float], seed: int = 0) -> ArrayData:
    """An imbalanced copy: ``round(f * n_c)`` (at least 1) examples of each class ``c`` in ``keep``
    (``f = keep[c]`` in (0, 1]), all examples of the other classes."""
    y = _need_labels(data, "keep_fraction")
    mask = torch.ones(len(data), dtype=torch.bool)
    for c, f in keep.items():
        if not 0.0 < float(f) <= 1.0:
            raise DataError(f"{data.name}: the kept fraction of class {c} must lie in (0, 1], got {f}")
        members = (y == int(c)).nonzero().flatten()
        if len(members) == 0:
            raise DataError(f"{data.name}: class {c} has no examples")
        k = max(1, round(float(f) * len(members)))
        drop = members[_perm(len(members), seed, "keep", int(c))[k:]]
        mask[drop] = False
    return data.subset(mask)


def class_frequencies(y: Tensor, num_classes: int) -> Tensor:
    """(N,) labels in ``[0, num_classes)`` -> (num_classes,) float64 frequencies."""
    k = checks.integer("class_frequencies: num_classes", num_classes, 1)
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.is_floating_point() or (y.numel() and not (0 <= int(y.min()) and int(y.max()) < k)):
        raise ValueError(f"class_frequencies: labels must be a (N,) integer tensor in [0, {k}), got shape "
                         f"{tuple(y.shape)}, dtype {y.dtype}" + (f", values in [{int(y.min())}, {int(y.max())}]"
                                                                 if y.numel() and not y.is_floating_point() else ""))
    return torch.bincount(y.long(), minlength=k).double() / max(1, y.numel())


@torch.no_grad()
def model_samples(denoiser: Denoiser, n: int, shape: Sequence[int], steps: int = 100, eta: float = 1.0,
                  seed: int = 0, batch_size: int = 500, device: str | torch.device = "cpu",
                  clip_x0: float | None = None) -> Tensor:
    """``n`` samples ``(n, *shape)`` of a trained model (on the CPU), e.g. the pretrained model's
    distribution as the constraint data of fine-tuning."""
    if not checks.is_integer(n, 1):
        raise DataError(f"model_samples: n must be an integer >= 1, got {n!r}")
    g = torch.Generator(device=device).manual_seed(int(seed))
    return generate(denoiser, int(n), tuple(shape), batch_size=batch_size, steps=steps, eta=eta,
                    generator=g, device=device, clip_x0=clip_x0)
