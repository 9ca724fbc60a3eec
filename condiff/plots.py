"""Figures people would rather look at than read: loss curves, sample scatters, histograms, bars.

Every function writes a PNG atomically and returns its path. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from condiff import io

# unobserved (missing) pixels of a measurement: a colour that no grey picture and no magma violation map holds
# (zero-filled and drawn mid-grey, they read as measured greys)
UNOBSERVED_RGB = (70, 130, 180)
UNOBSERVED_NAME = "steel blue"
UNOBSERVED_NOTE = f"unobserved: {UNOBSERVED_NAME}"


def pyplot() -> ModuleType:
    """``matplotlib.pyplot``, headless (Agg), imported on the first figure: a command that draws nothing
    (``--help``, a refused input) does not pay its third of a second."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # once: a backend the user chose since is left alone
        matplotlib.use("Agg")
    # a font cache without matplotlib's own fonts (built by another install) prints a "findfont: ... not
    # found" line per glyph family while it falls back to DejaVu Sans; the plots are the same either way
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (temp file + rename) and close it."""
    try:
        return io.write_file_atomic(
            path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), binary=True
        )
    finally:
        pyplot().close(fig)


def plot_loss_curve(log_path: str | Path, out: str | Path, keys: Sequence[str] = ("loss",),
                    ylabel: str = "denoising loss (mean over the log interval)",
                    title: str = "training loss", labels: dict[str, str] | None = None) -> Path | None:
    """Training curves from a ``log.jsonl``; None when the log is empty. ``labels``: legend text by key."""
    from .train import read_log

    recs = read_log(log_path)
    if not recs:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in recs if k in r]
        if pts:
            s, v = zip(*pts)
            marker = "o" if len(s) < 20 else None  # (one point draws no line)
            ax.plot(s, v, label=(labels or {}).get(k, k), marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")  # under a decade a log axis labels one major tick: the minor lines guide
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, out)


def plot_scatter(sets: dict[str, np.ndarray], out: str | Path, title: str = "") -> Path:
    """Side-by-side 2-D scatters, one panel per named point set (N, 2), on one square frame around all the
    points (at least [-1.3, 1.3], the house range: data elsewhere, on [0, 10] say, were cut off)."""
    fig, axes = pyplot().subplots(1, len(sets), figsize=(3.2 * len(sets), 3.2), squeeze=False)
    every = np.concatenate([np.asarray(p, dtype=float).reshape(-1, 2) for p in sets.values()])
    every = every[np.isfinite(every).all(1)]
    lo = min(-1.3, float(every.min()) if len(every) else -1.3)
    hi = max(1.3, float(every.max()) if len(every) else 1.3)
    pad = 0.05 * (hi - lo) if (lo, hi) != (-1.3, 1.3) else 0.0
    for ax, (name, pts) in zip(axes[0], sets.items()):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_bars(groups: dict[str, Sequence[float]], out: str | Path, labels: Sequence[str] | None = None,
              title: str = "", ylabel: str = "", ref: float | None = None, ref_label: str = "",
              xlabel: str = "") -> Path:
    """Grouped bars: one colour per named series (e.g. class frequencies of data / baseline / ours); ``ref``:
    a dashed line, named ``ref_label`` in the legend."""
    names = list(groups)
    k = len(next(iter(groups.values())))
    x = np.arange(k)
    w = 0.8 / len(names)
    fig, ax = pyplot().subplots(figsize=(max(5, 0.6 * k * len(names) / 2 + 3), 3.5))
    for i, n in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * w, groups[n], w, label=n)
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=1, label=ref_label or None)
    ax.set_xticks(x, labels if labels is not None else [str(i) for i in range(k)])
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: bars reach any height
    ax.set_title(title)
    return save_figure(fig, out)


def plot_bar_panels(panels: dict[str, Sequence[float]], out: str | Path, labels: Sequence[str],
                    title: str = "") -> Path:
    """One bar panel per named measure over the same ``labels``, each on its own y-axis named after it, the
    values written on the bars: measures of different scales (a rate in [0, 1] beside a ratio near 2) on one
    axis flattened the smaller one."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False,
                                  layout="constrained")
    x = np.arange(len(labels))
    for k, (ax, (name, values)) in enumerate(zip(axes[0], panels.items())):
        ax.bar_label(ax.bar(x, values, 0.6, color=f"C{k}"), fmt="%.3g", fontsize=8)
        ax.set_xticks(x, labels)
        ax.set_ylabel(name)
        ax.margins(y=0.15)  # room for the numbers over the bars
        if min(values, default=0) >= 0:
            ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_histograms(sets: dict[str, np.ndarray], out: str | Path, xlabel: str = "", title: str = "",
                    log: bool = True) -> Path:
    """Overlaid histograms (e.g. constraint distances of vanilla vs mirror samples)."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.5))
    allv = np.concatenate([np.asarray(v).ravel() for v in sets.values()])
    lo, hi = float(allv.min()), float(allv.max())
    if log and lo > 0 and hi > 10 * lo:  # over less than a decade a log axis labels its minor ticks, overlapping
        bins = np.logspace(np.log10(lo), np.log10(hi + 1e-12), 40)
        ax.set_xscale("log")
    else:
        bins = np.linspace(lo, hi + 1e-12, 40)
    for name, v in sets.items():  # outlines: filled bars blended into colours the legend does not show
        ax.hist(np.asarray(v).ravel(), bins=bins, histtype="step", lw=1.6, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, out)


def plot_lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], out: str | Path,
               xlabel: str = "", ylabel: str = "", title: str = "", logy: bool = False,
               zero_line: bool = False) -> Path:
    """Named (x, y) curves on one axis (lambda trajectories, PSNR vs steps, ...); ``zero_line``: a line at 0
    (a slack's sign says whether its constraint is met)."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.5))
    if zero_line:
        ax.axhline(0, color="k", lw=0.8)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 12 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, out)


