"""Write a small labelled image data set of your own, as condiff reads one (docs/own-data.md).

    python examples/own_data/make_shapes.py --out shapes      # shapes/shapes.npz, mask.png, observed.npy

``shapes.npz`` holds ``x_train`` / ``y_train`` / ``x_test`` / ``y_test``: 16x16 greyscale pictures of
one shape each (0 square, 1 disc, 2 cross) at a random place and size, in [-1, 1] (background -1),
channels first ``(N, 1, 16, 16)``. ``mask.png`` (white = observed) hides a band across the middle,
and ``observed.npy`` holds the first 8 test pictures seen through it with noise 0.05: measurements
"made elsewhere" for ``condiff solve --measurement``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16
CLASSES = ("square", "disc", "cross")


def shape(kind: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One picture in [-1, 1] of shape class ``kind``."""
    r = rng.uniform(3.0, 5.5)
    cy, cx = rng.uniform(r + 0.5, size - r - 1.5, 2)
    yy, xx = np.mgrid[:size, :size] + 0.5
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        on = np.maximum(abs(dy), abs(dx)) <= r * 0.85
    elif kind == 1:
        on = dy**2 + dx**2 <= r**2
    else:
        arm = max(1.0, r / 3)
        on = ((abs(dy) <= arm) & (abs(dx) <= r)) | ((abs(dx) <= arm) & (abs(dy) <= r))
    return np.where(on, rng.uniform(0.6, 1.0), -1.0).astype(np.float32)


def make(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(CLASSES), n)
    return np.stack([shape(int(k), rng, SIZE) for k in y])[:, None], y.astype(np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="shapes", help="output folder")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.n_train < 1 or a.n_test < 1:
        p.error(f"--n-train and --n-test must be >= 1, got {a.n_train} and {a.n_test}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    x_train, y_train = make(a.n_train, rng)
    x_test, y_test = make(a.n_test, rng)
    np.savez_compressed(out / "shapes.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    mask = np.ones((SIZE, SIZE), np.uint8)
    mask[6:10, :] = 0  # a band across the middle is missing
    Image.fromarray(mask * 255).save(out / "mask.png")
    observed = (x_test[:8] + 0.05 * rng.standard_normal(x_test[:8].shape)) * mask
    np.save(out / "observed.npy", observed.astype(np.float32))
    print(f"wrote {out / 'shapes.npz'} ({a.n_train} train, {a.n_test} test, classes {', '.join(CLASSES)}), "
          f"{out / 'mask.png'}, {out / 'observed.npy'}")


if __name__ == "__main__":
    main()
