"""Differentiable distances ``l(x) >= 0`` to constraint sets, zero on the set; one family per file.

Every constraint is a callable ``x (B, ...) -> (B,)``, differentiable in ``x``, with a JSON ``config``
(``{"name": ..., **kwargs}``) so ``build_constraint(c.config)`` rebuilds it. Families register with
:func:`register_constraint`; any user callable of the same shape can be used wherever a constraint
is expected (:func:`check_distance` validates it on a batch).

=================  ==================================================  ==========================
name               set                                                 file
=================  ==================================================  ==========================
box                ``lo <= x <= hi`` elementwise                       convex.py
ball               ``||x - c|| <= r`` per sample                       convex.py
simplex            ``x >= 0, sum(x) = s`` per sample                   convex.py
brightness         fixed total flux ``sum((x - lo)/(hi - lo)) = F``    brightness.py
burgers            space-time image solves 1D viscous Burgers          burgers.py
divergence_free    2D velocity fields with zero spectral divergence    divergence.py
periodic           image is a 2x2 tiling of one tile                   periodic.py
count              exactly ``k`` sources, judged by a counting CNN     count.py
python             a user's callable in a Python file (``FILE:NAME``)  python.py
=================  ==================================================  ==========================
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from condiff import checks

Distance = Callable[[Tensor], Tensor]


def device_of(constraint: Distance, default: torch.device | str = "cpu") -> torch.device:
    """The device a constraint's weights live on (a counting CNN on a GPU); ``default`` for one without."""
    if isinstance(constraint, nn.Module):
        t = next(iter([*constraint.parameters(), *constraint.buffers()]), None)
        if t is not None:
            return t.device
    return torch.device(default)

CONSTRAINTS: dict[str, type] = {}


HALF = (torch.float16, torch.bfloat16)


def at_least_float32(x: Tensor) -> Tensor:
    """``x``, in float32 where it is half precision (float16, bfloat16) or integer: distances are sums
    over many entries and steppers of many small terms, which half precision rounds away (an exact
    Burgers trajectory read 6.7e-3 in bfloat16, above a vanilla model's violation) or overflows, and
    integer pictures are measured as their values."""
    return x.float() if x.dtype in HALF or not (x.is_floating_point() or x.is_complex()) else x


def register_constraint(name: str) -> Callable[[type], type]:
    """Class decorator: make ``build_constraint({"name": name, ...})`` construct this class. A config
    names the registered class it was built by; a registered subclass of a built-in constraint whose
    ``__init__`` takes other arguments sets its own ``self.config`` (else it inherits its parent's keys)."""

    def deco(cls: type) -> type:
        if CONSTRAINTS.get(name, cls) is not cls:
            raise ValueError(f"constraint {name!r} is already registered to {CONSTRAINTS[name].__qualname__}")
        CONSTRAINTS[name] = cls
        cls.family = name
        return cls

    return deco


