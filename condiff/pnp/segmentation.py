"""Segmentation as plug-and-play inference, and the non-learned baselines it is measured against.

A diffusion prior is trained on (picture, mask) pairs stacked as channels. Given a picture, the mask
channel is the latent: ``x = concat(picture, z)``, and :func:`~condiff.pnp.engine.infer` minimises the
denoising loss of ``x`` over ``z`` alone. Several chains run per picture; a pixel is foreground where at
least ``votes`` chains put it there (default 1: the union). A chain's search tends to miss a shape or a
part of one rather than invent one, so the union beats a majority (numbers at :data:`SEGMENT_VOTES`).

Baselines (no learning): Otsu's threshold on brightness and 2-means on colour. Either splits the
pixels in two groups; the foreground is the group that touches the picture's border less, since the
generated shapes sit inside the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import checks
from ..denoiser import Denoiser
from .engine import infer
from .schedules import LinearAnneal, TimeSchedule

# from T (not 0.6 T) down to 0, and longer: on 48 training scenes the IoU went from 0.51 (150 steps from
# 0.6 T) to 0.61 (600 steps from T) and 0.66 (1200 steps from T) (docs/pnp.md)
SEGMENT_ANNEAL = LinearAnneal(1.0, 0.0)
# foreground where at least this many chains say so. On 48 training scenes, 4 chains of 1200 steps: one
# chain alone 0.58-0.68 IoU, at least 1 of 4 0.765, 2 of 4 0.722, 3 of 4 0.564, all 4 0.437 (2-means
# 0.571); with 2 chains, either 0.742, both 0.661 (docs/pnp.md)
SEGMENT_VOTES = 1


def iou(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union of masks ``(B, 1, H, W)``: ``(B,)``; 1 if both are empty. A mask is
    boolean, or numbers with foreground > 0 ({0, 1}, or {-1, 1} as the scenes data's mask channel)."""
    if pred.shape != target.shape:
        raise ValueError(f"masks differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p, t = (m.flatten(1) if m.dtype == torch.bool else (m > 0).flatten(1) for m in (pred, target))
    inter, union = (p & t).sum(1).double(), (p | t).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _border(h: int, w: int) -> Tensor:
    b = torch.zeros(h, w, dtype=torch.bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b


def _foreground(groups: Tensor) -> Tensor:
    """``(B, H, W)`` boolean split -> the side covering less of the border, as ``(B, 1, H, W)``."""
    border = _border(*groups.shape[1:])
    on = groups[:, border].float().mean(1)
    flip = on > 0.5
    return torch.where(flip[:, None, None], ~groups, groups)[:, None]


def _pictures(who: str, images: Tensor) -> Tensor:
    """``images`` (B, C, H, W) of at least 2 pixels outside any graph, integer pictures in float32 (pictures
    that require grad are taken as their values)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[-1] * images.shape[-2] < 2:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{who}: expected images (B, C, H, W) of at least 2 pixels, got shape {shape}")
    images = images.detach()
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):  # k-means gave an empty mask
        raise ValueError(f"{who}: the images hold NaN or inf values")
    return images if images.is_floating_point() else images.float()


def otsu_segment(images: Tensor) -> Tensor:
    """Otsu's threshold on the channel-mean brightness of ``(B, C, H, W)``: masks ``(B, 1, H, W)`` bool."""
    images = _pictures("otsu_segment", images)
    if len(images) == 0:
        return torch.zeros(0, 1, *images.shape[2:], dtype=torch.bool, device=images.device)
    grey = images.mean(1)
    out = []
    for g in grey:
        v = np.sort(g.flatten().double().cpu().numpy())
        # between-class variance for every split point of the sorted values
        k = np.arange(1, len(v))
        c = np.cumsum(v)
        w0, w1 = k / len(v), 1 - k / len(v)
        m0, m1 = c[:-1] / k, (c[-1] - c[:-1]) / (len(v) - k)
        thr = v[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))]
        out.append(g > thr)
    return _foreground(torch.stack(out))


