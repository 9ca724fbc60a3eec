"""``condiff sample``: draw samples from a trained model (a condiff run or a diffusers directory)."""

from __future__ import annotations

import argparse

import numpy as np

from .. import checks, io
from ..denoiser import Denoiser, NetDenoiser
from .common import (
    DEFAULT_SAMPLE,
    SAMPLE_FILES,
    add_device_arg,
    check_out_dir,
    check_samples,
    check_targets,
    draw_samples,
    load_model_for,
    pick_device,
    recorded_path,
    results_dir,
    write_samples,
)
from .config import check_sample


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory, model directory or diffusers model directory")
    p.add_argument("--n", type=int, default=None, help="number of samples (default: the run's [sample] n)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's, 100)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta: 0 deterministic, 1 DDPM-like (default: the run's sample.eta, 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the run's sample.seed, 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples drawn at once (default: the run's [sample] batch_size); the noise is drawn "
                        "batch by batch, so the samples of a seed depend on it (recorded in the output)")
    add_device_arg(p)


def sample_settings(args: argparse.Namespace, run_cfg: dict, T: int | None = None) -> dict:
    """The run's [sample] settings (the defaults for a bare model directory) with the flags over them;
    ``T``: the model's schedule length, to which the defaults' step count is cut."""
    scfg = run_cfg.get("sample", DEFAULT_SAMPLE)
    if not isinstance(scfg, dict):  # a hand-edited config.json
        raise ValueError(f"the run's config.json has a [sample] entry that is not a table: {scfg!r}")
    scfg = {**DEFAULT_SAMPLE, **scfg}  # a table that names some settings (hand-edited, or an older run's)
    if "sample" not in run_cfg and T is not None:  # a model of a short schedule, read without its run
        scfg = {**scfg, "steps": min(scfg["steps"], T)}
    flags = {k: v for k, v in (("n", args.n), ("steps", args.steps), ("eta", args.eta), ("seed", args.seed),
                                ("batch_size", args.batch_size)) if v is not None}
    # the run's own values named as settings (sample.n), the flags as flags (--n): each error names its source
    check_sample({k: v for k, v in scfg.items() if k not in flags})
    out = check_sample({**scfg, **flags}, flags=True)
    if T is not None and out["steps"] > T:  # (the sampler would say it later, without naming the flag)
        where = "--steps" if "steps" in flags else "sample.steps (the run's)"
        raise ValueError(f"{where} must be at most the model's schedule length T = {T}, got {out['steps']}")
    return out


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="draw samples from a trained model", description=__doc__)
    add_sample_args(p)
    add_label_args(p)
    p.add_argument("--out", default=None,
                   help="output directory (default: RUN/samples for a run or its model, RUN/samples_step_N for a "
                        "checkpoint RUN/checkpoints/step_N, DIR_samples beside a bare model directory DIR)")
    p.set_defaults(func=run)


def add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", type=int, default=None,
                   help="class to draw, for a model trained on labelled data (--set data.labels=true)")
    p.add_argument("--guidance-scale", type=float, default=0.0,
                   help="classifier-free guidance strength w with --label: (1 + w) eps(x|label) - w eps(x); "
                        "needs a model trained with train.label_drop > 0 (default 0: plain conditional)")


def condition(den: Denoiser, run_cfg: dict, label: int | None, scale: float) -> Denoiser:
    """The model conditioned on ``label`` (with classifier-free guidance ``scale``), checked against
    what it was trained with; without ``label``, the model as it is."""
    checks.number("--guidance-scale", scale, ">= 0")
    classes = int(den.net.config.get("num_classes") or 0) if isinstance(den, NetDenoiser) else 0
    drop = run_cfg.get("label_drop")
    if label is None:
        if scale > 0:
            raise ValueError("--guidance-scale needs --label: it guides towards a class")
        if isinstance(den, NetDenoiser):  # it warns at its first call where they were never trained
            den.unconditional_hint = "pass --label K"
        return den
    if not classes:
        raise ValueError("--label needs a class-conditional condiff model (trained with --set data.labels=true); "
                         "this one takes no labels")
    if not 0 <= label < classes:
        raise ValueError(f"--label must lie in [0, {classes}) (the model's classes), got {label}")
    if scale > 0 and drop == 0:
        raise ValueError("--guidance-scale needs a model trained with label drop (train.label_drop > 0); this one "
                         "never learned unconditional predictions")
    return den.conditioned(label, scale)


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    out = check_out_dir(args.out, kind="condiff sample",
                        default=lambda: results_dir(args.ckpt, "samples"))
    den, run_cfg, shape = load_model_for(args.ckpt, device)
    den = condition(den, run_cfg, args.label, args.guidance_scale)
    scfg = sample_settings(args, run_cfg, den.schedule.T)
    check_targets(out, ("sample_config.json",))
    x = draw_samples(den, shape, scfg, device)
    check_samples(x, out, run_cfg.get("value_range"))
    record = {**scfg, "ckpt": recorded_path(args.ckpt), "nfe": den.nfe, "label": args.label,
              "guidance_scale": args.guidance_scale, "versions": io.versions()}
    with io.writing_outputs(out, "sample_config.json", *SAMPLE_FILES) as staged:
        files = write_samples(x, staged, value_range=run_cfg.get("value_range"), label=args.label)
        io.write_json_atomic(staged / "sample_config.json", record)
    files = [out / f.relative_to(staged) for f in files]
    print(f"{len(x)} sample{'s' * (len(x) != 1)}, shape {tuple(x.shape[1:])}, "
          f"range [{float(x.min()):.2f}, {float(x.max()):.2f}], "
          f"mean {float(np.mean(x.numpy())):.3f}")
    for f in files:
        print(f"wrote {f}")
    return 0
