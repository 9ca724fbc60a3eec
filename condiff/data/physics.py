"""Physics data sets for constrained diffusion: Burgers' space-time images and Kolmogorov flow.

``burgers``: 1D viscous Burgers' equation on a periodic domain (Feng et al., ICLR 2025). Initial
conditions are draws of a periodic Gaussian process with a Matérn spectrum (length ``ic_length`` in
units of the domain, smoothness ``ic_smoothness``), min-max normalised to ``[shift - scale, shift +
scale]`` (``[0.5, 1.5]``: mean about 1), then advanced with :func:`condiff.constraints.burgers_step`,
the very stepper the ``burgers`` constraint uses. A sample is ``(1, T, N)`` with ``T = N = size``,
time running down the rows, in image units ``(u - shift) / scale``; the one-step residual of the
data is below ``1e-5`` (float32 round-off).

``kolmogorov``: 2D incompressible Navier-Stokes on ``[0, 2 pi)^2`` in vorticity form,
``w_t + u . grad w = (1/Re) lap w - drag w - kf cos(kf y)`` (Kolmogorov forcing ``sin(kf y)`` on
``u``), pseudo-spectral with 2/3 dealiasing and RK4 on a ``sim_size`` grid (default
``max(2 size, 64)``), spun up from random vorticity. Velocities ``u = d psi / dy``,
``v = -d psi / dx`` are spectrally truncated to the ``size`` grid (no Nyquist modes) and divided by
``velocity_scale``. Snapshots are ``interval``
time units apart; a sample stacks ``frames`` consecutive snapshots as channels ``(u1, v1, u2, ...)``.
Their spectral divergence (the ``divergence_free`` constraint) is below ``1e-5``.

Both are seeded (train and test from different seeds, so held-out data are independent
trajectories) and cached in ``io.cache_dir()/data``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from condiff import checks
from condiff.constraints import BurgersResidual, DivergenceFree
from condiff.constraints.burgers import rk4
from condiff.data import ArrayData, DataError, check_split, derive_seed, register_dataset
from condiff.data.cache import cached_arrays
from condiff.determinism import one_thread

DATA_VERSION = 1
DTYPE = torch.float32  # float32 halves the solver time; divergence-freeness is exact per mode anyway


def _sizes(split: str, n_train: int, n_test: int, source: str) -> list[tuple[str, int]]:
    check_split(split, source=source)
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if not checks.is_integer(n, 1):  # 2.5 failed inside torch.randn; a bool was taken for 1
            raise DataError(f"{source}: {name} must be an integer >= 1, got {n!r}")
    n_train, n_test = int(n_train), int(n_test)
    parts = {"train": [("train", n_train)], "test": [("test", n_test)]}
    return parts.get(split, [("train", n_train), ("test", n_test)])


def _cached_splits(
    source: str, params: dict, split: str, n_train: int, n_test: int, seed: int, make: Callable
) -> dict[str, np.ndarray]:
    """The arrays of ``split`` ("train", "test" or both, train first), each part made by
    ``make(n, seed)`` with its own derived seed and cached under ``params``; concatenated per key."""
    if not checks.is_integer(seed):  # 1.5 and True were read as 1 (any whole number is hashed: derive_seed)
        raise DataError(f"{source}: seed must be an integer, got {seed!r}")
    parts = []
    for part, n in _sizes(split, n_train, n_test, source):
        s = derive_seed(seed, source, part)
        parts.append(cached_arrays(source, {**params, "n": n, "seed": s}, lambda n=n, s=s: make(n, s)))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _even_size(size: int, source: str, minimum: int = 8, name: str = "size") -> int:
    if not checks.is_integer(size, minimum) or int(size) % 2:  # 8.9 was read as 8
        raise DataError(f"{source}: {name} must be an even integer >= {minimum}, got {size!r}")
    return int(size)


# --- Burgers ----------------------------------------------------------------------------------


def periodic_gp_1d(n: int, points: int, length: float, smoothness: float, g: torch.Generator) -> Tensor:
    """``(n, points)`` draws of a zero-mean periodic GP on ``[0, 1)`` with a Matérn spectrum
    ``S(k) ~ (2 nu / length^2 + (2 pi k)^2)^-(nu + 1/2)`` (random Fourier series; float64)."""
    k = torch.arange(points // 2 + 1, dtype=torch.float64)
    spec = (2 * smoothness / length**2 + (2 * math.pi * k) ** 2) ** (-(smoothness + 0.5))
    spec[0] = 0.0  # the mean is set by the normalisation
    if points % 2 == 0:
        spec[-1] = 0.0  # a Nyquist mode is not a proper sinusoid
    coef = torch.complex(
        torch.randn(n, len(k), generator=g, dtype=torch.float64),
        torch.randn(n, len(k), generator=g, dtype=torch.float64),
    )
    return torch.fft.irfft(coef * spec.sqrt(), n=points)


def burgers_samples(
    n: int,
    size: int,
    seed: int,
    nu: float,
    length: float,
    dt: float,
    substeps: int,
    ic_length: float,
    ic_smoothness: float,
    shift: float,
    scale: float,
) -> np.ndarray:
    """``(n, 1, size, size)`` float32 space-time images (rows = time) in image units."""
    g = torch.Generator().manual_seed(seed)
    u0 = periodic_gp_1d(n, size, ic_length, ic_smoothness, g)
    lo, hi = u0.min(1, keepdim=True).values, u0.max(1, keepdim=True).values
    x = 2 * (u0 - lo) / (hi - lo) - 1  # min-max normalised: image units in [-1, 1]
    con = BurgersResidual(nu, length, dt, substeps, shift, scale)
    rows = [x]
    for _ in range(size - 1):
        rows.append(con.step(rows[-1]))
    return torch.stack(rows, 1)[:, None].float().numpy()


def load_burgers(
    split: str = "train",
    size: int = 32,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    nu: float = 0.05,
    length: float | None = None,
    dt: float = 0.025,
    substeps: int = 5,
    ic_length: float = 0.2,
    ic_smoothness: float = 1.5,
    shift: float = 1.0,
    scale: float = 0.5,
) -> ArrayData:
    """Burgers' space-time images ``(N, 1, size, size)``; see the module docstring.

    ``length`` defaults to ``10 * size / 64``: the grid spacing of the paper's 64-point domain
    ``[0, 10)``, which keeps the central differences resolving the fronts at every ``size``.
    """
    size = _even_size(size, "burgers")
    length = 10.0 * size / 64 if length is None else float(length)
    con = BurgersResidual(nu, length, dt, substeps, shift, scale)
    params = {
        "size": size,
        "nu": nu,
        "length": length,
        "dt": dt,
        "substeps": substeps,
        "ic_length": ic_length,
        "ic_smoothness": ic_smoothness,
        "shift": shift,
        "scale": scale,
        "v": DATA_VERSION,
    }
    solver = {k: v for k, v in params.items() if k != "v"}
    x = _cached_splits(
        "burgers", params, split, n_train, n_test, seed, lambda n, s: {"x": burgers_samples(n, seed=s, **solver)}
    )["x"]
    return ArrayData(
        x,
        name="burgers",
        meta={"split": split, "constraint": con.config, "tolerance": 1e-5, "generator": params},
    )


# --- Kolmogorov flow ----------------------------------------------------------------------------


class _Spectral:
    """Wavenumbers, dealiasing mask and inverse Laplacian for an ``N x N`` grid on ``[0, 2 pi)^2``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.kx = torch.fft.rfftfreq(n, 1.0 / n, dtype=DTYPE)[None, :]
        self.ky = torch.fft.fftfreq(n, 1.0 / n, dtype=DTYPE)[:, None]
        k2 = self.kx**2 + self.ky**2
        self.k2 = k2
        self.inv_k2 = torch.where(k2 > 0, 1.0 / k2.clamp_min(1e-12), torch.zeros_like(k2))
        kmax = n // 3  # 2/3 rule
        self.dealias = ((self.kx.abs() <= kmax) & (self.ky.abs() <= kmax)).to(DTYPE)

    def velocity_hat(self, w_hat: Tensor) -> tuple[Tensor, Tensor]:
        psi = w_hat * self.inv_k2  # -lap psi = w
        return 1j * self.ky * psi, -1j * self.kx * psi

    def rhs(self, w_hat: Tensor, re: float, drag: float, force_hat: Tensor) -> Tensor:
        n = self.n
        u_hat, v_hat = self.velocity_hat(w_hat)
        u, v = torch.fft.irfft2(u_hat, s=(n, n)), torch.fft.irfft2(v_hat, s=(n, n))
        wx = torch.fft.irfft2(1j * self.kx * w_hat, s=(n, n))
        wy = torch.fft.irfft2(1j * self.ky * w_hat, s=(n, n))
        adv = torch.fft.rfft2(u * wx + v * wy) * self.dealias
        return -adv - (self.k2 / re + drag) * w_hat + force_hat


