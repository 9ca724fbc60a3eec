"""Discrete variance-preserving (DDPM) noise schedule.

``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for integer ``t`` in ``[0, T)``, as in DDPM and
diffusers. Tables are kept in float64 and cast on use, so long schedules keep their precision.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import checks

SPACINGS = ("linspace", "leading", "trailing")


T_NAME = "schedule.T (the number of diffusion steps)"  # how the builders' check names T

#: The smallest last ``abar`` a schedule may have: ``1 / sqrt(abar)`` must leave float32 room (1e30).
ABAR_MIN = 1e-60


def check_schedule(where: str, schedule: object) -> None:
    """Refuse anything but a :class:`Schedule` where one is expected (``where`` names the taker), in one line."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"{where} needs the noise schedule (a condiff.schedule.Schedule, e.g. Schedule.linear(1000)), "
                        f"got {type(schedule).__name__}")


@dataclass(frozen=True, eq=False)
class Schedule:
    """A DDPM schedule given by its betas (a ``(T,)`` float64 tensor).

    Build one with :meth:`linear`, :meth:`cosine` or :meth:`from_diffusers_config`.
    """

    betas: Tensor
    kind: str = "custom"
    abar: Tensor = field(init=False, repr=False)
    # abar_at's lookup table per device: built once, so that a step on a GPU copies nothing from the
    # host (a host-to-device copy waits for the device)
    _tables: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        b = torch.as_tensor(self.betas, dtype=torch.float64).flatten()
        if b.numel() < 2:
            raise ValueError(f"a schedule needs at least 2 steps, got {b.numel()}")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must lie strictly between 0 and 1")
        abar = torch.cumprod(1.0 - b, 0)
        if float(abar[-1]) < ABAR_MIN:
            raise ValueError(f"the schedule's last abar is {float(abar[-1]):.3g}: predicting x0 divides by sqrt(abar), "
                             f"which overflows float32 below abar = {ABAR_MIN:g}; use fewer steps or smaller betas")
        object.__setattr__(self, "betas", b)
        object.__setattr__(self, "abar", abar)

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """DDPM's linear betas (Ho et al. 2020)."""
        T = checks.integer(T_NAME, T, 2)
        beta_start, beta_end = (checks.number(f"schedule {k}", v) for k, v in (("beta_start", beta_start),
                                                                              ("beta_end", beta_end)))
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), kind="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """Nichol & Dhariwal's cosine schedule: abar(t) = cos^2((t/T + s)/(1 + s) * pi/2), normalised."""
        T = checks.integer(T_NAME, T, 2)
        s, max_beta = checks.number("schedule s", s), checks.number("schedule max_beta", max_beta)
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        if not (s >= 0 and 0 < max_beta < 1):
            raise ValueError(f"cosine schedule: s must be >= 0 and max_beta in (0, 1), got s={s}, max_beta={max_beta}")
        b = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        sch = cls(torch.tensor(b, dtype=torch.float64), kind="cosine")
        object.__setattr__(sch, "params", {"s": float(s), "max_beta": float(max_beta)})
        return sch

    @classmethod
    def from_config(cls, cfg: dict) -> Schedule:
        """Rebuild from :meth:`config` output (``{"kind": ..., "T": ..., ...}``)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"a schedule's settings must be a table, got {cfg!r}")
        cfg = dict(cfg)
        kind = cfg.pop("kind", "linear")
        if kind == "custom" and set(cfg) == {"betas"}:  # a schedule given by its betas (e.g. from diffusers)
            betas = cfg["betas"]
            if not (isinstance(betas, list | tuple | Tensor) and all(checks.is_number(b) for b in betas)):
                raise ValueError(f"schedule betas must be a list of numbers, got {betas!r:.80}")
            return cls(torch.as_tensor(betas, dtype=torch.float64))
        builders = {"linear": cls.linear, "cosine": cls.cosine}
        if not isinstance(kind, str) or kind not in builders:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(builders)}")
        known = [k for k in inspect.signature(builders[kind]).parameters if k != "cls"]
        if bad := sorted(set(cfg) - set(known)):
            raise ValueError(f"unknown schedule setting(s) {bad} for kind {kind!r}; known: {known}")
        return builders[kind](**cfg)  # each builder checks T

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> Schedule:
        """Build from a diffusers scheduler config (``scheduler_config.json`` contents)."""
        T = checks.integer("num_train_timesteps", cfg.get("num_train_timesteps", 1000))
        kind = cfg.get("beta_schedule", "linear")
        start = checks.number("beta_start", cfg.get("beta_start", 1e-4), "> 0")
        end = checks.number("beta_end", cfg.get("beta_end", 0.02), "> 0")
        if cfg.get("trained_betas") is not None:
            return cls(torch.tensor(cfg["trained_betas"], dtype=torch.float64))
        if kind == "linear":
            return cls.linear(T, start, end)
        if kind == "scaled_linear":
            b = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
            return cls(b, kind="scaled_linear")
        if kind == "squaredcos_cap_v2":
            return cls.cosine(T)
        raise ValueError(f"unsupported diffusers beta_schedule {kind!r}")

    def config(self) -> dict:
        """A JSON-ready description; for a custom schedule the betas themselves."""
        if self.kind == "linear":
            return {"kind": "linear", "T": self.T, "beta_start": float(self.betas[0]),
                    "beta_end": float(self.betas[-1])}
        if self.kind == "cosine":
            return {"kind": "cosine", "T": self.T, **getattr(self, "params", {})}
        return {"kind": "custom", "betas": self.betas.tolist()}

    # --- queries ------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return self.betas.numel()

    def check_timesteps(self, t: Tensor, lo: int = -1) -> None:
        """Refuse timesteps outside ``[lo, T)`` (``t = -2`` would wrap to ``abar_T``) or between steps (3.7
        would be read as 3). Checked where it is free, on the CPU: on a GPU it would wait for the device at
        every call."""
        if t.device.type != "cpu" or not t.numel():
            return
        whole = not t.is_floating_point() or bool((t == t.round()).all())
        if not whole or float(t.min()) < lo or float(t.max()) >= self.T:
            clean = " (-1: clean data)" if lo == -1 else ""
            raise ValueError(f"timesteps must lie in [{lo}, {self.T}){clean} as whole steps, got values in "
                             f"[{float(t.min()):g}, {float(t.max()):g}]")

    def abar_at(self, t: Tensor, like: Tensor) -> Tensor:
        """``abar_t`` for a ``(B,)`` long tensor, shaped to broadcast against ``like`` (B, ...).

        ``t = -1`` means "before the first step": ``abar = 1`` (clean data).
        """
        self.check_timesteps(t)
        table = self._tables.get(like.device)
        if table is None:
            table = self._tables[like.device] = torch.cat([self.abar.new_ones(1), self.abar]).to(like.device)
        a = table[t.to(like.device).long() + 1].to(like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1)))

    def coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` as :meth:`abar_at` shapes them, in ``like``'s dtype. They are
        computed in float32 at least: in half precision ``1 - abar_t`` of the first steps rounds to 0
        (float16: 2 steps of the linear schedule, bfloat16: 10), which would add no noise there and make
        the score infinite."""
        wide = like if like.dtype in (torch.float32, torch.float64) else like.float()
        a = self.abar_at(t, wide)
        return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; ``t`` is ``(B,)`` or one step for all."""
        checks.floating("x0", x0)
        if eps.shape != x0.shape:
            raise ValueError(f"add_noise: eps must have x0's shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
        t = torch.as_tensor(t, device=x0.device)
        if t.dim() == 0:
            t = t.expand(x0.shape[0])
        if t.shape != (x0.shape[0],):
            raise ValueError(f"add_noise: t must be one step or one per sample, shape ({x0.shape[0]},), "
                             f"got shape {tuple(t.shape)}")
        s, s1 = self.coefs(t, x0)
        return s * x0 + s1 * eps

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (infinite at ``t = -1``, clean data)."""
        t = torch.as_tensor(t)
        a = self.abar_at(t.reshape(-1).cpu(), self.abar).reshape(t.shape)
        return a / (1 - a)

    def timesteps(self, steps: int, spacing: str = "linspace") -> Tensor:
        """``steps`` distinct sampling timesteps in decreasing order, as a ``(steps,)`` long tensor.

        ``linspace`` spreads them evenly over ``[0, T-1]`` (first step at ``T-1``, last at ``0``);
        ``leading`` and ``trailing`` reproduce diffusers' ``timestep_spacing`` options, except that
        ``trailing`` rounds an exact half the other way for some step counts (48 of 1000: 937 where
        diffusers has 936) and never returns diffusers' extra final step at ``-1`` (for e.g. 61 steps).
        """
        T = self.T
        if not checks.is_integer(steps):
            raise ValueError(f"steps must be an integer, got {steps!r}")
        if not 1 <= int(steps) <= T:
            raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
        steps = int(steps)
        if spacing == "linspace":
            ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
        elif spacing == "leading":
            ts = (torch.arange(steps - 1, -1, -1) * (T // steps)).long()
        elif spacing == "trailing":
            # T - i T / steps for i < steps (an arange with a float stride can overshoot by one entry)
            ts = ((T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round() - 1).long()
        else:
            raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
        return ts
