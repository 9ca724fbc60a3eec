"""Shared CLI plumbing: config -> objects, run directories, sample writing."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .. import checks, io
from ..data import DATASETS, ArrayData, NoSplitError, load_dataset, nominal_range, to_display, value_range
from ..data.files import same_item_shape, save_png_grid
from ..denoiser import Denoiser, DiffusersDenoiser
from ..determinism import kept_streams
from ..models import load_denoiser, refuse_a_folder_of_models, resolve_model_dir, save_model
from ..nets import NETS, build_net, net_class
from ..plots import plot_loss_curve, plot_scatter
from ..sample import generate
from ..schedule import Schedule
from ..train import DenoisingObjective, TrainConfig, Trainer, list_checkpoints, resumed_line
from ..userfile import split_file_spec
from .config import data_ref


def recorded_path(path: object) -> str | None:
    """A path as a result records it: absolute, so that the record holds from any working directory."""
    return None if path is None else os.path.abspath(os.fspath(path))


def add_config_args(p: argparse.ArgumentParser, data_default: str | None = None) -> None:
    p.add_argument("--data", default=data_default,
                   help="data set name (digits, toy2d, patches) or a .npy/.npz file, a .png or a PNG folder "
                        "(default: the --config file's [data] name, else digits)")
    p.add_argument("--config", metavar="TOML", help="TOML file with [data] [model] [schedule] [train] "
                   "[sample] tables")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=500 (repeatable); --set "
                        "model.name=FILE.py:NAME trains a network class of your own (docs/own-data.md)")
    add_device_arg(p)


def plain_text(text: str | None) -> str | None:
    """``text`` (a docstring shown as help) without its reST markup: ``x`` and :func:`x` become x."""
    return text if text is None else re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def pick_device(name: str | None) -> str:
    if name is not None:  # (an empty --device "" was taken as "choose")
        return checks.device("--device", name)
    return "cuda" if torch.cuda.is_available() else "cpu"


def data_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg["data"].items() if k not in ("name", "split", "labels")}


def load_split(cfg: dict, split: str) -> ArrayData:
    return load_dataset(cfg["data"]["name"], split=split, **data_kwargs(cfg))


def warn_constant(x: torch.Tensor, name: str) -> None:
    """Warn of training data whose every value is the same: a model of them learns nothing a distance to the data
    can score (the MMD's bandwidth comes from the spread of the data)."""
    if x.numel() and bool((x == x.reshape(-1)[0]).all()):
        warnings.warn(f"{name}: every value of the training data is {float(x.reshape(-1)[0]):.4g}; a model of "
                      "constant data has nothing to learn, and eval gives no MMD to them (its bandwidth is their "
                      "spread)",
                      stacklevel=2)


def check_test_split(cfg: dict, train: ArrayData) -> None:
    """Data of one's own (a path) with a test split: its items must have the training items' shape, found
    before training rather than at `eval`, the first command that reads the test split."""
    if str(cfg["data"]["name"]) in DATASETS:  # a registered data set: its splits are made alike
        return
    try:
        test = load_split(cfg, "test")
    except NoSplitError:
        return
    same_item_shape({"train": train, "test": test}, str(cfg["data"]["name"]))


# models for user data, picked by the data's rank when the config names none
AUTO_MODELS = {"unet": {"name": "unet", "base": 32, "mults": [1, 2, 2], "num_res": 1},
               "mlp": {"name": "mlp", "hidden": 256, "depth": 3}}


def check_labels(cfg: dict, data: ArrayData) -> torch.Tensor | None:
    """The labels a class-conditional run trains on (None unless ``data.labels = true``), checked: class
    indices ``0 .. K-1`` (the model gets ``K = max + 1`` classes, so no negative or far-flung values)."""
    flag = cfg["data"].get("labels", False)
    if not isinstance(flag, bool):
        raise ValueError(f"data.labels must be true or false, got {flag!r}")
    if not flag:
        return None
    name = cfg["data"]["name"]
    if data.y is None:
        raise ValueError(f"data.labels = true but {name} holds no labels (an .npz needs an array y, or y_train "
                         "beside x_train; beside data of another name, labels or y with one entry per sample)")
    y = data.y
    lo, hi, distinct = int(y.min()), int(y.max()), int(y.unique().numel())
    if lo < 0:
        raise ValueError(f"{name}: labels must be class indices 0 .. K-1, got values down to {lo}")
    if hi + 1 > 4 * distinct + 16:
        raise ValueError(f"{name}: labels reach {hi} but only {distinct} distinct values occur, and the model would "
                         f"get {hi + 1} classes: renumber them 0 .. {distinct - 1} (np.unique(y, return_inverse=True))")
    return y


def model_for_shape(model: dict, shape: tuple[int, ...], saved_by: str | None = None) -> dict:
    """A model table with its input size filled in from a sample's ``shape``: ``in_channels`` of a UNet (images),
    ``dim`` of an MLP (vectors), and either where a net of one's own takes it (its constructor's parameters)."""
    m = dict(model)
    for name, key, rank, what in (("unet", "in_channels", 3, "image data (C, H, W)"),
                                  ("mlp", "dim", 1, "vector data (D,)")):
        if m.get("name") != name:
            continue
        if len(shape) != rank:
            raise ValueError(f"model '{name}' needs {what}, got per-sample shape {shape}")
        if m.get(key, shape[0]) != shape[0]:  # config.json would record one value, the model hold another
            raise ValueError(f"model.{key} = {m[key]!r} but the data have {shape[0]}: leave it out (it is taken "
                             "from the data)")
        m[key] = shape[0]
    name = m.get("name")
    if isinstance(name, str) and name not in NETS:  # a net of one's own: what its constructor takes, from the data
        params = inspect.signature(net_class(name, saved_by)[0]).parameters
        for key, rank in (("in_channels", 3), ("dim", 1)):
            if key in params and key not in m and len(shape) == rank:
                m[key] = shape[0]
    return m


def net_config(cfg: dict, data: ArrayData, saved_by: str | None = None) -> dict:
    """The model table, completed from the data (channels / dimension, number of classes). ``saved_by``: what
    ``cfg`` was read from, where a net of one's own runs its file only if trusted (:func:`condiff.nets.build_net`)."""
    auto = AUTO_MODELS["unet"] if len(data.shape) == 3 else AUTO_MODELS["mlp"]
    m = model_for_shape(dict(cfg["model"]) if cfg["model"].get("name") else {**auto, **cfg["model"]},
                        tuple(data.shape), saved_by)
    if cfg["data"].get("labels") and data.y is not None:
        m["num_classes"] = int(data.y.max()) + 1
    return m


# training settings the command line sets, and how a user sets them instead
_CLI_OWNED = {"device": "pass --device", "progress": "the command sets it (--quiet turns progress bars off)"}


def train_config(settings: dict, section: str = "train", **cli) -> TrainConfig:
    """A :class:`TrainConfig` from a config table plus the values the command line owns (``device``,
    ``progress``); a table that sets one of those is refused rather than silently overridden."""
    for key in cli:
        if key in settings:
            raise ValueError(f"{section}.{key} is not a config setting: {_CLI_OWNED[key]}")
    return TrainConfig.from_dict({**settings, **cli}, section)


def check_denoising_net(net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None,
                        device: str = "cpu", null_label: bool = False) -> None:
    """Refuse a model that cannot denoise the data before anything is written (a net of one's own, ``FILE.py:
    NAME``, fails only in training otherwise, its run begun): it runs on two training samples, in eval mode,
    without gradients and on a random stream of its own (so that training goes as it would without the
    check), and must return a tensor of their shape, its prediction of their noise; with ``labels``, both
    with them, without (``net(x, t)``, as unconditional sampling calls it), and with ``null_label`` (a run with
    label drop) with a label ``-1`` ("no label", as label drop and classifier-free guidance pass it; a net
    trained without label drop never gets one). It runs on the CPU: for
    training on another ``device`` only a wrong shape is refused (a net may need that device to run at all).
    Weights of another dtype than the data's are left to the trainer, which names the fix."""
    config = getattr(net, "config", None)
    name = config.get("name") if isinstance(config, dict) else type(net).__name__
    if any(p.dtype != x.dtype for p in net.parameters() if p.is_floating_point()):
        return
    xb = x[:2]
    t = torch.zeros(len(xb), dtype=torch.long)
    y = None if labels is None else labels[:2].long()
    calls = [("", (xb, t))] if y is None else [("", (xb, t, y)), (" without labels, as net(x, t)", (xb, t))]
    if y is not None and null_label:
        calls.append((" with a label -1 (no label, as label drop and classifier-free guidance give it)",
                      (xb, t, torch.cat([torch.full_like(y[:1], -1), y[1:]]))))
    was = net.training
    try:
        for how, args in calls:
            try:
                with torch.no_grad(), kept_streams():
                    out = net.eval()(*args)
            except Exception as err:  # the model's own code (a net of one's own): say where it failed
                if torch.device(device).type != "cpu":
                    return
                given = ", ".join(f"{k} {tuple(v.shape)}" for k, v in zip("xty", args))
                raise ValueError(f"model {name} fails on two training samples{how} ({given}): "
                                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
            if not isinstance(out, torch.Tensor) or out.shape != xb.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
                raise ValueError(f"model {name} maps x of shape {tuple(xb.shape)}{how} to {got}: a denoising net "
                                 "returns its prediction of the noise, of its input's shape")
    finally:
        net.train(was)


@contextlib.contextmanager
def own_net_named(trainer) -> Iterator[None]:
    """Around ``trainer.fit()``: an error raised in the file of a net of one's own (``FILE.py:NAME``) comes out as
    a one-line error naming the net and the step reached (the bare message, "boom", named neither); other errors,
    and memory errors (a smaller batch, not the net's code, is the fix), as they were."""
    try:
        yield
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:
        net = getattr(trainer.model, "module", trainer.model)  # under DistributedDataParallel
        config = getattr(net, "config", None)
        name = config.get("name") if isinstance(config, dict) else None
        spec = split_file_spec(name, "model.name", "a network class") if isinstance(name, str) else None
        if spec is None:
            raise
        file = os.path.realpath(spec[0])
        if not any(os.path.realpath(f.filename) == file for f in traceback.extract_tb(err.__traceback__)):
            raise
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"the network {name} failed in training, after step {trainer.step}: "
                         f"{type(err).__name__}: {text}") from err


class TrainingJob:
    """Everything a training run needs, built and checked from the config before anything is written:
    bad data, model or training settings fail here, with the run directory untouched."""

    def __init__(self, cfg: dict, run_dir: Path, saved_by: str | None = None) -> None:
        """``saved_by``: what ``cfg`` was read from (a resumed run's config.json), where a net of one's own runs
        its file only if trusted (:func:`condiff.userfile.load_from_file`)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.data = load_split(cfg, "train")
        warn_constant(self.data.x, str(cfg["data"]["name"]))
        check_test_split(cfg, self.data)
        self.schedule = Schedule.from_config(cfg["schedule"])
        train = {k: v for k, v in cfg["train"].items() if k != "label_drop"}  # the objective's, below
        self.tcfg = train_config(train, device=cfg["_device"])
        torch.manual_seed(int(cfg["train"].get("seed", 0)))  # the initial weights follow the run's seed
        labels = check_labels(cfg, self.data)
        net = build_net(net_config(cfg, self.data, saved_by), saved_by)
        drop = checks.number("train.label_drop", cfg["train"].get("label_drop", 0.0), "[0, 1)")
        check_denoising_net(net, self.data.x, labels, cfg["_device"], null_label=drop > 0)
        if drop and labels is None:
            raise ValueError("train.label_drop drops class labels: it needs data.labels = true")
        self.label_drop = drop if labels is not None else None
        objective = DenoisingObjective(self.data.x, self.schedule, self.tcfg.batch_size, y=labels,
                                       label_drop=drop)
        meta = {"net": net.config, "schedule": self.schedule.config(), "data": cfg["data"],
                "shape": list(self.data.shape), "value_range": value_range(self.data.x),
                **({} if self.label_drop is None else {"label_drop": self.label_drop})}  # a checkpoint loads as a model
        self.trainer = Trainer(net, objective, self.tcfg, self.run_dir, meta)

    def resume(self) -> bool:
        """Load the newest checkpoint in the run directory (False if there is none)."""
        if not self.trainer.resume():
            return False
        print(resumed_line(self.trainer.step, self.tcfg.steps), file=sys.stderr)
        return True

    def fit(self, stale: tuple[str, ...] = ()) -> Path:
        """Train to the end, save the EMA model and the loss curve; returns the model directory. ``stale``:
        the results of the model being replaced that a resumed run which trained on deletes first
        (:func:`drop_stale_results`), so that no interruption leaves them beside the new model."""
        start = self.trainer.step
        with own_net_named(self.trainer):
            ema = self.trainer.fit()
        if not self.trainer.dist.main:
            return self.run_dir / "model"
        drop_stale_results(self.run_dir, stale, start, self.trainer.step)
        out = save_model(self.run_dir / "model", ema, self.schedule, data=self.cfg["data"],
                         shape=list(self.data.shape), value_range=value_range(self.data.x),
                         **({} if self.label_drop is None else {"label_drop": self.label_drop}),
                         steps=self.trainer.step,
                         train_seconds=round(self.trainer.seconds, 2))  # over every session of the run
        plot_loss_curve(self.run_dir / "log.jsonl", self.run_dir / "loss.png")
        return out


_RUN_FILES = ("checkpoints", "model", "log.jsonl", "config.json")  # what a training run writes
#: the folders other commands write of a model beside it by default (:func:`results_dir`), and at a checkpoint
#: as NAME_step_N
RESULT_DIRS = ("samples", "eval", "solve", "pnp")
#: what a model's results are beside a ``condiff train`` model (``condiff eval`` scores it in place): what a
#: replacement of the model sets aside with it, since they would otherwise sit beside the new one
SAMPLE_FILES = ("samples.npz", "samples.png")  # what write_samples writes (no picture for some shapes)
CLASS_PICTURE = "class_hist.png"  # beside eval's metrics.json where the samples' classes are judged
MODEL_RESULTS = ("metrics.json", *SAMPLE_FILES, CLASS_PICTURE, *RESULT_DIRS)


def start_run(run_dir: Path, resume: bool, fresh: bool, build, clear: tuple[str, ...] = (),
              data: dict | None = None, schedule: dict | None = None, resume_hint: str = "",
              model: dict | None = None, objective: dict | None = None):
    """The run-directory protocol of ``train`` and ``dual train``: refuse a run with checkpoints unless
    ``resume`` or ``fresh``; ``build()`` the job (which checks everything) before anything changes; then
    set the old run aside for ``fresh`` (checkpoints, model, log, settings and ``clear``, kept in
    ``.replaced`` until the caller's :func:`condiff.io.drop_replaced` once the new run is finished:
    :func:`replace_run`) or load its checkpoint for ``resume``. ``data``, ``schedule``: the run's
    settings, which a resumed run must share with the checkpoint's (same shapes, so the checkpoint would
    load and training go on, silently, on other data or under another noise schedule), as must
    ``objective``, dual training's selection of the examples it trains on; ``resume_hint``
    ends the refusal of other ones. ``model``: the run's model settings, named beside the recorded ones when
    the checkpoint does not load into the model they build.
    Returns the job, the run directory made and locked; ``config.json`` is the caller's to write next."""
    with io.claimed_run(run_dir):  # locked before anything is read, let alone cleared
        existing = list_checkpoints(run_dir / "checkpoints")
        for sub in ("checkpoints", "model"):  # found now, not when the first checkpoint is saved
            if (run_dir / sub).is_dir() and not os.access(run_dir / sub, os.W_OK):
                raise PermissionError(f"{run_dir / sub} is not writable")
        if existing and not (resume or fresh):
            raise FileExistsError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}): "
                                  "pass --resume to continue or --fresh to start over")
        if existing and resume:
            _check_same(run_dir, {"data": data, "schedule": schedule, "objective": objective}, resume_hint)
        if not existing and not fresh and (run_dir / "model").exists():  # e.g. checkpoints deleted to save space
            raise FileExistsError(f"{run_dir} already holds a trained model and no checkpoints to resume from: "
                                  "pass --fresh to train it again, or use another --out")
        kept = run_dir / io.REPLACED
        if not (resume or fresh) and any((kept / n).exists() for n in ("model", "checkpoints")):
            # a --fresh that failed kept the run it replaced: a plain run here would finish and delete it
            raise FileExistsError(f"{kept} keeps the run an unfinished --fresh replaced: pass --fresh to replace it "
                                  f"again, --resume to go on with the replacement, or --restore to put it back")
        job = build()
        if fresh:
            replace_run(run_dir, (*_RUN_FILES, *with_step_results(run_dir, clear)), "--fresh")
        else:
            note_replaced(run_dir)
        try:
            resumed = resume and job.resume()
        except io.CheckpointError as e:  # say which settings built another model, not only its tensors
            raise type(e)(f"{str(e).splitlines()[0]}{_other_model(run_dir, model, resume_hint)}") from None
        if resume and not resumed:
            print(f"no checkpoint in {run_dir / 'checkpoints'}: starting from step 0", file=sys.stderr)
        return job


