"""DDPM / DDIM samplers.

The loop owns time-stepping. At each step it builds a :class:`Step` record (the papers' notation)
and hands it to a guidance rule, which returns ``x_{t_prev}``; with no guidance the rule is the
unconditional draw ``mean + sigma * noise``. Guidance methods therefore plug in without touching
the loop, and may call :meth:`Step.remake` to re-evaluate the step at another ``x_t``.

DDIM step from ``t`` to ``s < t`` with stochasticity ``eta`` (Song et al. 2021, eq. 12):

    sigma = eta * sqrt((1 - abar_s)/(1 - abar_t)) * sqrt(1 - abar_t/abar_s)
    mean  = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat
    x_s   = mean + sigma z

``eta = 1`` with every step is DDPM ancestral sampling.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from . import checks
from .denoiser import Denoiser
from .readback import DeviceRows, read_every


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, like: Tensor | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn from ``generator`` (on the generator's device), moved to the target.
    It is drawn in float32 whatever ``dtype`` is, then cast, so that a seed gives the same noise to a
    float64 or half-precision model as to a float32 one (torch draws other numbers in float64)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
                        f"{type(generator).__name__} {generator!r}")
    if like is not None:
        device, dtype = like.device, like.dtype
    elif device is not None:
        checks.device("device", device)
    gdev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=torch.float32).to(device=device,
                                                                                             dtype=dtype)


@dataclass
class Step:
    """One step ``x_t -> x_{t_prev}``; scalars are Python floats shared by the whole batch."""

    i: int                  # index of this step in the timestep sequence
    t: Tensor               # (B,) long
    t_prev: Tensor          # (B,) long; -1 at the last step (abar = 1)
    x_t: Tensor
    eps_hat: Tensor
    x0_hat: Tensor
    mean: Tensor
    noise: Tensor           # z ~ N(0, I) for this step (zeros when sigma = 0)
    abar_t: float
    abar_prev: float
    sigma: float
    eta: float
    denoiser: Denoiser
    generator: torch.Generator | None = None
    clip_x0: float | Sequence[float] | None = None
    t_host: int = field(kw_only=True)       # t and t_prev as host integers: reading t[0] would wait for a GPU
    t_prev_host: int = field(kw_only=True)

    def sample(self) -> Tensor:
        """The unconditional draw ``x_{t_prev} = mean + sigma z``."""
        return torch.add(self.mean, self.noise, alpha=self.sigma) if self.sigma > 0 else self.mean

    def remake(self, x_t: Tensor, noise: Tensor | None = None) -> Step:
        """The same step evaluated at another ``x_t`` (one more network call), with fresh noise."""
        return make_step(self.denoiser, x_t, self.i, self.t, self.t_prev, self.eta,
                         self.generator, self.clip_x0, noise=noise, abars=(self.abar_t, self.abar_prev),
                         times=(self.t_host, self.t_prev_host))

    def with_eps(self, eps_hat: Tensor) -> Step:
        """The step rebuilt from a modified ``eps_hat`` (no network call): UGD's forward guidance."""
        x0_hat = _x0(self.x_t, eps_hat, self.abar_t)
        return replace(self, eps_hat=eps_hat, x0_hat=x0_hat, mean=self._mean(x0_hat, eps_hat))

    def with_x0(self, x0_hat: Tensor) -> Step:
        """The step rebuilt from a modified ``x0_hat``, with ``eps_hat`` made consistent."""
        eps_hat = (self.x_t - math.sqrt(self.abar_t) * x0_hat) / math.sqrt(1 - self.abar_t)
        return replace(self, eps_hat=eps_hat, x0_hat=x0_hat, mean=self._mean(x0_hat, eps_hat))

    def renoise(self, x_prev: Tensor) -> Tensor:
        """Forward-diffuse ``x_{t_prev}`` back to ``x_t`` (time travel / self-recurrence):
        ``x_t = sqrt(abar_t/abar_prev) x_prev + sqrt(1 - abar_t/abar_prev) z``."""
        r = self.abar_t / self.abar_prev
        return math.sqrt(r) * x_prev + math.sqrt(1 - r) * randn(x_prev.shape, self.generator, like=x_prev)

    @property
    def n(self) -> int:
        """Number of elements per sample (the dimension of the sphere DSG works on)."""
        return self.x_t[0].numel()

    def _mean(self, x0_hat: Tensor, eps_hat: Tensor) -> Tensor:
        return _ddim_mean(x0_hat, eps_hat, self.abar_prev, self.sigma)


