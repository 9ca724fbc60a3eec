"""Data sets as tensors: images ``(N, C, H, W)`` and vectors ``(N, D)``, scaled to about [-1, 1].

Every loader returns an :class:`ArrayData`, whose constructor runs :func:`validate`, so an
``ArrayData`` in hand is never empty, never holds NaN or inf and always has rank 2 or 4.

``load_dataset(name_or_path, split)`` takes a registered name (:data:`DATASETS`: ``digits``,
``toy2d``, ``patches``) or a path to a ``.npy`` / ``.npz`` file, a ``.png`` or a folder of PNGs.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "test", "all")


class DataError(ValueError):
    """Data that cannot be used: empty, non-finite, wrongly shaped, unreadable or unknown."""


class NoSplitError(DataError):
    """User data asked for a split they do not have (e.g. a test split); not a defect of the data."""


def native(a: np.ndarray, source: str = "data") -> np.ndarray:
    """``a`` in the machine's byte order (a big-endian file, e.g. converted from FITS, loads as is
    elsewhere but torch refuses it), with extended precision floats as float64 (torch has none); those
    beyond float64's range are refused (:class:`DataError` naming ``source``), not turned into inf."""
    if a.dtype.kind == "f" and a.dtype.itemsize > 8:
        finite = np.abs(a[np.isfinite(a)])
        if finite.size and finite.max() > np.finfo(np.float64).max:
            top = np.format_float_scientific(finite.max(), precision=2, trim="-")
            raise DataError(f"{source}: values reach {top}, beyond float64's range (1.8e308), let alone float32's "
                            "(3.4e38) that condiff computes in; rescale the data")
        return a.astype(np.float64)
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


#: Integer dtypes read as image bytes, by name (NumPy's and torch's alike), and their full scale.
IMAGE_BYTES = {"uint8": 255.0, "uint16": 65535.0}


