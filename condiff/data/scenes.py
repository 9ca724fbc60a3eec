"""Synthetic scenes for segmentation as inference: textured shapes on textured backgrounds, with masks.

Each scene is an RGB picture ``(3, H, W)`` and its foreground mask ``(1, H, W)``: one or two shapes
(ellipse, rotated rectangle or triangle). The background is a smooth random colour field with
isotropic grain; each shape has its own colour, drawn from the same distribution as the
background's (so colour alone does not always separate them), plus an oriented stripe texture. Colour
clustering therefore fails on a share of the scenes, while texture and shape still identify the
foreground: what a learned prior over (image, mask) can exploit.

``load_scenes`` stacks picture and mask as ``x`` ``(N, 4, H, W)`` in [-1, 1] (mask: -1 background,
+1 foreground), the layout of a joint prior; :func:`split_scene` separates them again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from condiff.data import ArrayData, DataError, check_split, generator, register_dataset

IMAGE_CHANNELS = 3


def _u(g: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=g)


def _smooth_field(n: int, size: int, cells: int, g: torch.Generator, channels: int) -> Tensor:
    """Low-frequency noise ``(n, channels, size, size)`` in about [-1, 1]: a coarse grid, upsampled."""
    coarse = torch.randn(n, channels, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-2, 2) / 2


def _shape_masks(n: int, size: int, g: torch.Generator) -> Tensor:
    """One random shape per scene, ``(n, size, size)`` booleans: ellipse, rotated rectangle or triangle."""
    r = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    cx, cy = _u(g, n, low=0.25, high=0.75) * size, _u(g, n, low=0.25, high=0.75) * size
    a, b = _u(g, n, low=0.12, high=0.3) * size, _u(g, n, low=0.12, high=0.3) * size
    th = _u(g, n, high=math.pi)
    kind = torch.randint(0, 3, (n,), generator=g)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    c, s = th.cos()[:, None, None], th.sin()[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    a_, b_ = a[:, None, None], b[:, None, None]
    ellipse = (u / a_) ** 2 + (v / b_) ** 2 <= 1
    rect = (u.abs() <= a_) & (v.abs() <= 0.8 * b_)
    # triangle: three half-planes around the centre at 120 degrees
    tri = torch.ones_like(ellipse)
    for k in range(3):
        ang = th + 2 * math.pi * k / 3
        nx, ny = ang.cos()[:, None, None], ang.sin()[:, None, None]
        tri &= nx * dx + ny * dy <= 0.6 * a_.maximum(b_)
    out = torch.where((kind == 0)[:, None, None], ellipse, torch.where((kind == 1)[:, None, None], rect, tri))
    return out


def make_scenes(n: int, size: int = 32, g: torch.Generator | None = None,
                max_shapes: int = 2) -> tuple[Tensor, Tensor]:
    """``n`` scenes: pictures ``(n, 3, size, size)`` in [-1, 1] and masks ``(n, 1, size, size)`` in {0, 1}."""
    if n < 1 or size < 8 or max_shapes < 1:
        raise DataError(f"scenes: need n >= 1, size >= 8 and max_shapes >= 1, got {n}, {size}, {max_shapes}")
    g = g if g is not None else torch.Generator().manual_seed(0)
    r = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    base = _u(g, n, 3, 1, 1, low=-0.6, high=0.6)
    img = base + 0.35 * _smooth_field(n, size, 4, g, 3) + 0.12 * torch.randn(n, 3, size, size, generator=g)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    count = torch.randint(1, max_shapes + 1, (n,), generator=g)
    for k in range(max_shapes):
        m = _shape_masks(n, size, g) & (count > k)[:, None, None]
        colour = _u(g, n, 3, 1, 1, low=-0.6, high=0.6)
        # stripes of period 3-6 px: a texture a small CNN detects at once, but colour clustering cannot
        freq, ang = _u(g, n, low=2 * math.pi / 6, high=2 * math.pi / 3), _u(g, n, high=math.pi)
        phase = (ang.cos()[:, None, None] * xx + ang.sin()[:, None, None] * yy) * freq[:, None, None]
        stripes = torch.sign(torch.sin(phase))[:, None] * _u(g, n, 1, 1, 1, low=0.2, high=0.4)
        fill = colour + stripes + 0.05 * torch.randn(n, 3, size, size, generator=g)
        img = torch.where(m[:, None], fill, img)
        mask |= m
    return img.clamp(-1, 1), mask[:, None].float()


def split_scene(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, 4, H, W)`` -> picture ``(B, 3, H, W)`` and mask channel ``(B, 1, H, W)``."""
    if x.dim() != 4 or x.shape[1] != IMAGE_CHANNELS + 1:
        raise ValueError(f"expected (B, {IMAGE_CHANNELS + 1}, H, W) scenes, got {tuple(x.shape)}")
    return x[:, :IMAGE_CHANNELS], x[:, IMAGE_CHANNELS:]


def load_scenes(split: str = "train", n: int | None = None, size: int = 32, seed: int = 0,
                max_shapes: int = 2) -> ArrayData:
    """Scenes as ``x`` ``(n, 4, size, size)``: RGB then the mask mapped to {-1, +1}.

    Defaults: ``n`` = 8000 for train and 512 for test; the splits are independent draws (``"all"``
    is refused). Deterministic in ``(split, n, size, seed, max_shapes)``.
    """
    check_split(split, ("train", "test"), source="scenes")
    n = int(n if n is not None else (8000 if split == "train" else 512))
    img, mask = make_scenes(n, int(size), generator(seed, "scenes", split), max_shapes)
    meta = {"split": split, "size": int(size), "seed": seed, "max_shapes": max_shapes,
            "channels": ["r", "g", "b", "mask"]}
    return ArrayData(torch.cat([img, 2 * mask - 1], 1), None, "scenes", meta)


register_dataset("scenes", load_scenes)
