"""Checks of settings and arguments: each refuses a bad value with one line naming it and what it
expects, and returns the value normalised (an integral float as an int, a list of labels as a tuple).

Shared by the library (samplers, constraints, assimilation, dual training) and the command line, so
that every setting is checked the same way before anything is trained or written.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any

import torch

SEED_LIMIT = 2**63  # a larger seed overflows torch's generator
INT_LIMIT = 2**63  # counts and sizes beyond int64 overflow torch tensors and checkpoints
EXACT_FLOAT = 2**53  # beyond it a float no longer holds every integer (1e30 is no step count)


def scalar(v: Any) -> Any:
    """A 0-dimensional tensor or array (``torch.tensor(2)``, ``np.array(0.5)``, a NumPy scalar) as a Python
    number; anything else unchanged (a bool stays a bool, which no number check accepts)."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item") and not str(getattr(v, "dtype", "")).endswith("bool"):
        try:
            return v.item()
        except (RuntimeError, ValueError):  # a meta tensor holds no value
            return v
    return v


DEVICE_TYPES = ("cpu", "cuda")


def _device_type(v: Any) -> str | None:
    """The kind of device ``v`` names (``"cuda"`` for ``"cuda:1"``), or None for what names none."""
    try:
        return torch.device(v).type if isinstance(v, (str, torch.device)) else None
    except (RuntimeError, ValueError):
        return None


def is_device(v: Any) -> bool:
    """A device name (``"cpu"``, ``"cuda:1"``) or ``torch.device`` of a kind condiff runs on."""
    return _device_type(v) in DEVICE_TYPES


def device(what: str, v: Any) -> Any:
    """``v``, a device condiff runs on and this machine has (``"cpu"``, ``"cuda:1"`` or a ``torch.device``);
    else a one-line error naming ``what`` (the argument or flag). Apple's ``mps`` is refused: the noise schedules
    and several sums are float64, which it lacks."""
    if not is_device(v):
        shown = v if isinstance(v, str) and v.strip() else repr(v)
        if _device_type(v) == "mps":
            raise ValueError(f"{what} {shown} is not supported: condiff's schedules are float64, which MPS lacks "
                             "(use cpu)")
        raise ValueError(f"{what} {shown} is not supported here (cpu, cuda, cuda:N)")
    d = torch.device(v)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {v} was asked for but no CUDA device is available")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {v} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return v


def is_number(v: Any) -> bool:
    """A finite real number (an int, a float, a NumPy scalar, a one-element tensor or array; not a bool) that
    a float64 holds."""
    v = scalar(v)
    try:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an int beyond float64 (10**400)
        return False


def beyond_float64(v: Any) -> bool:
    """A finite number that float64 cannot hold (``np.longdouble("1e400")``, ``10**400``): out of range, not
    "not finite", as reading it as a float would make it."""
    v = scalar(v)
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or v != v:  # (NaN)
        return False
    try:
        return not math.isfinite(v) and abs(v) != math.inf
    except OverflowError:
        return True


def is_integer(v: Any, lo: int | None = None, hi: int | None = None) -> bool:
    """``v`` is a whole number (``3`` or ``3.0``; not a bool) in ``[lo, hi)``, within int64; a float only
    where it is exact (``|v| < 2**53``)."""
    v = scalar(v)
    if not (is_number(v) and float(v).is_integer()):
        return False
    bound = INT_LIMIT if isinstance(v, numbers.Integral) else EXACT_FLOAT
    return -bound <= v < bound and (lo is None or lo <= v) and (hi is None or v < hi)


def shown(v: Any) -> str:
    """``v`` as an error message gives it: its repr, an integer of many digits as its first ones and their count
    (10**400's 401 digits say less than their count)."""
    text, w = repr(v), scalar(v)
    if isinstance(w, numbers.Integral) and not isinstance(w, bool) and len(text) > 40:
        return f"{text[:12]}... ({len(str(abs(w)))} digits)"
    return text


def integer(name: str, v: Any, lo: int = 1, hi: int | None = None) -> int:
    """An integer in ``[lo, hi)`` (an integral float such as ``2.5e1`` becomes an int)."""
    if not is_integer(v, lo, hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {'2**63' if hi == SEED_LIMIT else hi})"
        w = scalar(v)
        if hi is None and isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= INT_LIMIT:
            want += " within int64's range (below 2**63)"  # an integer too large for a tensor, not a non-integer
        raise ValueError(f"{name} must be an integer {want}, got {shown(v)}")
    return int(scalar(v))


