"""The tables of the sampler-overhead, core-quality, count-attack, dual and conditional benchmarks, from faked
measurements: each benchmark's expensive part (training, sampling, timing, attacking) is replaced by a small
deterministic stand-in, and its rows, ratios, medians, verdicts and column order are checked against values
worked out by hand from the stand-ins' numbers (the thresholds hit exactly, so a ``<=`` turned ``<`` shows)."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


def _rows_match(rows, expected):
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert got == pytest.approx(want), (got, want)


class _Clock:
    """A stand-in for the ``time`` module whose ``perf_counter`` moves only when told."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


# --- sampler_overhead -------------------------------------------------------------------------------------------

def test_alternate_interleaves_its_runs_after_a_warmup(bench_module, monkeypatch):
    timing = bench_module("_timing")
    calls, stamps = [], iter(range(100))
    monkeypatch.setattr(timing, "timed", lambda fn, device: (fn(), float(next(stamps)))[1])
    got = timing.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, "cpu", warmup=2)
    assert calls == ["a", "b"] * 5  # two warmup rounds, then three timed rounds, a and b taking turns
    assert got == {"a": [0.0, 2.0, 4.0], "b": [1.0, 3.0, 5.0]}


def test_sampler_overhead_ratio_is_the_median_of_sample_over_forward(bench_module, monkeypatch):
    bench = bench_module("sampler_overhead")
    # per eta: (forward times, sampling times) of five interleaved repeats
    times = [([1.0, 2.0, 4.0, 1.0, 1.0], [1.1, 2.4, 4.0, 1.2, 1.0]),   # ratios 1.1 1.2 1 1.2 1: median 1.1
             ([2.0, 2.0, 2.0, 2.0, 2.0], [2.1, 2.0, 2.2, 2.1, 2.4])]   # ratios 1.05 1 1.1 1.05 1.2: median 1.05
    etas, seen = [], []

    def alternate(fns, repeats, device, desc):
        seen.append((list(fns), repeats, device))
        fns["sample"]()  # the stand-in ddim below records the eta the timed sampling uses
        forward, sample = times[len(seen) - 1]
        return {"forward": forward, "sample": sample}

    monkeypatch.setattr(bench, "alternate", alternate)
    monkeypatch.setattr(bench, "ddim", lambda den, x, ts, eta, generator: etas.append(eta))
    res = bench.run("quick", "cpu")
    assert seen == [(["forward", "sample"], 5, "cpu")] * 2 and etas == [0.0, 1.0]
    assert res["columns"] == ["sampler", "batch", "steps", "steps x forward (s)", "sampling (s)", "ratio",
                              "target <= 1.05"]
    # ratio of medians would be 1.2 and 1.05, forward over sample 0.909 and 0.952; the means 1.8 and 1.94
    _rows_match(res["rows"], [
        {"sampler": "DDIM eta=0", "batch": 256, "steps": 100, "steps x forward (s)": 1.0, "sampling (s)": 1.2,
         "ratio": 1.1, "target <= 1.05": "MISSED"},
        {"sampler": "DDIM eta=1", "batch": 256, "steps": 100, "steps x forward (s)": 2.0, "sampling (s)": 2.1,
         "ratio": 1.05, "target <= 1.05": "met"}])


# --- core_quality -----------------------------------------------------------------------------------------------