def kolmogorov_trajectories(
    n_traj: int,
    snapshots: int,
    sim_size: int,
    size: int,
    seed: int,
    re: float,
    drag: float,
    kf: int,
    dt: float,
    spinup: float,
    interval: float,
) -> Tensor:
    """``(n_traj, snapshots, 2, size, size)`` float64 velocities, ``interval`` time units apart."""
    sp = _Spectral(sim_size)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(sim_size, dtype=DTYPE) * 2 * math.pi / sim_size
    force = (-kf * torch.cos(kf * y))[:, None].expand(sim_size, sim_size)
    force_hat = torch.fft.rfft2(force) * sp.dealias
    # random large-scale initial vorticity (energy near |k| = kf)
    w0 = torch.randn(n_traj, sim_size, sim_size, generator=g, dtype=DTYPE)
    w_hat = torch.fft.rfft2(w0) * torch.exp(-((sp.k2.sqrt() - kf) ** 2) / 8) * sp.dealias
    w_hat = w_hat * (5.0 * sim_size**2 / w_hat.abs().pow(2).sum((1, 2), keepdim=True).sqrt().clamp_min(1e-12))

    def step(w: Tensor) -> Tensor:
        return rk4(lambda v: sp.rhs(v, re, drag, force_hat), w, dt)

    for _ in range(round(spinup / dt)):
        w_hat = step(w_hat)
    per = max(1, round(interval / dt))
    out = []
    for _ in range(snapshots):
        out.append(_coarse_velocity(sp, w_hat, size))
        for _ in range(per):
            w_hat = step(w_hat)
    if not bool(torch.isfinite(out[-1]).all()):
        raise DataError("kolmogorov: the solver blew up; lower dt or raise sim_size")
    return torch.stack(out, 1)


