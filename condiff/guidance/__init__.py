"""Training-free loss guidance: DPS, FreeDoM and universal guidance (UGD), each optionally with DSG.

Each method is a small object implementing the Guidance protocol of :mod:`condiff.sample`
(``needs_grad``, ``__call__(step) -> x_{t_prev}``) around a loss ``x -> (B,)``, e.g.
``operator.loss(y)`` from :mod:`condiff.operators`. DSG is a composition::

    from condiff.guidance import DPS, DSG, guided_sample
    g = DSG(DPS(op.loss(y)), rate=0.2, interval=1)
    res = guided_sample(denoiser, g, y_shape, steps=50, eta=1.0, generator=gen)

:func:`make_guidance` builds one from a name (``"dps"``, ``"dsg+freedom"``, ...) for the CLI and the
benchmarks; :func:`default_hyperparameters` gives the swept defaults per task and step budget.
"""

from __future__ import annotations

from .. import checks
from .base import EUCLIDEAN, GradientGuidance, GradientStep, Loss, Update
from .defaults import GENERIC, TUNED, default_hyperparameters
from .dps import DPS
from .dsg import BETWEEN, DSG, SphericalStep
from .freedom import FreeDoM
from .sampling import GuidedResult, guided_sample
from .ugd import UGD

# base methods by name; "dsg+<name>" wraps one in DSG
BASES: dict[str, type[GradientGuidance]] = {"dps": DPS, "freedom": FreeDoM, "ugd": UGD}
DSG_KEYS = ("rate", "interval", "final", "between")
METHODS = tuple(BASES) + tuple(f"dsg+{b}" for b in BASES)


def split_method(name: str) -> tuple[type[GradientGuidance], bool]:
    """``"dsg+ugd"`` -> ``(UGD, True)``; ``"dps"`` -> ``(DPS, False)``; unknown names raise ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"guidance method must be a name, one of {list(METHODS)}; got {name!r}")
    key = name.strip().lower()
    dsg = key.startswith("dsg+")
    base = key[4:] if dsg else key
    if base not in BASES:
        raise ValueError(f"unknown guidance method {name!r}; expected one of {list(METHODS)}")
    return BASES[base], dsg


def base_steps_between(hyperparameters: dict) -> bool:
    """Whether DSG with these settings takes the base method's own steps between its own (``between =
    "base"`` and an ``interval`` of 2 or more), the only steps where the base's step length counts."""
    return hyperparameters.get("between") == "base" and checks.is_integer(hyperparameters.get("interval"), 2)


def make_guidance(name: str, loss: Loss, **hyperparameters) -> GradientGuidance | DSG:
    """A guidance object from its name and keyword hyperparameters (``rate``, ``interval``, ``final``
    and ``between``, the keys of ``DSG_KEYS``, go to DSG, the rest to the base method's constructor)."""
    cls, dsg = split_method(name)
    dsg_kw = {k: hyperparameters.pop(k) for k in DSG_KEYS if k in hyperparameters}
    if dsg_kw and not dsg:
        raise ValueError(f"{', '.join(dsg_kw)} appl{'ies' if len(dsg_kw) == 1 else 'y'} to DSG only; "
                         f"use method 'dsg+{name}'")
    if dsg and cls.scale_key in hyperparameters and not base_steps_between(dsg_kw):
        # DSG's spherical step sets its own length: the base's was accepted, recorded and had no effect
        raise ValueError(f"{cls.scale_key} does not apply to {name!r}: DSG's step sets its own length on the steps "
                         f"it guides; {cls.scale_key} sizes the base method's step on the others, with between="
                         "'base' and an interval of 2 or more")
    try:
        base = cls(loss, **hyperparameters)
    except TypeError as e:
        import inspect

        takes = [k for k in inspect.signature(cls).parameters if k != "loss"] + (list(DSG_KEYS) if dsg else [])
        raise ValueError(f"bad hyperparameters for {name!r}: {e}; it takes {', '.join(takes)}") from None
    return DSG(base, **dsg_kw) if dsg else base


__all__ = ["BASES", "BETWEEN", "DPS", "DSG", "DSG_KEYS", "EUCLIDEAN", "FreeDoM", "GENERIC", "GradientGuidance",
           "GradientStep", "GuidedResult", "METHODS", "base_steps_between", "SphericalStep", "TUNED", "UGD", "Update",
           "default_hyperparameters", "guided_sample", "make_guidance", "split_method"]
