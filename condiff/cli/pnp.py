"""``condiff pnp``: plug-and-play inference with a fixed diffusion prior (Graikos et al. 2022).

  condiff pnp digits      conditional digits: a classifier constraint (--label) or mirror symmetry (--symmetry)
  condiff pnp segment     infer the mask channel of a (picture, mask) prior for synthetic scenes
  condiff pnp tsp         solve random TSP instances with a prior over pictures of optimal tours
  condiff pnp constraint  any prior under any constraint: a registered name, or FILE.py:NAME for your own
                          callable x -> (B,) distances (beside the prior's own samples)

Each writes pictures and ``metrics.json`` to ``--out`` (default: beside the prior, ``RUN/pnp/<task>``, as
``condiff solve`` writes ``RUN/solve/...``). The segment and tsp priors are ordinary condiff
models (``condiff train --data scenes|tours ...``); ``--train`` trains the default prior into
``--ckpt`` first when it holds none (docs/pnp.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import checks, io
from ..data.files import save_png_grid
from ..models import resolve_model_dir
from ..plots import plot_image_columns, pyplot
from ..pnp import schedules as sch
from ..userfile import absolute_spec, spec_label
from .common import (
    add_device_arg,
    check_out_dir,
    json_table,
    load_model_for,
    model_is_complete,
    pick_device,
    recorded_path,
    results_dir,
    same_settings,
    train_or_reuse,
)
from .config import merge
from .sample import condition

# strings become schedule objects here, and only here
TIME_SCHEDULES = {
    "paper-mnist": lambda: sch.PAPER_MNIST,
    "paper-tsp": lambda: sch.PAPER_TSP,
    "linear": lambda: sch.LinearAnneal(1.0, 0.0),
    "linear-half": lambda: sch.LinearAnneal(0.5, 0.0),
    "linear-0.6": lambda: sch.LinearAnneal(0.6, 0.0),
}
# each task's --help paragraph
DESCRIPTIONS = {
    "digits": ("Conditional digits from an unconditional digits prior: the log-probability of a class under the "
               "project's classifier (--label), or a mirror-symmetry distance (--symmetry), is the PnP constraint."),
    "segment": ("Segmentation by PnP: a prior over (picture, mask) pairs infers the mask of a given picture, "
                "scored by IoU against the true mask, beside 2-means (colour) and Otsu-threshold baselines."),
    "tsp": ("The continuous TSP relaxation: an adjacency latent, rendered as a picture, is inferred under a prior "
            "over pictures of good tours, decoded to a tour and refined by 2-opt; scored by the gap to the optimum."),
    "constraint": ("Any prior under any differentiable constraint: a registered family by name, or a function of "
                   "your own (FILE.py:NAME, x -> (B,) distances), beside the prior's own samples."),
}

WEIGHT_SCHEDULES = {"constant": sch.ConstantWeight, "linear": lambda w: sch.LinearWeight(w, 0.0)}

# Default priors: the run configuration trained by --train and by the benchmark, per profile.
# "quick" fits a shared 2-core CPU; "full" is the GPU profile (the paper's TSP-50 at 64 px).
PRIORS: dict[str, dict[str, dict]] = {
    "tsp": {
        "quick": {
            "data": {"name": "tours", "cities": [10, 20], "size": 32, "n": 8000},
            "model": {"name": "unet", "in_channels": 1, "base": 16, "mults": [1, 2, 2], "num_res": 1,
                      "attn_res": [4]},
            "train": {"steps": 3000, "batch_size": 32, "lr": 2e-3, "warmup": 200, "ema_decay": 0.999,
                      "ckpt_every": 250, "log_every": 50},
        },
        "full": {
            "data": {"name": "tours", "cities": [50], "size": 64, "n": 50000},
            "model": {"name": "unet", "in_channels": 1, "base": 64, "mults": [1, 2, 2, 2], "num_res": 2,
                      "attn_res": [8]},
            "train": {"steps": 60000, "batch_size": 64, "lr": 2e-4, "warmup": 1000, "ema_decay": 0.9995,
                      "ckpt_every": 2000, "log_every": 100, "progress": True},
        },
    },
    "digits": {  # the benchmark's digits prior (the CLI defaults to the demo model, runs/demo)
        "quick": {
            "data": {"name": "digits"},
            "model": {"name": "unet", "in_channels": 1, "base": 32, "mults": [1, 2], "num_res": 1},
            "train": {"steps": 1500, "batch_size": 128, "lr": 2e-3, "warmup": 200, "ema_decay": 0.998,
                      "ckpt_every": 500, "log_every": 50},
        },
        "full": {
            "data": {"name": "digits"},
            "model": {"name": "unet", "in_channels": 1, "base": 64, "mults": [1, 2, 2], "num_res": 1},
            "train": {"steps": 4000, "batch_size": 128, "lr": 2e-3, "warmup": 200, "ema_decay": 0.999,
                      "ckpt_every": 500, "log_every": 50, "progress": True},
        },
    },
    "segment": {
        "quick": {
            "data": {"name": "scenes", "size": 24, "n": 8000},
            # base 32 for 8000 steps (about 21 min on 2 idle CPU cores): loss 0.050 against the base-16,
            # 2000-step prior's 0.061, though the inferred masks scored the same (docs/pnp.md)
            "model": {"name": "unet", "in_channels": 4, "base": 32, "mults": [1, 2, 2], "num_res": 1,
                      "attn_res": [4]},
            "train": {"steps": 8000, "batch_size": 32, "lr": 1e-3, "warmup": 200, "ema_decay": 0.999,
                      "ckpt_every": 250, "log_every": 50},
        },
        "full": {
            "data": {"name": "scenes", "size": 64, "n": 50000},
            "model": {"name": "unet", "in_channels": 4, "base": 64, "mults": [1, 2, 2, 2], "num_res": 2,
                      "attn_res": [8]},
            "train": {"steps": 40000, "batch_size": 64, "lr": 2e-4, "warmup": 1000, "ema_decay": 0.9995,
                      "ckpt_every": 2000, "log_every": 100, "progress": True},
        },
    },
}


def prior_config(kind: str, profile: str) -> dict:
    """The full run configuration of a default prior (DDPM's linear schedule, T = 1000)."""
    if kind not in PRIORS or profile not in PRIORS[kind]:
        raise ValueError(f"no default prior for {kind!r} / {profile!r}; known: "
                         f"{ {k: sorted(v) for k, v in PRIORS.items()} }")
    return merge({"schedule": {"kind": "linear", "T": 1000}}, PRIORS[kind][profile])


def ensure_prior(kind: str, profile: str, run_dir: str | Path, device: str) -> Path:
    """Train the default prior into ``run_dir`` unless it already holds one trained with these settings
    (an interrupted run resumes from its newest checkpoint). Returns ``run_dir``."""
    run_dir = Path(run_dir)
    cfg = prior_config(kind, profile)
    cfg["_device"] = device  # not part of the settings compared below: a CPU-trained prior serves a GPU run
    if model_is_complete(run_dir, cfg):
        return run_dir
    if (run_dir / "config.json").is_file() and not same_settings(run_dir, cfg):
        # unlike the benchmarks' own run directories, this one may be the user's: never discard it, and
        # use a finished prior of the user's own as it is (its data are checked when it loads)
        if "net" in json_table(resolve_model_dir(run_dir) / "config.json"):  # a run's model/ or a model dir
            print(f"--train: {run_dir} holds a prior of other settings than the default {kind} prior; using it "
                  "as it is (without --train, nothing is said)", file=sys.stderr)
            return run_dir
        raise FileExistsError(f"{run_dir} holds an unfinished run with other settings than the default {kind} "
                              "prior: finish it (`condiff train ... --resume`) or pick another directory")
    check_out_dir(run_dir, "the prior's directory")  # a file there, no write access: said before training
    train_or_reuse(cfg, run_dir, announce=f"training the {profile} {kind} prior into {run_dir} "
                                          f"({cfg['train']['steps']} steps, {device})")
    return run_dir


# --- argument parsing ------------------------------------------------------------------------------------


#: The Ctrl-C hint of the pnp commands that train their prior with --train: it keeps its checkpoints.
PNP_INTERRUPTED = ("run the same command again (a prior that --train was training resumes from its newest "
                   "checkpoint)")


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="plug-and-play inference with a fixed diffusion prior", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="pnp_command", metavar="TASK")
    s.required = True

    d = s.add_parser("digits", help="conditional digits from an unconditional digits model",
                     description=DESCRIPTIONS["digits"])
    _common(d, "runs/demo", "digits-<label> (or digits-symmetry)", steps=600, lr=0.05, schedule="paper-mnist")
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("--label", type=int, help="generate this digit (classifier constraint)")
    g.add_argument("--symmetry", action="store_true", help="left-right mirror symmetry constraint")
    d.add_argument("--n", type=int, default=64, help="number of samples (independent chains; at least 2; default 64)")
    d.add_argument("--weight", type=float, default=None,
                   help="constraint weight (default 0.1 with --label, 0.2 with --symmetry)")
    d.add_argument("--weight-schedule", choices=sorted(WEIGHT_SCHEDULES), default="constant",
                   help="the constraint weight over the steps: constant (default) or falling linearly to 0")
    d.add_argument("--finish", type=int, default=None, metavar="T",
                   help="re-noise the PnP result to timestep T and sample back to 0 with DPS on the same "
                        "constraint (default 0.4 T with --label: 400 of 1000; off with --symmetry; 0 turns it off)")
    d.add_argument("--finish-zeta", type=float, default=None, help="DPS step size of the finish (default 0.25)")
    _batch_option(d)
    d.set_defaults(func=run_digits, interrupted="run the same command again")

    m = s.add_parser("segment", help="infer masks of synthetic scenes with a (picture, mask) prior",
                     description=DESCRIPTIONS["segment"])
    _common(m, "runs/pnp/segment-quick", "segment", steps=1200, lr=0.05, schedule="linear")
    m.add_argument("--n", type=int, default=16, help="number of test scenes (default 16)")
    m.add_argument("--chains", type=int, default=4, help="chains per scene (default 4)")
    m.add_argument("--batch-size", type=int, default=256,
                   help="scenes searched at once, with all their chains (default 256; lower it to save memory)")
    m.add_argument("--votes", type=int, default=None,
                   help="foreground where at least this many chains say so (default 1: the union)")
    m.add_argument("--train", action="store_true", help="train the default prior into --ckpt if it holds none")
    m.add_argument("--profile", default="quick", help="default prior for --train: quick or full (default quick)")
    m.set_defaults(func=run_segment, interrupted=PNP_INTERRUPTED)

    t = s.add_parser("tsp", help="solve random TSP instances with a prior over pictures of tours",
                     description=DESCRIPTIONS["tsp"])
    _common(t, "runs/pnp/tsp-quick", "tsp-<cities>", steps=256, lr=1.0, schedule="paper-tsp")
    t.add_argument("--cities", type=int, default=20, help="cities per instance (default 20)")
    t.add_argument("--n", type=int, default=16, help="number of instances (default 16)")
    t.add_argument("--chains", type=int, default=1,
                   help="chains per instance; the shortest decoded tour wins (default 1)")
    t.add_argument("--train", action="store_true", help="train the default prior into --ckpt if it holds none")
    t.add_argument("--profile", default="quick", help="default prior for --train: quick or full (default quick)")
    t.set_defaults(func=run_tsp, interrupted=PNP_INTERRUPTED)

    c = s.add_parser("constraint", help="any prior under any differentiable constraint (yours: FILE.py:NAME)",
                     description=DESCRIPTIONS["constraint"])
    _common(c, "runs/demo", "constraint-<name> (FILE-NAME for FILE.py:NAME)", steps=600, lr=0.05,
            schedule="paper-mnist")
    c.add_argument("--constraint", required=True,
                   help="a registered constraint name (periodic, box, ...) or FILE.py:NAME, a callable x -> (B,) "
                        "distances, zero on the set, in your own Python file")
    c.add_argument("--n", type=int, default=16, help="number of samples (independent chains; at least 2; default 16)")
    c.add_argument("--weight", type=float, default=0.2,
                   help="constraint weight against the prior's denoising term (default 0.2; scale it to your "
                        "distance: the term is a sum over pixels)")
    c.add_argument("--weight-schedule", choices=sorted(WEIGHT_SCHEDULES), default="constant",
                   help="the constraint weight over the steps: constant (default) or falling linearly to 0")
    c.add_argument("--clamp", type=float, default=None, metavar="V",
                   help="keep the pictures within [-V, V] after every step (default: the prior's clip_x0, else none)")
    c.add_argument("--finish", type=int, default=0, metavar="T",
                   help="re-noise the result to timestep T and sample back to 0 with DPS on the constraint "
                        "(default 0: off)")
    c.add_argument("--finish-zeta", type=float, default=0.25, help="DPS step size of the finish (default 0.25)")
    _batch_option(c)
    c.set_defaults(func=run_constraint)  # it trains no prior (it takes a trained one)