def test_core_quality_rows_and_verdicts(bench_module, monkeypatch):
    bench = bench_module("core_quality")
    monkeypatch.setitem(bench.PROFILES, "quick", {"toy": ["moons", "rings"], "n": 6})
    clock = _Clock()
    monkeypatch.setattr(bench, "time", clock)
    trained = {"toy2d-moons": (12.345, False), "toy2d-rings": (0.0, True), "demo": (100.04, False)}
    sample_seconds = {"toy2d-moons": 3.14159, "toy2d-rings": 0.96, "demo": 42.26}
    scores = {  # what each model's samples score, and fresh draws of each data set
        "toy2d-moons": {"mmd_ratio": 2.0, "mmd_sample_sets": 5, "mmd_n": 2000},
        "toy2d-rings": {"mmd_ratio": 2.5, "mmd_sample_sets": 5, "mmd_n": 2000},
        ("fresh", "moons"): {"mmd_ratio": 0.9, "mmd_sample_sets": 5, "mmd_n": 2000},
        ("fresh", "rings"): {"mmd_ratio": 1.1, "mmd_sample_sets": 5, "mmd_n": 2000},
        "demo": {"n": 5000, "mean_top_prob": 0.9, "tv_to_uniform": 0.15, "frechet_ratio": 1.5,
                 "frechet_to_test": 4.5, "frechet_train_vs_test": 3.0, "class_hist": [0.1] * 10}}
    trained_kinds, floors = [], []

    def train_or_reuse(cfg, run_dir, **kw):
        trained_kinds.append((run_dir.name, cfg["data"].get("kind")))
        return trained[run_dir.name]

    def draw_samples(den, shape, scfg, device, n=None):
        clock.now += sample_seconds[den]
        return [den] * (n if n is not None else scfg["n"])

    def evaluate_samples(x, data_cfg):
        key = x[0]
        if isinstance(key, tuple):
            assert data_cfg["kind"] == key[1]
        elif key != "demo":
            assert key == f"toy2d-{data_cfg['kind']}"  # scored against its own data set
        return scores[key]

    monkeypatch.setattr(bench, "train_or_reuse", train_or_reuse)
    monkeypatch.setattr(bench, "load_denoiser", lambda run_dir, device: Path(run_dir).name)
    monkeypatch.setattr(bench, "draw_samples", draw_samples)
    monkeypatch.setattr(bench, "evaluate_samples", evaluate_samples)

    def load_dataset(name, split, kind, n):
        assert (name, split) == ("toy2d", "train")  # fresh draws independent of the held-out (test) ones
        return SimpleNamespace(x=[("fresh", kind)] * n)

    monkeypatch.setattr(bench, "load_dataset", load_dataset)
    monkeypatch.setattr(bench, "_digits_frechet_floor", lambda n: floors.append(n) or {
        "median": 1.234, "min": 1.1, "max": 1.5, "repeats": 9, "median_1000": 2.346})
    res = bench.run("quick", "cpu")

    assert trained_kinds == [("toy2d-moons", "moons"), ("toy2d-rings", "rings"), ("demo", None)]
    assert res["columns"] == ["data", "n", "train (s)", "sample (s)", "metric", "value", "target", "met"]
    mmd = "MMD^2 ratio to held-out (5 sets of 2000)"
    fresh = {"train (s)": "", "sample (s)": "", "metric": mmd, "target": "", "met": "", "n": 6}
    digits = {"data": "digits (demo)", "n": 5000, "train (s)": 100.0, "sample (s)": 42.3}
    _rows_match(res["rows"], [
        {"data": "toy2d moons", "n": 6, "train (s)": 12.3, "sample (s)": 3.1, "metric": mmd, "value": 2.0,
         "target": "<= 2", "met": "met"},
        {**fresh, "data": "toy2d moons: fresh data draws", "value": 0.9},
        {"data": "toy2d rings", "n": 6, "train (s)": "reused", "sample (s)": 1.0, "metric": mmd, "value": 2.5,
         "target": "<= 2", "met": "MISSED"},
        {**fresh, "data": "toy2d rings: fresh data draws", "value": 1.1},
        {**digits, "metric": "mean top-class prob", "value": 0.9, "target": ">= 0.9", "met": "met"},
        {**digits, "metric": "TV to uniform", "value": 0.15, "target": "<= 0.1", "met": "MISSED"},
        {**digits, "metric": "Fréchet ratio to train-vs-test", "value": 1.5, "target": "<= 2", "met": "met"}])
    assert floors == [5000]  # the floor at the digits sample count
    assert "Fréchet distance to test 4.5, train-vs-test reference 3;" in res["notes"][0]
    assert "score a Fréchet ratio of 1.23 (median of 9; range 1.10-1.50); at 1000 draws it is 2.35" in res["notes"][1]


