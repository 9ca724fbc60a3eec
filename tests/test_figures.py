"""What commands and benchmarks record agrees with the arrays they write beside it, and the defaults and
conversions their figures rest on. Each test here was written for a realistic bug that no other test caught
(mutation testing, 2026-12-06): a wrong default, an argument swapped, an axis, a ratio inverted."""
import json

import numpy as np
import pytest
import torch

from condiff.cli.main import main


def _solve(ckpt, out, *extra):
    return main(["solve", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--n", "3",
                 "--steps", "3", *extra])


# O6: SuperResolution.to_image upsamples by its own factor
def test_sr_to_image_upsamples_by_its_own_factor():
    from condiff.operators import SuperResolution
    for f in (2, 3, 4):
        op = SuperResolution(f, "box")
        x = torch.randn(2, 1, 12, 12)
        y = op.A(x)
        img = op.to_image(y)
        assert img.shape == x.shape
        assert torch.equal(img[:, :, ::f, ::f], y)


# S2/S4/S7: metrics.json agrees with the arrays it sits beside; the default operator parameters
def test_solve_metrics_match_the_saved_arrays_and_defaults(tiny_run, tmp_path):
    from condiff.operators import SuperResolution
    assert main(["solve", "--ckpt", str(tiny_run), "--out", str(tmp_path / "sr"), "--device", "cpu",
                 "--steps", "2", "--operator", "sr", "--method", "dps"]) == 0
    m = json.loads((tmp_path / "sr" / "metrics.json").read_text())
    z = np.load(tmp_path / "sr" / "reconstruction.npz")
    assert m["n"] == 16 == len(z["x"])                       # default --n: 16 test images
    op = SuperResolution(2, "bicubic")
    y = torch.from_numpy(z["y"])
    truth = op.residual(torch.from_numpy(z["ground_truth"]), y)
    rec = op.residual(torch.from_numpy(z["x"]), y)
    assert m["residual_truth"] == pytest.approx(float(truth.mean()), rel=1e-5)
    assert m["residual"] == pytest.approx(float(rec.mean()), rel=1e-5)
    assert _solve(tiny_run, tmp_path / "ir", "--operator", "inpaint-random", "--method", "dps") == 0
    m = json.loads((tmp_path / "ir" / "metrics.json").read_text())
    z = np.load(tmp_path / "ir" / "reconstruction.npz")
    # default p_drop 0.7: the recorded observed share is that of the saved measurement's non-zero pixels
    assert m["operator"]["observed"] == pytest.approx((z["y"] != 0).mean())
    assert 0.15 < m["operator"]["observed"] < 0.45


# S5: inpaint-box's default margin is size // 8 (2 px at 16 px), reached by the random boxes
def test_inpaint_box_default_margin_is_an_eighth():
    from condiff.cli.solve import OPERATOR_DEFAULTS, OPERATORS
    op = OPERATORS["inpaint-box"]((400, 1, 16, 16), torch.Generator().manual_seed(0), 0.0, dict(OPERATOR_DEFAULTS))
    missing = op.mask[:, 0] == 0
    rows = missing.any(2).float().argmax(1)   # first missing row per image
    cols = missing.any(1).float().argmax(1)
    assert int(rows.min()) == 2 and int(cols.min()) == 2 and int(rows.max()) == 16 - 2 - 8


# S8: given measurements are zeroed where the mask does not observe (as A does), also in what is saved
def test_given_measurements_are_saved_zeroed_outside_the_mask(tiny_run, tmp_path):
    mask = np.ones((8, 8), np.float32)
    mask[2:6, 1:7] = 0
    np.save(tmp_path / "mask.npy", mask)
    y = np.random.default_rng(0).uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32)
    y[:, :, 2:6, 1:7] = 7.0
    np.save(tmp_path / "y.npy", y)
    assert _solve(tiny_run, tmp_path / "g", "--operator", "inpaint-mask", "--mask", str(tmp_path / "mask.npy"),
                  "--method", "dps", "--measurement", str(tmp_path / "y.npy")) == 0
    saved = np.load(tmp_path / "g" / "reconstruction.npz")["y"]
    assert np.all(saved[:, :, 2:6, 1:7] == 0) and np.array_equal(saved * mask, y * mask)


# D1: the nearest swept budget is nearest in log steps
def test_defaults_take_the_nearest_budget_in_log_steps():
    from condiff.guidance.defaults import TUNED, default_hyperparameters
    for task in TUNED:
        assert default_hyperparameters("dps", task, 500)["zeta"] == TUNED[task][1000]["dps"]["zeta"]
        assert default_hyperparameters("dps", task, 35)["zeta"] == TUNED[task][50]["dps"]["zeta"]


