"""``condiff solve``: solve an inverse problem with a trained diffusion model and training-free guidance.

Takes images (the model's data set's test split, or files), measures them with an operator plus
Gaussian noise, reconstructs them with DPS, FreeDoM or UGD (optionally with DSG), and writes
ground_truth.png, measurement.png, reconstruction.png, comparison.png (side by side, first 8 images,
with the error), reconstruction.npz and metrics.json
(PSNR, SSIM, RMS measurement residual, wall time, steps, network forward and backward passes).

With ``--measurement FILE`` it reconstructs from measurements made elsewhere (an operator fixed in
advance: ``inpaint-mask`` with ``--mask FILE``, ``sr``, ``blur``, or one of one's own, ``FILE.py:NAME``);
there is no truth then, so it reports the measurement residual and writes no ground truth.

Hyperparameters left unset take the defaults swept on the training split for the task
(``<data>/<operator>``) and step budget (condiff/guidance/defaults.py), else generic ones.

Examples:
  condiff solve --ckpt runs/demo --operator inpaint-random --method dsg+dps --steps 50
  condiff solve --ckpt runs/patches --operator sr --factor 2 --method dps --steps 1000 --zeta 1.0
  condiff solve --ckpt path/to/diffusers_dir --input images/ --operator blur --method dsg+ugd
  condiff solve --ckpt runs/demo --operator inpaint-mask --mask mask.png --measurement observed.npy
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import checks, io, metrics
from ..data import ArrayData, NoSplitError, derive_seed, load_dataset, nominal_range, to_display
from ..data.files import check_npy_header, load_png_folder, named_splits, save_png_grid
from ..determinism import seeded
from ..guidance import (
    BETWEEN,
    DSG_KEYS,
    METHODS,
    TUNED,
    base_steps_between,
    default_hyperparameters,
    guided_sample,
    make_guidance,
    split_method,
)
from ..operators import GaussianBlur, ImageSizeError, Inpainting, Operator, SuperResolution
from ..plots import plot_image_columns
from ..userfile import load_from_file, spec_label, split_file_spec
from .common import (
    add_device_arg,
    check_out_dir,
    data_kwargs,
    load_model_for,
    pick_device,
    recorded_path,
    results_dir,
)
from .config import data_ref
from .sample import add_label_args, condition

# operator name -> builder(shape (B, C, H, W), generator, sigma_y, params) -> Operator
OPERATORS: dict[str, Callable[[tuple[int, ...], torch.Generator, float, dict], Operator]] = {
    "inpaint-random": lambda s, g, n, p: Inpainting.random(s, p["p_drop"], g, sigma_y=n),
    "inpaint-box": lambda s, g, n, p: _box(s, g, n, p),
    "sr": lambda s, g, n, p: SuperResolution(p["factor"], p["kernel"], sigma_y=n),
    "blur": lambda s, g, n, p: GaussianBlur(p["size"], p["sigma"], sigma_y=n),
    "inpaint-mask": lambda s, g, n, p: Inpainting(_need_mask(p), sigma_y=n, kind="mask"),
}


def _box(s: tuple[int, ...], g: torch.Generator, sigma_y: float, p: dict) -> Inpainting:
    """``inpaint-box``: a square box, by default half the shorter side, kept an eighth of it from each border (for
    square images, as the recorded benchmarks drew them); a ``--box`` that does not fit says how large one may be."""
    side = min(s[-2:])
    margin = p.get("margin", side // 8)
    box = p.get("box") or side // 2
    h, w = box if isinstance(box, (tuple, list)) else (box, box)  # (the library's Inpainting.box takes a pair)
    if isinstance(h, int) and isinstance(w, int) and (h > s[-2] - 2 * margin or w > s[-1] - 2 * margin):
        raise ValueError(f"--box {box} does not fit {s[-2]}x{s[-1]} images, whose box stays {margin} pixel"
                         f"{'s' * (margin != 1)} from each border: at most {s[-2] - 2 * margin}x{s[-1] - 2 * margin}")
    return Inpainting.box(s, box, g, sigma_y=sigma_y, margin=margin)


# each operator's own flags (given with another operator, they are refused rather than ignored)
OPERATOR_FLAGS = {"--p-drop": "inpaint-random", "--box": "inpaint-box", "--mask": "inpaint-mask", "--factor": "sr",
                  "--kernel": "sr", "--blur-size": "blur", "--blur-sigma": "blur"}
# the flags to change where a built-in filter cannot take the images (operators.ImageSizeError's cause; for sr's
# kernel, by the kernel in use: the box kernel is the smaller one already)
SIZE_HINTS = {("sr", "kernel"): "a smaller --factor, or --kernel box, keeps the kernel within the image",
              ("sr", "kernel", "box"): "a smaller --factor keeps the kernel within the image",
              ("sr", "factor"): "--factor must divide the images' sides, {h} and {w}",
              ("blur", "kernel"): "a smaller --blur-size keeps the kernel within the image"}
# operators that hold no randomness, so they can describe a measurement made outside condiff
DETERMINISTIC = ("inpaint-mask", "sr", "blur")
OPERATOR_DEFAULTS = {"p_drop": 0.7, "box": None, "factor": 2, "kernel": "bicubic", "size": 7, "sigma": 1.0}

# hyperparameter flags, passed on as constructor keywords (None = not given: the swept default is used)
HYPER_FLAGS = ("zeta", "rate", "interval", "final", "between", "repeats", "forward", "backward_steps",
               "backward_lr", "recurrence")


def _need_mask(params: dict) -> torch.Tensor:
    if params.get("mask") is None:
        raise ValueError("operator inpaint-mask needs a mask: --mask FILE (1 or white = observed)")
    return params["mask"]


def _png_mask(path: Path) -> np.ndarray:
    """A PNG mask as 0/1: white (grey >= 128 of 255) is observed, black missing; a PNG of the values 0 and 1
    (an array of 0s and 1s saved as 8 or 16 bits) is taken as it is. A mostly grey picture is no mask."""
    g = ((load_png_folder(path, channels=1).x[0, 0].double() + 1) / 2).numpy()  # grey in [0, 1]
    if 0 < g.max() <= 1.5 / 255:  # the values 0 and 1 of 255 (or of 65535): a 0/1 array saved as a picture
        return (g > 0).astype(np.float32)
    grey = float(((g > 0.02) & (g < 0.98)).mean())
    if grey > 0.25:
        raise ValueError(f"--mask {path}: {grey:.0%} of its pixels are grey; a mask PNG is black (missing) and "
                         "white (observed), or holds the values 0 and 1")
    return (g >= 0.5).astype(np.float32)


def load_mask(path: str | Path, shape: tuple[int, ...], n: int, given: int | None = None) -> torch.Tensor:
    """A 0/1 observation mask ``(1 or n, 1 or C, H, W)`` for images of per-sample ``shape``, from a .npy /
    .npz array of 0s and 1s (or booleans), or a PNG (:func:`_png_mask`: white = observed). An (H, W) or (C, H, W)
    mask is shared by every image; one per image is (n, 1 or C, H, W). ``given``: how many measurements
    were given (their number, not --n, bounds the images then)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--mask {path} is a folder: give one .npy, .npz or .png file")
    if not path.is_file():
        raise ValueError(f"--mask {path}: no such file")
    if path.suffix.lower() == ".png":
        m = _png_mask(path)
    elif path.suffix.lower() in (".npy", ".npz"):
        if path.suffix.lower() == ".npy":
            check_npy_header(path, "--mask ")
        keys = None
        try:
            arr = np.load(path, allow_pickle=False)
            if path.suffix.lower() == ".npz":
                keys = list(arr.files)
                if len(keys) == 1 or "mask" in keys:
                    arr = arr["mask" if "mask" in keys else keys[0]]
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"--mask {path}: cannot read it ({str(e).splitlines()[0]})") from None
        if keys is not None and len(keys) != 1 and "mask" not in keys:  # (said once, not inside "cannot read it")
            raise ValueError(f"--mask {path}: expected one array or one named 'mask', found {keys}")
        m = np.asarray(arr)
        if m.dtype.kind not in "biuf" or not np.isin(m, (0, 1)).all():
            found = f"dtype {m.dtype}" if m.dtype.kind not in "biuf" else \
                f"values {np.unique(m)[:4].tolist()}{' ...' if len(np.unique(m)) > 4 else ''}"
            raise ValueError(f"--mask {path}: a mask holds only 0 (missing) and 1 (observed), found {found}")
        m = m.astype(np.float32)
    else:
        raise ValueError(f"--mask {path}: expected a .npy, .npz or .png file")
    c, h, w = shape
    m = torch.from_numpy(m)
    stored = tuple(m.shape)
    m = m[None] if m.dim() == 2 else m
    m = m[None] if m.dim() == 3 else m
    if m.dim() != 4 or m.shape[0] not in (1, n) or m.shape[1] not in (1, c) or tuple(m.shape[2:]) != (h, w):
        per_image = m.dim() == 4 and m.shape[0] not in (1, n) and m.shape[1:] in ((1, h, w), (c, h, w))
        hint = "" if not per_image else (f"; one mask per image: pass --n {m.shape[0]}" if given is None or
                                         m.shape[0] <= given else f"; one mask per image, but {m.shape[0]} masks "
                                         f"for {given} measurements")
        raise ValueError(f"--mask {path}: shape {stored} does not fit {n} images of shape {tuple(shape)} "
                         f"(expected (H, W) = ({h}, {w}), (1 or C, H, W) or (1 or {n}, 1 or C, H, W)){hint}")
    if not bool(m.any()):
        raise ValueError(f"--mask {path}: observes no pixel (all 0)")
    return m