def test_digits_frechet_floor_takes_the_median_over_the_train_vs_test_distance(bench_module, monkeypatch):
    import condiff.classifier
    import condiff.metrics

    bench = bench_module("core_quality")

    class Judge:
        test_stats = ("mu_test", "cov_test")
        frechet_train_vs_test = 2.0

        def features(self, x):
            return x

    distances = iter([6.0, 2.0, 20.0, 4.0, 8.0,     # n draws: ratios 3 1 10 2 4: median 3 (mean 4)
                      10.0, 2.0, 14.0, 6.0, 8.0])   # 1000 draws: ratios 5 1 7 3 4: median 4
    sizes, against = [], []
    monkeypatch.setattr(condiff.classifier, "DigitsJudge", Judge)
    monkeypatch.setattr(bench, "load_dataset", lambda name, split: SimpleNamespace(x=torch.zeros(50, 3)))
    monkeypatch.setattr(condiff.metrics, "mean_cov", lambda f: (sizes.append(len(f)), ("mu", "cov"))[1])
    monkeypatch.setattr(condiff.metrics, "gaussian_frechet",
                        lambda *a: (against.append(a), next(distances))[1])
    floor = bench._digits_frechet_floor(7, repeats=5)
    assert floor == {"median": 3.0, "min": 1.0, "max": 10.0, "repeats": 5, "median_1000": 4.0}
    assert sizes == [7] * 5 + [1000] * 5
    assert all(a == ("mu", "cov", "mu_test", "cov_test") for a in against)


# --- count_attack -----------------------------------------------------------------------------------------------