# D2: every non-DPS tuned default is what the quick sweep chose (as crn-best is checked for DPS)
def test_the_other_defaults_are_the_quick_sweeps_choices():
    from pathlib import Path

    import condiff
    from condiff.guidance.defaults import TUNED
    res = Path(condiff.__file__).resolve().parents[1] / "benchmarks" / "results" / "guidance-sweep-quick.json"
    chosen = json.loads(res.read_text())["tuned"]
    n = 0
    for task, by_steps in chosen.items():
        for steps, methods in by_steps.items():
            for method, hp in methods.items():
                if method not in ("dps", "dsg+dps"):
                    assert TUNED[task][int(steps)][method] == hp, (task, steps, method)
                    n += 1
    assert n == 4 * 3 * 4


# D3: the generic fallbacks are the papers' values
def test_generic_defaults_are_the_papers():
    from condiff.guidance.defaults import default_hyperparameters
    assert default_hyperparameters("dsg+dps") == {"rate": 0.2, "interval": 1}
    assert default_hyperparameters("dsg+dps", "no/such-task", 50) == {"rate": 0.2, "interval": 1}
    assert default_hyperparameters("dps", None, 50) == {"zeta": 1.0}


# DT1b: one_thread restores the caller's thread count
def test_one_thread_restores_the_thread_count():
    from condiff.determinism import one_thread
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# U1: a path with a colon in it
def test_file_spec_splits_at_the_last_colon():
    from condiff.userfile import split_file_spec
    assert split_file_spec("/tmp/a:b/c.py:NAME") == ("/tmp/a:b/c.py", "NAME")


# F1: 16-bit PNGs scale by 65535
def test_sixteen_bit_png_scales_by_65535(tmp_path):
    from PIL import Image

    from condiff.data.files import load_png_folder
    a = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    x = load_png_folder(tmp_path / "a.png").x
    np.testing.assert_allclose(x[0, 0, 0].numpy(), a[0] / 65535 * 2 - 1, atol=1e-6)


# SC2: the scenes test split's default size
def test_scenes_default_sizes():
    from condiff.data.scenes import load_scenes
    assert len(load_scenes("test", size=8)) == 512


# C1: mean_top_prob is the mean over samples of each sample's top class probability
def test_judge_mean_top_prob_and_histogram_are_per_sample(cached_classifier_or_train):
    from condiff.classifier import DigitsJudge, _digits
    judge = DigitsJudge(cached_classifier_or_train)
    x = _digits("test")[0][:40]
    x = torch.cat([x, torch.rand(40, 1, 8, 8) * 2 - 1])  # half digits, half noise
    r = judge.evaluate(x)
    p = judge.probs(x).detach().double()
    assert r["mean_top_prob"] == pytest.approx(float(p.max(1).values.mean()), rel=1e-5)
    hist = np.bincount(p.argmax(1).numpy(), minlength=10) / len(x)
    np.testing.assert_allclose(r["class_hist"], hist)


@pytest.fixture(scope="session")
def cached_classifier_or_train():
    from condiff.classifier import train_digits_classifier
    return train_digits_classifier(steps=30)


# M1/M2: observation masks
def test_first_rows_observes_rows_and_sparse_points_rounds():
    from condiff.mirror.assimilate import first_rows, sparse_points
    m = first_rows((1, 4, 6), 1, 0.1).mask
    assert m[0, 0, 0].all() and m[0, 0, 1:].sum() == 0
    assert int(sparse_points((1, 8, 8), 0.2, 0.1).mask.sum()) == 13  # round(12.8)