def _common(p: argparse.ArgumentParser, ckpt: str, task: str, steps: int, lr: float, schedule: str) -> None:
    """``task``: the name of the default --out's last folder, as --help says it (:func:`default_out`)."""
    p.add_argument("--ckpt", default=ckpt, help=f"prior: run, model or diffusers directory (default {ckpt})")
    p.add_argument("--out", default=None,
                   help=f"output directory (default: RUN/pnp/{task} for a prior RUN or its model, so that the "
                        f"results of two priors never replace each other; RUN/pnp_step_N/... for a checkpoint "
                        f"RUN/checkpoints/step_N, DIR_pnp/... beside a bare model directory DIR)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimisation steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr})")
    p.add_argument("--schedule", choices=sorted(TIME_SCHEDULES), default=schedule,
                   help=f"timestep anneal (default {schedule})")
    p.add_argument("--stop-grad", action="store_true", help="skip the network Jacobian (cheaper variant)")
    p.add_argument("--seed", type=int, default=0, help="seed of the chains' noise and draws (default 0)")
    add_device_arg(p)


def _batch_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples optimised together (default 256); larger --n runs in batches one after the "
                        "other, so memory does not grow with --n (the draws, and so the samples, depend on it)")


def _run_pnp(args: argparse.Namespace, den, shape: tuple[int, ...], constraint, project: Callable | None,
             generator: torch.Generator, device: str) -> tuple[torch.Tensor, float, float]:
    """PnP inference (then the DPS finish, with ``--finish``) for ``--n`` samples, ``--batch-size`` at a
    time, one batch after the other from ``generator``: the samples, the inference and the finish
    seconds."""
    from ..guidance import DPS
    from ..pnp.engine import finish, infer

    xs, seconds, finish_seconds = [], 0.0, 0.0
    for start in range(0, args.n, args.batch_size):
        k = min(args.batch_size, args.n - start)
        res = infer(den, torch.randn(k, *shape, generator=generator, device=device), constraint=constraint,
                    schedule=TIME_SCHEDULES[args.schedule](),
                    weight=WEIGHT_SCHEDULES[args.weight_schedule](args.weight), steps=args.steps, lr=args.lr,
                    through_net=not args.stop_grad, project=project, generator=generator, progress=True)
        x = res.x if project is None else project(res.x)
        t0 = time.perf_counter()
        if args.finish > 0:
            guide = DPS(constraint, args.finish_zeta) if args.finish_zeta > 0 else None
            try:
                x = finish(den, x, args.finish, guidance=guide, generator=generator, progress=True)
            except FloatingPointError as e:  # the library's names; here zeta is a flag
                raise FloatingPointError(f"{e} (the finish's zeta is --finish-zeta; --finish 0 turns it off)") from None
        xs.append(x)
        seconds, finish_seconds = seconds + res.seconds, finish_seconds + time.perf_counter() - t0
    return torch.cat(xs), seconds, finish_seconds


