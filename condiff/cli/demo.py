"""``condiff demo``: the main job on the bundled defaults.

Trains the default diffusion model on scikit-learn's digits (or reuses the model a previous demo
trained with the same settings), samples from it, evaluates the samples with the project's digits
classifier, and writes a run directory with a sample grid, the loss curve, metrics.json and the
checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import io
from .common import add_device_arg, check_out_dir, pick_device, save_resolved_config, train_or_reuse
from .config import resolve
from .evaluate import evaluate_run


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="train, sample and evaluate the default digits model", description=__doc__)
    p.add_argument("--out", default=None, help="run directory (default runs/demo)")
    p.add_argument("--data", default="digits",
                   help="data set: digits (the default), toy2d, patches, or any data set or .npy/.npz file "
                        "`condiff train --data` takes")
    p.add_argument("--config", metavar="TOML", help="TOML file overriding the data set's preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--retrain", action="store_true",
                   help="train again, replacing the model in --out (needed too when it was trained with other "
                        "settings)")
    add_device_arg(p)
    p.set_defaults(func=run, interrupted=_interrupted)


def _interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C hint: training goes on where it stopped, or a model trained is reused."""
    if not getattr(args, "trained", False):
        return "run the same command again: training resumes where it stopped"
    if args.retrain:
        return "run it again without --retrain: it reuses the model just trained"
    return "run the same command again: it reuses the trained model"


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args.data, args.config, args.overrides)
    cfg["_device"] = device = pick_device(args.device)
    run_dir = check_out_dir(args.out, kind="condiff train", by="condiff demo", default="runs/demo")  # evaluated too
    if cfg["sample"]["n"] < 2:  # checked now, not after the training
        raise ValueError(f"condiff demo evaluates a distribution: sample.n must be >= 2, got {cfg['sample']['n']}")
    t0 = time.perf_counter()
    what = f"training on {cfg['data']['name']} for {cfg['train']['steps']} steps ({device})"
    _, reused = train_or_reuse(cfg, run_dir, retrain=args.retrain, announce=what,
                               remedy="pass --retrain to replace it, or give another --out")
    args.trained = True  # (for the Ctrl-C hint)
    before = (run_dir / "config.json").read_bytes()
    if reused:
        print(f"reusing the trained model in {run_dir / 'model'} (pass --retrain to train again)", file=sys.stderr)
        save_resolved_config(run_dir, cfg)  # sampling / eval settings may have changed: they are read from there
    t_train = time.perf_counter() - t0
    sample_args = argparse.Namespace(n=None, steps=None, eta=None, seed=None, batch_size=None)
    try:
        m = evaluate_run(run_dir, sample_args, run_dir, device, n_flag="--set sample.n={}")  # (demo has no --n)
    except BaseException:  # the settings go back to those of the results beside them
        io.write_file_atomic(run_dir / "config.json", lambda f: f.write(before), binary=True)
        raise
    print(summary(m, run_dir, t_train))
    return 0


def summary(m: dict, run_dir: Path, t_train: float) -> str:
    lines = [f"\ncondiff demo: {run_dir}", f"  train / load time   {t_train:8.1f} s",
             f"  sampling            {m['sample_seconds']:8.1f} s ({m['sample_steps']} steps, eta {m['eta']})"]
    for key, label in (("mean_top_prob", "mean top-class prob"), ("tv_to_uniform", "TV to uniform"),
                       ("frechet_to_test", "Fréchet to test"), ("frechet_train_vs_test", "  (train vs test)"),
                       ("mmd_ratio", "MMD ratio to real")):
        if m.get(key) is not None:
            lines.append(f"  {label:<20}{m[key]:8.3f}")
        elif key in m:  # the MMD of constant data (eval says why in metrics.json)
            lines.append(f"  {label:<20}{'n/a':>8}")
    for name, ok in m.get("targets", {}).items():
        lines.append(f"  target {name:<24} {'met' if ok else 'MISSED'}")
    lines += [f"  samples  {run_dir / 'samples.png'}", f"  loss     {run_dir / 'loss.png'}",
              *([f"  classes  {run_dir / 'class_hist.png'}"] if "class_hist" in m else []),
              f"  metrics  {run_dir / 'metrics.json'}", f"  model    {run_dir / 'model'}"]
    return "\n".join(lines)
