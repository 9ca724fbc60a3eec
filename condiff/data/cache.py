"""Disk cache for generated data sets: ``io.cache_dir()/data/<name>-<hash>.npz``.

The hash covers the generator's name, every parameter and a format version, so changing a
setting generates (and caches) a new file instead of silently reusing a stale one. Files are
written to a temporary name and renamed, so a killed generator never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from condiff import io


def cache_path(name: str, params: dict) -> Path:
    key = hashlib.sha256(json.dumps({"name": name, **params}, sort_keys=True).encode()).hexdigest()[:16]
    return io.cache_dir() / "data" / f"{name}-{key}.npz"


def cached_arrays(
    name: str, params: dict, make: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load the arrays for ``(name, params)`` from the cache, or ``make()`` and store them."""
    path = cache_path(name, params)
    if path.is_file():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)  # unreadable (truncated, corrupted): regenerate
    arrays = make()
    io.write_file_atomic(path, lambda f: np.savez(f, **arrays), binary=True)
    return arrays