def default_out(args: argparse.Namespace) -> Path:
    """The default --out: beside the prior (:func:`~condiff.cli.common.results_dir`, as ``solve`` and ``sample``
    place theirs), one folder per task and its main setting, so that neither another prior nor another task
    (a label, a city count, a constraint) replaces the results of the one before."""
    task = {"digits": lambda: f"digits-{'symmetry' if args.symmetry else args.label}",
            "segment": lambda: "segment", "tsp": lambda: f"tsp-{args.cities}",
            "constraint": lambda: f"constraint-{spec_label(args.constraint)}"}[args.pnp_command]()
    out = results_dir(args.ckpt, "pnp") / task
    own = absolute_spec(args.constraint, "--constraint", "a callable") if args.pnp_command == "constraint" else None
    if own is not None and _results_of_another_file(out, own.rpartition(":")[0]):
        # a/con.py:f and b/con.py:f share FILE-NAME: the second keeps its own folder, named by its path
        out = out.with_name(f"{task}-{hashlib.sha256(own.encode()).hexdigest()[:8]}")
    return out


def _results_of_another_file(out: Path, path: str) -> bool:
    """Whether ``out`` holds ``pnp constraint`` results for a constraint file other than ``path``."""
    try:
        recorded = json.loads((out / "metrics.json").read_text()).get("constraint") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(recorded, dict) and recorded.get("path") not in (None, path)


