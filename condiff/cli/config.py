"""Run configuration: presets, TOML files and ``--set section.key=value`` overrides.

A configuration is a nested dict with the sections ``data``, ``model``, ``schedule``, ``train`` and
``sample`` (``condiff eval`` scores the samples drawn with the ``sample`` settings).
Resolution order: preset of the data set < TOML file < overrides.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .. import checks
from ..checks import check_setting
from ..sample import clip_bounds
from ..userfile import absolute_spec

SECTIONS = ("data", "model", "schedule", "train", "sample")

_COMMON = {
    "schedule": {"kind": "linear", "T": 1000},
    "sample": {"n": 1000, "steps": 100, "eta": 1.0, "batch_size": 500, "seed": 0},
}

PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"name": "digits"},
        "model": {"name": "unet", "in_channels": 1, "base": 32, "mults": [1, 2, 2], "num_res": 1},
        "train": {"steps": 6000, "batch_size": 128, "lr": 2e-3, "warmup": 200, "ema_decay": 0.999,
                  "ckpt_every": 1000},
        # 5000 samples: with 1000, the classifier Fréchet distance of the training data itself
        # (bootstrap) is ~1.9x the train-vs-test reference, so sampling noise alone would nearly use up
        # the 2x target; see BENCHMARKS.md, core-quality. 100 ancestral steps beat 50 on the 6000-step model.
        "sample": {"n": 5000, "steps": 100, "eta": 1.0},
    },
    "toy2d": {
        "data": {"name": "toy2d", "kind": "moons"},
        # depth 4, 16000 steps and 1000 sampling steps: the checkerboard's sharp edges and the thin
        # rings missed the MMD target with depth 3, 4000 steps and 100 sampling steps, and rings
        # still did with 8000 steps and 250 sampling steps (BENCHMARKS.md, core-quality).
        # fourier 4: on raw coordinates the MLP blurred the 0.02-wide rings (radial spread 0.06-0.08)
        # and mis-weighted them (ring masses 0.22-0.28 of 10000 samples, for 0.25 each, with lr 2e-3
        # and 5e-4 alike); with the features: spread 0.03-0.05, masses 0.244-0.254
        "model": {"name": "mlp", "dim": 2, "hidden": 256, "depth": 4, "fourier": 4},
        "train": {"steps": 16000, "batch_size": 256, "lr": 2e-3, "warmup": 100, "ckpt_every": 2000},
        # 10000 samples = 5 sets of 2000, scored against 20 held-out pairs (evaluate.toy2d_eval):
        # the MMD ratio of a single set of 2000 is too noisy to judge (a perfect model scored 0.66-2.57)
        "sample": {"n": 10000, "steps": 1000},
    },
    "patches": {
        "data": {"name": "patches", "size": 32},
        "model": {"name": "unet", "in_channels": 3, "base": 64, "mults": [1, 2, 2, 2], "num_res": 1},
        "train": {"steps": 20000, "batch_size": 64, "lr": 2e-4, "warmup": 500, "ckpt_every": 1000},
        "sample": {"n": 256, "clip_x0": 1.0},
    },
}


class ConfigError(ValueError):
    pass


def merge(base: dict, update: dict) -> dict:
    """Deep merge: nested dicts merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_checked(base: dict, update: dict, where: str, path: tuple[str, ...] = ()) -> dict:
    """:func:`merge` for a user's file: each value must be of the kind of the one it replaces (the checks
    of ``--set``), and a table stays a table; errors name ``where`` (the file) and the key."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        key, old = ".".join((*path, k)), out.get(k)
        if _another_kind(old, v, (*path, k)):  # another net or constraint: the old one's settings mean nothing to it
            out[k] = {**copy.deepcopy(v), "name": canonical_name(v["name"], f"{key}.name")}
            continue
        if isinstance(old, dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {key} must be a table, got {v!r}")
            out[k] = merge_checked(old, v, where, (*path, k))
            continue
        try:
            out[k] = check_setting(key, old, copy.deepcopy(v), "now")
            if k == "name" and path not in ((), ("data",)):
                out[k] = canonical_name(out[k], key)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return out


def _another_kind(old: Any, new: Any, path: tuple[str, ...]) -> bool:
    """Whether the table ``new`` names another kind of thing (``name``: a net, a constraint) than the table
    ``old`` at ``path``; the data table, whose name picks the defaults before anything is merged, aside."""
    return (path != ("data",) and isinstance(old, dict) and isinstance(new, dict) and "name" in old
            and "name" in new and canonical_name(new["name"]) != canonical_name(old["name"]))


def canonical_name(name: Any, key: str = "name") -> Any:
    """A table's ``name`` as a run records it: a class of one's own, ``FILE.py:NAME``, under the file's absolute
    path (so that later commands find it from any working directory, and two spellings of one file are one
    kind); any other name as it is. ``key``: the setting's dotted name, for the error on a bad ``NAME``."""
    full = absolute_spec(name, key, "a class") if isinstance(name, str) else None
    return name if full is None else full


