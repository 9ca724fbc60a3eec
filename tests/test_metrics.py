"""Metrics against closed forms and invariants; the digits classifier and its cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.stats import norm
from skimage.metrics import structural_similarity

from condiff import metrics as M


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- MMD -----------------------------------------------------------------------------------------


def brute_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: list[float]) -> float:
    def k(a, b):
        d = torch.cdist(a.double(), b.double()) ** 2
        return sum(torch.exp(-d / (2 * s**2)) for s in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )


def test_mmd_matches_u_statistic_and_chunking(monkeypatch):
    g = gen()
    x, y = torch.randn(70, 2, 3, generator=g), torch.randn(50, 2, 3, generator=g) + 0.5
    ref = brute_mmd(x.flatten(1), y.flatten(1), [0.7, 2.0])
    assert M.mmd(x, y, bandwidths=[0.7, 2.0]) == pytest.approx(ref, abs=1e-12)
    monkeypatch.setattr(M, "CHUNK", 16)
    assert M.mmd(x, y, bandwidths=[0.7, 2.0]) == pytest.approx(ref, abs=1e-12)


def test_mmd_biased_v_statistic():
    g = gen(8)
    x, y = torch.randn(30, 3, generator=g), torch.randn(20, 3, generator=g)
    bw = M.default_bandwidths(y)
    assert bw[0] < bw[1] < bw[2] and bw[1] == pytest.approx(M.median_heuristic(y))

    def k(a, b):
        d = torch.cdist(a.double(), b.double()) ** 2
        return sum(torch.exp(-d / (2 * s**2)) for s in bw)

    ref = float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    assert M.mmd(x, y, biased=True) == pytest.approx(ref, abs=1e-12)
    assert M.mmd(x, y, biased=True) > M.mmd(x, y)
    assert M.mmd(y, y, biased=True) == pytest.approx(0.0, abs=1e-12)


def test_mmd_near_zero_for_same_distribution_and_grows_with_shift():
    g = gen(1)
    x, y = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    assert abs(M.mmd(x, y)) < 0.01
    values = [M.mmd(x + s, y) for s in (0.25, 0.5, 1.0, 2.0)]
    assert values[0] > 0.02
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError, match="same size"):
        M.mmd(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="positive"):
        M.mmd(torch.randn(5, 3), torch.randn(5, 3), bandwidths=[1.0, 0.0])


# --- sliced Wasserstein --------------------------------------------------------------------------


def gaussian_quantiles(n: int, mean: float, std: float) -> torch.Tensor:
    """n points at the mid-quantiles of N(mean, std^2): an almost exact empirical Gaussian."""
    return torch.as_tensor(mean + std * norm.ppf((np.arange(n) + 0.5) / n)).view(n, 1)


def test_sliced_wasserstein_1d_gaussians_closed_form():
    x, y = gaussian_quantiles(4000, 0.0, 1.0), gaussian_quantiles(3000, 1.5, 2.0)
    closed = math.sqrt(1.5**2 + (1.0 - 2.0) ** 2)  # W2 between 1-D Gaussians
    assert M.sliced_wasserstein(x, y, n_proj=8, generator=gen()) == pytest.approx(closed, rel=5e-3)


def test_sliced_wasserstein_unequal_sizes_is_exact():
    # Repeating each point of x m times and of y n times leaves both empirical measures unchanged.
    g = gen(2)
    x, y = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g) * 2
    unequal = M.sliced_wasserstein(x, y, n_proj=16, generator=gen(5))
    equal = M.sliced_wasserstein(x.repeat(4, 1), y.repeat(6, 1), n_proj=16, generator=gen(5))
    assert unequal == pytest.approx(equal, abs=1e-12)
    assert M.sliced_wasserstein(x, x, generator=gen()) == 0.0


# --- memorisation --------------------------------------------------------------------------------


def test_nn_distances_match_cdist(monkeypatch):
    g = gen(3)
    a, b = torch.randn(40, 1, 4, 4, generator=g), torch.randn(30, 1, 4, 4, generator=g)
    monkeypatch.setattr(M, "CHUNK", 7)
    ref = torch.cdist(a.flatten(1).double(), b.flatten(1).double()).min(1).values
    torch.testing.assert_close(M.nn_distances(a, b), ref)


def test_memorisation_rate_copies_and_far_points():
    g = gen(4)
    train, heldout = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g)
    thr = M.calibrate_memorisation_threshold(heldout, train, quantile=0.05)
    # by brute force: the 0.05 quantile of 200 nearest distances lies at rank 9.95, between the 10th and
    # 11th smallest, so exactly 10 held-out points fall under it
    d = torch.cdist(heldout.double(), train.double()).min(1).values.sort().values
    assert thr == pytest.approx(float(d[9] + 0.95 * (d[10] - d[9])), rel=1e-5)
    assert M.memorisation_rate(heldout, train, thr) == 10 / 200
    copies = train[:50] + 1e-4 * torch.randn(50, 8, generator=g)
    assert M.memorisation_rate(copies, train, thr) == 1.0
    assert M.memorisation_rate(train[:50] + 100.0, train, thr) == 0.0
    # a threshold of 0 counts not even exact copies: refused, as is calibrating on the training set itself
    with pytest.raises(ValueError, match="memorisation_rate: threshold must be a number > 0, got 0.0"):
        M.memorisation_rate(train[:10], train, 0.0)
    with pytest.raises(ValueError, match=r"the held-out examples hold copies of training examples \(the 0.05 "):
        M.calibrate_memorisation_threshold(train, train)
    assert M.calibrate_memorisation_threshold(heldout, train, torch.tensor(0.05)) == pytest.approx(thr)


# --- PSNR / SSIM ---------------------------------------------------------------------------------


def test_psnr_closed_form():
    x = torch.rand(3, 2, 5, 5) * 2 - 1
    c = torch.tensor([0.1, 0.2, 0.5]).view(3, 1, 1, 1)
    expected = 10 * torch.log10(4.0 / c.view(3) ** 2)  # MSE = c^2, data range 2
    torch.testing.assert_close(M.psnr(x + c, x), expected.double())
    assert torch.isinf(M.psnr(x, x)).all()


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 3, 16, 20), (2, 1, 5, 9)])
def test_ssim_matches_skimage(shape):
    g = gen(5)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
    side = min(shape[-2:])
    win = min(11, side if side % 2 else side - 1)  # what condiff picks by default
    ref = [
        structural_similarity(
            x[i].numpy().astype(np.float64),
            y[i].numpy().astype(np.float64),
            data_range=2.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            win_size=win,
            channel_axis=0,
        )
        for i in range(shape[0])
    ]
    torch.testing.assert_close(M.ssim(x, y), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=0)


def test_ssim_identity_and_errors():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(M.ssim(x, x), torch.ones(4, dtype=torch.float64))
    noise = torch.rand(4, 1, 8, 8, generator=gen(7)) * 2 - 1
    assert (M.ssim(x, noise).abs() < 0.5).all()
    with pytest.raises(ValueError, match="win_size"):
        M.ssim(x, x, win_size=9)
    with pytest.raises(ValueError, match="shapes differ"):
        M.ssim(x, x[:2])


# --- Fréchet distance ----------------------------------------------------------------------------


def whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """n points whose sample mean is exactly 0 and unbiased sample covariance exactly I."""
    z = torch.randn(n, d, generator=gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def test_frechet_identity_covariances_equals_squared_mean_difference():
    mu1, mu2 = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 3.0, 0.5])
    a, b = whitened(200, 3, 0) + mu1, whitened(150, 3, 1) + mu2
    assert M.frechet_distance(a, b) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), abs=1e-9)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_frechet_closed_forms():
    mu = torch.zeros(3)
    c1, c2 = torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 1.0, 9.0]))
    # Commuting covariances: tr(c1 + c2 - 2 sqrt(c1 c2)) = sum (sqrt(s1) - sqrt(s2))^2
    assert M.gaussian_frechet(mu, c1, mu, c2) == pytest.approx(1.0 + 1.0 + 0.0)
    g = gen(6)
    a = torch.randn(300, 5, generator=g)
    b = torch.randn(200, 5, generator=g) @ torch.randn(5, 5, generator=g) + 1.0
    (m1, s1), (m2, s2) = M.mean_cov(a), M.mean_cov(b)
    ref = (
        float(((m1 - m2) ** 2).sum())
        + np.trace(s1.numpy() + s2.numpy())
        - 2 * np.trace(sqrtm(s1.numpy() @ s2.numpy()).real)
    )
    assert M.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


# --- class statistics and constraint statistics --------------------------------------------------


def test_class_histogram_and_tv_distance():
    h = M.class_histogram(torch.tensor([0, 0, 1, 3]), 4)
    torch.testing.assert_close(h, torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64))
    assert M.tv_distance(h, torch.full((4,), 0.25)) == pytest.approx(0.25)
    assert M.tv_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        M.class_histogram(torch.tensor([0, 4]), 4)


def test_constraint_stats():
    v = torch.arange(11, dtype=torch.float32) * 0.1  # 0.0, 0.1, ..., 1.0
    s = M.constraint_stats(v, tol=0.25)
    assert s["n"] == 11
    assert s["mean"] == pytest.approx(0.5) and s["median"] == pytest.approx(0.5)
    assert s["max"] == pytest.approx(1.0) and s["q90"] == pytest.approx(0.9)
    assert s["std"] == pytest.approx(float(v.double().std()))
    assert s["frac_below_tol"] == pytest.approx(3 / 11)
    assert M.constraint_stats(torch.tensor([0.0, float("nan")]))["frac_below_tol"] == 0.5


# --- refusals ------------------------------------------------------------------------------------


def _with_nan(shape=(6, 1, 8, 8)):
    x = torch.rand(shape, generator=gen(9))
    x.view(-1)[:2] = float("nan")
    return x


IMG, EYE = torch.rand(2, 1, 8, 8, generator=gen(10)), torch.eye(3)


@pytest.mark.parametrize("call, match", [
    (lambda: M.mmd(_with_nan(), torch.rand(6, 1, 8, 8)), "mmd x: samples contain 2 non-finite values"),
    (lambda: M.sliced_wasserstein(torch.rand(6, 64), _with_nan()), "sliced_wasserstein y: samples contain 2"),
    (lambda: M.frechet_distance(_with_nan((6, 3)), torch.rand(6, 3)), "frechet_distance feats_a: samples contain"),
    (lambda: M.psnr(_with_nan(), torch.rand(6, 1, 8, 8)), "psnr x: samples contain 2 non-finite values"),
    (lambda: M.ssim(IMG, torch.full_like(IMG, math.inf)), "ssim y: samples contain 128 non-finite values"),
    (lambda: M.memorisation_rate(IMG, IMG, math.nan), "threshold must be a number > 0"),
    (lambda: M.memorisation_rate(IMG, IMG, -1.0), "threshold must be a number > 0"),
    *[(lambda b=b: M.mmd(IMG, IMG, bandwidths=[b]), "bandwidths must be finite and positive")
      for b in (math.nan, math.inf, -1.0)],
    (lambda: M.psnr(IMG, IMG, data_range=0), "psnr: data_range must be a number > 0"),
    (lambda: M.psnr(IMG, IMG, data_range=-2), "psnr: data_range must be a number > 0"),
    (lambda: M.ssim(IMG, IMG, data_range=0), "ssim: data_range must be a number > 0"),
    (lambda: M.ssim(IMG, IMG, sigma=0), "ssim: sigma must be a number > 0"),
    (lambda: M.psnr(IMG[:0], IMG[:0]), "psnr: expected a non-empty batch"),
    (lambda: M.ssim(IMG[:0], IMG[:0]), "ssim: expected a non-empty batch"),
    (lambda: M.gaussian_frechet(torch.zeros(3), -EYE, torch.zeros(3), EYE), "cov1 must be a symmetric positive"),
    (lambda: M.gaussian_frechet(torch.zeros(3), EYE, torch.zeros(3), EYE + 0.5 * EYE.roll(1, 1)),  # asymmetric
     "cov2 must be a symmetric positive"),
    (lambda: M.gaussian_frechet(torch.tensor(0.0), EYE, torch.tensor(0.0), EYE), r"expected mu \(D,\)"),
    (lambda: M.class_histogram(torch.tensor([0.9, 1.7]), 3), "labels must be integers"),
])
def test_metrics_refuse_meaningless_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_metrics_accept_integral_float_labels_and_rank_deficient_covariances():
    torch.testing.assert_close(M.class_histogram(torch.tensor([0.0, 2.0]), 3),
                               torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    few = torch.randn(4, 16, generator=gen(11))  # 4 points in 16-D: a singular covariance
    assert M.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)


# --- digits classifier ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_classifier(tmp_path_factory):
    """Train a small-budget classifier once into a temporary cache and load it from there."""
    from condiff import classifier as C

    cache = tmp_path_factory.mktemp("condiff_cache")
    threads = torch.get_num_threads()
    # Tiny convolutions gain nothing from a second thread and slow down badly on a busy machine.
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
            mp.setenv("CONDIFF_CACHE", str(cache))
            net = C.load_digits_classifier(steps=300)
    finally:
        torch.set_num_threads(threads)
    return net, cache / "digits_classifier"


def test_classifier_heldout_accuracy(cached_classifier):
    from condiff import classifier as C
    from condiff.classifier import digits_accuracy

    net, path = cached_classifier
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["steps"] == 300 and cfg["net"]["name"] == "digits_cnn"
    assert cfg["recipe"] == C.RECIPE
    assert cfg["heldout_accuracy"] == pytest.approx(digits_accuracy(net))
    assert cfg["heldout_accuracy"] >= 0.95
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))


def test_load_digits_classifier_reuses_cache(cached_classifier, monkeypatch):
    from condiff import classifier as C

    net, path = cached_classifier
    monkeypatch.setenv("CONDIFF_CACHE", str(path.parent))

    def fail(*a, **k):
        raise AssertionError("retrained although a cached classifier exists")

    monkeypatch.setattr(C, "train_digits_classifier", fail)
    again = C.load_digits_classifier()
    x = C._digits("test")[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)
    with pytest.raises(C.io.CheckpointError, match="no digits classifier"):
        C.load_digits_classifier(path / "missing", train_if_missing=False)
    assert C.default_classifier_path(3) == path.parent / "digits_classifier_seed3"


def test_stale_classifier_cache_is_not_used(cached_classifier, tmp_path):
    from condiff import classifier as C

    net, _ = cached_classifier
    stale = tmp_path / "stale"
    C.io.save_module(stale, net, {"format": C.FORMAT, "recipe": C.RECIPE - 1, "net": net.config})
    with pytest.raises(C.io.CheckpointError, match="recipe"):
        C.load_digits_classifier(stale, train_if_missing=False)


def test_digits_judge(cached_classifier):
    from condiff.classifier import DigitsJudge, _digits

    judge = DigitsJudge(cached_classifier[0])
    x_test, _ = _digits("test")
    r = judge.evaluate(x_test)
    assert r["n"] == len(x_test) and len(r["class_hist"]) == 10
    assert r["mean_top_prob"] > 0.9
    assert r["tv_to_uniform"] < 0.05  # the test split is stratified
    assert r["frechet_to_test"] == pytest.approx(0.0, abs=1e-6)
    x4 = x_test[:4]
    for labels, got in ((torch.tensor([0, 1]), r"\(2,\) torch.int64"), (torch.full((4,), 1.7), r"\(4,\) torch.float32"),
                        ([0, 1, 2, 3], "list")):  # two labels for four images returned two values, 1.7 became 1
        with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(4,\), got " + got):
            judge.log_prob(x4, labels)
    assert judge.log_prob(x4, torch.tensor([0, 1, 2, 3])).shape == (4,)
    assert r["frechet_train_vs_test"] == judge.frechet_train_vs_test > 0
    blank = judge.evaluate(-torch.ones(16, 1, 8, 8))  # one image, repeated: a single class
    assert blank["tv_to_uniform"] == pytest.approx(0.9)
    assert blank["frechet_to_test"] > r["frechet_train_vs_test"]
    assert judge.probs(x_test[:4]).sum(1).allclose(torch.ones(4))
    assert judge.features(x_test[:4]).shape == (4, cached_classifier[0].config["feature_dim"])
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        judge.features(torch.zeros(2, 64))


# --- toy2d evaluator ------------------------------------------------------------------------------


def test_toy2d_eval_splits_samples_into_sets_and_scores_fresh_data_near_one(monkeypatch):
    import condiff.evaluate as E
    from condiff.data import load_dataset

    cfg = {"name": "toy2d", "kind": "gmm"}
    # fresh draws of the data distribution (the train split: independent of the held-out test draws)
    fresh = load_dataset("toy2d", "train", kind="gmm", n=900).x
    m = E.evaluate_samples(fresh, cfg)
    assert (m["mmd_n"], m["mmd_sample_sets"]) == (900, 1)
    monkeypatch.setattr(E, "TOY2D_SET_SIZE", 300)
    m = E.evaluate_samples(fresh[:-1], cfg)  # 899 points: two whole sets of 300, the rest unused
    assert (m["mmd_n"], m["mmd_sample_sets"]) == (300, 2)
    assert 0.5 < m["mmd_ratio"] < 2.0
    assert m["targets"] == {"mmd_ratio<=2": True} and "targets_not_judged" not in m  # judged at its stated n
    with pytest.warns(UserWarning, match="cannot judge a model"):
        assert E.evaluate_samples(fresh[:299], cfg)["targets"] == {}
    # a model that drops half the modes is far off
    angle = torch.atan2(fresh[:, 1], fresh[:, 0])
    assert E.evaluate_samples(fresh[(angle > -0.3) & (angle < 2.8)], cfg)["mmd_ratio"] > 10


def test_small_closed_forms_of_the_helpers():
    # pairwise distances of 0, 1, 3 are 1, 2, 3 (self-distances excluded): median 2
    assert M.median_heuristic(torch.tensor([[0.0], [1.0], [3.0]])) == 2.0
    train = torch.randn(6, 3, generator=gen(0))
    assert M.memorisation_rate(train[:5], train, 1e-6) == 1.0  # exact copies are closer than any threshold > 0
    assert M.memorisation_rate(train[:5] + 1.0, train, 1e-6) == 0.0
    s = M.constraint_stats(torch.tensor([1e-3, 0.0, 0.5, 2.0]), tol=1e-3)
    assert s["frac_below_tol"] == 0.25 and s["max"] == 2.0  # "< tol": the value at tol is a violation
    assert s["mean"] == pytest.approx((1e-3 + 2.5) / 4) and s["median"] == pytest.approx(1e-3)  # torch: the lower


def test_toy2d_evaluation_averages_over_pairs_and_uses_every_sample_set(monkeypatch):
    """Two sample sets of n: the first exact data, the second shifted by +5. Each reference pair i scores
    set i mod 2, and the reported MMD is the mean over the pairs of mmd_with_reference (recomputed here).
    Set size and pair count cut to 200 and 4 to keep the test fast."""
    from condiff import evaluate
    from condiff.data import load_dataset
    from condiff.evaluate import mmd_with_reference, toy2d_eval

    n, pairs = 200, 4
    monkeypatch.setattr(evaluate, "TOY2D_SET_SIZE", n)
    monkeypatch.setattr(evaluate, "TOY2D_REFERENCE_PAIRS", pairs)
    good = load_dataset("toy2d", "train", kind="moons", n=n).x
    samples = torch.cat([good, good + 5.0])
    out = toy2d_eval(samples, {"name": "toy2d", "kind": "moons"})
    held = load_dataset("toy2d", "test", kind="moons", n=2 * pairs * n).x.view(pairs, 2, n, 2)
    parts = [mmd_with_reference(samples[(i % 2) * n:(i % 2 + 1) * n], held[i, 0], held[i, 1]) for i in range(pairs)]
    assert out["mmd_sample_sets"] == 2 and out["mmd_n"] == n
    assert out["mmd"] == pytest.approx(sum(p["mmd"] for p in parts) / pairs, rel=1e-9)
    alone = toy2d_eval(good, {"name": "toy2d", "kind": "moons"})
    assert out["mmd_ratio"] > 10 * alone["mmd_ratio"]  # the shifted set is scored, not skipped


def test_numeric_arguments_are_checked_in_one_line_and_one_bandwidth_is_a_list_of_one():
    x, y = torch.randn(6, 3, generator=gen(1)), torch.randn(5, 3, generator=gen(2))
    assert M.mmd(x, y, bandwidths=1.5) == M.mmd(x, y, bandwidths=[1.5]) == M.mmd(x, y, bandwidths=torch.tensor(1.5))
    with pytest.raises(ValueError, match="bandwidths must be finite and positive"):
        M.mmd(x, y, bandwidths=float("nan"))
    with pytest.raises(ValueError, match="n_proj must be an integer >= 1, got 2.5"):
        M.sliced_wasserstein(x, y, n_proj=2.5)
    with pytest.raises(ValueError, match="win_size must be an integer >= 1, got 3.5"):
        M.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), win_size=3.5)
    assert float(M.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), win_size=3.0)) == 1.0
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 2.5"):
        M.class_histogram(torch.tensor([0, 1]), 2.5)


def test_median_heuristic_is_shift_invariant_far_from_the_origin():
    """Centred first: at an offset of 1e8 (float64) the squared distances no longer cancel to 0."""
    x = torch.randn(50, 3, generator=gen(3), dtype=torch.float64)
    assert M.median_heuristic(x + 1e8) == pytest.approx(M.median_heuristic(x), rel=1e-6)


def test_ssim_refuses_a_filter_far_wider_than_the_image():
    x = torch.zeros(1, 1, 8, 8)
    assert torch.isfinite(M.ssim(x, x, sigma=9.0)).all()  # radius 32: wider than the image, still computed
    with pytest.raises(ValueError, match="ssim: sigma 1e\\+06 gives a filter of 7000001 taps, far wider than the 8x8"):
        M.ssim(x, x, sigma=1e6)


def test_metrics_take_numpy_samples_and_name_other_inputs():
    g = gen(5)
    a, b = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    assert M.mmd(a.numpy(), b.numpy()) == M.mmd(a, b)
    assert M.mmd(a.numpy().astype(">f8"), b.numpy()) == M.mmd(a, b)  # big-endian arrays too
    im, other = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    assert torch.equal(M.psnr(im.numpy(), other.numpy()), M.psnr(im, other))
    assert torch.equal(M.ssim(im.numpy(), other.numpy()), M.ssim(im, other))
    with pytest.raises(TypeError, match=r"expected a tensor or NumPy array of samples \(N, ...\), got list"):
        M.mmd([[1.0, 2.0]], b)


def test_evaluate_samples_names_a_batch_too_small_to_score():
    from condiff.evaluate import evaluate_samples

    with pytest.raises(ValueError, match=r"needs a batch of at least 2 samples \(N, ...\) to score, got \(1, 2\)"):
        evaluate_samples(torch.zeros(1, 2), {"name": "toy2d"})


@pytest.mark.parametrize("figures, met", [
    ({"mean_top_prob": 0.95, "tv_to_uniform": 0.05, "frechet_to_test": 3.0}, [True, True, True]),
    ({"mean_top_prob": 0.85, "tv_to_uniform": 0.2, "frechet_to_test": 9.0}, [False, False, False]),
])
def test_the_digits_targets_are_their_stated_comparisons(monkeypatch, figures, met):
    import condiff.classifier as clf
    import condiff.evaluate as E

    class Judge:  # the classifier's figures, fixed; Frechet of the training against the test split: 2
        frechet_train_vs_test = 2.0

        def evaluate(self, samples):
            return dict(figures)

    monkeypatch.setattr(clf, "DigitsJudge", Judge)
    monkeypatch.setattr(E, "mmd_with_reference", lambda *a: {})
    out = E.digits_eval(torch.zeros(4, 1, 8, 8), {"name": "digits"})
    assert out["frechet_ratio"] == figures["frechet_to_test"] / 2
    assert list(out["targets"].values()) == met and list(out["targets"]) == [
        "mean_top_prob>=0.9", "tv_to_uniform<=0.1", "frechet_ratio<=2"]


def test_generic_scoring_holds_out_the_test_split_and_refers_to_the_training_split(tmp_path):
    from condiff.evaluate import generic_reference

    rng = np.random.default_rng(0)
    train, test = ((0.3 * rng.normal(size=(n, 3))).astype(np.float32) for n in (12, 5))
    np.savez(tmp_path / "d.npz", x_train=train, x_test=test)
    held, reference, what = generic_reference({"name": str(tmp_path / "d.npz")})
    assert what == "test split"
    for got, want in ((held, test), (reference, train)):  # shuffled, whole
        assert torch.equal(got.sum(1).sort().values, torch.from_numpy(want).sum(1).sort().values)


with np.errstate(over="ignore"):  # (where long double is float64 the literal overflows to inf)
    _WIDE_LONGDOUBLE = bool(np.isfinite(np.longdouble("1e400")))


@pytest.mark.skipif(not _WIDE_LONGDOUBLE, reason="np.longdouble holds no finite 1e400 here")
def test_samples_beyond_float64_are_named_by_the_argument_that_holds_them():
    big, ok = np.full((2, 4), np.longdouble("1e400")), np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"^psnr y: values reach 1e\+400, beyond float64's range"):
        M.psnr(ok, big)


def test_median_heuristic_of_many_points_uses_the_first_thousand_or_a_seeded_draw():  # m53, m54 metrics.py:73-75
    from condiff import metrics as M

    g = torch.Generator().manual_seed(0)
    near, far = torch.randn(1000, 2, generator=g), 100 * torch.randn(500, 2, generator=g)
    x = torch.cat([near, far])
    assert M.median_heuristic(x) == M.median_heuristic(near)  # deterministic: the first 1000
    assert M.median_heuristic(x) < 5  # the far points, a third of the set, are left out
    a = M.median_heuristic(x, generator=torch.Generator().manual_seed(1))
    assert a == M.median_heuristic(x, generator=torch.Generator().manual_seed(1)) and a > 5  # a draw of all 1500


def test_classifier_augmentation_shifts_by_one_pixel_with_background_fill():  # m63, m64 classifier.py:50-51
    from condiff.classifier import _augment

    x = torch.rand(400, 1, 8, 8) * 2 - 1
    out = _augment(x, torch.Generator().manual_seed(0), noise_std=0.0)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    seen = set()
    for a, b in zip(padded, out):
        shifts = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(a[:, dy:dy + 8, dx:dx + 8], b)]
        assert shifts, "each image is the padded one cut at a shift of -1, 0 or +1 per axis"
        seen.add(shifts[0])
    assert seen == {(dy, dx) for dy in range(3) for dx in range(3)}  # all nine shifts are drawn


def test_mmd_with_reference_refuses_constant_data_unless_told_and_scores_the_reference_on_held_out_data():
    from condiff.evaluate import mmd_with_reference

    g = torch.Generator().manual_seed(1)
    s, a, b = torch.randn(50, 2, generator=g) + 3, torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    with pytest.raises(ValueError, match="all identical"):  # without constant_ok, as before
        mmd_with_reference(s, torch.zeros(50, 2), b)
    with pytest.raises(ValueError, match="^median_heuristic: expected a non-empty"):  # named by the first look
        mmd_with_reference(s[:0], a, b)
    out = mmd_with_reference(s, a, b)
    assert out["sliced_w2_ref"] == M.sliced_wasserstein(b, a, generator=torch.Generator().manual_seed(0))
    assert out["sliced_w2"] > 5 * out["sliced_w2_ref"]


def test_ratio_interval_covers_the_true_reduction_and_narrows_as_one_over_root_n():
    # exponential distances with means 0.4 and 0.1: the true reduction is 4
    g = torch.Generator().manual_seed(3)

    def draw(n, mean):
        return -mean * torch.rand(n, generator=g, dtype=torch.float64).log()

    hits, widths = 0, []
    for i in range(100):
        lo, hi = M.ratio_interval(draw(256, 0.4), draw(256, 0.1), draws=1000, seed=i)
        hits += lo <= 4.0 <= hi
        widths.append(hi - lo)
    assert 80 <= hits <= 97  # a 90% interval, to within the spread of 100 trials
    lo, hi = M.ratio_interval(draw(4096, 0.4), draw(4096, 0.1), draws=1000)
    assert 3.0 < float(np.median(widths)) / (hi - lo) < 5.3  # 16x the samples: about a quarter the width


def test_ratio_interval_is_exact_for_constants_seeded_and_refuses_bad_input():
    assert M.ratio_interval(torch.full((7,), 2.0), torch.full((5,), 0.5)) == (4.0, 4.0)
    a, b = torch.rand(50, generator=torch.Generator().manual_seed(0)), torch.rand(40) + 0.1
    assert M.ratio_interval(a, b, seed=5) == M.ratio_interval(a.numpy(), b, seed=5)
    assert M.ratio_interval(a, b, seed=5) != M.ratio_interval(a, b, seed=6)
    lo, hi = M.ratio_interval(a, torch.tensor([0.0, 0.0, 1.0]))  # some resamples hold only zeros
    assert math.isfinite(lo) and hi == math.inf
    for kw, msg in [({"level": 1.0}, "level"), ({"draws": 10}, "draws"), ({"draws": 1000.5}, "draws"),
                    ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=msg):
            M.ratio_interval(a, b, **kw)
    with pytest.raises(ValueError, match="non-negative"):
        M.ratio_interval(a, -b)
    with pytest.raises(ValueError, match="values: no values"):
        M.ratio_interval(a, torch.zeros(0))
    with pytest.raises(ValueError, match="baseline: samples contain 1 non-finite"):
        M.ratio_interval(torch.tensor([1.0, math.nan]), b)
