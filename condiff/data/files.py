"""User data from disk (``.npy``, ``.npz``, PNG files and folders of PNGs) and PNG output for image batches.

Arrays are loaded with ``allow_pickle=False``: a file holding Python objects is refused, since
unpickling can run code. Integer images are scaled to [-1, 1] (``uint8`` by 255, ``uint16`` by
65535); float arrays are taken as they are, already scaled by the user. PNG files are written
atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from condiff import io
from condiff.data import IMAGE_BYTES, ArrayData, DataError, NoSplitError, check_split, native, validate, warn_range

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}


# --- .npy / .npz --------------------------------------------------------------------------------


def _read(load: Any, path: Path, what: str) -> np.ndarray:
    try:
        return native(np.asarray(load()), f"{path} ({what})")  # in native byte order, which torch needs
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path}: {what} holds pickled Python objects, which are never loaded") from None
        raise DataError(f"{path}: cannot read {what}: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read {what}: {e}") from None


def _open_npz(path: Path) -> Any:
    if not zipfile.is_zipfile(path):  # else numpy would take it for a pickle
        raise DataError(f"{path}: not an .npz file (not a zip archive)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read the npz archive: {e}") from None


def check_npy_header(path: Path, what: str = "") -> None:
    """Refuse a ``.npy`` without NumPy's header (a text file, say), which numpy would take for a pickle."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise DataError(f"{what}{path}: not a .npy file (no NumPy header)")


