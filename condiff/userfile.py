"""Code of one's own, named on the command line as ``FILE.py:NAME``: a constraint (``--constraint``), an
operator (``solve --operator``) or a network (``model.name``). The file is run (it is the user's own
code) and its SHA-256 returned with the object, so that what was made with one version of the file can
tell an edited one.

A saved model whose network is such a class names the file in its ``config.json``, and loading it must
run the file. Loading must not run code that a saved file merely names (a model from elsewhere could
name any file), so a file runs at load only if it is *trusted*: the file, as it is now (its path and
SHA-256), is in ``io.cache_dir()/trusted_code.json``, which records every file a user names themselves
(and so runs) and those given to :func:`trust_file` (``condiff trust FILE``). As it is now, not just its
path: a model shared with its net's file is unpacked to the same place again, over a version that was
trusted."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from . import io

TRUSTED = "trusted_code.json"  # in io.cache_dir(): {absolute path: [SHA-256 of the versions run, ...]}


class UntrustedCode(io.CheckpointError):
    """A saved file names code of one's own that is not trusted (:func:`trust_file`) and would run at load."""


def split_file_spec(text: str, flag: str = "--constraint", what: str = "a callable") -> tuple[str, str] | None:
    """``"FILE.py:NAME"`` -> ``(FILE, NAME)``; ``None`` for anything else (a registered name). ``flag`` and
    ``what`` (what ``NAME`` must be) word the error for a bad ``NAME``."""
    path, sep, attr = text.rpartition(":")
    if not sep or not path.endswith(".py"):
        return None
    if not attr.isidentifier():
        raise ValueError(f"{flag} {text}: after the ':' comes the name of {what} in {path}")
    return path, attr


def spec_label(text: str, flag: str = "--constraint", what: str = "a callable") -> str:
    """A name for files and folders: ``text`` itself (a registered name), or ``FILE-NAME`` for ``FILE.py:NAME``."""
    spec = split_file_spec(text, flag, what)
    return text if spec is None else f"{Path(spec[0]).stem}-{spec[1]}"


def absolute_spec(text: str, flag: str, what: str) -> str | None:
    """``"FILE.py:NAME"`` with ``FILE`` made absolute, as runs record it (found from any working directory, and
    two spellings of one file the same); ``None`` for anything else (:func:`split_file_spec`)."""
    spec = split_file_spec(text, flag, what)
    return None if spec is None else f"{Path(spec[0]).expanduser().resolve()}:{spec[1]}"