# M5: satisfied means the data's median is at most a quarter of the noise's
def test_data_violation_threshold_is_a_quarter():
    from condiff.mirror import data_violation
    g = torch.Generator().manual_seed(0)
    a = torch.where(torch.rand(512, 1, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    board = (torch.arange(16).view(4, 4) + torch.arange(4).view(4, 1)) % 2 * 2 - 1.0
    x = a + 0.3 * board  # each sample: a constant plus a +-0.3 checkerboard
    dist = lambda v: (v - v.mean((1, 2, 3), keepdim=True)).abs().flatten(1).mean(1)
    v = data_violation(dist, x)
    ratio = v["median"] / v["noise_median"]
    assert 0.3 < ratio < 0.45 and v["satisfied"] is False


# TS2: the scores and picture returned are those of each instance's winning chain
def test_solve_with_prior_returns_the_winning_chains_scores(monkeypatch):
    from condiff.denoiser import GaussianDenoiser
    from condiff.pnp import tsp
    from condiff.schedule import Schedule
    square = np.array([[0, 0], [1, 1], [1, 0], [0, 1.0]])
    crossed, ring = np.array([0, 1, 2, 3]), np.array([0, 2, 1, 3])
    per_chain = iter([crossed, ring, ring, crossed])  # winners: chain 1 of instance 0, chain 0 of instance 1
    seen = []
    monkeypatch.setattr(tsp, "decode", lambda coords, scores: (seen.append(scores.clone()), next(per_chain))[1])
    den = GaussianDenoiser(Schedule.linear(100), mean=-0.8, std=0.3)
    res = tsp.solve_with_prior(den, np.stack([square, square]), tsp.TourStyle(16), chains=2, steps=1,
                               generator=torch.Generator().manual_seed(0))
    assert not torch.equal(seen[1], seen[2])
    assert torch.equal(res.scores[0], seen[1]) and torch.equal(res.scores[1], seen[2])


# CP1/CP2/CP3: condiff pnp's metrics agree with the arrays it writes
def _tiny_prior(path, channels, size, data):
    from condiff.models import save_model
    from condiff.nets import UNet
    from condiff.schedule import Schedule
    torch.manual_seed(0)
    return save_model(path, UNet(in_channels=channels, base=8, mults=(1, 2)), Schedule.linear(100), data=data,
                      shape=[channels, size, size])


def test_pnp_cli_metrics_match_their_arrays(tmp_path):
    from condiff.pnp import tsp
    from condiff.pnp.segmentation import iou
    _tiny_prior(tmp_path / "tours", 1, 16, {"name": "tours", "size": 16, "cities": [6]})
    assert main(["pnp", "tsp", "--ckpt", str(tmp_path / "tours"), "--n", "4", "--cities", "9", "--steps", "2",
                 "--out", str(tmp_path / "tsp")]) == 0
    m = json.loads((tmp_path / "tsp" / "metrics.json").read_text())
    with np.load(tmp_path / "tsp" / "tours.npz") as z:
        lengths, best, cities = z["lengths"], z["optimal_lengths"], z["coords"]
    assert m["gap_total"] == pytest.approx(lengths.sum() / best.sum() - 1)
    greedy = np.array([tsp.tour_length(c, tsp.two_opt(c, tsp.greedy_edges(c))) for c in cities])
    raw = np.array([tsp.tour_length(c, tsp.greedy_edges(c)) for c in cities])
    assert (raw > greedy + 1e-9).any()  # 2-opt matters on these instances
    assert m["gap_greedy_2opt"] == pytest.approx(float((greedy / best - 1).mean()))
    _tiny_prior(tmp_path / "scenes", 4, 16, {"name": "scenes", "size": 16})
    assert main(["pnp", "segment", "--ckpt", str(tmp_path / "scenes"), "--n", "6", "--chains", "1",
                 "--steps", "2", "--out", str(tmp_path / "seg")]) == 0
    m = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    with np.load(tmp_path / "seg" / "masks.npz") as z:
        truth = torch.from_numpy(z["truth"])
        km, ot = (float(iou(torch.from_numpy(z[k]), truth).mean()) for k in ("kmeans", "otsu"))
    assert km != ot
    assert m["iou_kmeans"] == pytest.approx(km) and m["iou_otsu"] == pytest.approx(ot)


# M4: batched distances cover every row
def test_batched_distance_covers_a_last_batch_of_one():
    from condiff.mirror.sample import batched_distance
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    d = batched_distance(lambda v: v.flatten(1).abs().sum(1), x, batch_size=2)
    torch.testing.assert_close(d, x.flatten(1).abs().sum(1))


# M6: fine-tuning returns the EMA inverse (as checkpointed), not the raw trained network
def test_finetune_returns_the_ema_inverse(tmp_path):
    import copy

    from condiff import io
    from condiff.constraints import TotalBrightness
    from condiff.data import load_dataset
    from condiff.mirror import NAMMLoss, build_mirror, finetune_inverse
    from condiff.train import TrainConfig
    d = load_dataset("brightness", "train", size=8, n_train=32, n_test=2)
    x, con = d.x, TotalBrightness(d.meta["constraint"]["flux"])
    m = build_mirror((1, 8, 8), {"name": "icnn", "filters": 8, "layers": 2},
                     {"name": "resnet", "base": 8, "blocks": 1, "downsamples": 1}, 0.9, seed=0)
    y = m.to_mirror(x).detach() + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=5, batch_size=8, lr=2e-3, betas=(0.5, 0.999), warmup=0, lr_decay="constant",
                      ema_decay=0.9, ckpt_every=5, progress=False)
    out = finetune_inverse(m, x, y, con, cfg, NAMMLoss(l_con=1.0), tmp_path / "ft")
    ckpt = tmp_path / "ft" / "checkpoints" / "step_00000005"
    ema, raw = copy.deepcopy(m.inverse), copy.deepcopy(m.inverse)
    io.load_state_into(ema, ckpt, "ema")
    io.load_state_into(raw, ckpt, "model")
    got = out.inverse.state_dict()
    assert all(torch.equal(v.cpu(), got[k].cpu()) for k, v in ema.state_dict().items())
    assert not all(torch.equal(v.cpu(), got[k].cpu()) for k, v in raw.state_dict().items())


# B1/B4: the benchmarks' ratios
def test_count_attack_shows_its_progress_where_stderr_is_no_terminal(bench_module, monkeypatch, tmp_path, capsys):
    """Off a terminal its counter's first use said one line and then nothing for minutes, and its attacks
    nothing at all; now both show the progress bar the Trainer shows (refreshed every 10 s in a log)."""
    from condiff.constraints import CountConstraint

    bench = bench_module("count_attack")
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))  # a counter trained here, on first use
    monkeypatch.setitem(bench.PROFILES, "tiny", {"size": 12, "k": 2, "n": 4, "steps": 2, "lr": 0.01})
    small = lambda k, size, device: CountConstraint(k, size, counter_steps=3, width=4, device=device)  # noqa: E731
    monkeypatch.setattr(bench, "CountConstraint", small)
    assert len(bench.run("tiny")["rows"]) == 5
    err = capsys.readouterr().err
    assert "training the counting CNN" in err and "counting CNN (first use)" in err and "/3 [" in err
    assert "pixel attacks" in err and "/8 [" in err


