"""Timestep and class-label embeddings shared by the networks.

``t`` is the integer DDPM step (a ``(B,)`` long tensor) or any real-valued time (a float tensor);
both go through the same sinusoidal features, as in DDPM and diffusers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``t``: ``(B,) -> (B, dim)``, ``[cos(t w_k), sin(t w_k)]``.

    Frequencies ``w_k = max_period^(-k / (dim/2))`` span wavelengths from 2*pi to ``2*pi*max_period``;
    an odd ``dim`` gets a trailing zero column.
    """
    if t.dim() != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def batch_timesteps(t: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
    """``t`` as a ``(batch,)`` tensor on ``device``: a scalar is broadcast, a ``(B,)`` tensor is checked."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
    return t


class TimeEmbedding(nn.Module):
    """Sinusoidal features of width ``freq_dim`` followed by ``Linear -> SiLU -> Linear`` to ``dim``."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """``(B,) -> (B, dim)``."""
        feats = timestep_embedding(t, self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def check_label_range(y: Tensor | int, num_classes: int) -> None:
    """Refuse labels outside ``[0, num_classes)`` other than the "no label" value -1. (``num_classes``
    itself, the null label's index, is refused too: data labelled 1..K on a K-class model would
    otherwise train class K as unconditional, silently.)"""
    lo, hi = (int(y.min()), int(y.max())) if isinstance(y, Tensor) else (int(y), int(y))
    if lo < -1 or hi >= num_classes:
        shifted = (f" ({num_classes} was once read as the null label: pass -1, or no labels, for that)" if lo == hi
                   == num_classes else " (labels 1..K? subtract 1)" if lo >= 1 and hi == num_classes else "")
        raise ValueError(f"labels must lie in [0, {num_classes}) or be -1 (no label), got values in "
                         f"[{lo}, {hi}]{shifted}")


def check_labels_fit(y: Tensor | int | None, net: nn.Module, whose: str = "class labels") -> None:
    """Labels ``y`` (an int or a tensor; None: none) against a condiff network's classes, once, before any
    call: refused for a network built without classes (``num_classes = 0``), and outside ``[0, num_classes)``
    (:func:`check_label_range`). A network of one's own (no ``num_classes`` in its config) is left to itself."""
    config = getattr(net, "config", None)
    if y is None or not isinstance(config, dict) or "num_classes" not in config:
        return
    k = int(config.get("num_classes") or 0)
    if not k:
        raise ValueError(f"{whose} for a network built without classes (num_classes = 0): build it with num_classes "
                         "(the number of classes), or leave the labels out")
    if not isinstance(y, Tensor) or y.numel():
        check_label_range(y, k)


class LabelEmbedding(nn.Module):
    """Class labels ``y`` in ``[0, num_classes)`` to vectors, with one extra learned *null* label.

    The null label (index ``num_classes``) stands for "unconditional": it is used where ``y`` is
    ``None`` or ``-1``, so one network serves classifier-free guidance.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a label embedding, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch: int) -> Tensor:
        """``(B,)`` long labels (or ``None``) ``-> (B, dim)``."""
        null = self.num_classes
        if y is None:
            idx = torch.full((batch,), null, dtype=torch.long, device=self.table.weight.device)
            return self.table(idx)
        if y.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},) to match the batch, got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {y.dtype}")
        # checked where it is free: labels on a GPU would cost a wait for the device at every call (the
        # library's loaders check the labels of a data set, and NetDenoiser its fixed labels, once)
        if y.device.type == "cpu" and y.numel():
            check_label_range(y, self.num_classes)
        y = y.to(device=self.table.weight.device, dtype=torch.long)
        return self.table(torch.where(y < 0, torch.full_like(y, null), y))
