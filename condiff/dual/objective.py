"""The primal-dual objective for :class:`condiff.train.Trainer` (Khalafi, Ding, Ribeiro, NeurIPS 2024).

Problem: ``min_theta L_0(theta)  s.t.  L_i(theta) <= b_i, i = 1..m``, where ``L_0`` is the denoising
loss on the objective data ``q_0`` and ``L_i`` the denoising loss on constraint data ``q_i`` (each the
diffusion ELBO surrogate of ``KL(q_i || p_theta)`` up to a model-independent constant).

Each primal step draws one minibatch per data set and descends the Lagrangian
``L_0 + sum_i lambda_i L_i``; every ``every`` steps the dual step estimates each ``L_i`` on fresh
minibatches at a fixed grid of timesteps (low variance: no timestep sampling noise) and sets
``lambda_i <- max(0, lambda_i + lr * (L_i - b_i))``. Everything else (EMA, checkpoints, exact resume,
progress, DDP) comes from the core trainer: ``lambda`` travels in the checkpoint through
:meth:`DualObjective.state_dict`, and under DDP the dual estimates are averaged over ranks so every
process holds the same ``lambda``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import checks
from ..schedule import Schedule, check_schedule
from ..train import all_reduce_mean, denoising_loss, step_seed

# Mixed into the run seed so the dual estimator's draws never coincide with the primal step's.
_DUAL_SEED_TAG = 0x6475616C  # "dual"


@dataclass
class Constraint:
    """One constraint ``L_i(theta) <= bound`` on the data ``x`` (N, ...) of ``q_i``.

    ``batch_size``: examples of ``q_i`` per primal step (default: the objective's batch size).
    """

    name: str
    x: Tensor
    bound: float
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse a bad name, data, bound or batch size (when made, and again by :class:`DualObjective`: the
        fields can be changed after)."""
        checks.constraint_name(self.name)
        if not isinstance(self.x, Tensor) or self.x.dim() < 2 or self.x.shape[0] == 0:
            shape = tuple(self.x.shape) if isinstance(self.x, Tensor) else type(self.x).__name__
            raise ValueError(f"constraint {self.name!r}: data must be a non-empty (N, ...) tensor, "
                             f"got {shape}")
        checks.finite_rows(f"constraint {self.name!r}: data", self.x)
        if not (checks.is_number(self.bound) and self.bound >= 0):  # a denoising loss is never negative
            raise ValueError(f"constraint {self.name!r}: bound must be a finite number >= 0, got {self.bound}")
        if self.batch_size is not None:
            self.batch_size = checks.integer(f"constraint {self.name!r}: batch_size", self.batch_size)


@dataclass
class DualConfig:
    """Settings of the dual step.

    every: primal steps per dual update (K).
    lr: dual step size ``eta_dual``.
    batch_size: fresh examples per constraint for each dual estimate.
    timesteps: size of the fixed timestep grid of the dual estimate (midpoints of equal strata of
        ``[0, T)``); example ``j`` of a batch is noised at grid point ``j mod timesteps``.
    t_range: the fraction ``[a, b)`` of ``[0, T)`` on which the dual step measures the constraint
        losses ``L_i`` (the primal step always trains on the whole Lagrangian, so for fixed lambda
        its optimum stays the mixture ``(q_0 + sum lambda_i q_i) / (1 + sum lambda_i)``). The default
        ``(0, 1)`` is the method as published. A constraint set of a few examples is soon
        memorised, which lowers its loss at small ``t`` without moving probability mass towards it;
        the mass a model gives a class shows at larger ``t``, so measuring on ``(0.3, 1)`` makes
        lambda respond to mass (see docs/dual.md).
    start: no dual update before this primal step (lets ``L_i`` fall from its untrained value first).
    lambda_init: initial value of every ``lambda_i``.
    normalize: divide the primal loss by ``1 + sum lambda``, i.e. train on the mixture
        ``(q_0 + sum lambda_i q_i) / (1 + sum lambda_i)`` with unit total weight; same minimiser,
        but the gradient scale (and so grad clipping and Adam's moments) does not move with lambda.
    seed: seeds the dual estimator's draws (per step and rank, so resume is exact).
    """

    every: int = 50
    lr: float = 1.0
    batch_size: int = 128
    timesteps: int = 16
    t_range: tuple[float, float] = (0.0, 1.0)
    start: int = 0
    lambda_init: float = 0.0
    normalize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("every", "batch_size", "timesteps"):
            setattr(self, name, checks.integer(f"dual.{name}", getattr(self, name)))
        self.start = checks.integer("dual.start", self.start, 0)
        for name in ("lr", "lambda_init"):
            setattr(self, name, checks.number(f"dual.{name}", getattr(self, name), ">= 0"))
        tr = checks.pair(self.t_range)
        if tr is None or not 0 <= tr[0] < tr[1] <= 1:
            raise ValueError(f"dual.t_range must be two numbers [a, b] with 0 <= a < b <= 1, got {self.t_range!r}")
        self.t_range = tr
        if not isinstance(self.normalize, bool):
            raise ValueError(f"dual.normalize must be true or false, got {self.normalize!r}")
        self.seed = checks.seed("dual.seed", self.seed)

    def check_grid(self, T: int) -> None:
        """Refuse a timestep grid that does not fit ``t_range`` of ``[0, T)`` (before any training)."""
        lo, hi = t_bounds(T, self.t_range)
        if not self.timesteps <= hi - lo:
            raise ValueError(f"dual.timesteps must be <= {hi - lo}, the timesteps in dual.t_range "
                             f"{list(self.t_range)} of a schedule of T = {T}, got {self.timesteps}")

    @classmethod
    def from_dict(cls, d: dict, also: tuple[str, ...] = ()) -> DualConfig:
        """``also``: options of the same table that the caller reads itself (``dual train``'s ``init``),
        named among the known ones when an option is unknown."""
        checks.table("dual", d)
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known - set(also))
        if bad:
            raise ValueError(f"unknown dual option(s) {bad}; known: {sorted(known | set(also))}")
        return cls(**{k: v for k, v in d.items() if k not in also})


