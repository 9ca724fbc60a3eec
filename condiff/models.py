"""Saving and loading trained diffusion models as denoisers.

A model directory holds ``config.json`` (``{"net": ..., "schedule": ..., "data": ...}``) and
``model.safetensors``. :func:`load_denoiser` also accepts a run directory (its ``model/``), a
training checkpoint (EMA weights by default) or a local diffusers model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import checks, io
from .denoiser import Denoiser, DiffusersDenoiser, NetDenoiser, trained_on
from .nets import build_net
from .schedule import Schedule, check_schedule


def save_model(path: str | Path, net: nn.Module, schedule: Schedule, **meta) -> Path:
    """Write ``net`` (with its ``config``) and ``schedule`` as a model directory. ``meta`` is recorded
    beside them; the command line reads ``shape`` (the per-sample shape, needed by ``condiff sample``,
    ``eval`` and ``solve``), ``data`` (the data set's settings) and ``value_range`` (the data's
    ``[min, max]``, :func:`condiff.data.value_range`); the last two default to what a
    :class:`~condiff.train.Trainer` recorded on ``net`` (``net.trained_on``)."""
    if not isinstance(getattr(net, "config", None), dict):
        raise TypeError(f"save_model needs a condiff network (one with a .config to rebuild it from, e.g. from "
                        f"condiff.nets.build_net), got a {type(net).__name__}")
    check_schedule("save_model", schedule)
    for key, value in trained_on(net).items():  # what a Trainer saw, where the caller gives nothing else
        if meta.get(key) is None:
            meta[key] = value
    if meta.get("value_range") is not None:  # constant data have min == max
        span = checks.pair(meta["value_range"])
        if span is None or span[0] > span[1]:
            raise ValueError(f"save_model: value_range must be the data's [min, max], two finite numbers with "
                             f"min <= max, got {meta['value_range']!r}")
        meta["value_range"] = list(span)
    config = {"format": "condiff-model", "net": net.config, "schedule": schedule.config(), **io.dtype_entry(net),
              **meta}
    return io.save_module(path, net, config)


def resolve_model_dir(path: str | Path) -> Path:
    """The directory that holds the weights: ``path`` itself, ``path/model`` for a run directory."""
    path = Path(path)
    if not io.recover_checkpoint(path).exists():
        raise io.CheckpointError(f"no model at {path}: the path does not exist")
    if (io.recover_checkpoint(path / "model") / io.CONFIG).is_file():
        return path / "model"
    return path


def load_denoiser(path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
                  mirror_space: bool = False) -> Denoiser:
    """Load a condiff model / run / checkpoint, or a diffusers model directory, as a Denoiser. A mirror
    diffusion model made by ``condiff namm`` (trained on ``g(x)``: its samples are not data until the inverse
    map takes them back, :func:`condiff.mirror.mirror_generate`) is refused unless ``mirror_space``."""
    checks.device("device", device)
    d = resolve_model_dir(path)
    if is_diffusers_dir(d):
        return DiffusersDenoiser.from_pretrained(d).to(device)
    if (d / "unet").is_dir() and not (d / "config.json").is_file():
        raise io.CheckpointError(f"{d} holds a unet/ but no scheduler_config.json (in scheduler/ or beside it): a "
                                 "diffusers model directory needs its scheduler's config to be loaded")
    net, cfg = load_net(d, device, ema)
    if cfg.get("stage") == "mdm" and not mirror_space:  # trained on g(x): not data until f maps them back
        stage = next((q for q in (Path(path), *Path(path).parents) if (q / "stage.json").is_file()), None)
        py = "condiff.mirror.mirror_generate, or load_denoiser(..., mirror_space=True)"
        how = f"use `condiff namm sample --run {stage.parent}` (in Python, {py})" if stage is not None else \
            f"in Python, use {py}"
        raise io.CheckpointError(f"{path} is a NAMM mirror diffusion model, whose samples lie in mirror space, not "
                                 f"data space: {how}")
    drop = cfg.get("label_drop")  # recorded by `condiff train` for class-conditional models
    span = cfg.get("value_range")  # recorded since 2026-12-04
    ok = isinstance(span, list) and len(span) == 2 and all(checks.is_number(v) for v in span)
    shape = cfg.get("shape")
    den = NetDenoiser(net.eval(), Schedule.from_config(cfg["schedule"]),
                      label_drop=float(drop) if checks.is_number(drop) else None,
                      value_range=span if ok else None,
                      sample_shape=shape if isinstance(shape, list) and all(checks.is_integer(v, 1) for v in shape)
                      else None)
    if "stage" in cfg:  # a NAMM run's diffusion model says which space it samples (Denoiser.mirror_space)
        den.mirror_space = cfg["stage"] == "mdm"
    return den


def refuse_a_folder_of_models(d: Path) -> None:
    """A folder that holds models (a dual experiment's, a run's ``checkpoints/``) rather than being one: name them."""
    try:
        inner = sorted(q.name for q in d.iterdir() if q.is_dir() and (
            (q / io.CONFIG).is_file() or (q / "model" / io.CONFIG).is_file()))
    except OSError:
        return
    if inner:
        names = ", ".join(inner[-3:]) if d.name == "checkpoints" else ", ".join(inner[:3])
        more = ", ..." if len(inner) > 3 else ""
        what = "checkpoints" if d.name == "checkpoints" else "models"
        raise io.CheckpointError(f"{d} is a folder of {what} ({names}{more}), not one: pass one of them"
                                 + (f", or the run {d.parent}" if d.name == "checkpoints" else ""))


def _results_of(d: Path) -> str | None:
    """The command whose results folder ``d`` is (its run mark: ``condiff solve``, ``condiff sample``, ...), or None."""
    try:
        kind = (d / io.RUN_MARK).read_text().strip()
    except OSError:
        return None
    return kind if kind and not kind.startswith(io.TRAINING_KINDS) else None  # (a training's run holds models)


def _config_or_empty(path: Path) -> dict:
    try:
        return io.load_config(path)
    except io.CheckpointError:
        return {}


def is_diffusers_dir(path: Path) -> bool:
    return (path / "scheduler_config.json").is_file() or (path / "scheduler" / "scheduler_config.json").is_file()


def load_net(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the network stored at ``path`` and load its weights; returns ``(net, config)``."""
    d = resolve_model_dir(path)
    run_dir = (d / "checkpoints").is_dir() or (d / "log.jsonl").is_file()  # a run directory without model/
    if not run_dir and not (d / io.CONFIG).is_file():  # a folder that holds models rather than being one: named
        refuse_a_folder_of_models(d)
    if not (d / io.CONFIG).is_file() and (kind := _results_of(d)):  # a command's results, given as a model
        raise io.CheckpointError(f"{d} holds the results of `{kind}`, not a model: pass the model they were made of")
    cfg = io.load_config(d) if (d / io.CONFIG).is_file() or not run_dir else {}  # a Trainer's run has none
    if "net" not in cfg or "schedule" not in cfg:
        if run_dir:
            if (pid := io.run_holder(d)) is not None:
                raise io.ModelInTraining(f"{d} has no model yet: another condiff process (pid {pid}) is still "
                                         "training it; wait for it to finish")
            if (d / "stage.json").is_file() and (d / "mirror").is_dir():  # namm/ or finetune/ of a NAMM run
                raise io.CheckpointError(f"{d} is a stage of a NAMM run that holds a mirror map, not a diffusion "
                                         f"model: use `condiff namm sample --run {d.parent}`")
            if (d / "mirror" / io.CONFIG).is_file():  # the run_dir of fit_mirror_map or finetune_inverse
                raise io.CheckpointError(f"{d} is the run of a mirror map (fit_mirror_map, finetune_inverse), not of "
                                         "a diffusion model: load its map with condiff.mirror.load_mirror")
            what = "a model/ without its config.json" if (d / "model").is_dir() else "no model/"
            newest = max((p for p in (d / "checkpoints").glob("step_*")), default=None, key=lambda p: p.name)
            loads = newest is not None and {"net", "schedule"} <= set(_config_or_empty(newest))
            ckpt = (f"; or load its newest checkpoint, {newest} (a Trainer of the Python API saves no model/: "
                    "condiff.models.save_model writes one)") if loads else ""
            kept = d / io.REPLACED / "model"
            if kept.is_dir():
                ckpt += f"; the model a --fresh / --retrain that has not finished replaced is kept in {kept}"
            raise io.CheckpointError(f"{d} is a run directory with {what} (training unfinished, or model/ "
                                     "deleted): finish it by running the command that trained it again with its "
                                     "settings (`condiff train ... --resume`; `condiff pnp TASK ... --train` for a "
                                     f"PnP prior){ckpt}")
        if "mirror" in cfg and (d / "namm").is_dir():  # a `condiff namm fit` run directory
            vanilla = f", or its vanilla diffusion model, {d / 'vanilla'}" if (d / "vanilla").is_dir() else ""
            raise io.CheckpointError(f"{d} is a NAMM run directory, not a model: use `condiff namm sample --run "
                                     f"{d}`{vanilla}")
        if isinstance(cfg.get("mirror"), dict):  # save_mirror's folder: RUN/namm/mirror, RUN/finetune/mirror
            raise io.CheckpointError(f"{d} is a saved mirror map (NAMM), not a diffusion model: load it with "
                                     "condiff.mirror.load_mirror; a NAMM run samples with `condiff namm sample "
                                     "--run RUN`")
        raise io.CheckpointError(f"{d}/config.json has no 'net' or 'schedule' entry: not a condiff model")
    net = io.to_recorded_dtype(build_net(cfg["net"], saved_by=f"the model at {d}").to(device), cfg, d)
    stem = "ema" if ema and io.has_group(d, "ema") else "model"
    io.load_state_into(net, d, stem)
    return net, cfg
