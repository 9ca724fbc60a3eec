"""Plug-and-play priors (Graikos et al. 2022): TSP, conditional digits and segmentation as inference.

TSP. Test instances: uniform cities in the unit square, reference tours from LKH (elkai) when it is
installed (exact Held-Karp for N <= 12 otherwise; the notes name the solver used). Methods, all with
the same decoder (greedy fragment merging on score / length, then 2-opt to a local optimum):
- "diffusion prior": the paper's pipeline; adjacency latent, Adam lr 1 betas (0, 0.9), the PAPER_TSP
  anneal, gradients through the network; "stop-grad" drops the network Jacobian;
- "untrained network": the same pipeline with the prior's architecture freshly initialised (its output
  layer starts at zero, so it predicts eps = 0 and the latent keeps its random start): what is left of
  the pipeline without what the prior learned;
- "greedy edges + 2-opt": the decoder on distances alone; "nearest neighbour + 2-opt" from city 0.
Gap = mean over instances of L / L_ref - 1 (the paper's sum-ratio is in the notes); time per instance
= wall time of inference + decoding over the whole test set / instances (CPU or GPU as run).

Digits (8x8). The prior is a small digits model trained here (runs/pnp/digits-<profile>; the CLI's
default is the demo model, runs/demo). Classifier constraint: -log p(label | x) of a digits classifier
trained from seed 1; success is judged by the project's classifier (seed 0), so the constraint is not
optimised against its own judge. Fidelity: Fréchet distance of the judge's features (pooled over the
ten classes, same count) to the test split, against that of unconditional DDIM samples (eta 1, 100
steps) of the same model and count. Diversity: mean pairwise L2 distance within a class, averaged over
classes, against the same for the test split. Symmetry: mean squared left-right asymmetry. Rows: the
PnP result (the paper's method, and its stop-gradient variant), PnP + finish (re-noised to t = 400 and
sampled back with DPS on the same constraint: condiff.pnp.engine.finish), and DPS guided sampling from
noise as the reference the finish has to be weighed against.

Segmentation. A prior over (RGB, mask) channels of synthetic scenes (condiff.data.scenes); the mask
channel is inferred given the picture (4 chains; foreground where at least one chain says so,
SEGMENT_VOTES; the other vote counts and single chains are reported from the same chains); IoU against
the true masks, compared with Otsu thresholding and 2-means colour clustering (foreground = the side
touching the border less).

Priors are trained on first use into runs/pnp/ (condiff.cli.pnp.PRIORS) and reused afterwards.

Profiles. "quick" is cut to fit one CPU core (about 2 hours of inference besides prior training, from the
recorded timings: segmentation 128 x 36 s, TSP 41 min, digits 5.5 min): TSP-20
only (128 test instances, 2 chains per instance for the prior and its untrained ablation; the prior is
trained on 10- and 20-city tours at 32 px for 3000 steps; the stop-gradient variant is compared on
digits only), the digits prior trained for 1500 steps and 500 inference steps (50 samples per class: at
20 per class the Fréchet distance of two unconditional draws differed by a third), the scenes prior
(base 32) for 8000 steps at 24 px and 1200 inference steps annealed from T, 4 chains per scene.
"full" (GPU) keeps the issue's sizes: TSP-50 at 64 px, 256 instances, longer training.
Each finished piece (tsp-<N>, digits, segment) is stored with its settings under
runs/pnp/bench-<profile>/ and reused when the settings match; $PNP_BENCH_PARTS=tsp,digits,segment
selects parts, so the benchmark can run in pieces (not recorded) and a final run of all three assembles
and records the table.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from condiff import io
from condiff.classifier import DigitsJudge, _digits
from condiff.cli.pnp import ensure_prior, tour_style
from condiff.data import derive_seed, load_dataset
from condiff.data.scenes import split_scene
from condiff.data.tours import solved_instances
from condiff.denoiser import NetDenoiser
from condiff.guidance import DPS, guided_sample
from condiff.models import load_denoiser
from condiff.nets import build_net
from condiff.pnp import schedules as sch
from condiff.pnp import tsp
from condiff.pnp.conditional import (
    DIGITS_FINISH_AT,
    DIGITS_FINISH_ZETA,
    ClassConstraint,
    MirrorSymmetry,
    independent_digits_classifier,
    within_class_diversity,
)
from condiff.pnp.engine import finish, infer
from condiff.pnp.segmentation import iou, kmeans_segment, otsu_segment, segment, vote
from condiff.sample import generate

SEED = 0

PROFILES = {
    "quick": {  # one loaded CPU core: TSP-20 only (the prior is trained on 10 and 20 cities), fewer digit steps
        "prior": "quick",
        "tsp": {"sizes": [20], "instances": 128, "steps": 256, "chains": 2, "batch": 128,
                "stop_grad_sizes": [], "untrained_sizes": [20]},
        "digits": {"per_class": 50, "steps": 500, "lr": 0.05, "w_class": 0.1, "w_sym": 0.2, "n_sym": 100,
                   "stop_grad": True, "dps_zeta": 0.5,
                   "finish": {"at": DIGITS_FINISH_AT, "zeta": DIGITS_FINISH_ZETA}},
        "segment": {"n": 128, "chains": 4, "steps": 1200, "start": 1.0, "lr": 0.05, "votes": 1},
    },
    "full": {
        "prior": "full",
        "tsp": {"sizes": [50], "instances": 256, "steps": 256, "chains": 1, "batch": 128,
                "stop_grad_sizes": [50], "untrained_sizes": [50]},
        "digits": {"per_class": 100, "steps": 1000, "lr": 0.05, "w_class": 0.1, "w_sym": 0.2, "n_sym": 500,
                   "stop_grad": True, "dps_zeta": 0.5,
                   "finish": {"at": DIGITS_FINISH_AT, "zeta": DIGITS_FINISH_ZETA}},
        "segment": {"n": 512, "chains": 4, "steps": 1200, "start": 1.0, "lr": 0.05, "votes": 1},
    },
}


def log(msg: str) -> None:
    print(f"[bench pnp] {msg}", file=sys.stderr, flush=True)


def row(task, method, n, metric, value, per_item=None, target="", met="") -> dict:
    return {"task": task, "method": method, "n": n, "metric": metric, "value": value,
            "s / item": "" if per_item is None else round(per_item, 4), "target": target, "met": met}


# --- TSP --------------------------------------------------------------------------------------------------


def untrained_like(den: NetDenoiser, seed: int) -> NetDenoiser:
    torch.manual_seed(seed)
    net = build_net(den.net.config).to(next(den.net.parameters()).device)
    return NetDenoiser(net.eval().requires_grad_(False), den.schedule)


def _baseline(coords: np.ndarray, solve) -> tuple[np.ndarray, float]:
    """Tour lengths of ``solve(c)`` for every instance and the mean wall time per instance."""
    t0 = time.perf_counter()
    lens = np.array([tsp.tour_length(c, solve(c)) for c in coords])
    return lens, (time.perf_counter() - t0) / len(coords)


def tsp_rows(p: dict, profile: str, device: str) -> tuple[list[dict], list[str]]:
    run_dir = ensure_prior("tsp", profile, Path("runs") / "pnp" / f"tsp-{profile}", device)
    den = load_denoiser(run_dir, device=device).eval().requires_grad_(False)
    run_cfg = json.loads((run_dir / "config.json").read_text())
    size = run_cfg["data"]["size"]
    style = tour_style(run_cfg, (1, size, size))
    rows, notes = [], []
    for n in p["sizes"]:
        coords, ref, solver = solved_instances("test", p["instances"], n, seed=SEED)
        ref_len = np.array([tsp.tour_length(c, t) for c, t in zip(coords, ref)])
        notes.append(f"TSP-{n}: {len(coords)} test instances, reference tours from {solver}, "
                     f"mean optimal length {ref_len.mean():.4f}.")
        results = {"nearest neighbour + 2-opt": _baseline(coords, lambda c: tsp.two_opt(c, tsp.nearest_neighbour(c))),
                   "greedy edges + 2-opt": _baseline(coords, lambda c: tsp.decode(c, None))}
        variants = [("diffusion prior", den, True)]
        if n in p["stop_grad_sizes"]:
            variants.append(("diffusion prior, stop-grad", den, False))
        if n in p["untrained_sizes"]:
            variants.append(("untrained network", untrained_like(den, SEED), True))
        for name, d, through in variants:
            g = torch.Generator(device=device).manual_seed(derive_seed(SEED, "tsp", n, name))
            res = tsp.solve_with_prior(d, torch.from_numpy(coords), style, chains=p["chains"], steps=p["steps"],
                                       through_net=through, generator=g, batch_size=p["batch"])
            results[name] = (res.lengths, (res.infer_seconds + res.decode_seconds) / len(coords))
            log(f"TSP-{n} {name}: gap {100 * (res.lengths / ref_len - 1).mean():.3f}% "
                f"({results[name][1]:.3f} s/instance)")
        gaps = {k: float((lens / ref_len - 1).mean()) for k, (lens, _) in results.items()}
        best_baseline = min(v for k, v in gaps.items() if not k.startswith("diffusion prior"))
        for name, (lens, per) in results.items():
            target = met = ""
            if name == "diffusion prior" and n == 20:
                target = "<= 1% and below every baseline"
                met = "met" if gaps[name] <= 0.01 and gaps[name] < best_baseline else "MISSED"
            rows.append(row(f"TSP-{n}", name, len(coords), "mean gap (%)", 100 * gaps[name], per, target, met))
            notes.append(f"TSP-{n} {name}: total-length gap {100 * (lens.sum() / ref_len.sum() - 1):.3f}%, "
                         f"optimal on {int((lens / ref_len - 1 < 1e-6).sum())}/{len(coords)} instances.")
    notes.append(f"TSP prior: {run_dir} (UNet {json.dumps(run_cfg['model'])}, {run_cfg['train']['steps']} "
                 f"training steps on {run_cfg['data']['n']} LKH tours of {run_cfg['data']['cities']} cities; "
                 f"{size} px, line {style.line_width} px, city radius {style.city_radius} px); "
                 f"{p['steps']} inference steps, {p['chains']} chain(s) per instance.")
    return rows, notes


# --- digits -----------------------------------------------------------------------------------------------


def digits_prior(profile: str, device: str) -> tuple[NetDenoiser, str]:
    """The benchmark's own digits prior (runs/pnp/digits-<profile>), not runs/demo: a stored digits
    piece must stay reproducible whichever demo model happens to be on disk."""
    run_dir = ensure_prior("digits", profile, Path("runs") / "pnp" / f"digits-{profile}", device)
    return load_denoiser(run_dir, device=device).eval().requires_grad_(False), str(run_dir)


def digits_rows(p: dict, profile: str, device: str) -> tuple[list[dict], list[str]]:
    den, source = digits_prior(profile, device)
    judge = DigitsJudge(device=device)
    steer = independent_digits_classifier(1, device)
    labels = torch.arange(10, device=device).repeat_interleave(p["per_class"])
    n = len(labels)
    g = torch.Generator(device=device).manual_seed(derive_seed(SEED, "digits"))
    z0 = torch.randn(n, 1, 8, 8, generator=g, device=device)
    clamp = lambda z: z.clamp(-1, 1)
    rows = []
    notes = [f"digits prior: {source}; {p['steps']} inference steps (PAPER_MNIST anneal), Adam lr {p['lr']}, "
             f"constant weights {p['w_class']} (class) and {p['w_sym']} (symmetry), pictures clamped to [-1, 1]."]

    t0 = time.perf_counter()
    unc = generate(den, n, (1, 8, 8), batch_size=n, steps=100, eta=1.0, generator=g, device=device,
                   clip_x0=1.0).to(device)
    t_unc = (time.perf_counter() - t0) / n
    fd_unc = judge.evaluate(unc)["frechet_to_test"]
    test_x, test_y = _digits("test")
    with torch.no_grad():
        unc_lab = judge.probs(unc).argmax(1)
    uncond = "unconditional DDIM (100 steps)"
    rows += [row("digits", uncond, n, "Fréchet to test", fd_unc, t_unc),
             row("digits", uncond, n, "within-class diversity", within_class_diversity(unc, unc_lab)),
             row("digits", "test split", len(test_x), "within-class diversity",
                 within_class_diversity(test_x, test_y))]

    cons = ClassConstraint(steer.log_prob, labels)
    fin_t, fin_zeta = round(p["finish"]["at"] * den.schedule.T), p["finish"]["zeta"]

    def scored(name: str, x: torch.Tensor, seconds: float, targets: bool) -> None:
        with torch.no_grad():
            success = float((judge.probs(x).argmax(1) == labels).float().mean())
        fd = judge.evaluate(x)["frechet_to_test"]
        log(f"digits {name}: success {success:.3f}, FD {fd:.3g} (unconditional {fd_unc:.3g}), {seconds:.0f} s")
        t1 = t2 = met1 = met2 = ""
        if targets:
            t1, met1 = ">= 0.9", "met" if success >= 0.9 else "MISSED"
            t2, met2 = "<= 1.5", "met" if fd / fd_unc <= 1.5 else "MISSED"
        rows.extend([row("digits", name, n, "success rate (judge)", success, seconds / n, t1, met1),
                     row("digits", name, n, "Fréchet ratio to unconditional", fd / fd_unc, None, t2, met2),
                     row("digits", name, n, "within-class diversity", within_class_diversity(x, labels))])
        notes.append(f"digits {name}: Fréchet to test {fd:.4g} vs unconditional {fd_unc:.4g} (same n = {n}).")

    variants = [("PnP, classifier constraint", True)]
    if p["stop_grad"]:
        variants.append(("PnP, classifier, stop-grad", False))
    for name, through in variants:
        res = infer(den, z0, constraint=cons, schedule=sch.PAPER_MNIST,
                    weight=sch.ConstantWeight(p["w_class"]), steps=p["steps"], lr=p["lr"], through_net=through,
                    project=clamp, generator=torch.Generator(device=device).manual_seed(derive_seed(SEED, name)))
        scored(name, res.x, res.seconds, through)  # the targets concern the paper's variant and its finish
        if through:
            t0 = time.perf_counter()
            x = finish(den, res.x, fin_t, guidance=DPS(cons, fin_zeta),
                       generator=torch.Generator(device=device).manual_seed(derive_seed(SEED, "finish")))
            scored(f"PnP + finish (t={fin_t}, DPS zeta {fin_zeta})", x,
                   res.seconds + time.perf_counter() - t0, True)
    # the reference: DPS alone from noise, the finish's guidance without the PnP start
    r = guided_sample(den, DPS(cons, p["dps_zeta"]), (n, 1, 8, 8), 100, eta=1.0, device=device,
                      generator=torch.Generator(device=device).manual_seed(derive_seed(SEED, "dps")))
    scored(f"DPS guided sampling (100 steps, zeta {p['dps_zeta']})", r.x, r.seconds, False)

    m, sym = p["n_sym"], MirrorSymmetry(-1)
    res = infer(den, z0[:m], constraint=sym, schedule=sch.PAPER_MNIST, weight=sch.ConstantWeight(p["w_sym"]),
                steps=p["steps"], lr=p["lr"], project=clamp,
                generator=torch.Generator(device=device).manual_seed(derive_seed(SEED, "symmetry")))
    ev = judge.evaluate(res.x)
    with torch.no_grad():
        a_pnp, a_unc, a_test = (float(sym(v).mean()) for v in (res.x, unc[:m], test_x))
    rows += [row("digits", "PnP, symmetry constraint", m, "mean asymmetry", a_pnp, res.seconds / m),
             row("digits", "PnP, symmetry constraint", m, "judge mean top-class prob", ev["mean_top_prob"]),
             row("digits", uncond, m, "mean asymmetry", a_unc),
             row("digits", uncond, m, "judge mean top-class prob", judge.evaluate(unc[:m])["mean_top_prob"]),
             row("digits", "test split", len(test_x), "mean asymmetry", a_test)]
    hist = ", ".join(f"{d}: {h:.2f}" for d, h in enumerate(ev["class_hist"]) if h > 0)
    notes.append(f"digits symmetry: mean squared left-right difference; the symmetric samples are mostly "
                 f"the naturally symmetric digits (judge's classes {hist}), so their Fréchet distance to the "
                 f"whole test split ({ev['frechet_to_test']:.4g}) measures class skew, not fidelity.")
    return rows, notes


# --- segmentation ------------------------------------------------------------------------------------------


def segment_rows(p: dict, profile: str, device: str) -> tuple[list[dict], list[str]]:
    run_dir = ensure_prior("segment", profile, Path("runs") / "pnp" / f"segment-{profile}", device)
    den = load_denoiser(run_dir, device=device).eval().requires_grad_(False)
    size = json.loads((run_dir / "config.json").read_text())["data"]["size"]
    img, truth = split_scene(load_dataset("scenes", "test", n=p["n"], size=size, seed=SEED).x.to(device))
    truth = truth > 0
    t0 = time.perf_counter()
    km = kmeans_segment(img.cpu())
    t_km = (time.perf_counter() - t0) / p["n"]
    t0 = time.perf_counter()
    ot = otsu_segment(img.cpu())
    t_ot = (time.perf_counter() - t0) / p["n"]
    g = torch.Generator(device=device).manual_seed(derive_seed(SEED, "segment"))
    res = segment(den, img, chains=p["chains"], steps=p["steps"], lr=p["lr"], votes=p["votes"],
                  schedule=sch.LinearAnneal(p["start"], 0.0), generator=g)
    iou_pnp = float(iou(res.mask.cpu(), truth.cpu()).mean())
    iou_km, iou_ot = float(iou(km, truth.cpu()).mean()), float(iou(ot, truth.cpu()).mean())
    best = max(iou_km, iou_ot)
    log(f"segment: IoU pnp {iou_pnp:.3f}, 2-means {iou_km:.3f}, Otsu {iou_ot:.3f}")
    rows = [row("segmentation", "PnP mask inference", p["n"], "mean IoU", iou_pnp, res.seconds / p["n"],
                ">= best baseline + 0.1", "met" if iou_pnp >= best + 0.1 else "MISSED"),
            row("segmentation", "2-means colour clustering", p["n"], "mean IoU", iou_km, t_km),
            row("segmentation", "Otsu threshold", p["n"], "mean IoU", iou_ot, t_ot)]
    # the same chains under other vote rules (no extra inference): what the union adds
    lat = res.latents.cpu()
    one = float(np.mean([float(iou(vote(lat[:, c:c + 1], 1), truth.cpu()).mean()) for c in range(p["chains"])]))
    rows.append(row("segmentation", "PnP, one chain (mean over chains)", p["n"], "mean IoU", one))
    for k in range(1, p["chains"] + 1):
        if k != p["votes"]:
            rows.append(row("segmentation", f"PnP, >= {k} of {p['chains']} chains", p["n"], "mean IoU",
                            float(iou(vote(lat, k), truth.cpu()).mean())))
    notes = [f"segmentation prior: {run_dir} ({size} px scenes); {p['chains']} chains per scene, "
             f"{p['steps']} steps, LinearAnneal({p['start']} -> 0), Adam lr {p['lr']}; a pixel is foreground "
             f"where at least {p['votes']} chain(s) say so (chosen on 48 training scenes, docs/pnp.md)."]
    return rows, notes


def _part_cache(profile: str, part: str) -> Path:
    return Path("runs") / "pnp" / f"bench-{profile}" / f"{part}.json"


def run(profile: str = "quick", device: str = "cpu") -> dict:
    """Run the three parts (or those named in ``$PNP_BENCH_PARTS``, e.g. ``tsp,digits``) and assemble the
    table. A finished part is stored in ``runs/pnp/bench-<profile>/<part>.json`` with its settings and
    reused by a later run with identical settings, so the benchmark can be run in pieces."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    if device == "cpu":
        torch.set_num_threads(1)  # the shared 2-core CI machines: one thread is faster than two contended ones
    p = copy.deepcopy(PROFILES[profile])
    parts = [s.strip() for s in os.environ.get("PNP_BENCH_PARTS", "tsp,digits,segment").split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"PNP_BENCH_PARTS: unknown part(s) {unknown}; expected some of {list(PARTS)}")
    pieces = []  # (cache name, part, its settings); each TSP size is a piece of its own
    for part in PARTS:
        if part in parts:
            pieces += ([(f"tsp-{n}", part, {**p[part], "sizes": [n]}) for n in p[part]["sizes"]] if part == "tsp"
                       else [(part, part, p[part])])
    rows, notes, reused = [], [], []
    for name, part, q in pieces:
        settings = {"prior": p["prior"], **q, "device": device}
        cache = _part_cache(profile, name)
        if cache.is_file() and json.loads(cache.read_text()).get("settings") == settings:
            done = json.loads(cache.read_text())
            log(f"{name}: reusing the finished part in {cache} ({done['date']})")
            rows += done["rows"]
            reused.append(name)
            notes += done["notes"] + [f"{name}: measured on {done['date']} (stored in {cache})."]
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        r, nt = PARTS[part](q, p["prior"], device)
        nt = nt + [f"{name}: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU "
                   "of this process (including any prior training); a wall/CPU ratio above 1 on one thread "
                   "means the machine was shared."]
        io.write_json_atomic(cache, {"settings": settings, "rows": r, "notes": nt,
                                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        rows += r
        notes += nt
    if reused:
        notes.append(f"Pieces reused from earlier runs: {', '.join(reused)}; the time in the header is that of "
                     "the assembling run only, each piece's own time is in its note.")
    notes += READING_NOTES
    return {"title": "Plug-and-play priors: TSP, conditional digits, segmentation",
            "columns": ["task", "method", "n", "metric", "value", "s / item", "target", "met"],
            "rows": rows, "notes": notes,
            # a part of the table is never recorded over the whole one (condiff.cli.bench)
            **({"partial": f"PNP_BENCH_PARTS={','.join(parts)}"} if set(parts) != set(PARTS) else {})}


READING_NOTES = [
    "Untrained network: the architecture as initialised, whose output layer starts at zero, so the "
    "through-network gradient is exactly zero and each chain decodes its random initial latent: a "
    "randomised greedy + 2-opt (best of the chains), the floor the learned prior has to beat.",
    "Fréchet ratio: plug-and-play inference returns a point estimate (a mode-seeking optimum of the "
    "denoising loss), not a sample, so it loses fidelity against ancestral samples of the same prior; the "
    "classifier weight trades success rate against it. The finish (condiff.pnp.engine.finish) re-noises "
    "the PnP result to t = 400 and samples back with DPS on the same constraint, which restores sample-like "
    "detail (t = 400 and zeta 0.25 chosen on a draw with other seeds; without guidance the same finish kept "
    "only 29% of the labels). DPS guided sampling from noise, the finish's guidance alone, is the reference: "
    "it matches the finished PnP results on both success and Fréchet distance in a fifth of the time, so on "
    "8x8 digits the PnP search adds little to a guided sampler.",
    "Segmentation: the quick scenes prior (UNet base 32, 8000 CPU steps at 24 px) denoises better than the "
    "earlier base-16, 2000-step one (loss 0.050 vs 0.061) but its masks scored the same IoU with the old "
    "search (0.530 vs 0.531); the longer anneal from T (1200 steps instead of 150 from 0.6 T) moved the "
    "IoU, and counting the chains' votes (the union) moved it further: a chain tends to miss a shape rather "
    "than invent one. The full (GPU) profile trains a larger prior for 40000 steps.",
]

PARTS = {"tsp": tsp_rows, "digits": digits_rows, "segment": segment_rows}