def test_namm_reduction_is_baseline_over_method(bench_module, monkeypatch):
    namm = bench_module("namm")

    class Run:
        def evaluate(self, keys):
            rec = lambda dist, mmd: {"n": 4, "l_mean": dist, "l_median": dist, "mmd": mmd,  # noqa: E731
                                     "_l": torch.full((4,), dist)}
            return {"vanilla": rec(10.0, 0.02), "mdm_ft": rec(1.0, 0.025)}
    rows, summary = namm.generation_rows(Run(), "t")
    assert summary["reduction"] == pytest.approx(10.0) and summary["mmd_vs_vanilla"] == pytest.approx(1.25)
    assert summary["met"] is True and rows[0]["reduction vs baseline"] == pytest.approx(1.0)
    # the reduction's bootstrap interval: a point for constant distances; none for the baseline itself
    assert rows[1]["90% interval"] == "10 to 10" and "90% interval" not in rows[0]
    # none where a set's distances are not finite or average zero (no reduction is shown then either), where
    # ratio_interval itself would refuse them: the table and `namm sample`'s report go on without it
    from condiff.cli.namm import interval_text, reduction_interval

    row = {}
    for bad in (torch.tensor([1.0, float("nan")]), torch.zeros(2)):
        assert reduction_interval(torch.ones(3), bad) is None and reduction_interval(bad, torch.ones(3)) is None
        namm.add_interval(row, torch.ones(3), bad)
    assert row == {} and interval_text(None) == "-"


def test_median_ratio_is_a_over_b(bench_module):
    timing = bench_module("_timing")
    assert timing.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == pytest.approx(3.0)


# B5: a point two runs scored equally is credited to the first run (ties do not move the choice)
def test_combine_keeps_the_first_run_on_a_tie(bench_module, monkeypatch, tmp_path):
    sweep = bench_module("guidance_sweep")
    row = lambda scores: {"task": "t", "steps": 20, "method": "dps", "fixed": {}, "scores": scores}
    (tmp_path / "a").write_text(json.dumps({"rows": [row([{"zeta": 0.1, "train PSNR": 17.5}])]}))
    (tmp_path / "b").write_text(json.dumps({"rows": [row([{"zeta": 0.2, "train PSNR": 17.5},
                                                          {"zeta": 0.1, "train PSNR": 17.5}])]}))
    monkeypatch.setattr(sweep, "_result", lambda name: tmp_path / name)
    for n in "ab":
        monkeypatch.setitem(sweep.PROFILES, n, {"k": 128, "models": "quick"})
    res = sweep.combine(["a", "b"])
    assert res["tuned"] == {"t": {20: {"dps": {"zeta": 0.1}}}} and res["rows"][0]["from"] == "a"


# B8: floats in recorded tables keep four significant digits
def test_bench_table_cells_keep_four_significant_digits():
    from condiff.cli.bench import to_markdown
    res = {"title": "T", "name": "n", "profile": "quick", "machine": "m", "date": "d", "seconds": 1.0,
           "columns": ["a"], "rows": [{"a": 1.23456}]}
    assert "| 1.235 |" in to_markdown(res)