def _ddim_mean(x0_hat: Tensor, eps_hat: Tensor, abar_prev: float, sigma: float) -> Tensor:
    # mean = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat        (DDIM eq. 12)
    # one kernel fewer than the written form: a small network on a GPU is bound by kernel launches
    c = max(1.0 - abar_prev - sigma**2, 0.0)
    return torch.add(x0_hat * math.sqrt(abar_prev), eps_hat, alpha=math.sqrt(c))


def _x0(x_t: Tensor, eps_hat: Tensor, abar_t: float) -> Tensor:
    # Tweedie: x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    return torch.add(x_t, eps_hat, alpha=-math.sqrt(1 - abar_t)).div_(math.sqrt(abar_t))


def check_denoiser(denoiser: object) -> None:
    """Refuse a sampler's model that is no :class:`~condiff.denoiser.Denoiser` (nor has its ``schedule``
    and ``eps``: a bare network has no noise schedule), naming the wrapper to use."""
    duck = hasattr(denoiser, "schedule") and callable(getattr(denoiser, "eps", None))
    if not (isinstance(denoiser, Denoiser) or duck):
        hint = (": wrap a network as NetDenoiser(net, schedule) (condiff.denoiser), or load a trained model "
                "with condiff.models.load_denoiser") if isinstance(denoiser, torch.nn.Module) else ""
        raise TypeError(f"the model must be a condiff Denoiser, got a {type(denoiser).__name__}{hint}")
    checks.eval_mode(denoiser, "the denoiser's network")  # its .net, a diffusers .unet, ...


def check_shape(denoiser: object, shape: Sequence[int], batch: bool, stacklevel: int = 3) -> None:
    """A sampler's ``shape`` (``batch``: the batch's ``(B, ...)``, else one sample's) against the per-sample
    shape the model was trained on, where it records one: the other convention's shape is refused, naming
    it, and another sample shape is warned of (a convolutional net runs at any size, rarely well)."""
    known = getattr(denoiser, "sample_shape", None)
    if known is None or not isinstance(shape, (tuple, list)):
        return
    shape, known = tuple(shape), tuple(known)
    if batch and shape == known:
        raise ValueError(f"shape is the batch's, (B, *sample shape), e.g. {(16, *known)}; got {shape}, the shape of "
                         "one of the model's samples")
    if not batch and shape[1:] == known:
        raise ValueError(f"shape is one sample's, e.g. {known} for this model; got {shape}, a batch's (the number "
                         "of samples is n)")
    one = shape[1:] if batch else shape
    if len(one) != len(known) or one[:1] != known[:1]:  # channels (a vector's size): no net runs on others
        one_what, many = {3: ("channel", "channels"), 1: ("entry", "entries")}.get(len(known), ("row", "rows"))
        what = one_what if known[0] == 1 else many
        raise ValueError(f"the model makes samples of shape {known} ({known[0]} {what}); shape asks for {one}")
    if one != known:  # another picture size: a convolutional net runs, rarely well
        warnings.warn(f"the model was trained on samples of shape {known}; drawing {one} instead",
                      stacklevel=stacklevel)


def ddim_sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    """DDIM's ``sigma_t(eta)``; ``eta = 1`` gives the DDPM posterior standard deviation."""
    if eta == 0:
        return 0.0
    return eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(max(1 - abar_t / abar_prev, 0.0))


def default_clip(denoiser: object, clip_x0: float | Sequence[float] | str | None) -> float | tuple[float, float] | None:
    """``clip_x0`` with ``"auto"`` resolved for ``denoiser``: ``[-1, 1]`` (the house data range), or the
    ``[min, max]`` of its training data where those reach beyond (the ``value_range`` a loaded condiff
    model records; :func:`condiff.data.nominal_range`), as the command line clips."""
    if not (isinstance(clip_x0, str) and clip_x0 == "auto"):
        return clip_x0
    from .data import nominal_range  # the data package is heavy and imports the samplers' users

    span = getattr(denoiser, "value_range", None)
    return nominal_range(span) if span is not None else 1.0