def kmeans_segment(images: Tensor, iters: int = 20) -> Tensor:
    """2-means on pixel colours of ``(B, C, H, W)`` (centres started at the darkest and brightest pixel):
    masks ``(B, 1, H, W)`` bool."""
    images = _pictures("kmeans_segment", images)
    B, C, H, W = images.shape
    px = images.flatten(2).transpose(1, 2).double()  # (B, P, C)
    grey = px.mean(2)
    idx = torch.stack([grey.argmin(1), grey.argmax(1)], 1)
    centres = px.gather(1, idx[..., None].expand(-1, -1, C))  # (B, 2, C)
    for _ in range(iters):
        lab = torch.cdist(px, centres).argmin(2)  # (B, P)
        for k in range(2):
            sel = (lab == k).double()[..., None]
            cnt = sel.sum(1)
            centres[:, k] = torch.where(cnt > 0, (sel * px).sum(1) / cnt.clamp_min(1), centres[:, k])
    return _foreground((lab == 1).view(B, H, W))


def _check_votes(votes: int, chains: int) -> None:
    if not 1 <= votes <= chains:
        raise ValueError(f"votes must be between 1 and chains = {chains}, got {votes}")


def vote(latents: Tensor, votes: int) -> Tensor:
    """Masks ``(B, 1, H, W)`` (bool) from the chains' latents ``(B, chains, 1, H, W)``: foreground where
    at least ``votes`` chains are positive (1: the union; ``chains``: the intersection)."""
    _check_votes(votes, latents.shape[1])
    return (latents > 0).sum(1) >= votes


@dataclass
class SegmentationResult:
    """Each chain's mask latent ``(B, chains, 1, H, W)`` in [-1, 1], the voted masks ``(B, 1, H, W)``
    (bool), and the cost; ``soft`` is the chain mean."""

    latents: Tensor
    mask: Tensor
    seconds: float
    nfe: int

    @property
    def soft(self) -> Tensor:
        return self.latents.mean(1)


def segment(denoiser: Denoiser, images: Tensor, *, chains: int = 4, steps: int = 1200, lr: float = 0.05,
            schedule: TimeSchedule = SEGMENT_ANNEAL, votes: int = SEGMENT_VOTES, through_net: bool = True,
            generator: torch.Generator | None = None, progress: bool = False,
            batch_size: int = 256) -> SegmentationResult:
    """Infer the mask channel of a joint (picture, mask) prior for pictures ``(B, C, H, W)``.

    ``chains`` independent chains per picture start from ``N(0, I)`` masks; the mask latent is kept in
    [-1, 1] by a clamp after each step. A pixel is foreground where at least ``votes`` chains have a
    positive mask there (:func:`vote`). Returns the chains' latents and the voted masks. Pictures go
    through the search ``batch_size`` at a time (all their chains together), one batch after the other
    from the same ``generator``, so memory does not grow with ``B``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    checks.floating("segment: images", images)  # else the latent, cast to them, was blamed
    if not bool(torch.isfinite(images).all()):  # else named as "lower the learning rate" at the first step
        raise ValueError("segment: the images hold NaN or inf values")
    if chains < 1:
        raise ValueError(f"chains must be >= 1, got {chains}")
    _check_votes(votes, chains)  # before the search, not after it
    batch_size = checks.integer("batch_size", batch_size, 1)
    if images.shape[0] > batch_size:
        parts = [segment(denoiser, images[i:i + batch_size], chains=chains, steps=steps, lr=lr, schedule=schedule,
                         votes=votes, through_net=through_net, generator=generator, progress=progress,
                         batch_size=batch_size) for i in range(0, images.shape[0], batch_size)]
        return SegmentationResult(torch.cat([p.latents for p in parts]), torch.cat([p.mask for p in parts]),
                                  sum(p.seconds for p in parts), sum(p.nfe for p in parts))
    B, C, H, W = images.shape
    pics = images.repeat_interleave(chains, 0)
    z0 = torch.randn(B * chains, 1, H, W, generator=generator,
                     device=generator.device if generator is not None else images.device).to(images)
    res = infer(denoiser, z0, render=lambda z: torch.cat([pics, z], 1), schedule=schedule, steps=steps, lr=lr,
                through_net=through_net, project=lambda z: z.clamp(-1, 1), generator=generator,
                progress=progress)
    lat = res.latent.view(B, chains, 1, H, W)
    return SegmentationResult(lat, vote(lat, votes), res.seconds, res.nfe)