def seed(name: str, v: Any) -> int:
    """A random seed: an integer in [0, 2**63)."""
    return integer(name, v, 0, SEED_LIMIT)


def number(name: str, v: Any, within: str = "") -> float:
    """A finite number, optionally ``within`` an interval written as ``"(0, 1]"``, ``"> 0"`` or ``">= 0"``."""
    v = scalar(v)
    ok = is_number(v)
    if ok and within.startswith(">"):
        lo = float(within.lstrip(">= "))
        ok = v >= lo if within.startswith(">=") else v > lo
    elif ok and within:
        lo, hi = (float(s) for s in within[1:-1].split(","))
        ok = (lo <= v if within[0] == "[" else lo < v) and (v <= hi if within[-1] == "]" else v < hi)
    if not ok:
        want = f"a number {within}" if within.startswith(">") else f"a number in {within}" if within \
            else "a finite number"
        if beyond_float64(v):
            want = f"{want.replace('a finite number', 'a number')} within float64's range (about 1.8e308)"
        raise ValueError(f"{name} must be {want}, got {shown(v)}")
    return float(v)


def floating(name: str, x: Any) -> Any:
    """A floating-point tensor with values (not on the meta device): integer data would be truncated silently by
    noise, filters and schedules."""
    if not isinstance(x, torch.Tensor):
        hint = ": convert it with torch.as_tensor(a, dtype=torch.float32)" if hasattr(x, "__array__") else ""
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}{hint}")
    if not x.is_floating_point():
        top = {torch.uint8: "127.5", torch.uint16: "32767.5"}.get(x.dtype)
        how = (f"scale image bytes to condiff's [-1, 1] as its loaders do: x.float() / {top} - 1, or "
               "condiff.data.ArrayData(x).x for a batch (N, C, H, W)") if top else "convert it with .float()"
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype} ({how})")
    if x.device.type == "meta":  # .to() and every read of it fail inside torch
        raise ValueError(f"{name} is on the meta device, which holds no values: give it on 'cpu' or 'cuda'")
    return x


def shape_of(v: Any) -> str:
    """What a returned value is, for a message: ``"shape (2, 3)"`` for a tensor, else ``"a float"``."""
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


def per_sample(name: str, v: Any, batch: int) -> Any:
    """A tensor of shape ``(batch,)``: one value per sample, as a loss or a constraint returns."""
    if not isinstance(v, torch.Tensor) or v.shape != (batch,):
        raise ValueError(f"{name} must return one value per sample, a tensor of shape ({batch},), got {shape_of(v)}")
    return v


def finite_rows(name: str, x: Any) -> Any:
    """A floating-point ``(N, ...)`` tensor with no NaN or inf (reads the device once)."""
    floating(name, x)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0]) if x.dim() else 0
        raise ValueError(f"{name} hold {int(bad.sum())} non-finite values (the first in sample {first})")
    return x


def param_dtype(module: Any) -> torch.dtype:
    """The floating dtype of a module's weights (float32 for one without any, or for no module)."""
    params = module.parameters() if isinstance(module, torch.nn.Module) else ()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


def param_device(module: Any) -> torch.device:
    """The device of a module's weights, or of its buffers where it has none (an analytic denoiser's tables); the
    CPU for one without either, or for no module: where a sampler's noise goes when no device is given."""
    if not isinstance(module, torch.nn.Module):
        return torch.device("cpu")
    return next((t.device for t in itertools.chain(module.parameters(), module.buffers())), torch.device("cpu"))


def weights_dtype(name: str, x: Any, module: Any, device: bool = False) -> Any:
    """``x`` in the dtype of ``module``'s weights (a float64 input to a float32 network fails deep inside torch)
    and, with ``device``, on their device (torch's own error comes from inside the network, naming neither): one
    look at the first weight, as a denoiser makes it at every step."""
    floating(name, x)
    w = next(module.parameters(), None)
    if w is not None and x.dtype != w.dtype:
        raise ValueError(f"{name} is {x.dtype} but the network's weights are {w.dtype}; convert the input "
                         f"with x.to({w.dtype})")
    if device and w is not None and x.device != w.device:
        raise ValueError(f"{name} is on {x.device} but the network's weights are on {w.device}: pass "
                         f"device={str(w.device)!r} to the sampler, or move the model with .to(...)")
    return x


def pair(v: Any) -> tuple[float, float] | None:
    """Two finite numbers (a list, tuple or 1-D array of two) as floats; None for anything else, so that
    each caller words its own message with its own range."""
    if not (isinstance(v, (list, tuple)) or getattr(v, "ndim", None) == 1) or len(v) != 2:
        return None
    a, b = (scalar(u) for u in v)
    return (float(a), float(b)) if is_number(a) and is_number(b) else None