def _draw_image(ax, a: np.ndarray, hidden: np.ndarray | None = None) -> None:
    """One image ``(C, H, W)`` in [-1, 1] (C 1 or 3) on ``ax``, without ticks; ``hidden`` ``(1 or C, H, W)``:
    its unobserved pixels (any channel), drawn in the unobserved colour."""
    img = (np.clip(a, -1, 1) + 1) / 2
    if hidden is not None:
        img = np.repeat(img, 3, 0) if img.shape[0] == 1 else img.copy()
        img[:, np.asarray(hidden, dtype=bool).any(0)] = np.array(UNOBSERVED_RGB)[:, None] / 255
    ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_columns(columns: dict[str, np.ndarray], out: str | Path, row_labels: Sequence[str] | None = None,
                       rows: int = 8, title: str = "", hidden: dict[str, np.ndarray] | None = None,
                       by_row: bool = False) -> Path:
    """Images side by side: one column per named batch ``(B, C, H, W)`` in [-1, 1] (C 1 or 3; the
    batches may differ in size, e.g. a low-resolution measurement), one row per image, up to ``rows``, each
    labelled by ``row_labels``. ``by_row``: the transpose, one row per batch (named at its left) and one column
    per image (``row_labels`` then title the columns), for many small images. ``hidden``: per batch name, the
    unobserved pixels ``(B, 1 or C, H, W)`` of a measurement, drawn in the unobserved colour
    (:data:`UNOBSERVED_NAME`), which the batch's name then names."""
    names = list(columns)
    arrays = [np.asarray(columns[n], dtype=np.float32) for n in names]
    hidden = hidden or {}
    n = min(rows, min(len(a) for a in arrays))
    # panels shaped as the images are (height / width of the first batch), so wide pictures leave no empty bands
    aspect = min(max(arrays[0].shape[-2] / arrays[0].shape[-1], 0.25), 4.0) if arrays[0].ndim >= 3 else 1.0
    shape, size = ((len(names), n), (1.1 * n + 0.4, 1.2 * aspect * len(names) + 0.3)) if by_row else \
        ((n, len(names)), (1.6 * len(names), 1.6 * aspect * n + 0.3))
    fig, axes = pyplot().subplots(*shape, figsize=size, squeeze=False, layout="constrained")
    for j, (name, a) in enumerate(zip(names, arrays)):
        head = f"{name}\n({UNOBSERVED_NOTE})" if name in hidden else name
        for i in range(n):
            ax = axes[j, i] if by_row else axes[i, j]
            _draw_image(ax, a[i], hidden[name][i] if name in hidden else None)
            if i == 0:  # the batch's name: over its column, or left of its row
                (ax.set_ylabel if by_row else ax.set_title)(head, fontsize=7 if by_row else 8)
            if j == 0 and row_labels is not None:  # the image's label: left of its row, or over its column
                (ax.set_title if by_row else ax.set_ylabel)(row_labels[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, out)
