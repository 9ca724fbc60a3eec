"""Guided sampling: the DDIM loop with a guidance rule, plus the cost counters a benchmark needs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import checks
from ..denoiser import Denoiser
from ..sample import Guidance, Step, check_denoiser, check_shape, ddim, randn


@dataclass
class GuidedResult:
    """A batch of guided samples and what it cost."""

    x: Tensor            # (B, ...) samples x_0
    steps: int           # sampler steps
    nfe: int             # network forward evaluations (time travel / recurrence included)
    grad_evals: int      # backward passes through the network
    seconds: float       # wall time of the sampling loop


def guided_sample(denoiser: Denoiser, guidance: Guidance, shape: tuple[int, ...], steps: int,
                  eta: float = 1.0, generator: torch.Generator | None = None,
                  device: str | torch.device | None = None, clip_x0: float | tuple[float, float] | str | None = "auto",
                  spacing: str = "linspace", x_T: Tensor | None = None,
                  progress: bool = False, callback: Callable[[Step], None] | None = None) -> GuidedResult:
    """Draw ``shape[0]`` guided samples with ``steps`` DDIM steps of stochasticity ``eta``.

    Args:
        denoiser: any Denoiser (condiff net, diffusers UNet, analytic oracle).
        guidance: DPS, FreeDoM, UGD, DSG(...) or any object with ``needs_grad`` and ``__call__(step)``.
        shape: ``(B, C, H, W)`` (or ``(B, D)``); the batch must match the loss's batch.
        eta: 1 gives DDPM-like ancestral steps (the DPS / DSG papers' setting); DSG refuses 0.
        clip_x0: clamp ``x0_hat`` to ``[-clip_x0, clip_x0]``, or to ``[lo, hi]`` for a pair; None: off.
            ``"auto"`` (the default, unlike :func:`~condiff.sample.ddim`'s None): ``[-1, 1]``, the house data
            range to which the DPS code clips, or the training data's ``[min, max]`` where a loaded model
            records data beyond it (:func:`~condiff.sample.default_clip`).
        callback: called with each step (:class:`~condiff.sample.Step`), as in :func:`~condiff.sample.ddim`.
        x_T: starting noise (default: drawn from ``generator``).
        device: where the samples are made (default: where the denoiser's weights are).
    """
    if getattr(guidance, "needs_noise", False) and eta == 0:
        raise ValueError("DSG needs a stochastic sampler (eta > 0): with eta = 0 its sphere has radius 0; "
                         "use eta = 1 as in the DSG paper")
    if x_T is not None:  # a meta tensor's .to() below would fail inside torch
        checks.floating("x_T", x_T)
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape asks for {tuple(shape)}")
    check_denoiser(denoiser)
    check_shape(denoiser, shape, batch=True)
    device = checks.param_device(denoiser) if device is None else device
    x = randn(shape, generator, device=device, dtype=checks.param_dtype(denoiser)) if x_T is None else x_T.to(
        checks.device("device", device))
    ts = denoiser.schedule.timesteps(steps, spacing)
    nfe0, g0 = denoiser.nfe, getattr(guidance, "grad_evals", 0)
    t0 = time.perf_counter()
    out = ddim(denoiser, x, ts, eta=eta, generator=generator, guidance=guidance,
               clip_x0=clip_x0,  # "auto" resolved by ddim
               progress=progress, callback=callback)
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    seconds = time.perf_counter() - t0
    grads = getattr(guidance, "grad_evals", 0) - g0
    return GuidedResult(out, int(steps), denoiser.nfe - nfe0, grads, seconds)
