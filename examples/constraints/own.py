"""Constraints of your own: each is a callable ``x (B, ...) -> (B,)`` of distances, differentiable in
``x`` and zero on the set. condiff loads one by ``FILE.py:NAME``, e.g.

    condiff pnp constraint --ckpt runs/demo --constraint examples/constraints/own.py:top_heavy --clamp 1
    condiff namm fit --data mine.npz --constraint examples/constraints/own.py:zero_mean --out runs/mine
"""

import torch


def top_heavy(x: torch.Tensor) -> torch.Tensor:
    """The upper half of the picture at least as bright as the lower half."""
    h = x.shape[-2] // 2
    return torch.relu(x[..., h:, :].mean((1, 2, 3)) - x[..., :h, :].mean((1, 2, 3)))


def zero_mean(x: torch.Tensor) -> torch.Tensor:
    """Pictures whose pixels average to zero."""
    return x.flatten(1).mean(1).abs()
