"""Constraints for the shapes of make_shapes.py (docs/own-data.md): distances ``x (B, 1, H, W) -> (B,)``,
differentiable and zero on the set.

    condiff pnp constraint --ckpt runs/shapes --constraint examples/own_data/constraints.py:on_the_left
    condiff namm fit --data shapes/shapes.npz --constraint examples/own_data/constraints.py:dark_frame \
        --out runs/shapes-namm

``on_the_left`` asks for something most training pictures are not (plug-and-play's job); ``dark_frame``
holds for all of them (what a mirror map needs: ``namm fit`` warns when the data do not meet the constraint).
"""

import torch


def on_the_left(x: torch.Tensor) -> torch.Tensor:
    """The shape lies in the left half: the right half stays background (-1), measured as the mean
    brightness above background there."""
    w = x.shape[-1] // 2
    return (x[..., w:] + 1).clamp(min=0).mean((1, 2, 3))


def _right_half_brightness(x: torch.Tensor) -> torch.Tensor:
    """Where ``on_the_left`` is violated, per pixel ``(B, H, W)``: the pictures show it beside the samples."""
    v = (x[:, 0] + 1).clamp(min=0)
    v[..., : x.shape[-1] // 2] = 0
    return v


on_the_left.violation_map = _right_half_brightness


def dark_frame(x: torch.Tensor) -> torch.Tensor:
    """The outermost ring of pixels is background (-1), as in every picture of make_shapes.py: a set the
    training data lie on, so a mirror map can learn it (``condiff namm fit --constraint ...:dark_frame``)."""
    frame = torch.ones_like(x[:1], dtype=torch.bool)
    frame[..., 1:-1, 1:-1] = False
    return ((x + 1).clamp(min=0) * frame).flatten(1).sum(1) / frame.sum()