def check_operator_name(name: str) -> None:
    """Refuse an operator that is neither built in nor ``FILE.py:NAME``."""
    if name not in OPERATORS and user_operator_spec(name) is None:
        raise ValueError(f"unknown operator {name!r}; expected one of {sorted(OPERATORS)}, or FILE.py:NAME for "
                         "your own")


def user_operator_spec(name: str) -> tuple[str, str] | None:
    """``"FILE.py:NAME"`` -> ``(FILE, NAME)``; None for a built-in operator's name."""
    return split_file_spec(name, "--operator", "an Operator class or factory")


def load_user_operator(name: str) -> dict | None:
    """An operator of one's own, ``FILE.py:NAME``, loaded (its file run, once): ``factory`` (``NAME``), the
    file's resolved ``path``, ``attr`` and ``file_sha256`` (what ran, for metrics.json); None for a built-in
    operator's name."""
    spec = user_operator_spec(name)
    if spec is None:
        return None
    factory, sha = load_from_file(spec[0], spec[1], "operator")
    return {"factory": factory, "path": str(Path(spec[0]).expanduser().resolve()), "attr": spec[1],
            "file_sha256": sha}


def operator_label(name: str) -> str:
    """A name for files and tasks: the built-in name, or ``FILE-NAME`` for an operator of one's own."""
    return spec_label(name, "--operator", "an Operator class or factory")


