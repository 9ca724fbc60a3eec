"""Sample quality of the core engine on its bundled data sets, trained with the default presets.

toy2d (moons, rings, checkerboard, gmm): biased MMD^2 of samples vs held-out data, against the same
MMD^2 between two held-out sets of the same size (target ratio <= 2), at set size 2000: the samples
are cut into sets of 2000 (5 in the quick profile); over 20 held-out pairs (A_i, B_i), sample set i mod 5
and B_i are both scored against A_i, and the ratio is of the two means (condiff.evaluate.toy2d_eval).
digits: the demo model (runs/demo, trained by `condiff demo` if absent): classifier confidence, class balance, Fréchet
distance against the train-vs-test reference.
"""

from __future__ import annotations

import time
from pathlib import Path

from condiff.cli.common import draw_samples, train_or_reuse
from condiff.cli.config import resolve
from condiff.data import load_dataset
from condiff.evaluate import evaluate_samples
from condiff.models import load_denoiser

PROFILES = {"quick": {"toy": ["moons", "rings", "checkerboard", "gmm"], "n": 10000},
            "full": {"toy": ["moons", "rings", "checkerboard", "gmm"], "n": 40000}}


def run(profile: str = "quick", device: str = "cpu") -> dict:
    p = PROFILES[profile]
    rows = []
    for kind in p["toy"]:
        cfg = resolve("toy2d", None, [f"data.kind={kind}", "train.progress=false"])
        cfg["_device"] = device
        run_dir = Path("runs") / "bench-core" / f"toy2d-{kind}"
        secs, reused = train_or_reuse(cfg, run_dir, own=True)
        den = load_denoiser(run_dir, device=device)
        t0 = time.perf_counter()
        x = draw_samples(den, (2,), cfg["sample"], device, n=p["n"])
        ts = time.perf_counter() - t0
        m = evaluate_samples(x, cfg["data"])
        metric = f"MMD^2 ratio to held-out ({m['mmd_sample_sets']} sets of {m['mmd_n']})"
        rows.append({"data": f"toy2d {kind}", "n": p["n"], "train (s)": "reused" if reused else round(secs, 1),
                     "sample (s)": round(ts, 1), "metric": metric,
                     "value": m["mmd_ratio"], "target": "<= 2", "met": "met" if m["mmd_ratio"] <= 2 else "MISSED"})
        # what a perfect model scores: fresh draws of the data (train split, independent of the held-out draws)
        fresh = evaluate_samples(load_dataset("toy2d", "train", kind=kind, n=p["n"]).x, cfg["data"])
        rows.append({"data": f"toy2d {kind}: fresh data draws", "n": p["n"], "train (s)": "", "sample (s)": "",
                     "metric": metric, "value": fresh["mmd_ratio"], "target": "", "met": ""})
    cfg = resolve("digits", None, ["train.progress=false"])
    cfg["_device"] = device
    run_dir = Path("runs") / "demo"  # the demo's model: the user's, never discarded here
    secs, reused = train_or_reuse(cfg, run_dir, remedy="retrain it with `condiff demo --retrain`, or move it away")
    den = load_denoiser(run_dir, device=device)
    t0 = time.perf_counter()
    x = draw_samples(den, (1, 8, 8), cfg["sample"], device)
    ts = time.perf_counter() - t0
    m = evaluate_samples(x, cfg["data"])
    train_s = "reused" if reused else round(secs, 1)
    for metric, value, target, ok in (
            ("mean top-class prob", m["mean_top_prob"], ">= 0.9", m["mean_top_prob"] >= 0.9),
            ("TV to uniform", m["tv_to_uniform"], "<= 0.1", m["tv_to_uniform"] <= 0.1),
            ("Fréchet ratio to train-vs-test", m["frechet_ratio"], "<= 2", m["frechet_ratio"] <= 2)):
        rows.append({"data": "digits (demo)", "n": m["n"], "train (s)": train_s, "sample (s)": round(ts, 1),
                     "metric": metric, "value": value, "target": target, "met": "met" if ok else "MISSED"})
    floor = _digits_frechet_floor(len(x))
    return {"title": "Core engine sample quality (default presets)",
            "columns": ["data", "n", "train (s)", "sample (s)", "metric", "value", "target", "met"],
            "rows": rows,
            "notes": [f"digits Fréchet distance to test {m['frechet_to_test']:.3g}, train-vs-test reference "
                      f"{m['frechet_train_vs_test']:.3g}; class histogram "
                      f"{[round(v, 3) for v in m['class_hist']]}.",
                      f"Sampling-noise floor: {len(x)} draws with replacement from the digits TRAIN split score a "
                      f"Fréchet ratio of {floor['median']:.2f} (median of {floor['repeats']}; range "
                      f"{floor['min']:.2f}-{floor['max']:.2f}); at 1000 draws it is {floor['median_1000']:.2f}, which "
                      "is why the digits preset evaluates 5000 samples.",
                      "Models are re-used from runs/ when their settings match; 'train (s)' is then 'reused'."]}


def _digits_frechet_floor(n: int, repeats: int = 9) -> dict:
    """Fréchet ratio of bootstrap resamples of the digits training data: what a model that
    reproduced the training distribution exactly would score with ``n`` samples."""
    import torch

    from condiff.classifier import DigitsJudge
    from condiff.metrics import gaussian_frechet, mean_cov

    judge = DigitsJudge()
    with torch.no_grad():
        feats = judge.features(load_dataset("digits", "train").x)
    g = torch.Generator().manual_seed(0)

    def ratios(m: int) -> list[float]:
        return sorted(gaussian_frechet(*mean_cov(feats[torch.randint(len(feats), (m,), generator=g)]),
                                       *judge.test_stats) / judge.frechet_train_vs_test for _ in range(repeats))
    r, r1000 = ratios(n), ratios(1000)
    return {"median": r[repeats // 2], "min": r[0], "max": r[-1], "repeats": repeats,
            "median_1000": r1000[repeats // 2]}
