"""``condiff dual``: train diffusion models under distributional constraints (dual training).

  condiff dual train --config run.toml [--set dual.lr=0.5] [--out DIR] [--resume | --fresh]
  condiff dual toy       theory check on a 2-D Gaussian mixture        (writes metrics.json + plots)
  condiff dual fair      fair generation on imbalanced digits          (writes metrics.json + plots)
  condiff dual finetune  fine-tuning on 30 images without overfitting  (writes metrics.json + plots)

The experiments take --set KEY=VALUE for their settings: toy's are flat (--set steps=800), fair has a
[train] table (--set train.steps=800), finetune has [pretrain] and [finetune] (--set finetune.steps=200);
all three have a [dual] table (--set dual.lr=0.5).

A ``dual train`` config file has the tables of ``condiff train`` ([data] [model] [schedule] [train]
[sample]) plus [dual] (dual-step settings, and ``init``: a model to start from), [objective]
(the data q_0) and one [[constraint]] table per constraint; see docs/dual.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import checks, io
from ..data import ArrayData, load_dataset, value_range
from ..determinism import kept_streams
from ..dual import (
    Constraint,
    DualConfig,
    DualObjective,
    keep_fraction,
    model_samples,
    reference_losses,
    select,
)
from ..dual import experiments as ex
from ..models import load_net, save_model
from ..nets import build_net
from ..plots import plot_loss_curve
from ..schedule import Schedule
from ..train import TrainConfig, Trainer, resumed_line
from ..userfile import UntrustedCode
from . import config as config_mod
from .common import (
    RESULT_DIRS,
    add_device_arg,
    announce_recorded,
    check_denoising_net,
    check_out_dir,
    drop_stale_results,
    load_model_for,
    net_config,
    own_net_named,
    pick_device,
    recorded_settings,
    restore_only,
    save_resolved_config,
    start_run,
    train_config,
)
from .train import interrupted

DUAL_TABLES = ("dual", "objective", "constraint")
SOURCE_KEYS = {"data", "split", "classes", "keep", "n", "offset", "seed",  # a data set ...
               "model", "steps", "eta", "batch_size"}                        # ... or model samples
CONSTRAINT_KEYS = SOURCE_KEYS | {"name", "bound", "relative", "reference"}
OBJECTIVE_KEYS = SOURCE_KEYS - {"model", "steps", "eta", "batch_size"}
DATA_ONLY = {"data", "split", "classes", "keep", "offset"}  # keys of a data set, never of a model's samples
MODEL_ONLY = {"steps", "eta"}                                # keys of a model's samples, never of a data set
EXPERIMENTS = {"toy": (ex.ToyConfig, ex.run_toy, "runs/dual-toy"),
               "fair": (ex.FairConfig, ex.run_fair, "runs/dual-fair"),
               "finetune": (ex.FinetuneConfig, ex.run_finetune, "runs/dual-finetune")}
SET_EXAMPLES = {"toy": "--set steps=800 or --set relative=1.05",
                "fair": "--set train.steps=800 or --set target_freq=0.1",
                "finetune": "--set finetune.steps=200 or --set pretrain.steps=800"}


def plain(doc: str | None) -> str:
    """A docstring as help text: one paragraph, without its notes on Python arguments (the markup goes
    for every help text, in ``main``)."""
    return re.sub(r"\s*\(``fresh`` and ``progress`` as for :func:`\w+`\)", "", " ".join((doc or "").split()))


def settings_help(cls: type) -> str:
    """The experiment's --set keys with their quick-profile defaults."""
    def shown(v: Any) -> str:
        return "unset" if v is None else json.dumps(v)

    d = json.loads(json.dumps(asdict(ex.profile_config(cls, "quick"))))
    keys = ", ".join(f"{k}.{{{', '.join(f'{kk}={shown(vv)}' for kk, vv in v.items())}}}" if isinstance(v, dict)
                     else f"{k}={shown(v)}" for k, v in d.items())
    return f"settings for --set KEY=VALUE (the quick profile's values): {keys}"


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="dual training under distributional constraints", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="dual_command", metavar="{train,toy,fair,finetune}")
    cmds.required = True
    t = cmds.add_parser("train", help="constrained training from a config file",
                        description="Train a diffusion model under distributional constraints ([[constraint]] tables "
                                    "of a TOML run file: data sets whose denoising loss must stay under a bound) by "
                                    "the primal-dual algorithm, or fine-tune a model without overfitting ([dual] "
                                    "init); --resume continues a run, --fresh replaces it.")
    t.add_argument("--config", metavar="TOML",
                   help="run file with [dual] [objective] [[constraint]] (with --resume and --out of an earlier run "
                        "it may be left out: that run's recorded settings are taken)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=500 or --set dual.lr=0.5 (repeatable)")
    t.add_argument("--out", default=None, help="run directory (default: runs/dual-<config name>)")
    add_device_arg(t)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--fresh", action="store_true",
                   help="start over, replacing the run in --out (kept in --out/.replaced until the new one finishes)")
    g.add_argument("--restore", action="store_true",
                   help="put back the run in --out that an unfinished --fresh set aside in --out/.replaced, "
                        "deleting the failed attempt's files")
    t.set_defaults(func=run_train, interrupted=interrupted)
    for exp, (cls, fn, out) in EXPERIMENTS.items():
        e = cmds.add_parser(exp, help=plain(fn.__doc__).split(". ")[0], description=plain(cls.__doc__),
                            epilog=settings_help(cls))
        e.add_argument("--out", default=None,
                       help=f"output directory (default {out}); trained models are reused")
        e.add_argument("--profile", default="quick", help="quick (CPU, minutes; the default) or full (GPU)")
        e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override one setting, e.g. {SET_EXAMPLES[exp]} (repeatable)")
        add_device_arg(e)
        e.add_argument("--fresh", action="store_true",
                       help="retrain models in --out that were trained with other settings (else refused)")
        e.set_defaults(func=run_experiment, experiment=exp,
                       interrupted="run the same command again: the models trained are kept, and one cut short "
                                   "goes on from its newest checkpoint")


