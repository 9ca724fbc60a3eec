"""A user's own distance, loaded from a Python file: ``{"name": "python", "path": FILE, "attr": NAME}``.

The command line names it as ``--constraint FILE.py:NAME``; ``NAME`` is a callable ``x (B, ...) ->
(B,)`` (a function, a module instance, or a class built without arguments), differentiable and zero
on the set, with an optional ``violation_map(x) -> (B, H, W)``. The file is run when the constraint
is built (it is the user's own code), and its SHA-256 is part of :meth:`learned_parts`, so work fitted
against one version of the file is not reused with an edited one.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from torch import Tensor

from condiff.constraints import Constraint, register_constraint
from condiff.userfile import load_from_file, split_file_spec


def parse_python_spec(text: str) -> dict | None:
    """``"FILE.py:NAME"`` -> the constraint's config (absolute path); ``None`` for anything else."""
    spec = split_file_spec(text)
    if spec is None:
        return None
    return {"name": "python", "path": str(Path(spec[0]).expanduser().resolve()), "attr": spec[1]}


@register_constraint("python")
class PythonConstraint(Constraint):
    """The callable ``attr`` of the Python file ``path``, as a constraint."""

    def __init__(self, path: str, attr: str, saved_by: str | None = None) -> None:
        """``saved_by``: what named the file, where a saved run does: it then runs only if it is trusted
        (:func:`condiff.userfile.load_from_file`)."""
        super().__init__()
        file = Path(path).expanduser().resolve()  # the config rebuilds it from any working directory
        fn, self._sha = load_from_file(file, attr, saved_by=saved_by)
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