def t_bounds(T: int, t_range: tuple[float, float] = (0.0, 1.0)) -> tuple[int, int]:
    """The integer timesteps ``[lo, hi)`` of the fraction ``t_range`` of ``[0, T)``."""
    lo, hi = round(t_range[0] * T), round(t_range[1] * T)
    if not 0 <= lo < hi <= T:
        raise ValueError(f"dual.t_range {list(t_range)} holds no timestep of [0, {T})")
    return lo, hi


def fixed_timesteps(T: int, k: int, t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Midpoints of ``k`` equal strata of ``[lo, hi)`` (``t_range`` of ``[0, T)``): a ``(k,)`` long
    tensor, the midpoint quadrature of the uniform timestep average in the denoising loss."""
    lo, hi = t_bounds(T, t_range)
    if not 1 <= k <= hi - lo:
        raise ValueError(f"the dual timestep grid needs 1 <= k <= {hi - lo} points in [{lo}, {hi}), got {k} (the "
                         "dual settings' timesteps, within t_range of the schedule's T)")
    return lo + ((torch.arange(k, dtype=torch.float64) + 0.5) * (hi - lo) / k).floor().long()


def draw(x: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` rows of ``x`` (N, ...) drawn uniformly with replacement -> (n, ...)."""
    idx = torch.randint(0, x.shape[0], (n,), generator=generator, device=generator.device)
    return x[idx.to(x.device)]


@torch.no_grad()
def estimate_losses(net: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, datasets: Sequence[Tensor],
                    batch_size: int, grid: Tensor, generator: torch.Generator) -> Tensor:
    """Denoising loss of ``net(x_t, t)`` on each data set: ``batch_size`` fresh examples each, example
    ``j`` noised at ``grid[j mod len(grid)]``. Returns a ``(len(datasets),)`` float64 tensor.

    A module runs in eval mode (no dropout) and is put back in its previous mode.
    """
    was_training = isinstance(net, nn.Module) and net.training
    if isinstance(net, nn.Module):
        net.eval()
    try:
        out = []
        for x in datasets:
            x0 = draw(x, batch_size, generator)
            t = grid.to(x0.device)[torch.arange(batch_size, device=x0.device) % grid.numel()]
            out.append(denoising_loss(net, schedule, x0, None, generator, t=t).double().mean())
        return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)
    finally:
        if isinstance(net, nn.Module):
            net.train(was_training)


