"""NAMM: constraint distance and fidelity of vanilla DM vs mirror DM (NAMM-MDM) vs fine-tuned NAMM-MDM
for five constraints, and data assimilation with mirror DPS vs DPS vs constraint-guided DPS.

Each data set runs the `condiff namm` pipeline (condiff.cli.namm.NAMMRun) in
``runs/bench-namm/<profile>/<data set>``: mirror map, mirror DM and vanilla DM (same UNet, same
budget), fine-tuning of ``f`` on MDM samples, then the same number of samples from each model.
Finished stages with identical settings are reused, so an interrupted benchmark continues where it
stopped; the notes list every stage's training time, wherever it was spent.

Targets: NAMM-MDM with fine-tuning cuts the mean constraint distance >= 5x vs the vanilla
DM with MMD <= 1.5x the vanilla DM's; mirror DPS cuts l(x) >= 5x vs DPS at a comparable measurement
residual (here: within 1.5x of DPS's, or below 1.5 noise units).

A comparison row outside the paper: the vanilla DM sampled with the constraint distance as a
training-free guidance loss (DPS + DSG, section ``guide`` of the settings), the simplest way to use a
distance without training anything.

For the count data a learned counter is the judge, and an optimised map can fool it; the
``exactly k sources (peak finder)`` column counts sources with a peak finder that does not use the
counting CNN (condiff.data.sources.count_sources), to show whether a lower distance is real.

``NAMM_BENCH_DATA=burgers,count`` restricts a run to some data sets (for running it in pieces); such a
run is not recorded, and a run of all five (reusing the finished stages) records the table.

The quick profile (condiff.cli.namm.PROFILES["quick"]) is cut to fit a CPU core: 16x16 data
instead of 32x32, tiny nets (ICNN 16 filters; inverse ResNet 16 filters, 2 blocks, no downsampling;
UNet 16 base channels), 1200 mirror-map steps, 1500 DM steps, 256 samples with a 50-step sampler,
fine-tuning 500 steps on 256 MDM samples, assimilation of 16 truths with 100 DPS steps. Per-family
quick overrides (condiff.cli.namm.PROFILE_FAMILIES, reasons in docs/namm.md): Burgers l_con = 10,
sigma_max = 0.03, an inverse net of 32 filters and 4 blocks, 4000 mirror steps with a cosine decay,
fine-tuning 12000 steps on 2048 samples (periodic: 3000);
brightness 3000 mirror steps with a cosine decay; count
l_con = 1 with a zero-padded inverse net of 32 filters, 4 blocks and one downsampling, then an informed
inverse map fine-tuned 8000 steps (batch 32, lr 2e-4, l_con = 30, realism term l_adv = 3) on 12,800
samples (the paper's pool), 1024 samples per set (its misses are rare whole sources: the reduction's
90% interval on 256 was 3.0x to 5.3x), constraint weight 20 (not 200) for constraint-guided DPS.
The "90% interval" column is a bootstrap interval of the reduction over the samples
(condiff.metrics.ratio_interval). A data set takes 4-20 minutes of a core when run alone (the 2026-12-03 evening
rebuild; up to 40 on slower runs), up to an hour on a loaded one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from condiff import io
from condiff.cli.namm import NAMMRun, interval_text, public, reduction_interval, resolve, run_assimilation

DATASETS = ("brightness", "burgers", "kolmogorov", "periodic", "count")
ASSIMILATION = ("burgers", "kolmogorov")
PROFILES = {"quick": "quick", "full": "full"}
LABELS = {
    "vanilla": "vanilla DM",
    "mdm": "NAMM-MDM",
    "mdm_ft": "NAMM-MDM + fine-tune",
    "guided": "vanilla DM + constraint guidance",
}
COLUMNS = [
    "task",
    "method",
    "n",
    "mean l(x)",
    "median l(x)",
    "reduction vs baseline",
    "90% interval",
    "MMD^2",
    "MMD^2 / vanilla",
    "exactly k sources (peak finder)",
    "mean l(x) on those",
    "stray brightness > 10%",
    "residual / sigma_y",
    "target",
]


def _root(profile: str) -> Path:
    return Path(os.environ.get("NAMM_BENCH_ROOT", "runs/bench-namm")) / profile


def add_interval(row: dict, baseline, values) -> None:
    """The reduction's bootstrap 90% interval (condiff.cli.namm.reduction_interval), where there is one."""
    if (iv := reduction_interval(baseline, values)) is not None:
        row["90% interval"] = interval_text(iv)


