"""Hyperparameter sweep behind the guidance defaults (condiff/guidance/defaults.py), on the TRAIN split.

For every task of benchmarks/guidance.py and step budget, each method's hyperparameters are chosen
by the mean PSNR over a seeded choice of K training images (never the test images the benchmark
reports). Every grid point sees the same K images, masks and measurement noise, and (since
2026-12-01) the same sampling noise: the points run one after another from one seed (common random
numbers), so their differences are paired. Until then a grid ran in one batch (the images repeated
once per point, the hyperparameter a per-sample tensor) in which every point drew its own sampling
noise, and on 128 digits images that noise alone moved a point's mean PSNR by several tenths of a dB
(random inpainting at 1000 steps: final 0.5 beat final 0 by 0.76 dB there, and by -0.02 dB on the
same 256 test images with shared noise).

Order and grids:
1. DPS: zeta in ZETAS.                 2. FreeDoM: zeta in ZETAS (repeats 2, travel 0.5T..0.8T).
3. UGD: forward s in FORWARDS x backward_lr in BACKWARD_LRS (backward_steps 3, recurrence 2).
4. DPS+DSG, FreeDoM+DSG, UGD+DSG: guidance rate w in RATES with interval 1 (UGD+DSG keeps UGD's
   chosen backward_lr). At 1000 steps DPS+DSG also tries intervals INTERVALS_1000 (the DSG paper
   uses 5 to 20 there).
Quick profile: K = 8 images; budgets 20, 50, 100 for all methods and 1000 for DPS and DPS+DSG (what
the quick benchmark runs). Full profile: K = 16, all methods at all four budgets.
Quick-refine profile (quick models): DPS and DPS+DSG only, at 20, 50 and 100 steps, re-chosen on
K = 32 training images (a superset of the quick profile's 8) over the part of the grids the quick
sweep ever picked from (zeta 0.2..5, rate 0.1..1): with 8 images the choice was noisy (rate 1 for
DPS+DSG at 100 steps on patches/sr: 29.8 dB on the 8 training images, 27.8 dB on the 64 test images).
Quick-final profiles: DPS+DSG with the final Euclidean step (``final``, an extension: see
condiff/guidance/dsg.py), rate x final on K = 32 images at 20, 50 and 100 steps; at 1000 steps rate x
final x interval on K = 32 (about 6 minutes per task and interval on one CPU core; K = 8 proved too
noisy at 1000 steps).
Common-random-numbers profiles: ``quick-crn`` (DPS zeta, DPS+DSG rate x final at 20, 50, 100 steps)
and ``quick-1000-crn`` (zeta; rate x final at interval 5), both on K = 128 images, and the refinements
after them (``quick-crn-20-lo``; ``quick-1000-crn-`` ``int``, ``wide``, ``hi``, ``hi5``, ``edge``,
``final10``, ``final1``, ``dps``; and ``between``, ``between-lo``: DPS+DSG with DPS's own step off
the interval, ``between = "base"``, an extension). They share the images, measurements and sampling seeds, so their
scores compare across runs: ``--profile crn-best`` samples nothing and takes, per task, budget and
method, the best point over all of them (refusing a point two runs scored differently). Its
``tuned`` holds the DPS and DPS+DSG defaults.
``SWEEP_TASKS=patches/sr,patches/blur`` restricts a run to some tasks; the result JSON keeps the rows
and choices of the other tasks from the profile's earlier result, so runs of one profile in parallel,
one task each, add up (until 2026-11-30 they overwrote each other and were merged by hand, as the
quick-final-1000 and quick-1000-* result files record).
Record the refinements (no ``--no-record``): ``crn-best`` and the ``SWEEP_TASKS`` merge read only the
result files in benchmarks/results/, which a trial run does not write. A recorded profile other than
quick appends a section of its own to BENCHMARKS.md; the refinement tables below the quick one there
were pasted by hand, outside the quick section, which a recorded quick run replaces.
The result JSON holds ``tuned``, the table pasted into condiff/guidance/defaults.py (for DPS and
DPS+DSG, crn-best's; tests/test_bench_sweep.py checks the two agree), and per row every grid point's
score (``scores``) and the settings held fixed around the grid (``fixed``), which crn-best reads.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
from guidance import ETA, MODELS, SEED, TASKS, ensure_model, images, log, problem

from condiff import metrics
from condiff.data import derive_seed
from condiff.guidance import GENERIC, guided_sample, make_guidance

ZETAS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
FORWARDS = [1.0, 3.0, 10.0, 30.0, 100.0]
BACKWARD_LRS = [0.0, 0.1, 0.3, 1.0]
RATES = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
INTERVALS_1000 = [1, 5, 20]
RATES_1000 = [0.05, 0.1, 0.2, 0.4]

PROFILES = {
    "quick": {"k": 8, "budgets": {20: "all", 50: "all", 100: "all", 1000: ["dps", "dsg+dps"]}},
    "full": {"k": 16, "budgets": {20: "all", 50: "all", 100: "all", 1000: "all"}},
    "quick-refine": {"k": 32, "models": "quick", "budgets": {s: ["dps", "dsg+dps"] for s in (20, 50, 100)},
                     "grids": {"zeta": [0.2, 0.5, 1.0, 2.0, 5.0], "rate": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]}},
    # DPS+DSG with the final Euclidean step (condiff.guidance.dsg, `final`), rate and final chosen
    # jointly; DPS keeps its quick-refine choice
    "quick-final": {"k": 32, "models": "quick", "budgets": {s: ["dsg+dps"] for s in (20, 50, 100)},
                    "grids": {"rate": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0], "final": [0.0, 0.25, 0.5, 1.0, 2.0]}},
    # quick-final chose final = 2, its grid's top, for SR and deblur at 20 steps: the grid beyond it
    "quick-final-20-hi": {"k": 32, "models": "quick", "budgets": {20: ["dsg+dps"]},
                          "grids": {"rate": [0.2, 0.3, 0.5], "final": [1.0, 2.0, 3.0, 5.0, 8.0]}},
    "quick-final-1000": {"k": 32, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                         "grids": {"rate": [0.02, 0.05, 0.1, 0.2], "final": [0.0, 1.0], "interval": [1, 5]}},
    # the part of the 1000-step grid the run above left out (it chose interval 5 at its top rate 0.2
    # on every task); the defaults take the best of the two runs' rows
    "quick-final-1000-hi": {"k": 32, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                            "grids": {"rate": [0.3, 0.4, 0.6], "final": [0.0, 1.0], "interval": [5]}},
    # 1000 steps, both methods re-chosen on the same 32 images over a finer grid around the earlier
    # choices (DPS's zeta = 0.2 came from 8 images; DSG's interval between 1 and 5 was never tried)
    "quick-1000-refine": {"k": 32, "models": "quick", "budgets": {1000: ["dps", "dsg+dps"]},
                          "grids": {"zeta": [0.1, 0.15, 0.2, 0.3, 0.5], "rate": [0.15, 0.2, 0.3],
                                    "final": [0.0], "interval": [2, 3, 5, 10]}},
    # at 1000 steps the choice among neighbouring settings is within the noise of 32 images (the same
    # DSG setting scored 18.8 and below 17.9 dB in two batches): the region both refinements chose
    # from, on 128 training images
    "quick-1000-confirm": {"k": 128, "models": "quick", "budgets": {1000: ["dps", "dsg+dps"]},
                           "grids": {"zeta": [0.1, 0.2, 0.3], "rate": [0.15, 0.2, 0.3],
                                     "final": [0.0], "interval": [3, 5]}},
    # DSG falls short of DPS at 1000 steps on box inpainting and SR (quick-paired: its residual sits
    # near sigma_y, DPS's well below): the final Euclidean step at finer sizes than quick-final-1000's
    # [0, 1], on the 128 images of quick-1000-confirm, around its chosen rates at interval 5. Run in
    # one batch (own noise per point); its gains did not hold on test images, and quick-1000-crn below
    # superseded it and the next one
    "quick-1000-final": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                         "grids": {"rate": [0.2, 0.3], "final": [0.0, 0.25, 0.5, 1.0], "interval": [5]}},
    # the defaults re-chosen with common random numbers (every grid point sampled from one seed; the
    # runs above gave each point its own noise), on the 128 images of quick-1000-confirm: at 20, 50
    # and 100 steps DPS's zeta and DPS+DSG's rate x final around the earlier choices ...
    "quick-crn": {"k": 128, "models": "quick", "budgets": {s: ["dps", "dsg+dps"] for s in (20, 50, 100)},
                  "grids": {"zeta": [0.5, 1.0, 2.0, 5.0], "rate": [0.2, 0.3, 0.5, 0.7, 1.0],
                            "final": [0.0, 0.25, 0.5, 1.0, 2.0, 3.0]}},
    # ... and at 1000 steps zeta and, at interval 5 (chosen or tied for best on every task by
    # quick-1000-confirm), rate x final
    "quick-1000-crn": {"k": 128, "models": "quick", "budgets": {1000: ["dps", "dsg+dps"]},
                       "grids": {"zeta": [0.1, 0.2, 0.3], "rate": [0.2, 0.3], "final": [0.0, 0.25, 0.5],
                                 "interval": [5]}},
    # ... and DPS+DSG at the intervals below 5 (quick-1000-crn had DPS ahead on every task; the DSG
    # paper uses 5 to 20 at 1000 steps, but sphere steps at every step may fit the measurement closer)
    "quick-1000-crn-int": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                           "grids": {"rate": [0.1, 0.2, 0.3], "final": [0.25], "interval": [1, 2, 3]}},
    # DPS led DPS+DSG at 1000 steps on train in every earlier CRN run, with interval 5 at the edge of
    # quick-1000-crn's rates and intervals 1-3 no better: the intervals above 5 (the DSG paper uses 5
    # to 20 at 1000 steps) and a wider rate range, on the same 128 images and seeds
    "quick-1000-crn-wide": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                            "grids": {"rate": [0.1, 0.2, 0.3, 0.4], "final": [0.25], "interval": [5, 10, 20]}},
    # ... which chose interval 10 at its top rate 0.4 (ahead of DPS on random inpainting): the rates
    # above it at intervals 10 and 20
    "quick-1000-crn-hi": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                          "grids": {"rate": [0.5, 0.6, 0.8, 1.0], "final": [0.25], "interval": [10, 20]}},
    # ... and (quick-1000-crn-wide chose interval 5 at its top rate 0.4 on box and deblur) the rates
    # above it at interval 5
    "quick-1000-crn-hi5": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                           "grids": {"rate": [0.5, 0.6], "final": [0.25], "interval": [5]}},
    # ... and the edges left after those (deblur: interval 5 at hi5's top rate 0.6; SR: interval 20 at
    # rate 1), on the patch tasks: rates 0.8 and 1 at intervals 5 and 30
    "quick-1000-crn-edge": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                            "grids": {"rate": [0.8, 1.0], "final": [0.25], "interval": [5, 30]}},
    # ... and DSG's final step around the new 1000-step choices (all of the above held it at 0.25):
    # on the digits tasks at interval 10, on the patch tasks at intervals 5 and 20 with rate 1
    "quick-1000-crn-final10": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                               "grids": {"rate": [0.4, 0.8, 1.0], "final": [0.0, 0.5], "interval": [10]}},
    "quick-1000-crn-final1": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                              "grids": {"rate": [1.0], "final": [0.0, 0.5], "interval": [5, 20]}},
    # ... and, as DPS+DSG's 1000-step grid grew, DPS's zeta between its grid's points (it had 0.1,
    # 0.2, 0.3 only), so both methods are tuned as finely near their best
    "quick-1000-crn-dps": {"k": 128, "models": "quick", "budgets": {1000: ["dps"]},
                           "grids": {"zeta": [0.15, 0.25]}},
    # quick-crn chose rate 0.2 (its grid's lowest) for SR at 20 steps and 0.2-0.3 for deblur: the
    # rates below, with final around its choices, and DPS's zeta between 1 and 5 (same images, seeds)
    "quick-crn-20-lo": {"k": 128, "models": "quick", "budgets": {20: ["dps", "dsg+dps"]},
                        "grids": {"zeta": [1.5, 2.0, 3.0], "rate": [0.05, 0.1, 0.15, 0.2],
                                  "final": [0.5, 1.0, 1.5, 2.0]}},
    # DPS+DSG with DPS's own step between the DSG steps (between = "base", an extension): at 1000
    # steps the DSG steps every 10 or 20 and DPS's zeta the rest of the time (same images, seeds)
    "quick-1000-crn-between": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                               "grids": {"rate": [0.2, 0.4, 1.0], "final": [0.25], "interval": [10, 20],
                                         "dsg+dps": {"zeta": [0.1, 0.2], "between": ["base"]}}},
    # ... which chose zeta 0.1, its grid's lowest, on random inpainting: zeta 0.05 below it
    "quick-1000-crn-between-lo": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                                  "grids": {"rate": [0.2, 0.4, 0.6], "final": [0.25], "interval": [10, 20],
                                            "dsg+dps": {"zeta": [0.05], "between": ["base"]}}},
    # not a sweep: the best point per task, budget and method over the CRN runs above, which share
    # the 128 images, measurements and sampling seeds, so their scores compare directly
    "crn-best": {"combine": ["quick-crn", "quick-crn-20-lo", "quick-1000-crn", "quick-1000-crn-int",
                             "quick-1000-crn-wide", "quick-1000-crn-hi", "quick-1000-crn-hi5",
                             "quick-1000-crn-edge", "quick-1000-crn-final10", "quick-1000-crn-final1",
                             "quick-1000-crn-dps", "quick-1000-crn-between",
                             "quick-1000-crn-between-lo"]},
    # quick-1000-final chose final = 0 on SR: the grid's gap below 0.25
    "quick-1000-final-lo": {"k": 128, "models": "quick", "budgets": {1000: ["dsg+dps"]},
                            "grids": {"rate": [0.2, 0.3], "final": [0.0, 0.05, 0.1, 0.15], "interval": [5]}},
}


def evaluate(den, method: str, fixed: dict, grid: dict[str, list], x, op, y, steps: int, device: str,
             seed: int) -> list[tuple[dict, float]]:
    """Mean train PSNR of every point of ``grid`` (a product of value lists), each point sampled from
    the same seed: common random numbers, so the points differ only by their hyperparameters."""
    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in _product([grid[k] for k in keys])]
    loss = op.loss(y)
    out = []
    for point in points:
        hp = {**copy.deepcopy(GENERIC[method]), **copy.deepcopy(fixed), **point}  # unswept: generic
        gen = torch.Generator(device=device).manual_seed(seed)
        res = guided_sample(den, make_guidance(method, loss, **hp), tuple(x.shape), steps, eta=ETA,
                            generator=gen, device=device, clip_x0=1.0)
        out.append((point, float(metrics.psnr(res.x.cpu(), x.cpu()).mean())))
    return out


def _fmt(v) -> str:
    """A grid value as the tables show it: numbers compactly (``0.25``, ``10``), names as they are."""
    return f"{v:g}" if isinstance(v, int | float) else str(v)


def _product(lists: list[list]) -> list[tuple]:
    out: list[tuple] = [()]
    for values in lists:
        out = [o + (v,) for o in out for v in values]
    return out


def sweep_budget(den, task, x, op, y, steps, methods, device, rows, grids: dict | None = None) -> dict:
    """Choose every method's hyperparameters at one step budget; returns {method: hyperparameters}.
    ``grids`` may replace the zeta and rate grids (``{"zeta": [...], "rate": [...]}``), and under a
    method's name add or replace that method's own grids (``{"dsg+dps": {"zeta": [...], "between":
    ["base"]}}``: DPS's step size inside DPS+DSG, not the ``zeta`` grid of DPS itself)."""
    grids = grids or {}
    zetas = grids.get("zeta", ZETAS)
    chosen: dict[str, dict] = {}
    seed = derive_seed(SEED, task, "sweep", steps)

    def pick(method, fixed, grid):
        grid = {**grid, **grids.get(method, {})}
        t0 = time.perf_counter()
        scores = evaluate(den, method, fixed, grid, x, op, y, steps, device, seed)
        best, psnr = max(scores, key=lambda s: s[1])
        edge = [k for k, v in best.items() if len(grid[k]) > 1 and v in (grid[k][0], grid[k][-1])]
        chosen[method] = {**fixed, **best}
        rows.append({"task": task, "steps": steps, "method": method,
                     "chosen": ", ".join(f"{k}={_fmt(v)}" for k, v in {**fixed, **best}.items()
                                         if k in grid or k == "interval"),
                     "train PSNR": psnr, "worst in grid": min(s for _, s in scores),
                     "grid": ", ".join(f"{k}: {len(v)}" for k, v in grid.items()),
                     "at grid edge": ", ".join(edge) or "-", "seconds": round(time.perf_counter() - t0, 1),
                     # every grid point's score, and the settings held fixed around the grid, for the
                     # JSON (the table shows the best and the worst)
                     "fixed": fixed, "scores": [{**p, "train PSNR": round(v, 3)} for p, v in scores]})
        log(f"sweep {task} {steps} {method}: {rows[-1]['chosen']} -> {psnr:.2f} dB")
        return best

    want = lambda m: methods == "all" or m in methods
    if want("dps"):
        pick("dps", {}, {"zeta": zetas})
    if want("freedom"):
        pick("freedom", {}, {"zeta": zetas})
    ugd_best = {"backward_lr": GENERIC["ugd"]["backward_lr"]}
    if want("ugd"):
        ugd_best = pick("ugd", {}, {"forward": FORWARDS, "backward_lr": BACKWARD_LRS})
    rates = grids.get("rate", RATES_1000 if steps >= 1000 else RATES)
    if want("dsg+dps"):
        best = None
        extra = {"final": grids["final"]} if "final" in grids else {}
        for k in grids.get("interval", INTERVALS_1000 if steps >= 1000 else [1]):
            b = pick("dsg+dps", {"interval": k}, {"rate": rates, **extra})
            score = rows[-1]["train PSNR"]
            if best is None or score > best[0]:
                best = (score, {"interval": k, **b})
        chosen["dsg+dps"] = best[1]
    if want("dsg+freedom"):
        pick("dsg+freedom", {"interval": 1}, {"rate": rates})
    if want("dsg+ugd"):
        pick("dsg+ugd", {"interval": 1, "backward_lr": ugd_best["backward_lr"]}, {"rate": rates})
    return chosen


def _result(profile: str) -> Path:
    return Path(__file__).resolve().parent / "results" / f"guidance-sweep-{profile}.json"


def _keep_other_tasks(profile: str, only: list[str], rows: list[dict], tuned: dict) -> None:
    """A ``SWEEP_TASKS`` run rewrites the profile's result JSON: carry over the rows and choices of the
    tasks it did not run, so runs of one profile in parallel (one task each) add up instead of
    overwriting each other. (Two runs finishing in the same second can still race.)"""
    path = _result(profile)
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    rows[:0] = [r for r in old.get("rows", []) if r["task"] not in only]
    for task, by_steps in old.get("tuned", {}).items():
        if task not in only:
            tuned[task] = {int(k): v for k, v in by_steps.items()}


def combine(names: list[str]) -> dict:
    """Per task, budget and method, the best grid point over the result JSONs of ``names``: sweeps
    on the same images and seeds (common random numbers), so a score from one run compares with a
    score from another. Refuses runs whose image count or models differ, and a point that two runs
    scored differently (more than 0.01 dB apart)."""
    keys = {(PROFILES[n]["k"], PROFILES[n].get("models")) for n in names}
    if len(keys) != 1:
        raise ValueError(f"sweeps {names} differ in images or models ({sorted(keys)}): not comparable")
    best: dict[tuple, tuple[float, dict, str]] = {}
    seen: dict[tuple, tuple[float, str]] = {}  # (task, steps, method, point) -> (score, profile)
    tried: Counter = Counter()  # (task, steps, method) -> distinct points
    for name in names:
        path = _result(name)
        if not path.is_file():
            raise ValueError(f"no result for sweep profile {name!r} ({path}); run it first")
        for row in json.loads(path.read_text())["rows"]:
            key = (row["task"], int(row["steps"]), row["method"])
            for score in row["scores"]:
                point = {**row["fixed"], **{k: v for k, v in score.items() if k != "train PSNR"}}
                ident = (*key, tuple(sorted(point.items())))
                if ident in seen and abs(seen[ident][0] - score["train PSNR"]) > 0.01:
                    raise ValueError(f"{key} {point}: {seen[ident][0]} dB in {seen[ident][1]} but "
                                     f"{score['train PSNR']} dB in {name}: the sweeps are not comparable")
                tried[key] += ident not in seen
                seen[ident] = (score["train PSNR"], name)
                if key not in best or score["train PSNR"] > best[key][0]:
                    best[key] = (score["train PSNR"], point, name)
    rows, tuned = [], {}
    for (task, steps, method), (psnr, point, name) in sorted(best.items()):
        rows.append({"task": task, "steps": steps, "method": method,
                     "chosen": ", ".join(f"{k}={_fmt(v)}" for k, v in point.items()),
                     "train PSNR": psnr, "points tried": tried[(task, steps, method)], "from": name})
        tuned.setdefault(task, {}).setdefault(steps, {})[method] = point
    return {"title": "Guidance hyperparameter sweep (train split): best of the CRN sweeps",
            "columns": ["task", "steps", "method", "chosen", "train PSNR", "points tried", "from"],
            "rows": rows, "tuned": tuned,
            "notes": [f"The best-scoring point of each task, budget and method over the sweeps {names} "
                      f"({PROFILES[names[0]]['k']} training images, common random numbers: the same "
                      "images, measurements and sampling noise in every run, so their scores compare "
                      "directly). No sampling is done here."]}


def run(profile: str = "quick", device: str = "cpu") -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    if device == "cpu":
        torch.set_num_threads(1)
    p = PROFILES[profile]
    if "combine" in p:
        return combine(p["combine"])
    rows: list[dict] = []
    tuned: dict[str, dict[int, dict]] = {}
    models: dict = {}
    only = [t.strip() for t in os.environ.get("SWEEP_TASKS", "").split(",") if t.strip()]
    if unknown := sorted(set(only) - set(TASKS)):  # a typo ran no task and recorded an empty sweep over the last
        raise ValueError(f"SWEEP_TASKS: unknown task(s) {unknown}; expected some of {list(TASKS)}")
    for task, spec in TASKS.items():
        if only and task not in only:
            continue
        ds = spec["data"]
        if ds not in models:
            models[ds] = ensure_model(ds, p.get("models", profile), device)
        den, cfg = models[ds]
        x = images(cfg["data"], "train", p["k"], task + "/sweep").to(device)
        op, y = problem(task, profile, x, device, seed_tag="sweep")
        for steps, methods in p["budgets"].items():
            chosen = sweep_budget(den, task, x, op, y, steps, methods, device, rows, p.get("grids"))
            tuned.setdefault(task, {})[steps] = chosen
    if only:
        _keep_other_tasks(profile, only, rows, tuned)
    return {"title": "Guidance hyperparameter sweep (train split)",
            "columns": ["task", "steps", "method", "chosen", "train PSNR", "worst in grid", "grid",
                        "at grid edge", "seconds"],
            "rows": rows, "tuned": tuned,
            "notes": [f"{p['k']} training images per task (seeded choice), sigma_y = 0.05, eta = {ETA}; "
                      + (f"grids of this profile: {p['grids']} (the others as in the quick profile)."
                         if "grids" in p else
                         f"grids: zeta {ZETAS}, UGD forward {FORWARDS} x backward_lr {BACKWARD_LRS}, DSG rate "
                         f"{RATES} (1000 steps: {RATES_1000} x interval {INTERVALS_1000})."),
                      "Chosen = highest mean train PSNR; 'at grid edge' flags a choice on the border of "
                      "its grid. Models as in the guidance benchmark: "
                      + "; ".join(f"{d}: {c['model']}" for d, c in MODELS[p.get("models", profile)].items())]}
