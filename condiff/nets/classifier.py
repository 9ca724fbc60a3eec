"""A small CNN classifier for 8x8 digit images; the project's judge of generated digits."""

from __future__ import annotations

import torch
from torch import nn

from . import register_net


@register_net("digits_cnn")
class DigitsCNN(nn.Module):
    """CNN for (B, 1, 8, 8) images in [-1, 1].

    Two conv blocks (8x8 -> 4x4 -> 2x2) and a fully connected layer give ``feature_dim``
    penultimate features (used for Fréchet distances); a linear head gives the logits.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {
            "name": "digits_cnn",
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
        }
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 2 * 2, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) -> (B, feature_dim) penultimate activations."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsCNN expects (B, 1, 8, 8) images, got shape {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) -> (B, num_classes) logits."""
        return self.head(self.features(x))
