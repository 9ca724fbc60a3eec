"""Training-free guidance on inverse problems: DPS, FreeDoM, UGD, each with and without DSG.

Tasks (sigma_y = 0.05 in [-1, 1] units): digits random inpainting (70% of pixels missing) and box
inpainting; patches 2x bicubic super-resolution and Gaussian deblurring. Images come from the TEST
split (a seeded choice per task); every method starts from the same noise (common random numbers)
and uses DDIM with eta = 1 and x0_hat clipped to [-1, 1]. Hyperparameters are the library's
defaults per task and step budget (condiff/guidance/defaults.py), chosen by
benchmarks/guidance_sweep.py on the TRAIN split.

Profiles
- quick (CPU): 64 test images per task; all six methods at 20, 50 and 100 steps, and DPS and
  DPS+DSG also at 1000 steps (the reference of the "50 vs 1000 steps" target). Models are small and
  trained here on first use (digits: UNet base 32, mults (1, 2), 4000 steps; patches: 16 px patches
  of the photos downscaled 2x, UNet base 16, mults (1, 2, 2), 4000 steps), and the deblur kernel is
  7 px, sigma 1.0 at 16 px. On the shared 2-core CPU (one thread) it takes ~34 min to train the
  models on first use (11 min in a rerun of 2026-12-05), then ~8-9 min of guided sampling and ~4 min
  of cost measurements: a first run goes over the ~25 min aimed at, but the issue's 64 images per
  task and the 1000-step DPS reference are kept.
- full (GPU): 128 test images; all methods at 20, 50, 100 and 1000 steps; a digits UNet
  of base 64, mults (1, 2, 2), and the 32 px patches preset; deblur kernel 13 px, sigma 2.0.
- quick-paired (CPU, ~25 min with quick's models in place): DPS and DPS+DSG only, at 20, 50, 100
  and 1000 steps, on 256 test images per task, so the paired PSNR gaps of the "beats DPS at every
  budget, widening" target carry half quick's standard error. No cost measurements. Recorded in
  its own section of BENCHMARKS.md.
- quick-paired-patches (CPU, ~10 min): the same on the two patch tasks at 20, 50 and 100 steps, on
  1024 test images each (a quarter of quick's standard error).

Columns: PSNR and SSIM against the truth, RMS measurement residual ||y - A x|| / sqrt(m) (the truth
itself scores about sigma_y = 0.05), sample fidelity (digits: Fréchet distance of the project
classifier's features to the test split; patches: MMD^2 to all test patches), wall time of the
sampling loop, network forward passes (NFE) and backward passes. A "(ground truth)" row per task
gives the fidelity and residual of the true images. Timing targets are measured separately with
interleaved repeats (see the notes).

Reuse: with ``CONDIFF_BENCH_REUSE=1`` a quality row is taken from an earlier run when everything that
determines it is unchanged (task, method, steps, hyperparameters, images, seeds, the model's weights,
and the condiff package's source but for its table of defaults; cache:
runs/bench-guidance/<profile>/rows.json).
The notes say how many rows were reused. (Until 2026-12-01 the key left the code out, and a run mixed
in rows from an older library version that differed by up to 0.4 dB.)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import condiff
from condiff import io, metrics
from condiff.cli.common import model_is_complete, train_or_reuse
from condiff.cli.solve import build_operator
from condiff.data import derive_seed, load_dataset
from condiff.guidance import METHODS, default_hyperparameters, guided_sample, make_guidance
from condiff.models import load_denoiser

SIGMA_Y = 0.05
ETA = 1.0
SEED = 0

_TRAIN = {"batch_size": 128, "lr": 2e-3, "warmup": 200, "ema_decay": 0.999, "ckpt_every": 1000}
_SCHEDULE = {"kind": "linear", "T": 1000}
_SAMPLE = {"n": 1000, "steps": 100, "eta": 1.0, "batch_size": 500, "seed": 0, "clip_x0": 1.0}
MODELS = {
    "quick": {
        "digits": {"data": {"name": "digits"}, "schedule": _SCHEDULE, "sample": _SAMPLE,
                   "model": {"name": "unet", "in_channels": 1, "base": 32, "mults": [1, 2], "num_res": 1},
                   "train": {**_TRAIN, "steps": 4000}},
        "patches": {"data": {"name": "patches", "size": 16, "downscale": 2}, "schedule": _SCHEDULE,
                    "sample": {**_SAMPLE, "n": 256},
                    "model": {"name": "unet", "in_channels": 3, "base": 16, "mults": [1, 2, 2], "num_res": 1},
                    "train": {**_TRAIN, "batch_size": 64, "lr": 1e-3, "steps": 4000}},
    },
    "full": {
        "digits": {"data": {"name": "digits"}, "schedule": _SCHEDULE, "sample": _SAMPLE,
                   "model": {"name": "unet", "in_channels": 1, "base": 64, "mults": [1, 2, 2], "num_res": 1},
                   "train": {**_TRAIN, "steps": 4000, "ckpt_every": 500}},
        "patches": {"data": {"name": "patches", "size": 32}, "schedule": _SCHEDULE,
                    "sample": {**_SAMPLE, "n": 256},
                    "model": {"name": "unet", "in_channels": 3, "base": 64, "mults": [1, 2, 2, 2],
                              "num_res": 1},
                    "train": {**_TRAIN, "batch_size": 64, "lr": 2e-4, "warmup": 500, "steps": 20000}},
    },
}

# task -> data set and operator; per-profile operator parameters below
TASKS = {
    "digits/inpaint-random": {"data": "digits", "operator": "inpaint-random", "params": {"p_drop": 0.7}},
    "digits/inpaint-box": {"data": "digits", "operator": "inpaint-box", "params": {"box": 4, "margin": 1}},
    "patches/sr": {"data": "patches", "operator": "sr", "params": {"factor": 2, "kernel": "bicubic"}},
    "patches/blur": {"data": "patches", "operator": "blur", "params": {"size": 7, "sigma": 1.0}},
}
TASK_PARAMS = {"full": {"patches/blur": {"size": 13, "sigma": 2.0}}}

PROFILES = {
    "quick": {"n": 64, "steps": [20, 50, 100], "long": {1000: ["dps", "dsg+dps"]},
              "timing": {"steps": 20, "batch": 64, "repeats": 15}},
    "full": {"n": 128, "steps": [20, 50, 100, 1000], "long": {},
             "timing": {"steps": 50, "batch": 64, "repeats": 5}},
    # DPS vs DPS+DSG only, on 4x the images of quick (same models, tasks and defaults): the paired
    # PSNR gaps of the "beats DPS at every budget, widening" target with half the standard error
    "quick-paired": {"base": "quick", "n": 256, "steps": [20, 50, 100], "long": {1000: ["dps", "dsg+dps"]},
                     "methods": ["dps", "dsg+dps"], "timing": None},
    # the patch tasks at few steps on 1024 images (SE about a quarter of quick's): is deblur's
    # 20-step gap really below its 50-step one?
    "quick-paired-patches": {"base": "quick", "n": 1024, "steps": [20, 50, 100], "long": {},
                             "methods": ["dps", "dsg+dps"], "timing": None,
                             "tasks": ["patches/sr", "patches/blur"]},
}


def base_profile(profile: str) -> str:
    """The profile whose models and task parameters ``profile`` uses."""
    return PROFILES.get(profile, {}).get("base", profile)


def log(msg: str) -> None:
    print(f"[guidance] {msg}", file=sys.stderr, flush=True)


def runs_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "runs" / "bench-guidance"


def task_spec(task: str, profile: str) -> dict:
    spec = copy.deepcopy(TASKS[task])
    spec["params"].update(TASK_PARAMS.get(base_profile(profile), {}).get(task, {}))
    return spec


def ensure_model(dataset: str, profile: str, device: str):
    """The benchmark's denoiser for ``dataset``, trained into runs/bench-guidance/<profile>/ once."""
    profile = base_profile(profile)
    cfg = copy.deepcopy(MODELS[profile][dataset])
    run_dir = runs_dir() / profile / dataset
    if not model_is_complete(run_dir, cfg):
        log(f"training the {profile} {dataset} model into {run_dir} ({cfg['train']['steps']} steps)")
    train_or_reuse({**cfg, "_device": device}, run_dir, own=True)
    return load_denoiser(run_dir, device=device).eval().requires_grad_(False), cfg


