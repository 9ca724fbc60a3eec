"""Procedural image sets with an exact constraint: total brightness and periodic tilings.

``brightness``: ring, crescent and elliptical-blob images (one kind per sample, uniformly), shaped
like the NAMM paper's black-hole images, rescaled so every image carries the same total flux
``sum((x + 1) / 2) = flux`` (default ``120 * (size / 64)^2``, the paper's 120 at 64x64). The sum is
exact to float32 round-off (tolerance ``1e-3``). ``(N, 1, size, size)``, background ``-1``; the sum fixes the
shapes' brightness, so their brightest pixels are not capped: at the default flux the brightest of 2000 images
reach 1.31 to 1.37 (at 16, 32 and 64 pixels a side), and the intensities ``(x + 1) / 2`` scale with the flux
(a warning says so where a pixel goes beyond 2).

``periodic``: a ``size/2`` tile drawn from a Gaussian process with a periodic kernel
``k(d) = exp(-2 sin^2(pi d / p) / length^2)`` per axis (period ``p`` = the tile), min-max normalised,
thresholded at 0.5 to ``{-1, 1}`` and tiled 2x2, so the four quadrants agree exactly (and the
image is seamless under circular shifts). ``(N, 1, size, size)``.

Both are seeded (train and test from different seeds) and cached in ``io.cache_dir()/data``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from condiff.constraints import PeriodicTiling, TotalBrightness
from condiff.data import ArrayData, DataError, register_dataset
from condiff.data.physics import _cached_splits, _even_size

DATA_VERSION = 1


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)


def brightness_images(n: int, size: int, flux: float, seed: int) -> np.ndarray:
    """``(n, 1, size, size)`` float32 images with ``sum((x + 1) / 2) == flux``."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5  # pixel centres in [-0.5, 0.5]
    yy, xx = c[:, None], c[None, :]
    kind = torch.randint(0, 3, (n, 1, 1), generator=g)
    cy, cx = _u(n, -0.06, 0.06, g), _u(n, -0.06, 0.06, g)
    dy, dx = yy - cy, xx - cx
    r, theta = (dy**2 + dx**2).sqrt(), torch.atan2(dy, dx)
    radius, width = _u(n, 0.15, 0.3, g), _u(n, 0.025, 0.06, g)
    ring = torch.exp(-0.5 * ((r - radius) / width) ** 2)
    # crescent: a ring brighter on one side (Doppler boosting in the black-hole images)
    phase, contrast = _u(n, 0, 2 * math.pi, g), _u(n, 0.5, 1.0, g)
    crescent = ring * (1 + contrast * torch.cos(theta - phase)) / (1 + contrast)
    sa, sb, rot = _u(n, 0.06, 0.16, g), _u(n, 0.06, 0.16, g), _u(n, 0, math.pi, g)
    a_ = dx * torch.cos(rot) + dy * torch.sin(rot)
    b_ = -dx * torch.sin(rot) + dy * torch.cos(rot)
    blob = torch.exp(-0.5 * ((a_ / sa) ** 2 + (b_ / sb) ** 2))
    img = torch.where(kind == 0, ring, torch.where(kind == 1, crescent, blob))
    img = img * (flux / img.sum((1, 2), keepdim=True))  # fixed total flux
    return (2 * img - 1)[:, None].float().numpy()


def load_brightness(
    split: str = "train",
    size: int = 32,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    flux: float | None = None,
) -> ArrayData:
    """Ring / crescent / blob images of fixed total flux; see the module docstring."""
    size = _even_size(size, "brightness")
    flux = 120.0 * (size / 64) ** 2 if flux is None else float(flux)
    default = 120.0 * (size / 64) ** 2
    if not 0 < flux < size * size:  # (at size^2 the mean pixel would be at the top of the range, 1)
        raise DataError(f"brightness: flux must lie in (0, size^2 = {size * size}) (the default at {size}x{size} "
                        f"is {default:g}), got {flux:g}")
    con = TotalBrightness(flux)
    params = {"size": size, "flux": flux, "v": DATA_VERSION}
    x = _cached_splits(
        "brightness", params, split, n_train, n_test, seed, lambda n, s: {"x": brightness_images(n, size, flux, s)}
    )["x"]
    if (peak := float(x.max())) > 2:
        warnings.warn(f"brightness: at flux {flux:g} on {size}x{size} the brightest pixels reach {peak:.3g}, far "
                      f"beyond the house range [-1, 1] (intensities (x + 1) / 2 scale with the flux; the default, "
                      f"{default:g}, keeps them near 1): models and pictures follow the data's range, but a lower "
                      "flux keeps the data in it", stacklevel=2)
    return ArrayData(
        x,
        name="brightness",
        meta={"split": split, "constraint": con.config, "tolerance": 1e-3, "generator": params},
    )


def periodic_gp_2d(n: int, size: int, length: float, g: torch.Generator) -> Tensor:
    """``(n, size, size)`` draws of a zero-mean GP on the ``size x size`` torus with the product
    periodic kernel; exact, via the eigenvalues of the circulant covariance (its 2D DFT)."""
    d = torch.arange(size, dtype=torch.float64)
    k1 = torch.exp(-2 * torch.sin(math.pi * d / size) ** 2 / length**2)
    eig = torch.fft.fft2(k1[:, None] * k1[None, :]).real.clamp_min(0)
    w = torch.randn(n, size, size, generator=g, dtype=torch.float64)
    return torch.fft.ifft2(eig.sqrt() * torch.fft.fft2(w)).real  # C^(1/2) w has covariance C


def periodic_images(n: int, size: int, length: float, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    tile = periodic_gp_2d(n, size // 2, length, g)
    lo, hi = tile.amin((1, 2), keepdim=True), tile.amax((1, 2), keepdim=True)
    binary = torch.where((tile - lo) / (hi - lo) > 0.5, 1.0, -1.0)
    return binary.repeat(1, 2, 2)[:, None].float().numpy()


def load_periodic(
    split: str = "train",
    size: int = 32,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    length: float = 0.8,
) -> ArrayData:
    """Thresholded periodic-GP tiles, tiled 2x2; see the module docstring."""
    size = _even_size(size, "periodic")
    if isinstance(length, bool) or not isinstance(length, (int, float)) or not 0 < length < float("inf"):
        # 0 gave tiles of -1 everywhere (nothing to learn), silently
        raise ValueError(f"periodic: length (the GP's length scale) must be a number > 0, got {length!r}")
    params = {"size": size, "length": length, "v": DATA_VERSION}
    x = _cached_splits(
        "periodic", params, split, n_train, n_test, seed, lambda n, s: {"x": periodic_images(n, size, length, s)}
    )["x"]
    return ArrayData(
        x,
        name="periodic",
        meta={"split": split, "constraint": PeriodicTiling().config, "tolerance": 0.0, "generator": params},
    )


register_dataset("brightness", load_brightness)
register_dataset("periodic", load_periodic)