def clip_bounds(clip_x0: float | Sequence[float] | None) -> tuple[float, float] | None:
    """The interval ``x0_hat`` is clamped to: ``[-c, c]`` for a number ``c > 0``, ``[lo, hi]`` for a pair
    (data on e.g. [0, 5]); ``None``: no clipping."""
    if clip_x0 is None:
        return None
    if isinstance(clip_x0, (list, tuple)):
        if len(clip_x0) == 2 and all(checks.is_number(v) for v in clip_x0) and clip_x0[0] < clip_x0[1]:
            return float(checks.scalar(clip_x0[0])), float(checks.scalar(clip_x0[1]))
    elif checks.is_number(clip_x0) and float(checks.scalar(clip_x0)) > 0:
        return -float(checks.scalar(clip_x0)), float(checks.scalar(clip_x0))
    raise ValueError(f"clip_x0 must be a number > 0, a pair (lo, hi) with lo < hi, 'auto' or None, got {clip_x0!r}")


def step_abars(abar: Tensor | Sequence[float], t: int, t_prev: int) -> tuple[float, float]:
    """``(abar_t, abar_prev)`` for host timesteps from a schedule's ``abar`` (a tensor or, cheaper to
    index, a list); ``t_prev = -1`` (the last step) has ``abar = 1``."""
    return float(abar[t]), float(abar[t_prev]) if t_prev >= 0 else 1.0


def make_step(denoiser: Denoiser, x_t: Tensor, i: int, t: Tensor, t_prev: Tensor, eta: float,
              generator: torch.Generator | None, clip_x0: float | Sequence[float] | None = None,
              noise: Tensor | None = None, abars: tuple[float, float] | None = None,
              times: tuple[int, int] | None = None) -> Step:
    """Evaluate the denoiser once at ``(x_t, t)`` and build the step record.

    ``times``: ``(t, t_prev)`` as host integers and ``abars``: ``(abar_t, abar_prev)``, when the
    caller has them; otherwise they are read from ``t`` and ``t_prev`` (and the schedule), which on a
    GPU waits for the device (a sync per step).
    """
    if times is None:
        times = int(t[0]), int(t_prev[0])
    if abars is None:
        abars = step_abars(denoiser.schedule.abar, *times)
    abar_t, abar_prev = abars
    eps_hat = denoiser.eps(x_t, t)
    x0_hat = _x0(x_t, eps_hat, abar_t)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(*clip_bounds(clip_x0))
        eps_hat = (x_t - math.sqrt(abar_t) * x0_hat) / math.sqrt(1 - abar_t)
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    if noise is None:
        noise = randn(x_t.shape, generator, like=x_t) if sigma > 0 else torch.zeros_like(x_t)
    mean = _ddim_mean(x0_hat, eps_hat, abar_prev, sigma)
    return Step(i, t, t_prev, x_t, eps_hat, x0_hat, mean, noise, abar_t, abar_prev, sigma, eta,
                denoiser, generator, clip_x0, t_host=times[0], t_prev_host=times[1])


_KEPT: ContextVar[DeviceRows | None] = ContextVar("condiff_kept_checks", default=None)


def kept_checks() -> DeviceRows | None:
    """The running sampler's :class:`~condiff.readback.DeviceRows` where it reads per-step checks in
    blocks (on a GPU); None where a check should be made at once (on the CPU, or outside a sampler
    run). The sampler reads it every :func:`~condiff.readback.read_every` steps, not per row kept."""
    return _KEPT.get()


class Guidance(Protocol):
    """A rule that turns a step record into ``x_{t_prev}``. ``needs_grad``: the loop then tracks
    gradients from ``x_t`` through the denoiser so the rule can differentiate ``x0_hat`` in ``x_t``.
    A rule's per-step checks go to :func:`kept_checks` when it returns one (see ``GradientGuidance``)."""

    needs_grad: bool

    def __call__(self, step: Step) -> Tensor: ...


