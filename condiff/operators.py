"""Measurement operators for inverse problems: ``y = A(x) + sigma_y * n``, ``n ~ N(0, I)``.

Every operator maps images ``(B, C, H, W)`` to measurements and carries its noise level
``sigma_y``. Linear operators also give the adjoint ``A_adjoint`` (``<A x, y> = <x, A^T y>``); all of
them join one conformance test (tests/test_operators.py: adjointness in float64, shapes, linearity,
determinism under a seed).

``op.loss(y)`` is the guidance loss of DPS's official code, ``x -> ||y - A(x)||_2`` per sample, a
callable ``(B, C, H, W) -> (B,)`` like every other objective in condiff (DESIGN.md), so any
differentiable callable of that shape can drive guidance instead (e.g. a classifier's
``-log p(label | x)``).

Operators hold no randomness of their own: random masks are drawn once, from an explicit
``torch.Generator``, when the operator is built, and ``measure`` takes a generator for the noise.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks


def _check_images(x: Tensor, who: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{who}: expected images of shape (B, C, H, W), got shape {tuple(x.shape)}")
    checks.floating(f"{who}: images", x)


def _check_measurement(y: Tensor, ax: Tensor, who: str) -> None:
    """``y`` must have exactly the shape of ``A(x)`` (no broadcasting over batch or channels)."""
    if y.shape != ax.shape:
        raise ValueError(f"{who}: y must have the shape of A(x), {tuple(ax.shape)}, got {tuple(y.shape)}")


class Operator(nn.Module):
    """Base class: subclasses implement :meth:`A`. ``op(x)`` is ``op.A(x)``.

    Args:
        sigma_y: standard deviation of the additive Gaussian measurement noise (>= 0).
    """

    linear: bool = False

    def __init__(self, sigma_y: float = 0.0) -> None:
        super().__init__()
        self.sigma_y = checks.number("sigma_y", sigma_y, ">= 0")

    def A(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} defines no forward model A(x): an Operator subclass "
                                  "implements A")

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A noisy measurement ``y = A(x) + sigma_y * n`` (noise only where something is measured)."""
        y = self.A(x)
        if self.sigma_y == 0:
            return y
        gdev = generator.device if generator is not None else y.device
        # drawn in float32 whatever y's dtype, as the samplers draw: a seed gives every precision the same noise
        n = torch.randn(y.shape, generator=generator, device=gdev).to(device=y.device, dtype=y.dtype)
        return y + self.sigma_y * self._noise_support(n)

    def _noise_support(self, n: Tensor) -> Tensor:
        """Noise restricted to the measured entries (all of them unless an operator masks)."""
        return n

    def observed(self, y: Tensor) -> Tensor:
        """``y`` with what the operator does not measure set to 0 (the identity unless an operator masks):
        a full camera frame with a mask, or NaN at missing pixels, counts only where it is measured."""
        return y

    def num_measurements(self, y: Tensor) -> Tensor:
        """``(B,)`` number of measured entries per sample (for RMS residuals)."""
        return torch.full((y.shape[0],), float(y[0].numel()) if len(y) else 0.0, device=y.device, dtype=torch.float64)

    def loss(self, y: Tensor) -> MeasurementLoss:
        """The guidance loss ``x -> ||y - A(x)||_2`` per sample, ``(B, ...) -> (B,)``, over what the
        operator measures (:meth:`observed`); refuses non-finite measured values."""
        return MeasurementLoss(self, y)

    def residual(self, x: Tensor, y: Tensor) -> Tensor:
        """``(B,)`` RMS measurement residual ``||y - A(x)|| / sqrt(m)``; about ``sigma_y`` for a
        reconstruction that explains the measurement exactly as well as the truth does (0 for a sample
        of which nothing is measured)."""
        ax = self.A(x)
        _check_measurement(y, ax, "residual")
        r = (self.observed(y) - ax).flatten(1).double()
        return r.norm(dim=1) / self.num_measurements(y).clamp_min(1).sqrt()  # nothing measured: 0, not 0/0

    def to_image(self, y: Tensor) -> Tensor:
        """A picture of a measurement in image space, for display (not a reconstruction)."""
        return y

    def select(self, idx: int | slice | Tensor) -> Operator:
        """The operator for a sub-batch (operators with per-sample state, e.g. masks, slice it); an int
        index selects a sub-batch of one sample, which keeps its batch dimension."""
        return self

    def describe(self) -> dict:
        """JSON-ready parameters (for metrics.json)."""
        return {"operator": type(self).__name__, "sigma_y": self.sigma_y}


