"""``condiff namm``: neural approximate mirror maps (NAMM) for constrained diffusion models.

    condiff namm fit --data burgers --out runs/namm-burgers   # mirror map, MDM, vanilla DM
    condiff namm finetune --run runs/namm-burgers              # fine-tune f on MDM samples
    condiff namm sample --run runs/namm-burgers --n 256        # samples, violation maps, l(x) histograms
    condiff namm assimilate --run runs/namm-burgers            # mirror DPS vs DPS vs constraint-guided DPS

Data sets: brightness, burgers, kolmogorov, periodic, count (each carries its constraint), or a
``.npy`` / ``.npz`` / PNG path with ``--constraint NAME`` (box, ball, simplex, ...).
Settings: ``--profile quick|default|full`` (16x16 tiny CPU nets / 32x32 / 64x64 paper nets for a GPU),
then a TOML file (``--config``), then ``--set section.key=value`` (nested keys allowed:
``--set mirror.psi.filters=32``). Sections: data, mirror, loss, mirror_train, model, schedule,
train, sample, finetune, guide, assimilate.

Every stage is a sub-directory of the run (``namm/``, ``mdm/``, ``vanilla/``, ``finetune/``,
``samples/``) holding the settings it was made with (``stage.json``; a trained stage also keeps its
``log.jsonl`` and draws it as ``loss.png``); a finished stage with the same
settings is reused, an unfinished one resumes from its newest checkpoint, and more training steps alone
(``train.steps``, ``finetune.steps``) train a finished stage on from its last checkpoint; other changed
settings are an error unless ``--fresh`` is passed, which trains anew (a longer mirror map, which every
later stage is made from, is a new fit).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import shutil
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import checks, io
from ..checks import changed_keys
from ..constraints import Constraint, CountConstraint, build_constraint, check_distance, parse_python_spec
from ..data import DATASETS, ArrayData, DataError, NoSplitError, dataset_settings, load_dataset, same_item_shape
from ..data.sources import count_split
from ..denoiser import Denoiser
from ..evaluate import mmd_with_reference
from ..guidance import make_guidance
from ..metrics import ratio_interval
from ..mirror import (
    MirrorMap,
    NAMMLoss,
    assimilate,
    batched_distance,
    build_mirror,
    data_violation,
    finetune_inverse,
    first_rows,
    fit_mirror_map,
    frames,
    load_mirror,
    mirror_generate,
    sparse_points,
    train_diffusion,
)
from ..mirror.fit import MIRROR_TRAIN, check_fittable_inverse, off_set_warning
from ..mirror.objective import check_fitting_loss
from ..mirror.plots import draws_maps, plot_violation_grid, violation_maps
from ..models import load_denoiser
from ..nets import build_net
from ..plots import plot_histograms, plot_loss_curve
from ..sample import generate
from ..schedule import Schedule
from ..train import TrainConfig, list_checkpoints
from ..userfile import UntrustedCode
from .common import (
    RESULT_DIRS,
    add_device_arg,
    check_denoising_net,
    check_out_dir,
    json_table,
    model_for_shape,
    pick_device,
    remove_results,
    run_kind,
    train_config,
    warn_constant,
    with_step_results,
)
from .config import (
    ConfigError,
    apply_settings,
    check_sample,
    data_ref,
    merge,
    parse_override,
    read_toml,
    set_path,
    value_at,
)

SECTIONS = (
    "data",
    "mirror",
    "loss",
    "mirror_train",
    "model",
    "schedule",
    "train",
    "sample",
    "finetune",
    "guide",
    "assimilate",
)

# --- settings ----------------------------------------------------------------------------------

_BASE: dict[str, Any] = {
    "data": {"seed": 0},
    "mirror": {
        "a": 0.9,
        # the paper's L = 3 (the ICNN's layers count the activations z_0 .. z_L: L + 1)
        "psi": {"name": "icnn", "layers": 4},
        "inverse": {"name": "resnet", "downsamples": 2},
    },
    "loss": {"l_cyc": 1.0, "l_con": 1.0, "l_reg": 1e-3, "sigma_max": 0.1},
    "mirror_train": {**MIRROR_TRAIN, "betas": list(MIRROR_TRAIN["betas"])},
    "model": {"name": "unet", "num_res": 1},
    "schedule": {"kind": "linear", "T": 1000},
    "train": {"warmup": 100, "ema_decay": 0.999, "ckpt_every": 1000},
    "sample": {"eta": 1.0, "seed": 0, "batch_size": 256},
    "finetune": {"seed": 1},
    # the comparison row "vanilla DM + constraint guidance": the vanilla DM sampled with the constraint
    # distance as a guidance loss (rate 0.1 chosen on a selection draw, docs/namm.md)
    "guide": {"method": "dsg+dps", "rate": 0.1, "interval": 1},
    "assimilate": {"eta": 1.0, "seed": 0, "constraint_weight": 200.0, "zeta": 0.05},
}

PROFILES: dict[str, dict[str, Any]] = {
    # 16x16, tiny nets: the CPU benchmark profile (minutes per data set on one core). The inverse net
    # keeps full resolution (no downsampling): with 16 base filters, two stride-2 stages leave 4x4
    # maps and f cannot see (nor remove) pixel-scale errors, so it stays near the identity.
    # Its ICNN is one layer shallower than the paper's (PROFILE_FAMILIES for the flow and count): the
    # depth its recorded table was measured with, found on 2026-12-05 to be one short of the paper's.
    "quick": {
        "data": {"size": 16, "n_train": 2000, "n_test": 256},
        "mirror": {"psi": {"filters": 16, "layers": 3}, "inverse": {"base": 16, "blocks": 2, "downsamples": 0}},
        "mirror_train": {"steps": 1200, "lr": 1e-3, "ckpt_every": 500},
        "model": {"base": 16, "mults": [1, 2, 2]},
        "train": {"steps": 1500, "batch_size": 32, "lr": 2e-3, "ema_decay": 0.995, "ckpt_every": 500},
        "sample": {"n": 256, "steps": 50},
        "finetune": {"n": 256, "steps": 500},
        # 10x fewer DPS steps than the paper, so a 5x larger zeta; the paper's constraint weight 200
        # then overshoots (residual 3.8 sigma_y, l 7x DPS's on Burgers), 20 is the best of {200, 20, 2}
        "assimilate": {"n": 16, "steps": 100, "zeta": 0.25, "constraint_weight": 20.0},
    },
    # 32x32, small nets: the CLI default (tens of minutes per data set on a CPU)
    "default": {
        "data": {"size": 32, "n_train": 2000, "n_test": 500},
        "mirror": {"psi": {"filters": 32}, "inverse": {"base": 32, "blocks": 4}},
        "mirror_train": {"steps": 3000, "lr": 3e-4},
        "model": {"base": 32, "mults": [1, 2, 2]},
        "train": {"steps": 10000, "batch_size": 64, "lr": 1e-3},
        "sample": {"n": 256, "steps": 100},
        "finetune": {"n": 1024, "steps": 1000},
        "assimilate": {"n": 16, "steps": 250, "zeta": 0.2},
    },
    # 64x64 with the paper's networks: for a GPU
    "full": {
        "data": {"size": 64, "n_train": 5000, "n_test": 500},
        "mirror": {"psi": {"filters": 32}, "inverse": {"base": 64, "blocks": 6}},
        "mirror_train": {"steps": 20000, "lr": 2e-4, "ckpt_every": 2000},
        "model": {"base": 64, "mults": [1, 2, 2, 2]},
        "train": {"steps": 50000, "batch_size": 64, "lr": 2e-4, "warmup": 1000, "ckpt_every": 5000},
        "sample": {"n": 256, "steps": 1000},
        "finetune": {"n": 12800, "steps": 5000},
        "assimilate": {"n": 32, "steps": 1000, "zeta": 0.05},
    },
}

# Per data set (as in the NAMM paper): loss weights, ICNN depth, periodic padding, the assimilation task.
# The inverse net drops instance norm where the constraint depends on absolute levels (a total flux,
# Burgers' advection speed, source amplitudes, a velocity's divergence): instance norm hides them
# from the correction f(y) - y (condiff.nets.resnet). The brightness distance is a sum over pixels,
# so its weight is scaled by the pixel count to keep the paper's balance (0.01 at 64x64).
_NO_NORM = {"inverse": {"norm": "none"}}
FAMILIES: dict[str, dict[str, Any]] = {
    "brightness": {
        "loss": {"l_con": 0.01},
        # a total flux is a sum over the whole image: the inverse net needs the global branch
        "mirror": {"inverse": {"norm": "none", "context": True}},
        "assimilate": {"obs": "points", "fraction": 0.1, "noise": 0.05},
    },
    "burgers": {
        "loss": {"l_con": 1.0},
        "mirror": _NO_NORM,
        "assimilate": {"obs": "rows", "fraction": 0.25, "noise": 0.2},
    },
    "kolmogorov": {
        "loss": {"l_con": 1.0, "sigma_max": 0.5},
        # instance norm cost 25x here (quick profile: l 0.022 vs 0.00085 after fine-tuning)
        "mirror": {"psi": {"layers": 3}, **_NO_NORM},  # the paper's L = 2
        "model": {"circular": True},
        "assimilate": {"obs": "points", "fraction": 0.1, "noise": 0.05},
    },
    "periodic": {
        "loss": {"l_con": 1.0},
        "model": {"circular": True},
        "assimilate": {"obs": "points", "fraction": 0.1, "noise": 0.05},
    },
    "count": {
        "loss": {"l_con": 0.01},
        "mirror": {"psi": {"layers": 3}, **_NO_NORM},  # the paper's L = 2
        "assimilate": {"obs": "points", "fraction": 0.1, "noise": 0.05},
        # its distance is carried by whole-source misses in a few samples: on 256 the quick profile's
        # reduction had a 90% interval of 3.0x to 5.3x (the other data sets' are within +-10%)
        "sample": {"n": 1024},
    },
}
# 8 sources do not fit a 16x16 image at the generator's 4-pixel separation
PROFILE_FAMILIES = {
    "quick": {
        # l_con 1 (not the paper's 0.01, where the constraint term is 4x below the cycle term and f
        # stays the identity) for the fitting, and a long fine-tuning: f only sees wrong counts in MDM
        # samples. A plain f did not learn to repair them (a stronger weight bought CNN distance with a
        # glow, the realism term with partial sources); an informed f, given l and grad(l^2 / 2), adds
        # whole sources. Zero padding, as the sources keep off the border (with circular padding f put
        # new ones across the edge); l_con 30 with a stronger critic (l_adv 3) against the streaks a
        # larger weight alone draws: the ninth look of docs/namm-count.md. The tenth: a larger inverse
        # net (32 filters, 4 blocks, one downsampling; the 16-filter one could not repair and partial
        # sources fooled the counter) fine-tuned on the paper's 12,800 MDM samples (on 2048 it learned
        # its pool: distance 0.013 on the pool against 0.11 on fresh samples)
        "count": {"data": {"k": 4}, "loss": {"l_con": 1.0},
                  "finetune": {"n": 12800, "steps": 8000, "lr": 2e-4, "batch_size": 32, "informed": True,
                               "loss": {"l_con": 30.0, "l_adv": 3.0}},
                  "mirror": {"psi": {"layers": 2},
                             "inverse": {"base": 32, "blocks": 4, "downsamples": 1, "padding": "zeros"}}},
        "kolmogorov": {"mirror": {"psi": {"layers": 2}}},  # one shallower than the paper, as above
        # the global branch learns a precise total only with a longer, decaying schedule: at 1200
        # constant-lr steps f's pixel errors (cycle MSE 1.8e-4) doubled the MDM's MMD (docs/namm.md)
        "brightness": {"loss": {"l_con": 0.01 * (64 / 16) ** 2},
                       "mirror_train": {"steps": 3000, "lr_decay": "cosine"}},
        # the tiny 16x16 inverse net needs a stronger pull to the set, and its precision near the set
        # (where the MDM's errors are) improves with a smaller sigma_max (docs/namm.md, "Diagnosis");
        # that precision is what limits Burgers, so its inverse net is larger here (32 filters,
        # 4 blocks) and trained longer with a decaying rate; fine-tuning on 2048 MDM samples for 3000
        # steps (not 256 for 500) took the reduction from 3.6x to 5.4x, 6000 steps to 7.9x on that run's
        # map; a rebuild's map gave 5.5x and 7.2x with two pool seeds at 6000 steps, 8.4x and 10.9x
        # at 12000 (docs/namm.md)
        "burgers": {"loss": {"l_con": 10.0, "sigma_max": 0.03},
                    "mirror": {"inverse": {"base": 32, "blocks": 4}},
                    "mirror_train": {"steps": 4000, "lr_decay": "cosine"},
                    "finetune": {"n": 2048, "steps": 12000}},
        # fine-tuning 3000 steps on 2048 MDM samples (not 500 on 256) took periodic from 5.4x to 16.4x
        # at the same MMD (docs/namm.md)
        "periodic": {"finetune": {"n": 2048, "steps": 3000}},
    },
    "default": {"brightness": {"loss": {"l_con": 0.01 * (64 / 32) ** 2}}},
}
# the setting a finished stage can grow (more training from its last checkpoint, not a new stage): `--set
# train.steps=3000` trains both diffusion models on (--fresh trains anew whatever it redoes)
EXTENDABLE = {"namm": "mirror_train.steps", "mdm": "train.steps", "vanilla": "train.steps",
              "finetune": "finetune.steps"}

# each trained stage's loss.png: its title, the log's curves it draws (key: legend text) and their axis label
_MIRROR_TERMS = {"loss": "loss (the weighted sum)", "cyc": "cycle terms", "con": "constraint l(f(y))",
                 "reg": "|grad Psi| (regulariser)", "adv": "realism (critic)"}
STAGE_CURVES = {
    "namm": ("the mirror map's loss and its unweighted terms", _MIRROR_TERMS, "value"),
    "finetune": ("the fine-tuned inverse map's loss and its unweighted terms", _MIRROR_TERMS, "value"),
    "mdm": ("the mirror diffusion model", {"loss": "loss"}, "denoising loss on g(x)"),
    "vanilla": ("the vanilla diffusion model", {"loss": "loss"}, "denoising loss"),
}

STAGES_KEPT = "finished stages are kept and an unfinished one resumes from its newest checkpoint: rerun the command"
SETS_KEPT = ("finished stages and sample sets are kept (a stage cut short resumes from its newest checkpoint, a "
             "sample set is drawn again): rerun the command")
GENERIC_ASSIMILATION = {"obs": "points", "fraction": 0.1, "noise": 0.05}


def resolve(
    data: str,
    profile: str = "default",
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    constraint: str | None = None,
) -> dict:
    """Settings for a NAMM run: base < profile < data family < TOML ``file`` < ``overrides``."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {list(PROFILES)}")
    cfg = preset(data, profile)
    # the generators' size and counts mean nothing to a user's file, nor to a registered set (digits)
    # whose loader does not take them
    cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in unused_generator_keys(data)}
    hint = None if overrides else "leave out --config for the profile's settings"
    cfg = apply_settings(cfg, read_toml(file, SECTIONS, hint) if file else {},
                         [parse_override(o, SECTIONS, nested=True) for o in overrides or []], str(file))
    refuse_unused_generator_keys(data, cfg["data"])
    cfg["data"]["name"] = data_ref(data)
    if constraint:
        cfg["data"]["constraint"] = parse_python_spec(constraint) or constraint
    cfg["profile"] = profile
    return json.loads(json.dumps(cfg))  # plain JSON types, so stage settings compare equal after a reload