class Constraint(nn.Module):
    """Base class: ``forward(x (B, ...)) -> (B,)`` distances; subclasses set ``self.config``.

    ``violation_map(x)`` returns a per-pixel picture of where ``x`` breaks the constraint,
    ``(B, H, W)``, or ``None`` for constraints with no local meaning (a total flux).
    """

    family = "constraint"
    config: dict

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        # a half-precision batch is measured in float32, and its distances come back in float32
        return super().__call__(at_least_float32(x), *args, **kwargs)

    def violation_map(self, x: Tensor) -> Tensor | None:
        return None

    def learned_parts(self) -> dict | None:
        """How the constraint's learned parts (a counting CNN) were made, or ``None`` if it has none;
        work fitted against the constraint records it, so a new recipe is not mixed with old fits."""
        return None

    def _check_image(self, x: Tensor, channels: int | None = None) -> None:
        if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
            want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
            raise ValueError(f"{self.family} constraint expects images {want}, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        config = getattr(self, "config", None)  # a subclass of one's own may keep none
        return ", ".join(f"{k}={v}" for k, v in config.items() if k != "name") if isinstance(config, dict) else ""


def build_constraint(config: dict, how: str | None = None, saved_by: str | None = None,
                     progress: bool | None = None, device: str | torch.device | None = None) -> Constraint:
    """Build a registered constraint from ``{"name": NAME, **kwargs}``. ``how``: how a user of the
    calling command gives a constraint its arguments, for the error when they are wrong (default: the
    ``namm`` commands' ``--set data.constraint=...``). ``saved_by``: what ``config`` was read from, where a
    constraint of one's own (``python``) runs its file only if the file is trusted (loading must not run code
    a saved file names: :func:`condiff.userfile.load_from_file`). ``progress``: for a family that trains a
    part on first use (count's counter), whether it shows a progress bar (default: the family's, on), and
    ``device``: where it trains that part (the device the caller computes on; default: the family's)."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"a constraint config must be a dict with a 'name' key, got {config!r}")
    kwargs = dict(config)
    name = kwargs.pop("name")
    if name not in CONSTRAINTS:
        known = ", ".join(sorted(n for n in CONSTRAINTS if n != "python"))
        raise ValueError(f"unknown constraint {name!r}; known: {known}, or FILE.py:NAME for your own")
    if saved_by is not None and name == "python":
        kwargs["saved_by"] = saved_by
    if progress is not None and "progress" in inspect.signature(CONSTRAINTS[name]).parameters:
        kwargs["progress"] = progress
    if device is not None and "device" in inspect.signature(CONSTRAINTS[name]).parameters:
        kwargs["device"] = device
    try:
        return CONSTRAINTS[name](**kwargs)
    except TypeError as err:
        example = "FILE.py:NAME" if name == "python" else f"{{name = \"{name}\", ...}}"
        how = how or f"on the command line: --set 'data.constraint={example}'"
        raise ValueError(f"bad arguments for constraint {name!r}: {err} ({how})") from None


def not_differentiable(what: str, wrt: str = "x") -> str:
    """The message for a value ``what`` through which no gradient reaches ``wrt``."""
    return (f"{what} must be differentiable in {wrt}: no gradient reaches {wrt} (is it computed under no_grad, "
            "detached, or through numpy?)")


def check_distance(fn: Distance, x: Tensor, on: str = "") -> Tensor:
    """Evaluate a user distance on ``x`` (B, ...) and check it returns finite floating-point ``(B,)``
    values >= 0 through which a gradient reaches ``x``; returns them (detached). ``on`` says what ``x``
    is, for the message when the values are not finite (``" on the prior's own samples ..."``)."""
    if not callable(fn):
        raise TypeError(f"a constraint distance must be callable x -> (B,), got {type(fn).__name__}")
    checks.eval_mode(fn, "a constraint distance that is a network")
    checks.gradients_on("checking a constraint distance")
    xg = x.detach().clone().requires_grad_(x.is_floating_point())
    with torch.enable_grad(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = fn(xg)
    if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        # what the distance's own code warned on the way (torch's "converting a tensor ... to a scalar" for a
        # float(...)) is left out: this says what is wrong
        raise ValueError(
            f"a constraint distance must return shape ({x.shape[0]},) for a batch of "
            f"{x.shape[0]}, got {shape}"
        )
    for w in said:  # a distance of the right shape: its code's warnings, as they came
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not out.is_floating_point():
        raise ValueError(f"a constraint distance must return floating-point values, got {out.dtype} "
                         "(a count or a comparison has no gradient)")
    if not bool(torch.isfinite(out).all()):
        bad = (~torch.isfinite(out.detach())).flatten().nonzero().flatten()
        raise ValueError(f"a constraint distance must return finite values, got {len(bad)} not finite of "
                         f"{out.numel()} (sample {int(bad[0])}: {float(out.detach().flatten()[bad[0]])}){on}")
    check_sign(out.detach(), f"a constraint distance ({_few(out)})")
    if xg.requires_grad and not out.requires_grad:
        raise ValueError(not_differentiable("a constraint distance"))
    if xg.requires_grad:
        (grad,) = torch.autograd.grad(out.sum(), xg, allow_unused=True)
        if grad is not None and not bool(torch.isfinite(grad).all()):
            bad = int((~torch.isfinite(grad).flatten(1).all(1)).sum())
            raise ValueError(f"the gradient of a constraint distance is not finite (NaN or inf) for {bad} of "
                             f"{len(grad)} samples{on}. Common causes: a norm's square root, which has no gradient "
                             "at 0, where a distance is 0 on its set (use condiff.constraints.safe_norm); a "
                             "torch.where whose unused branch is not finite (NaN there still reaches the gradient)")
        if bool((out > 0).any()) and (grad is None or not bool(grad.any())):
            warnings.warn(zero_gradient("a constraint distance", int((out > 0).sum()), len(out)), stacklevel=3)
    return out.detach()


def zero_gradient(what: str, positive: int, n: int) -> str:
    """The warning for ``what``, positive on ``positive`` of ``n`` samples, whose gradient is zero on all."""
    return (f"{what} is > 0 on {positive} of {n} samples but its gradient is zero on every one, so it moves "
            "nothing: a rounded, thresholded or counted value (torch.round, a comparison) has no slope; use a "
            "smooth one")


def _few(values: Tensor, k: int = 4) -> str:
    """The first ``k`` of ``values`` as a list's text, with how many more (a batch of 64 was printed whole)."""
    v = values.detach().flatten()
    more = f" ... {v.numel() - k} more" if v.numel() > k else ""
    return "[" + ", ".join(f"{float(a):.4g}" for a in v[:k]) + more + "]"


def check_sign(values: Tensor, what: str = "the constraint distance") -> Tensor:
    """``values`` unchanged, or a ValueError when some are negative (a distance is >= 0 everywhere;
    a sign error makes every reduction and training loss meaningless)."""
    low = float(values.min()) if values.numel() else 0.0
    if low < -1e-6:
        raise ValueError(f"{what} reaches {low:.4g} < 0: a distance must be >= 0 everywhere")
    return values


def safe_norm(v: Tensor) -> Tensor:
    """Euclidean norm per sample of ``v`` (B, ...) -> (B,), with a zero (not NaN) gradient at 0."""
    w = v.flatten(1)
    if w.shape[1] == 0:  # no features: every sample is at distance 0
        return w.sum(1)
    w = at_least_float32(w)  # summed squares overflow half precision from |v| ~ 16
    # scaled by the largest entry so that the squares neither overflow (float32 from |v| ~ 1e19) nor underflow;
    # a zero or non-finite sample keeps scale 1, so NaN and inf pass through and a broken sample never reads
    # as on the set. The scale is a constant to autograd (the norm is homogeneous: the gradient is the same)
    m = w.detach().abs().amax(1, keepdim=True)
    scale = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
    sq = (w / scale).pow(2).sum(1)
    # exactly 0 -> 0 (with a zero gradient)
    return torch.where(sq == 0, torch.zeros_like(sq), sq.clamp_min(1e-30).sqrt() * scale[:, 0])


# Families import the names above from this module, so they are imported last.
from condiff.constraints.brightness import TotalBrightness  # noqa: E402
from condiff.constraints.burgers import BurgersResidual, burgers_step  # noqa: E402
from condiff.constraints.convex import Ball, Box, Simplex  # noqa: E402
from condiff.constraints.count import CountConstraint, CountingCNN  # noqa: E402
from condiff.constraints.divergence import DivergenceFree, spectral_divergence  # noqa: E402
from condiff.constraints.periodic import PeriodicTiling  # noqa: E402
from condiff.constraints.python import PythonConstraint, parse_python_spec  # noqa: E402

__all__ = [
    "CONSTRAINTS",
    "Ball",
    "Box",
    "BurgersResidual",
    "Constraint",
    "CountConstraint",
    "CountingCNN",
    "Distance",
    "DivergenceFree",
    "PeriodicTiling",
    "PythonConstraint",
    "Simplex",
    "TotalBrightness",
    "build_constraint",
    "burgers_step",
    "check_distance",
    "check_sign",
    "parse_python_spec",
    "register_constraint",
    "safe_norm",
    "spectral_divergence",
]