def test_count_attack_rows(bench_module, monkeypatch):
    bench = bench_module("count_attack")
    k, n = 3, 4
    monkeypatch.setitem(bench.PROFILES, "quick", {"size": 4, "k": k, "n": n, "steps": 7, "lr": 0.5})
    # the stand-ins: pixel (0, 0) of an image holds its "count"; l = |that - k|; the peak finder rounds it
    offsets = {3: [0.0, 0.2, -0.6, 0.4], 2: [0.0, 0.2, -0.6, 0.4], 4: [0.0, -0.2, 0.4, 0.2]}

    class Counter:
        def __init__(self, k, size, device):
            assert (k, size, device) == (3, 4, "cpu")  # the counter trains where the benchmark runs

        def to(self, device):
            return self

        def __call__(self, x):
            return (x[:, 0, 0, 0] - k).abs()

    def render_sources(counts, size, g):
        start = int(counts[0])
        assert counts.tolist() == [start] * n
        x = torch.zeros(n, 1, size, size, dtype=torch.float64)
        x[:, 0, 0, 0] = start + torch.tensor(offsets[start], dtype=torch.float64)
        return x, None

    attacks = []

    def attack(con, x, lam, steps, lr, bar=None):
        # lam 0 moves each count 90% of the way to k, lam 1 25%; both also move pixel (1, 1) by 0.3
        attacks.append((round(float(x[0, 0, 0, 0])), lam, steps, lr))
        z = x.clone()
        z[:, 0, 0, 0] += {0.0: 0.9, 1.0: 0.25}[lam] * (k - x[:, 0, 0, 0])
        z[:, 0, 1, 1] += 0.3
        return z

    monkeypatch.setattr(bench, "CountConstraint", Counter)
    monkeypatch.setattr(bench, "render_sources", render_sources)
    monkeypatch.setattr(bench, "count_sources", lambda x: x[:, 0, 0, 0].round().long())
    monkeypatch.setattr(bench, "_attack", attack)
    from condiff.sample import quiet_progress

    with quiet_progress():  # `condiff bench --quiet`: no bar to close (it failed on None)
        res = bench.run("quick", "cpu")

    assert attacks == [(2, 0.0, 7, 0.5), (2, 1.0, 7, 0.5), (4, 0.0, 7, 0.5), (4, 1.0, 7, 0.5)]
    assert res["columns"] == ["start", "lam", "l before", "l after", "exactly k (peak finder)",
                              "peaks after (min-max)", "max |change|"]
    # start 2: |x - k| = 1, .8, 1.6, .6 (mean 1); start 4: 1, .8, 1.4, 1.2 (mean 1.1). lam 0 leaves 10% of it
    # and changes a pixel by 90% of it; lam 1 leaves 75%, changes 25% (.25 .2 .4 .15 / .25 .2 .35 .3), and
    # the per-image largest change is then pixel (1, 1)'s 0.3 where that is more
    _rows_match(res["rows"], [
        {"start": "3 sources", "lam": "", "l before": 0.3, "l after": "", "exactly k (peak finder)": 0.75},
        {"start": "2 sources", "lam": 0.0, "l before": 1.0, "l after": 0.1, "exactly k (peak finder)": 1.0,
         "peaks after (min-max)": "3-3", "max |change|": 0.9},
        {"start": "2 sources", "lam": 1.0, "l before": 1.0, "l after": 0.75, "exactly k (peak finder)": 0.25,
         "peaks after (min-max)": "2-3", "max |change|": 0.325},
        {"start": "4 sources", "lam": 0.0, "l before": 1.1, "l after": 0.11, "exactly k (peak finder)": 1.0,
         "peaks after (min-max)": "3-3", "max |change|": 0.99},
        {"start": "4 sources", "lam": 1.0, "l before": 1.1, "l after": 0.825, "exactly k (peak finder)": 0.0,
         "peaks after (min-max)": "4-4", "max |change|": 0.3125}])
    assert "4 generated images per start, 4x4, k = 3; Adam (lr 0.5, 7 steps)" in res["notes"][0]


# --- dual -------------------------------------------------------------------------------------------------------

def _dual_metrics():
    toy = {"tolerance": 0.03, "slack_tolerance": 0.01, "data_weights": [0.05, 0.45, 0.5],
           "mixture_weights": [0.2, 0.35, 0.45], "max_abs_error": 0.03, "lambda_avg": [0.1234, 0.5],
           "final_slack": [-0.02, 0.011, 0.0]}
    hist = [0.1] * 10
    hist[4], hist[7] = 0.02, 0.03
    fair = {"baseline": {"minority_freq": {"4": 0.01, "7": 0.02}, "tv_to_uniform": 0.3, "frechet_to_test": 10.0,
                         "mean_top_prob": 0.97, "train_seconds": 11.0},
            "constrained": {"minority_freq": {"4": 0.08, "7": 0.05}, "tv_to_uniform": 0.05,
                            "frechet_to_test": 12.5, "mean_top_prob": 0.95, "train_seconds": 12.0,
                            "lambda": {"class4": 0.3, "class7": 0.2}, "bounds": [0.01, 0.02],
                            "baseline_losses": [0.015, 0.025]},
            "frechet_ratio": 1.25, "data_class_hist": hist, "n_train": 321, "frechet_train_vs_test": 3.0,
            "config": {"dual": {"t_range": [0.3, 1.0]}, "n_samples": 200, "sample_steps": 20}}

    def ft(plain, con, reduction, fd_ratio, config):
        pre = {"memorisation": 0.01, "diversity": 0.9, "train_seconds": 5.0, "frechet_to_target": 7.0}
        return {"plain": {"train_seconds": 1.0, **plain}, "constrained": {"train_seconds": 2.0, **con},
                "pretrained": pre, "memorisation_reduction": reduction, "frechet_ratio_constrained_vs_plain": fd_ratio,
                "threshold": 2.5, "config": {"quantile": 0.05, "relative": 1.05, "n_constraint": 100,
                                             "target_classes": None, "constraint_classes": None, **config}}

    tune = ft({"memorisation": 0.8, "frechet_to_target": 20.0, "diversity": 0.3},
              {"memorisation": 0.4, "frechet_to_target": 25.0, "diversity": 0.7, "lambda": {"pretrained": 1.0},
               "final_slack": 0.002}, 0.5, 1.25, {})
    new = ft({"memorisation": 0.0, "frechet_to_target": 30.0, "diversity": 0.2, "target_class_rate": 1.0},
             {"memorisation": 0.0, "frechet_to_target": 36.0, "diversity": 0.6, "target_class_rate": 0.9,
              "lambda": {"pretrained": 0.5}, "final_slack": -0.01}, None, 1.2,
             {"target_classes": [3], "constraint_classes": [3], "relative": 0.75})
    return toy, fair, tune, new


