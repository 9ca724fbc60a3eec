"""Generated data sets: each satisfies its constraint to its stated tolerance; seeding, caching, errors."""

import math

import numpy as np
import pytest
import torch

from condiff.constraints import BurgersResidual, DivergenceFree, build_constraint
from condiff.data import DATASETS, DataError, load_dataset
from condiff.data.physics import kolmogorov_trajectories, periodic_gp_1d
from condiff.data.sources import PEAK_THRESHOLD, count_sources, count_split, render_sources, stray_brightness

TINY = {
    "burgers": {"size": 16, "n_train": 8, "n_test": 4},
    "kolmogorov": {
        "size": 8,
        "n_train": 6,
        "n_test": 3,
        "sim_size": 16,
        "spinup": 0.4,
        "interval": 0.2,
        "per_trajectory": 3,
        "dt": 0.02,
    },
    "brightness": {"size": 16, "n_train": 12, "n_test": 4},
    "periodic": {"size": 16, "n_train": 8, "n_test": 4},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_generator_satisfies_its_constraint(name):
    d = load_dataset(name, "all", **TINY[name])
    con = build_constraint(d.meta["constraint"])
    dist = con(d.x)
    assert len(d) == TINY[name]["n_train"] + TINY[name]["n_test"]
    assert float(dist.max()) <= d.meta["tolerance"], f"{name}: max l = {float(dist.max())}"
    assert float(d.x.abs().max()) < 3.0  # scaled to about [-1, 1]
    # the constraint is not trivially zero: a perturbation of the data violates it
    noisy = d.x + 0.05 * torch.randn(d.x.shape, generator=torch.Generator().manual_seed(0))
    assert float(con(noisy).min()) > 10 * max(d.meta["tolerance"], 1e-6)


def test_count_data_have_exactly_k_separated_sources():
    d = load_dataset("count", "train", size=16, n_train=10, n_test=2, k=4)
    centres = torch.as_tensor(d.meta["centres"])
    assert centres.shape == (10, 4, 2)
    gaps = torch.cdist(centres, centres) + 1e9 * torch.eye(4)
    assert float(gaps.min()) >= 4.0
    # each source is bright near its centre, above the peak finder's cut, which finds exactly 4
    for img, pts in zip(d.x[:, 0], centres):
        for r, c in pts.tolist():
            i, j = int(r), int(c)
            patch = img[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            assert (float(patch.max()) + 1) / 2 > PEAK_THRESHOLD
    assert count_sources(d.x).tolist() == [4] * 10
    assert d.subset([0, 3]).meta["centres"].shape == (2, 4, 2)


@pytest.mark.slow
def test_counting_cnn_counts_the_count_data():
    from condiff.constraints import CountConstraint

    con = CountConstraint(k=4, size=16)
    d = load_dataset("count", "test", size=16, n_train=10, n_test=200, k=4)
    dist = con(d.x)
    assert float(dist.mean()) < 0.25 and float(dist.max()) < d.meta["tolerance"] + 0.5


def test_seeding_splits_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    kw = TINY["burgers"]
    a = load_dataset("burgers", "train", **kw)
    files = list((tmp_path / "data").glob("burgers-*.npz"))
    assert len(files) == 1
    b = load_dataset("burgers", "train", **kw)  # from the cache
    assert torch.equal(a.x, b.x)
    files[0].unlink()
    c = load_dataset("burgers", "train", **kw)  # regenerated: the same data
    assert torch.equal(a.x, c.x)
    test = load_dataset("burgers", "test", **kw)
    assert not torch.equal(a.x[:4], test.x)
    other = load_dataset("burgers", "train", **{**kw, "seed": 1})
    assert not torch.equal(a.x, other.x)


def test_burgers_initial_conditions_are_min_max_normalised_periodic_gp():
    g = torch.Generator().manual_seed(0)
    u = periodic_gp_1d(2000, 32, 0.2, 1.5, g)
    assert abs(float(u.mean())) < 0.05 * float(u.std())
    # stationarity on the circle: the covariance depends only on the lag, also across the seam
    cov1 = float((u[:, 0] * u[:, 1]).mean())
    cov_seam = float((u[:, -1] * u[:, 0]).mean())
    assert cov_seam == pytest.approx(cov1, rel=0.15)
    d = load_dataset("burgers", "train", **TINY["burgers"])
    first = d.x[:, 0, 0]
    assert torch.allclose(first.amax(1), torch.ones(len(d)), atol=1e-6)
    assert torch.allclose(first.amin(1), -torch.ones(len(d)), atol=1e-6)
    assert d.meta["constraint"]["length"] == pytest.approx(10.0 * 16 / 64)


def test_kolmogorov_solver_velocities_are_solenoidal_and_forced():
    v = kolmogorov_trajectories(
        2, 4, 32, 16, seed=0, re=1000.0, drag=0.1, kf=4, dt=0.02, spinup=1.0, interval=0.2
    ).float()
    assert v.shape == (2, 4, 2, 16, 16) and bool(torch.isfinite(v).all())
    con = DivergenceFree()
    assert float(con(v.flatten(0, 1)).max()) < 1e-5 * float(v.abs().max())
    # the Kolmogorov forcing sin(4 y) drives u: the mean of u over x correlates with sin(4 y)
    y = torch.arange(16) * 2 * math.pi / 16
    profile, forcing = v[:, -1, 0].mean((0, 2)), torch.sin(4 * y)
    assert float(torch.dot(profile, forcing) / (profile.norm() * forcing.norm())) > 0.4  # measured 0.62


def test_kolmogorov_time_step_follows_the_grid():
    """dt defaults to 0.02 on the 64^2 grid (unchanged cache keys for 32x32 data) and halves with
    the spacing: 0.02 blew up on the 128^2 grid behind 64x64 data."""
    short = {"n_train": 1, "n_test": 1, "per_trajectory": 1, "spinup": 0.04, "interval": 0.04}
    assert load_dataset("kolmogorov", "train", size=32, **short).meta["generator"]["dt"] == 0.02
    assert load_dataset("kolmogorov", "train", size=64, **short).meta["generator"]["dt"] == 0.01
    assert load_dataset("kolmogorov", "train", size=16, dt=0.05, **short).meta["generator"]["dt"] == 0.05


def test_brightness_and_periodic_structure():
    d = load_dataset("brightness", "train", size=16, n_train=30, n_test=2)
    flux = d.meta["constraint"]["flux"]
    assert flux == pytest.approx(120 * (16 / 64) ** 2)
    assert torch.allclose(((d.x + 1) / 2).flatten(1).sum(1), torch.full((30,), flux), atol=1e-3)
    p = load_dataset("periodic", "train", size=16, n_train=8, n_test=2)
    assert set(p.x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(p.x, torch.roll(p.x, (8, 8), (2, 3)))  # 2x2 tiling = periodic with half the size


def test_render_sources_counts():
    x, centres = render_sources(torch.tensor([0, 2, 5]), 16, torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and [len(c) for c in centres] == [0, 2, 5]
    for seed in range(5):  # without background noise the peak finder sees every source, and only them
        x, centres = render_sources(torch.tensor([0, 2, 5, 9]), 16, torch.Generator().manual_seed(seed), noise=0.0)
        assert count_sources(x).tolist() == [0, 2, 5, 9]
        peaks = (x == torch.nn.functional.max_pool2d(x, 3, 1, 1)) & ((x + 1) / 2 > PEAK_THRESHOLD)
        for img, pts in zip(peaks[:, 0], centres):  # each peak within a pixel of a centre
            rc = img.nonzero().double()
            assert len(pts) == 0 or float(torch.cdist(rc, pts.double() - 0.5).min(1).values.max()) <= 1.0


def test_peak_finder_counts_sources_and_ignores_faint_blobs():
    counts = torch.arange(9).repeat(8)
    g = torch.Generator().manual_seed(1)
    x, _ = render_sources(counts, 16, g)
    # a faint source centred between pixels can sink under the cut in noise: allow 1 in 50
    assert (count_sources(x) == counts).float().mean() >= 0.98
    # faint blobs (peaks below FAINT_MAX < PEAK_THRESHOLD) and noisier backgrounds are not sources
    xf, _ = render_sources(counts, 16, g, faint=1.0)
    assert not torch.equal(xf, x)
    # where two faint blobs, or a faint blob and noise, stack up, the cut is crossed (2% at this seed)
    assert (count_sources(xf) == counts).float().mean() >= 0.95
    with pytest.raises(ValueError, match="expects images"):
        count_sources(torch.zeros(2, 16, 16))


def test_count_split_separates_whole_source_errors_from_fractional_readings():
    # noise-free renders, so the peak finder is exact; a distance we choose per image
    x, _ = render_sources(torch.tensor([4, 3, 4, 5, 4]), 16, torch.Generator().manual_seed(2), noise=0.0)
    dist = torch.tensor([0.1, 1.0, 0.3, 2.0, 0.2])
    s = count_split(x, dist, 4)
    assert s["exact_k"] == pytest.approx(0.6)
    assert s["l_exact_k"] == pytest.approx(0.2) and s["l_other_k"] == pytest.approx(1.5)
    # the overall mean is the share-weighted mix of the two groups
    assert float(dist.mean()) == pytest.approx(0.6 * s["l_exact_k"] + 0.4 * s["l_other_k"])
    # an empty group has no mean (None, which JSON writes as null), not NaN
    assert count_split(x[[0, 2]], dist[[0, 2]], 4)["l_other_k"] is None
    assert count_split(x[[1]], dist[[1]], 4) == {"exact_k": 0.0, "l_exact_k": None, "l_other_k": 1.0, "stray": 0.0}


def test_stray_brightness_is_the_share_of_brightness_away_from_every_peak():
    # renders of the data (noise-free) keep nearly all their brightness within 2 px of a peak (the widest
    # sources' tails reach a little past it: up to 4% here), under the 10% that count_split counts
    x, _ = render_sources(torch.arange(9), 16, torch.Generator().manual_seed(3), noise=0.0)
    assert float(stray_brightness(x).max()) < 0.05
    # a peak of intensity 1 and, 8 px away, a pixel of 0.3 (under the peak cut, over the 0.2 floor)
    i = torch.zeros(3, 1, 16, 16)
    i[:, 0, 2, 2] = 1.0
    i[:, 0, 10, 10] = 0.3
    i[1, 0, 4, 4] = 0.3  # within 2 px of the peak (2.83 > 2: not) ...
    i[2, 0, 3, 4] = 0.3  # ... and this one (2.24 > 2: not either); (2, 4) would be
    s = stray_brightness(2 * i - 1)
    assert s.tolist() == pytest.approx([0.1 / 0.9, 0.2 / 1.0, 0.2 / 1.0])
    i[0, 0, 2, 4] = 0.3  # 2 px from the peak: near it
    assert float(stray_brightness(2 * i[:1] - 1)) == pytest.approx(0.1 / 1.0)
    assert float(stray_brightness(torch.full((1, 1, 8, 8), -0.4))) == 1.0  # bright (0.3) and no peak: all stray
    assert count_split(2 * i - 1, torch.zeros(3), 1)["stray"] == pytest.approx(1.0)  # all three over 10%
    with pytest.raises(ValueError, match="stray_brightness expects images"):
        stray_brightness(torch.zeros(2, 16, 16))


@pytest.mark.parametrize("name", ["burgers", "kolmogorov", "brightness", "periodic", "count"])
def test_bad_settings_give_one_line_errors(name):
    assert name in DATASETS
    with pytest.raises(DataError, match="size must be an even integer"):
        load_dataset(name, "train", size=15)
    with pytest.raises(DataError, match="n_train must be an integer >= 1, got 0"):
        load_dataset(name, "train", size=16, n_train=0)
    with pytest.raises(DataError, match="unknown split") as err:
        load_dataset(name, "valid", size=16)
    assert "\n" not in str(err.value)


def test_burgers_residual_of_data_is_float_round_off():
    d = load_dataset("burgers", "train", **TINY["burgers"])
    con = BurgersResidual(**{k: v for k, v in d.meta["constraint"].items() if k != "name"})
    r = con.residual(d.x.double())
    assert float(r.abs().max()) < 1e-6
    assert np.isfinite(d.x.numpy()).all()


# --- pinned details (mutation review) ------------------------------------------------------------------


def test_burgers_samples_have_one_row_per_time_step():
    from condiff.data.physics import burgers_samples

    kw = dict(nu=0.05, length=2.5, dt=0.025, substeps=5, ic_length=0.2, ic_smoothness=1.5, shift=1.0, scale=0.5)
    x = torch.from_numpy(burgers_samples(3, 16, seed=0, **kw))
    assert x.shape == (3, 1, 16, 16)
    con = BurgersResidual(nu=0.05, length=2.5, dt=0.025, substeps=5, shift=1.0, scale=0.5)
    # each row is the stepper applied to the row above it (float32 storage)
    assert torch.allclose(con.step(x[:, 0, :-1].double()).float(), x[:, 0, 1:], atol=1e-6)


def test_periodic_gp_1d_spectrum_is_the_matern_spectrum():
    """``u = irfft(c sqrt(S))`` with standard complex normal ``c``: ``E |rfft(u)_k|^2 = 2 S(k)`` for
    ``0 < k < N/2``, ``S(k) = (2 nu / length^2 + (2 pi k)^2)^-(nu + 1/2)``."""
    nu, length = 1.5, 0.2
    u = periodic_gp_1d(4000, 32, length, nu, torch.Generator().manual_seed(0))
    power = torch.fft.rfft(u).abs().pow(2).mean(0)
    k = torch.arange(17, dtype=torch.float64)
    spec = (2 * nu / length**2 + (2 * math.pi * k) ** 2) ** (-(nu + 0.5))
    assert float(spec[1] / spec[2]) == pytest.approx(4.139, abs=1e-3)
    assert float(power[1] / power[2]) == pytest.approx(float(spec[1] / spec[2]), rel=0.1)  # measured 4.31
    torch.testing.assert_close(power[1:8] / (2 * spec[1:8]), torch.ones(7, dtype=torch.float64), atol=0.08, rtol=0)
    assert float(power[0]) < 1e-20 and float(power[16]) < 1e-20  # no mean, no Nyquist mode


def test_vorticity_rhs_is_minus_the_advection_closed_form():
    """``w = cos y + cos 2x``: ``psi = cos y + cos(2x) / 4`` (``-lap psi = w``), ``u = psi_y = -sin y``,
    ``v = -psi_x = sin(2x) / 2``, so ``u w_x + v w_y = 2 sin y sin 2x - sin y sin(2x) / 2``; without
    viscosity, drag or forcing ``w_t = -1.5 sin(2x) sin y``."""
    from condiff.data.physics import _Spectral

    n = 16
    sp = _Spectral(n)
    grid = torch.arange(n, dtype=torch.float32) * 2 * math.pi / n
    y, x = grid[:, None], grid[None, :]  # rows are y, columns x
    w = torch.cos(y) + torch.cos(2 * x)
    w_hat = torch.fft.rfft2(w)[None]
    rhs = sp.rhs(w_hat, 1e12, 0.0, torch.zeros_like(w_hat))
    got = torch.fft.irfft2(rhs, s=(n, n))[0]
    torch.testing.assert_close(got, -1.5 * torch.sin(2 * x) * torch.sin(y).expand(n, n), atol=1e-5, rtol=0)


def test_brightness_kinds_include_blobs_about_a_third_of_the_time():
    """A blob's brightest pixel sits at its flux centroid (measured within 0.026); a ring's or crescent's
    lies on the ring, at least 0.07 from it. Kinds are drawn uniformly from three."""
    from condiff.data.procedural import brightness_images

    n, size = 600, 32
    img = (torch.from_numpy(brightness_images(n, size, 30.0, 3))[:, 0].double() + 1) / 2
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5
    w = img / img.sum((1, 2), keepdim=True)
    cy, cx = (w.sum(2) * c).sum(1), (w.sum(1) * c).sum(1)
    peak = img.flatten(1).argmax(1)
    dist = ((c[peak // size] - cy) ** 2 + (c[peak % size] - cx) ** 2).sqrt()
    assert float(((dist > 0.03) & (dist < 0.07)).double().mean()) == 0.0  # the two groups are well apart
    assert 0.25 < float((dist < 0.03).double().mean()) < 0.42  # measured 0.317


def test_periodic_gp_2d_covariance_is_the_product_periodic_kernel():
    """The empirical circular covariance of the draws against ``k(dy) k(dx)``,
    ``k(d) = exp(-2 sin^2(pi d / p) / length^2)`` (unit variance at lag 0)."""
    from condiff.data.procedural import periodic_gp_2d

    size, length = 16, 0.8
    z = periodic_gp_2d(2000, size, length, torch.Generator().manual_seed(0))
    cov = torch.fft.ifft2(torch.fft.fft2(z).abs().pow(2)).real.mean(0) / size**2  # lags (dy, dx)
    d = torch.arange(size, dtype=torch.float64)
    k = torch.exp(-2 * torch.sin(math.pi * d / size) ** 2 / length**2)
    torch.testing.assert_close(cov, k[:, None] * k[None, :], atol=0.03, rtol=0)  # measured max error 0.0064
    assert float(k[4] - torch.exp(-2 * torch.sin(math.pi * d[4] / size) ** 2 / length)) < -0.07  # length^2


def test_periodic_images_threshold_the_tile_at_mid_range():
    """The tile is min-max normalised and cut at 0.5; a symmetric GP gives half the pixels at +1 on average."""
    from condiff.data.procedural import periodic_gp_2d, periodic_images

    x = torch.from_numpy(periodic_images(200, 16, 0.8, 5))
    tile = periodic_gp_2d(200, 8, 0.8, torch.Generator().manual_seed(5))  # the same first draw
    lo, hi = tile.amin((1, 2), keepdim=True), tile.amax((1, 2), keepdim=True)
    expect = torch.where((tile - lo) / (hi - lo) > 0.5, 1.0, -1.0).float()
    assert torch.equal(x[:, 0, :8, :8], expect)
    assert 0.45 < float((x > 0).double().mean()) < 0.55


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_data_is_measured_in_float32(dtype):
    """Every constraint measures a half-precision batch in float32 and returns float32 distances: the
    Burgers stepper run in bfloat16 read an exact trajectory at 6.7e-3, above a vanilla DM's violation."""
    for name in ("burgers", "brightness", "periodic", "kolmogorov"):
        d = load_dataset(name, "train", **TINY[name])
        con = build_constraint(d.meta["constraint"])
        x = d.x[:8]
        half = x.to(dtype)
        got = con(half)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, con(half.float()), rtol=0, atol=0)  # the rounded data, measured in float32


def test_train_and_test_splits_of_one_size_differ(tmp_path, monkeypatch):
    """The test split's seed is derived from its own name: splits of equal size were compared only as prefixes."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    kw = {"size": 16, "n_train": 4, "n_test": 4}
    assert not torch.equal(load_dataset("periodic", "train", **kw).x, load_dataset("periodic", "test", **kw).x)


@pytest.mark.parametrize("name", [*sorted(TINY), "count"])
def test_every_generator_setting_is_in_the_cache_key(name):
    """A setting left out of the key (the data's meta["generator"]) reads data made with another value from the
    cache: a flow of another drag, brightness of another flux."""
    import inspect

    kw = TINY.get(name, {"size": 16, "n_train": 2, "n_test": 1, "k": 2})
    meta = load_dataset(name, "train", **kw).meta["generator"]
    settings = set(inspect.signature(DATASETS[name]).parameters) - {"split", "n_train", "n_test", "seed"}
    assert settings <= set(meta), settings - set(meta)


def test_a_shear_mode_decays_by_viscosity_and_drag_alone():
    """``w = cos 2y`` carries no advection, so without forcing ``w_t = -(k^2 / Re + drag) w`` with k = 2."""
    from condiff.data.physics import _Spectral

    sp = _Spectral(32)
    y = torch.arange(32) * 2 * math.pi / 32
    w_hat = torch.fft.rfft2(torch.cos(2 * y)[:, None].expand(32, 32))
    torch.testing.assert_close(sp.rhs(w_hat, 100.0, 0.1, torch.zeros_like(w_hat)), -(4 / 100 + 0.1) * w_hat,
                               atol=1e-3, rtol=0)


def test_sources_keep_their_margin_and_the_noise_level_spans_its_range():
    from condiff.data.sources import MARGIN

    g = torch.Generator().manual_seed(0)
    _, centres = render_sources(torch.full((100,), 8), 16, g)
    c = torch.cat(centres)
    assert float(c.min()) >= MARGIN and float(c.max()) <= 16 - MARGIN
    x, _ = render_sources(torch.zeros(300, dtype=torch.long), 32, g, noise=(0.03, 0.1))  # noise alone
    sd = ((x + 1) / 2).flatten(1).std(1)
    assert float(sd.min()) > 0.03 * 0.9 and float(sd.max()) < 0.1 * 1.1
    assert float(sd.min()) < 0.04 and float(sd.max()) > 0.09  # drawn across the range, not at one end


def test_brightness_flux_of_every_pixel_at_one_is_refused():  # m40 data/procedural.py:69
    from condiff.data.procedural import load_brightness

    with pytest.raises(DataError, match=r"flux must lie in \(0, size\^2 = 64\)"):
        load_brightness(size=8, flux=64, n_train=2, n_test=2)


def test_a_flux_that_pushes_pixels_far_out_of_range_is_said(tmp_path, monkeypatch):
    """flux = 120 at 32x32 (the paper's value at 64x64) made pixels up to 6 without a word, while the docs said
    the images lie in [-1, 1]; the default flux keeps them near it (about 1.16) and says nothing."""
    import warnings

    from condiff.data.procedural import load_brightness

    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match=r"brightness: at flux 30 on 8x8 the brightest pixels reach [0-9.]+, far"):
        load_brightness("train", size=8, flux=30, n_train=8, n_test=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = load_brightness("train", size=8, n_train=8, n_test=2).x
    assert float(x.max()) < 1.3