# S6b: a PNG mask more than a quarter grey is refused
def test_a_mostly_grey_png_is_no_mask(tmp_path):
    from PIL import Image

    from condiff.cli.solve import load_mask
    a = np.full((8, 8), 255, np.uint8)
    a.flat[:26] = 128  # 26 of 64 = 41% grey
    Image.fromarray(a).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match="grey"):
        load_mask(tmp_path / "m.png", (1, 8, 8), 1)
    a.flat[:26] = 255
    a.flat[:10] = 128  # 16% grey: a mask, grey read as observed (>= 0.5)
    Image.fromarray(a).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", (1, 8, 8), 1).all()


# B6: the PnP benchmark's TSP gap is the mean of the per-instance gaps (the paper's "mean gap")
def test_pnp_benchmark_gap_is_the_mean_of_per_instance_gaps(bench_module, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from condiff.denoiser import GaussianDenoiser
    from condiff.schedule import Schedule

    bench = bench_module("pnp")
    run = tmp_path / "prior"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"size": 16, "n": 4, "cities": [4]}, "model": {},
                                                 "train": {"steps": 1}}))
    unit = np.array([[0, 0], [0.25, 0], [0.25, 0.25], [0, 0.25]])  # a square of perimeter 1; twice as large: 2
    coords, ref = np.stack([unit, 2 * unit]), np.tile(np.arange(4), (2, 1))
    monkeypatch.setattr(bench, "ensure_prior", lambda *a: run)
    monkeypatch.setattr(bench, "load_denoiser", lambda *a, **k: GaussianDenoiser(Schedule.linear(50), 0.0, 1.0))
    monkeypatch.setattr(bench, "solved_instances", lambda *a, **k: (coords, ref, "held-karp"))
    monkeypatch.setattr(bench.tsp, "solve_with_prior", lambda *a, **k: SimpleNamespace(
        lengths=np.array([2.0, 3.0]), infer_seconds=0.0, decode_seconds=0.0))
    p = {"sizes": [4], "instances": 2, "stop_grad_sizes": [], "untrained_sizes": [], "chains": 1, "steps": 1,
         "batch": 2}
    rows, _ = bench.tsp_rows(p, "quick", "cpu")
    prior = next(r for r in rows if r["method"] == "diffusion prior")
    assert prior["metric"] == "mean gap (%)" and prior["value"] == pytest.approx(75.0)  # mean(100%, 50%), not 66.7


# the pictures: what a panel shows must compare across panels
def test_scatter_frames_every_point_and_sample_panels_share_one_grey_scale(monkeypatch, tmp_path):
    import condiff.mirror.plots as mplots
    import condiff.plots as plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(mplots, "save_figure", lambda fig, path: figs.append(fig))
    plots.plot_scatter({"a": np.array([[0.0, 0.0], [10.0, 9.0]]), "b": np.zeros((3, 2))}, tmp_path / "s.png")
    for ax in figs[-1].axes:  # data on [0, 10] were drawn on [-1.3, 1.3]: an empty frame
        lo, hi = ax.get_xlim()
        assert lo < 0 and hi > 10 and ax.get_ylim() == (lo, hi)
    g = torch.Generator().manual_seed(0)
    bright, dark = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g) - 1
    big, small = torch.rand(3, 4, 4, generator=g) * 40 + 1, torch.rand(3, 4, 4, generator=g) * 0.01 + 1e-4
    mplots.plot_violation_grid({"v": (bright, big, big.mean((1, 2))), "m": (dark, small, small.mean((1, 2)))},
                               tmp_path / "g.png", rows=3)
    images = [im for ax in figs[-1].axes for im in ax.get_images()]
    greys = {im.get_clim() for im in images if im.get_cmap().name == "gray"}
    maps = [im for im in images if im.get_cmap().name == "magma"]
    assert len(greys) == 1 and next(iter(greys))[0] < -0.9 and next(iter(greys))[1] > 0.9  # one scale for all
    assert len({id(im.norm) for im in maps}) == 1 and type(maps[0].norm).__name__ == "LogNorm"  # 4 decades
    assert any(ax.get_label() == "<colorbar>" for ax in figs[-1].axes)
    # a pixel that meets the constraint exactly (0, no number on a log scale) is drawn as the scale's lowest
    # colour: it was left blank, white, which read as a violation in held-out data
    small[0, 0, 0], small[1, 0, 0] = 0.0, float("nan")
    mplots.plot_violation_grid({"v": (bright, big, big.mean((1, 2))), "m": (dark, small, small.mean((1, 2)))},
                               tmp_path / "g.png", rows=3)
    maps = [im for ax in figs[-1].axes for im in ax.get_images() if im.get_cmap().name == "magma"]
    assert type(maps[0].norm).__name__ == "LogNorm"
    zero, nan = (im.to_rgba(im.get_array())[0, 0] for im in (maps[1], maps[3]))  # rows 1, 2 of the "m" column
    assert zero == pytest.approx(maps[1].get_cmap()(0.0)) and zero[3] == 1  # met exactly: the lowest colour
    assert nan[3] == 0  # not finite: left blank, not drawn as met