def test_dual_table_rows_and_verdicts(bench_module, monkeypatch):
    bench = bench_module("dual")
    toy, fair, tune, new = _dual_metrics()
    res = bench.table(toy, fair, tune, {"toy": 7.4, "fair": 56.2}, new)
    assert res["columns"] == ["experiment", "metric", "reference", "constrained", "target", "status"]
    theory, fd, ft, ftn = "theory (toy2d GMM)", "fair digits", "fine-tuning (30 images)", \
        "fine-tuning, new class (digit 3)"
    _rows_match(res["rows"], [
        {"experiment": theory, "metric": "max abs(model - mixture(lambda)) mode weight",
         "reference": "data q_0 vs mixture: 0.150", "constrained": 0.03, "target": "<= 0.03", "status": "met"},
        {"experiment": theory, "metric": "max slack L_i - b_i at the end", "reference": "lambda = 0.123, 0.500",
         "constrained": 0.011, "target": "<= 0.01", "status": "MISSED"},
        {"experiment": fd, "metric": "frequency of class 4", "reference": 0.01, "constrained": 0.08,
         "target": ">= 0.08", "status": "met"},
        {"experiment": fd, "metric": "frequency of class 7", "reference": 0.02, "constrained": 0.05,
         "target": ">= 0.08", "status": "MISSED"},
        {"experiment": fd, "metric": "TV to uniform", "reference": 0.3, "constrained": 0.05, "target": "<= 0.05",
         "status": "met"},
        {"experiment": fd, "metric": "Fréchet distance to test", "reference": 10.0, "constrained": 12.5,
         "target": "<= 1.2x (12)", "status": "MISSED"},
        {"experiment": fd, "metric": "mean top-class probability", "reference": 0.97, "constrained": 0.95,
         "target": "", "status": ""},
        {"experiment": ft, "metric": "memorisation rate", "reference": 0.8, "constrained": 0.4,
         "target": "<= 0.5x (0.4)", "status": "met"},
        {"experiment": ft, "metric": "Fréchet distance to held-out target", "reference": 20.0, "constrained": 25.0,
         "target": "<= 1.2x (24)", "status": "MISSED"},
        {"experiment": ft, "metric": "intra-cluster diversity (/ held-out's)", "reference": 0.3,
         "constrained": 0.7, "target": "", "status": ""},
        {"experiment": ftn, "metric": "memorisation rate", "reference": 0.0, "constrained": 0.0,
         "target": "<= 0.5x (0)", "status": "MISSED"},  # no memorisation to reduce: not judged met
        {"experiment": ftn, "metric": "Fréchet distance to held-out target", "reference": 30.0, "constrained": 36.0,
         "target": "<= 1.2x (36)", "status": "met"},
        {"experiment": ftn, "metric": "intra-cluster diversity (/ held-out's)", "reference": 0.2,
         "constrained": 0.6, "target": "", "status": ""},
        {"experiment": ftn, "metric": "samples classified as the target class", "reference": 1.0,
         "constrained": 0.9, "target": "", "status": ""}])


