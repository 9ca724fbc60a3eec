"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), as ``(N, 1, 8, 8)`` in [-1, 1].

The train/test split is stratified and fixed: within each class, images are ordered by a SHA-256
hash of ``(seed, index)`` and the first ``round(test_fraction * n_class)`` go to test. Hashing
instead of a random generator keeps the split identical on every machine and library version.
With the defaults, 1438 images are for training and 359 for testing.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from condiff.data import ArrayData, DataError, check_split


def _hash_key(seed: int, i: int) -> bytes:
    return hashlib.sha256(f"digits:{seed}:{i}".encode()).digest()


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of a stratified split that depends only on its arguments."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"digits: test_fraction must lie in (0, 1), got {test_fraction}")
    test: list[int] = []
    for c in np.unique(labels):
        members = sorted(np.flatnonzero(labels == c).tolist(), key=lambda i: _hash_key(seed, i))
        k = round(test_fraction * len(members))
        if k == 0 or k == len(members):
            raise DataError(f"digits: test_fraction={test_fraction} leaves class {c} empty in one split")
        test += members[:k]
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ArrayData:
    """The digits as ``x`` ``(N, 1, 8, 8)`` with values ``v / 8 - 1`` (``v`` in 0..16) and ``y`` in 0..9.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``; ``meta["indices"]`` gives each image's row in
    ``sklearn.datasets.load_digits()``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    check_split(split, source="digits")
    bunch = sk_load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    train, test = split_indices(labels, test_fraction, seed)
    idx = {"train": train, "test": test, "all": np.arange(len(labels))}[split]
    x = torch.from_numpy(images[idx] / 8.0 - 1.0).unsqueeze(1)
    meta = {
        "split": split,
        "test_fraction": test_fraction,
        "seed": seed,
        "indices": idx.tolist(),
        "per_sample": ("indices",),
    }
    return ArrayData(x, torch.from_numpy(labels[idx]), "digits", meta)
