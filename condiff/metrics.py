"""Evaluation metrics: sample-set distances, memorisation, image quality and constraint statistics.

Every function is pure: tensors in, Python floats (scalar summaries) or tensors (per-sample values)
out. Inputs of shape ``(N, ...)`` are flattened to ``(N, D)`` where a metric compares sample sets.
Computations run in float64 on the inputs' device; pairwise quantities are built in row chunks so
that 5000 x 5000 comparisons stay within a few hundred MB.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import checks
from .data import native

CHUNK = 1024  # rows per block of a pairwise-distance matrix
MEDIAN_SUBSAMPLE = 1000  # points used by the median heuristic
DEFAULT_BANDWIDTH_SCALES = (0.5, 1.0, 2.0)
PSD_RTOL = 1e-4  # covariances may be asymmetric or have negative eigenvalues by this much of max |entry|


def _check_finite(x: torch.Tensor, name: str) -> None:
    """NaN or inf in the input would come out as a NaN metric (or a linalg failure): refuse it."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name}: samples contain {bad} non-finite values")


def _tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Samples as a tensor: a NumPy array is taken as it is (its values unscaled, in native byte order)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(native(x, name)))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or NumPy array of samples (N, ...), got {type(x).__name__}")
    return x


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    x = _tensor(x, name)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, ...) tensor, got shape {tuple(x.shape)}")
    _check_finite(x, name)
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _pair_dims(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples must have the same size per item, got {x.shape[1]} and {y.shape[1]}")


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Na, D), (Nb, D) float64 -> (Na, Nb) squared Euclidean distances, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


# --- kernel two-sample distances -----------------------------------------------------------------


def median_heuristic(x: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """Median pairwise Euclidean distance of ``x`` (N, ...), on at most 1000 random points (the lower
    of the two middle values for an even number of pairs, as ``torch.median`` takes it).

    Without a generator the first 1000 points are used, so the result is deterministic.
    """
    x = _flat(x, "median_heuristic")
    if x.shape[0] > MEDIAN_SUBSAMPLE:
        if generator is None:
            x = x[:MEDIAN_SUBSAMPLE]
        else:
            idx = torch.randperm(x.shape[0], generator=generator)[:MEDIAN_SUBSAMPLE]
            x = x[idx.to(x.device)]
    n = x.shape[0]
    if n < 2:
        raise ValueError("median_heuristic needs at least 2 points")
    x = x - x.mean(0)  # distances are shift-invariant; centring avoids cancellation in _sq_dists
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    d = _sq_dists(x, x)[iu[0], iu[1]].sqrt()
    return float(d.median())


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gammas: torch.Tensor) -> float:
    """Sum over all pairs of sum_k exp(-gamma_k |a_i - b_j|^2), in row chunks."""
    total = 0.0
    for i in range(0, a.shape[0], CHUNK):
        d = _sq_dists(a[i : i + CHUNK], b)
        for g in gammas.tolist():
            total += float(torch.exp(-g * d).sum())
    return total


def default_bandwidths(y: torch.Tensor, median: float | None = None) -> list[float]:
    """RBF length scales ``m * DEFAULT_BANDWIDTH_SCALES`` with ``m`` the median distance within ``y`` (``median``,
    where the caller has it: :func:`median_heuristic` of ``y``)."""
    med = median_heuristic(y) if median is None else median
    if med == 0.0:
        raise ValueError("mmd: the reference samples are all identical, so they set no kernel bandwidth "
                         "(a constant data set?); the library's mmd() takes bandwidths= explicitly")
    return [med * s for s in DEFAULT_BANDWIDTH_SCALES]