def ddim(denoiser: Denoiser, x: Tensor, timesteps: Tensor, eta: float = 0.0,
         generator: torch.Generator | None = None, guidance: Guidance | None = None,
         callback: Callable[[Step], None] | None = None, grad: bool = False,
         clip_x0: float | Sequence[float] | None = None, progress: bool | object = False) -> Tensor:
    """Run the reverse process from ``x = x_{timesteps[0]}`` through ``timesteps`` (decreasing) to ``x_0``.

    Args:
        denoiser: the model (any :class:`~condiff.denoiser.Denoiser`).
        x: ``(B, ...)`` starting noise at ``timesteps[0]``.
        timesteps: ``(S,)`` decreasing long tensor, e.g. ``schedule.timesteps(S)``.
        eta: DDIM stochasticity; 1 gives DDPM ancestral steps.
        guidance: optional rule ``step -> x_{t_prev}``; ``None`` draws unconditionally.
        callback: called with each :class:`Step` (trajectories, plots, logging).
        grad: keep the autograd graph through the whole chain (for differentiating samples).
        clip_x0: clamp ``x0_hat`` to ``[-clip_x0, clip_x0]``, or to ``[lo, hi]`` for a pair (with a
            consistent ``eps_hat``); ``"auto"``: the guided samplers' default (:func:`default_clip`).
        progress: a bar of the steps; or a caller's bar (:func:`progress_bar`), advanced a step at a time and
            left open (:func:`generate`'s, over all its batches).
    """
    check_denoiser(denoiser)
    ts = torch.as_tensor(timesteps).cpu()
    if ts.dim() != 1 or ts.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(ts.shape)}")
    denoiser.schedule.check_timesteps(ts, lo=0)  # whole steps in [0, T), the check every denoiser call makes
    ts = ts.to(torch.long)
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing")
    if not (checks.is_number(eta) and 0 <= eta <= 1):  # above 1 the DDIM variance exceeds 1 - abar_prev
        raise ValueError(f"eta must be in [0, 1] (0 deterministic DDIM, 1 DDPM-like), got {eta!r}")
    eta = float(checks.scalar(eta))
    if guidance is not None and not callable(guidance):
        raise TypeError(f"guidance must be a rule step -> x_{{t_prev}} (DPS(loss, zeta), DSG(DPS(...)), "
                        f"condiff.guidance.make_guidance(name, loss), or a callable of your own), got "
                        f"{type(guidance).__name__} {guidance!r}")
    clip_x0 = default_clip(denoiser, clip_x0)
    clip_bounds(clip_x0)  # checked once before the loop; None: no clipping
    checks.floating("x", x)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x holds {int((~torch.isfinite(x)).sum())} non-finite values")
    need_grad = grad or bool(getattr(guidance, "needs_grad", False))
    if need_grad:
        checks.gradients_on("guided sampling")
    grad_at = getattr(guidance, "needs_grad_at", None)
    B = x.shape[0]
    steps = ts.tolist()  # host integers: nothing in the loop waits for the device
    # every step's t and t_prev as broadcast views of one device copy: no kernel per step for them
    on_device = torch.cat([ts, ts.new_tensor([-1])]).to(x.device)
    zeros = torch.zeros_like(x) if eta == 0 else None  # the noise of every deterministic step
    abar = denoiser.schedule.abar.tolist()
    # guidance keeps its per-step checks on a GPU (read every `every` steps, at the end, and before
    # another error is passed on); on the CPU it checks each step itself, also inside a GPU run
    every = read_every(x.device)
    kept = DeviceRows() if guidance is not None and every > 1 else None
    own_bar = not hasattr(progress, "update")  # else a caller's bar, which the caller closes
    bar = progress_bar(len(steps), bool(progress)) if own_bar else progress
    token = _KEPT.set(kept) if guidance is not None else None
    try:
        for i, (ti, tp) in enumerate(zip(steps, steps[1:] + [-1])):
            t, t_prev = on_device[i].expand(B), on_device[i + 1].expand(B)
            # inference_mode (cheaper than no_grad) when nothing needs gradients; the result is cloned
            # out of inference mode below so that callers can use it in autograd later.
            # a rule that takes no gradient at this step (DSG off its interval, or its last step with final = 0)
            # runs it without a graph: no_grad, not inference_mode, whose result could not join the next graph
            need = need_grad and (grad or grad_at is None or grad_at(i, tp))
            with torch.enable_grad() if need else (torch.no_grad() if need_grad else torch.inference_mode()):
                x_t = x if grad else x.detach().requires_grad_(need)
                step = make_step(denoiser, x_t, i, t, t_prev, eta, generator, clip_x0, noise=zeros,
                                 abars=step_abars(abar, ti, tp), times=(ti, tp))
                x = guidance(step) if guidance is not None else step.sample()
            if guidance is not None:
                _check_rule_output(guidance, x, step, kept)
            if not grad:
                x = x.detach()
            if callback is not None:
                callback(step)
            if bar is not None:
                bar.update(1)
            if kept is not None and (i + 1) % every == 0:
                kept.read()
        if kept is not None:
            kept.read()
        if guidance is None and not bool(torch.isfinite(x).all()):  # once, at the end: one wait for the device
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise FloatingPointError(f"{bad} of {B} samples are not finite (NaN or inf): the denoiser's predictions "
                                     "were not, or took them there (check the model's weights; clip_x0 bounds "
                                     "x0_hat)")
    except Exception as err:  # an unread bad guidance step before the failure is its likely cause: reported first
        if kept is not None:
            kept.read_before(err)
        if guidance is not None and not need_grad and type(err) is RuntimeError and "does not require grad" in str(err):
            raise RuntimeError(f"{err} (a guidance rule that differentiates through x_t needs needs_grad = True, "
                            "an attribute of the rule, so that the sampler keeps the graph)") from err
        raise
    finally:
        if token is not None:  # an interrupted run's unread checks go with it
            _KEPT.reset(token)
        if bar is not None and own_bar:
            bar.close()
    return x if need_grad else x.clone()


