"""Source-count images: exactly ``k`` point-like sources in noise (the ``count`` constraint's data).

Each source is a round Gaussian of peak ``amp ~ U(0.6, 1)`` and width ``s ~ U(0.8, 1.3)`` pixels at
a uniform position at least 2 pixels from the border and at least ``min_sep`` pixels from every other
source, over Gaussian background noise of std ``noise``; intensities ``I`` map to ``x = 2 I - 1``.
The ``count`` data set has ``(N, 1, size, size)`` images with exactly ``k`` sources each (source
centres in ``meta["centres"]``); :func:`render_sources` makes any counts, which is how the project's
counting CNN is trained (:mod:`condiff.constraints.count`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from condiff.constraints import CountConstraint
from condiff.data import ArrayData, DataError, register_dataset
from condiff.data.physics import _cached_splits, _even_size

DATA_VERSION = 1
MIN_SEP = 4.0
NOISE = 0.05
MARGIN = 2.0
FAINT_MAX = 0.35  # faint blobs peak below this; sources peak at 0.6 to 1
STRAY_LIMIT = 0.1  # count_split's "stray": samples with over this share of their brightness away from peaks
PEAK_THRESHOLD = 0.38  # the peak finder's cut: an off-centre source of peak 0.6 tops a pixel at 0.41


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


def _blobs(pts: Tensor, amp: Tensor, g: torch.Generator, size: int) -> Tensor:
    """``(size, size)`` sum of round Gaussians of peak ``amp`` and width ``U(0.8, 1.3)`` at ``pts``."""
    c = torch.arange(size, dtype=torch.float64) + 0.5
    wid = 0.8 + 0.5 * torch.rand(len(pts), generator=g, dtype=torch.float64)
    d2 = (c[None, :, None] - pts[:, 0, None, None]) ** 2 + (c[None, None, :] - pts[:, 1, None, None]) ** 2
    return (amp[:, None, None] * torch.exp(-0.5 * d2 / wid[:, None, None] ** 2)).sum(0)


def render_sources(
    counts: Tensor,
    size: int,
    g: torch.Generator,
    min_sep: float = MIN_SEP,
    noise: float | Sequence[float] = NOISE,
    faint: float = 0.0,
) -> tuple[Tensor, list[Tensor]]:
    """Images ``(N, 1, size, size)`` float32 with ``counts[i]`` sources; returns them and the centres.

    ``noise``: the background std, or a range ``(lo, hi)`` to draw it from per image. ``faint``: the
    mean number (Poisson) of faint blobs per image, peak ``U(0.05, FAINT_MAX)`` at uniform positions,
    which are not sources and not in the centres (the counter learns to ignore them).
    """
    imgs, centres = [], []
    for k in counts.tolist():
        pts = _place(int(k), size, g, min_sep)
        amp = 0.6 + 0.4 * torch.rand(len(pts), generator=g, dtype=torch.float64)
        img = _blobs(pts, amp, g, size)
        if faint > 0:
            m = int(torch.poisson(torch.tensor(float(faint)), generator=g))
            if m:
                where = size * torch.rand(m, 2, generator=g, dtype=torch.float64)
                amp = 0.05 + (FAINT_MAX - 0.05) * torch.rand(m, generator=g, dtype=torch.float64)
                img = img + _blobs(where, amp, g, size)
        sd = noise if not isinstance(noise, Sequence) else noise[0] + (noise[1] - noise[0]) * float(
            torch.rand((), generator=g, dtype=torch.float64)
        )
        img = img + sd * torch.randn(size, size, generator=g, dtype=torch.float64)
        imgs.append(2 * img - 1)
        centres.append(pts)
    return torch.stack(imgs)[:, None].float(), centres


def count_sources(x: Tensor, threshold: float = PEAK_THRESHOLD) -> Tensor:
    """``(B, 1, H, W) -> (B,)`` sources found by a peak finder: pixels whose intensity ``(x + 1) / 2``
    is above ``threshold`` and the largest in their 3x3 neighbourhood. It does not rely on the counting
    CNN, so it checks whether samples that satisfy the CNN really hold ``k`` sources."""
    return _peaks(x, threshold, "count_sources")[1].flatten(1).sum(1)


def _peaks(x: Tensor, threshold: float, who: str) -> tuple[Tensor, Tensor]:
    """``(intensity, peak mask)``, both ``(B, 1, H, W)``: the peak finder of :func:`count_sources`."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{who} expects images (B, 1, H, W), got shape {tuple(x.shape)}")
    i = (x.detach() + 1) / 2
    return i, (i == torch.nn.functional.max_pool2d(i, 3, 1, 1)) & (i > threshold)