def _other_model(run_dir: Path, model: dict | None, hint: str) -> str:
    """Where a resumed run's checkpoint does not load: the model settings that differ from those the run
    recorded, as the end of the error ("" when they do not, or none were recorded)."""
    before = json_table(run_dir / "config.json").get("model")
    now = json.loads(json.dumps(model, default=str)) if model is not None else None
    if not isinstance(before, dict) or not isinstance(now, dict) or before == now:
        return ""
    return (f"; the run was trained with other model settings ({_changes(before, now)}): resume with the run's model "
            f"settings (recorded in {run_dir / 'config.json'}){hint}")


def _changes(before: dict, now: dict) -> str:
    """The entries of two settings tables that differ, as ``key: old -> new``."""
    return ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                     if before.get(k) != now.get(k))


def with_step_results(run_dir: Path, names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` and the results of the run's checkpoints kept beside them (``samples_step_N``, ``eval_step_N``,
    ``solve_step_N``, ``pnp_step_N``: :func:`results_dir`), which a run that starts over would leave beside
    checkpoints of the same names but other weights."""
    steps = sorted(p.name for p in Path(run_dir).glob("*_step_*")
                   if p.name.split("_step_")[0] in RESULT_DIRS)
    return (*names, *steps)


def drop_stale_results(run_dir: Path, names: tuple[str, ...], resumed_from: int, now: int) -> None:
    """Once a resumed run has trained on (from step ``resumed_from`` > 0 to ``now``), before it saves its new
    model, delete the results other commands wrote of the model it replaced (``names``: metrics.json, samples/,
    eval/, ...), which would otherwise sit beside the new model as if they were its own (what --fresh sets
    aside), with one line saying so."""
    if not (0 < resumed_from < now) or not io.is_rank0():
        return
    remove_results(run_dir, names)


def remove_results(model_dir: Path, names: tuple[str, ...]) -> None:
    """Delete the results ``names`` other commands wrote beside a model that has just been replaced, with one
    line saying which."""
    gone = [name for name in names if io.remove(Path(model_dir) / name)]
    if gone:
        print(f"note: removed the results of the model this run replaced ({', '.join(gone)}); evaluate the new "
              "model again", file=sys.stderr)


def replace_run(run_dir: Path, names: tuple[str, ...], flag: str = "") -> None:
    """Set a run's ``names`` aside for one that replaces it (:func:`condiff.io.set_aside`): they stay in
    ``run_dir/.replaced`` until the new run finishes (the caller then calls :func:`condiff.io.drop_replaced`),
    so a replacement that fails loses nothing; one line says so when ``flag`` asked for the replacement."""
    io.set_aside(run_dir, names)
    if flag and io.kept_names(run_dir) and io.is_rank0():
        print(f"{flag}: the run being replaced is kept in {run_dir / io.REPLACED} until this one finishes",
              file=sys.stderr)


def restore_only(args: argparse.Namespace, kind: str, clears: tuple[str, ...], settings_flags: str,
                 curves: dict | None = None) -> None:
    """``train`` / ``dual train --restore``: :func:`restore_run` of ``--out``, which is needed; settings
    (``settings_flags``) are refused, since the run comes back as it was. ``clears``: what ``--fresh`` sets aside
    besides the run's own files; ``curves``: what the run's ``loss.png`` draws (:func:`plot_loss_curve`'s
    arguments; the denoising loss unless given)."""
    if not io.is_rank0():  # under torchrun rank 0 alone restores (and redraws, and says so)
        return
    if getattr(args, "data", None) is not None or getattr(args, "config", None) is not None or args.overrides:
        raise ValueError(f"--restore puts a run back as it was: it takes no {settings_flags}")
    if args.out is None:
        raise ValueError("--restore needs --out, the run to put back")
    restore_run(check_out_dir(args.out, kind=kind), (*_RUN_FILES, *clears), curves=curves)


def restore_run(run_dir: Path, names: tuple[str, ...], flag: str = "--fresh",
                curves: dict | None = None) -> None:
    """``--restore``: put back the run an unfinished ``flag`` set aside in ``run_dir/.replaced``, in place of the
    failed attempt's files (``names``: what a run of this command writes, each deleted where the kept run has
    none of that name), and redraw its loss curve from its log."""
    run_dir = Path(run_dir)
    with io.claimed_run(run_dir):
        if not io.kept_names(run_dir):
            raise FileNotFoundError(f"--restore: {run_dir} keeps no run that {flag} set aside (nothing in "
                                    f"{io.REPLACED} there)")
        # what the attempt may have written: the run's files and its checkpoints' results, as --fresh sets aside
        io.restore_replaced(run_dir, attempt=(*with_step_results(run_dir, names), "loss.png"))
        if (run_dir / "log.jsonl").is_file():
            plot_loss_curve(run_dir / "log.jsonl", run_dir / "loss.png", **(curves or {}))
    print(f"restored the run in {run_dir} that {flag} had set aside; the failed attempt's files are deleted",
          file=sys.stderr)


def note_replaced(run_dir: Path, keep_hint: str = "stop now (Ctrl-C) and pass --restore in place of --resume") -> None:
    """For a command that goes on with the run as it lies (no replacement of its own): forget a set-aside
    cut short (:func:`condiff.io.discard_moving`), and say in one line when ``run_dir`` still keeps a run
    that an unfinished replacement set aside, which this command will delete when it finishes (``keep_hint``:
    how to keep it instead)."""
    io.discard_moving(run_dir)
    keep = Path(run_dir) / io.REPLACED
    if io.kept_names(run_dir) and io.is_rank0():
        print(f"note: {keep} keeps the run an unfinished --fresh / --retrain replaced; it is deleted when this "
              f"run finishes (to keep it instead, {keep_hint})",
              file=sys.stderr)


def recorded_settings(out: str | None, resume: bool, given: bool, remedy: str,
                      start: str = "pass --data / --config") -> dict | None:
    """With ``--resume`` into an earlier run (``out``) and no settings ``given`` on the command line (no
    --data / --config), the settings its ``config.json`` records (without the versions), announced; else
    None. A damaged file is an error ending with ``remedy`` (which flags to pass instead); a missing one (a
    mistyped --out) names ``start``, the flags that start a run."""
    recorded = Path(out) / "config.json" if out else None
    if not (resume and not given and recorded is not None):
        return None
    if not recorded.is_file():  # a mistyped --out: not a fresh run of the default preset, minutes long
        gone = "" if Path(out).is_dir() else "; the directory does not exist"
        raise FileNotFoundError(f"--resume: {out} records no run settings to go on with (no config.json{gone}): "
                                f"check --out, or {start} to start a run there")
    try:
        old = io.read_json_table(recorded)
    except ValueError as e:
        raise ValueError(f"--resume: cannot read the run's settings: {e}; {remedy}") from None
    return {k: v for k, v in old.items() if k != "versions"}


def announce_recorded(run_dir: Path, overrides: list[str]) -> None:
    """Say that a resumed run takes the settings it recorded (:func:`recorded_settings`)."""
    print(f"--resume: the settings recorded in {Path(run_dir) / 'config.json'}" + (", with --set" if overrides else ""),
          file=sys.stderr)


def same_schedule(a: object, b: object) -> bool:
    """Two schedule settings tables that build the same schedule (the defaults written out in full, or
    left out, are the same schedule)."""
    if a == b:
        return True
    try:
        return Schedule.from_config(a).config() == Schedule.from_config(b).config()
    except (ValueError, TypeError, KeyError, AttributeError):
        return False


def _check_same(run_dir: Path, sections: dict[str, dict | None], hint: str = "") -> None:
    """Refuse to resume a run with other ``data``, ``schedule`` or (dual training) ``objective`` settings than
    it was trained with."""
    old = json_table(run_dir / "config.json")
    for section, settings in sections.items():
        # a path recorded as typed (before runs recorded them absolute) is the same file as its absolute form
        before, now = old.get(section), json.loads(json.dumps(settings, default=str))
        if settings is None or not isinstance(before, dict) or paths_resolved(before) == paths_resolved(now):
            continue
        if section == "schedule" and same_schedule(before, now):
            continue
        diff = _changes(before, now)
        what = {"data": "on other data", "schedule": "with another noise schedule",
                "objective": "on other objective data"}[section]
        raise ValueError(f"--resume: {run_dir} was trained {what} ({diff}); resume with the run's {section} "
                         f"settings (recorded in {run_dir / 'config.json'}), or pass --fresh to start over{hint}")


PATH_KEYS = ("name", "model", "data", "reference", "init")  # the keys of a run's tables that may hold a path


def paths_resolved(v: object, key: str | None = None) -> object:
    """``v`` with the values of :data:`PATH_KEYS` that name an existing file or folder made absolute
    (:func:`~condiff.cli.config.data_ref`), in tables and lists too; other strings (a schedule's kind, a
    split) stay words, whatever folders the working directory holds."""
    if isinstance(v, dict):
        return {k: paths_resolved(x, k) for k, x in v.items()}
    if isinstance(v, list):
        return [paths_resolved(x, key) for x in v]
    return data_ref(v) if isinstance(v, str) and v and key in PATH_KEYS else v


_claimed: dict[Path, str] = {}


#: how a refusal names an output folder the command chose (:func:`results_dir`), not one the user gave
DEFAULT_OUT = "the default --out"
#: how ``condiff eval`` names the run it scores beside its model, where no --out is given
EVAL_BESIDE = "the run's folder, where eval writes beside its model,"
CHOSEN_OUT = (DEFAULT_OUT, EVAL_BESIDE)  # output folders a refusal says how to move (--out)


def _way_out(flag: str) -> str:
    """How a refusal of an output folder the command chose (:data:`CHOSEN_OUT`) ends: where to write instead."""
    return ": give --out DIR to write elsewhere" if flag in CHOSEN_OUT else ""


def check_writable(path: str | Path, flag: str, folder: bool | None = None) -> Path:
    """Refuse, before any work, a place the results could not be written to after it: ``path`` itself where
    it exists, else its nearest existing ancestor (returned). ``folder``: ``path`` is to be a folder (True)
    or a file (False), so that an existing one of the other kind is refused too."""
    p = Path(path)
    if dangling := next((q for q in (p, *p.parents) if os.path.lexists(q) and not q.exists()), None):
        raise FileNotFoundError(f"{flag} {p}{'' if dangling == p else f': {dangling}'} is a link to nothing")
    q = next((q for q in (p, *p.parents) if q.exists()), Path("."))
    elsewhere = _way_out(flag)
    if not os.access(q, os.W_OK):
        raise PermissionError(f"{flag} {p}{'' if q == p else f': {q}'} is not writable{elsewhere}")
    if (q != p or folder) and not q.is_dir():  # the place would be made inside a file
        raise NotADirectoryError(f"{flag} {p}{'' if q == p else f': {q}'} is a file, not a directory{elsewhere}")
    if q == p and folder is False and q.is_dir():
        raise IsADirectoryError(f"{flag} {p} is a directory, not a file")
    if q.is_dir():  # permission bits can say yes where nothing can be made (/proc, a read-only mount, as root)
        probe = None
        try:
            fd, probe = tempfile.mkstemp(prefix=io.PROBE, dir=q)
            os.close(fd)
        except OSError as e:
            raise PermissionError(f"{flag} {p}{'' if q == p else f': {q}'} cannot be written ({e.strerror})"
                                  f"{elsewhere}") from None
        finally:
            if probe is not None:
                os.unlink(probe)
    return q


def check_out_dir(path: str | Path | None, flag: str = "--out", kind: str | None = None, by: str | None = None,
                  inputs: dict[str, object] | None = None,
                  default: str | Path | Callable[[], str | Path] | None = None) -> Path:
    """An output directory argument, checked before any work: refused if it names an existing file, or,
    for a command that writes a run of its own ``kind`` (``"condiff dual train"``), if it holds another
    command's run, which this one would overwrite. Once the command succeeds, :func:`mark_runs` records
    ``kind`` in the directory. ``by``: the command named in a refusal where it is not ``kind`` itself
    (``condiff demo`` writes a ``condiff train`` run). ``inputs``: the command's input paths by flag
    (``{"--input": "pngs"}``); a folder of data among them, or its ``train/`` or ``test/`` split, is refused
    as the output. ``default``: the folder the command chose where ``path`` (the flag's value) is None, named in
    a refusal as :data:`DEFAULT_OUT`, with how to write elsewhere; or a function that makes it, called only then
    (a default made of a model or a config the command has yet to check). Returns the folder."""
    if path is None:
        if default is None:
            raise ValueError(f"{flag} is needed: give an output directory")
        path, flag = default() if callable(default) else default, DEFAULT_OUT
    p = Path(path)
    elsewhere = _way_out(flag)
    another = elsewhere[2:] or "give another directory"
    q = check_writable(p, flag)
    if not q.is_dir():  # the nearest existing ancestor must be a directory too
        raise NotADirectoryError(f"{flag} {p}{'' if q == p else f': {q}'} is a file, not a directory{elsewhere}")
    up = Path(os.path.abspath(p))  # a relative --out from inside a run or a model names their folders too
    for given_flag, given in (inputs or {}).items():  # results written among the files of a folder of data
        if not isinstance(given, (str, Path)) or not str(given) or str(given) in DATASETS:  # (not a folder named so)
            continue
        g, real = Path(os.path.realpath(given)), Path(os.path.realpath(p))  # through links on either side
        read = (g, *(Path(os.path.realpath(g / split)) for split in ("train", "test")))  # (a split may be a link)
        if g.is_dir() and real in read:  # the folders a folder of data is read from
            where = "the folder" if real == g else f"the {real.name}/ split of the folder"
            raise ValueError(f"{flag} {p} is {where} given as {given_flag} ({given}): its results would be read "
                             f"as data with those files: {another}")
    if kind is not None:
        other = run_kind(p)
        if other is not None and other != kind:
            raise FileExistsError(f"{flag} {p} holds the output of `{other}`, which `{by or kind}` would overwrite: "
                                  f"{another}")
        if other is None and p.is_dir():  # a folder of runs (runs/): it would be marked as this command's run
            inner = sorted(q.name for q in p.iterdir() if q.is_dir() and (q / io.RUN_MARK).is_file())
            if inner:
                raise FileExistsError(f"{flag} {p} is a folder that holds runs ({', '.join(inner[:3])}"
                                      f"{', ...' if len(inner) > 3 else ''}), not a run: give a directory of its own")
        if kind.startswith(io.TRAINING_KINDS):  # a run's subfolders are its own: stages, samples, caches
            for q in up.parents:
                if (owner := run_kind(q)) is not None:
                    raise FileExistsError(f"{flag} {p} lies inside {q}, the run of `{owner}`, whose files the two "
                                          "runs would overwrite: give a directory outside it")
        _claimed[p] = kind
    for q in (up, *up.parents):  # a checkpoint is replaced whole when it is saved again, and pruned
        what = ("a model checkpoint directory; files written into it would be lost when the model is saved again"
                if (q / "model.safetensors").is_file() else "a run's folder of checkpoints, which its training "
                "keeps and prunes" if q.name == "checkpoints" and any(q.glob("step_*")) else None)
        if what:
            raise FileExistsError(f"{flag} {p} {'is' if q == up else f'lies inside {q},'} {what}: {another}")
    if kind is None or not kind.startswith(io.TRAINING_KINDS):
        lock_enclosing_run(p)
    return p


def lock_enclosing_run(out: Path) -> None:
    """Share the lock of the training run that ``out`` lies in (or is), if any, while results are written
    there: a ``train --fresh`` or ``--resume`` started meanwhile would otherwise find the old model's
    results written beside its new model after it had set them aside or removed them. A process training
    that run now is refused in one line (:class:`condiff.io.RunInUseError`); other result writers are not."""
    out = Path(os.path.abspath(out))  # a relative --out from inside the run names its parents too
    for q in (out, *out.parents):  # past folders of results (marked by sample, eval, ...) to the run
        if q.is_dir() and (kind := run_kind(q)) is not None and kind.startswith(io.TRAINING_KINDS):
            io.lock_run(q, shared=True)
            return


def results_dir(ckpt: str | Path, name: str) -> Path:
    """Where a command puts its results of the model at ``ckpt`` by default: ``RUN/name`` for a run or its
    ``RUN/model``, ``RUN/name_step_N`` for a checkpoint, ``DIR_name`` beside a bare model directory; never
    inside a model or checkpoint directory, which is replaced whole when saved again (or pruned)."""
    p = Path(os.path.abspath(ckpt))  # `--ckpt .` inside RUN/model; abspath, not resolve: a linked model/ keeps RUN
    if p.is_file():  # named as --ckpt's mistake, not as an --out the user never gave
        raise io.CheckpointError(f"{p} is a file; a checkpoint is a directory (with {io.CONFIG})")
    if p.name == "checkpoints" and not (p / io.CONFIG).is_file():  # a run's checkpoints/: --ckpt's mistake too
        refuse_a_folder_of_models(p)
    if not (p / "model.safetensors").is_file():  # a run (its model in p/model), a diffusers model, a NAMM stage
        return p / name
    if p.parent.name == "checkpoints":
        return p.parent.parent / f"{name}_{p.name}"
    if p.name == "model":
        return p.parent / name
    return p.parent / f"{p.name}_{name}"


def json_table(path: Path) -> dict:
    """The table a JSON file holds; {} where it is missing or broken."""
    try:
        return io.read_json_table(path)
    except (OSError, ValueError):
        return {}


def run_kind(path: str | Path) -> str | None:
    """The command that wrote run directory ``path``: its mark, or for a run made before marks, a guess
    from its config.json or metrics.json; None for a directory that shows no run."""
    p = Path(path)
    try:
        return (p / io.RUN_MARK).read_text().strip() or None
    except OSError:
        pass
    cfg = json_table(p / "config.json")
    if "mirror" in cfg and not (p / "model.safetensors").is_file():  # (a saved mirror map is no run: save_mirror)
        return "condiff namm fit"
    if "dual" in cfg:
        return "condiff dual train"
    if {"data", "model", "train"} <= set(cfg):
        return "condiff train"
    m = json_table(p / "metrics.json")
    for key, kind in (("lambda_final", "condiff dual toy"), ("memorisation_reduction", "condiff dual finetune"),
                      ("data_class_hist", "condiff dual fair")):
        if key in m:
            return kind
    return None


def forget_claims() -> None:
    """Start a command with no directory claimed (an earlier in-process command may have failed)."""
    _claimed.clear()


def mark_runs() -> None:
    """Record in each directory a successful command claimed (:func:`check_out_dir`) which command it was."""
    for p, kind in _claimed.items():
        if p.is_dir() and not (p / io.RUN_MARK).is_file():
            try:
                io.write_text_atomic(p / io.RUN_MARK, kind + "\n")
            except OSError:  # a read-only place: the command's work is done, the mark only guards it
                pass
    forget_claims()


# sampling settings for a model that records none (a diffusers directory, a bare model directory)
DEFAULT_SAMPLE = {"n": 64, "steps": 100, "eta": 1.0, "seed": 0, "batch_size": 256}

_BOOKKEEPING = ("progress", "keep", "ckpt_every", "log_every", "device")


def _weights_options(train: dict | None) -> dict:
    """The training options that change the trained weights (not progress bars, checkpoint cadence, ...)."""
    return {k: v for k, v in (train or {}).items() if k not in _BOOKKEEPING}


def same_settings(run_dir: Path, cfg: dict) -> bool:
    """True when ``run_dir/config.json`` records the same data, model, schedule and training budget."""
    old = json_table(Path(run_dir) / "config.json")  # {} (missing, broken) matches no settings
    return (all(old.get(k) == cfg.get(k) for k in ("data", "model")) and same_schedule(old.get("schedule"),
                                                                                       cfg.get("schedule"))
            and _weights_options(old.get("train")) == _weights_options(cfg.get("train")))


def refuse_other_settings(run_dir: Path, cfg: dict, remedy: str) -> None:
    """Refuse to discard a trained model or checkpoints that ``run_dir`` holds for other settings; the
    message ends with ``remedy``."""
    run_dir = Path(run_dir)
    held = (run_dir / "model").is_dir() or any((run_dir / "checkpoints").glob("step_*"))
    if not held or same_settings(run_dir, cfg):
        return
    old = json_table(run_dir / "config.json")
    keep = ("data", "model", "schedule")
    changed = checks.changed_keys({k: old.get(k) for k in keep} | {"train": _weights_options(old.get("train"))},
                                  {k: cfg.get(k) for k in keep} | {"train": _weights_options(cfg.get("train"))})
    what = f" (changed: {', '.join(changed)})" if changed and old else ""
    raise FileExistsError(f"{run_dir} holds a model trained with other settings{what}; {remedy}")


def model_is_complete(run_dir: Path, cfg: dict) -> bool:
    """True when ``run_dir/model`` exists and was trained with the same data, model, schedule and budget."""
    model_dir = Path(run_dir) / "model"
    if not (model_dir / io.CONFIG).is_file() or not same_settings(run_dir, cfg):
        return False
    try:  # the run's config.json is written before training: the model must record the same budget
        return io.load_config(model_dir).get("steps") == cfg["train"].get("steps", TrainConfig.steps)
    except io.CheckpointError:
        return False


def _restore_kept_model(run_dir: Path, cfg: dict) -> bool:
    """Put back the finished model of these settings that a failed --retrain set aside in ``.replaced``, in
    place of the failed attempt when it holds no checkpoint (nothing to lose): the command that trained it,
    run again, reuses it rather than training it again. Returns whether it did."""
    kept = run_dir / io.REPLACED

    def restorable() -> bool:  # the failed attempt holds nothing: no model (of any settings), no checkpoint
        return (model_is_complete(kept, cfg) and not (run_dir / "model").exists()
                and not any((run_dir / "checkpoints").glob("step_*")))

    if not restorable():
        return False
    with io.claimed_run(run_dir):
        if not restorable():  # checked again under the lock: another process may have written meanwhile
            return False
        io.restore_replaced(run_dir)
    print(f"restored the model of these settings that an unfinished --retrain had set aside in {kept}",
          file=sys.stderr)
    return True


def train_or_reuse(cfg: dict, run_dir: Path, retrain: bool = False, own: bool = False,
                   remedy: str = "move it away, or use another run directory",
                   announce: str | None = None) -> tuple[float, bool]:
    """Reuse the finished model in ``run_dir`` if it has these settings, else train it (resuming an
    interrupted run of the same settings). A model or checkpoints of other settings are refused (naming
    ``remedy``) unless ``retrain`` or ``own`` (a benchmark's own directory), which replace them (kept in
    ``.replaced`` until the new model is trained).
    ``announce``: a line printed once everything is checked, just before training.
    Returns ``(training seconds, reused)``: the seconds over every session of the run (a resumed run counts
    the sessions before this one too), 0.0 when reused."""
    run_dir = Path(run_dir)
    if not retrain and model_is_complete(run_dir, cfg):
        return 0.0, True
    if not retrain and _restore_kept_model(run_dir, cfg):
        return 0.0, True
    with io.claimed_run(run_dir):  # another command writing this run is refused before anything changes
        job = TrainingJob(cfg, run_dir)  # checked before anything in run_dir changes
        if not (retrain or own):
            refuse_other_settings(run_dir, cfg, remedy)
    if announce:
        print(announce, file=sys.stderr)
    if retrain or ((run_dir / "config.json").is_file() and not same_settings(run_dir, cfg)):  # nothing held
        # the old model's results too (the demo's, pnp's beside its default prior), which would pass for the new one's
        replace_run(run_dir, with_step_results(run_dir, (*_RUN_FILES, *MODEL_RESULTS)), "--retrain" if retrain else "")
    else:
        note_replaced(run_dir, f"stop now (Ctrl-C), delete {run_dir / 'checkpoints'} and run the command again")
    job.resume()
    save_resolved_config(run_dir, cfg)
    job.fit()
    io.drop_replaced(run_dir)
    return job.trainer.seconds, False


def save_resolved_config(run_dir: Path, cfg: dict) -> None:
    """The run's settings, with the versions that trained it (which no comparison of settings reads)."""
    io.write_json_atomic(run_dir / "config.json",
                         {**{k: v for k, v in cfg.items() if not k.startswith("_")}, "versions": io.versions()})


def run_config(run_dir: Path) -> dict:
    """The resolved config a run directory was trained with."""
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not a condiff run directory (no config.json)")
    return io.read_json_table(p)


def draw_samples(den: Denoiser, shape: tuple[int, ...], scfg: dict, device: str, n: int | None = None) -> torch.Tensor:
    """Sample with the [sample] settings: n, steps, eta, seed, batch_size, clip_x0."""
    n = int(n if n is not None else scfg["n"])
    g = torch.Generator(device=device).manual_seed(int(scfg.get("seed", 0)))
    clip = scfg.get("clip_x0")
    return generate(den, n, tuple(shape), batch_size=int(scfg.get("batch_size", 500)), progress=True,
                    steps=int(scfg["steps"]), eta=float(scfg["eta"]), generator=g, device=device,
                    clip_x0=None if clip in (None, 0, False) else clip)


def load_model_for(path: str | Path, device: str) -> tuple[Denoiser, dict, tuple[int, ...]]:
    """A denoiser, the settings it was made with, and the per-sample shape, from a run directory,
    a model directory or a diffusers model directory."""
    path = Path(path)
    den = load_denoiser(path, device=device)  # a NAMM mirror diffusion model is refused, naming its run
    if isinstance(den, DiffusersDenoiser):
        c = den.unet.config
        size = c.sample_size if isinstance(c.sample_size, (list, tuple)) else (c.sample_size, c.sample_size)
        if not all(checks.is_integer(v, 1) for v in size):
            raise ValueError(f"{path}: the UNet config gives no usable sample_size ({c.sample_size!r}), so the "
                             "sample shape is unknown")
        return den, {"sample": {**DEFAULT_SAMPLE, "clip_x0": den.clip_x0}}, (int(c.in_channels), *map(int, size))
    model_cfg = io.load_config(resolve_model_dir(path))
    run_cfg = run_config(path) if (path / "config.json").is_file() and (path / "model").is_dir() else {}
    if not run_cfg:  # RUN/model or RUN/checkpoints/step_N of a training run: the run's [sample] settings too
        up = path.parent if path.name == "model" else path.parent.parent if path.parent.name == "checkpoints" else None
        if up is not None and (up / "config.json").is_file() and run_kind(up) in ("condiff train",
                                                                                 "condiff dual train"):
            run_cfg = run_config(up)
    run_cfg = {"data": model_cfg.get("data"), **run_cfg} if model_cfg.get("data") else run_cfg
    for key in ("value_range", "label_drop"):  # [min, max] of the training data (models since 2026-12-04);
        if model_cfg.get(key) is not None:      # the label drop of a class-conditional model
            run_cfg = {**run_cfg, key: model_cfg[key]}
    if not isinstance(model_cfg.get("shape"), list):
        if "key" in model_cfg:  # a `condiff dual toy|fair|finetune` model saved before models recorded it
            raise io.CheckpointError(f"{resolve_model_dir(path)} was saved by an older `condiff dual` experiment, "
                                     "without its sample shape: run that experiment again (same --out, same "
                                     "settings; the model is reused) to complete it")
        raise io.CheckpointError(f"{resolve_model_dir(path)}/{io.CONFIG} records no sample shape (a model saved from "
                                 "Python records it with condiff.models.save_model(..., shape=[C, H, W]))")
    shape = model_cfg["shape"]
    if not shape or not all(checks.is_integer(s, 1) for s in shape):  # a hand-edited file: "8" for 8, say
        raise io.CheckpointError(f"{resolve_model_dir(path)}/{io.CONFIG} records a bad sample shape {shape!r}: "
                                 "positive integers expected")
    return den, run_cfg, tuple(int(s) for s in shape)


FAR = 5.0  # samples beyond this many times the training data's reach are said to be far from them


def check_samples(x: torch.Tensor, out: Path, value_range: list | None = None) -> None:
    """Refuse samples with non-finite values before anything is written to ``out`` (a NaN samples.npz
    would pass for a result); warn of samples far beyond the training data's ``value_range`` (what an untrained
    or diverging model draws), which are written all the same."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FloatingPointError(f"sampling produced {bad} non-finite values of {x.numel()}; nothing was "
                                 f"written to {out} (a diverging sampler: try eta <= 1 or clip_x0)")
    if isinstance(value_range, list) and len(value_range) == 2 and all(checks.is_number(v) for v in value_range):
        data = max(abs(float(v)) for v in value_range)
        if x.numel() and (reach := float(x.abs().max())) > FAR * max(data, 1e-3):
            warnings.warn(f"the samples reach |x| = {reach:.3g} while the training data stay within {data:.3g}: is "
                          "the model trained (and sampled with its own settings)?", stacklevel=2)


def check_targets(out: Path, also: tuple[str, ...] = ()) -> None:
    """Refuse, before sampling, output files that cannot be replaced: ``samples.npz``, ``samples.png`` and
    the caller's ``also`` (a directory in a file's place; :func:`check_out_dir` has checked write access)."""
    for name in ("samples.npz", "samples.png", *also):
        if (out / name).is_dir():
            raise IsADirectoryError(f"{out / name} is a directory: move it away; nothing was written")




def write_samples(x: torch.Tensor, out: Path, grid: int = 100, value_range: list[float] | None = None,
                  label: int | None = None) -> list[Path]:
    """``samples.npz`` with all samples, plus a picture: an image grid (shown on the
    :func:`~condiff.data.nominal_range` of the model's recorded ``value_range``), or a scatter for 2-D points.
    The caller checks the files (:func:`check_targets`) before it samples, and the samples
    (:func:`check_samples`) before it writes, into the folder of :func:`condiff.io.writing_outputs`,
    whose ``old`` files are :data:`SAMPLE_FILES`."""
    arr = x.detach().cpu().numpy()
    out.mkdir(parents=True, exist_ok=True)
    extra = {} if label is None else {"y": np.full(len(arr), label, dtype=np.int64)}  # the class asked for
    io.write_npz_atomic(out / "samples.npz", x=arr, **extra)
    files = [out / "samples.npz"]
    if arr.ndim == 4 and arr.shape[1] in (1, 3):
        save_png_grid(to_display(x[:grid].cpu(), nominal_range(value_range)).clamp(-1, 1), out / "samples.png")
        files.append(out / "samples.png")
    elif arr.ndim == 2 and arr.shape[1] == 2:
        files.append(plot_scatter({"samples": arr}, out / "samples.png"))
    return files