def load_array(path: str | Path, key: str | None = None) -> ArrayData:
    """Load ``x`` (and integer labels ``y``) from a ``.npy`` or ``.npz`` file.

    In an ``.npz`` the data are ``key``, else the only array, else ``"x"``, else ``"arr_0"``; the
    labels are the array named like the data with ``x`` replaced by ``y`` (``y``, ``y_train``; ``X_train``
    -> ``Y_train``), if any; for data named otherwise (``images``), an array ``labels``, ``label`` or ``y``
    holding one entry per sample.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    if path.suffix.lower() == ".npy":
        check_npy_header(path)
        x = _read(lambda: np.load(path, allow_pickle=False), path, "the array")
        x = warn_range(validate(x, str(path)), str(path), unscaled=x.dtype.name not in IMAGE_BYTES)
        return ArrayData(x, None, path.stem, {"path": str(path)})
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: expected a .npy or .npz file, got {path.suffix or 'no suffix'}")
    with _open_npz(path) as npz:
        keys = list(npz.files)
        if key is None:
            key = keys[0] if len(keys) == 1 else next((k for k in ("x", "arr_0") if k in keys), None)
        if key not in keys:
            wanted = "array named 'x' or 'arr_0'" if key is None else f"array {key!r}"
            raise DataError(f"{path}: no {wanted}; the file holds {keys} (pass key=... to the loader; on the "
                            "command line --set data.key=NAME)")
        x = _read(lambda: npz[key], path, f"array {key!r}")
        y_key = _label_key(npz, keys, key, len(x))
        y = _read(lambda: npz[y_key], path, f"array {y_key!r}") if y_key in keys else None
    x = warn_range(validate(x, f"{path}[{key!r}]"), f"{path}[{key!r}]", unscaled=x.dtype.name not in IMAGE_BYTES)
    return ArrayData(x, y, path.stem, {"path": str(path), "key": key})


def _label_key(npz: Any, keys: list[str], key: str, n: int) -> str | None:
    """The labels' array for the data array ``key`` of ``n`` samples (:func:`load_array`), or None: the
    array named like the data with ``x`` replaced by ``y`` (taken as it is: labels it cannot use are an
    error, as they always were), else ``Y_...`` beside ``X_...``, ``labels``, ``label`` or ``y`` where it
    holds one whole number per sample (else it is other data, such as one-hot rows or regression
    targets, and left alone)."""
    if key.startswith("x") and "y" + key[1:] in keys:
        return "y" + key[1:]
    candidates = (["Y" + key[1:]] if key.startswith("X") else []) + ["labels", "label", "y"]
    for k in candidates:
        if k in keys and k != key:
            try:
                a = npz[k]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):
                continue
            whole = a.dtype.kind in "iu" or (a.dtype.kind == "f" and bool(np.isfinite(a).all())
                                              and bool((a == np.round(a)).all()))
            if a.shape == (n,) and whole:
                return k
    return None


# --- PNG folders ---------------------------------------------------------------------------------


def _decode(im: Image.Image) -> np.ndarray:
    """A PIL image as float ``(H, W, 1 or 3)`` in [0, 1]; alpha is dropped."""
    if im.mode.startswith("I"):  # 16-bit greyscale
        return np.clip(np.asarray(im, dtype=np.float64) / 65535.0, 0, 1)[..., None]
    if im.mode in _GREY_MODES:
        return np.asarray(im.convert("L"), dtype=np.float64)[..., None] / 255.0
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def _read_png(f: Path) -> np.ndarray:
    try:
        with Image.open(f) as im:
            return _decode(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{f}: unreadable image file ({type(e).__name__}: {e})") from None


def _to_channels(a: np.ndarray, channels: int) -> np.ndarray:
    if a.shape[-1] == channels:
        return a
    if channels == 3:
        return np.repeat(a, 3, axis=-1)
    return a @ np.array([0.299, 0.587, 0.114])[:, None]  # ITU-R 601 luma, as PIL's convert("L")


def load_png_folder(path: str | Path, channels: int | None = None) -> ArrayData:
    """All ``*.png`` in a folder (not its subfolders), sorted by name, as ``(N, C, H, W)`` in [-1, 1];
    or one ``.png`` file as a batch of one.

    ``channels`` is 1 or 3; by default 1 when every image is greyscale, else 3. All images must
    have one size. ``meta["files"]`` names each image's file.
    """
    path = Path(path)
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, got {channels}")
    if path.is_file() and path.suffix.lower() == ".png":
        files = [path]
    elif not path.is_dir():
        raise DataError(f"no such folder: {path}")
    elif (path / ".condiff-run").is_file() or ((path / "config.json").is_file() and (path / "log.jsonl").is_file()):
        # its PNGs are plots (loss.png, samples.png), not data
        raise DataError(f"{path} is a condiff run directory, not a folder of images: pass the data's own folder "
                        "or file (a run's samples are in samples.npz)")
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise DataError(f"{path}: no .png files in the folder")
    images = [_read_png(f) for f in files]
    for f, a in zip(files, images):
        if a.shape[:2] != images[0].shape[:2]:
            raise DataError(
                f"{f}: image is {a.shape[1]}x{a.shape[0]} (WxH) but {files[0].name} is "
                f"{images[0].shape[1]}x{images[0].shape[0]}; all images in {path} must share one size"
            )
    c = channels or (1 if all(a.shape[-1] == 1 for a in images) else 3)
    x = np.stack([_to_channels(a, c) for a in images]).transpose(0, 3, 1, 2) * 2.0 - 1.0
    meta = {"path": str(path), "files": [f.name for f in files], "per_sample": ("files",)}
    return ArrayData(x.astype(np.float32), None, path.name, meta)


# --- named splits for paths ------------------------------------------------------------------------


def _concat(parts: list[ArrayData], name: str, splits: list[str] | None = None) -> ArrayData:
    if len(parts) == 1:
        return parts[0]
    same_item_shape(dict(zip(splits or [str(i) for i in range(len(parts))], parts)), name)
    y = torch.cat([p.y for p in parts]) if all(p.y is not None for p in parts) else None
    return ArrayData(torch.cat([p.x for p in parts]), y, name, {"parts": [p.meta for p in parts]})


def same_item_shape(splits: dict[str, ArrayData | Tensor], name: str) -> None:
    """A DataError naming each split's item shape when they differ (a model needs one shape)."""
    shapes = {k: tuple((v.x if isinstance(v, ArrayData) else v).shape[1:]) for k, v in splits.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{name}: the splits hold items of different shapes {shapes}; a model needs one shape")


def _npz_keys(path: Path) -> list[str]:
    with _open_npz(path) as npz:
        return list(npz.files)


def _splits(path: Path, kwargs: dict) -> dict[str, str]:
    """Where a path keeps its named splits: subfolders of a folder, ``x_<split>`` arrays of an npz.

    Beside a test split, the training data may also be the folder's own PNGs or an npz's ``x`` array
    (``""`` and ``"x"`` here), so that ``"all"`` joins them with the test split rather than leaving them out.
    """
    if path.is_dir():
        parts = {s: s for s in ("train", "test") if (path / s).is_dir()}
        if "test" in parts and "train" not in parts and any(
                p.suffix.lower() == ".png" and p.is_file() for p in path.iterdir()):
            parts = {"train": "", **parts}
        return parts
    if path.suffix.lower() == ".npz" and kwargs.get("key") is None:
        keys = _npz_keys(path)
        if "x" in keys and "x_train" in keys:  # either could be the training data: do not guess
            raise DataError(f"{path} holds both x and x_train: keep one as the training data, or pick one with "
                            "key=... (on the command line --set data.key=NAME)")
        parts = {s: f"x_{s}" for s in ("train", "test") if f"x_{s}" in keys}
        if "test" in parts and "train" not in parts and "x" in keys:
            parts = {"train": "x", **parts}
        return parts
    return {}


def named_splits(path: str | Path) -> list[str]:
    """The splits a folder or an ``.npz`` keeps (``["train", "test"]``, ...); none for one set of data."""
    return list(_splits(Path(path), {}))


def load_path(path: str | Path, split: str = "train", **kwargs: Any) -> ArrayData:
    """Load a user file or folder for ``split``; ``kwargs`` go to the loader (``key``, ``channels``).

    An ``.npz`` with ``x_train`` / ``x_test`` arrays (labels ``y_train`` / ``y_test``), or a folder
    with ``train/`` / ``test/`` subfolders of PNGs, gives those splits, and ``"all"`` joins them; beside
    a test split, an npz's ``x`` array or a folder's own PNGs are the training split.
    Data without named splits are returned whole for ``"train"`` and ``"all"``; asking them for
    ``"test"`` is an error rather than a silent copy of the training data.
    """
    path = Path(path)
    check_split(split, source=str(path))
    if path.is_dir() or path.suffix.lower() == ".png":
        load = lambda part: load_png_folder(path / part if part else path, **kwargs)
    elif path.suffix.lower() in (".npy", ".npz"):
        load = lambda part: load_array(path, **({**kwargs, "key": part} if part else kwargs))
    else:
        raise DataError(f"{path}: unsupported file type; expected .npy, .npz, a .png or a folder of PNGs")
    parts = _splits(path, kwargs)
    if split == "all" and parts:
        return _concat([load(part) for part in parts.values()], path.stem, list(parts))
    if split in parts:
        return load(parts[split])
    if split == "train" and parts:  # else the loader would take the only array, the test split, for training data
        raise DataError(f"{path} holds a test split but no training data: add an array x_train (or x) to an .npz "
                        "file, or a train/ subfolder (or PNGs beside test/) to a PNG folder")
    if split == "test":
        raise NoSplitError(
            f"{path} has no test split: add arrays x_test (and y_test) to an .npz file, "
            f"or train/ and test/ subfolders to a PNG folder"
        )
    return load(None)


# --- writing PNGs ------------------------------------------------------------------------------------


def _write_png_atomic(img: np.ndarray, path: Path) -> Path:
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    return io.write_file_atomic(path, lambda f: pil.save(f, format="PNG"), binary=True)


def save_png_grid(
    x: Tensor | np.ndarray,
    path: str | Path,
    nrow: int | None = None,
    pad: int = 1,
    scale: int | None = None,
    pad_value: float = 0.5,
    missing: Tensor | np.ndarray | None = None,
) -> Path:
    """Write a batch ``(B, C, H, W)`` in [-1, 1] (``C`` 1 or 3) as one PNG grid; returns the path.

    ``nrow`` images per row (default ``ceil(sqrt(B))``); each image is upscaled ``scale`` times by
    pixel repetition (default: the smallest factor making tiles at least 32 px) and separated by
    ``pad`` pixels of ``pad_value``, border included: by default a light grey, which neither the black
    background nor the white strokes of a picture like a digit's run into. The PNG is
    ``(rows * H * scale + (rows + 1) * pad)`` high and ``(nrow * W * scale + (nrow + 1) * pad)`` wide.
    ``missing``: the unobserved pixels ``(1 or B, 1 or C, H, W)`` of a measurement (true where any channel
    is unobserved), drawn in :data:`condiff.plots.UNOBSERVED_RGB`; the PNG is then RGB.
    """
    from condiff.plots import UNOBSERVED_RGB

    x = torch.as_tensor(x).detach().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"save_png_grid: expected (B, C, H, W) with C 1 or 3, got shape {tuple(x.shape)}")
    x = validate(x, f"save_png_grid({path})")
    b, c, h, w = x.shape
    ncol = max(1, min(nrow or math.ceil(math.sqrt(b)), b))
    nrows = math.ceil(b / ncol)
    s = scale or max(1, math.ceil(32 / min(h, w)))
    if s < 1 or pad < 0:
        raise DataError(f"save_png_grid: scale must be >= 1 and pad >= 0, got {s} and {pad}")
    tiles = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if missing is not None:
        m = torch.as_tensor(missing).detach().cpu().bool()
        if m.dim() != 4 or m.shape[0] not in (1, b) or m.shape[1] not in (1, c) or m.shape[2:] != (h, w):
            raise DataError(f"save_png_grid: missing must be (1 or {b}, 1 or {c}, {h}, {w}) for images of shape "
                            f"{tuple(x.shape)}, got {tuple(m.shape)}")
        tiles = tiles.repeat(3 // c, axis=3)
        tiles[m.expand(b, -1, h, w).any(1).numpy()] = UNOBSERVED_RGB
        c = 3
    tiles = tiles.repeat(s, axis=1).repeat(s, axis=2)
    th, tw = h * s, w * s
    fill = round((min(max(pad_value, -1.0), 1.0) + 1) * 127.5)
    grid = np.full((nrows * th + (nrows + 1) * pad, ncol * tw + (ncol + 1) * pad, c), fill, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, ncol)
        top, left = pad + r * (th + pad), pad + q * (tw + pad)
        grid[top : top + th, left : left + tw] = tile
    return _write_png_atomic(grid, Path(path))


def save_png(x: Tensor | np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write one image ``(C, H, W)``, ``(1, C, H, W)`` or ``(H, W)`` in [-1, 1] as a PNG, pixel for pixel."""
    x = torch.as_tensor(x)
    x = x[None, None] if x.dim() == 2 else x[None] if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] != 1:
        raise DataError(f"save_png: expected one image (C, H, W), got shape {tuple(x.shape)}")
    return save_png_grid(x, path, nrow=1, pad=0, scale=scale)
