"""Building the data sets of a constrained problem: class subsets, imbalanced copies, disjoint
slices, and samples drawn from a trained model (``q_1`` of constrained fine-tuning).

Every selection is a seeded permutation, so the same arguments pick the same examples everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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
    _need_data(data, "select")
    if not (checks.is_integer(offset, 0) and (n is None or checks.is_integer(n, 1))):
        raise DataError(f"{data.name}: need whole numbers offset >= 0 and n >= 1, got offset={offset!r}, n={n!r}")
    offset, n = int(offset), None if n is None else int(n)
    if not checks.is_integer(seed):
        raise DataError(f"{data.name}: select's seed is a whole number, got {seed!r}")
    idx = torch.arange(len(data))
    tags: list[int] = []  # the classes, as plain ints in the order given, seed the shuffle
    if classes is not None:
        y = _need_labels(data, "selecting classes")
        if hasattr(classes, "tolist") and getattr(classes, "ndim", None) == 1:  # a tensor or array of classes too
            classes = classes.tolist()
        if isinstance(classes, str | bytes | Mapping) or not isinstance(classes, Iterable) or not (
                classes := list(classes)):  # a range, a set, a dict's keys too
            raise DataError(f"{data.name}: classes must be a non-empty list of class labels, got {classes!r}")
        tags = [_label(data, c) for c in classes]
        wanted = torch.tensor(tags, dtype=torch.long)
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
    _need_data(data, "keep_fraction")
    y = _need_labels(data, "keep_fraction")
    if not isinstance(keep, Mapping):
        raise DataError(f"{data.name}: keep maps each class to the fraction of it kept, e.g. {{4: 0.1}}, got "
                        f"{type(keep).__name__}")
    if not checks.is_integer(seed):
        raise DataError(f"{data.name}: keep_fraction's seed is a whole number, got {seed!r}")
    mask = torch.ones(len(data), dtype=torch.bool)
    for c, f in keep.items():
        c = _label(data, c)
        if not (checks.is_number(f) and 0.0 < float(f) <= 1.0):
            raise DataError(f"{data.name}: the kept fraction of class {c} must lie in (0, 1], got {f!r}")
        members = (y == c).nonzero().flatten()
        if len(members) == 0:
            raise DataError(f"{data.name}: class {c} has no examples")
        k = max(1, round(float(f) * len(members)))
        drop = members[_perm(len(members), seed, "keep", int(c))[k:]]
        mask[drop] = False
    return data.subset(mask)


def _need_data(data: object, what: str) -> None:
    if not isinstance(data, ArrayData):
        raise TypeError(f"{what} takes a labelled data set, a condiff.data.ArrayData (load_digits(...), or "
                        f"ArrayData(x, y=labels)), got {type(data).__name__}")


def _label(data: ArrayData, c: object) -> int:
    """A class label: a whole number (4.5 was read as class 4), or its decimal digits (a JSON or TOML key)."""
    if isinstance(c, str) and c.isdigit():
        return int(c)
    if not checks.is_integer(c, 0):
        raise DataError(f"{data.name}: a class label is a whole number >= 0, got {c!r}")
    return int(checks.scalar(c))


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