def build_operator(name: str, shape: tuple[int, ...], generator: torch.Generator, sigma_y: float,
                   params: dict | None = None, factory: object = None) -> Operator:
    """An operator by name with ``params`` (missing ones from OPERATOR_DEFAULTS), or one of one's own,
    ``FILE.py:NAME``: an :class:`~condiff.operators.Operator` subclass or a factory, called as
    ``NAME(sigma_y=...)``, plus ``shape=(n, C, H, W)`` and ``generator=`` where it takes them, with torch's
    global random stream seeded from ``generator`` (so ``--seed`` fixes what it draws). ``factory``: that
    ``NAME`` as already loaded (:func:`load_user_operator`); else its file is run here."""
    spec = user_operator_spec(name)
    if spec is not None:
        make = factory if factory is not None else load_user_operator(name)["factory"]
        if not callable(make):
            raise ValueError(f"--operator {name} is of type {type(make).__name__}, not an Operator class or factory")
        try:
            takes = inspect.signature(make).parameters
        except (TypeError, ValueError):
            takes = {}
        kw = {"sigma_y": sigma_y, **({"shape": tuple(shape)} if "shape" in takes else {}),
              **({"generator": generator} if "generator" in takes else {})}
        try:
            with seeded(int(generator.initial_seed())):  # an operator drawing from torch's global stream: --seed
                op = make(**kw)
        except Exception as err:  # the user's code: say whose error it is
            raise ValueError(f"--operator {name}: {spec[1]}(sigma_y={sigma_y}) raised {type(err).__name__}: {err} "
                             "(an Operator class or a factory taking sigma_y)") from None
        if not isinstance(op, Operator):
            raise ValueError(f"--operator {name}: {spec[1]}(sigma_y=...) returned a {type(op).__name__}, not a "
                             "condiff.operators.Operator (subclass it and implement A)")
        return op
    check_operator_name(name)
    return OPERATORS[name](tuple(shape), generator, sigma_y, {**OPERATOR_DEFAULTS, **(params or {})})


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="solve an inverse problem with guided sampling", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="condiff run or model directory, or a local diffusers model directory")
    g = p.add_argument_group("measurement")
    g.add_argument("--operator", required=True, metavar="{" + ",".join(sorted(OPERATORS)) + "} or FILE.py:NAME",
                   help="the measurement: inpainting (random pixels, a box, or a mask of your own), "
                        "super-resolution, Gaussian blur, or an operator of your own: an Operator subclass "
                        "or factory NAME in FILE.py, called as NAME(sigma_y=--noise)")
    g.add_argument("--noise", type=float, default=0.05,
                   help="measurement noise sigma_y, in the data's units (default 0.05: 2.5%% of [-1, 1])")
    g.add_argument("--p-drop", type=float, default=None, help="inpaint-random: probability a pixel is missing (0.7)")
    g.add_argument("--box", type=int, default=None,
                   help="inpaint-box: box side (default: half the image's shorter side)")
    g.add_argument("--factor", type=int, default=None, help="sr: downsampling factor (2)")
    g.add_argument("--kernel", default=None, help="sr: bicubic (default) or box (average pooling)")
    g.add_argument("--blur-size", type=int, default=None, help="blur: kernel size, odd (7)")
    g.add_argument("--blur-sigma", type=float, default=None, help="blur: Gaussian sigma in pixels (1.0)")
    g.add_argument("--mask", default=None,
                   help="inpaint-mask: the observation mask, .npy / .npz of 0 and 1 or a PNG (1 or white = observed)")
    g.add_argument("--measurement", default=None,
                   help="reconstruct from measurements made elsewhere (.npy / .npz / PNG, shaped like A(x)) "
                        "instead of simulating them from true images; operators inpaint-mask, sr, blur and "
                        "FILE.py:NAME")
    m = p.add_argument_group("method")
    m.add_argument("--method", default="dsg+dps", help=f"one of {', '.join(METHODS)} (default dsg+dps)")
    m.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    m.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1; DSG needs > 0)")
    m.add_argument("--task", default=None, help="key of the swept defaults (default: <data>/<operator>)")
    m.add_argument("--zeta", type=float, help="DPS / FreeDoM step size (under dsg+: only with --between base and "
                   "--interval >= 2, on the steps between DSG's)")
    m.add_argument("--rate", type=float, help="DSG guidance rate w in [0, 1]")
    m.add_argument("--interval", type=int, help="DSG: guide every k steps")
    m.add_argument("--final", type=float, help="DSG: Euclidean gradient step size at the last step (0: none)")
    m.add_argument("--between", choices=BETWEEN,
                   help="DSG: steps off the interval draw unconditionally (sample) or take the base method's step")
    m.add_argument("--repeats", type=int, help="FreeDoM time-travel repeats")
    m.add_argument("--forward", type=float, help="UGD forward-guidance strength (under dsg+ugd: as --zeta)")
    m.add_argument("--backward-steps", type=int, help="UGD backward-guidance steps m")
    m.add_argument("--backward-lr", type=float, help="UGD backward-guidance step size")
    m.add_argument("--recurrence", type=int, help="UGD self-recurrence k")
    m.add_argument("--clip-x0", type=float, default=None,
                   help="clamp x0_hat to [-c, c]; 0 turns it off (default: [-1, 1] for data in [-1, 1], else "
                        "the [min, max] the model's training data span)")
    d = p.add_argument_group("input")
    d.add_argument("--input", default=None,
                   help="images: a .png, a folder of PNGs, or a .npy / .npz array (floats taken as they are, "
                        "on the model's scale)")
    d.add_argument("--data", default=None, help="data set (default: the one the model was trained on)")
    d.add_argument("--split", default=None, help="split of --data to draw images from (default test)")
    d.add_argument("--n", type=int, default=None, help="number of images (default: 16, or all of --input)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed for image choice, operator, noise and sampling (default 0)")
    add_label_args(d)
    d.add_argument("--batch-size", type=int, default=64,
                   help="images solved at once (default 64); the noise is drawn batch by batch, so the results of "
                        "a seed depend on it (recorded in metrics.json)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/solve/<operator>-<method>-<steps> for a "
                                                    "run or its model; RUN/solve_step_N/... for a checkpoint "
                                                    "RUN/checkpoints/step_N, DIR_solve/... beside a bare model "
                                                    "directory DIR)")
    add_device_arg(p)
    p.set_defaults(func=run)