def value_at(cfg: dict, path: list[str] | tuple[str, ...]) -> Any:
    """The value at a dotted ``path`` of ``cfg``; None where there is none."""
    for key in path:
        if not isinstance(cfg, dict):
            return None
        cfg = cfg.get(key)
    return cfg


def apply_settings(cfg: dict, from_file: dict, parsed: list[tuple[list[str], Any]], where: str) -> dict:
    """``cfg`` < the tables ``from_file`` < the ``parsed`` overrides. A ``--set X.name`` that names another kind
    (another net) is applied first, so that the old kind's settings are dropped and the file's and the other
    overrides' settings for the new one all stay, whatever the order of the flags."""
    names = {tuple(p): v for p, v in parsed if (len(p) >= 2 and p[-1] == "name" and p != ["data", "name"])
             or _another_kind(value_at(cfg, p), v, tuple(p))}  # X.name=..., or an inline table X={name=...}
    for path, value in names.items():
        set_path(cfg, list(path), value)
    cfg = merge_checked(cfg, from_file, where)
    for path, value in names.items():  # again: a file's table of another kind replaced the one asked for
        set_path(cfg, list(path), value)
    for path, value in parsed:
        if tuple(path) not in names:
            set_path(cfg, path, value)
    return cfg


def data_ref(name: str) -> str:
    """How a run records its data set: a registered name as it is, a user's file or folder as an
    absolute path (so later commands find it from any working directory)."""
    from ..data import DATASETS

    try:  # (os.path's expanduser leaves a "~user" it cannot find as it is; a name too long for a path is a name)
        path = os.path.expanduser(name)
        if name in DATASETS or not os.path.exists(path):
            return name
        return os.path.abspath(path)  # links kept, as every path a result records
    except (OSError, ValueError):
        return name


def preset(name: str) -> dict:
    """Defaults for a data set name; for a path (user data) the model table starts empty and is
    completed from the data's shape when the data are loaded."""
    base = PRESETS.get(name)
    if base is None:  # user data: the model is chosen from the data's shape (see common.net_config)
        base = {"data": {"name": name}, "model": {}, "train": PRESETS["digits"]["train"]}
    return merge(_COMMON, base)