# --- a run directory, stage by stage -----------------------------------------------------------


class StageMismatch(RuntimeError):
    pass


def comparable(spec: Any) -> Any:
    """A stage's settings as they are compared: without the constraint for a stage that never uses it (the
    vanilla DM, whose data load without it), and without generator settings its data do not take (which
    runs made before they were refused may record). A constraint file of one's own keeps its path: the
    file's sha256 does not cover what it may read beside it."""
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), dict):
        return spec
    unused = unused_generator_keys(spec["data"].get("name"))
    drop = unused if "mirror" in spec else (*unused, "constraint")
    if not any(k in spec["data"] for k in drop):
        return spec
    return {**spec, "data": {k: v for k, v in spec["data"].items() if k not in drop}}


GENERATOR_KEYS = ("size", "n_train", "n_test")  # settings of the built-in generators' output


def unused_generator_keys(data: Any) -> tuple[str, ...]:
    """The generator settings that data set ``data`` does not take (all of them for a file of one's own)."""
    takes = dataset_settings(data) if isinstance(data, str) and data in DATASETS else []  # None: any setting
    return () if takes is None else tuple(k for k in GENERATOR_KEYS if k not in takes)


def refuse_unused_generator_keys(data: Any, given: dict) -> None:
    """Refuse generator settings in ``given`` that ``data`` does not take (recorded, and ignored, they were)."""
    if unused := [k for k in unused_generator_keys(data) if k in given]:
        raise ConfigError(f"data.{unused[0]} sets a built-in generator's output; {data} does not take it (its "
                          "items keep their own shape and number)")


def spec_digest(spec: Any) -> str:
    """A short fingerprint of a stage's settings as they are compared (:func:`comparable`): what a result
    records of each stage it was made from, so that ``condiff show`` can tell one made from a stage since
    replaced."""
    return hashlib.sha256(json.dumps(comparable(spec), sort_keys=True).encode()).hexdigest()[:16]


# the stages each sample set is made from (the last is the one it is drawn with)
SET_STAGES = {"vanilla": ("vanilla",), "mdm": ("namm", "mdm"), "mdm_ft": ("namm", "mdm", "finetune"),
              "guided": ("vanilla",)}


def finetune_flags(begun: dict, now: dict) -> list[str] | None:
    """The ``--set`` flags with which ``namm finetune`` goes on with a fine-tuning begun with settings
    ``begun`` (its stage.json spec) where they are now ``now`` (a spec of the same form): none where the
    two agree, None where no flags can: a stage it is made from has changed since (only --fresh goes on),
    or a setting to give back is not a number or was not there before."""
    own = ("finetune", "sampler")
    if any(begun.get(k) != now.get(k) for k in set(begun) | set(now) if k not in own):  # (as values: 2 is 2.0)
        return None
    flags = []
    for table in own:
        was, is_ = begun.get(table) or {}, now.get(table) or {}
        paths = set(_leaf_paths(was)) | set(_leaf_paths(is_))
        for path in sorted(paths):
            v, w = _at(was, path), _at(is_, path)
            if v == w:
                continue
            if not isinstance(v, (int, float, bool)):  # (a missing key cannot be given back with --set)
                return None
            flags.append(f"--set {'sample' if table == 'sampler' else table}.{'.'.join(path)}={json.dumps(v)}")
    return flags


# the sections of the settings each stage is made with itself (the rest come from the stages it is made from)
OWN_SECTIONS = {"namm": ("mirror", "loss", "mirror_train"), "mdm": ("model", "schedule", "train"),
                "vanilla": ("model", "schedule", "train"), "finetune": ("finetune",)}


def _made_with(old: dict, now: dict, changed: list[str], stage: str = "") -> str:
    """What a stage's settings were where they differ from the command's (``changed``: dotted keys, the pool's
    sampler as ``sample.*``): the old values of plain settings, with the ``--set`` that takes them where the
    setting is the stage's own (one of a stage it is made from would only move the mismatch there), and for an
    edited constraint file, which file."""
    said, back = [], []
    for key in changed[:4]:
        path = tuple(key.split("."))
        stored = ("sampler", *path[1:]) if path[0] == "sample" else path
        was, is_ = _at(comparable(old), stored), _at(comparable(now), stored)
        if key == "constraint.file_sha256":
            file = _at(old, ("data", "constraint", "path"))
            said.append(f"the constraint file{f' {file}' if file else ''} was edited since the stage was made: put "
                        "back the version it was made with to use it")
        elif not isinstance(was, (dict, list)) and not isinstance(is_, (dict, list)) and was is not None:
            said.append(f"made with {key}={json.dumps(was)}, now {json.dumps(is_)}")
            if path[0] in OWN_SECTIONS.get(stage, SECTIONS):  # (sample.*: the fine-tuning's own hint says it)
                back.append(f"--set {key}={json.dumps(was)}")
    if back:
        said.append(f"{' '.join(back)} takes the stage as made")
    return f" ({'; '.join(said)})" if said else ""


def _at(table: Any, path: tuple[str, ...]) -> Any:
    """``table[path[0]][path[1]]...``; None where the path is missing."""
    for part in path:
        table = table.get(part) if isinstance(table, dict) else None
    return table


def stages_of(sets: Any) -> list[str]:
    """The stages the sample sets ``sets`` are made from, each once, in the order they are made."""
    return list(dict.fromkeys(s for w in sets if w in SET_STAGES for s in SET_STAGES[w]))


def same_spec(old: Any, new: Any) -> bool:
    """Whether a stage recorded with settings ``old`` serves settings ``new`` (:func:`comparable`)."""
    return old is not None and comparable(old) == comparable(new)