def _check_common(args: argparse.Namespace) -> None:
    """The options every task shares, checked before a prior is trained or loaded."""
    args.out = check_out_dir(args.out, kind=f"condiff pnp {args.pnp_command}",
                             default=lambda: default_out(args))
    checks.seed("--seed", args.seed)
    checks.integer("--steps", args.steps)
    checks.number("--lr", args.lr, "> 0")
    if hasattr(args, "batch_size"):
        checks.integer("--batch-size", args.batch_size, 1)


# the data set a default prior of each task is trained on (a prior that records another is refused)
PRIOR_DATA = {"segment": "scenes", "tsp": "tours"}


def _prior(args: argparse.Namespace, kind: str | None = None) -> tuple:
    _check_common(args)
    if kind is not None and args.profile not in PRIORS[kind]:  # checked with or without --train
        raise ValueError(f"--profile must be one of {sorted(PRIORS[kind])}, got {args.profile!r}")
    device = pick_device(args.device)
    torch.set_grad_enabled(True)
    if kind is not None and getattr(args, "train", False):
        ensure_prior(kind, args.profile, args.ckpt, device)
    if not Path(args.ckpt).exists():
        hint = (f" (pass --train to train the default {kind} prior there)" if kind
                else " (train one with `condiff demo`, or pass --ckpt runs/pnp/digits-quick after `condiff bench pnp`)")
        raise FileNotFoundError(f"no prior at {args.ckpt}{hint}")
    den, run_cfg, shape = load_model_for(args.ckpt, device)
    trained_on = (run_cfg.get("data") or {}).get("name")
    if kind in PRIOR_DATA and trained_on not in (None, PRIOR_DATA[kind]):
        raise ValueError(f"{args.ckpt} is a prior over {trained_on!r} data; pnp {kind} needs one trained on "
                         f"{PRIOR_DATA[kind]!r} (pass --train with a new --ckpt to train the default one)")
    den = condition(den, run_cfg, None, 0.0)  # warns where its unconditional predictions were never trained
    den.eval().requires_grad_(False)
    return den, run_cfg, shape, device


