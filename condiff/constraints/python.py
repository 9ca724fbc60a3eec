"""A user's own distance, loaded from a Python file: ``{"name": "python", "path": FILE, "attr": NAME}``.

The command line names it as ``--constraint FILE.py:NAME``; ``NAME`` is a callable ``x (B, ...) ->
(B,)`` (a function, a module instance, or a class built without arguments), differentiable and zero
on the set, with an optional ``violation_map(x) -> (B, H, W)``. The file is run when the constraint
is built (it is the user's own code), and its SHA-256 is part of :meth:`learned_parts`, so work fitted
against one version of the file is not reused with an edited one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import Tensor

from condiff.constraints import Constraint, register_constraint


def split_file_spec(text: str, flag: str = "--constraint", what: str = "a callable") -> tuple[str, str] | None:
    """``"FILE.py:NAME"`` -> ``(FILE, NAME)``; ``None`` for anything else (a registered name). ``flag`` and
    ``what`` (what ``NAME`` must be) word the error for a bad ``NAME``."""
    path, sep, attr = text.rpartition(":")
    if not sep or not path.endswith(".py"):
        return None
    if not attr.isidentifier():
        raise ValueError(f"{flag} {text}: after the ':' comes the name of {what} in {path}")
    return path, attr


def parse_python_spec(text: str) -> dict | None:
    """``"FILE.py:NAME"`` -> the constraint's config (absolute path); ``None`` for anything else."""
    spec = split_file_spec(text)
    if spec is None:
        return None
    return {"name": "python", "path": str(Path(spec[0]).expanduser().resolve()), "attr": spec[1]}


def load_from_file(path: str | Path, attr: str, what: str = "constraint") -> tuple[object, str]:
    """Run the Python file ``path`` (the user's own code) and return its attribute ``attr`` with the file's
    SHA-256; a missing file, a file that fails to run or a missing name is a ValueError naming ``what``."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ValueError(f"{what} file {file} does not exist")
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    module_name = f"condiff_user_{what.replace(' ', '_')}_{sha[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # some code (dataclasses) looks its own module up there
    sys.path.insert(0, str(file.parent))  # as when the file runs as a script: it imports its neighbours
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # sys.exit() in the file would end the command without a word
        del sys.modules[module_name]
        raise ValueError(f"{what} file {file} failed to run: {type(err).__name__}: {err}") from None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(file.parent))
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise ValueError(f"{what} file {file} has no {attr!r}; its callables: {names or 'none'}")
    return getattr(module, attr), sha


@register_constraint("python")
class PythonConstraint(Constraint):
    """The callable ``attr`` of the Python file ``path``, as a constraint."""

    def __init__(self, path: str, attr: str) -> None:
        super().__init__()
        file = Path(path).expanduser().resolve()  # the config rebuilds it from any working directory
        fn, self._sha = load_from_file(file, attr)
        self.config = {"name": "python", "path": str(file), "attr": str(attr)}
        if inspect.isclass(fn):
            try:
                fn = fn()
            except TypeError as err:  # the constructor wants arguments a file spec cannot give
                raise ValueError(f"{file}:{attr} is a class whose constructor needs arguments ({err}); give "
                                 "it defaults, or name a function or an instance made in the file") from None
        if not callable(fn):
            raise ValueError(f"{file}:{attr} is of type {type(fn).__name__}, not a callable x -> (B,)")
        self.fn = fn  # an nn.Module is registered as a submodule, so .to(device) moves it

    def forward(self, x: Tensor) -> Tensor:
        try:
            return self.fn(x)
        except Exception as err:  # the user's code: say whose error it is
            raise ValueError(f"constraint {self.extra_repr()} raised {type(err).__name__}: {err}") from err

    def violation_map(self, x: Tensor) -> Tensor | None:
        vm = getattr(self.fn, "violation_map", None)
        return vm(x) if callable(vm) else None

    def learned_parts(self) -> dict | None:
        own = self.fn.learned_parts() if isinstance(self.fn, Constraint) else None
        return {"file_sha256": self._sha, **({"parts": own} if own else {})}

    def extra_repr(self) -> str:
        return f"{self.config['path']}:{self.config['attr']}"


__all__ = ["PythonConstraint", "load_from_file", "parse_python_spec", "split_file_spec"]