def test_dual_notes_read_lambda_through_the_mixture(bench_module, monkeypatch):
    bench = bench_module("dual")
    toy, fair, tune, new = _dual_metrics()
    notes = bench.table(toy, fair, tune, {"toy": 7.4, "fair": 56.2}, new)["notes"]
    # (w_k + lambda_k) / (1 + sum lambda): (0.02 + 0.3) / 1.5 and (0.03 + 0.2) / 1.5
    assert "predicts minority weights 0.213, 0.153 (the classifier found 0.080, 0.050)" in notes[1]
    assert "learned lambda {'class4': 0.3, 'class7': 0.2}" in notes[1] and "at t >= 0.3 T" in notes[1]
    # plain's memorisation / (1 + lambda): 0.8 / 2
    assert notes[2].startswith("Fine-tuning: memorisation threshold 2.5 (the 0.05 quantile")
    assert "final slack +0.002); lambda 1.0;" in notes[2] and "about plain's / (1 + lambda) = 0.400." in notes[2]
    assert "from the pretraining distribution" in notes[2]
    assert notes[3].startswith("Fine-tuning, new class:") and "The target is digit 3 only" in notes[3]
    assert "labels 3; the pretrained model itself scores Fréchet 7 against" in notes[3]
    assert notes[4].startswith("Wall time per experiment (s): toy 7, fair 56 (")


def test_dual_run_tabulates_the_new_class_experiment_second(bench_module, monkeypatch, tmp_path):
    bench = bench_module("dual")
    toy, fair, tune, new = _dual_metrics()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.torch, "set_num_threads", lambda n: None)
    clock = _Clock()
    monkeypatch.setattr(bench, "time", clock)
    calls = []

    def runner(name, result, seconds):
        def run(cfg, out, device, fresh):
            calls.append((name, Path(out), cfg, fresh))
            clock.now += seconds
            return result
        return run

    finetunes = iter([tune, new])
    monkeypatch.setattr(bench, "run_toy", runner("toy", toy, 3.0))
    monkeypatch.setattr(bench, "run_fair", runner("fair", fair, 40.0))
    monkeypatch.setattr(bench, "run_finetune", lambda cfg, out, device, fresh: runner(
        "finetune", next(finetunes), 20.0 + len(calls))(cfg, out, device, fresh))
    res = bench.run("quick", "cpu")
    root = Path("runs") / "bench-dual" / "quick"
    assert [(c[0], c[1]) for c in calls] == [("toy", root / "toy"), ("fair", root / "fair"),
                                             ("finetune", root / "finetune"),
                                             ("finetune", root / "finetune-class3")]
    assert all(c[3] for c in calls)
    plain_cfg, new_cfg = calls[2][2], calls[3][2]
    assert plain_cfg.target_classes is None and tuple(new_cfg.target_classes) == (3,)
    assert tuple(new_cfg.constraint_classes) == (3,) and new_cfg.relative == 0.75
    assert res["seconds_per_experiment"] == {"toy": 3.0, "fair": 40.0, "finetune": 22.0,
                                             "finetune (new class)": 23.0}
    assert [r["experiment"] for r in res["rows"]][-4:] == ["fine-tuning, new class (digit 3)"] * 4
    assert res["metrics"]["finetune"] is tune


# --- conditional ------------------------------------------------------------------------------------------------