def validate(x: Tensor | np.ndarray, source: str = "data") -> Tensor:
    """Check a batch and return it as a float32 tensor of rank 2 ``(N, D)`` or 4 ``(N, C, H, W)``.

    A rank-3 ``(N, H, W)`` batch gets a channel axis; uint8 and uint16 values (image bytes) are scaled to
    [-1, 1], as the file loaders scale them. Raises :class:`DataError` with a one-line message naming
    ``source`` and the problem.
    """
    if isinstance(x, (np.ndarray, Tensor)) and x.ndim == 0:
        raise DataError(f"{source}: expected a batch of samples, got a single number")
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise DataError(f"{source}: expected a numeric array, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(native(x, source)))
    if not isinstance(x, Tensor):
        raise DataError(f"{source}: expected a tensor or numpy array, got {type(x).__name__}")
    if x.is_complex():
        raise DataError(f"{source}: expected real values, got dtype {x.dtype}")
    if x.dim() not in (2, 3, 4):
        raise DataError(
            f"{source}: expected (N, D) vectors or (N, C, H, W) images (or (N, H, W)), "
            f"got rank {x.dim()} with shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise DataError(f"{source}: empty data, shape {tuple(x.shape)}")
    if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] > 4 and x.shape[2] > 4:
        raise DataError(f"{source}: shape {tuple(x.shape)} looks channels-last (N, H, W, C); condiff expects "
                        f"(N, C, H, W): transpose it, e.g. x.transpose(0, 3, 1, 2) for a NumPy array, "
                        "x.permute(0, 3, 1, 2) for a tensor")
    kind = str(x.dtype).removeprefix("torch.")
    if kind in IMAGE_BYTES:  # image bytes (arrays, files and PNGs alike): to [-1, 1]
        x = x.to(torch.float32)  # (torch has no max of a uint16 tensor)
        if float(x.max()) <= 1:
            warnings.warn(f"{source}: {kind} values of at most 1 (a 0/1 mask?) are scaled as image bytes, to about "
                          "-1; pass them as floats to keep them as they are", stacklevel=2)
        x = x * (2.0 / IMAGE_BYTES[kind]) - 1.0
    wide = x
    x = x.to(torch.float32)
    bad = ~torch.isfinite(x)
    if bool(bad.any()) and bool(torch.isfinite(wide).all()):  # finite in float64, not in float32
        raise DataError(f"{source}: values reach {float(wide.abs().max()):.3g}, beyond float32's range "
                        f"(3.4e38) that condiff computes in; rescale the data")
    if bool(bad.any()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        first = int(bad.flatten(1).any(1).nonzero()[0])
        what = " and ".join(f"{k} {w}" for k, w in ((n_nan, "NaN"), (n_inf, "inf")) if k)
        raise DataError(f"{source}: contains non-finite values ({what}; first in sample {first})")
    return x.unsqueeze(1) if x.dim() == 3 else x


def warn_range(x: Tensor, source: str, unscaled: bool = True) -> Tensor:
    """Warn when user data reach far outside [-1, 1], the scale condiff's models and defaults assume,
    or when ``unscaled`` images (floats as the user stored them) lie within [0, 1], a common pixel scale."""
    top = float(x.abs().max())
    if top > 10:
        warnings.warn(f"{source}: values reach {top:.3g}; condiff's models and defaults expect data scaled "
                      "to about [-1, 1] (only uint8 and uint16 images are scaled automatically)", stacklevel=2)
    elif unscaled and x.dim() == 4 and float(x.min()) >= 0 and 0.5 < top <= 1:
        warnings.warn(f"{source}: images lie within [0, 1]; condiff's models and defaults expect images scaled "
                      "to [-1, 1] (x * 2 - 1); only uint8 and uint16 images are scaled automatically", stacklevel=2)
    return x


def value_range(x: Tensor) -> list[float]:
    """``[min, max]`` of a data set: what a model records of the values it was trained on."""
    return [float(x.detach().min()), float(x.detach().max())]


def nominal_range(recorded: Sequence[float] | None) -> tuple[float, float]:
    """The scale data are clipped, scored and shown on: condiff's ``[-1, 1]`` where the ``recorded``
    ``[min, max]`` lies within it (or nothing is recorded), else the recorded range itself."""
    if recorded is None:
        return -1.0, 1.0
    lo, hi = (float(v) for v in recorded)
    if lo >= -1.0 - 1e-3 and hi <= 1.0 + 1e-3:
        return -1.0, 1.0
    if hi == lo:  # constant data beyond [-1, 1]: a scale that holds them and condiff's own
        return min(lo, -1.0), max(hi, 1.0)
    return lo, hi


def to_display(x: Tensor, scale: tuple[float, float]) -> Tensor:
    """``x`` mapped from its nominal ``scale`` onto ``[-1, 1]``, the range the picture writers show."""
    lo, hi = scale
    return x if (lo, hi) == (-1.0, 1.0) else (x - lo) / max(hi - lo, 1e-12) * 2 - 1


def _labels(y: Any, n: int, source: str) -> Tensor | None:
    if y is None:
        return None
    if not isinstance(y, Tensor):
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":  # strings, objects: say so rather than fail inside torch
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
        y = native(y, f"{source}: labels")
    y = torch.as_tensor(y)
    if y.dim() > 1 and y.shape[0] == n:  # per-item arrays, such as a solve result's measurements
        raise DataError(f"{source}: the array of labels beside the data (y) must hold one class label per item, "
                        f"shape ({n},), got shape {tuple(y.shape)} (a condiff solve result's reconstruction.npz "
                        "keeps its measurements in y: give its images as an array of their own, or the file as "
                        "--measurement)")
    if y.is_floating_point():
        if not bool((torch.isfinite(y) & (y == y.round())).all()):
            raise DataError(f"{source}: labels must be integers, got non-integer {y.dtype} values")
    elif y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if y.shape != (n,):
        raise DataError(f"{source}: expected {n} labels of shape ({n},), got shape {tuple(y.shape)}")
    return y.to(torch.long)


@dataclass(eq=False)
class ArrayData:
    """A validated batch with optional integer labels.

    ``meta`` holds provenance (split, source images, generator parameters). Keys named in
    ``meta["per_sample"]`` hold one entry per sample and are kept aligned by :meth:`subset`.
    """

    x: Tensor
    y: Tensor | None = None
    name: str = "data"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.x = validate(self.x, self.name)
        self.y = _labels(self.y, len(self.x), self.name)
        for key in self.meta.get("per_sample", ()):
            if len(self.meta[key]) != len(self.x):
                raise DataError(
                    f"{self.name}: meta[{key!r}] has {len(self.meta[key])} entries, not {len(self)}"
                )

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` or ``(D,)``."""
        return tuple(self.x.shape[1:])

    def subset(self, mask_or_indices: Tensor | np.ndarray | Sequence[int] | Sequence[bool]) -> ArrayData:
        """The samples picked by a boolean mask of length N or by integer indices (order kept)."""
        idx = mask_or_indices
        idx = idx.cpu() if isinstance(idx, Tensor) else torch.as_tensor(np.asarray(idx))
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DataError(f"{self.name}: mask of shape {tuple(idx.shape)} for {len(self)} samples")
            idx = idx.nonzero().flatten()
        elif idx.is_floating_point() or idx.dim() != 1:
            raise DataError(f"{self.name}: subset takes a bool mask or 1-D integer indices, got {idx.dtype}")
        idx = idx.long()
        if len(idx) and not bool(((idx >= -len(self)) & (idx < len(self))).all()):
            raise DataError(f"{self.name}: index out of range for {len(self)} samples")
        meta = dict(self.meta)
        for key in meta.get("per_sample", ()):
            v = meta[key]
            if isinstance(v, Tensor | np.ndarray):
                meta[key] = v[idx.to(v.device) if isinstance(v, Tensor) else idx.numpy()]
            else:
                meta[key] = [v[i] for i in idx.tolist()]
        y = None if self.y is None else self.y[idx]
        return ArrayData(self.x[idx], y, self.name, meta)

    def __repr__(self) -> str:
        labels = "none" if self.y is None else f"{int(self.y.unique().numel())} classes"
        return f"ArrayData(name={self.name!r}, n={len(self)}, shape={self.shape}, labels={labels})"


def check_split(split: str, allowed: Sequence[str] = SPLITS, source: str = "data") -> str:
    if split not in allowed:
        raise DataError(f"{source}: unknown split {split!r}; expected one of {list(allowed)}")
    return split


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed from ``seed`` and tags (e.g. the split), the same on every machine and version."""
    digest = hashlib.sha256(":".join(map(str, (int(seed), *tags))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


# --- registry ----------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., ArrayData]] = {}


def register_dataset(name: str, loader: Callable[..., ArrayData]) -> None:
    """Make ``load_dataset(name, split, **kwargs)`` call ``loader(split=split, **kwargs)``."""
    DATASETS[name] = loader


def dataset_settings(name: str) -> list[str] | None:
    """The settings the registered data set ``name`` takes (its loader's keywords but ``split``), sorted;
    None when it takes any (``**kwargs``)."""
    params = inspect.signature(DATASETS[name]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return sorted(k for k in params if k != "split")


def load_dataset(name_or_path: str | Path, split: str = "train", **kwargs: Any) -> ArrayData:
    """Load a registered data set by name, or a ``.npy`` / ``.npz`` file, ``.png`` or PNG folder by path.

    For paths, see :func:`condiff.data.files.load_path` for what ``split`` means.
    """
    key = str(name_or_path)
    if not key.strip():
        raise DataError("data set name is empty: pass a registered name or a file or folder path")
    if key in DATASETS:
        known = dataset_settings(key)
        if known is not None and (bad := sorted(set(kwargs) - set(known))):
            raise DataError(f"data set {key!r} has no setting(s) {bad}; its settings: {known}")
        return DATASETS[key](split=split, **kwargs)
    if Path(key).expanduser().exists():
        return load_path(Path(key).expanduser(), split=split, **kwargs)
    if "/" in key or os.sep in key or Path(key).suffix.lower() in (".npy", ".npz", ".png"):  # a path, gone
        raise DataError(f"data file {key} does not exist (moved or deleted?)")
    raise DataError(
        f"unknown data set {key!r}: not a registered name ({', '.join(sorted(DATASETS))}) "
        f"and no file or folder exists at that path"
    )


# Loaders import the names above from this module, so they are imported last.
from condiff.data.digits import load_digits  # noqa: E402
from condiff.data.files import (  # noqa: E402
    load_array,
    load_path,
    load_png_folder,
    same_item_shape,
    save_png,
    save_png_grid,
)
from condiff.data.patches import load_patches  # noqa: E402
from condiff.data.toy2d import load_toy2d  # noqa: E402

register_dataset("digits", load_digits)
register_dataset("toy2d", load_toy2d)
register_dataset("patches", load_patches)

__all__ = [
    "DATASETS",
    "ArrayData",
    "DataError",
    "derive_seed",
    "generator",
    "load_array",
    "load_dataset",
    "load_digits",
    "load_patches",
    "load_path",
    "same_item_shape",
    "load_png_folder",
    "load_toy2d",
    "register_dataset",
    "save_png",
    "save_png_grid",
    "validate",
]
import condiff.data.physics  # noqa: E402,F401  (registers burgers, kolmogorov)
import condiff.data.procedural  # noqa: E402,F401  (registers brightness, periodic)
import condiff.data.scenes  # noqa: E402,F401  (registers "scenes")
import condiff.data.sources  # noqa: E402,F401  (registers count)
import condiff.data.tours  # noqa: E402,F401  (registers "tours")
