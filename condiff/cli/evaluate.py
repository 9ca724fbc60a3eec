"""``condiff eval``: sample from a trained model and score the samples against held-out data.

With ``--label K`` (a class-conditional model) the samples of class K are scored against the held-out
samples of that class (MMD, against the class's training samples as the reference)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .. import io
from ..evaluate import evaluate_samples, load_reference
from ..plots import plot_bars
from .common import (
    CLASS_PICTURE,
    EVAL_BESIDE,
    SAMPLE_FILES,
    check_out_dir,
    check_samples,
    check_targets,
    draw_samples,
    load_model_for,
    load_split,
    pick_device,
    recorded_path,
    results_dir,
    run_kind,
    write_samples,
)
from .config import PRESETS
from .sample import add_label_args, add_sample_args, condition, sample_settings


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="sample and evaluate a trained model", description=__doc__)
    add_sample_args(p)
    add_label_args(p)
    p.add_argument("--out", default=None, help="output directory (default: the run directory; for a run of "
                   "another command, such as `dual train`, or a stage of a NAMM run, RUN/eval, beside the run's "
                   "own records; for a "
                   "checkpoint RUN/checkpoints/step_N, RUN/eval_step_N; for a bare model directory DIR, DIR_eval "
                   "beside it)")
    p.add_argument("--data", default=None,
                   help="data set to score against (default: the one the model was trained on; needed for a "
                        "diffusers model)")
    p.set_defaults(func=run)


FEW_SAMPLES = 200  # under this many samples eval warns that its figures are noise (metrics.json records n)


def evaluate_run(ckpt: str | Path, scfg_args: argparse.Namespace, out: Path, device: str,
                 n_flag: str = "--n {}") -> dict:
    """Sample the model at ``ckpt`` with the run's settings under ``scfg_args``' flags, and score the samples;
    ``n_flag``: how the calling command sets the sample count, for its warnings (demo: ``--set sample.n={}``)."""
    den, run_cfg, shape = load_model_for(ckpt, device)
    name = getattr(scfg_args, "data", None)
    if name and (run_cfg.get("data") or {}).get("name") != name:
        run_cfg = {**run_cfg, "data": {"name": name}}
    if not run_cfg.get("data"):
        raise ValueError(f"{ckpt} does not record its data set: pass --data NAME")
    held = load_split(run_cfg, "train")  # every data set has one (user data may lack a test split)
    if tuple(held.shape) != tuple(shape):
        raise ValueError(f"the model makes samples of shape {tuple(shape)} but {run_cfg['data']['name']} "
                         f"holds {tuple(held.shape)}")
    scfg = sample_settings(scfg_args, run_cfg, den.schedule.T)
    where = "--n" if getattr(scfg_args, "n", None) is not None else "sample.n (the run's)"  # the count's source
    if scfg["n"] < 2:
        raise ValueError(f"condiff eval compares distributions: {where} must be >= 2, got {scfg['n']}")
    if scfg["n"] < FEW_SAMPLES and run_cfg["data"].get("name") != "toy2d":  # (toy2d's scoring says its own)
        # scored all the same (a smoke test), but not as a figure to compare
        warnings.warn(f"{where} = {scfg['n']}: with so few samples the distances to the data are mostly noise (the "
                      f"Fréchet ratio most of all); give {n_flag.format(FEW_SAMPLES)} or more for figures to compare "
                      f"(the digits demo's: {PRESETS['digits']['sample']['n']})", stacklevel=2)
    label, scale = getattr(scfg_args, "label", None), getattr(scfg_args, "guidance_scale", 0.0)
    den = condition(den, run_cfg, label, scale)  # unlabelled: warns where unconditional predictions were never trained
    data_cfg = run_cfg["data"] if label is None else {**run_cfg["data"], "label": label}
    reference = load_reference(data_cfg)  # before sampling: nothing is written when the data cannot score it
    check_targets(out, ("metrics.json",))
    t0 = time.perf_counter()
    x = draw_samples(den, shape, scfg, device)
    dt = time.perf_counter() - t0
    check_samples(x, out, run_cfg.get("value_range"))
    m = evaluate_samples(x, data_cfg, reference)  # scored before anything is written: old and new never mix
    m.update({"n": int(scfg["n"]), "sample_seconds": round(dt, 3), "sample_steps": int(scfg["steps"]),
              "eta": float(scfg["eta"]),
              "nfe_per_sample": den.nfe // max(1, -(-int(scfg["n"]) // int(scfg.get("batch_size", 500)))),
              "seed": int(scfg["seed"]), "batch_size": int(scfg.get("batch_size", 500)), "ckpt": recorded_path(ckpt),
              "versions": io.versions(),
              **({} if label is None else {"label": label, "guidance_scale": scale})})
    with io.writing_outputs(out, "metrics.json", *SAMPLE_FILES, CLASS_PICTURE) as staged:
        write_samples(x, staged, value_range=run_cfg.get("value_range"))
        if isinstance(m.get("class_hist"), list):  # a data set whose classifier judges the samples (digits)
            plot_class_hist(m, staged / CLASS_PICTURE)
        io.write_json_atomic(staged / "metrics.json", m)
    return m


def plot_class_hist(m: dict, path: Path) -> Path:
    """The classifier's predicted classes of the samples (``m["class_hist"]``) against a uniform share."""
    hist = m["class_hist"]
    return plot_bars({f"{m.get('n', '?')} samples": hist}, path, labels=[str(i) for i in range(len(hist))],
                     title=f"predicted classes (TV to uniform {m.get('tv_to_uniform', float('nan')):.3f})",
                     ylabel="share of samples", xlabel="class (the classifier's prediction)", ref=1 / len(hist),
                     ref_label="uniform")


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    ckpt = Path(args.ckpt)
    run = ckpt.parent if ckpt.name == "model" and run_kind(ckpt) is None else ckpt  # --ckpt RUN/model: RUN's
    # another command's run has a metrics.json of its own; a `namm fit` stage (its stage.json) is a part of one
    own = run_kind(run) in (None, "condiff train") and not (run / "stage.json").is_file()
    if own and (args.out is None or Path(args.out).resolve() == ckpt.resolve()) \
            and not (run / "model.safetensors").is_file():
        out = check_out_dir(run, EVAL_BESIDE)  # the run scores itself, beside its model
    elif args.out is None:  # another command's run, a checkpoint or a bare model (replaced whole when saved again)
        out = check_out_dir(None, kind="condiff eval", default=results_dir(ckpt, "eval"))
    else:  # a directory of its own, which must not hold another command's output
        out = check_out_dir(args.out, kind="condiff eval")
    m = evaluate_run(args.ckpt, args, out, device)
    print(io.json_text({k: v for k, v in m.items() if not isinstance(v, list)}), end="")  # NaN as null
    print(f"wrote {out / 'metrics.json'}", file=sys.stderr)  # stdout: the JSON alone, for a script to read
    return 0
