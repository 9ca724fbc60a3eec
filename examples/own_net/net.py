"""A denoising network of one's own: `condiff train --set model.name=examples/own_net/net.py:SmallConvNet`.

condiff calls it as ``net(x, t)`` and trains it to predict the noise in ``x`` at the integer timesteps ``t``
(a class-conditional net, trained with ``data.labels = true``, is called as ``net(x, t, y)``, and as
``net(x, t)`` where it samples without a label: its ``y`` defaults to ``None``, and ``-1`` means "no label"
too; its constructor takes ``num_classes``). The constructor's arguments are the ``[model]`` settings
(``in_channels`` is filled in from the data where the constructor takes it), and each needs a default of
the kind it takes, so that a setting's type can be checked.
"""

import math

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """Four 3x3 convolutions at full resolution, with a sinusoidal timestep embedding added to each."""

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.width = width
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def embed(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        t = t.float().reshape(-1).expand(batch) if t.numel() == 1 else t.float()
        freqs = torch.exp(-math.log(10000.0) * torch.arange(self.width // 2, device=t.device) / (self.width // 2))
        angles = t[:, None] * freqs[None]
        return self.time(torch.cat([angles.sin(), angles.cos()], dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        emb = self.embed(t, x.shape[0])[:, :, None, None]
        for conv in self.body:
            h = h + conv(nn.functional.silu(h + emb))
        return self.out(nn.functional.silu(h))
