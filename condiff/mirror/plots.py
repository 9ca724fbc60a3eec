"""Figures for NAMM runs: samples beside their constraint-violation maps, and ``l(x)`` histograms
(the histograms use :func:`condiff.plots.plot_histograms`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..plots import UNOBSERVED_NOTE, UNOBSERVED_RGB, pyplot, save_figure


def _show(x: Tensor) -> np.ndarray:
    """What to draw for one sample ``(C, H, W)``: its first channel (the ``u`` velocity for flows)."""
    return x[0].detach().float().cpu().numpy()


def plot_violation_grid(
    columns: dict[str, tuple[Tensor, Tensor | None, Tensor | None]], out: str | Path, rows: int = 6,
    title: str = "", hidden: dict[str, Tensor] | None = None
) -> Path:
    """Per method a column of samples ``x (N, C, H, W)``, each titled with its distance ``l (N,)`` (none
    for ``None``: a measurement, say), and beside it a column of their violation maps ``(N, H, W)`` when
    the method has them (not ``None``). All samples share one grey scale (a per-panel stretch hid the
    brightness a constraint measures), and all violation maps one colour scale, logarithmic where they span
    more than two decades, with a colour bar. ``hidden``: per column name, the unobserved entries
    ``(N, 1 or C, H, W)`` of a measurement, drawn in the unobserved colour (named in the title) and left out
    of the grey scale. Writes a PNG atomically."""
    from matplotlib.colors import LogNorm, Normalize

    names = list(columns)
    rows = min(rows, min(len(v[0]) for v in columns.values()))
    # one colour scale for every violation column, so their brightness compares across methods
    maps = [v[1][:rows] for v in columns.values() if v[1] is not None]
    shared = shared_scale(maps)
    positive = [m[torch.isfinite(m) & (m > 0)] for m in maps]
    low = min((float(p.min()) for p in positive if p.numel()), default=shared)
    norm = LogNorm(vmin=max(low, shared * 1e-6), vmax=shared) if shared > 100 * low > 0 else \
        Normalize(vmin=0, vmax=max(shared, 1e-12))
    hidden = {k: v.bool() for k, v in (hidden or {}).items()}
    drawn = {k: [np.ma.masked_array(_show(v[0][i]), _show(hidden[k][i]) > 0 if k in hidden else False)
                 for i in range(rows)] for k, v in columns.items()}
    grey = torch.cat([torch.as_tensor(d.compressed()) for images in drawn.values() for d in images])
    grey = grey[torch.isfinite(grey)]
    g_lo, g_hi = (float(grey.min()), float(grey.max())) if grey.numel() else (0.0, 1.0)
    picture = None
    width = len(names) + len(maps)
    # (only where entries are hidden: elsewhere a sample that is not finite stays blank, not "unobserved")
    unobserved = pyplot().get_cmap("gray").with_extremes(bad=np.array(UNOBSERVED_RGB) / 255)
    fig, axes = pyplot().subplots(
        rows, width, figsize=(2.0 * width, 2.0 * rows + 0.4), squeeze=False, layout="constrained"
    )
    col = 0
    for name in names:
        x, vmap, dist = columns[name]
        for i in range(rows):
            ax = axes[i, col]
            ax.imshow(drawn[name][i], cmap=unobserved if name in hidden else "gray", vmin=g_lo,
                      vmax=max(g_hi, g_lo + 1e-12))
            label = "" if dist is None else f"l={float(dist[i]):.3g}"
            ax.set_title(f"{name}\n{label}" if i == 0 else label, fontsize=7)
            if vmap is not None:
                axv = axes[i, col + 1]
                v = vmap[i].detach().float().cpu().numpy()
                if isinstance(norm, LogNorm):  # exact zeros (no number on a log scale, left blank: white, the top
                    v = np.where(v <= 0, norm.vmin / 2, v)  # of the scale's look) below it: the lowest colour; NaN
                picture = axv.imshow(v, cmap="magma", norm=norm)  # stays blank (not "met")
                if i == 0:
                    axv.set_title(f"violation\n(max {float(vmap[:rows].max()):.2g})", fontsize=7)
            for a in axes[i, col : col + (2 if vmap is not None else 1)]:
                a.set_xticks([])
                a.set_yticks([])
        col += 2 if vmap is not None else 1
    sizes = sorted({len(v[0]) for v in columns.values()})
    each = " / ".join(str(k) for k in sizes)  # the samples' count, and the held-out data's where it differs
    shown = f"first {rows} of each set ({each}) shown" if sizes[-1] > rows else ""
    head = f"{title} ({shown})" if title and shown else title or shown
    channels = next(iter(columns.values()))[0].shape[1]
    grey_note = f"samples share one grey scale, {g_lo:.3g} (black) to {g_hi:.3g} (white)" + (
        f"; channel 1 of {channels} shown" if channels > 1 else "")
    scale = ("violation maps share one " + ("log " if isinstance(norm, LogNorm) else "") + "colour scale (bar)"
             if maps else "")
    unseen = f"{', '.join(hidden)}: {UNOBSERVED_NOTE}" if hidden else ""
    fig.suptitle("\n".join(t for t in (head, grey_note, unseen, scale) if t), fontsize=9)
    if picture is not None:
        fig.colorbar(picture, ax=axes, shrink=0.5, label="violation")
    return save_figure(fig, out)


@torch.no_grad()
def shared_scale(maps: list[Tensor]) -> float:
    """The top of the violation maps' one colour scale: their largest finite value (one sample that is not
    finite, an undertrained model's, made it NaN and blanked every panel); 1 where there is none."""
    return max((float(m[torch.isfinite(m)].max()) for m in maps if bool(torch.isfinite(m).any())), default=1.0)


def _map_fn(constraint) -> tuple[Callable | None, torch.device]:
    """``constraint.violation_map`` (None where it has none) and the device the constraint runs on."""
    params = getattr(constraint, "parameters", None)
    dev = next(iter(params()), torch.empty(0)).device if params is not None else torch.device("cpu")
    return getattr(constraint, "violation_map", None), dev


def draws_maps(constraint, x: Tensor) -> bool:
    """Whether ``constraint`` draws a violation map (tried on ``x[:1]``)."""
    fn, dev = _map_fn(constraint)
    return fn is not None and fn(x[:1].to(dev)) is not None


def violation_maps(constraint, x: Tensor, batch_size: int = 256) -> Tensor | None:
    """``constraint.violation_map`` over a large set, or ``None`` when it has none (or they are not finite,
    which is warned)."""
    fn, dev = _map_fn(constraint)
    if fn is None:
        return None
    first = fn(x[:1].to(dev))
    if first is None:
        return None
    if x.dim() != 4 or tuple(first.shape) != (1, *x.shape[-2:]):
        raise ValueError(f"violation_map must return (B, H, W) = (1, {x.shape[-2]}, {x.shape[-1]}) for a batch of "
                         f"one {tuple(x.shape[1:])} picture, got {tuple(first.shape)}")
    maps = torch.cat([fn(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    bad = int((~torch.isfinite(maps).flatten(1).all(1) & torch.isfinite(x).flatten(1).all(1).cpu()).sum())
    if bad:  # (on samples that are not finite themselves, the distances' own warning says it)
        warnings.warn(f"violation_map is not finite on {bad} of {len(x)} finite samples: the pictures show the "
                      "distances l(x) instead of the maps", stacklevel=2)
        return None
    return maps