def weights_digest(dataset: str, profile: str) -> str:
    """SHA-256 of the model's weight files (part of the reuse key)."""
    h = hashlib.sha256()
    for f in sorted((runs_dir() / base_profile(profile) / dataset / "model").glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def _code_fingerprint() -> str:
    """A hash of the library's source, so a cached row is reused only under the code that made it."""
    return source_hash(Path(condiff.__file__).resolve().parent)


def source_hash(root: Path) -> str:
    """A hash of the ``.py`` files under ``root`` (names and bytes), leaving out the table of defaults
    ``guidance/defaults.py``: a row's hyperparameters are in its key already."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if f.relative_to(root).as_posix() != "guidance/defaults.py":
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


class RowCache:
    """Quality rows keyed by everything that determines them (opt-in, see the module docstring)."""

    def __init__(self, profile: str) -> None:
        self.enabled = os.environ.get("CONDIFF_BENCH_REUSE", "") == "1"
        self.path = runs_dir() / profile / "rows.json"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # derived profiles have no model dir
        self.rows = json.loads(self.path.read_text()) if self.enabled and self.path.is_file() else {}
        self.reused = 0

    def key(self, *parts) -> str:
        return json.dumps([_code_fingerprint(), *parts], sort_keys=True, default=str)

    def get(self, key: str) -> dict | None:
        row = self.rows.get(key) if self.enabled else None
        self.reused += row is not None
        return copy.deepcopy(row)

    def put(self, key: str, row: dict) -> None:
        if self.enabled:
            self.rows[key] = row
            io.write_text_atomic(self.path, json.dumps(self.rows))


def images(dataset_cfg: dict, split: str, n: int, tag: str) -> torch.Tensor:
    """A seeded choice of ``n`` images of ``split`` (the tag makes each task's choice its own)."""
    kw = {k: v for k, v in dataset_cfg.items() if k != "name"}
    data = load_dataset(dataset_cfg["name"], split=split, **kw)
    if n > len(data):
        raise ValueError(f"{dataset_cfg['name']} {split}: {n} images asked for, {len(data)} available")
    g = torch.Generator().manual_seed(derive_seed(SEED, tag, split, "images"))
    return data.x[torch.randperm(len(data), generator=g)[:n]]


def problem(task: str, profile: str, x: torch.Tensor, device: str, seed_tag: str = ""):
    """The operator and noisy measurement of ``x`` for ``task`` (fixed seeds)."""
    spec = task_spec(task, profile)
    gop = torch.Generator().manual_seed(derive_seed(SEED, task, seed_tag, "op"))
    op = build_operator(spec["operator"], tuple(x.shape), gop, SIGMA_Y, spec["params"]).to(device)
    gy = torch.Generator().manual_seed(derive_seed(SEED, task, seed_tag, "noise"))
    return op, op.measure(x.to(device), gy)


def solve(den, method: str, hp: dict, op, y: torch.Tensor, shape: tuple[int, ...], steps: int, device: str,
          seed: int):
    g = make_guidance(method, op.loss(y), **copy.deepcopy(hp))
    gen = torch.Generator(device=device).manual_seed(seed)
    return guided_sample(den, g, shape, steps, eta=ETA, generator=gen, device=device, clip_x0=1.0)


class Fidelity:
    """Sample fidelity: digits -> classifier Fréchet distance to the test split; patches -> MMD^2 to
    the test patches (both computed on the reconstructions as a set)."""

    def __init__(self, dataset_cfg: dict) -> None:
        self.name = dataset_cfg["name"]
        if self.name == "digits":
            from condiff.classifier import DigitsJudge

            self.judge = DigitsJudge()
            self.label = "classifier FD to test"
        else:
            kw = {k: v for k, v in dataset_cfg.items() if k != "name"}
            self.ref = load_dataset(self.name, split="test", **kw).x
            self.label = "MMD^2 to test"

    def __call__(self, x: torch.Tensor) -> float:
        x = x.detach().float().cpu()
        if self.name == "digits":
            return float(self.judge.evaluate(x)["frechet_to_test"])
        return float(metrics.mmd(x, self.ref))


def row(task, method, steps, x, rec, op, y, fid, res=None) -> dict:
    r = {"task": task, "method": method, "steps": steps,
         "residual": float(op.residual(rec, y).mean()), "fidelity": fid(rec)}
    if res is not None:
        per_image = metrics.psnr(rec.cpu(), x.cpu())
        r.update({"PSNR": float(per_image.mean()), "per-image PSNR": [round(float(v), 4) for v in per_image],
                  "SSIM": float(metrics.ssim(rec.cpu(), x.cpu()).mean()),
                  "wall (s)": round(res.seconds, 2), "NFE": res.nfe, "backward": res.grad_evals})
    return r


def quality_rows(profile: str, device: str, cache: RowCache) -> tuple[list[dict], dict, float]:
    """The quality rows, the models, and the seconds spent loading or training the models."""
    p = PROFILES[profile]
    rows, fid_labels = [], {}
    models: dict = {}
    digests: dict = {}
    model_seconds = 0.0
    for task, spec in TASKS.items():
        if task not in p.get("tasks", TASKS):
            continue
        ds = spec["data"]
        if ds not in models:
            t0 = time.perf_counter()
            models[ds] = ensure_model(ds, profile, device)
            model_seconds += time.perf_counter() - t0
            digests[ds] = weights_digest(ds, profile)
        den, cfg = models[ds]
        fid = Fidelity(cfg["data"])
        fid_labels[ds] = fid.label
        x = images(cfg["data"], "test", p["n"], task).to(device)
        op, y = problem(task, profile, x, device)
        rows.append(row(task, "(ground truth)", "", x, x, op, y, fid))
        budgets = [(s, list(p.get("methods", METHODS))) for s in p["steps"]] + list(p["long"].items())
        for steps, methods in budgets:
            for method in methods:
                hp = default_hyperparameters(method, task, steps)
                key = cache.key(task, task_spec(task, profile), method, steps, hp, p["n"], SEED, ETA, SIGMA_Y,
                                digests[ds])
                r = cache.get(key)
                if r is None:
                    res = solve(den, method, hp, op, y, tuple(x.shape), steps, device,
                                derive_seed(SEED, task, "sample"))
                    r = row(task, method, steps, x, res.x, op, y, fid, res)
                    cache.put(key, r)
                rows.append(r)
                log(f"{task} {method:12s} {steps:5d} steps: PSNR {r['PSNR']:.2f} SSIM {r['SSIM']:.3f} "
                    f"res {r['residual']:.4f} fid {r['fidelity']:.4g} ({r['wall (s)']:.1f} s)")
    return rows, models, model_seconds


def _paired_se(per_image: dict, task: str, steps: int) -> float | None:
    """Standard error of the mean per-image PSNR difference DPS+DSG - DPS (same images); None without
    per-image figures."""
    a, b = per_image.get((task, "dsg+dps", steps)), per_image.get((task, "dps", steps))
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return None
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.std() / len(d) ** 0.5)


def targets(rows: list[dict]) -> list[str]:
    """The issue's quality targets, checked on the measured rows. A PSNR gap that is positive but within
    one standard error of zero counts for the target and is named as a tie."""
    psnr = {(r["task"], r["method"], r["steps"]): r["PSNR"] for r in rows if "PSNR" in r}
    per_image = {(r["task"], r["method"], r["steps"]): r["per-image PSNR"] for r in rows if "per-image PSNR" in r}
    notes = []
    for task in TASKS:
        a, b = psnr.get((task, "dsg+dps", 50)), psnr.get((task, "dps", 1000))
        if a is not None and b is not None:
            notes.append(f"{task}: DPS+DSG@50 {a:.2f} dB vs DPS@1000 {b:.2f} dB -> "
                         f"{'met' if a >= b else 'MISSED'}")
        gaps = [(s, psnr[(task, "dsg+dps", s)] - psnr[(task, "dps", s)], _paired_se(per_image, task, s))
                for s in sorted({k[2] for k in psnr if k[0] == task and k[1] == "dps"})
                if (task, "dsg+dps", s) in psnr]
        if gaps:
            beats = all(g > 0 for _, g, _ in gaps)
            widening = all(g1 >= g2 for (_, g1, _), (_, g2, _) in zip(gaps, gaps[1:]))
            shown = ", ".join(f"{s}: {g:+.2f}" + ("" if se is None else f" (SE {se:.2f})") for s, g, se in gaps)
            ties = [str(s) for s, g, se in gaps if se is not None and 0 < g <= se]
            tie = f" (within one SE of a tie at {', '.join(ties)} steps)" if beats and ties else ""
            notes.append(f"{task}: PSNR gap DPS+DSG - DPS by steps ({shown}) -> beats DPS at every budget: "
                         f"{'met' if beats else 'MISSED'}{tie}; gap widens as steps shrink: "
                         f"{'met' if widening else 'MISSED'}")
    return notes


def timing(models: dict, profile: str, device: str) -> list[str]:
    """DSG's wall-time overhead over each base method, and a guided step's cost relative to one
    forward + backward pass of the network (interleaved repeats; medians of per-pair ratios)."""
    from _timing import alternate, median, median_ratio

    p = PROFILES[profile]["timing"]
    S, B = p["steps"], p["batch"]
    lines = []
    for task in ("digits/inpaint-random", "patches/sr"):
        ds = TASKS[task]["data"]
        den, cfg = models[ds]
        x = images(cfg["data"], "test", B, task).to(device)
        op, y = problem(task, profile, x, device)
        shape = tuple(x.shape)
        hp = {m: default_hyperparameters(m, task, S) for m in METHODS}
        for m in METHODS:  # equal work per step: DSG guides every step here
            hp[m].update({"interval": 1} if m.startswith("dsg+") else {})
        fns = _timed_runs(den, hp, op, y, shape, S, device)
        times = alternate(fns, p["repeats"], device, desc=f"{task}: cost of DSG")
        for base in ("dps", "freedom", "ugd"):
            r = median_ratio(times[f"dsg+{base}"], times[base])
            lines.append(f"{task}: wall time DSG+{base.upper()} / {base.upper()} = {r:.3f} "
                         f"({S} steps, batch {B}) -> target <= 1.03 {'met' if r <= 1.03 else 'MISSED'}")
        for m in ("dps", "dsg+dps"):
            r = median_ratio(times[m], times["fwd+bwd"])
            lines.append(f"{task}: {m.upper()} step / (forward + backward) = {r:.3f} "
                         f"({median(times[m]):.2f} s vs {median(times['fwd+bwd']):.2f} s for {S} steps) "
                         f"-> target <= 1.1 {'met' if r <= 1.1 else 'MISSED'}")
        lines.append(_update_cost(den, op, y, shape, median(times["fwd+bwd"]) / S, task, device))
        log("\n".join(lines[-6:]))
    return lines


def _update_cost(den, op, y, shape: tuple[int, ...], fwd_bwd: float, task: str, device: str,
                 calls: int = 200) -> str:
    """DSG's own extra work, timed in isolation: its spherical update vs the Euclidean step it replaces,
    on one step record of the timing batch (many calls, so machine noise averages out)."""
    from _timing import timed

    from condiff.guidance import DPS, EUCLIDEAN, SphericalStep
    from condiff.sample import make_step

    B = shape[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_(True)
    t = torch.full((B,), den.schedule.T // 2, dtype=torch.long, device=device)
    step = make_step(den, x, 0, t, t - den.schedule.T // 20, 1.0, torch.Generator().manual_seed(4), 1.0)
    _, g = DPS(op.loss(y)).gradient(step)
    sph = SphericalStep(0.5)
    with torch.no_grad():
        t_sph = min(timed(lambda: [sph(step, g, 1.0) for _ in range(calls)], device) for _ in range(3)) / calls
        t_euc = min(timed(lambda: [EUCLIDEAN(step, g, 1.0) for _ in range(calls)], device) for _ in range(3)) / calls
    extra = (t_sph - t_euc) / fwd_bwd
    return (f"{task}: DSG's spherical update alone costs {1e3 * t_sph:.3f} ms vs {1e3 * t_euc:.3f} ms for the "
            f"Euclidean step, i.e. {100 * extra:+.2f}% of one forward + backward ({1e3 * fwd_bwd:.1f} ms): "
            f"the physical overhead of DSG (best of 3 x {calls} calls)")


def _timed_runs(den, hp: dict, op, y, shape: tuple[int, ...], S: int, device: str) -> dict:
    """The functions the cost targets time: S forward + backward passes of the network on the batch
    (the floor of gradient guidance), and S steps of each method."""
    ts = den.schedule.timesteps(S).tolist()
    xt = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    v = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)

    def fwd_bwd():
        for t in ts:
            xr = xt.detach().requires_grad_(True)
            eps = den.eps(xr, torch.full((shape[0],), t, device=device, dtype=torch.long))
            torch.autograd.grad((eps * v).sum(), xr)

    fns = {"fwd+bwd": fwd_bwd}
    for m in METHODS:
        fns[m] = (lambda m=m: solve(den, m, hp[m], op, y, shape, S, device, 0))
    return fns


def run(profile: str = "quick", device: str = "cpu") -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    if device == "cpu":
        torch.set_num_threads(1)  # the machine is shared; timings are per core
    t0 = time.perf_counter()
    cache = RowCache(profile)
    rows, models, t_models = quality_rows(profile, device, cache)
    t_quality = time.perf_counter() - t0 - t_models
    notes = ["Targets (quality):"] + [f"- {n}" for n in targets(rows)]
    notes += ["SE: standard error of the mean per-image PSNR difference DPS+DSG - DPS over the same test "
              "images (paired); a gap within about two SE of zero is not resolved at this number of images, and "
              "the notes name the budgets whose gap lies within one SE as ties."]
    p = PROFILES[profile]
    if p["timing"] is not None:
        notes += ["Targets (cost):"] + [f"- {n}" for n in timing(models, profile, device)]
    notes += [
        f"Profile {profile}: {p['n']} test images per task; steps {p['steps']}"
        + (f", plus {', '.join(f'{s} steps for {m}' for s, m in p['long'].items())}" if p["long"] else "")
        + f"; sigma_y = {SIGMA_Y}; DDIM eta = {ETA}; quality runs took {t_quality:.0f} s "
        + f"(models loaded or trained in {t_models:.0f} s more)"
        + (f" ({cache.reused} of {sum('PSNR' in r for r in rows)} rows reused from an earlier run of the "
           "same configuration, CONDIFF_BENCH_REUSE=1: their wall (s) is from that run, and the time in "
           "the header covers this run only)." if cache.reused else "."),
        "Fidelity: digits = Fréchet distance of the project's digits-classifier features to the test "
        "split (64 samples: biased upward; compare with the ground-truth row); patches = MMD^2 to the "
        "test patches. Residual = ||y - A x|| / sqrt(#measurements), the truth scores ~sigma_y.",
        "wall (s) is one run of the sampling loop on a shared machine; the cost targets use interleaved "
        "repeats instead. NFE = network forward passes, backward = backward passes through the network. "
        "DSG computes a gradient only at the steps it guides: every interval-th step, and the last step "
        "(t_prev = -1, sigma = 0) only with final > 0 (with final = 0 that step is the mean). So DSG+X "
        "makes fewer backward passes than X where its interval is above 1 (the 1000-step defaults) or "
        "its final is 0; the DSG wall-time ratios include any such saving.",
        "Models: " + "; ".join(f"{d}: {c['model']} trained {c['train']['steps']} steps on {c['data']}"
                               for d, c in MODELS[base_profile(profile)].items()),
    ]
    title = "Training-free guidance on inverse problems (DPS, FreeDoM, UGD, each +DSG)"
    if "methods" in p:
        title = f"Training-free guidance: {' vs '.join(p['methods'])} on {p['n']} images per task ({profile})"
    return {"title": title,
            "columns": ["task", "method", "steps", "PSNR", "SSIM", "residual", "fidelity", "wall (s)", "NFE",
                        "backward"],
            "rows": rows, "notes": notes}