# --- experiments ---------------------------------------------------------------------------------


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """``key=value`` or ``table.key=value`` (into a dict field such as ``train``), value read as TOML;
    the config checks the values (``type(cfg).from_dict``)."""
    d = json.loads(json.dumps(asdict(cfg)))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if path[0] not in d or len(path) > 2 or (len(path) == 2 and not isinstance(d[path[0]], dict)):
            raise ValueError(f"unknown setting {key!r}; settings: {sorted(d)}")
        if len(path) == 1:  # a setting of several kinds (relative: one number or a list) is for the config to judge
            d[path[0]] = config_mod.toml_value(raw)
        else:
            config_mod.set_path(d, path, config_mod.toml_value(raw))  # a ConfigError is a ValueError
    return type(cfg).from_dict(d)


# what a run's own training wrote of its model besides checkpoints, model, log and settings
OWN_RESULTS = ("metrics.json",)


def run_experiment(args: argparse.Namespace) -> int:
    cls, fn, default = EXPERIMENTS[args.experiment]
    out = check_out_dir(args.out, kind=f"condiff dual {args.experiment}", default=default)
    device = pick_device(args.device)
    cfg = apply_overrides(ex.profile_config(cls, args.profile), args.overrides)  # all settings checked
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # a second experiment into the same directory while this one runs is refused; one refused before it
    # changes anything (a model of other settings, say) leaves the last run's metrics.json in place
    with io.claimed_run(out), io.record_kept_on_failure(out):
        m = fn(cfg, out, device, fresh=args.fresh, progress=True)
    print(io.json_text({k: v for k, v in m.items() if k != "config"}), end="")  # NaN as null, as in the file
    print(f"wrote {out / 'metrics.json'}", file=sys.stderr)  # stdout: the JSON alone, for a script to read
    print(f"plots: {out}/ " + ", ".join(p.name for p in sorted(out.glob("*.png"))), file=sys.stderr)
    return 0


# --- dual train: config -> objects ---------------------------------------------------------------