def _check_rule_output(rule: object, x: object, step: Step, kept: DeviceRows | None) -> None:
    """A guidance rule's ``x_{t_prev}``: a tensor of ``x_t``'s shape, and finite: checked at once on the CPU
    (``kept`` None), else kept with the figures its message needs and read in blocks (:mod:`condiff.readback`)."""
    name = getattr(rule, "__name__", None) or type(rule).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"the guidance rule {name} returned {type(x).__name__} at step {step.i}, not x_{{t_prev}} "
                        f"(a tensor of x_t's shape {tuple(step.x_t.shape)})")
    if x.shape != step.x_t.shape:
        raise ValueError(f"the guidance rule {name} returned shape {tuple(x.shape)} at step {step.i}; x_{{t_prev}} "
                         f"must have x_t's shape {tuple(step.x_t.shape)}")
    ok = torch.isfinite(x).all()
    if kept is None and bool(ok):
        return
    xt = step.x_t.detach()
    figures = torch.stack([ok, torch.isfinite(step.eps_hat).all(), torch.isfinite(xt).all(),
                           xt.abs().nan_to_num(nan=0.0).max().to(torch.float64)]).to(torch.float64)
    reader = partial(_bad_rule_output, name, step.i, step.t_host, step.denoiser)
    if kept is None:
        reader(figures.tolist())
    else:
        kept.keep(figures, reader)


def _bad_rule_output(name: str, i: int, t: int, denoiser: Denoiser, row: list[float]) -> None:
    """Raise for a rule's non-finite ``x_{t_prev}`` (``row``: whether it, the prediction and ``x_t`` were
    finite, and ``x_t``'s largest ``|x|``), put down to the denoiser or to the rule."""
    ok, eps_ok, xt_ok, big = row
    if ok:
        return
    where = f"at step {i} (t = {t})"
    if not eps_ok:  # the model's own prediction
        from .data import nominal_range  # the data package is heavy and imports the samplers' users

        # x_t stays within a few times the data's scale along a sane chain; far beyond it, the rule took it there
        scale = max(1.0, *(abs(v) for v in nominal_range(getattr(denoiser, "value_range", None))))
        why = "the rule's earlier steps took x_t that far out: lower its step size (zeta, rate)" if (
            xt_ok and big > 100 * scale) else "check the model"
        raise FloatingPointError(f"the denoiser's prediction is not finite (NaN or inf) {where}, at x_t of "
                                 f"largest |x| {big:.3g}, so the guidance rule {name} could not be: {why}")
    raise FloatingPointError(f"the guidance rule {name} returned non-finite values (NaN or inf) {where}, from a "
                             "finite prediction: lower its step size (zeta, rate), or check its loss there")