class DualObjective:
    """Objective for :class:`condiff.train.Trainer`: the Lagrangian of the constrained problem.

    Args:
        x: (N, ...) objective data ``q_0``.
        constraints: the ``(q_i, b_i)``; data shapes must match ``x`` per sample.
        schedule: the noise schedule of the model.
        batch_size: examples of ``q_0`` per primal step.
        cfg: dual-step settings (:class:`DualConfig`).
    """

    def __init__(self, x: Tensor, constraints: Sequence[Constraint], schedule: Schedule, batch_size: int,
                 cfg: DualConfig | None = None) -> None:
        if cfg is not None and not isinstance(cfg, DualConfig):
            raise TypeError(f"DualObjective's settings are a DualConfig (DualConfig(every=...), or "
                            f"DualConfig.from_dict(d) for a dict), got {type(cfg).__name__}")
        self.cfg = cfg or DualConfig()
        if not isinstance(x, Tensor):
            hint = " (its .x)" if isinstance(getattr(x, "x", None), Tensor) else ""
            raise TypeError(f"objective data must be a torch tensor (N, ...){hint}, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"objective data must be a non-empty (N, ...) tensor, got {tuple(x.shape)}")
        if isinstance(constraints, Constraint) or not isinstance(constraints, list | tuple) or not all(
                isinstance(c, Constraint) for c in constraints):
            got = type(constraints).__name__ if not isinstance(constraints, list | tuple) else \
                ", ".join(sorted({type(c).__name__ for c in constraints}))
            raise TypeError(f"constraints must be a list of condiff.dual.Constraint(name, x, bound), got {got}")
        for c in constraints:
            c.check()  # a bound set to NaN after the constraint was made reached the dual step unchecked
        check_schedule("DualObjective", schedule)
        checks.finite_rows("objective data", x)
        batch_size = checks.integer("batch_size", batch_size, 1)
        names = [c.name for c in constraints]
        if len(set(names)) != len(names):
            raise ValueError(f"constraint names must be unique, got {names}")
        for c in constraints:
            if c.x.shape[1:] != x.shape[1:]:
                raise ValueError(f"constraint {c.name!r}: samples of shape {tuple(c.x.shape[1:])} but the "
                                 f"objective data have {tuple(x.shape[1:])}")
            if c.x.dtype != x.dtype:  # a float64 constraint beside float32 data failed inside the network
                raise ValueError(f"constraint {c.name!r}: samples of dtype {c.x.dtype} but the objective data are "
                                 f"{x.dtype}: convert them with .to({x.dtype})")
        self.x, self.schedule, self.batch_size = x, schedule, int(batch_size)
        self.constraints = list(constraints)
        self.names = names
        self.bounds = torch.tensor([float(c.bound) for c in constraints], dtype=torch.float64)
        # what a checkpoint records of the constraints (beside the bounds, kept as a tensor of their own), so that a
        # resume under constraints of other names is refused: their lambdas would be carried over to constraints
        # they were never for. A constraint's data and bound may change (`dual train --resume` after its table drew
        # more samples; a relative bound computed again)
        self._setup = {"names": names}
        zero = [c.name for c in constraints if c.bound == 0]
        if zero and self.cfg.lr > 0:  # allowed for a fixed lambda (dual.lr = 0), where no update reads it
            warnings.warn(f"constraint(s) {zero}: a bound of 0 can never hold (a denoising loss is positive), so "
                          f"lambda grows at every dual update (dual lr {self.cfg.lr}); give a bound > 0, or "
                          "lr = 0 to keep lambda fixed", stacklevel=2)
        self.lam = torch.full((len(constraints),), float(self.cfg.lambda_init), dtype=torch.float64)
        self.estimate = torch.full((len(constraints),), math.nan, dtype=torch.float64)
        self.objective_estimate = torch.tensor(math.nan, dtype=torch.float64)
        self.grid0 = fixed_timesteps(schedule.T, self.cfg.timesteps)                    # for L_0
        self.grid = fixed_timesteps(schedule.T, self.cfg.timesteps, self.cfg.t_range)  # for the L_i
        self._last: dict[str, Tensor] = {}  # the last minibatch losses, on the device (read for log lines)

    # --- Objective protocol ----------------------------------------------------------------------
    def to(self, device: torch.device | str) -> DualObjective:
        self.x = self.x.to(device)
        for c in self.constraints:
            c.x = c.x.to(device)
        return self

    def loss(self, model: nn.Module, step: int,
             generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Lagrangian on one minibatch per data set: ``L_0 + sum_i lambda_i L_i`` (divided by
        ``1 + sum lambda`` when ``cfg.normalize``). Constraints with ``lambda_i = 0`` add nothing to
        the gradient, so their minibatch is skipped. All minibatches go through one network call
        (one DDP forward)."""
        lam = self.lam.tolist()
        active = [i for i, v in enumerate(lam) if v > 0]
        parts = [draw(self.x, self.batch_size, generator)]
        for i in active:
            c = self.constraints[i]
            parts.append(draw(c.x, self._batch_of(c), generator))
        per_sample = denoising_loss(model, self.schedule, torch.cat(parts), None, generator)
        means = [chunk.mean() for chunk in per_sample.split([p.shape[0] for p in parts])]
        total = means[0] + sum(lam[i] * m for i, m in zip(active, means[1:]))
        if self.cfg.normalize:
            total = total / (1.0 + sum(lam))
        self._last = {"L0": means[0].detach()}
        for i, m in zip(active, means[1:]):
            self._last[f"L/{self.names[i]}"] = m.detach()
        return total, dict(self._last)

    def warn_if_idle(self, steps: int) -> None:
        """Warn when ``steps`` primal steps would make no dual update: lambda would keep its initial
        value and the run would be plain training with the constraints ignored."""
        first = -(-max(self.cfg.start, 1) // self.cfg.every) * self.cfg.every  # the first update's step
        if self.names and first > steps:
            warnings.warn(f"no dual update happens in {steps} steps (the first would be at step {first}: "
                          f"dual.start {self.cfg.start}, dual.every {self.cfg.every}), so lambda keeps its "
                          "initial value and the constraints have no effect", stacklevel=3)  # the Trainer's caller

    def after_step(self, model: nn.Module, step: int) -> dict[str, float | Tensor]:
        """Dual ascent after every ``cfg.every``-th primal step (``step`` counts from 0)."""
        done = step + 1
        if done >= self.cfg.start and done % self.cfg.every == 0:
            self.dual_update(model, step)
        return self.logs()

    def state_dict(self) -> dict[str, Tensor]:
        setup = torch.frombuffer(bytearray(json.dumps(self._setup).encode()), dtype=torch.uint8)
        return {"lambda": self.lam.clone(), "estimate": self.estimate.clone(),
                "objective_estimate": self.objective_estimate.clone().reshape(1),
                "bounds": self.bounds.clone(), "setup": setup}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "lambda" not in state:
            raise ValueError("this checkpoint holds no dual variables: it was not written by dual training")
        lam = state["lambda"].detach().cpu().double()
        if lam.shape != self.lam.shape:
            raise ValueError(f"checkpoint holds {lam.numel()} dual variables but this run has "
                             f"{self.lam.numel()} constraints ({self.names})")
        self._check_same_constraints(state)
        self.lam = lam.clone()
        self.estimate = state["estimate"].detach().cpu().double().clone()
        self.objective_estimate = state["objective_estimate"].detach().cpu().double().reshape(())

    def _check_same_constraints(self, state: dict[str, Tensor]) -> None:
        """Refuse dual variables written for constraints of other names (their lambdas would go to constraints
        they were never for); say where the bounds moved (a bound relative to a reference loss is computed
        again at each start, and may move with the device or the constraint's data)."""
        if "setup" in state:
            saved = json.loads(bytes(state["setup"].cpu().to(torch.uint8).tolist()).decode())
            if saved.get("names") != self._setup["names"]:
                raise ValueError(f"this checkpoint's dual variables were written for constraints named "
                                 f"{saved.get('names')}, not {self._setup['names']}: resume with the constraints it "
                                 "was trained under, or start a new run directory")
        if "bounds" in state and not torch.equal(was := state["bounds"].detach().cpu().double(), self.bounds):
            moved = [f"{n} {float(a)!r} -> {float(b)!r}" for n, a, b in zip(self.names, was, self.bounds) if a != b]
            warnings.warn(f"the constraints' bounds differ from those this checkpoint was trained under ("
                          f"{'; '.join(moved)}); the dual variables go on from where they were", stacklevel=3)

    # --- dual step -------------------------------------------------------------------------------
    def dual_update(self, model: nn.Module, step: int) -> Tensor:
        """Estimate ``L_0, L_1..L_m`` on fresh minibatches at the fixed grid, average them over DDP
        ranks, and take the projected dual ascent step. Returns the new ``lambda`` (m,)."""
        device = self.x.device
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        g = torch.Generator(device=device).manual_seed(step_seed(self.cfg.seed ^ _DUAL_SEED_TAG, step, rank))
        bs = self.cfg.batch_size
        xs = [c.x for c in self.constraints]
        est = torch.cat([estimate_losses(model, self.schedule, [self.x], bs, self.grid0, g),
                         estimate_losses(model, self.schedule, xs, bs, self.grid, g)])
        est = all_reduce_mean(est.to(device)).cpu()
        self.objective_estimate, self.estimate = est[0], est[1:]
        self.lam = (self.lam + self.cfg.lr * (self.estimate - self.bounds)).clamp_min(0.0)
        held = torch.isfinite(self.lam.to(self.x.dtype))  # in the loss's precision
        if bool(torch.isfinite(self.estimate).all()) and not bool(held.all()):  # (a diverged model: the trainer's)
            i = int((~held).nonzero()[0])
            raise FloatingPointError(f"the dual variable of constraint {self.names[i]!r} reached "
                                     f"{float(self.lam[i]):.3g} at step {step}, beyond what the weighted loss can "
                                     f"hold: dual.lr {self.cfg.lr:g} is too large for losses of this scale (the "
                                     f"estimate {float(self.estimate[i]):.3g} against the bound "
                                     f"{float(self.bounds[i]):.3g}); lower it")
        return self.lam

    def logs(self) -> dict[str, float | Tensor]:
        """``lambda/NAME``, ``slack/NAME`` (last estimate of ``L_i - b_i``), ``L0_est`` and the last
        minibatch losses (0-dim tensors, read only for a log line); written to the trainer's JSONL log."""
        out = dict(self._last)
        estimated = bool(torch.isfinite(self.objective_estimate))  # NaN until the first dual step
        if estimated:
            out["L0_est"] = float(self.objective_estimate)
        for i, n in enumerate(self.names):
            out[f"lambda/{n}"] = float(self.lam[i])
            if estimated:
                out[f"slack/{n}"] = float(self.estimate[i] - self.bounds[i])
        return out

    @property
    def examples_per_step(self) -> int:
        """The examples a primal step draws while every multiplier is positive: the objective's batch plus
        each constraint's (its own batch size, else the objective's)."""
        return self.batch_size + sum(self._batch_of(c) for c in self.constraints)

    def _batch_of(self, c: Constraint) -> int:
        """A constraint's minibatch: its own batch size, else the objective's."""
        return int(c.batch_size or self.batch_size)

    @property
    def lambdas(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.lam)}


def reference_losses(net: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, datasets: Sequence[Tensor],
                     timesteps: int = 16, n: int = 4096, seed: int = 0, chunk: int = 1024,
                     t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Denoising loss of a reference model on each data set with the dual step's estimator (the same
    fixed timestep grid), on ``n`` draws per data set: a ``(len(datasets),)`` float64 tensor.

    Relative thresholds are ``b_i = relative_i * reference_losses(ref, ...)[i]``; measuring the
    reference with the dual estimator itself means the grid's quadrature error cancels.
    """
    n, chunk = checks.integer("reference_losses: n", n, 1), checks.integer("reference_losses: chunk", chunk, 1)
    if empty := [i for i, x in enumerate(datasets) if len(x) == 0]:
        raise ValueError(f"reference_losses: data set(s) {empty} hold no examples")
    for i, x in enumerate(datasets):
        checks.finite_rows(f"reference_losses: the examples of data set {i}", x)
        if isinstance(net, nn.Module):
            checks.weights_dtype(f"reference_losses: data set {i}", x, net)
    grid = fixed_timesteps(schedule.T, timesteps, t_range)
    params = net.parameters() if isinstance(net, nn.Module) else iter(())
    device = next((p.device for p in params), torch.device("cpu"))
    g = torch.Generator(device=device).manual_seed(int(seed))
    total = torch.zeros(len(datasets), dtype=torch.float64)
    done = 0
    while done < n:
        b = min(chunk, n - done)
        b -= b % grid.numel() if b > grid.numel() else 0  # whole grid sweeps keep the quadrature exact
        total += b * estimate_losses(net, schedule, [x.to(device) for x in datasets], b, grid, g).cpu()
        done += b
    return total / done