def test_reference_lines_and_tours_are_named_in_their_legends(monkeypatch, tmp_path):
    import condiff.plots as plots
    from condiff.cli.pnp import plot_tours

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig))
    plots.plot_bars({"data": [0.5, 0.5], "model": [0.4, 0.6]}, tmp_path / "b.png", ref=0.5, ref_label="uniform 1/2",
                    xlabel="component")
    ax = figs[-1].axes[0]
    assert "uniform 1/2" in [t.get_text() for t in ax.get_legend().get_texts()] and ax.get_xlabel() == "component"
    square = np.array([[[0, 0], [1, 0], [1, 1], [0, 1.0]]])
    plot_tours(square, np.array([[0, 1, 2, 3]]), np.array([[0, 1, 2, 3]]), tmp_path / "t.png", ["gap to optimal 0%"])
    said = [t.get_text() for legend in figs[-1].legends for t in legend.get_texts()]
    assert said == ["decoded (PnP)", "optimal"]


def test_a_loss_curve_draws_each_logged_key_under_its_label(saved_figures, tmp_path):
    """The NAMM stages draw their loss terms by name (a stage's loss.png showed only the weighted sum)."""
    from condiff.plots import plot_loss_curve

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "cyc": 0.5 / s}) + "\n" for s in (10, 20, 30)))
    figs = saved_figures()
    plot_loss_curve(log, tmp_path / "loss.png", keys=("loss", "cyc", "con"), title="namm: terms",
                    labels={"cyc": "cycle terms"})
    ax = figs[0].axes[0]
    assert ax.get_title() == "namm: terms"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "cycle terms"]  # no curve for "con"
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [pytest.approx([0.1, 0.05, 1 / 30]),
                                                                   pytest.approx([0.05, 0.025, 0.5 / 30])]


