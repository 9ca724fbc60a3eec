"""``condiff train``: train a diffusion model from a preset, a TOML file and overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train import list_checkpoints
from .common import add_config_args, pick_device, save_resolved_config, train_model
from .config import resolve

INTERRUPTED = "training stopped at a checkpoint; add --resume to the same command to continue"


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="train a diffusion model", description=__doc__)
    add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<data>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--fresh", action="store_true", help="discard checkpoints in --out and start over")
    p.set_defaults(func=run, interrupted=INTERRUPTED)


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args.data, args.config, args.overrides)
    cfg["_device"] = pick_device(args.device)
    run_dir = Path(args.out or Path("runs") / Path(str(cfg["data"]["name"])).stem)
    existing = list_checkpoints(run_dir / "checkpoints")
    if existing and not (args.resume or args.fresh):
        raise FileExistsError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}): "
                              "pass --resume to continue or --fresh to start over")
    if args.fresh:
        import shutil

        for d in ("checkpoints", "model"):
            shutil.rmtree(run_dir / d, ignore_errors=True)
        (run_dir / "log.jsonl").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(run_dir, cfg)
    model_dir = train_model(cfg, run_dir, resume=args.resume)
    print(f"model: {model_dir}\nlog:   {run_dir / 'log.jsonl'}\nloss:  {run_dir / 'loss.png'}")
    return 0
