"""``condiff train``: train a diffusion model from a preset, a TOML file and overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train import list_checkpoints
from .common import TrainingJob, add_config_args, check_out_dir, pick_device, save_resolved_config
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
    run_dir = check_out_dir(args.out or Path("runs") / Path(str(cfg["data"]["name"])).stem)
    existing = list_checkpoints(run_dir / "checkpoints")
    if existing and not (args.resume or args.fresh):
        raise FileExistsError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}): "
                              "pass --resume to continue or --fresh to start over")
    job = TrainingJob(cfg, run_dir)  # data, model and settings checked before the run directory changes
    if args.fresh:
        import shutil

        for d in ("checkpoints", "model"):
            shutil.rmtree(run_dir / d, ignore_errors=True)
        (run_dir / "log.jsonl").unlink(missing_ok=True)
    if args.resume and not job.resume():
        print(f"no checkpoint in {run_dir / 'checkpoints'}: starting from step 0")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(run_dir, cfg)  # only once the checkpoint (if any) has loaded into this model
    model_dir = job.fit()
    print(f"model: {model_dir}\nlog:   {run_dir / 'log.jsonl'}\nloss:  {run_dir / 'loss.png'}")
    return 0