def read_run_file(path: str | Path, empty_hint: str | None = None) -> tuple[dict, dict]:
    """Split a run file into the standard tables and the dual tables (``empty_hint``:
    :func:`condiff.cli.config.load_toml`)."""
    p = Path(path)
    raw = config_mod.load_toml(p, empty_hint)
    dual = {k: raw.pop(k) for k in DUAL_TABLES if k in raw}
    config_mod.check_sections(raw, str(p), config_mod.SECTIONS + DUAL_TABLES)  # names every known section
    cons = dual.get("constraint", [])
    if not isinstance(cons, list) or not all(isinstance(c, dict) for c in cons):
        raise config_mod.ConfigError(f"{p}: constraints must be [[constraint]] tables")
    for k in ("dual", "objective"):
        if not isinstance(dual.get(k, {}), dict):
            raise config_mod.ConfigError(f"{p}: [{k}] must be a table")
    return raw, {"dual": dict(dual.get("dual", {})), "objective": dict(dual.get("objective", {})),
                 "constraint": [dict(c) for c in cons]}


def resolve(file: str | Path, overrides: list[str], recorded: dict | None = None) -> dict:
    """Preset of the data set < run file < overrides; ``dual.*`` and ``objective.*`` overrides too. With
    ``recorded`` (a run's config.json, read from ``file``) in place of the run file."""
    if recorded is None:
        std, dual = read_run_file(file, None if overrides else "a dual run file names its [data], [model], [train] "
                                  "and [[constraint]] tables (examples/dual/ has some)")
    else:
        std = {k: v for k, v in recorded.items() if k in config_mod.SECTIONS}
        dual = {k: json.loads(json.dumps(recorded.get(k, [] if k == "constraint" else {}))) for k in DUAL_TABLES}
    parsed = [config_mod.parse_override(o, config_mod.SECTIONS + ("dual", "objective")) for o in overrides]
    for path, value in parsed:
        if path[0] in ("dual", "objective"):
            config_mod.set_path(dual, path, value)
    cfg = config_mod.assemble(std, [(p, v) for p, v in parsed if p[0] in config_mod.SECTIONS], where=str(file))
    cfg.update(dual)
    # a log line at every dual update unless the user chose the interval: lambda.png and slack.png are
    # drawn from the log, and at the preset's 50 they showed every other update of dual.every = 25
    chosen = "log_every" in (std.get("train") or {}) or any(p == ["train", "log_every"] for p, _ in parsed)
    every = (cfg.get("dual") or {}).get("every", DualConfig.every)
    log_every = cfg["train"].get("log_every", TrainConfig.log_every)
    if not chosen and checks.is_integer(every, 1) and checks.is_integer(log_every, 1) and every < log_every:
        cfg["train"]["log_every"] = every
    return cfg


def absolute_paths(cfg: dict) -> dict:
    """``cfg`` with the models and data files it names (``model``, ``reference``, ``data`` of its sources,
    ``[dual] init``) recorded absolute where they exist (:func:`~condiff.cli.config.data_ref`, as ``[data]
    name`` is): a run then resumes from any directory, and a data set's name stays a name."""
    def fix(table: object, keys: tuple[str, ...]) -> None:
        if isinstance(table, dict):
            for k in keys:
                if isinstance(table.get(k), str) and table[k] != "objective":
                    table[k] = config_mod.data_ref(table[k])

    fix(cfg.get("objective"), ("model", "data"))
    for spec in cfg.get("constraint") or []:
        fix(spec, ("model", "reference", "data"))
    fix(cfg.get("dual"), ("init",))
    return cfg


def _check_keys(spec: dict, known: set[str], where: str) -> None:
    bad = sorted(set(spec) - known)
    if bad:
        raise config_mod.ConfigError(f"{where}: unknown key(s) {bad}; known: {sorted(known)}")


def check_source(spec: dict, prefix: str) -> dict:
    """The values of one data source table (a data set, or samples of a ``model``), named ``prefix + key``;
    returns the table normalised (``n = 3e1`` -> 30)."""
    out = dict(spec)
    if "model" in spec and (mixed := sorted(set(spec) & DATA_ONLY)):
        raise config_mod.ConfigError(f"{prefix}{mixed[0]} does not apply to samples of a model "
                                     f"(model = {spec['model']!r})")
    if "model" not in spec and (mixed := sorted(set(spec) & MODEL_ONLY)):
        raise config_mod.ConfigError(f"{prefix}{mixed[0]} applies only to samples of a model (model = 'DIR')")
    for k, v in spec.items():
        name = prefix + k
        if k in ("data", "split", "model", "reference"):
            checks.text(name, v)
        elif k == "classes":
            out[k] = list(checks.labels(name, v, 2**63, "class labels (integers >= 0)"))
        elif k == "keep":
            if not (isinstance(v, dict) and v and all(str(c).isdigit() for c in v)
                    and all(checks.is_number(f) and 0 < f <= 1 for f in v.values())):
                raise config_mod.ConfigError(f"{name} must be a table {{class = fraction in (0, 1]}} such as "
                                             f"{{4 = 0.1}}, got {v!r}")
        elif k in ("n", "steps", "batch_size", "offset"):
            out[k] = checks.integer(name, v, 0 if k == "offset" else 1)
        elif k == "seed":
            out[k] = checks.seed(name, v)
        elif k == "eta":
            out[k] = checks.number(name, v, "[0, 1]")
        elif k == "bound":
            out[k] = checks.bound(name, v)
        elif k == "relative":
            out[k] = checks.relative(name, v)
    return out


