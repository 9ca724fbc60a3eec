"""Sampling a mirror diffusion model: draw in mirror space with the core sampler, return ``f(y)``."""

from __future__ import annotations

import torch
from torch import Tensor

from condiff.constraints import check_sign
from condiff.denoiser import Denoiser
from condiff.mirror.map import MirrorMap
from condiff.sample import generate


def mirror_generate(
    denoiser: Denoiser, mirror: MirrorMap, n: int, shape: tuple[int, ...], batch_size: int = 256, **kw
) -> tuple[Tensor, Tensor]:
    """``n`` samples of per-sample ``shape`` from the mirror diffusion model ``denoiser``.

    Returns ``(x, y)``: data-space samples ``x = f(y)`` and the mirror-space samples ``y``, both on
    the CPU, ``(n, *shape)``. Keyword arguments go to :func:`condiff.sample.generate` (``steps``,
    ``eta``, ``generator``, ``device``, ``guidance``, ...).
    """
    y = generate(denoiser, n, shape, batch_size=batch_size, **kw)
    return mirror.to_data(y, batch_size), y


@torch.no_grad()
def batched_distance(
    constraint, x: Tensor, batch_size: int = 256, device: str | torch.device = "cpu"
) -> Tensor:
    """``l(x)`` for a large set ``x`` (N, ...) in batches: ``(N,)`` on the CPU."""
    return check_sign(torch.cat(
        [constraint(x[i : i + batch_size].to(device)).detach().cpu() for i in range(0, len(x), batch_size)]
    ))