def _coarse_velocity(sp: _Spectral, w_hat: Tensor, size: int) -> Tensor:
    """Spectral truncation of the velocity to ``size x size`` (modes |k| < size/2): ``(B, 2, size, size)``."""
    u_hat, v_hat = sp.velocity_hat(w_hat)
    h = size // 2
    N = sp.n

    def crop(f: Tensor) -> Tensor:
        c = torch.zeros(f.shape[0], size, h + 1, dtype=f.dtype)
        c[:, :h, :h] = f[:, :h, :h]
        c[:, size - h + 1 :, :h] = f[:, N - h + 1 :, :h]  # negative ky, Nyquist row/column left at 0
        return torch.fft.irfft2(c * (size / N) ** 2, s=(size, size))

    return torch.stack([crop(u_hat), crop(v_hat)], 1)


def load_kolmogorov(
    split: str = "train",
    size: int = 32,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    frames: int = 1,
    sim_size: int | None = None,
    re: float = 1000.0,
    drag: float = 0.1,
    kf: int = 4,
    dt: float | None = None,
    spinup: float = 10.0,
    interval: float = 1.0,
    per_trajectory: int = 40,
    velocity_scale: float = 2.5,
) -> ArrayData:
    """Kolmogorov-flow velocity snapshots ``(N, 2 * frames, size, size)``; see the module docstring.

    ``per_trajectory``: samples cut from one trajectory (consecutive, non-overlapping windows).
    ``sim_size`` defaults to ``max(2 * size, 64)`` (Re 1000 is unstable on coarser grids); ``dt``
    to ``0.02 * 64 / sim_size`` (0.02 on the 64^2 grid): RK4's step limit for advection shrinks with
    the grid spacing, and 0.02 blew up on the 128^2 grid of 64x64 data.
    """
    size = _even_size(size, "kolmogorov")
    sim_size = _even_size(sim_size or max(2 * size, 64), "kolmogorov", name="sim_size")  # Re 1000 needs >= 64^2
    if sim_size < size:
        raise DataError(f"kolmogorov: sim_size ({sim_size}) must be >= size ({size})")
    dt = 0.02 * 64 / sim_size if dt is None else dt
    if int(frames) < 1 or int(per_trajectory) < 1:
        raise DataError(f"kolmogorov: frames and per_trajectory must be >= 1, got {frames}, {per_trajectory}")
    params = {
        "size": size,
        "frames": frames,
        "sim_size": sim_size,
        "re": re,
        "drag": drag,
        "kf": kf,
        "dt": dt,
        "spinup": spinup,
        "interval": interval,
        "per_trajectory": per_trajectory,
        "velocity_scale": velocity_scale,
        "v": DATA_VERSION,
    }

    @one_thread()  # a chaotic solver: the thread count's rounding would decide the cached flows
    def make(n: int, s: int) -> dict[str, np.ndarray]:
        n_traj = -(-n // per_trajectory)
        v = kolmogorov_trajectories(
            n_traj, per_trajectory * frames, sim_size, size, s, re, drag, kf, dt, spinup, interval
        )
        v = v.reshape(n_traj * per_trajectory, frames * 2, size, size)[:n] / velocity_scale
        return {"x": v.float().numpy()}

    return ArrayData(
        _cached_splits("kolmogorov", params, split, n_train, n_test, seed, make)["x"],
        name="kolmogorov",
        meta={"split": split, "constraint": DivergenceFree().config, "tolerance": 1e-5, "generator": params},
    )


register_dataset("burgers", load_burgers)
register_dataset("kolmogorov", load_kolmogorov)