def load_images(args: argparse.Namespace, run_cfg: dict, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """``n`` images ``(n, *shape)`` and the data name: from --input, else a seeded choice from the split."""
    if args.input:
        if args.split is not None:
            raise ValueError("--split picks images of --data; --input FILE uses every image in the file")
        data, name = load_dataset(args.input, split="all"), Path(args.input).stem
        if data.x.dim() == 2 and tuple(shape) == (1, *data.x.shape):  # one (H, W) image, not H vectors
            data = ArrayData(data.x[None, None], name=data.name)
    else:
        name = args.data or (run_cfg.get("data") or {}).get("name")
        if not name:
            raise ValueError("the model does not record its data set: pass --data NAME or --input FILE")
        kw = data_kwargs({"data": run_cfg["data"]}) if run_cfg.get("data", {}).get("name") == name else {}
        args.split = args.split or "test"
        try:
            data = load_dataset(name, split=args.split, **kw)
        except NoSplitError as e:
            raise NoSplitError(f"{e} (or draw from the training images: --split train; or give them: --input FILE)"
                               ) from None
    if tuple(data.shape) != tuple(shape):
        raise ValueError(f"images have shape {tuple(data.shape)} but the model expects {tuple(shape)}")
    n = args.n if args.n is not None else (len(data) if args.input else min(16, len(data)))
    if not 1 <= n <= len(data):
        raise ValueError(f"--n must be between 1 and {len(data)} (images available), got {n}")
    g = torch.Generator().manual_seed(derive_seed(args.seed, "images"))
    order = torch.randperm(len(data), generator=g)
    return data.x[order[:n]], str(name)


def data_scale(run_cfg: dict, values: torch.Tensor, what: str = "images",
               file: str | None = None) -> tuple[float, float]:
    """The scale that clip, PSNR, SSIM and pictures use: [-1, 1], or the model's training range where its
    data reach beyond (:func:`condiff.data.nominal_range`). A model that records no range (a diffusers
    model, or a run trained before the range was recorded) is taken to be on [-1, 1]. Warns when the
    ``values`` (true images, or measurements) lie far outside the scale, and when a PNG ``file`` (read
    on [-1, 1]) feeds a model whose data lie on another range."""
    recorded = run_cfg.get("value_range")
    lo, hi = scale = nominal_range(recorded)
    vlo, vhi, margin = float(values.min()), float(values.max()), 0.25 * (hi - lo)
    if file is not None and Path(file).suffix.lower() not in (".npy", ".npz") and scale != (-1.0, 1.0):
        warnings.warn(f"{file}: PNG images are read on [-1, 1], but the model's data lie on [{lo:.3g}, {hi:.3g}]: "
                      "pass an .npy / .npz on the model's scale", stacklevel=2)
    elif vlo < lo - margin or vhi > hi + margin:
        where = ("the model records no value range" if recorded is None
                 else f"the model was trained on [{lo:.3g}, {hi:.3g}]")
        warnings.warn(f"the {what} reach [{vlo:.3g}, {vhi:.3g}] but {where}: clip, PSNR and pictures use "
                      f"[{lo:.3g}, {hi:.3g}] (--clip-x0 0 turns the clip off)", stacklevel=2)
    return scale


def hyperparameters(args: argparse.Namespace, task: str) -> dict:
    """The tuned defaults for ``task`` with the flags given over them. The base method's step length under
    DSG (``--zeta``; UGD's ``--forward``) is kept only where DSG takes the base's steps between its own."""
    hp = default_hyperparameters(args.method, task, args.steps)
    given = {k: getattr(args, k) for k in HYPER_FLAGS if getattr(args, k) is not None}
    hp.update(given)
    cls, dsg = split_method(args.method)
    if dsg and cls.scale_key in hp and not base_steps_between(hp):
        if cls.scale_key in given:  # accepted, recorded and without effect, it was
            raise ValueError(f"--{cls.scale_key} does not apply to --method {args.method} unless --between base and "
                             "--interval >= 2: DSG's step sets its own length on the steps it guides")
        del hp[cls.scale_key]  # a tuned default's, for the base steps that --between sample / --interval 1 turned off
    return hp


def check_flags(args: argparse.Namespace) -> None:
    """The flags alone, before any file is read."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    check_operator_name(args.operator)
    if args.task is not None and args.task not in TUNED:  # a typo would fall back to GENERIC, silently
        raise ValueError(f"--task {args.task!r} has no swept defaults; known: {sorted(TUNED)} (leave it out "
                         "for the defaults of this data set and operator, or GENERIC's where none were swept)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    checks.number("--noise", args.noise, ">= 0")  # named by the flag, not by the operator's sigma_y
    if args.clip_x0 is not None:
        checks.number("--clip-x0", args.clip_x0, ">= 0")  # 0: no clipping
    if args.box is not None:
        checks.integer("--box", args.box)
    checks.seed("--seed", args.seed)
    cls, dsg = split_method(args.method)  # a flag of another method is named as a flag, not a keyword
    args.method = args.method.strip().lower()  # DSG+DPS: recorded, and named in the default --out, as dsg+dps
    takes = [k for k in inspect.signature(cls).parameters if k != "loss"] + (list(DSG_KEYS) if dsg else [])
    # (DSG's own flags without dsg+ get make_guidance's hint: "use method 'dsg+dps'")
    if stray := [k for k in HYPER_FLAGS if getattr(args, k) is not None and k not in takes and k not in DSG_KEYS]:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ValueError(f"{flags} do{'es' if len(stray) == 1 else ''} not apply to --method {args.method}; it takes "
                         + ", ".join("--" + k.replace("_", "-") for k in takes if k in HYPER_FLAGS))
    for flag, owner in OPERATOR_FLAGS.items():  # a flag of another operator would be silently ignored
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None and args.operator != owner:
            raise ValueError(f"{flag} goes with --operator {owner}, not {args.operator}")
    if args.input is not None and args.data is not None:  # else --data was ignored, silently
        raise ValueError("--input gives the true images itself; --data picks them from a data set instead")
    if args.measurement is not None:
        if args.input or args.data or args.split:
            raise ValueError("--measurement reconstructs from measurements made elsewhere; --input, --data and "
                             "--split pick true images to simulate measurements from")
        if not Path(args.measurement).exists():
            raise ValueError(f"--measurement {args.measurement}: no such file or folder")
        if args.operator not in DETERMINISTIC and user_operator_spec(args.operator) is None:
            raise ValueError(f"--measurement needs an operator fixed in advance ({', '.join(DETERMINISTIC)}); "
                             f"{args.operator} draws its own mask: use inpaint-mask with --mask FILE")


def read_measurements(path: str | Path) -> torch.Tensor:
    """The measurements in a file or folder: a solve run's ``reconstruction.npz`` gives its ``y`` (the
    measurements it solved from); anything else is read as data (an array, PNGs)."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if "y" in z.files and z["y"].ndim >= 2:  # per-item arrays, not a data set's class labels
                    y = torch.from_numpy(np.asarray(z["y"], dtype=np.float32))
                    return ArrayData(y, name=f"{path} (y)").x  # checked as data are: finite, non-empty
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"--measurement {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if splits := named_splits(path):  # a data set's file: its splits were joined and read as 3300 measurements
        raise ValueError(f"--measurement {path} holds data split into {' and '.join(splits)}: measurements are one "
                         "set (an array, or a folder of PNGs without train/ and test/ subfolders); for true images "
                         "to measure, use --input")
    return load_dataset(path, split="all").x