def _finish(args: argparse.Namespace, write: Callable[[Path], tuple[dict, list[Path]]]) -> int:
    """``write(folder)`` writes the command's files into ``folder`` and returns its metrics and the files;
    they are written together with ``metrics.json`` (:func:`condiff.io.writing_outputs`: a failure half-way
    leaves the previous results as they were), which records the command's settings (every option's value:
    seed, lr, schedules, batch size, prior), so that the figures can be reproduced from the file alone."""
    settings = {k: recorded_path(v) if k in ("ckpt", "out") else str(v) if isinstance(v, Path) else v
                for k, v in sorted(vars(args).items())
                if isinstance(v, bool | int | float | str | Path | type(None)) and k != "interrupted"}  # (a hint)
    out = Path(args.out)
    with io.writing_outputs(out, "metrics.json") as staged:
        metrics, files = write(staged)
        metrics = {**metrics, "settings": settings, "versions": io.versions()}
        io.write_json_atomic(staged / "metrics.json", metrics)
    print(io.json_text({k: v for k, v in metrics.items() if not isinstance(v, list | dict)}), end="")
    for f in [*files, staged / "metrics.json"]:
        print(f"wrote {out / f.relative_to(staged)}", file=sys.stderr)  # stdout: the JSON alone
    return 0


# --- digits -------------------------------------------------------------------------------------------------


def run_digits(args: argparse.Namespace) -> int:
    from ..classifier import DigitsJudge
    from ..pnp.conditional import (
        DIGITS_FINISH_AT,
        DIGITS_FINISH_ZETA,
        ClassConstraint,
        MirrorSymmetry,
        independent_digits_classifier,
        mean_pairwise_distance,
    )

    if args.n < 2:
        raise ValueError(f"--n must be >= 2, got {args.n}")
    if args.label is not None and not 0 <= args.label <= 9:
        raise ValueError(f"--label must be a digit 0-9, got {args.label}")
    den, _, shape, device = _prior(args)
    if tuple(shape) != (1, 8, 8):
        what = "pictures" if len(shape) == 3 else "vectors"  # a toy2d prior is no prior over pictures
        raise ValueError(f"{args.ckpt} is a prior over {tuple(shape)} {what}, not (1, 8, 8) digits")
    if args.weight is None:  # 0.1 beat 0.2 for labels in success and fidelity alike (docs/pnp.md)
        args.weight = 0.2 if args.symmetry else 0.1
    if args.finish is None:  # the finish brings the Fréchet distance to the samples' level (docs/pnp.md)
        args.finish = 0 if args.symmetry else round(DIGITS_FINISH_AT * den.schedule.T)
    if not 0 <= args.finish < den.schedule.T:
        raise ValueError(f"--finish must be a timestep in [0, {den.schedule.T}) (0: off), got {args.finish}")
    if args.finish_zeta is not None and args.finish == 0:  # a setting that would change nothing: said, not ignored
        raise ValueError("--finish-zeta sets the finish's step size, but the finish is off"
                         + (" (as it is with --symmetry)" if args.symmetry else "") + ": pass --finish T to turn it on")
    if args.finish_zeta is None:
        args.finish_zeta = DIGITS_FINISH_ZETA
    checks.number("--finish-zeta", args.finish_zeta, ">= 0")
    checks.number("--weight", args.weight, "> 0")
    judge = DigitsJudge(device=device)
    if args.symmetry:
        constraint = MirrorSymmetry(-1)
    else:
        # steer with a second classifier (seed 1) so that the judge (seed 0) scores honestly
        steer = independent_digits_classifier(1, device)
        constraint = ClassConstraint(steer.log_prob, args.label)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x, seconds, finish_seconds = _run_pnp(args, den, shape, constraint, lambda z: z.clamp(-1, 1), g, device)
    ev = judge.evaluate(x)
    metrics = {"task": "symmetry" if args.symmetry else f"label {args.label}", "n": args.n, "steps": args.steps,
               "finish": args.finish, "finish_zeta": args.finish_zeta if args.finish else None,
               "finish_seconds": round(finish_seconds, 2),
               "through_net": not args.stop_grad, "seconds": round(seconds, 2),
               "mean_asymmetry": float(MirrorSymmetry(-1)(x).mean()),
               "diversity": mean_pairwise_distance(x), "class_hist": ev["class_hist"],
               "mean_top_prob": ev["mean_top_prob"]}  # a Fréchet distance to all ten classes would mislead here
    if args.label is not None:
        metrics["success_rate"] = float((judge.probs(x).argmax(1) == args.label).float().mean())

    def write(out: Path) -> tuple[dict, list[Path]]:
        io.write_npz_atomic(out / "samples.npz", x=x.cpu().numpy())
        return metrics, [save_png_grid(x.cpu(), out / "samples.png"), out / "samples.npz"]

    return _finish(args, write)


