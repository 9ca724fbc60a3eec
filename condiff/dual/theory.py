"""Closed forms for the theory check on Gaussian mixtures (Khalafi, Ding, Ribeiro, NeurIPS 2024).

For fixed ``lambda`` the minimiser of ``L_0 + sum_i lambda_i L_i`` over all models is the denoiser of
the mixture ``(q_0 + sum_i lambda_i q_i) / (1 + sum_i lambda_i)``. When every data set is a mixture of
the same Gaussian components (only the component weights differ), that mixture is again such a
mixture, with the weights of :func:`mixture_weights`, and its exact denoiser is
:class:`GaussianMixtureDenoiser`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ..denoiser import Denoiser
from ..schedule import Schedule


def mixture_weights(w0: Tensor, lam: Tensor, wq: Tensor) -> Tensor:
    """Component weights of ``(q_0 + sum_i lambda_i q_i) / (1 + sum_i lambda_i)``.

    Args:
        w0: (K,) component weights of ``q_0``.
        lam: (m,) dual variables, >= 0.
        wq: (m, K) component weights of each ``q_i`` (one-hot rows for per-component constraints).
    Returns: (K,) float64 weights summing to 1.
    """
    w0, lam, wq = (torch.as_tensor(v, dtype=torch.float64) for v in (w0, lam, wq))
    if w0.dim() != 1 or lam.dim() != 1 or wq.shape != (lam.numel(), w0.numel()):
        raise ValueError(f"mixture_weights: expected w0 (K,), lam (m,), wq (m, K); got {tuple(w0.shape)}, "
                         f"{tuple(lam.shape)}, {tuple(wq.shape)}")
    if not bool(torch.isfinite(lam).all() & (lam >= 0).all()):
        raise ValueError(f"mixture_weights: lambda must be finite and >= 0, got {lam.tolist()}")
    for name, w in (("w0", w0[None]), ("each row of wq", wq)):
        if not bool(torch.isfinite(w).all() & (w >= 0).all() & (w.sum(-1) > 0).all()):
            raise ValueError(f"mixture_weights: {name} must be finite weights >= 0 with a positive sum, "
                             f"got {w.tolist()}")
    w0 = w0 / w0.sum()
    wq = wq / wq.sum(1, keepdim=True)
    return (w0 + lam @ wq) / (1 + lam.sum())


def mode_weights(x: Tensor, means: Tensor) -> Tensor:
    """Fraction of points ``x`` (N, D) nearest to each mean of ``means`` (K, D): a (K,) float64 tensor."""
    x, means = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(means, dtype=torch.float64)
    if x.dim() != 2 or means.dim() != 2 or x.shape[1] != means.shape[1] or 0 in (x.shape[0], means.shape[0]):
        raise ValueError(f"mode_weights: expected x (N, D) and means (K, D), got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}")
    nearest = torch.cdist(x, means).argmin(1)
    return torch.bincount(nearest, minlength=means.shape[0]).double() / x.shape[0]


class GaussianMixtureDenoiser(Denoiser):
    """Exact denoiser for ``x0 ~ sum_k w_k N(mu_k, s^2 I)``: ``(B, D), (B,) -> (B, D)``.

    With ``x_t = a x0 + sigma eps`` (``a = sqrt(abar_t)``), component ``k`` gives
    ``x_t ~ N(a mu_k, v I)``, ``v = a^2 s^2 + sigma^2``; the posterior mean is
    ``E[x0 | x_t] = sum_k r_k (mu_k + a s^2 / v (x_t - a mu_k))`` with responsibilities
    ``r_k ∝ w_k N(x_t; a mu_k, v I)``, and ``eps_hat = (x_t - a E[x0 | x_t]) / sigma``.
    """

    def __init__(self, schedule: Schedule, means: Tensor, std: float, weights: Tensor) -> None:
        super().__init__(schedule)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.means.dim() != 2 or self.weights.shape != (self.means.shape[0],):
            raise ValueError(f"GaussianMixtureDenoiser: expected means (K, D) and weights (K,), got "
                             f"{tuple(self.means.shape)} and {tuple(self.weights.shape)}")
        w = self.weights
        if not bool(torch.isfinite(w).all() & (w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError(f"GaussianMixtureDenoiser: weights must be finite and >= 0 with a positive sum, "
                             f"got {w.tolist()}")
        if not bool(torch.isfinite(self.means).all()):
            raise ValueError("GaussianMixtureDenoiser: means must be finite")
        self.weights = w / w.sum()
        self.std = checks.number("GaussianMixtureDenoiser: std", std, ">= 0")

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.dim() != 2 or x_t.shape[1] != self.means.shape[1]:
            raise ValueError(f"GaussianMixtureDenoiser: expected x_t of shape (B, {self.means.shape[1]}), got "
                             f"{tuple(x_t.shape)}")
        x = x_t.double()
        a = self.schedule.abar_at(t, x).sqrt()                       # (B, 1)
        sigma = (1 - a**2).sqrt()
        v = a**2 * self.std**2 + sigma**2                            # (B, 1)
        mu = self.means.to(x.device)
        d2 = ((x[:, None, :] - a[:, None, :] * mu[None]) ** 2).sum(-1)  # (B, K)
        logits = self.weights.to(x.device).log()[None] - 0.5 * d2 / v
        r = logits.softmax(1)                                        # (B, K)
        x0_k = mu[None] + (a * self.std**2 / v)[:, :, None] * (x[:, None, :] - a[:, None, :] * mu[None])
        x0 = (r[:, :, None] * x0_k).sum(1)
        return ((x - a * x0) / sigma).to(x_t.dtype)


def log_mass_bounds(losses: Tensor, freqs: Tensor, constrained: list[int],
                    target: float) -> tuple[Tensor, float]:
    """Bounds asking the classes ``constrained`` for weight ``target``, from a reference model.

    For classes with disjoint supports ``KL(q_c || p) = -log p(c) + const``: a model's loss on
    class ``c`` falls linearly in ``log`` of the weight it gives ``c``. The slope ``s`` is fitted by
    least squares of the reference's per-class losses ``losses`` (K,) on ``-log freqs`` (K,), the class
    weights it was trained with; then ``b_c = losses[c] - s * log(target / freqs[c])``.
    Returns the bounds ``(len(constrained),)`` and ``s``.
    """
    L, f = torch.as_tensor(losses, dtype=torch.float64), torch.as_tensor(freqs, dtype=torch.float64)
    if L.shape != f.shape or L.dim() != 1 or bool((f <= 0).any()) or not 0 < target < 1:
        raise ValueError(f"log_mass_bounds: expected (K,) losses, positive (K,) freqs and 0 < target < 1; "
                         f"got {tuple(L.shape)}, {tuple(f.shape)}, target {target}")
    if not bool(torch.isfinite(L).all() & torch.isfinite(f).all()):
        raise ValueError(f"log_mass_bounds: the reference's losses and class weights must be finite, got "
                         f"{L.tolist()} and {f.tolist()}")
    if abs(float(f.sum()) - 1) > 1e-3:  # counts, or weights scaled, shift every bound by log of their sum
        raise ValueError(f"log_mass_bounds: freqs are the reference's class weights and must sum to 1, got sum "
                         f"{float(f.sum()):.6g} (divide counts by their total)")
    x = -f.log()
    if float(x.max() - x.min()) < 1e-9:
        raise ValueError("log_mass_bounds: the reference classes all have one weight; the slope is undefined")
    slope = float(((x - x.mean()) * (L - L.mean())).sum() / ((x - x.mean()) ** 2).sum())
    idx = torch.as_tensor(checks.labels("log_mass_bounds: constrained", list(constrained), L.numel(),
                                        f"class indices 0-{L.numel() - 1}"), dtype=torch.long)
    return L[idx] - slope * torch.log(target / f[idx]), slope


def refine_log_mass_bounds(base_losses: Tensor, base_freqs: Tensor, pilot_losses: Tensor, pilot_freqs: Tensor,
                           target: float) -> tuple[Tensor, Tensor]:
    """Per-class bounds for weight ``target`` from two models of known class weights.

    The constrained classes' losses and weights under a reference (e.g. the baseline) and under a
    pilot constrained run, all ``(m,)``, give one slope per class,
    ``s = (L_base - L_pilot) / log(f_pilot / f_base)``, and ``b = L_base - s * log(target / f_base)``:
    the secant of the log-mass line of :func:`log_mass_bounds`, which shares one slope across classes.
    Returns the bounds and the slopes, ``(m,)`` each.
    """
    Lb, fb, Lp, fp = (torch.as_tensor(v, dtype=torch.float64) for v in (base_losses, base_freqs, pilot_losses,
                                                                         pilot_freqs))
    if not (Lb.shape == fb.shape == Lp.shape == fp.shape) or Lb.dim() != 1:
        raise ValueError("refine_log_mass_bounds: all inputs must have one shape (m,)")
    if not all(bool(torch.isfinite(v).all()) for v in (Lb, fb, Lp, fp)):
        raise ValueError(f"refine_log_mass_bounds: the losses and class weights must be finite, got losses "
                         f"{Lb.tolist()} and {Lp.tolist()}, weights {fb.tolist()} and {fp.tolist()}")
    if bool((fb <= 0).any() | (fp <= 0).any() | (fb > 1).any() | (fp > 1).any()
            | ((fp / fb).log().abs() < 1e-9).any()) or not 0 < target < 1:
        raise ValueError("refine_log_mass_bounds: weights must lie in (0, 1] and differ between the two models, "
                         f"and 0 < target < 1; got {fb.tolist()}, {fp.tolist()}, {target}")
    slope = (Lb - Lp) / (fp / fb).log()
    return Lb - slope * torch.log(target / fb), slope