class NAMMRun:
    """The stages of one NAMM experiment in ``root``, each reused when finished with the same settings.

    ``fresh``: replace stages made with other settings (the benchmark's behaviour) instead of failing.
    """

    def __init__(
        self, root: str | Path, cfg: dict, device: str = "cpu", fresh: bool = False, progress: bool = True,
        saved_by: str | None = None,
    ) -> None:
        """``saved_by``: what ``cfg`` was read from (a run's config.json), where code of one's own that it names
        (a constraint or a net, ``FILE.py:NAME``) runs only if trusted (:func:`condiff.userfile.load_from_file`)."""
        self.root, self.cfg, self.device, self.fresh, self.progress = Path(root), cfg, device, fresh, progress
        self.saved_by = saved_by
        self._data: dict[str, ArrayData] = {}
        self._constraint: Constraint | None = None
        self.timings: dict[str, float] = {}
        # stage -> how the command at hand can do without it ("--no-finetuned leaves it out")
        self.skip_hints: dict[str, str] = {}
        self.resuming = False  # `namm fit --resume`: its settings are the recorded ones
        self.data_checked = False  # `namm fit`: the data measured against the constraint (data_violation) already
        self.check()

    def check(self) -> None:
        """Refuse bad training and loss settings of every stage now, not after the stages before
        them have trained (a ``ValueError`` naming the setting)."""
        self._tcfg(self.cfg["mirror_train"], section="mirror_train")
        self._tcfg(self.cfg["train"])
        self._tcfg(self._finetune_train(), section="finetune")
        check_fitting_loss(NAMMLoss.from_dict(self.cfg["loss"]))  # the fitting checks it too, once it starts
        self.finetune_loss()
        check_fittable_inverse(self.cfg["mirror"]["inverse"])  # before the check below, which would blame informed
        if self.informed() and (name := self.cfg["mirror"]["inverse"].get("name", "resnet")) != "resnet":
            raise ValueError(f"finetune.informed needs the 'resnet' inverse network (mirror.inverse.name), got "
                             f"{name!r}")
        n = self.cfg["finetune"].get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"finetune.n (the pool of MDM samples) must be an integer >= 1, got {n!r}")
        if unknown := sorted(set(self.cfg["mirror"]) - {"psi", "inverse", "a"}):
            raise ValueError(f"unknown mirror setting(s) {unknown}; known: ['a', 'inverse', 'psi']")
        a = self.cfg["mirror"]["a"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
            raise ValueError(f"mirror.a (g's strong-convexity weight) must be in (0, 1), got {a!r}")
        check_sample(self.cfg["sample"])
        if self.cfg["sample"].get("n", 2) < 2:
            raise ValueError(f"sample.n must be >= 2 (the MMD to held-out data needs two samples), got "
                             f"{self.cfg['sample']['n']}: --set sample.n=N sets another")
        check_assimilate(self.cfg["assimilate"])
        T = Schedule.from_config(self.cfg["schedule"]).T
        for key in ("sample", "assimilate"):  # each samples with the run's T-step schedule, later
            steps = self.cfg[key].get("steps")
            if isinstance(steps, int) and steps > T:
                raise ValueError(f"{key}.steps must be <= schedule.T = {T}, got {steps}")
        guide = self.cfg["guide"]
        if not isinstance(guide, dict) or "method" not in guide:
            raise ValueError(f"guide must be a table with a method, got {guide!r}")
        try:  # built once on a stand-in loss: the settings are the guidance's to check
            make_guidance(guide["method"], lambda x: x.flatten(1).sum(1),
                          **{k: v for k, v in guide.items() if k != "method"})
        except (ValueError, TypeError) as e:
            raise ValueError(f"[guide] settings: {e}") from None

    def preflight(self, stages: list[str]) -> None:
        """Before a command trains or changes anything: the data load, the constraint builds, and each
        of ``stages`` is either finished with these settings or can run: not made with other
        settings (unless ``fresh``), and its nets accept the data (one forward pass on one sample)."""
        if len(self.shape) != 3:
            raise ValueError(f"data {self.cfg['data']['name']}: NAMM's mirror maps are convolutional and take images "
                             f"(C, H, W); these samples have shape {self.shape}")
        x = self.data().x[:1].to(self.device)
        with contextlib.suppress(NoSplitError):  # the held-out split's size and shape, before any stage trains
            self.data("test")
        # the constraint's distance and violation map on training samples: a broken one fails here, not
        # after a stage has been discarded (--fresh) or trained and sampled
        check_distance(self.constraint(), self.data().x[:2].to(self.device), on=" on two training samples")
        violation_maps(self.constraint(), x)
        net_checked = False
        for name in stages:
            old = self._old_spec(name)
            spec = self.spec(name)
            if old is not None and same_spec(old.get("spec"), spec) and old.get("done"):
                continue
            # as _stage decides: a stage of other settings is redone only with --fresh, or where it holds
            # nothing to lose (a finished stage of these settings set aside by a --fresh is then put back)
            if (old is not None and not same_spec(old.get("spec"), spec) and not self.fresh
                    and not self._holds_nothing(name, old) and self._extension(name, old) is None
                    and self._before_extension(name, old, spec) is None):
                raise StageMismatch(self._mismatch_message(name))
            with torch.no_grad():
                if name == "namm":
                    m = self.cfg["mirror"]
                    mirror = build_mirror(self.shape, m["psi"], m["inverse"], m["a"], saved_by=self.saved_by).to(
                        self.device)
                    mirror.inverse_map(x)
                elif name in ("mdm", "vanilla") and not net_checked:  # one net for both: checked once, as `train`
                    net = build_net(model_for_shape(self.cfg["model"], tuple(self.shape), self.saved_by),
                                    self.saved_by)
                    check_denoising_net(net, self.data().x[:2], device=self.device)
                    net_checked = True

    # -- settings and stage bookkeeping
    def spec(self, stage: str) -> dict:
        c = self.cfg
        data = {"data": c["data"]}
        learned = self.constraint().learned_parts()
        specs = {
            "namm": {
                **data,
                "mirror": c["mirror"],
                "loss": c["loss"],
                "mirror_train": c["mirror_train"],
                **({"constraint": learned} if learned else {}),
            },
            "vanilla": {**data, "model": c["model"], "schedule": c["schedule"], "train": c["train"]},
        }
        specs["mdm"] = {**specs["namm"], **specs["vanilla"]}
        specs["finetune"] = {
            **specs["mdm"],
            "finetune": c["finetune"],
            "sampler": {k: c["sample"][k] for k in ("steps", "eta")},
        }
        return specs[stage]

    def made_from(self, stages: list[str]) -> dict[str, str]:
        """What a result records of the stages it was made from (:func:`spec_digest` of each one's settings as its
        stage.json records them, which ``condiff show`` compares: a setting recorded as 2 and now read as 2.0 is
        the same stage, but not the same text)."""
        out = {}
        for name in stages:
            old = (self._old_spec(name) or {}).get("spec")
            out[name] = spec_digest(old if same_spec(old, self.spec(name)) else self.spec(name))
        return out

    def _old_spec(self, name: str) -> dict | None:
        """The stage's ``stage.json`` (None when the stage was never started); a corrupted one is
        reported, or, with ``fresh``, read as a stage made with other settings."""
        f = self.root / name / "stage.json"
        if not f.is_file():
            return None
        try:
            old = json.loads(f.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if self.fresh:
                return {"spec": None}
            raise StageMismatch(f"{f} is corrupted ({e}); pass --fresh to redo the stage") from None
        return old

    def _mismatch_message(self, name: str) -> str:
        record = self._old_spec(name) or {}
        old = record.get("spec")
        changed = changed_keys(comparable(old), comparable(self.spec(name))) if isinstance(old, dict) else []
        # the stage records the pool's sampler as "sampler"; the user sets it as sample.steps / sample.eta
        changed = [f"sample.{k[len('sampler.'):]}" if k.startswith("sampler.") else k for k in changed]
        hint = f" ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''} differ)" if changed else ""
        if isinstance(old, dict) and record.get("done"):  # (an unfinished one: the hints below say how to go on)
            hint += _made_with(old, self.spec(name), changed, name)
        if name == "finetune" and any(k.startswith("sample.") for k in changed):
            skip = self.skip_hints.get("finetune", "--no-finetuned leaves it out")
            was_sampler = old.get("sampler") if isinstance(old.get("sampler"), dict) else {}
            back = " ".join(f"--set sample.{k}={v}" for k, v in sorted(was_sampler.items())
                            if f"sample.{k}" in changed)  # e.g. left in config.json by an earlier --set
            hint += (f" (the fine-tuning pool is drawn with sample.steps and sample.eta; {skip}"
                     + (f"; {back} samples with the fine-tuned map again" if back else "") + ")")
        profile = json_table(self.root / "config.json").get("profile")
        if isinstance(profile, str) and profile != self.cfg.get("profile"):  # a rerun that left out --profile quick
            hint += f" (this run was fitted with --profile {profile}; this command asks for {self.cfg.get('profile')})"
        was = (old.get("mirror") or {}).get("psi", {}).get("layers") if "mirror.psi.layers" in changed else None
        if isinstance(was, int) and profile == self.cfg.get("profile"):  # the profiles' ICNN grew to the paper's depth
            hint += " (the default and full profiles build the paper's ICNN depth since 2026-12-05)"
        ext = record.get("extends")
        if isinstance(ext, dict) and not record.get("done") and name in EXTENDABLE and isinstance(old, dict):
            key = EXTENDABLE[name]
            to = _at(old, tuple(key.split(".")))
            hint += f" (an extension from step {ext.get('from')} to {to} was begun: --set {key}={to} goes on with it)"
        kept = self.root / io.REPLACED / name
        go_on = ""
        if isinstance(old, dict) and not record.get("done") and name == "finetune":  # no --resume of its own
            if sets := finetune_flags(old, self.spec(name)):
                go_on = (f"; `condiff namm finetune --run {self.root} {' '.join(sets)}` goes on with the settings it "
                         "was begun with")
        if same_spec(self._kept_spec(name), self.spec(name)):  # an unfinished --fresh of other settings
            return (f"{self.root / name} holds an unfinished stage of other settings{hint}, with checkpoints; "
                    f"{kept} keeps the finished stage of these settings that it was to replace: move that back "
                    f"over {self.root / name} to use it, or pass --fresh to redo the stage{go_on}")
        if (isinstance(old, dict) and not record.get("done") and name != "finetune"
                and not self.resuming):
            go_on = f"; `condiff namm fit --out {self.root} --resume` goes on with the settings it was begun with"
        return (f"{self.root / name} was made with other settings{hint}; pass --fresh to redo it, "
                f"or use another --out / --run{go_on}")

    def _extension(self, name: str, old: dict | None) -> tuple[int, int] | None:
        """``(from, to)`` where the finished stage ``name`` differs from these settings only by more training
        steps (:data:`EXTENDABLE`) and holds the checkpoint it finished at, or a later one of an extension cut short:
        it trains on from the newest."""
        prev = (old or {}).get("spec")
        if name not in EXTENDABLE or not (old or {}).get("done") or not isinstance(prev, dict):
            return None
        key = EXTENDABLE[name]
        if changed_keys(comparable(prev), comparable(self.spec(name))) != [key]:
            return None
        a, b = _at(prev, tuple(key.split("."))), _at(self.spec(name), tuple(key.split(".")))
        if not (checks.is_integer(a, 1) and checks.is_integer(b, 1) and b > a):
            return None
        ckpts = list_checkpoints(self.root / name / "checkpoints")  # the newest: where it finished, or where an
        newest = int(ckpts[-1].name.split("_")[-1]) if ckpts else -1  # extension cut short had got to
        return (newest, int(b)) if a <= newest < b else None  # (it trains on from the newest)

    def _before_extension(self, name: str, old: dict | None, spec: dict) -> dict | None:
        """The finished record of stage ``name`` as it was before an extension that stopped unfinished, where these
        settings ``spec`` are that stage's and its model was never replaced; else None."""
        was = (old or {}).get("extends")
        if not (isinstance(was, dict) and not old.get("done") and same_spec(was.get("spec"), spec)):
            return None
        steps = _at(was["spec"], tuple(EXTENDABLE[name].split("."))) if name in EXTENDABLE else None
        saved = [json_table(self.root / name / m / io.CONFIG) for m in ("model", "mirror")
                 if (self.root / name / m / io.CONFIG).is_file()]  # and still the model it finished with, not the
        ok = bool(saved) and all(c.get("steps") == steps for c in saved)  # extension's (saved, stage.json not yet)
        return {k: v for k, v in was.items() if k != "from"} if ok else None

    def _holds_nothing(self, name: str, old: dict) -> bool:
        """Whether a stage is unfinished and holds no checkpoint (it failed before its first): nothing to lose."""
        return not old.get("done") and not any((self.root / name).rglob("step_*"))

    def _kept_spec(self, name: str) -> dict | None:
        """The settings of the finished stage ``name`` that an unfinished --fresh set aside in ``.replaced``."""
        f = self.root / io.REPLACED / name / "stage.json"
        kept = json_table(f) if f.is_file() else {}
        return kept.get("spec") if kept.get("done") else None

    def _restore_kept(self, name: str, spec: dict) -> bool:
        """Put back a finished stage of these settings that a failed --fresh set aside, in place of the failed
        attempt (which holds nothing, or was never started): rerunning the command that made it recovers it."""
        old = self._old_spec(name)
        if not same_spec(self._kept_spec(name), spec) or (old is not None and (same_spec(old.get("spec"), spec)
                                                                 or not self._holds_nothing(name, old))):
            return False
        d = self.root / name
        io.restore_replaced(self.root, [name])
        print(f"restored {d}: the finished stage of these settings that an unfinished --fresh had set aside",
              file=sys.stderr)
        return True

    def _stage(self, name: str, spec: dict, replace: bool = False) -> tuple[Path, bool]:
        """The stage directory and whether it is finished; clears one made otherwise when ``fresh``,
        ``replace`` (outputs such as samples, cheap to redo) or it holds no checkpoint, else refuses it.
        A finished stage of these settings that a failed ``--fresh`` set aside is put back first."""
        d = self.root / name
        f = d / "stage.json"
        if not self.fresh:
            io.discard_moving(self.root)  # a set-aside cut short: the stages go on as they lie
            self._restore_kept(name, spec)
        old = self._old_spec(name)
        if not self.fresh and (grow := self._extension(name, old)) is not None:  # (--fresh trains anew)
            # the finished record is kept: an extension cut short gives the stage back as it was when asked for
            io.write_json_atomic(f, {"spec": spec, "done": False, "extends": {**old, "from": grow[0]}})
            print(f"extending {d}: from step {grow[0]} (its last checkpoint) to {grow[1]}", file=sys.stderr)
            return d, False
        if (was := self._before_extension(name, old, spec)) is not None:
            io.write_json_atomic(f, was)  # its model was never replaced
            print(f"note: {d} is the stage as it was before its extension, which stopped unfinished (its later "
                  "checkpoints stay: extending it again goes on from the newest)", file=sys.stderr)
            return d, True
        if old is not None:
            if same_spec(old.get("spec"), spec):
                if not old.get("done") and (self.root / io.REPLACED / name).is_dir():
                    print(f"note: {self.root / io.REPLACED / name} keeps the stage an unfinished --fresh replaced; "
                          "it is deleted when this one finishes", file=sys.stderr)
                return d, bool(old.get("done"))
            # a stage that failed before its first checkpoint holds nothing to lose: a retry with other
            # settings replaces it, where it used to be refused as "made with other settings"
            nothing_kept = self._holds_nothing(name, old)
            if not (self.fresh or replace or nothing_kept):
                raise StageMismatch(self._mismatch_message(name))
            if replace or nothing_kept:
                shutil.rmtree(d)
            elif io.set_aside(self.root, [name]):  # --fresh: kept until the stage replacing it finishes
                print(f"--fresh: the stage being replaced is kept in {self.root / io.REPLACED / name} until "
                      "this one finishes", file=sys.stderr)
        d.mkdir(parents=True, exist_ok=True)
        io.write_json_atomic(f, {"spec": spec, "done": False})
        return d, False

    def _clock(self, name: str) -> float:
        """``time.perf_counter()`` set back by the training time of stage ``name``'s earlier sessions (its
        newest checkpoint's), so that the ``seconds`` of a stage resumed after a stop cover every session."""
        steps = list_checkpoints(self.root / name / "checkpoints")
        earlier = json_table(steps[-1] / io.CONFIG).get("train_seconds", 0) if steps else 0
        return time.perf_counter() - (float(earlier) if checks.is_number(earlier) else 0.0)

    def _finish(self, name: str, spec: dict, seconds: float, **extra) -> None:
        if name in STAGE_CURVES:  # a trained stage draws its curves beside its log (before it counts as finished)
            what, labels, ylabel = STAGE_CURVES[name]
            plot_loss_curve(self.root / name / "log.jsonl", self.root / name / "loss.png", keys=tuple(labels),
                            ylabel=f"{ylabel} (mean over the log interval)", title=f"{name}: {what}", labels=labels)
        was = json_table(self.root / name / "stage.json").get("extends")
        if isinstance(was, dict) and "from" in was:  # trained on from a finished stage: said (show, benchmarks)
            extra = {"extended_from": was["from"], **extra}
        io.write_json_atomic(
            self.root / name / "stage.json",
            {"spec": spec, "done": True, "seconds": round(seconds, 2), **extra},
        )
        io.drop_replaced(self.root, [name])
        # the run's config.json takes the settings the stage was made with now, not when the command ends:
        # a command that fails later (scoring, say) left a stage its config.json did not describe
        on_disk = json_table(self.root / "config.json")
        if on_disk:
            made = {k: self.cfg[k] for k in spec if k in self.cfg}
            if isinstance(spec.get("sampler"), dict):  # the fine-tuning pool's sample.steps and sample.eta
                made["sample"] = {**(on_disk.get("sample") or {}), **spec["sampler"]}
            if any(on_disk.get(k) != v for k, v in made.items()):
                io.write_json_atomic(self.root / "config.json", {**on_disk, **made})
        self.timings[name] = round(seconds, 2)

    def _reuse(self, name: str, spec: dict, load):
        """The stage directory and ``load(dir)`` of a finished stage, or None when it must run. A
        finished stage whose files no longer load is redone under ``fresh``, else named with that hint."""
        d, done = self._stage(name, spec)
        if not done:  # (the caller announces it once the stages it is made from are made: in their order)
            return d, None
        try:
            return d, load(d)
        except UntrustedCode:  # the stage is sound: it names a file of one's own that is not trusted here
            raise
        except (io.CheckpointError, OSError, ValueError) as e:
            if not self.fresh:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise io.CheckpointError(f"the finished stage {d} does not load ({first}); pass --fresh to "
                                         "redo it") from None
            shutil.rmtree(d)
            d = self._stage(name, spec)[0]
            return d, None

    def _announce(self, name: str, d: Path) -> None:
        """One line on stderr before a stage trains (any command makes the stages it needs and lacks),
        with its length and, where the command can do without it, how."""
        what, steps = {"namm": ("the mirror map", self.cfg["mirror_train"]),
                       "mdm": ("the mirror diffusion model", self.cfg["train"]),
                       "vanilla": ("the vanilla diffusion model", self.cfg["train"]),
                       "finetune": ("the inverse map fine-tuned on mirror-model samples",
                                    self._finetune_train())}[name]
        # (from the commands that can do without it; `namm finetune` itself has no skip hint)
        hint = "; `condiff namm finetune` makes it alone" if name == "finetune" and name in self.skip_hints else ""
        hint += f"; {self.skip_hints[name]}" if name in self.skip_hints else ""
        print(f"making {d}: {what}, {steps.get('steps', '?')} steps{hint}", file=sys.stderr, flush=True)

    def _tcfg(self, settings: dict, seed: int = 0, section: str = "train") -> TrainConfig:
        return train_config({"seed": seed, **settings}, section, device=self.device, progress=self.progress)

    # -- data and constraint
    def data_settings(self) -> dict:
        """``name`` and the loader's settings of the run's data set (the constraint left out)."""
        name = self.cfg["data"]["name"]
        kw = {k: v for k, v in self.cfg["data"].items() if k not in ("name", "constraint")}
        # user files keep only the loader's own options; a registered name wins over a file or
        # folder of that name (a run directory `periodic` must not hide the periodic data set)
        if name not in DATASETS and Path(name).exists():
            kw = {}
        return {"name": name, **kw}

    def data(self, split: str = "train") -> ArrayData:
        if split not in self._data:
            kw = self.data_settings()
            name = kw.pop("name")
            data = load_dataset(name, split=split, **kw)  # kept only once checked (a refused split stays refused)
            if split == "train":
                warn_constant(data.x, name)
            if len(data) < 2:  # found before any stage trains, not by namm sample's MMD at the end
                raise DataError(f"{name}: its {split} split holds {len(data)} sample{'s' * (len(data) != 1)}; a NAMM "
                                "run needs at least 2 in each split (namm sample scores its models by the MMD to "
                                "held-out data)")
            if split != "train":  # the models are built for the training split's shape
                same_item_shape({"train": self.data("train"), split: data}, name)
            self._data[split] = data
        return self._data[split]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data("train").shape)

    def constraint(self) -> Constraint:
        if self._constraint is None:
            spec = self.cfg["data"].get("constraint") or self.data("train").meta.get("constraint")
            if spec is None:
                raise ValueError(
                    f"data set {self.cfg['data']['name']!r} names no constraint: pass --constraint"
                )
            self._constraint = build_constraint({"name": spec} if isinstance(spec, str) else spec,
                                                saved_by=self.saved_by, progress=self.progress,
                                                device=self.device).to(self.device)
        return self._constraint

    # -- stages
    def mirror(self) -> MirrorMap:
        """Stage ``namm``: the mirror map (``Psi`` and ``f``) fitted to the training data."""
        spec = self.spec("namm")
        d, done = self._reuse("namm", spec, lambda d: load_mirror(d / "mirror", self.device)[0])
        if done is not None:
            return done
        self._announce("namm", d)
        m = self.cfg["mirror"]
        tcfg = self._tcfg(self.cfg["mirror_train"], section="mirror_train")
        mirror = build_mirror(self.shape, m["psi"], m["inverse"], m["a"], seed=tcfg.seed,  # 0 unless set
                              saved_by=self.saved_by)
        t0 = self._clock("namm")
        out = fit_mirror_map(
            self.data().x,
            self.constraint(),
            mirror,
            tcfg,
            NAMMLoss.from_dict(self.cfg["loss"]),
            d,
            {"constraint": self.constraint().config},
            resume=True,
            check_data=not self.data_checked,
        )
        self._finish("namm", spec, time.perf_counter() - t0)
        return out

    def _diffusion(self, name: str, x_fn) -> Denoiser:
        spec = self.spec(name)
        d, done = self._reuse(name, spec, lambda d: load_denoiser(d / "model", self.device, mirror_space=True))
        if done is not None:
            return done
        x = x_fn()  # (for the mirror DM, the mirror map: made first where it is missing)
        self._announce(name, d)
        net = model_for_shape(self.cfg["model"], tuple(x.shape[1:]), self.saved_by)
        t0 = self._clock(name)
        tcfg = self._tcfg(self.cfg["train"])
        # the vanilla model records its data set (as `condiff train` models do), so that `condiff eval` and
        # `condiff sample` score it on its own; the mirror model's samples are not data
        meta = {"stage": name, **({"data": self.data_settings()} if name == "vanilla" else {})}
        replaced = (d / "model").is_dir()  # a finished model trained on (extended): its results are stale
        den = train_diffusion(x, net, Schedule.from_config(self.cfg["schedule"]), tcfg, d, meta,
                              resume=True, seed=tcfg.seed,  # train.seed seeds the initial weights too
                              saved_by=self.saved_by)
        if replaced:  # what `condiff eval / sample / solve / pnp` wrote of the old model (RESULT_DIRS), and of
            # checkpoints the training has since pruned (those still there are as they were: their results stay)
            gone = tuple(r for r in with_step_results(d, ()) if not (d / "checkpoints" / r.split("_", 1)[1]).is_dir())
            remove_results(d, (*RESULT_DIRS, *gone))
        self._finish(name, spec, time.perf_counter() - t0)
        return den

    def mdm(self) -> Denoiser:
        """Stage ``mdm``: the mirror diffusion model, trained on ``g(x)``."""
        return self._diffusion("mdm", lambda: self.mirror().to_mirror(self.data().x))

    def vanilla(self) -> Denoiser:
        """Stage ``vanilla``: the baseline diffusion model on the data, same net and budget."""
        return self._diffusion("vanilla", lambda: self.data().x)

    def finetune_loss(self) -> NAMMLoss:
        """The fine-tuning's loss: section ``loss`` with ``finetune.loss`` over it (e.g. the realism
        term ``l_adv``, which only fine-tuning has)."""
        extra = self.cfg["finetune"].get("loss", {})
        if not isinstance(extra, dict):
            raise ValueError(f"finetune.loss must be a table of loss weights, got {extra!r}")
        return NAMMLoss.from_dict({**self.cfg["loss"], **extra})

    def _finetune_train(self) -> dict:
        """The fine-tuning's training settings: ``mirror_train`` with ``finetune``'s own over it
        (finetune's other keys: ``n`` and ``seed`` for the pool, ``loss`` for :meth:`finetune_loss`,
        ``informed`` for :meth:`informed`)."""
        ft = self.cfg["finetune"]
        return {**self.cfg["mirror_train"],
                **{k: v for k, v in ft.items() if k not in ("n", "seed", "loss", "informed")}}

    def informed(self) -> bool:
        """``finetune.informed``: the fine-tuned inverse map is also given the constraint's distance and
        gradient at its input (:mod:`condiff.mirror.informed`)."""
        v = self.cfg["finetune"].get("informed", False)
        if not isinstance(v, bool):
            raise ValueError(f"finetune.informed must be true or false, got {v!r}")
        return v

    def finetuned(self) -> MirrorMap:
        """Stage ``finetune``: ``f`` fine-tuned on a pool of MDM samples (its own seed)."""
        spec = self.spec("finetune")
        d, done = self._reuse("finetune", spec, lambda d: load_mirror(d / "mirror", self.device, self.constraint())[0])
        if done is not None:
            return done
        ft = self.cfg["finetune"]
        mirror, den = self.mirror(), self.mdm()
        self._announce("finetune", d)
        t0 = self._clock("finetune")
        _, pool = self._generate(den, int(ft["n"]), int(ft["seed"]), mirror)
        out = finetune_inverse(
            mirror,
            self.data().x,
            pool,
            self.constraint(),
            self._tcfg(self._finetune_train(), section="finetune"),
            self.finetune_loss(),
            d,
            {"constraint": self.constraint().config},
            resume=True,
            informed=self.informed(),
        )
        self._finish("finetune", spec, time.perf_counter() - t0, pool=int(ft["n"]))
        return out

    # -- sampling
    def _generate(
        self, den: Denoiser, n: int, seed: int, mirror: MirrorMap | None = None, **extra
    ) -> tuple[Tensor, Tensor | None]:
        s = self.cfg["sample"]
        kw = dict(
            batch_size=int(s["batch_size"]),
            steps=int(s["steps"]),
            eta=float(s["eta"]),
            generator=torch.Generator(device=self.device).manual_seed(seed),
            device=self.device,
            progress=self.progress,
        )
        kw.update(extra)  # e.g. guidance and clip_x0
        if mirror is None:
            return generate(den, n, self.shape, **kw), None
        return mirror_generate(den, mirror, n, self.shape, **kw)

    def _generate_guided(self, den: Denoiser, n: int, seed: int) -> Tensor:
        """The vanilla DM sampled with the constraint distance as a guidance loss (section ``guide``:
        a method name of :func:`condiff.guidance.make_guidance` and its hyperparameters); ``x0_hat``
        is clipped as in the assimilation (``1.5 max |x|`` of the data), as a distance such as the
        Burgers residual overflows on the first steps' unbounded predictions."""
        hp = dict(self.cfg["guide"])
        guide = make_guidance(hp.pop("method"), self.constraint(), **hp)
        clip = 1.5 * float(self.data().x.abs().max())
        return self._generate(den, n, seed, guidance=guide, clip_x0=clip)[0]

    def samples(self, which: str, n: int | None = None) -> Tensor:
        """``n`` samples (cached in ``samples/``): ``vanilla``, ``mdm`` (f of mirror samples),
        ``mdm_ft`` (the fine-tuned f of the same mirror samples, a paired comparison) or ``guided``
        (the vanilla DM with the constraint as a guidance loss, :meth:`_generate_guided`)."""
        n = int(n or self.cfg["sample"]["n"])
        seed = int(self.cfg["sample"]["seed"])
        if which not in SET_STAGES:
            raise ValueError(f"unknown sample set {which!r}; expected one of {list(SET_STAGES)}")
        spec = {"up": self.spec(SET_STAGES[which][-1]), "sample": self.cfg["sample"], "n": n}
        if which == "guided":
            spec["guide"] = self.cfg["guide"]
        # the models first, also for a cached set (whose numbers must belong to models that still
        # load); a failure leaves the old sample set in place, and the stage's time is the sampling
        # alone (each model stage times itself)
        if which in ("vanilla", "guided"):
            den, mirror = self.vanilla(), None
        elif which == "mdm":
            den, mirror = self.mdm(), self.mirror()
        else:
            mirror = self.finetuned()
        old = self._old_spec(f"samples/{which}")
        if old is not None and old.get("spec") == spec and old.get("done"):
            d = self.root / "samples" / which
            try:
                if which == "mdm":  # the mirror samples too: mdm_ft maps them
                    _load_npz(d / "mirror.npz", "y")
                return torch.from_numpy(_load_npz(d / "samples.npz", "x"))
            except ValueError:  # a damaged cache file: draw the set again
                pass
        if which == "mdm_ft":
            self.samples("mdm", n)
        d, _ = self._stage(f"samples/{which}", spec, replace=True)  # e.g. another --n: just redo
        t0 = time.perf_counter()
        if which == "mdm_ft":
            y = torch.from_numpy(_load_npz(self.root / "samples" / "mdm" / "mirror.npz", "y"))
            x = mirror.to_data(y)
        elif which == "guided":
            x = self._generate_guided(den, n, seed)
        else:
            x, y = self._generate(den, n, seed, mirror)
            if y is not None:
                io.write_npz_atomic(d / "mirror.npz", y=y.numpy())
        io.write_npz_atomic(d / "samples.npz", x=x.numpy())
        self._finish(f"samples/{which}", spec, time.perf_counter() - t0)
        return x

    # -- evaluation
    def evaluate(self, which: list[str], n: int | None = None) -> dict[str, dict]:
        """Constraint distance and MMD to held-out data for each sample set, plus the data's own."""
        con = self.constraint()
        test = self.data("test").x
        train = self.data("train").x
        ref = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
        out: dict[str, dict] = {}
        sets = {"data (held-out)": test, **{w: self.samples(w, n) for w in which}}
        for name, x in sets.items():
            dist = batched_distance(con, x, device=self.device)
            rec = {
                "n": len(x),
                "l_mean": float(dist.mean()),
                "l_median": float(dist.median()),
                "l_max": float(dist.max()),
            }
            if isinstance(con, CountConstraint):  # a check that does not rely on the counting CNN
                rec.update(count_split(x, dist, con.k))
            if name != "data (held-out)":
                mm = mmd_with_reference(x, test, ref, constant_ok=True)
                rec.update({k: mm[k] for k in ("mmd", "mmd_ref", "mmd_ratio", "mmd_unavailable") if k in mm})
            out[name] = {**rec, "_l": dist, "_x": x}
        return out


def _load_npz(path: Path, key: str) -> np.ndarray:
    """One array of a cached ``.npz`` (pickles refused); a damaged file is a ValueError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is damaged or not a sample file ({type(e).__name__}): "
                         "pass --fresh to draw it again") from None


ASSIMILATE_HELP = """Data assimilation on held-out truths: mirror DPS against DPS and constraint-guided DPS.

Settings (--set assimilate.KEY=VALUE; kept in the run's config.json once the call succeeds):
  obs                rows (the first time rows), points (random grid points) or frames (whole snapshots)
  fraction           share of rows or points observed, in (0, 1)
  frames             the observed snapshots for obs = frames, e.g. [0, 3]
  noise              measurement noise, relative to the data range
  n                  truths (at most the held-out split's size)
  steps, eta, seed   the samplers' settings
  zeta               DPS step size; constraint_weight: the guided baseline's weight
  clip_x0            x0_hat bound (default 1.5 x the data's largest |x|)
  finetuned          mirror DPS with the fine-tuned inverse map (true) or the fitted one (false)
A stage the run lacks (the fine-tuning, say) is made first, with a line saying so.
Writes RUN/assimilate/assimilation.png (or into --out), samples.npz (truth, y and each method's samples)
and metrics.json (residuals, l(x), RMSE on the unobserved entries, the settings used)."""


ASSIMILATE_KEYS = ("obs", "fraction", "noise", "n", "steps", "zeta", "eta", "seed", "constraint_weight",
                   "clip_x0", "finetuned", "frames")


def check_assimilate(a: dict) -> None:
    """The ``assimilate`` settings: known keys and meaningful values (a ValueError naming the key)."""
    bad = sorted(set(a) - set(ASSIMILATE_KEYS))
    if bad:
        raise ValueError(f"unknown assimilate setting(s) {bad}; known: {list(ASSIMILATE_KEYS)}")

    for key in ("n", "steps"):
        if key in a:
            checks.integer(f"assimilate.{key}", a[key])
    for key, within in (("fraction", "(0, 1]"), ("noise", "> 0"), ("zeta", ">= 0"), ("eta", "[0, 1]"),
                        ("constraint_weight", ">= 0"), ("clip_x0", "> 0")):  # clip_x0 absent: 1.5 max |x|
        if a.get(key) is not None:
            checks.number(f"assimilate.{key}", a[key], within)
    if "seed" in a:
        checks.seed("assimilate.seed", a["seed"])
    if a.get("obs") is not None and a["obs"] not in OBSERVATIONS:
        raise ValueError(f"assimilate.obs must be one of {list(OBSERVATIONS)}, got {a['obs']!r}")
    if "finetuned" in a and not isinstance(a["finetuned"], bool):
        raise ValueError(f"assimilate.finetuned must be true or false, got {a['finetuned']!r}")


# --- observation operators by name (the CLI's strings become objects here) ---------------------

OBSERVATIONS = {
    "rows": lambda shape, a, sigma: first_rows(shape, max(1, round(float(a["fraction"]) * shape[1])), sigma),
    "points": lambda shape, a, sigma: sparse_points(
        shape, float(a["fraction"]), sigma, int(a.get("seed", 0))
    ),
    "frames": lambda shape, a, sigma: frames(shape, a["frames"] if "frames" in a else _default_frames(shape), sigma),
}


def _default_frames(shape: tuple[int, ...]) -> list[int]:
    """The first snapshot and one near the middle, where at least one more is left to infer."""
    f = shape[0] // 2
    if shape[0] % 2:
        return [0]  # not flow samples: frames() says so
    if f < 3:
        raise ValueError(f"obs = frames needs flow samples of at least 3 snapshots (these have {f}; data.frames), "
                         "or assimilate.frames naming the observed ones; observe points instead (--obs points)")
    return [0, max(1, f // 2 - 1)]


def run_assimilation(
    run: NAMMRun, methods: tuple[str, ...] = ("mirror DPS", "DPS", "constraint-guided DPS"),
    obs: str | None = None,
) -> dict:
    """Posterior samples for ``n`` held-out truths with each method; residuals and ``l(x)``.
    ``obs`` replaces the run's observation type for this call."""
    a = {**run.cfg["assimilate"], **({"obs": obs} if obs else {})}
    check_assimilate(a)
    if a.get("obs") is None:
        raise ValueError(f"assimilate.obs must be one of {list(OBSERVATIONS)}, got None")
    test = run.data("test").x
    rng = float(test.max() - test.min())
    sigma_y = float(a["noise"]) * rng  # noise relative to the data range
    try:  # before any sampling: the settings are the user's, so the message names them
        op = OBSERVATIONS[a["obs"]](run.shape, a, sigma_y)
    except ValueError as e:
        given = f"frames = {a['frames']}" if a["obs"] == "frames" and "frames" in a else (
            f"fraction = {a.get('fraction')}" if a["obs"] != "frames" else "")
        raise ValueError(f"assimilate (obs = {a['obs']}{', ' + given if given else ''}): {e}") from None
    if "frames" in a and a["obs"] != "frames":
        warnings.warn(f"assimilate.frames is for obs = frames; ignored with obs = {a['obs']}", stacklevel=2)
    n = min(int(a["n"]), len(test))
    if n < int(a["n"]):
        warnings.warn(f"assimilate.n = {a['n']}, but the held-out split has {len(test)} truths: using "
                      f"{n} (data.n_test sets the split, for a new fit)", stacklevel=2)
    truth = test[:n]
    y = op.measure(truth, generator=torch.Generator().manual_seed(int(a["seed"]) + 1))
    con = run.constraint()
    # clamp x0_hat a little beyond the data range for every method alike (see assimilate's clip_x0)
    clip = a.get("clip_x0") or 1.5 * float(run.data().x.abs().max())
    results: dict[str, Any] = {"operator": op.describe(), "sigma_y": sigma_y, "n": n, "clip_x0": clip,
                               "residual_units": "sigma_y",  # residual_* are ||y - A x|| / sigma_y
                               "settings": {k: a[k] for k in ASSIMILATE_KEYS if k in a}, "methods": {}}
    hidden = ~op.mask.expand_as(truth).bool()  # the entries the measurement leaves to infer
    for name in methods:
        kw: dict[str, Any] = {}
        if name == "mirror DPS":
            den, kw["mirror"] = run.mdm(), (run.finetuned() if a.get("finetuned", True) else run.mirror())
        else:
            den = run.vanilla()
            if name == "constraint-guided DPS":
                kw.update(constraint=con, constraint_weight=float(a["constraint_weight"]))
        lower = (f"lower assimilate.zeta (now {float(a['zeta']):g})"
                 + (f" or assimilate.constraint_weight (now {float(a['constraint_weight']):g})"
                    if name == "constraint-guided DPS" else ""))
        t0 = time.perf_counter()
        try:
            x = assimilate(
                den,
                op,
                y,
                run.shape,
                float(a["zeta"]),
                steps=int(a["steps"]),
                eta=float(a["eta"]),
                generator=torch.Generator(device=run.device).manual_seed(int(a["seed"])),
                device=run.device,
                clip_x0=clip,
                progress=run.progress,
                **kw,
            ).cpu()
        except FloatingPointError as e:  # the sampler's check of the DPS step, in the settings' words
            raise FloatingPointError(f"{name} diverged ({e}): {lower}") from None
        res = (op.residual(x, y) / sigma_y).float()
        dist = batched_distance(con, x, device=run.device)
        bad = int((~torch.isfinite(x.flatten(1)).all(1) | ~torch.isfinite(res) | ~torch.isfinite(dist)).sum())
        if bad:  # a diverged method would leave NaN in metrics.json and the figure
            big = float(x.abs().nan_to_num(nan=0.0, posinf=float("inf")).max())
            raise FloatingPointError(
                f"{name} diverged: its samples or their constraint distance are not finite for {bad} of {n} "
                f"truths (largest |x| {big:.3g}, the data's {float(test.abs().max()):.3g}): {lower}")
        results["methods"][name] = {
            "residual_mean": float(res.mean()),
            "residual_median": float(res.median()),
            "rmse_unobserved": float((x - truth)[hidden].pow(2).mean().sqrt()),
            "l_mean": float(dist.mean()),
            "l_median": float(dist.median()),
            "seconds": round(time.perf_counter() - t0, 1),
            "_x": x,
            "_l": dist,
        }
    truth_res = (op.residual(truth, y) / sigma_y).float()
    results["truth"] = {
        "residual_mean": float(truth_res.mean()),
        "l_mean": float(batched_distance(con, truth, device=run.device).mean()),
    }
    results["_truth"], results["_y"], results["_hidden"] = truth, y, hidden
    return results


def public(d: Any) -> Any:
    """A results dict without its private tensors (keys starting with ``_``)."""
    if isinstance(d, dict):
        return {k: public(v) for k, v in d.items() if not str(k).startswith("_")}
    return d


# --- the command --------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    add_device_arg(p)
    p.add_argument("--fresh", action="store_true",
                   help="redo stages whose settings changed or whose files no longer load")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _settings_args(p: argparse.ArgumentParser, example: str = "mirror_train.steps=500") -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one setting, e.g. --set {example} (repeatable)",
    )


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="neural approximate mirror maps: fit, sample, finetune, assimilate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_subparsers(dest="namm_command", metavar="SUBCOMMAND")
    s.required = True

    f = s.add_parser("fit", help="fit the mirror map, then train the mirror and vanilla diffusion models",
                     description="Fit the mirror map (g, f) to the data's constraint distance, then train the mirror "
                                 "diffusion model on g(x) and, as the baseline, a vanilla one on x; each stage is "
                                 "kept in --out and reused or resumed when the command runs again.")
    f.add_argument(
        "--data", default=None,
        help="brightness, burgers, kolmogorov, periodic, count, or a file (required unless --resume)"
    )
    f.add_argument(
        "--constraint", default=None,
        help="the constraint, for user data: a registered name (box, ball, simplex, ...) or FILE.py:NAME, "
             "a callable x -> (B,) distances in your own Python file",
    )
    f.add_argument("--profile", default=None, choices=sorted(PROFILES),
                   help="quick: 16x16, tiny nets, the CPU benchmark; default: 32x32; full: 64x64, the paper's "
                        "networks, for a GPU (default: default; with --resume, the run's)")
    f.add_argument("--config", metavar="TOML", help="TOML file with tables of the sections --set takes")
    f.add_argument("--out", default=None, help="run directory (default: runs/namm-<data>)")
    f.add_argument("--no-baseline", action="store_true", help="skip the vanilla diffusion model")
    f.add_argument("--baseline", action="store_true",
                   help="with --resume: make the vanilla diffusion model that a run fitted with --no-baseline lacks")
    f.add_argument("--resume", action="store_true",
                   help="go on with the settings --out records (an interrupted fit; --set may still change some)")
    _settings_args(f)
    _common(f)
    f.set_defaults(func=run_fit, interrupted=STAGES_KEPT)

    for cmd, fn, helptext in (
        ("sample", run_sample, "sample the models; violation maps and l(x) histograms"),
        ("finetune", run_finetune, "fine-tune the inverse map on mirror-model samples"),
        ("assimilate", run_assim, "data assimilation: mirror DPS vs DPS vs guided DPS"),
    ):
        said = ASSIMILATE_HELP if cmd == "assimilate" else f"{helptext[0].upper()}{helptext[1:]}."
        q = s.add_parser(cmd, help=helptext, description=said,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("--run", required=True, help="a run directory made by `condiff namm fit`")
        _settings_args(q, {"sample": "sample.steps=50", "finetune": "finetune.steps=2000",
                           "assimilate": "assimilate.zeta=0.5"}[cmd])
        _common(q)
        q.set_defaults(func=fn, interrupted=STAGES_KEPT if cmd == "finetune" else SETS_KEPT)
        if cmd == "sample":
            q.add_argument(
                "--n", type=int, default=None, help="samples per model (default: the run's sample.n)"
            )
            q.add_argument("--no-finetuned", action="store_true", help="skip the fine-tuned inverse map")
            q.add_argument(
                "--guided",
                action="store_true",
                help="also sample the vanilla DM with the constraint as a guidance loss (settings: guide.*)",
            )
        if cmd == "assimilate":
            q.add_argument("--obs", default=None, choices=sorted(OBSERVATIONS),
                           help="observation type (default: the data set's assimilate.obs, e.g. points)")
            q.add_argument("--no-baselines", action="store_true", help="mirror DPS only")
            q.add_argument("--out", default=None,
                           help="output directory (default RUN/assimilate); another one keeps an earlier "
                                "assimilation, of another --obs say, beside this one (inside the run, a folder "
                                "named assimilate-..., e.g. RUN/assimilate-rows)")


def _open_run(args: argparse.Namespace) -> NAMMRun:
    root = Path(args.run)
    f = root / "config.json"
    if (root / "stage.json").is_file() or (root.parent / "stage.json").is_file():  # RUN/namm or RUN/namm/mirror
        run = root.parent if (root / "stage.json").is_file() else root.parent.parent
        if run_kind(run) == "condiff namm fit":
            raise FileNotFoundError(f"{root} is a stage of the NAMM run {run}, not the run: pass --run {run}")
    if (kind := run_kind(root)) not in (None, "condiff namm fit"):
        raise FileNotFoundError(f"{root} is the run of `{kind}`, not a NAMM run: run `condiff namm fit` first")
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist: make the run with `condiff namm fit --out {root}`")
    if not f.is_file():
        raise FileNotFoundError(
            f"{root} is not a NAMM run directory (no config.json): run `condiff namm fit` first"
        )
    io.lock_run(root)
    cfg = _recorded_settings(root, args.overrides, "run `condiff namm fit` first")
    return NAMMRun(root, cfg, pick_device(args.device), args.fresh, not args.quiet,
                   saved_by=f"the NAMM run {root}")


def _recorded_settings(root: Path, overrides: list[str], remedy: str) -> dict:
    """The settings a NAMM run's config.json records, completed with sections added since, and ``overrides``
    (``--set``) applied."""
    f = root / "config.json"
    cfg = io.read_json_table(f)
    if not all(k in cfg for k in ("mirror", "loss", "mirror_train")):
        raise FileNotFoundError(f"{root} is not a NAMM run directory (its config.json has no mirror settings): "
                                f"{remedy}")
    for section, default in _BASE.items():  # runs made before a section existed (e.g. guide)
        cfg.setdefault(section, copy.deepcopy(default))
        if isinstance(default, dict) and not isinstance(cfg[section], dict):  # a hand-edited config.json
            raise ValueError(f"{f}: {section} must be a table of settings, got {cfg[section]!r}")
    floats_as_defaults(cfg, _defaults(cfg))
    parsed = [parse_override(o, SECTIONS, nested=True) for o in overrides]
    given = {path[1]: v for path, v in parsed if path[0] == "data" and len(path) == 2}
    refuse_unused_generator_keys((cfg.get("data") or {}).get("name"), given)  # older runs may record them
    cfg = apply_settings(cfg, {}, parsed, str(f))
    return json.loads(json.dumps(cfg))


def _keep_settings(run: NAMMRun) -> None:
    """Record the settings (``--set`` included) in config.json once a command has succeeded with them."""
    io.write_json_atomic(run.root / "config.json", run.cfg)


# sections only the commands after fit use; fit keeps what they recorded (see run_fit)
LATER_SECTIONS = ("sample", "finetune", "assimilate", "guide")


def _leaf_paths(table: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The dotted keys of a settings table, as paths to its values."""
    return [p for k, v in table.items()
            for p in (_leaf_paths(v, (*prefix, k)) if isinstance(v, dict) and v else [(*prefix, k)])]


def preset(data: Any, profile: Any) -> dict:
    """The settings before a file and ``--set``: base < profile < data family < the profile's for that family
    (an unknown profile or data name adds nothing; the family settings follow registered names only: a user's
    file called count.npz is not count data)."""
    profile = profile if isinstance(profile, str) else None
    data = data if isinstance(data, str) else None
    cfg = merge(_BASE, PROFILES.get(profile, {}))
    cfg = merge(cfg, FAMILIES.get(data, {"assimilate": GENERIC_ASSIMILATION}))
    return merge(cfg, PROFILE_FAMILIES.get(profile, {}).get(data, {}))


def _defaults(cfg: dict) -> dict:
    """The defaults a run's recorded settings were resolved from (:func:`preset` of its data and profile)."""
    return preset((cfg.get("data") or {}).get("name"), cfg.get("profile"))


def floats_as_defaults(cfg: dict, defaults: dict) -> dict:
    """``cfg`` (changed in place, and returned) with each whole number whose default is a float made a float: a
    run recorded before such settings were kept as floats holds ``2`` where ``--set ...=0.5`` must then be taken
    (it was refused as no integer). Equal values either way, so the stages are the same."""
    for k, d in defaults.items():
        v = cfg.get(k)
        if isinstance(d, dict) and isinstance(v, dict):
            floats_as_defaults(v, d)
        elif isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool):
            cfg[k] = float(v)
    return cfg


def keep_later_settings(cfg: dict, root: Path, named: set[tuple[str, ...]]) -> dict:
    """``cfg`` with the later commands' sections taken from the run's config.json, where the run has
    the same data and profile, except the keys this call gives (``named``: the paths its --set and
    --config give, e.g. ``("sample", "n")``): re-running fit must not undo `namm finetune --set ...` (the
    fine-tuned stage would then read as made with other settings), key by key, so that `--set sample.n=7`
    keeps a recorded `sample.steps`."""
    before = json_table(root / "config.json")
    if before.get("profile") != cfg.get("profile") or before.get("data") != cfg.get("data"):
        return cfg
    kept = [k for k in LATER_SECTIONS if isinstance(before.get(k), dict)]
    out = {**cfg, **{k: floats_as_defaults(copy.deepcopy(before[k]), _defaults(before).get(k, {})) for k in kept}}
    for path in sorted((p for p in named if p[0] in kept), key=len):  # a whole table first, then its keys
        set_path(out, list(path), copy.deepcopy(value_at(cfg, path)))
    return out


def _recorded_fit(args: argparse.Namespace) -> tuple[dict, Path]:
    """``namm fit --resume``: the settings the run in ``--out`` records, with this call's ``--set``."""
    given = [flag for flag, v in (("--data", args.data), ("--constraint", args.constraint),
                                  ("--config", args.config)) if v]
    if given:
        raise ValueError(f"--resume goes on with the settings the run records; {', '.join(given)} would change "
                         "them (use --set for a setting, or leave out --resume)")
    if not args.out:
        raise ValueError("--resume needs --out, the run directory to go on with")
    root = check_out_dir(args.out, kind="condiff namm fit")
    f = root / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"--resume: {root} holds no NAMM run (no config.json): start it with "
                                "`condiff namm fit --data ... --out ...`")
    cfg = _recorded_settings(root, args.overrides, "start one with `condiff namm fit --data ... --out ...`")
    if args.profile is not None and args.profile != cfg.get("profile"):
        raise ValueError(f"--resume goes on with the settings the run records; it was fitted with --profile "
                         f"{cfg.get('profile')}, not {args.profile}")
    args.data = str(cfg["data"].get("name"))
    if args.baseline and args.no_baseline:
        raise ValueError("--baseline and --no-baseline contradict each other")
    if cfg.get("baseline", (root / "vanilla").is_dir()) is False and not args.baseline:  # (a run fitted before it
        args.no_baseline = True  # was recorded: as it lies)
    return cfg, root


def run_fit(args: argparse.Namespace) -> int:
    saved_by = None  # code of one's own (FILE.py:NAME) that this command names is the user's to run
    if args.resume:
        cfg, root = _recorded_fit(args)
        saved_by = f"the NAMM run {root}"  # named by the run's config.json, not by the user: run only if trusted
    else:
        if args.baseline:
            raise ValueError("--baseline goes with --resume: a fit makes the vanilla diffusion model unless "
                             "--no-baseline")
        if not args.data:
            raise ValueError("--data is required (brightness, burgers, kolmogorov, periodic, count, or a file); "
                             "--resume --out RUN goes on with the settings a run records")
        cfg = resolve(args.data, args.profile or "default", args.config, args.overrides, args.constraint)
        root = check_out_dir(args.out, kind="condiff namm fit", inputs={"--data": args.data},
                             default=Path("runs") / f"namm-{Path(args.data).stem}")
        named = {tuple(parse_override(o, SECTIONS, nested=True)[0]) for o in args.overrides or []}
        cfg = keep_later_settings(cfg, root, named | (set(_leaf_paths(read_toml(args.config, SECTIONS)))
                                                      if args.config else set()))
    if not args.resume or "baseline" in cfg:  # what the fit makes (a run fitted before it was recorded: unsaid)
        cfg["baseline"] = not args.no_baseline
    run = NAMMRun(root, cfg, pick_device(args.device), args.fresh, not args.quiet, saved_by)  # checks the settings
    run.resuming = args.resume
    run.preflight(["namm", "mdm"] + ([] if args.no_baseline else ["vanilla"]))  # before config.json changes
    print(
        f"data {args.data}: {len(run.data())} training samples of shape {run.shape}; "
        f"constraint {run.constraint().config}"
    )
    if cfg["data"]["name"] not in DATASETS:  # a user's file: a missing test split stops sample and assimilate
        try:
            run.data("test")
        except NoSplitError as e:
            warnings.warn(f"{e}; until then `namm sample` and `namm assimilate` refuse this run (fit goes on)",
                          stacklevel=1)
    v = data_violation(run.constraint(), run.data().x, device=run.device)
    print(f"constraint on {v['n']} training samples: mean l {v['mean']:.3g}, median {v['median']:.3g} "
          f"(Gaussian noise with the data's mean and std: median {v['noise_median']:.3g})")
    if not v["satisfied"]:
        warnings.warn(off_set_warning(v, run.constraint()), stacklevel=2)
    run.data_checked = True  # said once: the mirror map's fitting does not measure them again
    # the settings are recorded only once every check (the data's against the constraint too) has passed
    root.mkdir(parents=True, exist_ok=True)
    io.lock_run(root)
    io.write_json_atomic(root / "config.json", cfg)
    run.mirror()
    print(f"mirror map: {root / 'namm' / 'mirror'}")
    run.mdm()
    print(f"mirror diffusion model: {root / 'mdm' / 'model'}")
    if not args.no_baseline:
        run.vanilla()
        print(f"vanilla diffusion model: {root / 'vanilla' / 'model'}")
    return 0


def _with_baseline(run: NAMMRun) -> bool:
    """Whether the run has its vanilla DM, or should: a fit that was to make it (config.json records
    ``baseline``) and stopped before it leaves it to the next command, which makes it, saying so."""
    if (run.root / "vanilla" / "stage.json").is_file():
        return True
    if run.cfg.get("baseline") is True:
        run.skip_hints["vanilla"] = "the fit stopped before it (`namm fit --no-baseline` makes a run without one)"
        return True
    return False


def _no_baseline_why(run: NAMMRun) -> str:
    make = f"`condiff namm fit --out {run.root} --resume --baseline` makes it"
    if run.cfg.get("baseline") is False:
        return f"it was fitted with --no-baseline ({make})"
    return make


def run_finetune(args: argparse.Namespace) -> int:
    run = _open_run(args)
    run.preflight(["namm", "mdm", "finetune"])
    run.finetuned()
    _keep_settings(run)
    print(f"fine-tuned mirror map: {run.root / 'finetune' / 'mirror'}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    if args.n is not None and args.n < 2:  # before any set is drawn: the MMD's bandwidth needs two samples
        raise ValueError(f"--n must be >= 2 (the MMD to held-out data needs two samples), got {args.n}")
    run = _open_run(args)
    which = ["mdm"]
    if _with_baseline(run):
        which.insert(0, "vanilla")
    if not args.no_finetuned:
        which.append("mdm_ft")
    if args.guided:
        if "vanilla" not in which:
            raise FileNotFoundError(f"{run.root}: --guided needs the vanilla DM, which this run has not: "
                                    f"{_no_baseline_why(run)}")
        which.append("guided")
    run.skip_hints["finetune"] = "--no-finetuned leaves it out"
    run.preflight(stages_of(which))  # before any sample set is redrawn
    # the previous report (its figures and pictures) stays until the new one is whole; the sets below it are
    # the stages' cache, redrawn where their settings changed
    res = run.evaluate(which, args.n)
    write_sample_report(run, res, run.root / "samples")
    _keep_settings(run)
    return 0


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


SAMPLE_REPORT = ("violations.png", "distance_hist.png")  # beside its record, metrics.json


def reduction_interval(baseline: Tensor, values: Tensor) -> list[float] | None:
    """The 90% bootstrap interval of the reduction ``mean(baseline) / mean(values)``
    (:func:`condiff.metrics.ratio_interval`); None where either set's distances are not finite or average
    zero, where no reduction is shown either."""
    if all(bool(torch.isfinite(d).all()) and float(d.mean()) > 0 for d in (baseline, values)):
        return list(ratio_interval(baseline, values))
    return None


def interval_text(interval: list[float] | None) -> str:
    """A :func:`reduction_interval` as a table cell."""
    return "-" if interval is None else f"{interval[0]:.3g} to {interval[1]:.3g}"


def write_sample_report(run: NAMMRun, res: dict, out: Path) -> None:
    """The sample sets' pictures and figures, moved into ``out`` whole (:func:`condiff.io.writing_outputs`):
    an interruption or a failure leaves the previous report as it was."""
    with io.writing_outputs(out, "metrics.json", *SAMPLE_REPORT) as staged:
        _write_sample_report(run, res, staged)
    print(f"wrote {out / 'violations.png'}, {out / 'distance_hist.png'}, {out / 'metrics.json'}")


def _write_sample_report(run: NAMMRun, res: dict, out: Path) -> None:
    con = run.constraint()
    for k, v in res.items():  # said, not hidden: the table and metrics.json show nan (null) for them
        if bad := int((~torch.isfinite(v["_l"])).sum()):
            warnings.warn(f"{k}: the constraint distance is not finite for {bad} of {v['n']} samples (values in "
                          f"[{float(v['_x'].min()):.3g}, {float(v['_x'].max()):.3g}]: an undertrained model?); "
                          "the figures that use it read nan", stacklevel=2)
    cols = {k: (v["_x"], violation_maps(con, v["_x"]), v["_l"]) for k, v in res.items()}
    shown = ("constraint violations" if any(c[1] is not None for c in cols.values())
             else "distances l(x) (its violation maps are not finite)" if draws_maps(con, cols[next(iter(cols))][0])
             else "distances l(x) (the constraint draws no violation map)")
    plot_violation_grid(cols, out / "violations.png", title=f"{run.cfg['data']['name']}: samples and their {shown}")
    plot_histograms(
        {k: v["_l"].numpy() for k, v in res.items() if k != "data (held-out)"},
        out / "distance_hist.png",
        xlabel="constraint distance l(x)",
        title=f"{run.cfg['data']['name']}: l(x) per sample",
    )
    made = run.made_from(stages_of(res))
    for w in (w for w in res if w in SET_STAGES):  # the sets too: a Ctrl-C while they are redrawn keeps this report
        made[f"samples/{w}"] = spec_digest(json_table(run.root / "samples" / w / "stage.json").get("spec"))
    van = res.get("vanilla")
    for k, v in res.items():
        if van is not None and k not in ("data (held-out)", "vanilla") and (
                iv := reduction_interval(van["_l"], v["_l"])) is not None:
            v["reduction_interval_90"] = iv
    io.write_json_atomic(out / "metrics.json", {**public(res), "made_from": made, "versions": io.versions()})
    base = res.get("vanilla", {}).get("l_mean")
    print(f"{'set':<18}{'n':>6}{'mean l':>12}{'median l':>12}{'reduction':>11}{'90% interval':>16}{'MMD':>12}"
          f"{'MMD ratio':>11}")
    for k, v in res.items():
        cut = f"{base / v['l_mean']:>10.3g}x" if base and v["l_mean"] > 0 and k != "data (held-out)" else f"{'-':>11}"
        span = interval_text(v.get("reduction_interval_90"))
        print(
            f"{k:<18}{v['n']:>6}{v['l_mean']:>12.4g}{v['l_median']:>12.4g}{cut}{span:>16}"
            + (f"{v['mmd']:>12.4g}{v['mmd_ratio']:>11.3g}" if v.get("mmd") is not None else f"{'-':>12}{'-':>11}")
            + (
                f"   exactly k sources (peak finder) {v['exact_k']:.3f}; mean l on those "
                f"{_num(v['l_exact_k'])}, on the others {_num(v['l_other_k'])}; over 10% stray brightness "
                f"{v['stray']:.3f}"
                if "exact_k" in v
                else ""
            )
        )


def run_assim(args: argparse.Namespace) -> int:
    run = _open_run(args)
    methods = ("mirror DPS",) if args.no_baselines else ("mirror DPS", "DPS", "constraint-guided DPS")
    if not args.no_baselines and not _with_baseline(run):
        raise FileNotFoundError(f"{run.root}: the baselines need the vanilla DM, which this run has not: "
                                f"{_no_baseline_why(run)}; or pass --no-baselines")
    stages = ["namm", "mdm"] + (["finetune"] if run.cfg["assimilate"].get("finetuned", True) else []) + (
        [] if args.no_baselines else ["vanilla"])
    run.skip_hints["finetune"] = "--set assimilate.finetuned=false uses the fitted map instead"
    run.preflight(stages)
    if args.out is not None:  # inside the run, only a folder of its own beside assimilate/ (not a stage, samples/)
        p, root = Path(args.out).resolve(), Path(run.root).resolve()  # (through links, to where it writes)
        if (p == root or root in p.parents) and not (p.parent == root and p.name.startswith("assimilate")):
            raise ValueError(f"--out {args.out} lies inside the run {run.root}, among its stages and results: give "
                             f"a folder of its own there named assimilate-... ({run.root / 'assimilate-rows'}, say), "
                             "or one outside the run")
    # (the run's own folder takes no run mark of its own: a kind only for a folder given)
    out = check_out_dir(args.out, kind=args.out and "condiff namm assimilate", default=run.root / "assimilate")
    for f in (out / "assimilation.png", out / "samples.npz", out / "metrics.json"):  # refused now, not after sampling
        if f.is_dir():
            raise IsADirectoryError(f"{f} is a directory: move it away, it is where this command writes")
    res = run_assimilation(run, methods, obs=args.obs)  # --obs is for this call only
    con = run.constraint()
    cols = {
        "observed (y)": (res["_y"], None, None),  # what the methods were given: zero where unobserved (drawn in colour)
        "truth": (
            res["_truth"],
            violation_maps(con, res["_truth"]),
            batched_distance(con, res["_truth"], device=run.device),
        )
    }
    cols.update({k: (v["_x"], violation_maps(con, v["_x"]), v["_l"]) for k, v in res["methods"].items()})
    op = res["operator"]
    seen = f"{op.get('mask', op.get('operator'))}, {op['observed']:.0%} observed" if "observed" in op else str(op)
    with io.writing_outputs(out, "metrics.json") as staged:  # the old results stay until the new are whole
        plot_violation_grid(
            cols, staged / "assimilation.png", rows=4, hidden={"observed (y)": res["_hidden"]},
            title=f"{run.cfg['data']['name']}: {seen}, noise sigma_y {res['sigma_y']:.3g}"
        )
        io.write_npz_atomic(staged / "samples.npz", truth=res["_truth"].numpy(), y=res["_y"].cpu().numpy(),
                            **{k.replace(" ", "_").replace("-", "_"): v["_x"].numpy()
                               for k, v in res["methods"].items()})
        io.write_json_atomic(staged / "metrics.json", {**public(res), "made_from": run.made_from(stages),
                                                       "versions": io.versions()})
    print(
        f"observation {seen}, noise sigma_y {res['sigma_y']:.3g}, {res['n']} truths "
        f"(truth: residual / sigma_y {res['truth']['residual_mean']:.3g}, l {res['truth']['l_mean']:.3g})"
    )
    for k, v in res["methods"].items():
        res_l = (f"residual / sigma_y {v['residual_mean']:8.3g}   l(x) mean {v['l_mean']:10.4g}   "
                 f"RMSE unobserved {v['rmse_unobserved']:8.3g}")
        print(f"  {k:<24} {res_l}   {v['seconds']:.0f} s")
    if "constraint-guided DPS" in res["methods"]:  # a weight tuned on Burgers: said, as it may not suit another
        w = float(res["settings"]["constraint_weight"])
        print(f"  (constraint-guided DPS weights l(x0_hat) by assimilate.constraint_weight = {w:g}; the defaults were "
              "chosen for the paper's data, so another constraint may want another)")
    _keep_settings(run)
    print(f"wrote {out / 'assimilation.png'}, {out / 'samples.npz'}, {out / 'metrics.json'}")
    return 0
