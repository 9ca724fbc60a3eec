"""Residual MLP for vector data ``(B, D)``: the network for 2-D toy distributions and small vectors."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .embed import LabelEmbedding, TimeEmbedding, batch_timesteps


class _Block(nn.Module):
    """Pre-norm residual block: ``h + W2 silu(W1 silu(norm h) + P emb)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(F.silu(z))


#: The most Fourier octaves :class:`TimeMLP` takes.
FOURIER_MAX = 20


class TimeMLP(nn.Module):
    """Epsilon network for vectors: ``forward(x (B, D), t (B,), y=None (B,)) -> (B, D)``.

    ``depth`` residual blocks of width ``hidden``; the time embedding (plus the class embedding when
    ``num_classes > 0``) enters every block. The output layer starts at zero, so the untrained net
    predicts ``eps = 0``.

    ``fourier = F > 0`` feeds ``[x, sin(2^k pi x), cos(2^k pi x)]`` for ``k < F`` (per coordinate) into the
    first layer instead of ``x`` alone: an MLP on raw coordinates is biased towards smooth functions and
    blurs thin structures (the 0.02-wide toy2d rings), which these features let it resolve.
    """

    def __init__(
        self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 64, num_classes: int = 0,
        fourier: int = 0,
    ) -> None:
        super().__init__()
        for key, val, low in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 1),
                              ("time_dim", time_dim, 2), ("num_classes", num_classes, 0),
                              ("fourier", fourier, 0)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < low:
                raise ValueError(f"TimeMLP: {key} must be an integer >= {low}, got {val!r}")
        dim, hidden, depth, time_dim, num_classes, fourier = map(
            int, (dim, hidden, depth, time_dim, num_classes, fourier))
        if fourier > FOURIER_MAX:  # 2^k pi x in float32: from k ~ 23 the phase is rounding noise, from ~ 125 inf
            raise ValueError(f"TimeMLP: fourier must be at most {FOURIER_MAX} (frequencies 2^k pi beyond that "
                             f"resolve nothing in float32), got {fourier}")
        self.config = {"name": "mlp", "dim": dim, "hidden": hidden, "depth": depth,
                       "time_dim": time_dim, "num_classes": num_classes}
        if fourier:  # only when used, so configs of models saved before the option stay identical
            self.config["fourier"] = fourier
        self.dim = dim
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(fourier, dtype=torch.float32), persistent=False)
        self.time = TimeEmbedding(time_dim, hidden)
        self.label = LabelEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim * (1 + 2 * fourier), hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"TimeMLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        t = batch_timesteps(t, x.shape[0], x.device)
        emb = self.time(t)
        if self.label is not None:
            emb = emb + self.label(y, x.shape[0])
        elif y is not None:
            raise ValueError("TimeMLP was built with num_classes=0 but got labels y")
        emb = F.silu(emb)
        if self.freqs.numel():
            a = (x[:, :, None] * self.freqs).flatten(1)
            x = torch.cat([x, torch.sin(a), torch.cos(a)], 1)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm(h)))
