"""Divergence-free 2D velocity fields on the periodic square.

A sample ``x (B, 2F, H, W)`` holds ``F`` velocity snapshots, channels ``(u, v)`` per snapshot, with
``u`` along the width axis and ``v`` along the height axis. The divergence is spectral,
``div = F^{-1}[i k_x u_hat + i k_y v_hat]``, the same derivative the pseudo-spectral solver that made
the data uses, so the data are divergence-free to float precision. Nyquist wavenumbers get a zero
derivative (their sign is ambiguous on an even grid). The grid spacing is ``2 pi / N``; the
distance is ``l(x) = mean |div x|`` (as in the NAMM paper), which is scale-invariant up to the factor used to
normalise the velocities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from condiff.constraints import Constraint, at_least_float32, register_constraint


def _wavenumbers(n: int, device: torch.device, rfft: bool) -> Tensor:
    k = (
        torch.fft.rfftfreq(n, 1.0 / n, device=device)
        if rfft
        else torch.fft.fftfreq(n, 1.0 / n, device=device)
    )
    if n % 2 == 0:
        k[n // 2 if not rfft else -1] = 0.0  # Nyquist: no well-defined derivative
    return k


def spectral_divergence(u: Tensor, v: Tensor) -> Tensor:
    """``d u / d x + d v / d y`` of periodic fields ``(..., H, W)`` on ``[0, 2 pi)^2``; differentiable
    (half-precision fields are computed, and returned, in float32)."""
    u, v = at_least_float32(u), at_least_float32(v)  # no FFT in half precision on the CPU; float32 comes back
    H, W = u.shape[-2:]
    kx = _wavenumbers(W, u.device, rfft=True)
    ky = _wavenumbers(H, u.device, rfft=False)[:, None]
    div_hat = 1j * kx * torch.fft.rfft2(u) + 1j * ky * torch.fft.rfft2(v)
    return torch.fft.irfft2(div_hat, s=(H, W))


@register_constraint("divergence_free")
class DivergenceFree(Constraint):
    """``x (B, 2F, H, W) -> (B,)``: ``mean |div|`` over snapshots and grid points."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"name": type(self).family}

    def divergence(self, x: Tensor) -> Tensor:
        """(B, 2F, H, W) -> (B, F, H, W)."""
        self._check_image(x)
        if x.shape[1] % 2:
            raise ValueError(
                f"divergence_free expects an even number of channels (u, v pairs), got {x.shape[1]}"
            )
        if len(x) == 0:  # the FFT refuses an empty batch
            return x.new_zeros(0, x.shape[1] // 2, *x.shape[2:])
        return spectral_divergence(x[:, 0::2], x[:, 1::2])

    def forward(self, x: Tensor) -> Tensor:
        return self.divergence(x).abs().flatten(1).mean(1)

    def violation_map(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.divergence(x).abs().sum(1)