def mmd(
    x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] | None = None, biased: bool = False
) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy MMD^2(x, y).

    Args:
        x: (N, ...) samples, e.g. generated.
        y: (M, ...) samples, e.g. the reference data; N, M >= 2; trailing dims are flattened.
        bandwidths: RBF length scales ``s``; the kernel is ``sum_s exp(-|a - b|^2 / (2 s^2))``.
            Default: :func:`default_bandwidths` of ``y``, ``m * (0.5, 1, 2)`` with ``m`` the median
            pairwise distance of ``y`` (the reference; first 1000 points). Taking ``m`` from ``y``
            alone keeps the kernel the same when several sample sets are compared with one
            reference, so their MMDs are comparable; it also makes the default asymmetric in (x, y).

    Returns:
        The U-statistic (Gretton et al. 2012, eq. 3): means over i != j within each set, minus twice
        the mean over all cross pairs. It is unbiased, so it can be slightly negative when x and y
        come from one distribution; its scale is that of the kernel sum (at most ``2 * len(bandwidths)``).
        With ``biased=True``, the V-statistic (eq. 5, diagonals kept): non-negative, with a floor of
        order 1/N + 1/M for one distribution, useful for "as close as another real sample" ratios.
    """
    x, y = _flat(x, "mmd x"), _flat(y, "mmd y")
    _pair_dims(x, y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples in each set, got {n} and {m}")
    if bandwidths is None:
        bandwidths = default_bandwidths(y)
    if isinstance(bandwidths, numbers.Real) or getattr(bandwidths, "ndim", 1) == 0:  # one length scale
        bandwidths = [float(bandwidths)]
    s = torch.as_tensor(list(bandwidths), dtype=torch.float64)
    if s.numel() == 0 or not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError(f"mmd: bandwidths must be finite and positive, got {s.tolist()}")
    gammas = 1.0 / (2.0 * s**2)
    k = len(gammas)
    center = y.mean(0)  # distances are shift-invariant; centring avoids cancellation in _sq_dists
    x, y = x - center, y - center
    if biased:  # V-statistic: keeps the diagonal, so it is >= 0 with a floor of order 1/n
        kxx, kyy = _kernel_sum(x, x, gammas) / n**2, _kernel_sum(y, y, gammas) / m**2
    else:  # k(a, a) = k for every a, so the diagonal terms are removed exactly
        kxx = (_kernel_sum(x, x, gammas) - n * k) / (n * (n - 1))
        kyy = (_kernel_sum(y, y, gammas) - m * k) / (m * (m - 1))
    kxy = _kernel_sum(x, y, gammas) / (n * m)
    return kxx + kyy - 2.0 * kxy


# --- sliced Wasserstein --------------------------------------------------------------------------


def _w2_sq_1d_sorted(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Exact squared W2 between empirical measures, per row: (P, N), (P, M) sorted -> (P,).

    The quantile functions are step functions with breaks at i/N and j/M; on each interval
    between consecutive breaks both are constant, so W2^2 = sum_k |interval_k| (qx - qy)^2.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return ((xs - ys) ** 2).mean(1)
    dev = xs.device
    breaks = torch.cat(
        [
            torch.arange(1, n + 1, device=dev, dtype=torch.float64) / n,
            torch.arange(1, m + 1, device=dev, dtype=torch.float64) / m,
        ]
    )
    breaks = torch.unique(torch.cat([breaks.new_zeros(1), breaks]))  # sorted, from 0 to 1
    widths = breaks[1:] - breaks[:-1]
    mids = 0.5 * (breaks[1:] + breaks[:-1])
    ix = (mids * n).long().clamp_max(n - 1)
    iy = (mids * m).long().clamp_max(m - 1)
    return (((xs[:, ix] - ys[:, iy]) ** 2) * widths).sum(1)


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, n_proj: int = 128, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance ``SW_2(x, y) = sqrt(mean_theta W_2^2(<theta, x>, <theta, y>))``.

    Args:
        x: (N, ...) samples; y: (M, ...) samples, N and M may differ (trailing dims flattened).
        n_proj: number of random directions theta, uniform on the unit sphere.
        generator: CPU generator for the directions (fresh default randomness when None).

    The 1-D distances are exact for the empirical measures: equal sizes pair sorted values, unequal
    sizes integrate the difference of the two quantile step functions. In 1-D every direction is
    +-1 and the result is the exact W2 distance.
    """
    x, y = _flat(x, "sliced_wasserstein x"), _flat(y, "sliced_wasserstein y")
    _pair_dims(x, y)
    n_proj = checks.integer("sliced_wasserstein: n_proj", n_proj, 1)
    theta = torch.randn(x.shape[1], n_proj, generator=generator, dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    xs = (x @ theta).T.sort(dim=1).values
    ys = (y @ theta).T.sort(dim=1).values
    return math.sqrt(float(_w2_sq_1d_sorted(xs, ys).mean()))


# --- nearest neighbours and memorisation ---------------------------------------------------------


def nn_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from each row of ``a`` (Na, ...) to its nearest row of ``b`` (Nb, ...).

    Returns a (Na,) float64 tensor. Computed in chunks of ``a`` so memory is O(CHUNK * Nb).
    """
    a, b = _flat(a, "nn_distances a"), _flat(b, "nn_distances b")
    _pair_dims(a, b)
    center = b.mean(0)
    a, b = a - center, b - center
    out = [_sq_dists(a[i : i + CHUNK], b).min(1).values for i in range(0, a.shape[0], CHUNK)]
    return torch.cat(out).sqrt()


def memorisation_rate(samples: torch.Tensor, train: torch.Tensor, threshold: float) -> float:
    """Fraction of ``samples`` (N, ...) whose nearest ``train`` example (L2, flattened) is closer
    than ``threshold`` (finite, > 0: at 0 not even exact copies count). Calibrate it with
    :func:`calibrate_memorisation_threshold`."""
    checks.number("memorisation_rate: threshold", threshold, "> 0")
    return float((nn_distances(samples, train) < threshold).double().mean())


def calibrate_memorisation_threshold(
    heldout: torch.Tensor, train: torch.Tensor, quantile: float = 0.05
) -> float:
    """Distance below which only ``quantile`` of held-out examples lie from their nearest training
    example: a fresh sample that is not a copy falls under it with probability about ``quantile``."""
    quantile = checks.number("quantile", quantile, "[0, 1]")
    out = float(torch.quantile(nn_distances(heldout, train), quantile))
    if out <= 0:
        raise ValueError(f"the held-out examples hold copies of training examples (the {quantile} quantile of their "
                         "distances to the training set is 0), so no threshold separates copies: calibrate on "
                         "held-out data disjoint from the training set")
    return out


# --- image quality -------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str, data_range: float) -> None:
    """Two non-empty, finite image batches of one shape, and a positive ``data_range``."""
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    _check_finite(x, f"{name} x")
    _check_finite(y, f"{name} y")
    checks.number(f"{name}: data_range", data_range, "> 0")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample, ``10 log10(data_range^2 / MSE)``.

    Args: x, y: (B, ...) images; the MSE averages all non-batch dims (channels included).
    Returns: (B,) float64 tensor in dB; ``inf`` where x == y. ``data_range`` 2 suits [-1, 1] data.
    """
    x, y = _tensor(x, "psnr x"), _tensor(y, "psnr y")
    _check_pair(x, y, "psnr", data_range)
    mse = ((x.double() - y.double()) ** 2).reshape(x.shape[0], -1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices padding a length-n axis by ``pad`` with scipy's 'reflect' rule (d c b a | a b c d),
    repeating the reflection when pad > n."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _gaussian_filter(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) matching scipy.ndimage.gaussian_filter(mode='reflect')."""
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = x.shape
    x = x[:, :, _symmetric_index(h, radius, x.device)][:, :, :, _symmetric_index(w, radius, x.device)]
    x = x.reshape(b * c, 1, h + 2 * radius, w + 2 * radius)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return x.reshape(b, c, h, w)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    sigma: float = 1.5,
    win_size: int | None = None,
) -> torch.Tensor:
    """Structural similarity per sample (Wang et al. 2004), Gaussian-weighted, channels averaged.

    Args:
        x, y: (B, C, H, W) images.
        data_range: max - min of the data (2 for [-1, 1]).
        sigma: std of the Gaussian weights; the filter is truncated at ``3.5 sigma`` (11 taps for 1.5).
        win_size: odd side of the border crop; the mean SSIM is taken over pixels at least
            ``(win_size - 1) // 2`` from the border. Default: the filter width ``2 r + 1`` with
            ``r = int(3.5 sigma + 0.5)``, shrunk to the largest odd number <= min(H, W) for small
            images (7 for 8x8 digits).

    Returns: (B,) float64. Equals ``skimage.metrics.structural_similarity(..., data_range=data_range,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False, win_size=win_size,
    channel_axis=0)`` per image (K1 = 0.01, K2 = 0.03, reflect padding).
    """
    x, y = _tensor(x, "ssim x"), _tensor(y, "ssim y")
    _check_pair(x, y, "ssim", data_range)
    if x.ndim != 4:
        raise ValueError(f"ssim: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    checks.number("ssim: sigma", sigma, "> 0")
    h, w = x.shape[-2:]
    radius = int(3.5 * sigma + 0.5)
    if radius > 4 * max(h, w):  # the padded image would be (2 radius)^2 pixels: refuse before allocating it
        raise ValueError(f"ssim: sigma {sigma:g} gives a filter of {2 * radius + 1} taps, far wider than the "
                         f"{h}x{w} images")
    if win_size is None:
        side = min(h, w)
        win_size = min(2 * radius + 1, side if side % 2 == 1 else side - 1)
    win_size = checks.integer("ssim: win_size", win_size, 1)
    if win_size % 2 == 0 or win_size > min(h, w):
        raise ValueError(f"ssim: win_size must be odd and <= min(H, W) = {min(h, w)}, got {win_size}")
    x, y = x.double(), y.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda z: _gaussian_filter(z, sigma, radius)
    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    p = (win_size - 1) // 2
    return s[:, :, p : h - p, p : w - p].mean(dim=(1, 2, 3))


# --- feature statistics --------------------------------------------------------------------------


def gaussian_frechet(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet (W2^2) distance between N(mu1, cov1) and N(mu2, cov2):
    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))``.

    The trace of the matrix square root is computed as ``tr((s1 cov2 s1)^(1/2))`` with
    ``s1 = cov1^(1/2)``: both roots are of symmetric PSD matrices, taken by eigendecomposition with
    eigenvalues clamped at 0, so no complex parts arise (unlike ``scipy.linalg.sqrtm(cov1 @ cov2)``).
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    d = mu1.shape[0] if mu1.ndim == 1 else 0
    if d == 0 or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"gaussian_frechet: expected mu (D,), cov (D, D); got {tuple(mu1.shape)}, "
            f"{tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}"
        )
    for t, name in ((mu1, "mu1"), (cov1, "cov1"), (mu2, "mu2"), (cov2, "cov2")):
        _check_finite(t, f"gaussian_frechet {name}")
    _check_psd(cov1, "cov1")
    _check_psd(cov2, "cov2")
    s1 = _psd_sqrt(cov1)
    tr_sqrt = _psd_eigvals(s1 @ cov2 @ s1).sqrt().sum()
    fd = ((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * tr_sqrt
    return max(float(fd), 0.0)


def _check_psd(c: torch.Tensor, name: str) -> None:
    """``c`` must be symmetric positive semi-definite up to ``PSD_RTOL`` (relative to max |entry|)."""
    tol = PSD_RTOL * float(c.abs().max())
    asym, low = float((c - c.T).abs().max()), float(torch.linalg.eigvalsh(0.5 * (c + c.T)).min())
    if asym > tol or low < -tol:
        raise ValueError(f"gaussian_frechet: {name} must be a symmetric positive semi-definite covariance, "
                         f"got asymmetry {asym:.3g} and smallest eigenvalue {low:.3g}")


def _psd_eigvals(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(0.5 * (a + a.T)).clamp_min(0.0)


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(0.5 * (a + a.T))
    return (vecs * vals.clamp_min(0.0).sqrt()) @ vecs.T


def mean_cov(feats: torch.Tensor, name: str = "mean_cov") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64 (N >= 2)."""
    f = _flat(feats, name)
    if f.shape[0] < 2:
        raise ValueError("mean_cov needs at least 2 feature vectors")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to feature sets
    (Na, D) and (Nb, D), as in FID. Biased upward for small N: compare values at equal set sizes."""
    return gaussian_frechet(*mean_cov(feats_a, "frechet_distance feats_a"),
                            *mean_cov(feats_b, "frechet_distance feats_b"))


# --- class statistics ----------------------------------------------------------------------------


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) integer labels in [0, num_classes) -> (num_classes,) float64 class frequencies (sum 1)."""
    num_classes = checks.integer("class_histogram: num_classes", num_classes, 1)
    labels = labels.reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_histogram: no labels")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        bad = labels[labels != labels.round()]
        raise ValueError(f"class_histogram: labels must be integers, got {bad.numel()} values like {bad[0].item():g}")
    if bool((labels < 0).any() or (labels >= num_classes).any()):
        raise ValueError(
            f"class_histogram: labels must lie in [0, {num_classes}), got "
            f"[{labels.min().item():g}, {labels.max().item():g}]"
        )
    labels = labels.long()
    return torch.bincount(labels, minlength=num_classes).double() / labels.numel()


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance ``0.5 * sum |p - q|`` between two probability vectors (K,)."""
    if p.shape != q.shape:
        raise ValueError(f"tv_distance: shapes differ, {tuple(p.shape)} vs {tuple(q.shape)}")
    return 0.5 * float((p.double() - q.double()).abs().sum())


# --- constraint statistics -----------------------------------------------------------------------


def constraint_stats(values: torch.Tensor, tol: float = 1e-3) -> dict[str, float]:
    """Summary of constraint distances ``l(x) >= 0``, one per sample.

    Args:
        values: (B,) tensor of constraint distances.
        tol: a sample counts as satisfying the constraint when its value is < tol.

    Returns: dict with ``n``, ``mean``, ``median``, ``std``, ``max``, ``q90`` and ``frac_below_tol``
    (and ``tol``). NaN values count as violations and propagate into the moments, so they show up.
    """
    v = values.detach().reshape(-1).double()
    if v.numel() == 0:
        raise ValueError("constraint_stats: no values")
    ok = v < tol  # NaN < tol is False
    return {
        "n": int(v.numel()),
        "mean": float(v.mean()),
        "median": float(v.median()) if not bool(v.isnan().any()) else math.nan,
        "std": float(v.std()) if v.numel() > 1 else 0.0,
        "max": float(v.max()),
        "q90": float(torch.quantile(v, 0.9)),
        "frac_below_tol": float(ok.double().mean()),
        "tol": float(tol),
    }


def ratio_interval(
    baseline: torch.Tensor, values: torch.Tensor, level: float = 0.9, draws: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(baseline) / mean(values)`` (a reduction factor).

    The two sets are resampled independently (they are separate draws, e.g. vanilla and mirror-model
    samples); ``level`` is the interval's coverage. Seeded, so the same inputs give the same interval.
    A resampled ``values`` with mean 0 gives an infinite ratio, which sits at the upper end.
    """
    level = checks.number("level", level, "(0, 1)")
    draws = checks.integer("draws", draws, 100)
    seed = checks.seed("seed", seed)
    a = _values_1d(baseline, "baseline")
    b = _values_1d(values, "values")
    if bool((a < 0).any()) or bool((b < 0).any()):
        raise ValueError("ratio_interval: expected non-negative values (constraint distances)")
    g = torch.Generator().manual_seed(seed)
    ma = a[torch.randint(len(a), (draws, len(a)), generator=g)].mean(1)
    mb = b[torch.randint(len(b), (draws, len(b)), generator=g)].mean(1)
    r = torch.where(mb > 0, ma / mb.clamp_min(1e-300), torch.full_like(ma, math.inf)).sort().values
    lo = r[int(math.floor((1 - level) / 2 * (draws - 1)))]
    hi = r[int(math.ceil((1 + level) / 2 * (draws - 1)))]
    return float(lo), float(hi)


def _values_1d(x: torch.Tensor, name: str) -> torch.Tensor:
    """Per-sample values as a finite, non-empty float64 vector on the CPU."""
    x = _tensor(x, name).detach().reshape(-1).to("cpu", torch.float64)
    if x.numel() == 0:
        raise ValueError(f"{name}: no values")
    _check_finite(x, name)
    return x