def check_run(cfg: dict, device: str) -> tuple[TrainConfig, DualConfig, str | None]:
    """Every setting of a ``dual train`` config before anything is built: [train], [dual] (and its
    ``init``), [objective] and each [[constraint]]; the source tables are normalised in place.
    Returns the training and dual settings and the model to start from."""
    dual = dict(cfg["dual"])
    init = dual.get("init")
    if init is not None:
        checks.text("dual.init", init)
    tcfg = train_config(cfg["train"], device=device)
    dcfg = DualConfig.from_dict({"seed": tcfg.seed, **dual}, also=("init",))
    _check_keys(cfg["objective"], OBJECTIVE_KEYS, "[objective]")
    if cfg["objective"].get("data") == "objective":
        raise config_mod.ConfigError("objective.data = 'objective' is only for constraints")
    cfg["objective"] = check_source(cfg["objective"], "objective.")
    names: list[str] = []
    for j, spec in enumerate(cfg["constraint"]):
        _check_keys(spec, CONSTRAINT_KEYS, f"constraint {j + 1}")
        if "name" not in spec:
            raise config_mod.ConfigError(f"constraint {j + 1}: needs a name")
        where = f"constraint {checks.constraint_name(spec['name'])!r}"
        if spec["name"] in names:
            raise config_mod.ConfigError(f"{where}: constraint names must be unique")
        names.append(spec["name"])
        if ("bound" in spec) == ("relative" in spec):
            raise config_mod.ConfigError(f"{where}: give exactly one of bound (absolute) or relative "
                                         "(times a reference model's loss)")
        if "relative" in spec and spec.get("reference", init) is None:
            raise config_mod.ConfigError(f"{where}: a relative bound needs reference = 'MODEL' "
                                         "(or [dual] init)")
        cfg["constraint"][j] = check_source(spec, f"{where} ")
    return tcfg, dcfg, init


class SampleCache:
    """Samples of models drawn for the constraints, kept in ``root`` (one safetensors group per
    constraint, with the table that drew them) and reused while that table is unchanged; ``fresh``
    ignores what is there. New samples reach the disk with :meth:`save`, once the run may change."""

    def __init__(self, root: Path, fresh: bool = False) -> None:
        self.root = root
        self.old = io.load_config(root) if not fresh and (root / io.CONFIG).is_file() else {}
        self.new: dict[str, tuple[dict, torch.Tensor]] = {}

    def get(self, where: str, spec: dict) -> torch.Tensor | None:
        if self.old.get(where) == spec and io.has_group(self.root, where):
            return io.load_group(self.root, where)["x"]
        return None

    def put(self, where: str, spec: dict, x: torch.Tensor) -> None:
        self.new[where] = (spec, x)

    def save(self) -> None:
        if not self.new or not io.is_rank0():
            return
        keep = [g for g in self.old if g not in self.new and io.has_group(self.root, g)]
        groups = {**{g: io.load_group(self.root, g) for g in keep}, **{w: {"x": x} for w, (_, x) in self.new.items()}}
        io.save_checkpoint(self.root, groups, {**{g: self.old[g] for g in keep},
                                               **{w: spec for w, (spec, _) in self.new.items()}})


def _named_model(path: str, device: str, who: str) -> tuple:
    """:func:`load_model_for`, its refusal prefixed with ``who`` (the table and key that name ``path``)."""
    try:
        return load_model_for(path, device)
    except UntrustedCode as e:  # trained: its net's file is not trusted here
        raise UntrustedCode(f"{who}: {e}") from None
    except io.ModelInTraining as e:  # busy: a script may wait and try again (exit status 75)
        raise io.ModelInTraining(f"{who}: {e}") from None
    except io.CheckpointError as e:
        raise io.CheckpointError(f"{who}: {e} (train that model first)") from None