# --- segmentation -------------------------------------------------------------------------------------------


def run_segment(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..data.scenes import split_scene
    from ..pnp.segmentation import SEGMENT_VOTES, iou, kmeans_segment, otsu_segment, segment

    votes = SEGMENT_VOTES if args.votes is None else args.votes
    checks.integer("--n", args.n, 1)
    if args.chains < 1:
        raise ValueError(f"--chains must be >= 1, got {args.chains}")
    if not 1 <= votes <= args.chains:
        raise ValueError(f"--votes must be between 1 and --chains ({args.chains}), got {votes}")
    checks.integer("--batch-size", args.batch_size, 1)
    den, run_cfg, shape, device = _prior(args, "segment")
    if shape[0] != 4:
        raise ValueError(f"{args.ckpt} is a prior over {shape[0]} channels; segment needs (picture, mask) = 4")
    data = load_dataset("scenes", "test", n=args.n, size=int(shape[-1]), seed=int(run_cfg.get("data", {})
                                                                                    .get("seed", 0)))
    img, truth = split_scene(data.x.to(device))
    truth = truth > 0
    g = torch.Generator(device=device).manual_seed(args.seed)
    res = segment(den, img, chains=args.chains, steps=args.steps, lr=args.lr, votes=votes,
                  schedule=TIME_SCHEDULES[args.schedule](), through_net=not args.stop_grad, generator=g,
                  progress=True, batch_size=args.batch_size)
    km, ot = kmeans_segment(img.cpu()), otsu_segment(img.cpu())
    m = lambda b: (b.float() * 2 - 1).cpu().numpy()
    per_image = iou(res.mask.cpu(), truth.cpu())
    km_iou, ot_iou = iou(km, truth.cpu()), iou(ot, truth.cpu())
    metrics = {"n": args.n, "chains": args.chains, "votes": votes, "steps": args.steps,
               "through_net": not args.stop_grad,
               "seconds": round(res.seconds, 2), "iou_pnp": float(per_image.mean()),
               "iou_kmeans": float(km_iou.mean()), "iou_otsu": float(ot_iou.mean()),
               "picture_columns": ["scene", "true mask", "pnp mask", "2-means mask", "otsu mask"]}

    def write(out: Path) -> tuple[dict, list[Path]]:
        pic = plot_image_columns(
            {"scene": img.cpu().numpy(), "true mask": m(truth), "PnP mask": m(res.mask), "2-means": m(km),
             "Otsu": m(ot)},
            out / "segment.png",
            row_labels=[f"IoU: PnP {float(p):.2f}\n2-means {float(k):.2f}\nOtsu {float(o):.2f}"
                        for p, k, o in zip(per_image, km_iou, ot_iou)],
            title=f"PnP segmentation: mean IoU {metrics['iou_pnp']:.3f} (baselines: 2-means "
                  f"{metrics['iou_kmeans']:.3f}, Otsu {metrics['iou_otsu']:.3f}) over {args.n} scenes"
                  + (" (first 8 shown)" if args.n > 8 else ""),
        )
        io.write_npz_atomic(out / "masks.npz", scene=img.cpu().numpy(), mask=res.mask.cpu().numpy(),
                            truth=truth.cpu().numpy(), kmeans=km.numpy(), otsu=ot.numpy(), iou=per_image.numpy())
        return metrics, [pic, out / "masks.npz"]

    return _finish(args, write)


# --- TSP ----------------------------------------------------------------------------------------------------


def tour_style(run_cfg: dict, shape: tuple[int, ...]):
    """The drawing style a tours prior was trained with (from its recorded data settings)."""
    from ..pnp.tsp import TourStyle

    d = run_cfg.get("data", {})
    base = TourStyle.for_size(int(shape[-1]))
    return TourStyle(int(shape[-1]), float(d.get("line_width") or base.line_width),
                     float(d.get("city_radius") or base.city_radius))


def plot_tours(coords: np.ndarray, tours: np.ndarray, optimal: np.ndarray, path: Path, titles: list[str]) -> Path:
    """Decoded tours (solid) under the optimal ones (dashed, on top, so that a tour that is optimal still shows
    both), one panel per instance, with a legend."""
    plt = pyplot()

    from ..plots import save_figure

    k = len(coords)
    cols = min(k, 4)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[k:]:
        ax.axis("off")
    for ax, c, t, o, title in zip(axes.flat, coords, tours, optimal, titles):
        tt = np.append(t, t[0])
        ax.plot(c[tt, 0], c[tt, 1], "-", color="C0", lw=2.2, label="decoded (PnP)")
        oo = np.append(o, o[0])
        ax.plot(c[oo, 0], c[oo, 1], "--", color="C3", lw=1.0, label="optimal")
        ax.scatter(c[:, 0], c[:, 1], s=12, color="k", zorder=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(1.02, -0.02)  # rows grow downwards, as in the pictures
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend under the panels
    return save_figure(fig, path)


def run_tsp(args: argparse.Namespace) -> int:
    from ..pnp import tsp

    if args.n < 1 or args.cities < 3:
        raise ValueError(f"need --n >= 1 and --cities >= 3, got {args.n} and {args.cities}")
    checks.integer("--chains", args.chains, 1)
    den, run_cfg, shape, device = _prior(args, "tsp")
    if shape[0] != 1:
        raise ValueError(f"{args.ckpt} is a prior over {shape[0]}-channel pictures; tours are 1-channel")
    style = tour_style(run_cfg, tuple(shape))
    trained = (run_cfg.get("data") or {}).get("cities")
    trained = [int(c) for c in trained if checks.is_integer(c, 1)] if isinstance(trained, list) else []
    if trained and args.cities > max(trained):
        warnings.warn(f"the prior at {args.ckpt} learned tours of {trained} cities; {args.cities} is beyond them "
                      f"(and the reference solver's time grows fast with the count)", stacklevel=2)
    g = torch.Generator().manual_seed(args.seed)
    coords = tsp.random_instances(args.n, args.cities, g)
    solver = tsp.default_solver(args.cities)
    print(f"solving the {args.n} instances of {args.cities} cities with the reference solver ({type(solver).__name__})",
          file=sys.stderr)
    t0 = time.perf_counter()
    opt = tsp.solve_all(coords, solver)
    opt_len = np.array([tsp.tour_length(c, t) for c, t in zip(coords, opt)])
    t_ref = time.perf_counter() - t0
    res = tsp.solve_with_prior(den, coords, style, chains=args.chains, steps=args.steps, lr=args.lr,
                               schedule=TIME_SCHEDULES[args.schedule](), through_net=not args.stop_grad,
                               generator=torch.Generator(device=device).manual_seed(args.seed), progress=True)
    greedy = np.array([tsp.tour_length(c, tsp.decode(c, None)) for c in coords])
    gaps = tsp.optimality_gap(res.lengths, opt_len)
    pct = [f"{round(100 * gp, 2) + 0.0:.2f}%" for gp in gaps]  # + 0.0: no "-0.00%" from LKH rounding
    titles = [f"gap to optimal {p}" for p in pct]
    metrics = {"cities": args.cities, "n": args.n, "chains": args.chains, "steps": args.steps,
               "through_net": not args.stop_grad, "reference_solver": solver.name,
               "gap_mean": float(gaps.mean()), "gap_total": float(res.lengths.sum() / opt_len.sum() - 1),
               "gap_greedy_2opt": float(tsp.optimality_gap(greedy, opt_len).mean()),
               "seconds_per_instance": (res.infer_seconds + res.decode_seconds) / args.n,
               "reference_seconds_per_instance": t_ref / args.n, "gaps": gaps.tolist(),
               "picture_rows": ["inferred adjacency (rendered)", "decoded tour (rendered)"]}

    def write(out: Path) -> tuple[dict, list[Path]]:
        rows = dict(zip((k.replace(" (", "\n(") for k in metrics["picture_rows"]),
                        (res.pictures, tsp.render_tours(coords, res.tours, style))))
        shown = min(args.n, 16)
        files = [plot_tours(coords.numpy(), res.tours, opt, out / "tours.png", titles),
                 plot_image_columns({k: v.cpu().numpy() for k, v in rows.items()}, out / "pictures.png", by_row=True,
                                    row_labels=[f"instance {i}\ngap {p}" for i, p in enumerate(pct)], rows=shown,
                                    title=f"PnP tours: {args.n} instances of {args.cities} cities"
                                          + (f" (first {shown} shown)" if args.n > shown else ""))]
        io.write_npz_atomic(out / "tours.npz", coords=coords.numpy(), tours=np.asarray(res.tours),
                            optimal=np.asarray(opt), lengths=np.asarray(res.lengths), optimal_lengths=opt_len)
        return metrics, [*files, out / "tours.npz"]

    return _finish(args, write)


# --- any constraint -----------------------------------------------------------------------------------------


def run_constraint(args: argparse.Namespace) -> int:
    """PnP under a named or user-supplied constraint, beside the prior's own samples (same count)."""
    from ..constraints import CONSTRAINTS, build_constraint, check_distance, parse_python_spec
    from ..mirror.plots import plot_violation_grid, violation_maps
    from ..mirror.sample import batched_distance
    from ..pnp.conditional import mean_pairwise_distance
    from ..sample import generate

    checks.integer("--n", args.n, 2)
    checks.number("--weight", args.weight, "> 0")
    checks.number("--finish-zeta", args.finish_zeta, ">= 0")
    if args.clamp is not None:
        checks.number("--clamp", args.clamp, "> 0")
    spec = parse_python_spec(args.constraint) or {"name": args.constraint}

    def build(device=None):
        return build_constraint(spec, how="pnp constraint builds a constraint without arguments: for one that "
                                          "needs them, name a function of your own FILE.py:NAME that calls it",
                                device=device)

    # an unknown name or a bad file is reported before the prior loads; a registered family is built after it
    # (so its own errors come then: the count constraint trains its counter first, minutes of work that a
    # missing prior would waste)
    constraint = build() if spec["name"] == "python" or spec["name"] not in CONSTRAINTS else None
    den, run_cfg, shape, device = _prior(args)
    if len(shape) != 3:
        raise ValueError(f"{args.ckpt} is a prior over {tuple(shape)} vectors; pnp constraint needs pictures (C, H, "
                         "W): for vectors, guide its sampling by the distance in Python (condiff.guidance."
                         "guided_sample with DPS(loss), docs/guidance.md)")
    if not 0 <= args.finish < den.schedule.T:
        raise ValueError(f"--finish must be a timestep in [0, {den.schedule.T}) (0: off), got {args.finish}")
    constraint = constraint if constraint is not None else build(device)
    constraint = constraint.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    try:
        prior_x = generate(den, args.n, tuple(shape), batch_size=args.batch_size, steps=100, eta=1.0, generator=g,
                           device=device).to(device)
    except FloatingPointError as e:  # named by the model it came from
        raise FloatingPointError(f"the prior's own samples: {e}; is the model at {args.ckpt} trained?") from None
    # the callable's shape and sign, named before the long run
    check_distance(constraint, prior_x[:2], on=f" on the prior's own samples (values in [{float(prior_x.min()):.3g}, "
                   f"{float(prior_x.max()):.3g}]): is the model at {args.ckpt} trained on data this constraint is for?")
    violation_maps(constraint, prior_x[:1])  # and its violation map's shape
    batched_distance(constraint, prior_x[:2], device=device)  # the scoring (without gradients), before the long run
    bound = args.clamp if args.clamp is not None else (run_cfg.get("sample") or {}).get("clip_x0")
    project = (lambda z: z.clamp(-bound, bound)) if bound else None
    x, seconds, _ = _run_pnp(args, den, shape, constraint, project, g, device)
    sets = {"prior samples": prior_x.detach().cpu(), "pnp": x.detach().cpu()}
    dist = {k: batched_distance(constraint, v, device=device) for k, v in sets.items()}
    parts = constraint.learned_parts() if callable(getattr(constraint, "learned_parts", None)) else None
    metrics = {"constraint": spec, **({"constraint_parts": parts} if parts else {}), "n": args.n,
               "steps": args.steps, "weight": args.weight, "finish": args.finish,
               "through_net": not args.stop_grad, "seconds": round(seconds, 2)}
    for k, d in dist.items():
        key = k.replace(" ", "_")
        metrics[f"{key}_l_mean"], metrics[f"{key}_l_median"] = float(d.mean()), float(d.median())
        metrics[f"{key}_diversity"] = mean_pairwise_distance(sets[k])
    # prior / PnP mean distance; None when PnP meets the constraint exactly (no finite ratio)
    metrics["reduction"] = (metrics["prior_samples_l_mean"] / metrics["pnp_l_mean"]
                            if metrics["pnp_l_mean"] > 0 else None)
    cols = {k: (v, violation_maps(constraint, v), dist[k]) for k, v in sets.items()}

    def write(out: Path) -> tuple[dict, list[Path]]:
        io.write_npz_atomic(out / "samples.npz", x=sets["pnp"].numpy(), prior=sets["prior samples"].numpy())
        grid = plot_violation_grid(cols, out / "samples.png", title=f"constraint {args.constraint}: prior vs PnP")
        return metrics, [grid, out / "samples.npz"]

    return _finish(args, write)