def generation_rows(run: NAMMRun, name: str) -> tuple[list[dict], dict]:
    res = run.evaluate(["vanilla", "mdm", "mdm_ft", "guided"])
    van = res["vanilla"]
    rows, summary = [], {}
    for key, rec in res.items():
        row = {
            "task": name,
            "method": LABELS.get(key, key),
            "n": rec["n"],
            "mean l(x)": rec["l_mean"],
            "median l(x)": rec["l_median"],
        }
        if "exact_k" in rec:
            row["exactly k sources (peak finder)"] = rec["exact_k"]
            if rec["l_exact_k"] is not None:
                row["mean l(x) on those"] = rec["l_exact_k"]
            row["stray brightness > 10%"] = rec["stray"]
        if key != "data (held-out)":
            row["reduction vs baseline"] = van["l_mean"] / max(rec["l_mean"], 1e-30)
            if key != "vanilla":
                add_interval(row, van["_l"], rec["_l"])
            row["MMD^2"] = rec["mmd"]
            row["MMD^2 / vanilla"] = rec["mmd"] / max(van["mmd"], 1e-30)
        if key == "mdm_ft":
            ok = row["reduction vs baseline"] >= 5 and row["MMD^2 / vanilla"] <= 1.5
            row["target"] = "met" if ok else "MISSED"
            summary = {
                "reduction": row["reduction vs baseline"],
                "mmd_vs_vanilla": row["MMD^2 / vanilla"],
                "met": ok,
            }
        rows.append(row)
    return rows, summary


def assimilation_rows(run: NAMMRun, name: str) -> tuple[list[dict], dict]:
    res = run_assimilation(run)
    dps = res["methods"]["DPS"]
    task = f"{name} assimilation ({res['operator']['mask']}, sigma_y={res['sigma_y']:.2g})"
    rows = [
        {
            "task": task,
            "method": "truth",
            "n": res["n"],
            "mean l(x)": res["truth"]["l_mean"],
            "residual / sigma_y": res["truth"]["residual_mean"],
        }
    ]
    summary = {}
    for key, rec in res["methods"].items():
        row = {
            "task": task,
            "method": key,
            "n": res["n"],
            "mean l(x)": rec["l_mean"],
            "median l(x)": rec["l_median"],
            "residual / sigma_y": rec["residual_mean"],
            "reduction vs baseline": dps["l_mean"] / max(rec["l_mean"], 1e-30),
        }
        if key != "DPS":
            add_interval(row, dps["_l"], rec["_l"])
        if key == "mirror DPS":
            comparable = rec["residual_mean"] <= max(1.5 * dps["residual_mean"], 1.5)
            ok = row["reduction vs baseline"] >= 5 and comparable
            row["target"] = "met" if ok else "MISSED"
            summary = {
                "reduction": row["reduction vs baseline"],
                "residual": rec["residual_mean"],
                "dps_residual": dps["residual_mean"],
                "met": ok,
            }
        rows.append(row)
    return rows, summary


def stage_seconds(root: Path) -> dict[str, float]:
    out = {}
    for f in sorted(root.rglob("stage.json")):
        rec = json.loads(f.read_text())
        if rec.get("done"):
            out[str(f.parent.relative_to(root))] = rec.get("seconds", 0.0)
    return out


