"""RGB patches ``(N, 3, size, size)`` in [-1, 1] cut from natural photographs shipped with the
installed scikit-learn and scikit-image wheels (read from disk; nothing is downloaded).

The split is by source image, so no test patch shares a photograph with a training patch:

- train: ``china``, ``flower`` (scikit-learn), ``astronaut``, ``rocket``, ``motorcycle_left``
  (scikit-image)
- test: ``chelsea`` (a cat), ``coffee`` (a cup), both scikit-image

``motorcycle_right`` (a near copy of the left view), and the synthetic, microscopy, astronomy and
greyscale images in ``skimage/data`` are left out. With ``n=None`` patches lie on a grid with
``stride`` (default ``size // 2``): at ``size=32`` that is 5236 train and 1323 test patches. With
``n`` given, ``n`` crops are drawn at seeded random positions, each image weighted by its number of
positions. ``flip=True`` adds mirror images (grid) or mirrors each crop with probability 1/2.
Loading takes well under a second, so nothing is cached.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from condiff.data import ArrayData, DataError, check_split, generator

TRAIN_IMAGES = ("china", "flower", "astronaut", "rocket", "motorcycle_left")
TEST_IMAGES = ("chelsea", "coffee")
_SKIMAGE_FILES = {
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
}


def _package_dir(package: str) -> Path:
    # find_spec locates a package without importing it (importing sklearn.datasets takes seconds).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"patches: package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def _image_path(name: str) -> Path:
    if name in ("china", "flower"):
        return _package_dir("sklearn") / "datasets" / "images" / f"{name}.jpg"
    return _package_dir("skimage") / "data" / _SKIMAGE_FILES[name]


def source_image(name: str, downscale: int = 1) -> np.ndarray:
    """One source photograph as a uint8 ``(H, W, 3)`` array, box-averaged by ``downscale``."""
    path = _image_path(name)
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"patches: cannot read source image {name!r} at {path}: {e}") from None
    if downscale > 1:
        h, w = (s // downscale * downscale for s in img.shape[:2])
        blocks = img[:h, :w].reshape(h // downscale, downscale, w // downscale, downscale, 3)
        img = blocks.mean((1, 3)).round().astype(np.uint8)
    return img


def _grid(img: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    windows = np.lib.stride_tricks.sliding_window_view(img, (size, size), axis=(0, 1))[::stride, ::stride]
    rows, cols = windows.shape[:2]
    pos = [(r * stride, c * stride) for r in range(rows) for c in range(cols)]
    return windows.reshape(-1, 3, size, size), pos


def _random_crops(
    images: list[np.ndarray], size: int, n: int, g: torch.Generator
) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    counts = torch.tensor(
        [(i.shape[0] - size + 1) * (i.shape[1] - size + 1) for i in images], dtype=torch.float64
    )
    which = torch.multinomial(counts, n, replacement=True, generator=g).tolist()
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    pos = []
    for k, (i, (a, b)) in enumerate(zip(which, u.tolist())):
        h, w = images[i].shape[:2]
        r, c = int(a * (h - size + 1)), int(b * (w - size + 1))
        out[k] = images[i][r : r + size, c : c + size].transpose(2, 0, 1)
        pos.append((r, c))
    return out, which, pos


def load_patches(
    split: str = "train",
    size: int = 32,
    n: int | None = None,
    seed: int = 0,
    stride: int | None = None,
    flip: bool = False,
    downscale: int = 1,
) -> ArrayData:
    """Patches of the ``split`` images (``"train"``, ``"test"`` or ``"all"``), values ``v / 127.5 - 1``.

    ``meta["sources"]`` names each patch's image and ``meta["positions"]`` its top-left corner
    (in the downscaled image); ``meta["images"]`` lists the images of the split.
    """
    check_split(split, source="patches")
    names = {"train": TRAIN_IMAGES, "test": TEST_IMAGES, "all": TRAIN_IMAGES + TEST_IMAGES}[split]
    stride = size // 2 if stride is None else stride
    if size < 1 or stride < 1 or downscale < 1:
        raise DataError(
            f"patches: size, stride and downscale must be >= 1, got {size}, {stride}, {downscale}"
        )
    images = [source_image(name, downscale) for name in names]
    if any(min(i.shape[:2]) < size for i in images):
        raise DataError(f"patches: size {size} is larger than a source image after downscale {downscale}")
    if n is None:
        parts = [_grid(img, size, stride) for img in images]
        x = np.concatenate([p for p, _ in parts])
        sources = [name for name, (p, _) in zip(names, parts) for _ in range(len(p))]
        positions = [q for _, pos in parts for q in pos]
        if flip:
            x = np.concatenate([x, x[..., ::-1]])
            sources, positions = sources * 2, positions * 2
    else:
        if n < 1:
            raise DataError(f"patches: n must be at least 1, got {n}")
        g = generator(seed, "patches", split)
        x, which, positions = _random_crops(images, size, n, g)
        sources = [names[i] for i in which]
        if flip:
            mirror = torch.rand(n, generator=g) < 0.5
            x[mirror.numpy()] = x[mirror.numpy()][..., ::-1]
    meta = {
        "split": split,
        "size": size,
        "stride": stride if n is None else None,
        "seed": seed,
        "flip": flip,
        "downscale": downscale,
        "images": list(names),
        "sources": sources,
        "positions": positions,
        "per_sample": ("sources", "positions"),
    }
    x = torch.from_numpy(np.ascontiguousarray(x)).float() / 127.5 - 1.0
    return ArrayData(x, None, "patches", meta)
