"""Code of one's own, named on the command line as ``FILE.py:NAME``: a constraint (``--constraint``), an
operator (``solve --operator``) or a network (``model.name``). The file is run (it is the user's own
code) and its SHA-256 returned with the object, so that what was made with one version of the file can
tell an edited one."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import sys
from pathlib import Path


def split_file_spec(text: str, flag: str = "--constraint", what: str = "a callable") -> tuple[str, str] | None:
    """``"FILE.py:NAME"`` -> ``(FILE, NAME)``; ``None`` for anything else (a registered name). ``flag`` and
    ``what`` (what ``NAME`` must be) word the error for a bad ``NAME``."""
    path, sep, attr = text.rpartition(":")
    if not sep or not path.endswith(".py"):
        return None
    if not attr.isidentifier():
        raise ValueError(f"{flag} {text}: after the ':' comes the name of {what} in {path}")
    return path, attr


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


__all__ = ["load_from_file", "split_file_spec"]