def build_source(spec: dict, cfg: dict, where: str, objective: ArrayData | None, device: str,
                 cache: SampleCache | None) -> ArrayData:
    """One data set of the problem from its table (checked by :func:`check_source`): a data set
    (``data``, ``split``) or the objective's data (``data = "objective"``), then ``keep``, then
    ``classes`` / ``n`` / ``offset``; or ``n`` samples of a trained ``model`` (kept in ``cache``)."""
    seed = spec.get("seed", 0)
    if "model" in spec:
        x = cache.get(where, spec) if cache is not None else None
        if x is not None:
            return ArrayData(x, name=where)
        what = "[objective]" if objective is None else f"constraint {where!r}"
        den, _, shape = _named_model(spec["model"], device, f"{what}: its model")
        if objective is not None and tuple(shape) != tuple(objective.shape):  # before drawing the samples
            raise config_mod.ConfigError(f"constraint {where!r}: the model at {spec['model']} makes samples "
                                         f"of shape {tuple(shape)}, the objective data have {objective.shape}")
        ex.say(cfg.get("train", {}).get("progress", True), f"drawing {spec.get('n', 1000)} samples of "
               f"{spec['model']} for {where!r} ({spec.get('steps', 100)} steps)")
        x = model_samples(den, spec.get("n", 1000), shape, steps=spec.get("steps", 100),
                          eta=spec.get("eta", 1.0), seed=seed, batch_size=spec.get("batch_size", 500),
                          device=device, clip_x0=cfg.get("sample", {}).get("clip_x0"))
        if cache is not None:
            cache.put(where, spec, x)
        return ArrayData(x, name=where)
    name = spec.get("data", cfg["data"]["name"])
    if name == "objective":
        data = objective
    else:
        kw = {k: v for k, v in cfg["data"].items() if k not in ("name", "split", "labels")} \
            if name == cfg["data"]["name"] else {}
        data = load_dataset(name, split=spec.get("split", "train"), **kw)
    if "keep" in spec:
        data = keep_fraction(data, {int(k): float(v) for k, v in spec["keep"].items()}, seed=seed)
    if any(k in spec for k in ("classes", "n", "offset")):
        data = select(data, classes=spec.get("classes"), n=spec.get("n"), offset=spec.get("offset", 0), seed=seed)
    return data


def build_constraints(cfg: dict, objective: ArrayData, schedule: Schedule, dcfg: DualConfig, init: str | None,
                      device: str, cache: SampleCache) -> tuple[list[Constraint], list[dict]]:
    """Constraints with their bounds resolved (tables checked by :func:`check_run`); also a JSON record
    of how each bound was set."""
    out, record = [], []
    for spec in cfg["constraint"]:
        where = f"constraint {spec['name']!r}"
        data = build_source({k: v for k, v in spec.items() if k in SOURCE_KEYS}, cfg, spec["name"], objective,
                            device, cache)
        if data.shape != objective.shape:
            raise config_mod.ConfigError(f"{where}: samples of shape {data.shape}, "
                                         f"objective data {objective.shape}")
        if "bound" in spec:
            bound, rec = spec["bound"], {"bound": spec["bound"]}
        else:
            ref_path = spec.get("reference", init)
            key = "reference" if "reference" in spec else "[dual] init"
            den, _, shape = _named_model(ref_path, device, f"{where}: its {key} model")
            if tuple(shape) != tuple(objective.shape):
                raise config_mod.ConfigError(f"{where}: the reference model at {ref_path} takes samples of shape "
                                             f"{tuple(shape)}, the objective data have {objective.shape}")
            ex.say(cfg.get("train", {}).get("progress", True),
                   f"{where}: the reference loss of {ref_path} (4096 draws)")
            ref = float(reference_losses(den, schedule, [data.x], timesteps=dcfg.timesteps,
                                         t_range=dcfg.t_range, n=4096, seed=dcfg.seed)[0])
            bound = spec["relative"] * ref
            rec = {"bound": bound, "relative": spec["relative"], "reference": str(ref_path),
                   "reference_loss": ref}
        out.append(Constraint(spec["name"], data.x, bound, spec.get("batch_size")))
        record.append({"name": spec["name"], "n": len(data), **rec})
    return out, record