class LinearOperator(Operator):
    """A linear operator: :meth:`A` and its adjoint :meth:`A_adjoint`."""

    linear = True

    def A_adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _batch_index(idx: int | slice | Tensor) -> slice | Tensor:
    """A sub-batch index that keeps the batch dimension: an int ``i`` becomes the batch of sample ``i``."""
    idx = checks.scalar(idx)  # a 0-d tensor or array as the number it holds
    if isinstance(idx, numbers.Integral) and not isinstance(idx, bool):  # int, numpy integers
        i = int(idx)
        return slice(i, i + 1 if i != -1 else None)
    return idx


@dataclass
class MeasurementLoss:
    """``x -> ||y - A(x)||_2`` per sample (the norm, not its square, as in DPS's official code).

    ``(B, ...) -> (B,)``; differentiable in ``x``.
    """

    op: Operator
    y: Tensor

    def __post_init__(self) -> None:
        self.y = self.op.observed(checks.floating("loss: the measurement y", self.y))
        if self.y.is_floating_point() and not bool(torch.isfinite(self.y).all()):
            bad = int((~torch.isfinite(self.y)).sum())
            raise ValueError(f"loss: y holds {bad} non-finite measured value(s) (NaN or inf where the operator "
                             "measures; a masked operator ignores what lies outside its mask)")

    def __call__(self, x: Tensor) -> Tensor:
        ax = self.op(x)
        _check_measurement(self.y, ax, "loss")
        return (self.y - ax).flatten(1).norm(dim=1)

    def select(self, idx: int | slice | Tensor) -> MeasurementLoss:
        return MeasurementLoss(self.op.select(idx), self.y[_batch_index(idx)])


# --- inpainting ----------------------------------------------------------------------------------


