"""``condiff train``: train a diffusion model from a preset, a TOML file and overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import io
from ..train import list_checkpoints
from .common import (
    MODEL_RESULTS,
    TrainingJob,
    add_config_args,
    announce_recorded,
    check_out_dir,
    pick_device,
    recorded_settings,
    restore_only,
    save_resolved_config,
    start_run,
)
from .config import assemble, parse_override, resolve

# a Ctrl-C during training checkpoints the step in flight
INTERRUPTED = ("add --resume to the same command to continue from the newest checkpoint (one is saved at "
               "the step in flight when training was under way)")


def interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C hint: --resume where the run has a checkpoint, else a plain rerun (nothing was saved)."""
    run_dir = getattr(args, "run_dir", None)
    kept = Path(run_dir) / io.REPLACED if run_dir is not None else None
    restore = (f"; the run --fresh replaced is kept in {kept} (--restore in place of --fresh puts it back)"
               if kept is not None and io.kept_names(run_dir) else "")
    if run_dir is not None and list_checkpoints(Path(run_dir) / "checkpoints"):
        how = INTERRUPTED.replace("add --resume to", "pass --resume (instead of --fresh) to") if getattr(
            args, "fresh", False) else INTERRUPTED.replace("add --resume to", "run") if getattr(
            args, "resume", False) else INTERRUPTED
        return how + restore
    return "no checkpoint was saved yet: run the same command again to start over" + restore


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="train a diffusion model", description=__doc__)
    add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<data>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (without --data and --config: with the "
                        "settings recorded there, plus any --set)")
    g.add_argument("--fresh", action="store_true",
                   help="replace the run in --out (checkpoints, model, log, the old model's samples and metrics; "
                        "kept in --out/.replaced until the new run finishes) and start over")
    g.add_argument("--restore", action="store_true",
                   help="put back the run in --out that an unfinished --fresh set aside in --out/.replaced, "
                        "deleting the failed attempt's files")
    p.set_defaults(func=run, interrupted=interrupted)


#: What ``--fresh`` replaces besides checkpoints, model and log: results of the old model (``condiff eval``,
#: ``sample``, ``solve`` and ``pnp`` write them beside it by default), which would otherwise sit beside the new one.
FRESH_CLEARS = MODEL_RESULTS


def settings(args: argparse.Namespace) -> tuple[dict, bool]:
    """The run's settings: preset < --config < --set; with --resume and neither --data nor --config, the
    settings recorded in the run's config.json < --set (so `condiff train --out R --resume` continues R).
    Returns them with whether they are the recorded ones."""
    given = args.data is not None or args.config is not None
    old = recorded_settings(args.out, args.resume, given, "pass --data / --config as it was trained with")
    if old is None:
        return resolve(args.data, args.config, args.overrides), False
    if not (isinstance(old.get("data"), dict) and old["data"].get("name")):
        raise ValueError(f"--resume: {Path(args.out) / 'config.json'} records no data set: not a `condiff train` "
                         "run (pass --data / --config as it was trained with)")
    where = str(Path(args.out) / "config.json")
    return assemble(old, [parse_override(o) for o in args.overrides], None, where, recorded=True), True


def run(args: argparse.Namespace) -> int:
    if args.restore:
        restore_only(args, "condiff train", FRESH_CLEARS, "--data / --config / --set")
        return 0
    cfg, recorded = settings(args)
    cfg["_device"] = pick_device(args.device)
    default = Path("runs") / Path(str(cfg["data"]["name"])).stem
    run_dir = check_out_dir(args.out, default=default, kind="condiff train",
                            inputs={"--data": str(cfg["data"]["name"])})
    if recorded:
        announce_recorded(run_dir, args.overrides)
    args.run_dir = run_dir  # for the Ctrl-C hint
    given = args.data is not None or args.config is not None  # else the hint below would name nothing to drop
    saved_by = f"the run's settings in {run_dir / 'config.json'}" if recorded else None
    job = start_run(run_dir, args.resume, args.fresh, lambda: TrainingJob(cfg, run_dir, saved_by), data=cfg["data"],
                    schedule=cfg.get("schedule"), clear=FRESH_CLEARS, model=cfg.get("model"),
                    resume_hint=" (--resume without --data and --config takes them from there)" if given else "")
    save_resolved_config(run_dir, cfg)  # only once the checkpoint (if any) has loaded into this model
    model_dir = job.fit(stale=FRESH_CLEARS)
    if job.trainer.dist.main:  # once, not from every torchrun process
        io.drop_replaced(run_dir)  # what --fresh set aside: the new run is finished
        print(f"model: {model_dir}\nlog:   {run_dir / 'log.jsonl'}\nloss:  {run_dir / 'loss.png'}")
    return 0
