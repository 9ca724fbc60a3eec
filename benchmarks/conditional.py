"""Class-conditional digits: a model trained with labels (classifier-free guidance) against a fixed
unconditional prior steered by a classifier (DPS).

Both models share the plug-and-play benchmark's digits recipe (condiff.cli.pnp.PRIORS["digits"]): the
unconditional one is that benchmark's prior itself (runs/pnp/digits-<profile>, reused when present);
the conditional one adds ``data.labels = true`` and ``train.label_drop = 0.1`` (runs/conditional/
digits-<profile>). 50 samples per class (quick; 100 full), DDIM 100 steps, eta 1, x0_hat clipped to
[-1, 1]. Judged as in the plug-and-play benchmark: success = the project's digits classifier (seed 0)
names the asked class; the DPS rows steer with an independent classifier (seed 1), so no row optimises
its own judge. Fréchet ratio: Fréchet distance of the judge's features (all classes pooled, same count)
to the test split, over that of the unconditional prior's samples. Within-class diversity: mean
pairwise L2 distance within a class, averaged over classes (the test split's for reference). Seconds
per sample are wall time of sampling on the machine named.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from condiff.classifier import DigitsJudge, _digits
from condiff.cli.common import train_or_reuse
from condiff.cli.config import merge
from condiff.cli.pnp import ensure_prior, prior_config
from condiff.data import derive_seed
from condiff.guidance import DPS, guided_sample
from condiff.models import load_denoiser
from condiff.pnp.conditional import ClassConstraint, independent_digits_classifier, within_class_diversity
from condiff.sample import generate

SEED = 0
PROFILES = {"quick": {"per_class": 50, "scales": [0.0, 0.5, 1.0, 2.0, 4.0], "dps_zeta": [0.5, 1.0]},
            "full": {"per_class": 100, "scales": [0.0, 0.5, 1.0, 2.0, 4.0], "dps_zeta": [0.5, 1.0]}}
LABEL_DROP = 0.1
STEPS = 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def conditional_model(profile: str, device: str):
    cfg = merge(prior_config("digits", profile),
                {"data": {"labels": True}, "train": {"label_drop": LABEL_DROP}})
    cfg["_device"] = device
    run_dir = Path("runs") / "conditional" / f"digits-{profile}"
    seconds, reused = train_or_reuse(cfg, run_dir, own=True)
    log(f"conditional digits model: {run_dir} ({'reused' if reused else f'trained in {seconds:.0f} s'})")
    return load_denoiser(run_dir, device=device).eval().requires_grad_(False), run_dir


def run(profile: str = "quick", device: str = "cpu") -> dict:
    p = PROFILES[profile]
    prior_dir = ensure_prior("digits", profile, Path("runs") / "pnp" / f"digits-{profile}", device)
    prior = load_denoiser(prior_dir, device=device).eval().requires_grad_(False)
    cond, cond_dir = conditional_model(profile, device)
    judge = DigitsJudge(device=device)
    labels = torch.arange(10, device=device).repeat_interleave(p["per_class"])
    n = len(labels)
    test_x, test_y = _digits("test")
    rows: list[dict] = []

    def draw(den, name: str) -> tuple[torch.Tensor, float]:
        g = torch.Generator(device=device).manual_seed(derive_seed(SEED, name))
        t0 = time.perf_counter()
        with torch.no_grad():
            x = generate(den, n, (1, 8, 8), batch_size=n, steps=STEPS, eta=1.0, generator=g, device=device,
                         clip_x0=1.0)
        return x.to(device), time.perf_counter() - t0

    def scored(method: str, x: torch.Tensor, seconds: float, fd_ref: float | None,
               conditional: bool = True) -> float:
        with torch.no_grad():
            success = float((judge.probs(x).argmax(1) == labels).float().mean()) if conditional else None
        fd = judge.evaluate(x)["frechet_to_test"]
        rows.append({"method": method, "n": n, "success (judge)": success if conditional else "",
                     "Fréchet ratio to unconditional": fd / fd_ref if fd_ref else 1.0,
                     "within-class diversity": within_class_diversity(x, labels) if conditional else "",
                     "s / sample": seconds / n})
        log(f"{method}: success {success}, FD {fd:.4g}, {seconds:.0f} s")
        return fd

    x_unc, s_unc = draw(prior, "unconditional")
    fd_unc = scored("unconditional prior (DDIM)", x_unc, s_unc, None, conditional=False)
    x_null, s_null = draw(cond.conditioned(None), "null label")
    scored("conditional model, null label", x_null, s_null, fd_unc, conditional=False)
    for w in p["scales"]:
        x, s = draw(cond.conditioned(labels, guidance_scale=w), f"cfg {w}")
        scored(f"conditional model, CFG w = {w:g}" if w else "conditional model, w = 0 (no guidance)", x, s, fd_unc)
    steer = independent_digits_classifier(1, device)
    cons = ClassConstraint(steer.log_prob, labels)
    for zeta in p["dps_zeta"]:
        r = guided_sample(prior, DPS(cons, zeta), (n, 1, 8, 8), STEPS, eta=1.0, device=device, clip_x0=1.0,
                          generator=torch.Generator(device=device).manual_seed(derive_seed(SEED, f"dps {zeta}")))
        scored(f"unconditional prior + DPS (classifier, zeta {zeta:g})", r.x.detach(), r.seconds, fd_unc)
    rows.append({"method": "test split", "n": len(test_x), "success (judge)": "",
                 "Fréchet ratio to unconditional": "", "s / sample": "",
                 "within-class diversity": within_class_diversity(test_x, test_y)})
    return {
        "title": "Class-conditional digits: classifier-free guidance vs a steered unconditional prior",
        "columns": ["method", "n", "success (judge)", "Fréchet ratio to unconditional", "within-class diversity",
                    "s / sample"],
        "rows": rows,
        "notes": [f"Unconditional prior: {prior_dir}; conditional model: {cond_dir} (same recipe, "
                  f"{prior_config('digits', profile)['train']['steps']} steps, plus labels and label drop "
                  f"{LABEL_DROP}). {STEPS} DDIM steps, eta 1; Fréchet distance of the unconditional prior's "
                  f"samples to the test split: {fd_unc:.4g} (n = {n}). The CLI equivalent of a CFG row: "
                  "`condiff sample --ckpt RUN --label K --guidance-scale W`."],
    }