def ddpm(denoiser: Denoiser, x: Tensor, generator: torch.Generator | None = None, **kw) -> Tensor:
    """DDPM ancestral sampling over all ``T`` steps (DDIM with ``eta = 1`` and unit stride)."""
    ts = torch.arange(denoiser.schedule.T - 1, -1, -1)
    return ddim(denoiser, x, ts, eta=1.0, generator=generator, **kw)


def sample(denoiser: Denoiser, shape: tuple[int, ...], steps: int = 100, eta: float = 0.0,
           generator: torch.Generator | None = None, device: str | torch.device | None = None,
           spacing: str = "linspace", **kw) -> Tensor:
    """Draw ``shape[0]`` samples: fresh noise ``x_T`` (in the dtype of the denoiser's weights, on ``device``,
    by default where its weights are), then :func:`ddim` over ``steps`` timesteps."""
    check_denoiser(denoiser)
    check_shape(denoiser, shape, batch=True)
    return _draw(denoiser, shape, steps, eta, generator, device, spacing, **kw)


def _draw(denoiser: Denoiser, shape: tuple[int, ...], steps: int = 100, eta: float = 0.0,
          generator: torch.Generator | None = None, device: str | torch.device | None = None,
          spacing: str = "linspace", **kw) -> Tensor:
    """:func:`sample` without its checks (:func:`generate` makes them once for all its batches)."""
    device = checks.param_device(denoiser) if device is None else device
    x = randn(shape, generator, device=device, dtype=checks.param_dtype(denoiser))
    return ddim(denoiser, x, denoiser.schedule.timesteps(steps, spacing), eta=eta, generator=generator, **kw)


def generate(denoiser: Denoiser, n: int, shape: tuple[int, ...], batch_size: int = 256,
             progress: bool = False, **kw) -> Tensor:
    """Draw ``n`` samples of per-sample ``shape`` in batches of ``batch_size``, one batch after the other
    from the one ``generator`` (each batch's start noise, then its steps' noise). The samples of a seed
    therefore depend on ``batch_size`` (and the first ``k`` of ``n`` samples are not those of ``n = k``
    unless ``k`` is a whole number of batches): keep it, and record it, to reproduce a result. A denoiser
    conditioned on one label per sample (``den.conditioned(y)``, ``y`` of length ``n``) gets each batch's
    labels."""
    out = []
    if not checks.is_integer(batch_size, 1):
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    n = checks.integer("n (the number of samples)", n)
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"shape must be the per-sample shape as a tuple, e.g. (1, 8, 8), got {shape!r}")
    check_shape(denoiser, shape, batch=False)  # said once, to the caller
    # (a bad step count fails before the progress bar is drawn)
    per_batch = len(denoiser.schedule.timesteps(kw.get("steps", 100), kw.get("spacing", "linspace")))
    # the bar counts sampler steps over all batches, so that one batch of many samples moves it too
    bar = progress_bar(-(-n // batch_size) * per_batch, progress, unit="step", desc=f"sampling {n}")
    if bar is not None:
        kw = {**kw, "progress": bar}  # each batch's ddim advances it
    try:
        labels = getattr(denoiser, "y", None)  # one label per sample (den.conditioned(y) with y of length n)
        per_sample = isinstance(labels, Tensor) and labels.shape == (n,) and n > batch_size
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            den = denoiser.conditioned(labels[start:start + b], denoiser.guidance_scale) if per_sample else denoiser
            out.append(_draw(den, (b, *shape), **kw).cpu())  # (checked once, above)
            if den is not denoiser:
                denoiser.nfe += den.nfe
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out) if out else torch.empty(0, *shape)


_QUIET: ContextVar[bool] = ContextVar("condiff_quiet", default=False)  # the command line's --quiet


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """Within the block, :func:`progress_bar` makes no bar whatever its callers ask (``condiff ... --quiet``)."""
    token = _QUIET.set(bool(quiet) or _QUIET.get())
    try:
        yield
    finally:
        _QUIET.reset(token)


def progress_bar(total: int, enabled: bool, unit: str = "step", desc: str | None = None, initial: int = 0,
                 leave: bool = False):
    """A tqdm bar of ``total`` units (transient unless ``leave``), or ``None`` when not ``enabled`` or inside
    :func:`quiet_progress` (callers skip updates). Written to a file or pipe rather than a terminal it
    refreshes every 10 s."""
    if not enabled or _QUIET.get():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, leave=leave, dynamic_ncols=True, desc=desc,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)