def test_conditional_rows(bench_module, monkeypatch):
    bench = bench_module("conditional")
    per = 2
    monkeypatch.setitem(bench.PROFILES, "quick", {"per_class": per, "scales": [0.0, 2.0], "dps_zeta": [0.5]})
    n = 10 * per
    labels = torch.arange(10).repeat_interleave(per)
    clock = _Clock()
    monkeypatch.setattr(bench, "time", clock)

    def samples(right, fd, diversity):
        """Samples whose first ``right`` the judge names correctly (the others one class off); pixel (0, 1)
        carries the Fréchet distance, (0, 2) the diversity that the stand-ins below read off."""
        x = torch.zeros(n, 1, 8, 8)
        x[:, 0, 0, 0] = torch.where(torch.arange(n) < right, labels, (labels + 1) % 10).float()
        x[:, 0, 0, 1], x[:, 0, 0, 2] = fd, diversity
        return x

    class Den:
        def __init__(self, x, seconds, conditioned=None):
            self.x, self.seconds, self.conditioned_on = x, seconds, conditioned

        def eval(self):
            return self

        def requires_grad_(self, flag):
            return self

        def conditioned(self, y, guidance_scale=None):
            key = "null" if y is None else guidance_scale
            assert y is None or torch.equal(y, labels)
            return self.conditioned_on[key]

    cond = Den(None, 0.0, {"null": Den(samples(0, 3.0, 0.0), 8.0), 0.0: Den(samples(2, 2.5, 5.0), 10.0),
                           2.0: Den(samples(18, 4.0, 4.0), 20.0)})
    prior = Den(samples(0, 2.0, 0.0), 4.0)

    class Judge:
        def __init__(self, device):
            pass

        def probs(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()

        def evaluate(self, x):
            return {"frechet_to_test": float(x[0, 0, 0, 1])}

    def generate(den, n_, shape, **kw):
        assert n_ == n and shape == (1, 8, 8)
        clock.now += den.seconds
        return den.x

    def guided_sample(den, method, shape, steps, **kw):
        assert den is prior and method == ("dps", "constraint", 0.5) and shape == (n, 1, 8, 8)
        return SimpleNamespace(x=samples(10, 5.0, 6.0), seconds=30.0)

    test_x, test_y = torch.zeros(7, 1, 8, 8), torch.arange(7)
    test_x[:, 0, 0, 2] = 3.5
    monkeypatch.setattr(bench, "ensure_prior", lambda *a: Path("prior"))
    monkeypatch.setattr(bench, "load_denoiser", lambda path, device: prior)
    monkeypatch.setattr(bench, "conditional_model", lambda profile, device: (cond, Path("cond")))
    monkeypatch.setattr(bench, "DigitsJudge", Judge)
    monkeypatch.setattr(bench, "_digits", lambda split: (test_x, test_y))
    monkeypatch.setattr(bench, "generate", generate)
    monkeypatch.setattr(bench, "guided_sample", guided_sample)
    monkeypatch.setattr(bench, "independent_digits_classifier", lambda seed, device: SimpleNamespace(log_prob=seed))
    monkeypatch.setattr(bench, "ClassConstraint", lambda log_prob, y: "constraint" if log_prob == 1 else None)
    monkeypatch.setattr(bench, "DPS", lambda con, zeta: ("dps", con, zeta))
    monkeypatch.setattr(bench, "within_class_diversity", lambda x, y: (
        float(x[0, 0, 0, 2]) if torch.equal(y, labels) or y is test_y else None))
    monkeypatch.setattr(bench, "prior_config", lambda name, profile: {"train": {"steps": 1500}})
    res = bench.run("quick", "cpu")

    assert res["columns"] == ["method", "n", "success (judge)", "Fréchet ratio to unconditional",
                              "within-class diversity", "s / sample"]
    _rows_match(res["rows"], [  # Fréchet ratio: over the prior's 2.0; seconds per sample: over 20
        {"method": "unconditional prior (DDIM)", "n": n, "success (judge)": "", "Fréchet ratio to unconditional": 1.0,
         "within-class diversity": "", "s / sample": 0.2},
        {"method": "conditional model, null label", "n": n, "success (judge)": "",
         "Fréchet ratio to unconditional": 1.5, "within-class diversity": "", "s / sample": 0.4},
        {"method": "conditional model, w = 0 (no guidance)", "n": n, "success (judge)": 0.1,
         "Fréchet ratio to unconditional": 1.25, "within-class diversity": 5.0, "s / sample": 0.5},
        {"method": "conditional model, CFG w = 2", "n": n, "success (judge)": 0.9,
         "Fréchet ratio to unconditional": 2.0, "within-class diversity": 4.0, "s / sample": 1.0},
        {"method": "unconditional prior + DPS (classifier, zeta 0.5)", "n": n, "success (judge)": 0.5,
         "Fréchet ratio to unconditional": 2.5, "within-class diversity": 6.0, "s / sample": 1.5},
        {"method": "test split", "n": 7, "success (judge)": "", "Fréchet ratio to unconditional": "",
         "s / sample": "", "within-class diversity": 3.5}])
    assert "samples to the test split: 2 (n = 20)" in res["notes"][0] and "1500 steps" in res["notes"][0]


def test_train_speed_runs_both_precisions_for_real(bench_module, monkeypatch):
    """bench train-speed died on its bf16 rows (a bf16 prediction under autocast was refused as a wrong
    out_channels) and no test ran it: one real step of each precision on a small UNet."""
    bench = bench_module("train_speed")
    tiny = ("tiny UNet", {"name": "unet", "in_channels": 1, "base": 8, "mults": [1], "num_res": 1}, 8, 4)
    monkeypatch.setitem(bench.PROFILES, "quick", {"models": [tiny], "steps": 1, "repeats": 1})
    res = bench.run("quick", "cpu")
    (row,) = res["rows"]
    assert row["model"] == "tiny UNet" and row["steps per run"] == 1
    assert row["fp32 (ms/step)"] > 0 and row["bf16 (ms/step)"] > 0 and row["bf16 / fp32"] > 0


def test_interleaved_timing_runs_under_quiet(bench_module):
    """`condiff bench --quiet` failed at once: the timing loop's bar is None there."""
    from condiff.sample import quiet_progress

    timing, calls = bench_module("_timing"), []
    with quiet_progress():
        out = timing.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, "cpu")
    assert calls == ["a", "b"] * 3 and [len(v) for v in out.values()] == [2, 2]  # one warm-up round, two timed