def stray_brightness(x: Tensor, threshold: float = PEAK_THRESHOLD, floor: float = 0.2,
                     radius: int = 2) -> Tensor:
    """``(B, 1, H, W) -> (B,)``: the share of each image's intensity above ``floor`` (on the [0, 1] scale)
    that lies farther than ``radius`` pixels from every peak :func:`count_sources` finds (1 where it finds
    none). A source of the data's width keeps its brightness within 2 pixels of its peak, so streaks,
    bridges and glows between sources show here where a count does not (docs/namm-count.md)."""
    return _stray_share(*_peaks(x, threshold, "stray_brightness"), floor, radius)


def _stray_share(i: Tensor, peak: Tensor, floor: float = 0.2, radius: int = 2) -> Tensor:
    """:func:`stray_brightness` of intensities ``i`` with their peak mask (:func:`_peaks`)."""
    r = torch.arange(-radius, radius + 1, dtype=i.dtype, device=i.device)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).to(i.dtype)[None, None]
    near = torch.nn.functional.conv2d(peak.to(i.dtype), disk, padding=radius) > 0
    w = (i - floor).clamp_min(0)
    return ((w * ~near).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)).clamp_max(1.0)


def count_split(x: Tensor, dist: Tensor, k: int) -> dict[str, float | None]:
    """The count constraint's distance split by the peak finder (:func:`count_sources`), which does
    not use the counting CNN: ``exact_k`` is the share of samples with exactly ``k`` sources,
    ``l_exact_k`` the mean distance over those (the CNN's fractional reading, which a map near the
    identity can lower) and ``l_other_k`` over the rest (whole missing or extra sources); None for
    an empty group. ``stray``: the share of samples with over 10% of their brightness away from every
    peak (:func:`stray_brightness`; no held-out sample of the count data has that much)."""
    i, peak = _peaks(x, PEAK_THRESHOLD, "count_split")  # found once, for the count and the stray brightness
    ok = peak.flatten(1).sum(1) == k
    dist = dist.flatten().double()

    def mean(m: Tensor) -> float | None:
        return float(dist[m].mean()) if bool(m.any()) else None

    return {"exact_k": float(ok.double().mean()), "l_exact_k": mean(ok), "l_other_k": mean(~ok),
            "stray": float((_stray_share(i, peak) > STRAY_LIMIT).double().mean())}


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

    def make(n: int, s: int) -> dict[str, np.ndarray]:
        x, centres = render_sources(torch.full((n,), int(k)), size, torch.Generator().manual_seed(s))
        return {"x": x.numpy(), "centres": torch.stack(centres).numpy()}

    arr = _cached_splits("count", params, split, n_train, n_test, seed, make)
    # the constraint's counter is built lazily by name: building it here would train it on first load
    con = {"name": CountConstraint.family, "k": int(k), "size": size}
    return ArrayData(
        arr["x"],
        name="count",
        meta={
            "split": split,
            "constraint": con,
            "tolerance": 0.5,
            "generator": params,
            "centres": arr["centres"],
            "per_sample": ["centres"],
        },
    )


register_dataset("count", load_count)