def check_init_shape(net: torch.nn.Module, init_cfg: dict, init: str | Path, shape: tuple[int, ...],
                     device: str) -> None:
    """Refuse a ``[dual] init`` model that does not take samples of the objective data's ``shape``
    (before anything is trained or written): one whose recorded samples have another number of channels
    or dimensions, or, else, one that fails a forward call on such a sample. (A convolutional model at
    another resolution passes: fine-tuning it there is the user's choice.)"""
    recorded = init_cfg.get("shape")
    if isinstance(recorded, list) and (len(recorded) != len(shape) or recorded[0] != shape[0]):
        raise config_mod.ConfigError(f"[dual] init: the model at {init} takes samples of shape "
                                     f"{tuple(recorded)}, the objective data have {shape}")
    was_training = net.training
    try:  # eval mode and kept random streams: the probe must not change what training does
        with torch.no_grad(), kept_streams():
            net.eval()(torch.zeros(1, *shape, device=device), torch.zeros(1, dtype=torch.long, device=device))
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise config_mod.ConfigError(f"[dual] init: the model at {init} does not take the objective data's "
                                     f"samples of shape {shape} ({first})") from None
    finally:
        net.train(was_training)

class DualJob:
    """Everything a ``dual train`` run needs, built and checked before the run directory changes: the
    settings (:func:`check_run`), the objective data, the model (``[dual] init`` or a new one), the
    constraints with their bounds and the trainer. Samples drawn for constraints wait in
    :attr:`cache` until the caller may write (``run_dir/constraint_data``)."""

    def __init__(self, cfg: dict, run_dir: Path, device: str, fresh: bool = False,
                 saved_by: str | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.tcfg, self.dcfg, init = check_run(cfg, device)
        self.data = build_source(cfg["objective"], cfg, "objective", None, device, None)
        if init is not None:  # fine-tuning: architecture and schedule come from the model we start from
            net, init_cfg = load_net(init, device)
            check_init_shape(net, init_cfg, init, tuple(self.data.shape), device)
            cfg["model"], cfg["schedule"] = dict(net.config), dict(init_cfg["schedule"])
        else:
            torch.manual_seed(self.tcfg.seed)
            unlabelled = {**cfg, "data": {**cfg["data"], "labels": False}}
            net = build_net(net_config(unlabelled, self.data, saved_by), saved_by)
            check_denoising_net(net, self.data.x, device=device)
        self.schedule = Schedule.from_config(cfg["schedule"])
        self.dcfg.check_grid(self.schedule.T)
        self.cache = SampleCache(self.run_dir / "constraint_data", fresh)
        self.constraints, cfg["bounds"] = build_constraints(cfg, self.data, self.schedule, self.dcfg, init,
                                                            device, self.cache)
        self.objective = DualObjective(self.data.x, self.constraints, self.schedule, self.tcfg.batch_size,
                                       self.dcfg)
        meta = {"net": net.config, "schedule": self.schedule.config(), "data": cfg["data"],
                "shape": list(self.data.shape)}
        self.trainer = Trainer(net, self.objective, self.tcfg, self.run_dir, meta)  # warns if no update comes
        self.plots: list[Path] = []  # the pictures fit() drew

    def resume(self) -> bool:
        """Load the newest checkpoint in the run directory, ``lambda`` included (False if there is none)."""
        if not self.trainer.resume():
            return False
        lam = ", ".join(f"{k} {v:.4g}" for k, v in self.objective.lambdas.items())
        print(resumed_line(self.trainer.step, self.tcfg.steps, f"; lambda: {lam}"), file=sys.stderr)
        return True

    def fit(self, stale: tuple[str, ...] = ()) -> dict | None:
        """Train to the end; save the EMA model, plots and ``metrics.json`` (returned; None off the main rank).
        ``stale``: the old model's results that a resumed run which trained on deletes before its model is
        saved (:func:`~condiff.cli.common.drop_stale_results`)."""
        run_dir, schedule, dcfg, objective = self.run_dir, self.schedule, self.dcfg, self.objective
        record = self.cfg["bounds"]
        start = self.trainer.step
        with own_net_named(self.trainer):
            ema = self.trainer.fit()
        if not self.trainer.dist.main:
            return None
        drop_stale_results(run_dir, stale, start, self.trainer.step)
        ex.say(self.tcfg.progress, "the final losses (dual estimator, 4096 draws per data set)")
        final = torch.cat([  # dual estimator, 4096 draws: L_0 on all of [0, T), the L_i on t_range
            reference_losses(ema, schedule, [objective.x], timesteps=dcfg.timesteps, n=4096, seed=dcfg.seed + 1),
            reference_losses(ema, schedule, [c.x for c in self.constraints], timesteps=dcfg.timesteps, n=4096,
                             seed=dcfg.seed + 1, t_range=dcfg.t_range)])
        lam = objective.lambdas
        m = {"steps": self.trainer.step, "train_seconds": round(self.trainer.seconds, 2), "lambda": lam,
             "objective_loss": float(final[0]), "n_objective": len(self.data),
             "constraints": [{**r, "final_loss": v, "slack": v - r["bound"], "lambda": lam[r["name"]]}
                             for r, v in zip(record, final[1:].tolist())]}
        io.remove(run_dir / "metrics.json")  # the old model's record goes before the new model comes
        save_model(run_dir / "model", ema, schedule, data=self.cfg["data"], shape=list(self.data.shape),
                   value_range=value_range(self.data.x), steps=self.trainer.step, train_seconds=m["train_seconds"],
                   **{"lambda": lam, "bounds": record})
        plot_loss_curve(run_dir / "log.jsonl", run_dir / "loss.png", **ex.loss_curves(self.trainer.objective))
        self.plots = [run_dir / "loss.png"] + (ex.plot_dual(run_dir / "log.jsonl", run_dir) if self.constraints else [])
        io.write_json_atomic(run_dir / "metrics.json", {**m, "versions": io.versions()})
        return m


def run_train(args: argparse.Namespace) -> int:
    if args.restore:
        restore_only(args, "condiff dual train", ("constraint_data", *OWN_RESULTS, *RESULT_DIRS), "--config / --set",
                     curves=ex.DUAL_CURVES)
        return 0
    old = recorded_settings(args.out, args.resume, args.config is not None, "pass --config", "pass --config")
    if old is not None:  # --resume without --config: the run's own settings
        cfg = resolve(Path(args.out) / "config.json", args.overrides, old)
    elif args.config is not None:
        cfg = resolve(args.config, args.overrides)
    else:
        raise ValueError("--config is needed (without it, --resume with the --out of an earlier run takes that "
                         "run's recorded settings)")
    cfg = absolute_paths(cfg)
    device = pick_device(args.device)
    run_dir = check_out_dir(args.out, kind="condiff dual train",  # (--resume takes --out and may have no --config)
                            default=lambda: Path("runs") / f"dual-{Path(args.config).stem}")
    args.run_dir = run_dir  # for the Ctrl-C hint
    if old is not None:
        announce_recorded(run_dir, args.overrides)
    saved_by = f"the run's settings in {run_dir / 'config.json'}" if old is not None else None
    job = start_run(run_dir, args.resume, args.fresh, lambda: DualJob(cfg, run_dir, device, args.fresh, saved_by),
                    clear=("constraint_data", *OWN_RESULTS, *RESULT_DIRS), data=cfg.get("data"),
                    model=cfg.get("model"), objective=cfg.get("objective"),  # the examples the model trains on
                    # fine-tuning takes the schedule of the model it starts from: nothing of the file's to compare
                    schedule=None if (cfg.get("dual") or {}).get("init") else cfg.get("schedule"))
    job.cache.save()
    save_resolved_config(run_dir, cfg)  # only once the checkpoint (if any) has loaded into this model
    m = job.fit(stale=(*OWN_RESULTS, *RESULT_DIRS))
    if m is None:
        return 0
    io.drop_replaced(run_dir)  # what --fresh set aside: the new run is finished
    print(io.json_text(m), end="")
    plots = ", ".join(p.name for p in job.plots)  # no slack.png before the first dual update
    print(f"model:   {run_dir / 'model'}\nmetrics: {run_dir / 'metrics.json'}\nplots:   {run_dir}/ {plots}",
          file=sys.stderr)  # stdout: the JSON alone
    return 0