def test_a_noisy_timing_is_said_in_the_table(bench_module):
    """Under load sampler-overhead printed 12.6 s of forwards against 17.1 s of sampling beside a ratio of 0.94:
    the time columns and the ratio disagreed with nothing to say why."""
    timing = bench_module("_timing")
    assert timing.noise_note([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "x") == []  # every pair 1: quiet
    assert timing.noise_note([1.04, 2.0, 3.1], [1.0, 2.0, 3.0], "x") == []  # within 10% of the median 1.033
    (wide,) = timing.noise_note([1.0, 2.0, 4.0], [1.0, 1.0, 1.0], "a / b")  # ratios 1, 2, 4
    assert wide.startswith("a / b: the pairwise ratios ranged 1 to 4 around their median 2 (the medians' own "
                           "ratio: 2)") and "rerun it on a quiet one" in wide
    # ratios 0.95, 1.025, 0.967 (median below 1) while the medians' own ratio, 2.05 / 2, is above 1: said,
    # though they lie within 10% of each other
    (flip,) = timing.noise_note([0.95, 2.05, 2.9], [1.0, 2.0, 3.0], "a / b")
    assert "ranged 0.95 to 1.02 around their median 0.967 (the medians' own ratio: 1.02)" in flip


def test_a_benchmark_names_the_gpu_it_ran_on_and_not_one_it_left_alone(monkeypatch):
    """machine() named GPU 0 whatever the device: a --device cpu run on a GPU machine read as a GPU figure."""
    from condiff.cli.bench import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"GPU{getattr(d, 'index', d) or 0}")
    assert "GPU not used (GPU0 present)" in machine("cpu")
    assert ", GPU1, " in machine("cuda:1") and ", GPU0, " in machine("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ", no GPU, " in machine("cpu")