def probe_operator(name: str, op: Operator, x: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """An operator of one's own, tried on one batch before any sampling: its errors, non-finite measurements
    and measurements of another batch size are named as its own, not found mid-run or after it. Returns the
    batch's measurements."""
    k = min(batch_size, len(x))
    try:
        with torch.no_grad():
            y = op.select(slice(0, k)).A(x[:k].to(device))
    except Exception as err:
        hint = "" if isinstance(err, NotImplementedError) else (
            " (an operator holding per-image tensors needs select(idx) for sub-batches, and register_buffer so "
            "that .to(device) moves them)")
        raise ValueError(f"--operator {name}: A raised {type(err).__name__}: {err}{hint}") from None
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != k:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"--operator {name}: A of a batch of {k} images must return a batch of {k} measurements, "
                         f"got {got} (per-image state needs select(idx) for sub-batches)")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"--operator {name}: A returns non-finite values on the images")
    return y


def own_item_shape(args: argparse.Namespace, own: dict, shape: tuple[int, ...], device: str) -> tuple[int, ...]:
    """The shape of one measurement by an operator of one's own (built for one image and tried on it), which
    says whether a 2-D ``--measurement`` is one picture (the operator returns images) or a batch of vectors."""
    op = build_operator(args.operator, (1, *shape), torch.Generator().manual_seed(derive_seed(args.seed, "op")),
                        args.noise, factory=own["factory"]).to(device)
    return tuple(probe_operator(args.operator, op, torch.zeros(1, *shape, device=device), 1, device).shape[1:])


