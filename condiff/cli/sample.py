"""``condiff sample``: draw samples from a trained model (a condiff run or a diffusers directory)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .. import io
from .common import DEFAULT_SAMPLE, check_out_dir, draw_samples, load_model_for, pick_device, write_samples
from .config import check_sample


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory, model directory or diffusers model directory")
    p.add_argument("--n", type=int, default=None, help="number of samples (default: the run's [sample] n)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's, 100)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)


def sample_settings(args: argparse.Namespace, run_cfg: dict) -> dict:
    scfg = dict(run_cfg.get("sample", DEFAULT_SAMPLE))
    for key, val in (("n", args.n), ("steps", args.steps), ("eta", args.eta), ("seed", args.seed),
                     ("batch_size", args.batch_size)):
        if val is not None:
            scfg[key] = val
    return check_sample(scfg, flags=True)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="draw samples from a trained model", description=__doc__)
    add_sample_args(p)
    p.add_argument("--out", default=None, help="output directory (default: <ckpt>/samples)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    out = check_out_dir(args.out or Path(args.ckpt) / "samples")
    den, run_cfg, shape = load_model_for(args.ckpt, device)
    scfg = sample_settings(args, run_cfg)
    x = draw_samples(den, shape, scfg, device)
    files = write_samples(x, out, value_range=run_cfg.get("value_range"))
    io.write_json_atomic(out / "sample_config.json", {**scfg, "ckpt": str(args.ckpt), "nfe": den.nfe})
    print(f"{len(x)} samples, shape {tuple(x.shape[1:])}, range [{float(x.min()):.2f}, {float(x.max()):.2f}], "
          f"mean {float(np.mean(x.numpy())):.3f}")
    for f in files:
        print(f"wrote {f}")
    return 0