def load_toml(path: str | Path, empty_hint: str | None = None) -> dict:
    """A TOML file as a dict; a missing or malformed file is a one-line :class:`ConfigError`, and so is an
    empty one where ``empty_hint`` says what to do instead (a command given no other settings)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, not a TOML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        cfg = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from None
    if not cfg and empty_hint is not None:  # an empty file (not yet written, say) started a full run on defaults
        raise ConfigError(f"config file {p} holds no settings (it is empty, or comments only): {empty_hint}")
    return cfg


def read_toml(path: str | Path, sections: tuple[str, ...] = SECTIONS, empty_hint: str | None = None) -> dict:
    """A config file whose top level holds only ``sections``, each a table (``empty_hint``: :func:`load_toml`)."""
    cfg = load_toml(path, empty_hint)
    check_sections(cfg, str(path), sections)
    return cfg


def check_sections(cfg: dict, where: str, sections: tuple[str, ...] = SECTIONS) -> None:
    bad = [k for k in cfg if k not in sections]
    if bad:
        raise ConfigError(f"{where}: unknown section(s) {bad}; expected some of {list(sections)}")
    for k, v in cfg.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: [{k}] must be a table, got {type(v).__name__}")


SAMPLE_KEYS = ("n", "steps", "eta", "batch_size", "seed", "clip_x0")


def check_sample(scfg: dict, where: str = "sample", flags: bool = False) -> dict:
    """The ``[sample]`` settings: known keys, counts >= 1, ``eta`` in [0, 1], a usable seed and clip.
    ``flags``: name the command-line flags (``--batch-size``) instead of ``where.key``."""
    def name(k: str) -> str:
        return "--" + k.replace("_", "-") if flags else f"{where}.{k}"

    bad = sorted(set(scfg) - set(SAMPLE_KEYS))
    if bad:
        raise ConfigError(f"unknown {where} setting(s) {bad}; known: {list(SAMPLE_KEYS)}")
    for k in ("n", "steps", "batch_size"):
        if k in scfg:
            checks.integer(name(k), scfg[k])
    if "eta" in scfg:
        checks.number(name("eta"), scfg["eta"], "[0, 1]")
    checks.seed(name("seed"), scfg.get("seed", 0))
    if scfg.get("clip_x0") not in (None, False, 0):  # 0 or absent: no clipping; a number c or [lo, hi]
        try:
            clip_bounds(scfg["clip_x0"])
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None
    return scfg


def toml_value(raw: str) -> Any:
    """A ``--set`` value read as TOML (``500``, ``1e-3``, ``true``, ``[1, 2]``), else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_override(item: str, sections: tuple[str, ...] = SECTIONS,
                   nested: bool = False) -> tuple[list[str], Any]:
    """``"train.steps=500"`` -> (["train", "steps"], 500); the value is read as TOML, else a string.

    ``nested`` allows deeper keys (``mirror.psi.filters=32``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    depth_ok = len(path) >= 2 if nested else len(path) == 2
    if not depth_ok or path[0] not in sections or not all(path):
        raise ConfigError(f"override key {key!r} must be section.key with section one of {list(sections)}")
    return path, toml_value(raw)


def set_path(cfg: dict, path: list[str], value: Any) -> None:
    """``cfg[path[0]]...[path[-1]] = value``, creating tables, type-checked against the old value. An
    inline table merges into the table it names, as a config file's table does, so that
    ``mirror.psi={filters=32}`` and ``mirror.psi.filters=32`` are the same override; one with another
    ``name`` (another kind of net or constraint) replaces it."""
    node = cfg
    for k in path[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {k} is not a table")
    old = node.get(path[-1])
    # a table that names another kind (a ball constraint for a box) replaces the old one, as does a
    # value that is no table (a constraint given by its name)
    if isinstance(value, dict) and "name" in value:  # an inline table of a class of one's own: its file's full path
        value = {**value, "name": canonical_name(value["name"], ".".join([*path, "name"]))}
    if isinstance(old, dict) and isinstance(value, dict) and value.get("name", old.get("name")) == old.get("name"):
        node[path[-1]] = merge_checked(old, value, "--set", tuple(path))
        return
    try:
        value = check_setting(".".join(path), node.get(path[-1]), value, "now")
        if path[-1] == "name" and path[:-1] != ["data"]:
            value = canonical_name(value, ".".join(path))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if path[-1] == "name" and _another_kind(node, {"name": value}, tuple(path[:-1])):
        node.clear()  # `--set model.name=mlp`: the old net's settings (a UNet's base, ...) mean nothing to it
    node[path[-1]] = value


def resolve(data: str | None = None, file: str | Path | None = None,
            overrides: list[str] | None = None) -> dict:
    """Build the run configuration: preset of the data set < TOML ``file`` < ``overrides``.

    The data set is ``data.name`` from the overrides, else ``data``, else the file's, else digits.
    """
    hint = None if overrides else "leave out --config for the defaults"
    return assemble(read_toml(file, empty_hint=hint) if file else {}, [parse_override(o) for o in overrides or []],
                    data, str(file))


def assemble(from_file: dict, parsed: list[tuple[list[str], Any]], data: str | None = None,
             where: str = "the config file", recorded: bool = False) -> dict:
    """The data set's preset < ``from_file`` (checked tables) < ``parsed`` overrides (type-checked).
    ``recorded``: ``from_file`` is a run's recorded settings, whose sampler budget was not chosen now (a
    resume with a shorter schedule then meets the schedule's own refusal, not the sampler's)."""
    named = [str(v) for p, v in parsed if p == ["data", "name"]]
    name = (named or [None])[-1] or data or from_file.get("data", {}).get("name") or "digits"
    cfg = apply_settings(preset(name), from_file, parsed, where)
    cfg["data"]["name"] = named[-1] if named else name  # the last --set data.name as given (an empty one refused)
    if not (isinstance(cfg["data"]["name"], str) and cfg["data"]["name"].strip()):
        raise ConfigError(f"data.name must name a data set or a file, got {cfg['data']['name']!r}")
    cfg["data"]["name"] = data_ref(cfg["data"]["name"])
    if isinstance(cfg.get("sample"), dict):
        check_sample(cfg["sample"])
        T = cfg.get("schedule", {}).get("T") if isinstance(cfg.get("schedule"), dict) else None
        steps = cfg["sample"].get("steps")
        chosen = any(p == ["sample", "steps"] for p, _ in parsed) or (
            not recorded and "steps" in (from_file.get("sample") or {}))
        if checks.is_integer(T, 2) and checks.is_integer(steps) and steps > T:
            if chosen:  # else found by every later `condiff sample` of the model
                raise ConfigError(f"sample.steps must be <= schedule.T = {T} (one model call per step of the "
                                  f"schedule at most), got {steps}")
            cfg["sample"]["steps"] = T  # the preset's budget, on a shorter schedule: every step of it
    if "split" in cfg.get("data", {}):
        raise ConfigError("data.split is not a setting: each command picks its split (training: train; "
                          "eval and solve: test)")
    return cfg