def run(profile: str = "quick", device: str = "cpu") -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {list(PROFILES)}")
    if device == "cpu":
        torch.set_num_threads(1)  # shared 2-core machines: one thread per job
    raw = os.environ.get("NAMM_BENCH_DATA", "")
    only = [s.strip() for s in raw.split(",") if s.strip()]
    if raw.strip() and not only:  # e.g. "," : a restriction meant, none given; never run (and record) all
        raise ValueError(f"NAMM_BENCH_DATA={raw!r} names no data set; known: {list(DATASETS)}")
    if bad := [s for s in only if s not in DATASETS]:
        raise ValueError(f"NAMM_BENCH_DATA names unknown data sets {bad}; known: {list(DATASETS)}")
    names = only or list(DATASETS)
    root = _root(profile)
    rows, summary, notes = [], {}, []
    for name in names:
        cfg = resolve(name, PROFILES[profile])
        (root / name).mkdir(parents=True, exist_ok=True)
        io.write_json_atomic(root / name / "config.json", cfg)  # `condiff namm sample --run` can reopen it
        r = NAMMRun(root / name, cfg, device, fresh=True, progress=False)
        gen_rows, summary[name] = generation_rows(r, name)
        rows += gen_rows
        if name in ASSIMILATION:
            a_rows, summary[f"{name} assimilation"] = assimilation_rows(r, name)
            rows += a_rows
        secs = stage_seconds(root / name)
        notes.append(
            f"{name}: data {cfg['data']}, loss {cfg['loss']}, ICNN {cfg['mirror']['psi']}, inverse "
            f"{cfg['mirror']['inverse']}, {cfg['mirror_train']['steps']} mirror steps, fine-tuning "
            f"{cfg['finetune']['steps']} steps on {cfg['finetune']['n']} MDM samples"
            + (f" with loss {cfg['finetune']['loss']}" if cfg["finetune"].get("loss") else "")
            + (", informed inverse (finetune.informed)" if cfg["finetune"].get("informed") else "")
            + "; stage seconds "
            + ", ".join(f"{k} {v:.0f}" for k, v in secs.items())
            + f" (total {sum(secs.values()) / 60:.1f} min)"
        )
    met = sum(bool(s.get("met")) for s in summary.values())
    c = resolve(names[0], PROFILES[profile])
    notes = [
        f"Profile {profile}: {c['data']['size']}x{c['data']['size']} data; mirror nets and steps per data "
        f"set (below); UNet {c['model']}, "
        f"{c['train']['steps']} DM steps (vanilla and MDM alike); {c['sample']['steps']}-step DDIM "
        f"(eta {c['sample']['eta']}) sampling; DPS {c['assimilate']['steps']} steps, "
        f"zeta {c['assimilate']['zeta']} on the sigma_y-normalised residual norm, constraint weight "
        f"{c['assimilate']['constraint_weight']} for constraint-guided DPS.",
        "l(x): the constraint distance of each data set (see condiff/constraints). Reduction = mean l of "
        "the baseline (vanilla DM; DPS for assimilation) / mean l of the row; '90% interval': its bootstrap "
        "interval over the samples (condiff.metrics.ratio_interval). MMD^2: biased RBF MMD^2 to "
        "held-out data (bandwidths from the held-out set; on the first samples, as many as it holds); "
        "'data (held-out)' shows l of real data. "
        "Residual: RMS of A(x) - y in units of sigma_y (about 1 for the truth).",
        f"'vanilla DM + constraint guidance': the vanilla DM sampled with l(x0_hat) as the guidance loss "
        f"({c['guide']}, x0_hat clipped to 1.5 max |x| of the data); a comparison outside the paper, "
        "not a target. For count, 'exactly k sources' is judged by a peak finder, not the counting CNN, "
        "and 'mean l(x) on those' is the CNN's distance over those samples alone (its fractional "
        "reading of right counts; the other samples miss or add whole sources). 'stray brightness > 10%': the "
        "share of samples with over 10% of their brightness farther than 2 px from every peak "
        "(condiff.data.sources.stray_brightness; streaks, bridges, glows), which no held-out sample has.",
        f"Targets met: {met} of {len(summary)}.",
        *notes,
    ]
    return {
        "title": f"NAMM: constraint satisfaction and fidelity ({profile})",
        "columns": COLUMNS,
        "rows": rows,
        "notes": notes,
        "summary": public(summary),
        # a part of the table is never recorded over the whole one (condiff.cli.bench)
        **({"partial": f"NAMM_BENCH_DATA={','.join(names)}"} if set(names) != set(DATASETS) else {}),
    }