def labels(name: str, v: Any, n: int, what: str = "digits 0-9") -> tuple[int, ...]:
    """A non-empty list of distinct class labels (or mode indices) in ``[0, n)``, as a tuple (a 1-D
    tensor or array is read as its list)."""
    given = v
    if hasattr(v, "tolist") and getattr(v, "ndim", None) == 1:
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        v = [scalar(c) for c in v]  # 0-d tensors hash by identity: a duplicate would pass as distinct
    ok = (isinstance(v, list) and len(v) > 0
          and all(is_number(c) and float(c).is_integer() and 0 <= c < n for c in v) and len(set(v)) == len(v))
    if not ok:
        raise ValueError(f"{name} must be a non-empty list of distinct {what}, got {given!r}")
    return tuple(int(c) for c in v)


def text(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty string, got {v!r}")
    return v


def constraint_name(v: Any) -> str:
    """A constraint's name: it names log keys and files, so non-empty without '/' or spaces."""
    if not isinstance(v, str) or not v or any(c in v for c in "/ \t\n"):
        raise ValueError(f"constraint name must be non-empty without '/' or spaces, got {v!r}")
    return v


def table(name: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"{name} must be a table of settings, got {v!r}")
    return v


def bound(name: str, v: Any) -> float:
    """An absolute bound on a denoising loss: a loss is positive, so a bound <= 0 can never hold."""
    if not (is_number(v) and v > 0):
        raise ValueError(f"{name} must be a number > 0 (a denoising loss is positive, so a bound <= 0 "
                         f"can never hold), got {v!r}")
    return float(v)


def relative(name: str, v: Any) -> float:
    """A factor times a reference model's loss: > 0 (the bound it gives must be > 0)."""
    if not (is_number(v) and v > 0):
        raise ValueError(f"{name} must be a number > 0 (a factor times a reference model's loss), got {v!r}")
    return float(v)


def _kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "true or false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, (list, tuple)):
        return "a list"
    return None


def check_setting(name: str, default: Any, value: Any, what: str = "default") -> Any:
    """Refuse a setting whose value is of another kind than its default (``lr = "abc"``, ``progress = 1``),
    a non-finite number, or a fraction where the default is an integer (``steps = 2.5``).
    Returns the value, an integral float (``2.5e1``) as an int where the default is one, an int as a float where
    the default is a float (``--set lr=1`` on ``lr = 0.001``). ``what`` names
    ``default`` in the message: ``"now"`` where it is the value being replaced (an earlier ``--set``)."""
    want = _kind(default)
    if want is not None and _kind(value) != want:
        raise ValueError(f"setting {name} expects {want} ({what} {default!r}), got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"setting {name} must be a finite number, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        if not is_integer(value):
            beyond = " (beyond 2**53 a float holds no exact integer)" if value.is_integer() else ""
            raise ValueError(f"setting {name} expects an integer ({what} {default!r}), got {value!r}{beyond}")
        return int(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)  # a float setting stays one (stored as 2, a later --set 0.2 was no integer)
        except OverflowError:  # (which names no setting)
            raise ValueError(f"setting {name} must be a finite number, got {shown(value)}") from None
    return value


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings tables (down to the first non-table)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def eval_mode(fn: object, network: str) -> None:
    """Refuse ``fn`` when it is a network in training mode with dropout (random values) or batch statistics
    (values that depend on the batch, and running statistics updated at each call). ``network`` names it in
    the message: "a constraint that is a network", "the denoiser's network"."""
    if not isinstance(fn, torch.nn.Module):
        return
    live = [m for m in fn.modules() if m.training]
    drop = sorted({type(m).__name__ for m in live if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0})
    norm = sorted({type(m).__name__ for m in live
                   if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats})
    if drop or norm:
        why = [w for w, on in (("draws random values (dropout)", drop), ("gives values that depend on the batch and "
                                                                       "updates its running statistics", norm)) if on]
        raise ValueError(f"{network} in training mode ({', '.join(sorted(drop + norm))}) {' and '.join(why)} at each "
                         "call: call .eval() on it first")


def gradients_on(who: str) -> None:
    """Refuse to run ``who``, which takes gradients, under ``torch.inference_mode()``: there no gradient exists,
    even where condiff turns them on, and torch's own error would name none of the caller's code."""
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{who} takes gradients, which torch.inference_mode() turns off even where condiff turns "
                         "them on: call it outside torch.inference_mode() (torch.no_grad() is fine)")