class Inpainting(LinearOperator):
    """``A(x) = m * x`` with a 0/1 mask ``m``: missing pixels read 0 (self-adjoint).

    Args:
        mask: ``(B or 1, 1 or C, H, W)`` tensor of 0/1 (1 = observed). A batch of 1 is shared by every
            image; a batch of ``B`` gives each image its own mask.
        sigma_y: measurement noise (added on observed pixels only).

    Build masks with :meth:`random` (each pixel missing with probability ``p_drop``) or :meth:`box`.
    """

    def __init__(self, mask: Tensor, sigma_y: float = 0.0, kind: str = "mask") -> None:
        super().__init__(sigma_y)
        if mask.dim() != 4:
            raise ValueError(f"Inpainting: mask must be (B, 1 or C, H, W), got shape {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("Inpainting: mask must hold only 0 and 1")
        self.register_buffer("mask", mask.float())
        self.kind = kind

    @classmethod
    def random(cls, shape: tuple[int, ...], p_drop: float, generator: torch.Generator | None = None,
               sigma_y: float = 0.0) -> Inpainting:
        """Each pixel (all channels together) missing with probability ``p_drop``, independently per
        image; ``shape`` is the image batch shape ``(B, C, H, W)``."""
        if not 0.0 <= p_drop < 1.0:
            raise ValueError(f"Inpainting.random: p_drop must lie in [0, 1), got {p_drop}")
        B, _, H, W = _shape4(shape, "Inpainting.random")
        u = torch.rand((B, 1, H, W), generator=generator)
        return cls((u >= p_drop).float(), sigma_y, kind=f"random(p_drop={p_drop:g})")

    @classmethod
    def box(cls, shape: tuple[int, ...], size: int | tuple[int, int],
            generator: torch.Generator | None = None, sigma_y: float = 0.0, margin: int = 0,
            center: bool = False) -> Inpainting:
        """A ``size`` box of missing pixels per image, at a random position at least ``margin`` pixels
        from the border (or centred with ``center=True``). The batch's rows are drawn first, then its
        columns, so an image's box depends on the batch size ``B`` as well as on ``generator`` (kept so
        that the recorded guidance benchmarks, drawn this way, can be rebuilt)."""
        B, _, H, W = _shape4(shape, "Inpainting.box")
        hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if len(hw) != 2 or not all(checks.is_integer(s, 1) for s in hw):
            raise ValueError(f"Inpainting.box: size must be an integer >= 1 or a pair of them, got {size!r}")
        h, w = (int(s) for s in hw)
        if not checks.is_integer(margin, 0):
            raise ValueError(f"Inpainting.box: margin must be an integer >= 0, got {margin!r}")
        margin = int(margin)
        if not (h <= H - 2 * margin and w <= W - 2 * margin):
            raise ValueError(f"Inpainting.box: box {h}x{w} with margin {margin} does not fit {H}x{W} images")
        mask = torch.ones(B, 1, H, W)
        if center:
            tops, lefts = [(H - h) // 2] * B, [(W - w) // 2] * B
        else:
            tops = torch.randint(margin, H - margin - h + 1, (B,), generator=generator).tolist()
            lefts = torch.randint(margin, W - margin - w + 1, (B,), generator=generator).tolist()
        for b, (i, j) in enumerate(zip(tops, lefts)):
            mask[b, :, i:i + h, j:j + w] = 0
        return cls(mask, sigma_y, kind=f"box({h}x{w})")

    def _mask_for(self, x: Tensor) -> Tensor:
        _check_images(x, "Inpainting")
        m = self.mask
        fits = m.shape[0] in (1, x.shape[0]) and m.shape[1] in (1, x.shape[1]) and m.shape[2:] == x.shape[2:]
        if not fits:
            raise ValueError(f"Inpainting: mask of shape {tuple(m.shape)} does not fit images of shape "
                             f"{tuple(x.shape)}")
        return m.to(device=x.device, dtype=x.dtype)

    def A(self, x: Tensor) -> Tensor:
        return self._mask_for(x) * x

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self._mask_for(y) * y

    def _noise_support(self, n: Tensor) -> Tensor:
        return self._mask_for(n) * n

    def observed(self, y: Tensor) -> Tensor:
        return torch.where(self._mask_for(y) > 0, y, torch.zeros((), dtype=y.dtype, device=y.device))

    def num_measurements(self, y: Tensor) -> Tensor:
        m = self._mask_for(y).expand(y.shape[0], y.shape[1], *y.shape[2:])
        return m.reshape(y.shape[0], -1).sum(1).double()

    def select(self, idx: int | slice | Tensor) -> Inpainting:
        if self.mask.shape[0] == 1:
            return self
        i = checks.scalar(idx)
        if isinstance(i, numbers.Integral) and not -self.mask.shape[0] <= i < self.mask.shape[0]:
            raise IndexError(f"Inpainting.select: sample {i} of a batch of {self.mask.shape[0]} masks")
        return Inpainting(self.mask[_batch_index(idx)], self.sigma_y, self.kind)

    def describe(self) -> dict:
        return {**super().describe(), "mask": self.kind, "observed": float(self.mask.mean())}


def _shape4(shape: tuple[int, ...], who: str) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"{who}: shape must be (B, C, H, W), got {tuple(shape)}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


# --- separable filters: blur and downsampling ----------------------------------------------------


def _reflect_index(n: int, lo: int, hi: int, device: torch.device | None = None) -> Tensor:
    """Source pixel of each entry of a length-``n`` axis reflect-padded by ``(lo, hi)``."""
    idx = torch.arange(-lo, n + hi, device=device).abs()
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx)


def _reflect_pad(x: Tensor, lo: int, hi: int, dim: int) -> Tensor:
    """Reflect-pad ``x`` along ``dim`` (edge not repeated: d c b | a b c d | c b a)."""
    return x.index_select(dim, _reflect_index(x.shape[dim], lo, hi, x.device))


def _reflect_pad_adjoint(y: Tensor, lo: int, hi: int, dim: int) -> Tensor:
    """Adjoint of :func:`_reflect_pad`: each padded entry adds back into the pixel it copied."""
    n = y.shape[dim] - lo - hi
    idx = _reflect_index(n, lo, hi, y.device)
    shape = list(y.shape)
    shape[dim] = n
    return y.new_zeros(shape).index_add_(dim, idx, y)


class ImageSizeError(ValueError):
    """Images a filter cannot take: too small for its kernel (``cause`` ``"kernel"``), or of sides its factor does
    not divide (``"factor"``), so that a caller can name the setting to change."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class SeparableFilter(LinearOperator):
    """Depthwise separable filtering with stride: reflect-pad, correlate rows and columns with the
    1-D ``kernel``, keep every ``stride``-th output. Blur (stride 1) and downsampling share it.

    Images up to ``MATRIX_MAX`` pixels a side use the operator's exact per-axis matrices,
    ``A(x) = M_H x M_W^T`` (padding, kernel and stride folded in; ``A^T(y) = M_H^T y M_W``): two small
    matrix products, about ten times cheaper than padding plus two one-channel convolutions at 16 px,
    which matters because guidance differentiates through ``A`` at every step. Larger images take the
    convolution path; both agree to rounding (tests/test_operators.py).

    Args:
        kernel: ``(L,)`` 1-D kernel; ``pad = (lo, hi)`` reflect padding per axis; ``stride`` >= 1.
    """

    MATRIX_MAX = 256

    def __init__(self, kernel: Tensor, stride: int = 1, pad: tuple[int, int] = (0, 0),
                 sigma_y: float = 0.0) -> None:
        super().__init__(sigma_y)
        if not isinstance(kernel, Tensor) or kernel.dim() != 1 or kernel.numel() == 0:
            what = f"shape {tuple(kernel.shape)}" if isinstance(kernel, Tensor) else type(kernel).__name__
            raise ValueError(f"SeparableFilter: kernel must be a non-empty 1-D tensor, got {what}")
        if not bool(torch.isfinite(kernel.double()).all()):
            raise ValueError("SeparableFilter: kernel must be finite")
        if not (hasattr(pad, "__len__") and len(pad) == 2):  # a tuple, a list, an array
            raise ValueError(f"SeparableFilter: pad must be two integers (lo, hi) >= 0, got {pad!r}")
        self.register_buffer("kernel", kernel.double())
        self.stride = checks.integer("SeparableFilter: stride", stride, 1)
        self.pad = tuple(checks.integer("SeparableFilter: pad", v, 0) for v in pad)
        self._matrices: dict[tuple, Tensor] = {}

    def _check(self, x: Tensor) -> None:
        _check_images(x, type(self).__name__)
        self._check_size(*x.shape[-2:])

    def _check_size(self, H: int, W: int, via: str = "") -> None:
        """Images ``H x W`` (``via``: how they were inferred) must be larger than the padding and the kernel."""
        lo, hi = self.pad
        if max(lo, hi) >= min(H, W) or min(H, W) + lo + hi < len(self.kernel):
            raise ImageSizeError(f"{type(self).__name__}: a kernel of {len(self.kernel)} taps with padding "
                                 f"{self.pad} needs images larger than {max(lo, hi, len(self.kernel) - lo - hi - 1)} "
                                 f"pixels, got {H}x{W}{via}", "kernel")
        if (H + lo + hi - len(self.kernel)) % self.stride or (W + lo + hi - len(self.kernel)) % self.stride:
            raise ImageSizeError(f"{type(self).__name__}: image size {H}x{W} is not divisible by the factor "
                                 f"{self.stride}", "factor")

    def _k(self, x: Tensor, axis: int) -> Tensor:
        k = self.kernel.to(device=x.device, dtype=x.dtype)
        return k.view(1, 1, -1, 1) if axis == 2 else k.view(1, 1, 1, -1)

    def axis_matrix(self, n: int, like: Tensor) -> Tensor:
        """The ``(out_size(n), n)`` matrix of the operator along one axis of length ``n`` (cached)."""
        key = (n, like.dtype, like.device)
        if key not in self._matrices:
            lo, hi = self.pad
            L, s, out = len(self.kernel), self.stride, self.out_size(n)
            src = _reflect_index(n, lo, hi)
            rows = torch.arange(out).repeat_interleave(L)
            taps = (torch.arange(out).view(-1, 1) * s + torch.arange(L)).flatten()
            M = torch.zeros(out, n, dtype=torch.float64)
            M.index_put_((rows, src[taps]), self.kernel.cpu().repeat(out), accumulate=True)
            self._matrices[key] = M.to(device=like.device, dtype=like.dtype)
        return self._matrices[key]

    def _use_matrices(self, H: int, W: int) -> bool:
        return max(H, W) <= self.MATRIX_MAX

    def A(self, x: Tensor) -> Tensor:
        self._check(x)
        B, C, H, W = x.shape
        if self._use_matrices(H, W):
            return self.axis_matrix(H, x) @ x @ self.axis_matrix(W, x).T
        lo, hi = self.pad
        z = _reflect_pad(_reflect_pad(x, lo, hi, 2), lo, hi, 3).reshape(B * C, 1, H + lo + hi, W + lo + hi)
        z = F.conv2d(z, self._k(x, 2), stride=(self.stride, 1))
        z = F.conv2d(z, self._k(x, 3), stride=(1, self.stride))
        return z.reshape(B, C, *z.shape[-2:])

    def out_size(self, n: int) -> int:
        return (n + sum(self.pad) - len(self.kernel)) // self.stride + 1

    def in_size(self, m: int) -> int:
        """The input length whose output has length ``m`` (``(m - 1) * stride + L - lo - hi``)."""
        return (m - 1) * self.stride + len(self.kernel) - sum(self.pad)

    def A_adjoint(self, y: Tensor) -> Tensor:
        _check_images(y, type(self).__name__)
        B, C, h, w = y.shape
        H, W = self.in_size(h), self.in_size(w)
        self._check_size(H, W, f" (the images a {h}x{w} measurement comes from)")
        if self._use_matrices(H, W):
            return self.axis_matrix(H, y).T @ y @ self.axis_matrix(W, y)
        L, s = len(self.kernel), self.stride
        lo, hi = self.pad
        # the padded size n + lo + hi satisfies (padded - L) = (out - 1) * s exactly (checked in A)
        Hp, Wp = (h - 1) * s + L, (w - 1) * s + L
        z = y.reshape(B * C, 1, h, w)
        z = F.conv_transpose2d(z, self._k(y, 3), stride=(1, s))
        z = F.conv_transpose2d(z, self._k(y, 2), stride=(s, 1))
        z = z.reshape(B, C, Hp, Wp)
        return _reflect_pad_adjoint(_reflect_pad_adjoint(z, lo, hi, 3), lo, hi, 2)

    def describe(self) -> dict:
        return {**super().describe(), "kernel_size": len(self.kernel), "stride": self.stride}


class GaussianBlur(SeparableFilter):
    """Gaussian blur with an odd ``size`` and standard deviation ``sigma`` (pixels), reflect borders."""

    def __init__(self, size: int = 7, sigma: float = 1.0, sigma_y: float = 0.0) -> None:
        if not checks.is_integer(size, 1) or size % 2 == 0:
            raise ValueError(f"GaussianBlur: size must be a positive odd integer, got {size!r}")
        size = int(size)
        checks.number("GaussianBlur: sigma", sigma, "> 0")
        t = torch.arange(size, dtype=torch.float64) - size // 2
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        super().__init__(k / k.sum(), 1, (size // 2, size // 2), sigma_y)
        self.size, self.sigma = int(size), float(sigma)

    def describe(self) -> dict:
        return {"operator": "GaussianBlur", "sigma_y": self.sigma_y, "size": self.size, "sigma": self.sigma}


def _box_kernel(factor: int) -> tuple[Tensor, tuple[int, int]]:
    # average pooling over factor x factor blocks
    return torch.full((factor,), 1.0 / factor, dtype=torch.float64), (0, 0)


def _cubic(u: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel (a = -0.5, as in bicubic resizing)."""
    u = u.abs()
    near = ((a + 2) * u - (a + 3)) * u * u + 1
    far = ((a * u - 5 * a) * u + 8 * a) * u - 4 * a
    return torch.where(u <= 1, near, torch.where(u < 2, far, torch.zeros_like(u)))


def _bicubic_kernel(factor: int) -> tuple[Tensor, tuple[int, int]]:
    # Antialiased bicubic downsampling: the cubic kernel stretched by the factor, centred on each
    # output pixel (input coordinate (j + 1/2) f - 1/2), taps where it is non-zero.
    center = (factor - 1) / 2
    offsets = torch.arange(-2 * factor, 3 * factor, dtype=torch.float64)
    k = _cubic((offsets - center) / factor)
    nz = torch.nonzero(k.abs() > 1e-12).flatten()  # trim the zero ends only: for an odd factor the
    offsets, k = offsets[nz[0]: nz[-1] + 1], k[nz[0]: nz[-1] + 1]  # kernel also has zeros inside
    lo, hi = int(-offsets[0]), int(offsets[-1]) - (factor - 1)
    return k / k.sum(), (lo, hi)


# registry of 1-D downsampling kernels (strings are turned into objects here, not in if-chains)
SR_KERNELS: dict[str, Callable[[int], tuple[Tensor, tuple[int, int]]]] = {
    "box": _box_kernel,
    "bicubic": _bicubic_kernel,
}


class SuperResolution(SeparableFilter):
    """Downsampling by an integer ``factor``: ``kernel="box"`` averages ``factor x factor`` blocks,
    ``"bicubic"`` is antialiased bicubic resizing (Keys a = -0.5, reflect borders).
    Images ``(B, C, H, W)`` -> ``(B, C, H / factor, W / factor)``; H and W must be multiples of factor."""

    def __init__(self, factor: int = 2, kernel: str = "bicubic", sigma_y: float = 0.0) -> None:
        if not checks.is_integer(factor, 1):
            raise ValueError(f"SuperResolution: factor must be an integer >= 1, got {factor!r}")
        factor = int(factor)
        if kernel not in SR_KERNELS:
            raise ValueError(f"SuperResolution: unknown kernel {kernel!r}; "
                             f"expected one of {sorted(SR_KERNELS)}")
        k, pad = SR_KERNELS[kernel](factor)
        super().__init__(k, factor, pad, sigma_y)
        self.factor, self.kernel_name = factor, kernel

    def to_image(self, y: Tensor) -> Tensor:
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")

    def describe(self) -> dict:
        return {"operator": "SuperResolution", "sigma_y": self.sigma_y, "factor": self.factor,
                "kernel": self.kernel_name}


def measurement_loss(op: Operator, y: Tensor) -> MeasurementLoss:
    """``x -> ||y - op(x)||_2`` per sample: the same as ``op.loss(y)``."""
    return op.loss(y)


__all__ = ["GaussianBlur", "Inpainting", "LinearOperator", "MeasurementLoss", "Operator", "SR_KERNELS",
           "SeparableFilter", "SuperResolution", "measurement_loss"]
