"""``condiff dual``: train diffusion models under distributional constraints (dual training).

  condiff dual train --config run.toml [--set dual.lr=0.5] [--out DIR] [--resume | --fresh]
  condiff dual toy       theory check on a 2-D Gaussian mixture        (writes metrics.json + plots)
  condiff dual fair      fair generation on imbalanced digits          (writes metrics.json + plots)
  condiff dual finetune  fine-tuning on 30 images without overfitting  (writes metrics.json + plots)

A ``dual train`` config file has the tables of ``condiff train`` ([data] [model] [schedule] [train]
[sample]) plus [dual] (dual-step settings, and ``init``: a model to start from), [objective]
(the data q_0) and one [[constraint]] table per constraint; see docs/dual.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..data import ArrayData, load_dataset
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
from ..train import TrainConfig, Trainer, list_checkpoints
from . import config as config_mod
from .common import load_model_for, net_config, pick_device, save_resolved_config
from .train import INTERRUPTED

DUAL_TABLES = ("dual", "objective", "constraint")
SOURCE_KEYS = {"data", "split", "classes", "keep", "n", "offset", "seed",  # a data set ...
               "model", "steps", "eta", "batch_size"}                        # ... or model samples
CONSTRAINT_KEYS = SOURCE_KEYS | {"name", "bound", "relative", "reference"}
EXPERIMENTS = {"toy": (ex.ToyConfig, ex.run_toy, "runs/dual-toy"),
               "fair": (ex.FairConfig, ex.run_fair, "runs/dual-fair"),
               "finetune": (ex.FinetuneConfig, ex.run_finetune, "runs/dual-finetune")}


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="dual training under distributional constraints", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="dual_command", metavar="{train,toy,fair,finetune}")
    cmds.required = True
    t = cmds.add_parser("train", help="constrained training from a config file")
    t.add_argument("--config", required=True, metavar="TOML",
                   help="run file with [dual] [objective] [[constraint]]")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=500 or --set dual.lr=0.5 (repeatable)")
    t.add_argument("--out", default=None, help="run directory (default: runs/dual-<config name>)")
    t.add_argument("--device", default=None)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--fresh", action="store_true", help="discard checkpoints in --out and start over")
    t.set_defaults(func=run_train, interrupted=INTERRUPTED)
    for exp, (cls, fn, out) in EXPERIMENTS.items():
        e = cmds.add_parser(exp, help=" ".join((fn.__doc__ or "").split()).split(". ")[0], description=cls.__doc__)
        e.add_argument("--out", default=out,
                       help=f"output directory (default {out}); trained models are reused")
        e.add_argument("--profile", default="quick", help="quick (CPU, minutes) or full (GPU)")
        e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set n_samples=500 or --set train.steps=800")
        e.add_argument("--device", default=None)
        e.set_defaults(func=run_experiment, experiment=exp)


# --- experiments ---------------------------------------------------------------------------------


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """``key=value`` or ``table.key=value`` (into a dict field such as ``train``), value read as TOML."""
    d = json.loads(json.dumps(asdict(cfg)))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if path[0] not in d or len(path) > 2 or (len(path) == 2 and not isinstance(d[path[0]], dict)):
            raise ValueError(f"unknown setting {key!r}; settings: {sorted(d)}")
        config_mod.set_path(d, path, config_mod.toml_value(raw))  # a ConfigError is a ValueError
    return type(cfg).from_dict(d)


def run_experiment(args: argparse.Namespace) -> int:
    cls, fn, _ = EXPERIMENTS[args.experiment]
    cfg = apply_overrides(ex.profile_config(cls, args.profile), args.overrides)
    device = pick_device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    m = fn(cfg, Path(args.out), device)
    print(json.dumps({k: v for k, v in m.items() if k != "config"}, indent=1, default=str))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


# --- dual train: config -> objects ---------------------------------------------------------------


def read_run_file(path: str | Path) -> tuple[dict, dict]:
    """Split a run file into the standard tables and the dual tables."""
    p = Path(path)
    raw = config_mod.load_toml(p)
    dual = {k: raw.pop(k) for k in DUAL_TABLES if k in raw}
    config_mod.check_sections(raw, str(p))
    cons = dual.get("constraint", [])
    if not isinstance(cons, list) or not all(isinstance(c, dict) for c in cons):
        raise config_mod.ConfigError(f"{p}: constraints must be [[constraint]] tables")
    for k in ("dual", "objective"):
        if not isinstance(dual.get(k, {}), dict):
            raise config_mod.ConfigError(f"{p}: [{k}] must be a table")
    return raw, {"dual": dict(dual.get("dual", {})), "objective": dict(dual.get("objective", {})),
                 "constraint": [dict(c) for c in cons]}


def resolve(file: str | Path, overrides: list[str]) -> dict:
    """Preset of the data set < run file < overrides; ``dual.*`` and ``objective.*`` overrides too."""
    std, dual = read_run_file(file)
    parsed = [config_mod.parse_override(o, config_mod.SECTIONS + ("dual", "objective")) for o in overrides]
    for path, value in parsed:
        if path[0] in ("dual", "objective"):
            config_mod.set_path(dual, path, value)
    cfg = config_mod.assemble(std, [(p, v) for p, v in parsed if p[0] in config_mod.SECTIONS])
    cfg.update(dual)
    return cfg


def _check_keys(spec: dict, known: set[str], where: str) -> None:
    bad = sorted(set(spec) - known)
    if bad:
        raise config_mod.ConfigError(f"{where}: unknown key(s) {bad}; known: {sorted(known)}")


def build_source(spec: dict, cfg: dict, where: str, objective: ArrayData | None, device: str,
                 cache: Path | None) -> ArrayData:
    """One data set of the problem from its table: a data set (``data``, ``split``) or the objective's
    data (``data = "objective"``), then ``keep``, then ``classes`` / ``n`` / ``offset``; or ``n``
    samples of a trained ``model`` (cached as safetensors in ``cache``)."""
    seed = int(spec.get("seed", 0))
    if "model" in spec:
        if cache is not None and io.has_group(cache, where) and io.load_config(cache).get(where) == spec:
            return ArrayData(io.load_group(cache, where)["x"], name=where)
        den, _, shape = load_model_for(spec["model"], device)
        x = model_samples(den, int(spec.get("n", 1000)), shape, steps=int(spec.get("steps", 100)),
                          eta=float(spec.get("eta", 1.0)), seed=seed,
                          batch_size=int(spec.get("batch_size", 500)), device=device,
                          clip_x0=cfg.get("sample", {}).get("clip_x0"))
        if cache is not None and int(os.environ.get("RANK", "0")) == 0:
            old = io.load_config(cache) if (cache / io.CONFIG).is_file() else {}
            groups = {g: io.load_group(cache, g) for g in old if io.has_group(cache, g) and g != where}
            io.save_checkpoint(cache, {**groups, where: {"x": x}}, {**old, where: spec})
        return ArrayData(x, name=where)
    name = spec.get("data", cfg["data"]["name"])
    if name == "objective":
        if objective is None:
            raise config_mod.ConfigError(f"{where}: data = 'objective' is only for constraints")
        data = objective
    else:
        kw = {k: v for k, v in cfg["data"].items() if k not in ("name", "split", "labels")} \
            if name == cfg["data"]["name"] else {}
        data = load_dataset(name, split=spec.get("split", "train"), **kw)
    if "keep" in spec:
        if not isinstance(spec["keep"], dict):
            raise config_mod.ConfigError(f"{where}: keep must be a table {{class = fraction}}")
        data = keep_fraction(data, {int(k): float(v) for k, v in spec["keep"].items()}, seed=seed)
    if any(k in spec for k in ("classes", "n", "offset")):
        n = spec.get("n")
        data = select(data, classes=spec.get("classes"), n=None if n is None else int(n),
                      offset=int(spec.get("offset", 0)), seed=seed)
    return data


def build_constraints(cfg: dict, objective: ArrayData, schedule: Schedule, dcfg: DualConfig, init: str | None,
                      device: str, cache: Path) -> tuple[list[Constraint], list[dict]]:
    """Constraints with their bounds resolved; also a JSON record of how each bound was set."""
    out, record = [], []
    for j, spec in enumerate(cfg["constraint"]):
        where = f"constraint {j + 1}"
        _check_keys(spec, CONSTRAINT_KEYS, where)
        if "name" not in spec:
            raise config_mod.ConfigError(f"{where}: needs a name")
        where = f"constraint {spec['name']!r}"
        if ("bound" in spec) == ("relative" in spec):
            raise config_mod.ConfigError(f"{where}: give exactly one of bound (absolute) or relative "
                                         "(times a reference model's loss)")
        data = build_source({k: v for k, v in spec.items() if k in SOURCE_KEYS}, cfg, spec["name"], objective,
                            device, cache)
        if data.shape != objective.shape:
            raise config_mod.ConfigError(f"{where}: samples of shape {data.shape}, "
                                         f"objective data {objective.shape}")
        if "bound" in spec:
            bound, rec = float(spec["bound"]), {"bound": float(spec["bound"])}
        else:
            ref_path = spec.get("reference", init)
            if ref_path is None:
                raise config_mod.ConfigError(f"{where}: a relative bound needs reference = 'MODEL' "
                                             "(or [dual] init)")
            den = load_model_for(ref_path, device)[0]
            ref = float(reference_losses(den, schedule, [data.x], timesteps=dcfg.timesteps,
                                         t_range=dcfg.t_range, n=4096, seed=dcfg.seed)[0])
            bound = float(spec["relative"]) * ref
            rec = {"bound": bound, "relative": float(spec["relative"]), "reference": str(ref_path),
                   "reference_loss": ref}
        out.append(Constraint(spec["name"], data.x, bound, spec.get("batch_size")))
        record.append({"name": spec["name"], "n": len(data), **rec})
    return out, record


def run_train(args: argparse.Namespace) -> int:
    cfg = resolve(args.config, args.overrides)
    device = pick_device(args.device)
    run_dir = Path(args.out or Path("runs") / f"dual-{Path(args.config).stem}")
    existing = list_checkpoints(run_dir / "checkpoints")
    if existing and not (args.resume or args.fresh):
        raise FileExistsError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}): "
                              "pass --resume to continue or --fresh to start over")
    if args.fresh:
        for d in ("checkpoints", "model", "constraint_data"):
            shutil.rmtree(run_dir / d, ignore_errors=True)
        (run_dir / "log.jsonl").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    dual = dict(cfg["dual"])
    init = dual.pop("init", None)
    _check_keys(cfg["objective"], SOURCE_KEYS - {"model", "steps", "eta", "batch_size"}, "[objective]")
    objective_data = build_source(cfg["objective"], cfg, "objective", None, device, None)
    if init is not None:  # fine-tuning: architecture and schedule come from the model we start from
        net, init_cfg = load_net(init, device)
        cfg["model"], cfg["schedule"] = dict(net.config), dict(init_cfg["schedule"])
    else:
        torch.manual_seed(int(cfg["train"].get("seed", 0)))
        net = build_net(net_config({**cfg, "data": {**cfg["data"], "labels": False}}, objective_data))
    schedule = Schedule.from_config(cfg["schedule"])
    tcfg = TrainConfig.from_dict({**cfg["train"], "device": device})
    dcfg = DualConfig.from_dict({"seed": tcfg.seed, **dual})
    constraints, record = build_constraints(cfg, objective_data, schedule, dcfg, init, device,
                                            run_dir / "constraint_data")
    objective = DualObjective(objective_data.x, constraints, schedule, tcfg.batch_size, dcfg)
    cfg["bounds"] = record
    save_resolved_config(run_dir, cfg)
    shape = list(objective_data.shape)
    meta = {"net": net.config, "schedule": schedule.config(), "data": cfg["data"], "shape": shape}
    trainer = Trainer(net, objective, tcfg, run_dir, meta)
    if args.resume and trainer.resume():
        print(f"resumed from step {trainer.step} of {tcfg.steps} (lambda {objective.lambdas})")
    t0 = time.perf_counter()
    ema = trainer.fit()
    if not trainer.dist.main:
        return 0
    final = torch.cat([  # dual estimator, 4096 draws: L_0 on all of [0, T), the L_i on t_range
        reference_losses(ema, schedule, [objective.x], timesteps=dcfg.timesteps, n=4096, seed=dcfg.seed + 1),
        reference_losses(ema, schedule, [c.x for c in constraints], timesteps=dcfg.timesteps, n=4096,
                         seed=dcfg.seed + 1, t_range=dcfg.t_range)])
    lam = objective.lambdas
    m = {"steps": trainer.step, "train_seconds": round(time.perf_counter() - t0, 2), "lambda": lam,
         "objective_loss": float(final[0]), "n_objective": len(objective_data),
         "constraints": [{**r, "final_loss": v, "slack": v - r["bound"], "lambda": lam[r["name"]]}
                         for r, v in zip(record, final[1:].tolist())]}
    save_model(run_dir / "model", ema, schedule, data=cfg["data"], shape=shape, steps=trainer.step,
               train_seconds=m["train_seconds"], **{"lambda": lam, "bounds": record})
    plot_loss_curve(run_dir / "log.jsonl", run_dir / "loss.png", keys=("loss", "L0"))
    if constraints:
        ex.plot_dual(run_dir / "log.jsonl", run_dir)
    io.write_json_atomic(run_dir / "metrics.json", m)
    print(json.dumps(m, indent=1))
    plots = "{loss,lambda,slack}.png" if constraints else "loss.png"  # no constraints: no dual plots
    print(f"model:   {run_dir / 'model'}\nmetrics: {run_dir / 'metrics.json'}\nplots:   {run_dir}/{plots}")
    return 0