def load_from_file(path: str | Path, attr: str, what: str = "constraint",
                   saved_by: str | None = None, once: bool = False) -> tuple[object, str]:
    """Run the Python file ``path`` (the user's own code) and return its attribute ``attr`` with the file's
    SHA-256; a missing file, a file that fails to run or a missing name is a ValueError naming ``what``.

    ``saved_by``: what names the file, where a saved file does (``"the model at DIR"``): the file runs only
    if it is trusted (:func:`trust_file`), else :class:`UntrustedCode` says how to trust it. Without it the caller
    names the file itself, which is then recorded as trusted. ``once``: run a file (this version) once per
    process and share what it made (a net's class, which a command may need twice; not a constraint or an
    operator, whose instances may hold state)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        moved = (f" (named by {saved_by}: if it was moved or deleted, put it back or link it there; or mend the "
                 "path, or make the run again)") if saved_by else ""
        raise ValueError(f"{what} file {file} does not exist{moved}")
    sha = file_sha256(file)
    if saved_by is None:
        _record_trusted(file, sha)
    else:
        versions = _trusted().get(str(file))
        if sha not in (versions or []):
            how = "condiff has not run it" if versions is None else "it was edited since condiff last ran it"
            raise UntrustedCode(f"{saved_by} names the {what} file {file}, and {how} with the trust record "
                                f"{io.cache_dir() / TRUSTED}: loading would run its code. If you trust the file as it "
                                f"is, run `condiff trust {file}` (in Python, condiff.userfile.trust_file), then load "
                                "again")
    key = (str(file), sha)
    module = _LOADED.get(key) if once else None
    if module is None:
        module = _run(file, f"condiff_user_{what.replace(' ', '_')}_{sha[:16]}", what)
        if once:
            _LOADED[key] = module
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"{what} file {file} has no {attr!r}; its callables: {names or 'none'}")
    return getattr(module, attr), sha


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as runs record a file of one's own (``file_sha256``)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_trusted(path: str | Path, sha: str) -> bool:
    """Whether this version (``sha``) of the file ``path`` is trusted here (:func:`trust_file`)."""
    return sha in _trusted().get(str(Path(path).expanduser().resolve()), [])


def _run(file: Path, module_name: str, what: str) -> object:
    """The module that running ``file`` makes, as ``module_name``."""
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
    return module


_LOADED: dict[tuple[str, str], object] = {}  # (file, SHA-256) -> the module its code made (once=True)


def python_file(path: str | Path) -> Path:
    """``path`` resolved, where it is a Python file (``.py``); else a ValueError saying what it is."""
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise ValueError(f"{file} is no Python file (.py)" if file.exists() else f"{file} does not exist")
    return file


def trust_file(path: str | Path) -> str:
    """Let saved models that name the Python file ``path`` run it when they are loaded; returns its SHA-256."""
    file = python_file(path)
    sha = file_sha256(file)
    _record_trusted(file, sha, strict=True)
    return sha


def trusted_files() -> dict[str, list[str]]:
    """The trusted files: absolute path -> the SHA-256 of each trusted version (the last few)."""
    return _trusted()


def forget_file(path: str | Path) -> bool:
    """Stop trusting every version of the file ``path`` (which need not exist any more); False if it was not
    trusted."""
    file = str(Path(path).expanduser().resolve())
    try:
        return _update_record(lambda table: table.pop(file, None) is not None)
    except OSError as e:
        raise ValueError(f"cannot write the trust record {io.cache_dir() / TRUSTED}: {e}") from None


def _trusted() -> dict[str, list[str]]:
    """The trusted files; an unreadable record trusts nothing, with a word (each file is trusted again as it
    is named, and the record written anew)."""
    record = io.cache_dir() / TRUSTED
    if not record.exists():
        return {}
    try:
        table = io.read_json_table(record)
    except (OSError, ValueError) as e:
        warnings.warn(f"the trust record {record} cannot be read ({e}): no file of one's own is trusted until it "
                      "is named again or given to `condiff trust`", stacklevel=3)
        return {}
    return {k: v for k, v in table.items() if isinstance(v, list)}


def _update_record(change: Callable[[dict[str, list[str]]], bool]) -> bool:
    """Read the record under its lock (another process may be changing it), ``change`` it in place and write it
    back, if ``change`` says it changed; returns whether it did."""
    record = io.cache_dir() / TRUSTED
    with io.waiting_lock(record.with_name(f".{TRUSTED}.lock")):
        table = _trusted()
        if not change(table):
            return False
        io.write_json_atomic(record, table)
    return True


def _record_trusted(file: Path, sha: str, strict: bool = False) -> None:
    """Add the file's version to the record. Where the record cannot be written (a read-only cache), a file
    the user names still runs, with a word (``strict``: an error, for `condiff trust`, which does nothing else)."""
    if is_trusted(file, sha):  # the common case, without the lock
        return
    record = io.cache_dir() / TRUSTED

    def add(table: dict[str, list[str]]) -> bool:
        if sha in table.get(str(file), []):  # recorded meanwhile by another process
            return False
        table[str(file)] = [*table.get(str(file), []), sha][-8:]  # the file's last few versions
        return True

    try:
        _update_record(add)
    except OSError as e:
        if strict:
            raise ValueError(f"cannot write the trust record {record}: {e}") from None
        warnings.warn(f"{file} runs, but cannot be recorded as trusted in {record} ({e}): a saved model or run "
                      "that names it will not load until it is", stacklevel=3)


__all__ = ["UntrustedCode", "absolute_spec", "forget_file", "load_from_file", "split_file_spec", "trust_file",
           "trusted_files"]
