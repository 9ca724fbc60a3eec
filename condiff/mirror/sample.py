"""Sampling a mirror diffusion model: draw in mirror space with the core sampler, return ``f(y)``."""

from __future__ import annotations

import torch
from torch import Tensor

from condiff import checks
from condiff.constraints import check_distance, check_sign
from condiff.denoiser import Denoiser
from condiff.mirror.map import MirrorMap, check_mirror
from condiff.sample import generate


def check_space(who: str, denoiser: Denoiser, mirror: MirrorMap | None) -> None:
    """Refuse a mirror diffusion model without its map (its samples would be returned in mirror space, as if they
    were data), or a data-space model with one. A denoiser says what it is in ``mirror_space`` where that is known
    (loaded from a NAMM run's stage, or made by ``train_diffusion(..., mirror_space=True)``)."""
    space = getattr(denoiser, "mirror_space", None)  # (Denoiser.mirror_space; a stand-in of one's own may lack it)
    if space is True and mirror is None:
        raise ValueError(f"{who}: the denoiser is a mirror diffusion model (trained on g(x)), whose samples lie in "
                         "mirror space: pass mirror=, the map it was trained with, so that f takes them back to data")
    if space is False and mirror is not None:
        instead = "sample it with condiff.sample.generate" if who == "mirror_generate" else "leave out mirror="
        raise ValueError(f"{who}: the denoiser is a data-space model (a NAMM run's vanilla stage), not a mirror "
                         f"diffusion model: {instead}, or pass the run's mirror DM")


def mirror_generate(
    denoiser: Denoiser, mirror: MirrorMap, n: int, shape: tuple[int, ...], batch_size: int = 256, **kw
) -> tuple[Tensor, Tensor]:
    """``n`` samples of per-sample ``shape`` from the mirror diffusion model ``denoiser``.

    Returns ``(x, y)``: data-space samples ``x = f(y)`` and the mirror-space samples ``y``, both on
    the CPU, ``(n, *shape)``. Keyword arguments go to :func:`condiff.sample.generate` (``steps``,
    ``eta``, ``generator``, ``device``, ``guidance``, ...).
    """
    check_mirror("mirror_generate", mirror)  # before the samples are drawn, not after
    check_space("mirror_generate", denoiser, mirror)
    y = generate(denoiser, n, shape, batch_size=batch_size, **kw)
    return mirror.to_data(y, batch_size), y


@torch.no_grad()
def batched_distance(
    constraint, x: Tensor, batch_size: int = 256, device: str | torch.device = "cpu"
) -> Tensor:
    """``l(x)`` for a large set ``x`` (N, ...) in batches: ``(N,)`` on the CPU (empty for an empty set)."""
    if len(x) == 0:
        return torch.empty(0)
    try:
        parts = [constraint(x[i : i + batch_size].to(device)).detach().cpu() for i in range(0, len(x), batch_size)]
    except (RuntimeError, ValueError) as e:
        if "does not require grad" not in str(e):
            raise
        raise ValueError(f"{e} (condiff scores distances under torch.no_grad(); a distance that calls "
                         "torch.autograd itself must run that code under torch.enable_grad())") from e
    return check_sign(torch.cat(parts))


def data_violation(constraint, x: Tensor, n: int = 512, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """How well training data ``x`` meet a constraint, for a mirror map that assumes they do.

    On up to ``n`` samples (a seeded choice): the mean and median ``l(x)``, against the median ``l`` of as
    many structureless images, Gaussian noise with the data's mean and standard deviation (the scale of
    "nothing like the set"). ``satisfied`` is False when the data's median is not well below (a quarter
    of) the noise's: such data leave the mirror map a constraint they do not meet themselves.
    """
    n = checks.integer("data_violation: n", n, 1)
    if len(x) == 0:
        raise ValueError("data_violation: no data to measure (x is empty)")
    g = torch.Generator().manual_seed(checks.seed("data_violation: seed", seed))
    pick = x[torch.randperm(len(x), generator=g)[:n]]
    clean = batched_distance(constraint, pick, device=device).double()
    noise = float(x.mean()) + float(x.std()) * torch.randn(pick.shape, generator=g)
    on_noise = batched_distance(constraint, noise, device=device)
    for what, v in (("training samples", clean), ("images of Gaussian noise with the data's mean and std", on_noise)):
        bad = int((~torch.isfinite(v)).sum())
        if bad:  # a mirror map trains on noisy images f(g(x) + sigma z): the distance must be finite off the set
            raise ValueError(f"the constraint distance is not finite (NaN or inf) on {bad} of {len(v)} {what}; a "
                             "mirror map evaluates it on noisy images, so it must be finite everywhere")
    # off the set, where the map's training moves f(y): a distance with no slope there (rounded, thresholded)
    # teaches the map nothing, said here rather than after the fit (check_distance warns)
    if not torch.is_inference_mode_enabled():  # (a measurement may be taken in inference mode: no slope to check)
        check_distance(constraint, noise[:4].to(device), on=" on images of Gaussian noise with the data's mean and std")
    median, noise_median = float(clean.median()), float(on_noise.median())
    return {"n": len(pick), "mean": float(clean.mean()), "median": median, "noise_median": noise_median,
            "satisfied": median <= 0.25 * noise_median}
