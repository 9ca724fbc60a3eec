"""Plug-and-play inference: a fixed diffusion model as a prior, a differentiable constraint, and
gradient descent on ``x`` or on a latent that renders to ``x`` (Graikos et al. 2022).

Objective at optimisation step ``i`` (one noise draw per step and chain, ``n`` elements per sample):

    F_i(z) = || eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t) ||^2 / n  +  w_i * c(x),
    x = render(z),  t = t_i,  eps ~ N(0, I)

with ``t_i`` and ``w_i`` from schedule objects (:mod:`condiff.pnp.schedules`) and ``c`` any callable
``x -> (B,)`` to *minimise* (e.g. ``-log p(y | x)`` of a classifier, a symmetry distance). Every row of
the batch is an independent chain: the loss is summed over rows and Adam acts elementwise, so one
chain never changes another's trajectory.

``through_net=True`` back-propagates the denoising loss through the network, as the paper does.
``through_net=False`` is the cheaper stop-gradient variant (as in score distillation): the network's
Jacobian is dropped, and the gradient in ``x`` is ``2 sqrt(abar_t) (eps_hat - eps) / n``; it costs one
forward pass per step and no backward pass through the network.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from .. import checks
from ..constraints import not_differentiable
from ..denoiser import Denoiser
from ..readback import DeviceRows, read_every
from ..sample import Guidance, check_denoiser, ddim, progress_bar, randn
from ..schedule import Schedule
from .schedules import PAPER_MNIST, ConstantTime, ConstantWeight, TimeSchedule, WeightSchedule

Constraint = Callable[[Tensor], Tensor]
UNIT_WEIGHT = ConstantWeight(1.0)


def denoising_term(denoiser: Denoiser, x: Tensor, t: Tensor, eps: Tensor, through_net: bool = True) -> Tensor:
    """Per-chain denoising loss ``||eps - eps_theta(x_t, t)||^2 / n`` at ``x`` ``(B, ...)``: ``(B,)``.

    With ``through_net=False`` the value is the same but its gradient in ``x`` skips the network:
    a surrogate ``2 <stopgrad(eps_hat - eps), x_t> / n`` carries ``2 sqrt(abar_t) (eps_hat - eps) / n``.
    """
    s, s1 = denoiser.schedule.coefs(t, x)
    x_t = s * x + s1 * eps
    n = x[0].numel()
    if through_net:
        return (eps - denoiser.eps(x_t, t)).pow(2).flatten(1).sum(1) / n
    with torch.no_grad():
        r = denoiser.eps(x_t.detach(), t) - eps
    value = r.pow(2).flatten(1).sum(1) / n
    surrogate = 2 * (r * x_t).flatten(1).sum(1) / n
    return value + surrogate - surrogate.detach()


@dataclass
class PnPResult:
    """Output of :func:`infer`: the final picture ``x`` ``(B, ...)``, the optimised ``latent``, and per-step
    traces (means over chains) of the denoising loss, the constraint, ``t`` and ``w``."""

    x: Tensor
    latent: Tensor
    denoise: list[float] = field(default_factory=list)
    constraint: list[float] = field(default_factory=list)
    t: list[int] = field(default_factory=list)
    w: list[float] = field(default_factory=list)
    nfe: int = 0
    seconds: float = 0.0


def infer(
    denoiser: Denoiser,
    latent: Tensor,
    *,
    render: Callable[[Tensor], Tensor] | None = None,
    constraint: Constraint | None = None,
    schedule: TimeSchedule = PAPER_MNIST,
    weight: WeightSchedule = UNIT_WEIGHT,
    steps: int = 1000,
    lr: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    through_net: bool = True,
    project: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool = False,
) -> PnPResult:
    """Minimise ``F_i`` over ``latent`` ``(B, ...)`` with Adam for ``steps`` steps; ``B`` independent chains.

    Args:
        denoiser: the fixed prior (any :class:`~condiff.denoiser.Denoiser`; its weights are not touched).
        latent: the starting point ``z_0`` (copied); ``x = render(z)`` must have the prior's shape.
        render: differentiable map latent -> picture (default: identity, i.e. optimise ``x`` itself).
        constraint: callable ``x -> (B,)`` to minimise, weighted by ``weight(i, steps)``; None: prior only.
        schedule: ``t_i`` as a :class:`~condiff.pnp.schedules.TimeSchedule` object (not the noise
            schedule, which the denoiser carries), or a whole number for a fixed timestep.
        weight: ``w_i`` as a :class:`~condiff.pnp.schedules.WeightSchedule`, or a number for a constant.
        lr, betas: Adam settings (the paper: 0.01 for MNIST; 1.0 with betas (0, 0.9) for TSP).
        through_net: back-propagate through the network (paper) or use the stop-gradient variant.
        project: applied to the latent after every step without gradients (e.g. a clamp to a box).
        generator: source of the noise ``eps`` (one draw per step), for reproducible runs.
        callback: ``callback(i, latent, x)`` after each step (``x`` detached).
    """
    checks.gradients_on("infer")
    with torch.enable_grad():  # also when called under torch.no_grad(): the latent needs its gradient
        return _run(denoiser, latent, render, constraint, schedule, weight, steps, lr, betas,
                    through_net, project, generator, callback, progress)


class _Trace:
    """Each step's values, kept on the device (:class:`~condiff.readback.DeviceRows`): whether the
    gradient, the rendered samples and the denoising term were finite, the denoising term's mean and,
    in a run with a constraint, the constraint's. Reading stops at the first step whose gradient was
    not finite, naming what made it so."""

    def __init__(self, out: PnPResult, every: int, constrained: bool) -> None:
        self.out, self.constrained = out, constrained
        self.rows = DeviceRows(every)

    def add(self, i: int, t_i: int, g: Tensor, x: Tensor, d: Tensor, c_mean: Tensor | None) -> None:
        f64 = torch.float64  # the means at their own precision, whatever the model's (bf16, say) or the constraint's
        values = [torch.isfinite(v).all().to(f64) for v in (g, x, d)] + [d.mean().to(f64)]
        values = torch.stack(values + [c_mean.to(f64) if c_mean is not None else d.new_zeros((), dtype=f64)])
        self.rows.keep(values, partial(self._record, i, t_i))

    def _record(self, i: int, t_i: int, row: list[float]) -> None:
        g_ok, x_ok, d_ok, d_mean, c_mean = row
        if not g_ok:
            raise FloatingPointError(f"non-finite gradient at step {i} (t={t_i}): {_culprit(i, x_ok, d_ok, c_mean)}")
        self.out.denoise.append(d_mean)
        if self.constrained:
            self.out.constraint.append(c_mean)


def _culprit(i: int, x_ok: bool, d_ok: bool, c_mean: float) -> str:
    """What made step ``i``'s gradient non-finite, as far as the step's values tell."""
    if not x_ok:
        return "the rendered samples are not finite; lower the learning rate"
    if not d_ok and i == 0:  # the latent has not moved yet: the denoiser's prediction on finite samples
        return "the denoising term is not finite on the first, finite samples: check the prior (its weights)"
    if not d_ok:
        return "the denoising term is not finite; lower the learning rate, or check the prior"
    if not math.isfinite(c_mean):
        return f"the constraint returned non-finite values (mean {c_mean}) on finite samples"
    return "the gradient is not finite though the step's values are: check the constraint's gradient, or lower " \
           "the learning rate"


def _time_schedule(schedule: object) -> TimeSchedule:
    """``schedule`` as a time schedule: a whole number is a fixed timestep (:class:`ConstantTime`)."""
    if isinstance(schedule, Schedule):
        raise TypeError("schedule is the PnP time schedule (i, steps, T) -> t_i (e.g. condiff.pnp.schedules."
                        "PAPER_MNIST), not the noise Schedule, which comes with the denoiser")
    if isinstance(checks.scalar(schedule), numbers.Real):
        return ConstantTime(checks.integer("schedule (a fixed timestep)", schedule, 0))
    if not callable(schedule):
        raise TypeError(f"schedule must be a time schedule (i, steps, T) -> t_i or a timestep, got "
                        f"{type(schedule).__name__}")
    return schedule


def _weight(weight: object) -> WeightSchedule:
    """``weight`` as a weight schedule: a number is a constant weight (:class:`ConstantWeight`)."""
    if isinstance(checks.scalar(weight), numbers.Real):
        return ConstantWeight(checks.number("weight (a constant weight)", weight, ">= 0"))
    if not callable(weight):
        raise TypeError(f"weight must be a weight schedule (i, steps) -> w_i or a number, got {type(weight).__name__}")
    return weight


def _run(denoiser, latent, render, constraint, schedule, weight, steps, lr, betas, through_net, project,
         generator, callback, progress) -> PnPResult:
    check_denoiser(denoiser)
    steps = checks.integer("steps", steps, 1)
    lr = checks.number("lr", lr, "> 0")
    schedule, weight = _time_schedule(schedule), _weight(weight)
    for what, fn in (("constraint", constraint), ("render", render), ("project", project)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{what} must be a callable (or None), got {type(fn).__name__} {fn!r}")
    if constraint is not None:
        checks.eval_mode(constraint, "a constraint that is a network")
    checks.floating("the starting latent", latent)
    if latent.dim() < 2 or latent.shape[0] == 0:
        raise ValueError(f"the starting latent must be a batch (B, ...) with B >= 1, got shape {tuple(latent.shape)}")
    if not bool(torch.isfinite(latent).all()):
        raise ValueError("the starting latent holds NaN or inf values")
    b = checks.pair(betas)
    if b is None or not all(0 <= v < 1 for v in b):
        raise ValueError(f"betas must be two numbers in [0, 1) (Adam's), got {betas!r}")
    render = render if render is not None else (lambda z: z)
    z = latent.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr, betas=b)
    T, B = denoiser.schedule.T, z.shape[0]
    out = PnPResult(x=z, latent=z)
    trace = _Trace(out, read_every(z.device), constraint is not None)
    nfe0, t0 = denoiser.nfe, time.perf_counter()
    bar = progress_bar(steps, progress, desc="pnp")
    try:
        for i in range(steps):
            t_i, w_i = int(schedule(i, steps, T)), float(weight(i, steps))
            if not 0 <= t_i < T:
                raise ValueError(f"the time schedule gave t={t_i} at step {i}, outside [0, {T})")
            x = render(z)
            if x.shape[0] != B:
                raise ValueError(f"render changed the batch size from {B} to {x.shape[0]}")
            trained = getattr(denoiser, "sample_shape", None)  # a prior run on pictures of another size ran
            if i == 0 and trained is not None and tuple(x.shape[1:]) != tuple(trained):  # without a word
                warnings.warn(f"the prior was trained on samples of shape {tuple(trained)}, but the rendered samples "
                              f"have shape {tuple(x.shape[1:])}: a convolutional prior runs at any size, rarely "
                              "well", stacklevel=3)
            t = torch.full((B,), t_i, dtype=torch.long, device=x.device)
            eps = randn(x.shape, generator, like=x)
            d = denoising_term(denoiser, x, t, eps, through_net)
            loss = d.sum()
            c_mean = None
            if constraint is not None and w_i != 0.0:
                c = checks.per_sample("the constraint", constraint(x), B)
                if not c.requires_grad:  # it would be left out of the gradient, silently
                    raise ValueError(not_differentiable("the constraint"))
                loss = loss + w_i * c.sum()
                c_mean = c.detach().mean().to(d.device)  # a user's constraint may answer on the CPU
            elif constraint is not None:
                with torch.no_grad():
                    c_mean = checks.per_sample("the constraint", constraint(x.detach()), B).mean().to(d.device)
            (g,) = torch.autograd.grad(loss, [z])
            trace.add(i, t_i, g, x.detach(), d.detach(), c_mean)  # a bad step stops the loop here
            z.grad = g
            opt.step()
            if project is not None:
                with torch.no_grad():
                    p = project(z)
                    if not isinstance(p, Tensor) or p.shape != z.shape:
                        raise ValueError(f"project must return the latent's shape {tuple(z.shape)}, "
                                         f"got {checks.shape_of(p)}")
                    z.copy_(p)
            out.t.append(t_i)
            out.w.append(w_i)
            if callback is not None:
                callback(i, z.detach(), x.detach())
            if bar is not None:
                bar.update(1)
        trace.rows.read()  # the last block: a non-finite step among them is reported, not returned
    except Exception as err:  # an unread non-finite step before the failure is its likely cause: reported first
        trace.rows.read_before(err)
        raise
    finally:
        if bar is not None:
            bar.close()
    with torch.no_grad():
        out.x, out.latent = render(z).detach(), z.detach()
    out.nfe, out.seconds = denoiser.nfe - nfe0, time.perf_counter() - t0
    return out


def finish(denoiser: Denoiser, x: Tensor, start: int, *, steps: int | None = None, guidance: Guidance | None = None,
           eta: float = 1.0, clip_x0: float | tuple[float, float] | str | None = "auto",
           generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Re-noise a PnP result ``x`` ``(B, ...)`` to timestep ``start`` and sample back to ``t = 0``.

    PnP returns a point estimate near a mode of the prior; its pictures are smoother and more saturated
    than samples, which a Fréchet distance notices. Finishing re-noises ``x`` with ``q(x_start | x)``
    and runs ``steps`` ancestral (``eta = 1``) DDIM steps evenly spaced from ``start`` down to 0 (default:
    the density of a 100-step sampler, ``round(100 start / T) + 1``: 41 steps from 400 of 1000). With
    ``guidance`` (e.g. :class:`condiff.guidance.DPS` on the same constraint as a loss) the constraint
    keeps acting while the sampler restores sample-like detail; without it, a large ``start`` forgets
    the constraint (docs/pnp.md has the measured trade-off on digits). ``clip_x0`` as in
    :func:`condiff.guidance.guided_sample` (``"auto"``: ``[-1, 1]``, or the model's recorded data range beyond it).
    """
    check_denoiser(denoiser)
    T = denoiser.schedule.T
    start = checks.integer("start (a timestep)", start, 0, T)
    if steps is None:
        steps = min(round(100 * start / T) + 1, start + 1)
    if not checks.is_integer(steps, 1, start + 2):
        raise ValueError(f"steps must be an integer between 1 and start + 1 = {start + 1}, got {steps!r}")
    steps = int(steps)
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (B, ...), got shape {tuple(x.shape)}")
    checks.floating("x", x)
    ts = torch.linspace(int(start), 0, int(steps), dtype=torch.float64).round().long()
    t = torch.full((x.shape[0],), int(start), dtype=torch.long, device=x.device)
    x_t = denoiser.schedule.add_noise(x.detach(), randn(x.shape, generator, like=x), t)
    return ddim(denoiser, x_t, ts, eta=eta, generator=generator, guidance=guidance,
                clip_x0=clip_x0, progress=progress)  # ("auto" resolved by ddim)