def test_eval_draws_the_judged_classes_it_records(saved_figures, tiny_run, tmp_path):
    """condiff eval of a digits model recorded class_hist in metrics.json with no picture of it."""
    figs = saved_figures()
    out = tmp_path / "ev"
    assert main(["eval", "--ckpt", str(tiny_run), "--n", "12", "--steps", "2", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ax = figs[-1].axes[0]
    assert (out / "class_hist.png").is_file() and [p.get_height() for p in ax.patches] == pytest.approx(m["class_hist"])
    assert len(ax.patches) == 10 and [line.get_ydata()[0] for line in ax.get_lines()] == [pytest.approx(0.1)]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(c) for c in range(10)]  # the digits, from 0
    assert f"TV to uniform {m['tv_to_uniform']:.3f}" in ax.get_title()


# unobserved pixels were zero-filled and drawn mid-grey, like a measured grey
def test_unobserved_pixels_are_drawn_in_their_own_colour_and_named(saved_figures, tiny_run, tmp_path):
    from PIL import Image

    import condiff.mirror.plots as mplots
    import condiff.plots as plots
    from condiff.data.files import save_png_grid
    from condiff.plots import UNOBSERVED_NOTE, UNOBSERVED_RGB, plot_image_columns

    figs = saved_figures(plots, mplots)
    x, missing = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    missing[1, 0, 2, 3] = True
    img = np.asarray(Image.open(save_png_grid(x, tmp_path / "m.png", nrow=2, scale=1, missing=missing)))
    blue = (img == UNOBSERVED_RGB).all(-1)
    assert blue.sum() == 1 and blue[1 + 2, 1 + 4 + 1 + 3]  # row 2, column 3 of the second tile
    plot_image_columns({"truth": x.numpy(), "measurement": x.numpy()}, tmp_path / "c.png",
                       hidden={"measurement": missing.numpy()})
    truth_ax, seen_ax = figs[-1].axes[0], figs[-1].axes[1]
    assert UNOBSERVED_NOTE in seen_ax.get_title() and UNOBSERVED_NOTE not in truth_ax.get_title()
    assert np.allclose(figs[-1].axes[3].get_images()[0].get_array()[2, 3], np.array(UNOBSERVED_RGB) / 255)
    y = torch.full((2, 1, 4, 4), 0.5)
    y[missing] = 0.0  # below every observed value: it widened the shared grey scale
    mplots.plot_violation_grid({"observed (y)": (y, None, None), "truth": (y + 0.5, None, None)}, tmp_path / "v.png",
                               hidden={"observed (y)": missing})
    first = figs[-1].axes[2].get_images()[0]  # row 1, column 0: the observed picture of the second sample
    assert first.get_array().mask[2, 3] and first.get_array().mask.sum() == 1 and first.get_clim()[0] == 0.5
    assert np.allclose(first.get_cmap().get_bad()[:3], np.array(UNOBSERVED_RGB) / 255)
    assert f"observed (y): {UNOBSERVED_NOTE}" in figs[-1]._suptitle.get_text()
    # end to end: condiff solve draws a box it does not observe in the unobserved colour
    assert _solve(tiny_run, tmp_path / "box", "--operator", "inpaint-box") == 0
    y = np.load(tmp_path / "box" / "reconstruction.npz")["y"]  # zero where unobserved (noise elsewhere)
    img = np.asarray(Image.open(tmp_path / "box" / "measurement.png"))
    assert (img == UNOBSERVED_RGB).all(-1).sum() == (y == 0).sum() * 4 * 4 > 0  # 8 px tiles drawn at 32 px
    assert UNOBSERVED_NOTE in next(ax.get_title() for ax in figs[-1].axes if ax.get_title().startswith("measurement"))


# pnp tsp drew its two rows of pictures without saying which is which
def test_tsp_pictures_name_their_rows_and_instances(saved_figures, tmp_path):
    figs = saved_figures()
    _tiny_prior(tmp_path / "tours", 1, 16, {"name": "tours", "size": 16, "cities": [6]})
    assert main(["pnp", "tsp", "--ckpt", str(tmp_path / "tours"), "--n", "2", "--cities", "6", "--steps", "2",
                 "--out", str(tmp_path / "tsp")]) == 0
    m = json.loads((tmp_path / "tsp" / "metrics.json").read_text())
    fig = next(f for f in figs if any(ax.get_ylabel() for ax in f.axes))
    rows = [ax.get_ylabel().replace("\n", " ") for ax in fig.axes if ax.get_ylabel()]
    assert rows == m["picture_rows"] and len(fig.axes) == 2 * 2
    assert [fig.axes[i].get_ylabel().replace("\n", " ") for i in (0, 2)] == rows  # each at the start of its row
    assert fig._suptitle.get_text() == "PnP tours: 2 instances of 6 cities"  # all shown: no "first N shown"
    assert [ax.get_title() for ax in fig.axes[:2]] == [f"instance {i}\ngap {round(100 * g, 2) + 0.0:.2f}%"
                                                      for i, g in enumerate(m["gaps"])]


# pnp segment titled its picture with the PnP IoU only, not the baselines it is compared with
def test_segment_picture_names_the_baselines_ious(saved_figures, tmp_path):
    figs = saved_figures()
    _tiny_prior(tmp_path / "scenes", 4, 16, {"name": "scenes", "size": 16})
    assert main(["pnp", "segment", "--ckpt", str(tmp_path / "scenes"), "--n", "2", "--chains", "1", "--steps", "2",
                 "--out", str(tmp_path / "seg")]) == 0
    m = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    title = figs[-1]._suptitle.get_text()
    assert f"2-means {m['iou_kmeans']:.3f}" in title and f"Otsu {m['iou_otsu']:.3f}" in title
    with np.load(tmp_path / "seg" / "masks.npz") as z:
        from condiff.pnp.segmentation import iou
        truth = torch.from_numpy(z["truth"])
        km = iou(torch.from_numpy(z["kmeans"]), truth)
    labels = [ax.get_ylabel() for ax in figs[-1].axes if ax.get_ylabel()]
    assert len(labels) == 2 and all(f"2-means {float(k):.2f}" in s for s, k in zip(labels, km))


# dual finetune drew a rate in [0, 1] and a ratio near 1 or 2 as bars on one unlabelled axis
def test_finetune_figure_gives_each_measure_its_own_labelled_axis(saved_figures, tmp_path, monkeypatch):
    import condiff.classifier
    import condiff.dual.experiments as ex

    class FakeJudge:
        def __init__(self, device="cpu"):
            self.net = torch.nn.Module()
            self.net.head = torch.nn.Linear(4, 10)

        def features(self, x):
            return x.flatten(1)[:, :4].float()

    figs = saved_figures()
    monkeypatch.setattr(condiff.classifier, "DigitsJudge", FakeJudge)
    monkeypatch.setattr(ex, "train_cached", lambda run_dir, net, *a, **k: (net.eval(), {}))
    monkeypatch.setattr(ex, "load_net", lambda d, dev: (ex._digits_net(cfg.model, cfg.seed), {}))
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(ex, "_samples", lambda net, sch, n, *a: torch.rand(n, 1, 8, 8, generator=g) * 2 - 1)
    monkeypatch.setattr(ex, "plot_dual", lambda *a: [])
    cfg = ex.FinetuneConfig(model={**ex.DIGITS_MODEL, "base": 8, "mults": [1, 2]}, T=20, sample_steps=2, n_constraint=8,
                            n_samples=8, dual={"batch_size": 8, "timesteps": 2})
    with pytest.warns(UserWarning, match="memorised none"):  # random samples copy no target image
        m = ex.run_finetune(cfg, tmp_path / "ft")
    fig = figs[-1]
    assert [ax.get_ylabel().split("\n")[0] for ax in fig.axes] == ["memorisation rate", "intra-cluster diversity"]
    heights = [[p.get_height() for p in ax.patches] for ax in fig.axes]
    assert heights == [[m[n][k] for n in ("pretrained", "plain", "constrained")]
                       for k in ("memorisation", "diversity")]
    assert [ax.get_ylim()[0] for ax in fig.axes] == [0, 0]  # non-negative measures from zero, a rate of 0 too


# digit grids were separated by black, the digits' own background: the tiles ran together
def test_grid_padding_is_a_light_grey_no_digit_pixel_is(tmp_path):
    from PIL import Image

    from condiff.data.files import save_png_grid

    x = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4)  # background and stroke
    img = np.asarray(Image.open(save_png_grid(x, tmp_path / "g.png", scale=1)))
    assert img.shape == (6, 11) and img[0, 0] == img[:, 5].min() == img[:, 5].max() == 191
    assert set(np.unique(img[1:5, 1:5])) == {0} and set(np.unique(img[1:5, 6:10])) == {255}