def load_measurements(args: argparse.Namespace, op: Operator, shape: tuple[int, ...], n: int,
                      y: torch.Tensor, device: str) -> torch.Tensor:
    """The first ``n`` of the given measurements, on ``device``, checked against the operator's output shape."""
    probe = op.select(slice(0, 1))  # a per-image mask, sliced to the probe's one image
    expected = tuple(probe.A(torch.zeros(1, *shape, device=device)).shape[1:])
    if tuple(y.shape[1:]) != expected:
        raise ValueError(f"--measurement {args.measurement} holds items of shape {tuple(y.shape[1:])} but "
                         f"{args.operator} maps the model's {tuple(shape)} images to {expected}")
    y = y[:n].to(device)
    return op.A(y) if isinstance(op, Inpainting) else y  # unobserved pixels carry nothing: zero them as A does


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    own = load_user_operator(args.operator)  # its file runs once, now: a broken one is named before any model loads
    label = operator_label(args.operator)
    out = check_out_dir(args.out, kind="condiff solve",
                        default=lambda: results_dir(args.ckpt, "solve") / f"{label}-{args.method}-{args.steps}",
                        inputs={"--input": args.input, "--measurement": args.measurement})
    device = pick_device(args.device)
    den, run_cfg, shape = load_model_for(args.ckpt, device)
    if len(shape) != 3:
        raise ValueError(f"{args.ckpt} is a model of {tuple(shape)} vectors; condiff solve restores images (C, H, W): "
                         "for vectors, use condiff.guidance.guided_sample in Python with a loss of your "
                         "measurement (docs/guidance.md)")
    den = condition(den, run_cfg, args.label, args.guidance_scale)  # a class-conditional model's class
    if args.steps > den.schedule.T:
        raise ValueError(f"--steps must be <= T = {den.schedule.T}, got {args.steps}")
    if args.measurement is None:
        x, data_name = load_images(args, run_cfg, shape)
        given, n = None, len(x)
    else:
        x, data_name = None, str((run_cfg.get("data") or {}).get("name") or "measurement")
        given = read_measurements(args.measurement)
        if given.dim() == 2 and (own is None or len(own_item_shape(args, own, shape, device)) == 3):
            given = given[None, None]  # one (H, W) measurement of an image, not H vectors
        n = args.n if args.n is not None else len(given)
        if not 1 <= n <= len(given):
            raise ValueError(f"--n must be between 1 and {len(given)} (measurements given), got {n}")
    scale = (data_scale(run_cfg, x, "images", args.input) if x is not None
             else data_scale(run_cfg, given[:n], "measurements", args.measurement))
    task = args.task or f"{Path(data_name).stem}/{label}"
    hp = hyperparameters(args, task)
    make_guidance(args.method, lambda z: z.flatten(1).sum(1), **dict(hp))  # validate before any work
    params = {k: v for k, v in (("p_drop", args.p_drop), ("box", args.box), ("factor", args.factor),
                                ("kernel", args.kernel), ("size", args.blur_size), ("sigma", args.blur_sigma))
              if v is not None}  # the rest: OPERATOR_DEFAULTS
    if args.mask:
        params["mask"] = load_mask(args.mask, shape, n, None if x is not None else len(given))
    gop = torch.Generator().manual_seed(derive_seed(args.seed, "op"))
    op = build_operator(args.operator, (n, *shape), gop, args.noise, params,
                        factory=own and own["factory"]).to(device)
    if own is not None:
        probe_operator(args.operator, op, x if x is not None else torch.zeros(n, *shape), args.batch_size, device)
    elif args.operator in ("sr", "blur"):  # images the filter cannot take: said in the flags' terms
        try:
            op.A(torch.zeros(1, *shape, device=device))
        except ImageSizeError as e:
            hint = SIZE_HINTS.get((args.operator, e.cause, args.kernel), SIZE_HINTS[args.operator, e.cause])
            hint = hint.format(h=shape[-2], w=shape[-1])
            raise ValueError(f"--operator {args.operator}: {e} ({hint})") from None
    if x is not None:
        x = x.to(device)
        y = op.measure(x, torch.Generator(device=device).manual_seed(derive_seed(args.seed, "noise")))
    else:
        y = load_measurements(args, op, shape, n, given, device)
    gen = torch.Generator(device=device).manual_seed(derive_seed(args.seed, "sample"))
    if args.clip_x0 is None:  # the data's own range: [-1, 1], or [min, max] where they reach beyond
        clip = list(scale)
    else:
        clip = args.clip_x0 if args.clip_x0 > 0 else None
    parts, nfe, grads, seconds = [], 0, 0, 0.0
    t0 = time.perf_counter()
    for start in range(0, n, args.batch_size):
        sl = slice(start, min(start + args.batch_size, n))
        guidance = make_guidance(args.method, op.select(sl).loss(y[sl]), **dict(hp))
        res = guided_sample(den, guidance, (sl.stop - sl.start, *shape), args.steps, eta=args.eta, generator=gen,
                            device=device, clip_x0=clip, progress=True)
        parts.append(res.x.detach())
        nfe, grads, seconds = nfe + res.nfe, grads + res.grad_evals, seconds + res.seconds
    rec = torch.cat(parts)
    warn_if_diverged(rec, scale, args.method)
    if grads == 0:  # DSG with one step and final 0, say: the measurements never reached the samples
        warnings.warn(f"{args.method} guided no step (of {args.steps}), so the reconstructions ignore the "
                      "measurements" + (" (with one step, DSG guides only through --final)" if args.steps == 1
                                        and split_method(args.method)[1] else ""), stacklevel=2)
    residual = op.residual(rec, y)
    m: dict = {"residual": float(residual.mean()), "residual_per_image": residual.tolist()}
    if x is not None:
        span = scale[1] - scale[0]
        psnr = metrics.psnr(rec, x, data_range=span)
        m = {"psnr": float(psnr.mean()), "ssim": float(metrics.ssim(rec.cpu(), x.cpu(), data_range=span).mean()),
             **m, "residual_truth": float(op.residual(x, y).mean()), "psnr_per_image": psnr.tolist()}
    m.update({
        "seconds": round(seconds, 3), "seconds_total": round(time.perf_counter() - t0, 3),
        "steps": args.steps, "nfe": nfe, "grad_evals": grads, "n": n,
        "method": args.method, "hyperparameters": hp, "task": task, "eta": args.eta, "clip_x0": clip,
        "scale": list(scale),
        "operator": {"name": args.operator, **op.describe(), **({"mask": data_ref(args.mask)} if args.mask else {}),
                     **({k: v for k, v in own.items() if k != "factory"} if own else {})},
        "seed": args.seed, "batch_size": args.batch_size, "ckpt": recorded_path(args.ckpt), "device": device,
        "label": args.label, "guidance_scale": args.guidance_scale, "versions": io.versions(),
        "images": recorded_path(args.input) or (f"{data_ref(data_name)}:{args.split}" if x is not None else None),
        "measurement": data_ref(args.measurement) if args.measurement else None,  # a file's, absolute
    })
    with io.writing_outputs(out, "metrics.json", *SOLVE_FILES) as staged:
        write_outputs(staged, x, op, y, rec, m, scale)
    quality = (f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, " if x is not None else "")
    truth = f" (truth {m['residual_truth']:.4f})" if x is not None else f" (sigma_y {args.noise})"
    print(f"{args.method} on {task}: {quality}residual {m['residual']:.4f}{truth}, {m['seconds']:.1f} s, "
          f"{nfe} NFE + {grads} backward")
    print(f"wrote {out}")
    return 0


def warn_if_diverged(rec: torch.Tensor, scale: tuple[float, float], method: str) -> None:
    """A warning where the reconstructions lie far outside the model's scale (more than its width beyond
    either end): a guidance step too large for the loss drove them there, and their scores mean little."""
    lo, hi = scale
    rlo, rhi = float(rec.min()), float(rec.max())
    if rlo < lo - (hi - lo) or rhi > hi + (hi - lo):
        cls, dsg = split_method(method)
        size = "--rate or --final" if dsg else " or ".join(f"--{k.strip().replace('_', '-')}"
                                                         for k in cls.step_size.split(" or "))
        warnings.warn(f"the reconstructions reach [{rlo:.3g}, {rhi:.3g}], far outside the model's scale "
                      f"[{lo:.3g}, {hi:.3g}]: the guidance diverged (lower {size})", stacklevel=2)


SOLVE_FILES = ("ground_truth.png", "measurement.png", "reconstruction.png", "comparison.png", "reconstruction.npz")


def write_outputs(out: Path, x: torch.Tensor | None, op: Operator, y: torch.Tensor, rec: torch.Tensor,
                  m: dict, scale: tuple[float, float] = (-1.0, 1.0)) -> None:
    """The pictures (on ``scale``, mapped to the writers' [-1, 1]), reconstruction.npz and metrics.json;
    without true images ``x`` (given measurements) only the measurement and the reconstruction."""
    seen, rec = op.to_image(y).cpu(), rec.cpu()
    arrays = {"x": rec.numpy(), "y": y.cpu().numpy()}
    columns = {}
    channels = rec.shape[1] if rec.dim() == 4 else 1

    def pic(v: torch.Tensor) -> torch.Tensor:  # pictures of data of 2 or 4+ channels show channel 0
        return v if v.shape[1] in (1, 3) else v[:, :1]

    if x is not None:
        x = x.cpu()
        arrays["ground_truth"] = x.numpy()
        # channel mean in data units; black = 0, white = half the data range, the same in every run (scaled to
        # each run's largest error, two runs could not be compared by eye)
        err = (rec - x).abs().mean(1, keepdim=True)
        top = (float(scale[1]) - float(scale[0])) / 2 or 1.0
        truth = pic(to_display(x, scale).clamp(-1, 1))
        save_png_grid(truth, out / "ground_truth.png")
        columns["truth"] = truth.numpy()
    io.write_npz_atomic(out / "reconstruction.npz", **arrays)
    seen_d, rec_d = (to_display(v, scale).clamp(-1, 1) for v in (seen, rec))
    hidden = {}
    if seen_d.dim() == 4 and seen_d.shape[1] in (1, 3, channels):  # an operator of one's own may measure no picture
        unseen = op.observed(torch.ones_like(y)).cpu() == 0  # a masking operator's missing pixels (zero in y)
        missing = pic(unseen) if unseen.shape == seen.shape and bool(unseen.any()) else None
        save_png_grid(pic(seen_d), out / "measurement.png", missing=missing)
        columns["measurement"] = pic(seen_d).numpy()
        if missing is not None:
            hidden["measurement"] = missing.numpy()
    save_png_grid(pic(rec_d), out / "reconstruction.png")
    columns["reconstruction"] = pic(rec_d).numpy()
    if x is not None:
        columns[f"|error| (white: {top:.2g},\nhalf the range)"] = (err / top * 2 - 1).numpy()
        labels, headline = [f"PSNR {v:.1f} dB" for v in m["psnr_per_image"]], f"PSNR {m['psnr']:.2f} dB"
    else:
        labels, headline = [f"res {v:.3g}" for v in m["residual_per_image"]], f"residual {m['residual']:.4f}"
    shown = "" if channels in (1, 3) else f" (channel 0 of {channels} shown)"
    plot_image_columns(columns, out / "comparison.png", row_labels=labels, hidden=hidden,
                       title=f"{m['operator']['name']} on {m['task']}, {m['method']}, {m['steps']} steps: "
                             f"{headline}{shown}")
    io.write_json_atomic(out / "metrics.json", m)
