"""Input-convex neural network ``Psi(x)`` for images: the potential of NAMM's mirror map.

Architecture (Feng et al., ICLR 2025), all convolutions 3x3 with circular padding:

    z_0     = LReLU((A_0 x)^2 + B_0 x + b_0)
    z_{k+1} = LReLU(W_k z_k + (A_{k+1} x)^2 + B_{k+1} x + b_{k+1}),   k = 0 .. L-1
    Psi(x)  = spatial mean of  C z_L + c

``layers`` counts the activations ``z_0 .. z_L``, so ``layers = L + 1``: the paper's ``L = 3`` (``L = 2``
for the flow and count data) is ``layers = 4`` (3).

``Psi`` is convex in ``x`` as long as every ``W_k`` and ``C`` are non-negative: ``(A x)^2`` is convex,
``B x + b`` affine, LReLU convex and non-decreasing, and non-negative sums of convex functions are
convex. The trainer keeps them non-negative with :meth:`ICNN.clamp_weights` after every optimiser
step; they start at ``U(0, init_scale)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import checks
from . import register_net


def _conv(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="circular", bias=bias)


@register_net("icnn")
class ICNN(nn.Module):
    """``forward(x (B, C, H, W)) -> (B,)`` convex potential.

    Args:
        in_channels: image channels.
        filters: channels of every hidden layer (32 in the paper).
        layers: number of activations ``z_0 .. z_L``, ``L + 1`` (4 in the paper, whose ``L`` is 3; 3 for the
            flow and count data). Each takes the input through ``A_k`` and ``B_k``; all but the first
            also take the previous one through ``W_k``.
        slope: negative slope of the leaky ReLU.
        init_scale: the non-negative weights start at ``U(0, init_scale)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        filters: int = 32,
        layers: int = 4,
        slope: float = 0.2,
        init_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if int(in_channels) < 1 or int(filters) < 1 or int(layers) < 1:
            raise ValueError(
                f"ICNN: in_channels, filters and layers must be >= 1, got {in_channels}, {filters}, {layers}"
            )
        if not 0.0 <= float(slope) <= 1.0:
            raise ValueError(f"ICNN: slope must lie in [0, 1] for a convex activation, got {slope}")
        if not (checks.is_number(init_scale) and init_scale >= 0):
            raise ValueError(f"ICNN: init_scale (the non-negative weights start in [0, init_scale]) must be a "
                             f"number >= 0, got {init_scale!r}")
        self.config = {
            "name": "icnn",
            "in_channels": int(in_channels),
            "filters": int(filters),
            "layers": int(layers),
            "slope": float(slope),
            "init_scale": float(init_scale),
        }
        self.in_channels, self.slope = int(in_channels), float(slope)
        self.quad = nn.ModuleList(_conv(in_channels, filters, bias=False) for _ in range(layers))  # A_k
        self.lin = nn.ModuleList(_conv(in_channels, filters, bias=True) for _ in range(layers))  # B_k, b_k
        self.hidden = nn.ModuleList(_conv(filters, filters, bias=False) for _ in range(layers - 1))  # W_k
        self.out = _conv(filters, 1, bias=True)  # C, c
        with torch.no_grad():
            for conv in self.positive():
                conv.weight.uniform_(0.0, float(init_scale))

    def positive(self) -> list[nn.Conv2d]:
        """The convolutions whose weights must stay non-negative for convexity."""
        return [*self.hidden, self.out]

    @torch.no_grad()
    def clamp_weights(self) -> None:
        """Project ``W_k`` and ``C`` onto the non-negative orthant (call after each optimiser step)."""
        for conv in self.positive():
            conv.weight.clamp_(min=0.0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ICNN expects (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        z = None
        for k in range(len(self.quad)):
            pre = self.quad[k](x).pow(2) + self.lin[k](x)
            if z is not None:
                pre = pre + self.hidden[k - 1](z)
            z = F.leaky_relu(pre, self.slope)
        return self.out(z).mean((1, 2, 3))