# the unobserved colour marks a pixel missing in any channel, and a mask of one image marks every image
def test_unobserved_pixels_of_any_channel_and_a_batch_wide_mask_are_drawn(saved_figures, tmp_path):
    from PIL import Image

    from condiff.data.files import save_png_grid
    from condiff.plots import UNOBSERVED_RGB, plot_image_columns

    x = torch.zeros(2, 3, 4, 4)  # colour pictures, mid-grey
    missing = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    missing[1, 2, 1, 1] = True  # the blue channel of one pixel of the second picture
    img = np.asarray(Image.open(save_png_grid(x, tmp_path / "rgb.png", nrow=2, scale=1, missing=missing)))
    blue = (img == UNOBSERVED_RGB).all(-1)
    assert img.shape == (6, 11, 3) and blue.sum() == 1 and blue[1 + 1, 1 + 4 + 1 + 1]
    assert (img[1:5, 1:5] == 128).all()  # the observed picture keeps its grey
    one = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    one[0, 0, 3, 0] = True  # one mask for the whole batch
    img = np.asarray(Image.open(save_png_grid(x, tmp_path / "one.png", nrow=2, scale=1, missing=one)))
    blue = (img == UNOBSERVED_RGB).all(-1)
    assert blue.sum() == 2 and blue[1 + 3, 1] and blue[1 + 3, 1 + 4 + 1]
    figs = saved_figures()
    plot_image_columns({"measurement": x.numpy()}, tmp_path / "c.png", hidden={"measurement": missing.numpy()})
    drawn = figs[-1].axes[1].get_images()[0].get_array()  # the second picture
    assert np.allclose(drawn[1, 1], np.array(UNOBSERVED_RGB) / 255) and np.allclose(drawn[0, 0], 0.5)


# a measurement of every pixel (a blur) has no unobserved pixels to draw or name
def test_a_measurement_of_every_pixel_is_drawn_grey_and_names_no_unobserved_colour(saved_figures, tiny_run, tmp_path):
    from PIL import Image

    from condiff.plots import UNOBSERVED_NOTE

    figs = saved_figures()
    assert _solve(tiny_run, tmp_path / "blur", "--operator", "blur") == 0
    assert Image.open(tmp_path / "blur" / "measurement.png").mode == "L"
    titles = [ax.get_title() for ax in figs[-1].axes if ax.get_title()]
    assert "measurement" in titles and not any(UNOBSERVED_NOTE in t for t in titles)


def test_image_panels_take_the_images_aspect(tmp_path, saved_figures):
    """12x20 pictures were drawn in square panels' rows, leaving empty bands between them."""
    from condiff.plots import plot_image_columns

    figs = saved_figures()
    for h, w in ((8, 8), (12, 20)):
        x = np.zeros((4, 1, h, w), np.float32)
        plot_image_columns({"truth": x, "reconstruction": x}, tmp_path / f"c{h}x{w}.png")
    square, wide = (f.get_size_inches() for f in figs)
    assert square[0] == wide[0] and wide[1] < square[1]  # as wide, and shorter by the images' aspect
    assert wide[1] - 0.3 == pytest.approx((square[1] - 0.3) * 12 / 20)
