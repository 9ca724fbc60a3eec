"""Source-count images: exactly ``k`` point-like sources in noise (the ``count`` constraint's data).

Each source is a round Gaussian of peak ``amp ~ U(0.6, 1)`` and width ``s ~ U(0.8, 1.3)`` pixels at
a uniform position at least 2 pixels from the border and at least ``min_sep`` pixels from every other
source, over Gaussian background noise of std ``noise``; intensities ``I`` map to ``x = 2 I - 1``.
The ``count`` data set has ``(N, 1, size, size)`` images with exactly ``k`` sources each (source
centres in ``meta["centres"]``); :func:`render_sources` makes any counts, which is how the project's
counting CNN is trained (:mod:`condiff.constraints.count`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from condiff.constraints import CountConstraint
from condiff.data import ArrayData, DataError, derive_seed, register_dataset
from condiff.data.cache import cached_arrays
from condiff.data.physics import _even_size, _sizes

DATA_VERSION = 1
MIN_SEP = 4.0
NOISE = 0.05
MARGIN = 2.0


def _place(k: int, size: int, g: torch.Generator, min_sep: float) -> Tensor:
    """``(k, 2)`` centres (row, col) by rejection sampling, restarting when a layout jams;
    pixel centres are at integer + 0.5."""
    for _ in range(200):
        pts: list[Tensor] = []
        for _ in range(100 * max(k, 1)):
            if len(pts) == k:
                break
            p = MARGIN + (size - 2 * MARGIN) * torch.rand(2, generator=g, dtype=torch.float64)
            if all(float((p - q).norm()) >= min_sep for q in pts):
                pts.append(p)
        if len(pts) == k:
            return torch.stack(pts) if pts else torch.zeros(0, 2, dtype=torch.float64)
    raise DataError(f"count: cannot place {k} sources {min_sep} px apart in a {size}x{size} image")


def render_sources(
    counts: Tensor, size: int, g: torch.Generator, min_sep: float = MIN_SEP, noise: float = NOISE
) -> tuple[Tensor, list[Tensor]]:
    """Images ``(N, 1, size, size)`` float32 with ``counts[i]`` sources; returns them and the centres."""
    c = torch.arange(size, dtype=torch.float64) + 0.5
    imgs, centres = [], []
    for k in counts.tolist():
        pts = _place(int(k), size, g, min_sep)
        amp = 0.6 + 0.4 * torch.rand(len(pts), generator=g, dtype=torch.float64)
        wid = 0.8 + 0.5 * torch.rand(len(pts), generator=g, dtype=torch.float64)
        d2 = (c[None, :, None] - pts[:, 0, None, None]) ** 2 + (c[None, None, :] - pts[:, 1, None, None]) ** 2
        img = (amp[:, None, None] * torch.exp(-0.5 * d2 / wid[:, None, None] ** 2)).sum(0)
        img = img + noise * torch.randn(size, size, generator=g, dtype=torch.float64)
        imgs.append(2 * img - 1)
        centres.append(pts)
    return torch.stack(imgs)[:, None].float(), centres


def density_target(centres: list[Tensor], size: int, width: float = 1.0) -> Tensor:
    """``(N, 1, size, size)`` maps with a unit-mass Gaussian at each centre (the counter's target)."""
    c = torch.arange(size, dtype=torch.float64) + 0.5
    out = torch.zeros(len(centres), 1, size, size, dtype=torch.float64)
    for i, pts in enumerate(centres):
        if len(pts):
            d2 = (c[None, :, None] - pts[:, 0, None, None]) ** 2 + (
                c[None, None, :] - pts[:, 1, None, None]
            ) ** 2
            blobs = torch.exp(-0.5 * d2 / width**2)
            out[i, 0] = (blobs / blobs.sum((1, 2), keepdim=True)).sum(0)
    return out.float()


def load_count(
    split: str = "train", size: int = 32, n_train: int = 2000, n_test: int = 500, seed: int = 0, k: int = 8
) -> ArrayData:
    """Images with exactly ``k`` sources; see the module docstring."""
    size = _even_size(size, "count")
    if int(k) < 1:
        raise DataError(f"count: k must be >= 1, got {k}")
    params = {"size": size, "k": int(k), "min_sep": MIN_SEP, "noise": NOISE, "v": DATA_VERSION}
    xs, cs = [], []
    for part, n in _sizes(split, n_train, n_test, "count"):
        s = derive_seed(seed, "count", part)

        def make(n: int = n, s: int = s) -> dict[str, np.ndarray]:
            x, centres = render_sources(torch.full((n,), int(k)), size, torch.Generator().manual_seed(s))
            return {"x": x.numpy(), "centres": torch.stack(centres).numpy()}

        arr = cached_arrays("count", {**params, "n": n, "seed": s}, make)
        xs.append(arr["x"])
        cs.append(arr["centres"])
    # the constraint's counter is built lazily by name: building it here would train it on first load
    con = {"name": CountConstraint.family, "k": int(k), "size": size}
    return ArrayData(
        np.concatenate(xs),
        name="count",
        meta={
            "split": split,
            "constraint": con,
            "tolerance": 0.5,
            "generator": params,
            "centres": np.concatenate(cs),
            "per_sample": ["centres"],
        },
    )


register_dataset("count", load_count)
