"""Checkpoints and run directories.

A checkpoint is a directory: ``config.json`` plus one ``NAME.safetensors`` file per tensor group
(``model``, ``ema``, ``optim``, ...). Nothing is ever unpickled, so loading a file cannot run code.
Directories are written atomically: everything goes into a hidden temporary sibling which is
fsynced and then renamed into place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import checks

CONFIG = "config.json"
RUN_MARK = ".condiff-run"  # in a run directory: the command that wrote it
# the commands (mark prefixes) whose run holds models it trained: never placed inside another run; the others
# (sample, eval, solve, pnp) write results of a model, beside it if the user likes
TRAINING_KINDS = ("condiff train", "condiff namm fit", "condiff dual")


def json_safe(obj: object) -> bool:
    """Whether ``obj`` can go into a config.json as it is."""
    try:
        json.dumps(obj)
    except (TypeError, ValueError):
        return False
    return True


def versions() -> dict[str, str]:
    """The condiff and torch versions a file was made with (recorded in models and result records)."""
    from condiff import __version__

    return {"condiff": __version__, "torch": torch.__version__}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupted."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files are unreadable: truncated, corrupted or missing (not a mismatch of settings)."""


@contextlib.contextmanager
def reading_config(path: str | Path) -> Iterator[None]:
    """Inside, a missing entry or a bad value met while rebuilding from ``path/config.json`` (a
    KeyError, TypeError or ValueError) becomes one :class:`CheckpointError` naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{Path(path) / CONFIG} has no {e} entry: damaged, or not written by condiff") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG} holds a bad setting: {e}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process umask (read once: setting it is the only way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file or folder (``mkstemp`` 0600, ``mkdtemp`` 0700) the permissions an
    ordinary ``open`` / ``mkdir`` would, so results are as readable as the umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


STALE_SECONDS = 3600  # a temporary sibling this old was left by a killed writer, not one at work


def _sweep_stale(parent: Path, *patterns: str, older_than: float | None = STALE_SECONDS) -> None:
    """Remove temporaries matching ``patterns`` in ``parent`` that a killed writer left: those older than
    ``older_than`` seconds (a write in progress takes seconds at most), or all of them with ``None`` (where
    no other process writes ``parent``). A link is removed, never followed."""
    for pattern in patterns:
        for p in parent.glob(pattern):
            try:
                if older_than is None or time.time() - p.lstat().st_mtime > older_than:
                    remove(p)
            except OSError:
                pass


def write_file_atomic(path: str | Path, fill: Callable[[IO], None], binary: bool = False) -> Path:
    """Write ``path`` through ``fill(file)`` into a temporary sibling that is fsynced and renamed into
    place, so readers never see half a file and a failure leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # named by the file it was for, not by its temporary's name
        raise OSError(e.errno, f"writing {path}: {e.strerror}; the previous file is unchanged") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        _as_created(tmp)
        os.replace(tmp, path)
        _sweep_stale(path.parent, f".{path.name}.*.tmp")
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # disk full names no file
            raise OSError(e.errno, f"writing {path}: {e.strerror}; the previous file is unchanged") from None
        raise
    return path


def begin_outputs(out: str | Path, record: str, *files: str) -> Path:
    """Before a command replaces a set of files in ``out`` that its ``record`` (``metrics.json``, ...)
    describes: make ``out``, remove the record, then the old ``files``, so that an interruption half-way
    leaves the set visibly incomplete (no record) rather than new data beside an old record or an old
    picture. The caller writes the record last. Returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (record, *files):
        (out / name).unlink(missing_ok=True)
    return out


STAGED = ".staged-"  # the prefix of the hidden folder in which writing_outputs gathers a set
PROBE = ".condiff-probe-"  # the prefix of the CLI's write probe (condiff.cli.common.check_writable)
_written: list[Path] = []  # the folders whose sets writing_outputs has moved in whole (see written_sets)
# what killed writers leave: write_file_atomic's and save_checkpoint's temporaries, writing_outputs' sets (with
# the former inside), the CLI's write probes
TEMPORARIES = (".*.tmp", ".*.tmp-*", STAGED + "*", PROBE + "*")


def written_sets(forget: bool = False) -> list[Path]:
    """The folders into which :func:`writing_outputs` has moved a whole set since the last ``forget``: a
    Ctrl-C after that says the set is whole rather than leaving it in doubt."""
    found = list(_written)
    if forget:
        _written.clear()
    return found


@contextlib.contextmanager
def writing_outputs(out: str | Path, record: str, *old: str) -> Iterator[Path]:
    """Around a command's writing of a set of files and their ``record`` (``metrics.json``, ...) into ``out``.
    The block writes them into the hidden folder it is given, inside ``out``; once the block ends they are
    moved into ``out`` (renames, which need no space), the record last, and the previous set's ``old`` files
    that the new set lacks are removed. A failure half-way (a full disk, Ctrl-C) thus leaves the previous
    set and its record as they were. One writer at a time: two commands writing one folder at once (which a
    run's shared lock allows) cannot leave one's record beside the other's data; a second one waits."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with waiting_lock(out / ".writing.lock", f"waiting for another condiff command writing {out}"):
        for left in out.glob(STAGED + "*"):  # a killed writer's (no other writes now: this one holds the lock)
            shutil.rmtree(left, ignore_errors=True)
        staged = Path(tempfile.mkdtemp(prefix=STAGED, dir=out))
        try:
            yield staged
            names = sorted(str(p.relative_to(staged)) for p in staged.rglob("*")
                           if p.is_file() and not p.name.startswith("."))
            if record not in names:
                raise RuntimeError(f"the set written for {out} lacks its record {record}")
            for name in [*names, *old]:  # each place free for its file, or to remove, before anything changes
                if (out / name).is_dir():
                    raise IsADirectoryError(f"{out / name} is a directory, where this command writes a file: move "
                                            "it away (nothing was changed)")
                for folder in (out / p for p in Path(name).parents if p != Path(".")):
                    if folder.exists() and not folder.is_dir():
                        raise NotADirectoryError(f"{folder} is a file, where this command writes {out / name}: "
                                                 "move it away (nothing was changed)")
            (out / record).unlink(missing_ok=True)  # from here to its return, the set is visibly incomplete
            for name in old:
                if name not in names:
                    (out / name).unlink(missing_ok=True)
            for name in [*(n for n in names if n != record), record]:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged / name, out / name)
            _written.append(out)
        except OSError as e:  # a message names a file by where it goes, not by the hidden folder
            here = lambda v: v.replace(str(staged), str(out)) if isinstance(v, str) else v  # noqa: E731
            if str(staged) in f"{e.strerror} {e.filename} {e.filename2}":
                raise type(e)(e.errno, here(e.strerror), here(e.filename), None, here(e.filename2)) from None
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def record_kept_on_failure(out: str | Path, record: str = "metrics.json") -> Iterator[Path]:
    """Around a command that calls :func:`begin_outputs` (which removes ``out/record`` first) and may then
    fail on a check before it changes anything: a failure that left every other file under ``out`` as it
    was puts the old record back (a refused or mistyped rerun deleted the results of the run before it)."""
    out = Path(out)
    f = out / record

    def listing() -> dict:
        files = {}
        for p in out.rglob("*"):
            if p != f and not p.name.startswith(".") and p.is_file():  # (a dangling link is no file)
                with contextlib.suppress(OSError):
                    st = p.stat()
                    files[str(p.relative_to(out))] = (st.st_size, st.st_mtime_ns)
        return files

    kept = f.read_bytes() if f.is_file() else None
    before = listing() if kept is not None else None
    try:
        yield out
    except BaseException:
        if kept is not None and not f.exists() and listing() == before:
            write_file_atomic(f, lambda h: h.write(kept), binary=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`write_file_atomic`)."""
    write_file_atomic(path, lambda f: f.write(text))


def write_npz_atomic(path: str | Path, **arrays: Any) -> None:
    """Write a compressed ``.npz`` of ``arrays`` to ``path`` atomically (:func:`write_file_atomic`)."""
    import numpy as np

    write_file_atomic(path, lambda f: np.savez_compressed(f, **arrays), binary=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (:func:`write_text_atomic`). A NaN (an undefined figure) is written
    as ``null``, not as the bare ``NaN`` that JSON readers other than Python's refuse; an infinite number
    stays ``Infinity``, which Python reads back (a setting such as a box's ``hi = inf`` must survive; a
    ratio over zero reads ``Infinity`` too) but strict readers such as ``jq`` do not."""
    write_text_atomic(path, json_text(obj))


def json_text(obj: Any) -> str:
    """The text :func:`write_json_atomic` writes for ``obj``."""
    try:
        plain = json.loads(json.dumps(obj, default=_json_default))  # tensors, paths, NumPy scalars -> JSON types
    except TypeError as e:
        where = _unwritable_key(obj)
        raise TypeError(f"{e}{f' (the value of {where})' if where else ''}") from None
    return json.dumps(no_nan(plain), indent=2, sort_keys=True) + "\n"


def _unwritable_key(obj: Any, at: str = "") -> str | None:
    """The dotted key of the first value in ``obj`` that JSON cannot hold."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else None
    if items is None:
        return None
    for k, v in items:
        key = f"{at}.{k}" if at else str(k)
        try:
            json.dumps(v, default=_json_default)
        except TypeError:
            return _unwritable_key(v, key) or key
    return None


def no_nan(obj: Any) -> Any:
    """``obj`` (JSON types) with every NaN replaced by None."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nan(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, contiguous, each with memory of its own: safetensors refuses tensors that share
    memory (a network's tied weights), which are written as copies and load back as equal tensors."""
    flat, seen = {}, set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"a checkpoint holds tensors: {k!r} is a {type(v).__name__}")
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        flat[k] = t
    return flat


def _check_replaceable(path: Path) -> None:
    """Refuse to save a checkpoint at ``path`` where that would delete something that is not one."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink():  # replacing it would replace the link, and leave the directory it names as it was
        raise FileExistsError(f"cannot save a checkpoint at {path}: it is a link (to {os.readlink(path)}); give the "
                              "directory itself")
    if not path.is_dir():
        raise FileExistsError(f"cannot save a checkpoint at {path}: it is a file, and a checkpoint is a directory "
                              "(give the directory to write it to)")
    other = sorted(q.name + ("/" if q.is_dir() else "") for q in path.iterdir()
                   if not (q.is_file() and not q.is_symlink() and (q.suffix == ".safetensors" or q.name == CONFIG))
                   and q.name != ".DS_Store")  # a file browser's own note on the folder
    if other:
        raise FileExistsError(f"cannot save a checkpoint at {path}: it holds {', '.join(other[:3])}"
                              f"{', ...' if len(other) > 3 else ''}, which are not a checkpoint's files and which "
                              "saving there would delete (give a directory of its own; a run's model is RUN/model)")


def save_checkpoint(path: str | Path, groups: dict[str, dict[str, torch.Tensor]], config: dict) -> Path:
    """Write a checkpoint directory atomically and return its path.

    ``groups`` maps a file stem to a flat ``{name: tensor}`` dict; ``config`` is JSON-serialisable and
    is written with the condiff and torch versions (:func:`versions`) under ``versions``.
    An existing directory at ``path`` is replaced only once the new one is complete; it must be a
    checkpoint (nothing in it but ``.safetensors`` files and ``config.json``) or empty: anything else there
    (a run's checkpoints and log, a file) is refused, as saving would delete it.
    """
    path, config = Path(path), {**config, "versions": versions()}
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    moved = False  # the previous checkpoint sits at ``old`` until the new one is in place
    try:
        _as_created(tmp, directory=True)
        for stem, tensors in groups.items():
            save_file(_unshared(tensors), str(tmp / f"{stem}.safetensors"))
        with open(tmp / CONFIG, "w") as f:
            f.write(json_text(config))
        for p in tmp.iterdir():
            _as_created(p)  # safetensors writes its files 0600
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
            moved = True
        os.replace(tmp, path)
        moved = False
        shutil.rmtree(old, ignore_errors=True)
        _sweep_stale(path.parent, f".{path.name}.tmp-*")
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved:  # failed between the two renames: put the previous checkpoint back at its name
            os.replace(old, path)
        raise
    return path


@contextlib.contextmanager
def waiting_lock(lock: str | Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (made if missing) inside the block; where another process
    holds it, say ``waiting`` (if given) on stderr and wait for it. For short shared work (a cache entry made once),
    where a second process should wait rather than refuse as a run's lock does."""
    import fcntl
    import sys

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        f = open(lock, "a")
    except PermissionError:  # made by another user of a shared cache: flock needs no write access
        f = open(lock)
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


class RunInUseError(RuntimeError):
    """Another process holds the run directory."""


class ModelInTraining(CheckpointError, RunInUseError):
    """A model asked for that another process is still training: no model yet, and none to wait long for."""


_LOCKS: dict[Path, tuple[int, bool]] = {}  # run directory -> (the .lock's descriptor, held shared)


def is_rank0() -> bool:
    """Whether this process is rank 0 of a torchrun job (or runs alone): the one that writes and clears a
    run directory that the ranks share."""
    return os.environ.get("RANK", "0") == "0"


def lock_run(run_dir: str | Path, shared: bool = False) -> None:
    """Hold ``run_dir/.lock`` for the rest of this process, so that two commands never write one run
    at once; refused in one line when another process holds it. ``shared``: a command that writes results
    of the run's model into it (sample, eval, solve, pnp), which may run beside others of its kind but not
    beside one that trains, clears or resumes the run (which holds it alone, and then sweeps what killed
    writers left: :func:`_sweep_run`). Does nothing while ``run_dir`` does not exist (call it again once
    it is made) or when this process holds it already (a shared hold is made exclusive when asked)."""
    import fcntl

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir() or not is_rank0():
        return  # the ranks of one torchrun job share their run: rank 0 holds it
    held = _LOCKS.get(run_dir)
    if held is not None and (shared or not held[1]):
        return
    if held is not None:
        fd = held[0]
    else:
        try:
            fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # a run shared with a group, its .lock made by another user: flock needs no write
            fd = os.open(run_dir / ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        if held is None:
            os.close(fd)
        holder = _exclusive_holder(run_dir)  # result writers sharing it record no pid
        who = f"pid {holder}" if holder is not None else "writing results there"
        raise RunInUseError(f"{run_dir} is in use by another condiff process ({who}); wait for it to "
                            "finish or use another directory") from None
    if not shared:
        with contextlib.suppress(OSError):  # (a read-only descriptor records no pid)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[run_dir] = (fd, shared)  # held until release_runs() or the process exits
    if not shared:
        _sweep_run(run_dir)


def subdirs(d: Path) -> list[Path]:
    """The folders in ``d``, not through links (a linked folder lies outside the run)."""
    with contextlib.suppress(OSError), os.scandir(d) as it:
        return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    return []


def _sweep_run(run_dir: Path) -> None:
    """Remove what writers of ``run_dir`` that were killed left behind, now that no other process writes it
    (its lock is held alone): half-written files and directories (``.NAME.*.tmp``, ``.NAME.tmp-*``: full
    model copies, on a large profile) in the run and two levels below (stages, their models), and a
    checkpoint's ``.NAME.old-PID`` of a dead writer where the checkpoint itself is in place (else it is put
    back). Linked folders are not entered."""
    first = subdirs(run_dir)
    for d in (run_dir, *first, *(q for p in first for q in subdirs(p))):
        _sweep_stale(d, *TEMPORARIES, older_than=None)
        for old in d.glob(".*.old-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                recover_checkpoint(d / old.name[1:].rsplit(".old-", 1)[0])
                if old.exists():  # the checkpoint was in place: this copy is stale
                    remove(old)


def _lock_pid(fd: int) -> str:
    """The pid the holder of a ``.lock`` wrote into it ("?" if none)."""
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    except OSError:
        return "?"


def run_holder(run_dir: str | Path) -> str | None:
    """The pid of another process that holds ``run_dir/.lock`` (a command writing that run now), else None."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _LOCKS or not (run_dir / ".lock").is_file():
        return None
    return _exclusive_holder(run_dir)


def _exclusive_holder(run_dir: Path) -> str | None:
    """The pid recorded by a process that holds ``run_dir/.lock`` alone (probed with a shared lock), else None
    (free, or shared by result writers only)."""
    import fcntl

    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _lock_pid(fd)
    finally:
        os.close(fd)  # closing also drops the probe's own lock
    return None


@contextlib.contextmanager
def claimed_run(run_dir: str | Path) -> Iterator[Path]:
    """Make ``run_dir`` if needed and hold its lock (:func:`lock_run`) from the start of the block, so
    that no other condiff process writes it while the block checks, clears or resumes it. A block that
    fails leaves no trace of the claim: a directory made here that holds nothing but its lock is
    removed again (a refused command leaves nothing behind)."""
    run_dir = Path(run_dir)
    top = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)  # first made here
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock_run(run_dir)
        yield run_dir
    except BaseException:
        if top is not None and all(p.name == ".lock" for p in run_dir.iterdir()):
            held = _LOCKS.pop(run_dir.resolve(), None)
            if held is not None:
                os.close(held[0])
            shutil.rmtree(top, ignore_errors=True)
        raise


def release_runs() -> None:
    """Release every run-directory lock this process holds (the command line does at the end of a command)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1][0])


REPLACED = ".replaced"  # in a run directory: what --fresh / --retrain replace, kept until the new run finishes
MOVING = ".moving"  # in REPLACED while entries move in or out: the names, so that a move cut short is finished
SET_ASIDE = ".set-aside"  # in REPLACED: the names set aside there, so a restore knows what the old run did not have
_RECORDS = (MOVING, SET_ASIDE)  # the bookkeeping files of REPLACED, never entries of a kept run
DROPPING = REPLACED + ".drop-"  # in a run directory: what drop_replaced is deleting (never a kept run)


def remove(path: str | Path) -> bool:
    """Delete a file, a folder with its contents, or a link (not what it points to); False if nothing is there."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif _present(p):
        p.unlink(missing_ok=True)
    else:
        return False
    return True


def _present(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def _kept_entries(keep: Path, names: tuple[str, ...] | list[str] | None) -> list[Path]:
    """The entries of ``keep`` (only ``names`` when given), without the move marker."""
    if names is not None:
        return [keep / n for n in names]
    return [p for p in keep.iterdir() if p.name not in _RECORDS] if keep.is_dir() else []


def kept_names(run_dir: str | Path) -> list[str]:
    """The entries of the run that ``run_dir/.replaced`` keeps, sorted ([] where it keeps none: no
    ``.replaced``, or one holding only its records after everything was moved back by hand)."""
    return sorted(p.name for p in _kept_entries(Path(run_dir) / REPLACED, None))


def _tidy(keep: Path) -> None:
    """Remove ``keep`` (``.replaced``) once it keeps no entry: its record of what was set aside goes with it."""
    if keep.is_dir() and not _kept_entries(keep, None) and not (keep / MOVING).exists():
        (keep / SET_ASIDE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            keep.rmdir()


def _set_aside_names(keep: Path) -> list[str] | None:
    """The names :func:`set_aside` recorded in ``keep`` (None for a record it cannot read, or none)."""
    try:
        names = json.loads((keep / SET_ASIDE).read_text())
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _forget_set_aside(keep: Path, names: list[str] | None) -> None:
    """Take ``names`` (all when None) off the record of what is set aside in ``keep``; the record goes with its
    last name, so that an empty ``keep`` can be removed."""
    left = [n for n in (_set_aside_names(keep) or []) if names is not None and n not in names]
    if left:
        write_json_atomic(keep / SET_ASIDE, left)
    else:
        (keep / SET_ASIDE).unlink(missing_ok=True)


def _begin_moving(keep: Path, names: list[str]) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    write_json_atomic(keep / MOVING, list(names))


def _sweep_drops(run_dir: Path) -> None:
    """Finish a removal of a kept run that was cut short (:data:`DROPPING`: never a kept run)."""
    for trash in run_dir.glob(DROPPING + "*"):
        remove(trash)


def _finish_moving(run_dir: Path) -> None:
    """Make ``.replaced`` whole again after a :func:`set_aside` or :func:`restore_replaced` that was cut short
    (Ctrl-C, a kill) between its moves: the entries it names that lie in ``run_dir`` and not in ``.replaced``
    belong to the kept run (not yet set aside, or already put back), and go into ``.replaced``. Otherwise the
    next set-aside would read a part of the old run as all of it, and delete the rest as a failed attempt's.
    Only a command about to set aside or restore does this: one that goes on with the run as it lies (a
    resume) or has finished replacing it discards the record instead (:func:`discard_moving`)."""
    _sweep_drops(run_dir)
    keep = run_dir / REPLACED
    f = keep / MOVING
    try:
        names = json.loads(f.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        names = None
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
        raise ValueError(f"{f} is damaged (it is written whole by condiff): it names what was being moved into or "
                         f"out of {keep} when that was cut short; move the run's files back into {run_dir} "
                         f"and delete {keep}, or delete {keep} to drop the run kept there")
    for n in names:
        if _present(run_dir / n) and not _present(keep / n):
            (keep / n).parent.mkdir(parents=True, exist_ok=True)
            os.replace(run_dir / n, keep / n)
    f.unlink(missing_ok=True)


def discard_moving(run_dir: str | Path) -> None:
    """Forget a set-aside or restore that was cut short (:data:`MOVING`), for a command that goes on with the
    run as it lies in ``run_dir`` (``--resume``): the entries left there are the run it continues, which a
    later :func:`_finish_moving` would otherwise move into ``.replaced`` (and a finished run then delete)."""
    if is_rank0():
        (Path(run_dir) / REPLACED / MOVING).unlink(missing_ok=True)


def set_aside(run_dir: str | Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Move the entries ``names`` of ``run_dir`` that exist into ``run_dir/.replaced`` instead of deleting
    them, so that a replacement which fails (an error, Ctrl-C) loses nothing of the run it was to
    replace; :func:`drop_replaced` removes them once the new run is finished. While it holds any of
    ``names`` already (a replacement that failed before), what it holds is the run to keep: the entries
    in ``run_dir`` are then that failed attempt's, and all of them are deleted, none moved, so the two
    never mix; but an entry the record of what was set aside names (:data:`SET_ASIDE`) and ``.replaced`` no
    longer holds was moved back by hand, and rejoins the kept run there. The moves are recorded first
    (:data:`MOVING`), so that a set-aside cut short between them
    is finished by the next call rather than read as a whole kept run. The run being replaced takes its
    room on the disk until then. Returns the names moved. Rank 0 of a torchrun job does it alone."""
    run_dir = Path(run_dir)
    if not is_rank0():
        return []
    _finish_moving(run_dir)
    keep = run_dir / REPLACED
    present = [n for n in names if _present(run_dir / n)]
    if any(_present(keep / n) for n in names):
        had = _set_aside_names(keep) or []
        back = [n for n in present if n in had and not _present(keep / n)]  # the kept run's, moved back by hand
        for n in present:
            if n not in back:
                remove(run_dir / n)
        if back:  # rejoin the kept run rather than go as the failed attempt's
            _move_into(run_dir, keep, back)
        return []
    if not present:
        return []
    _move_into(run_dir, keep, present)
    write_json_atomic(keep / SET_ASIDE, sorted({*(_set_aside_names(keep) or []), *present}))
    return present


def _move_into(run_dir: Path, keep: Path, names: list[str]) -> None:
    """Move the entries ``names`` of ``run_dir`` into ``keep``, the moves recorded first (:data:`MOVING`)."""
    _begin_moving(keep, names)
    for n in names:
        (keep / n).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / n, keep / n)
    (keep / MOVING).unlink()


def drop_replaced(run_dir: str | Path, names: tuple[str, ...] | list[str] | None = None) -> None:
    """Delete what :func:`set_aside` kept in ``run_dir/.replaced`` (only ``names`` when given), now that
    the run replacing it has finished. Each entry is first renamed out of ``.replaced`` in one step, so an
    interruption leaves either the kept run whole or nothing of it there (never a part to be restored)."""
    run_dir = Path(run_dir)
    _sweep_drops(run_dir)
    keep = run_dir / REPLACED
    if not keep.is_dir():
        return
    discard_moving(run_dir)  # what a set-aside cut short left in run_dir is the finished run's now: not moved
    if names is None:
        trash = run_dir / f"{DROPPING}{os.getpid()}"
        os.replace(keep, trash)
        remove(trash)
        return
    for i, p in enumerate(_kept_entries(keep, names)):
        if _present(p):
            trash = run_dir / f"{DROPPING}{os.getpid()}-{i}"
            os.replace(p, trash)
            remove(trash)
    _forget_set_aside(keep, list(names))
    _tidy(keep)


def restore_replaced(run_dir: str | Path, names: tuple[str, ...] | list[str] | None = None,
                     attempt: tuple[str, ...] | list[str] = ()) -> None:
    """Move what :func:`set_aside` kept in ``run_dir/.replaced`` (only ``names`` when given) back in place of
    the entries of the replacement that failed; ``config.json`` last, so that a restore cut short leaves no
    settings claiming a whole run (and the moves are recorded, as :func:`set_aside` records them, so that
    the next call puts such a restore's entries back into ``.replaced``). ``attempt``: what the failed
    replacement may have written (its run's entries); those the kept run did not have (by the record of what
    was set aside, :data:`SET_ASIDE`) are deleted, so that none is left beside the restored run. An entry the
    kept run had is never deleted, even where it is no longer in ``.replaced`` (moved back by hand). Rank 0 of a
    torchrun job does it alone."""
    run_dir = Path(run_dir)
    if not is_rank0():
        return
    _finish_moving(run_dir)  # first: what a cut-short set-aside left in run_dir is the kept run's, not the attempt's
    keep = run_dir / REPLACED
    if not keep.is_dir():
        return
    had = _set_aside_names(keep)
    for n in attempt if had is not None else ():  # without the record, nothing tells the attempt's entries apart
        if n not in had and not _present(keep / n):
            remove(run_dir / n)
    entries = sorted((p for p in _kept_entries(keep, names) if _present(p)), key=lambda p: p.name == CONFIG)
    if entries:
        _begin_moving(keep, [p.name for p in entries])
    for p in entries:
        remove(run_dir / p.name)
        os.replace(p, run_dir / p.name)
    _forget_set_aside(keep, None if names is None else list(names))
    (keep / MOVING).unlink(missing_ok=True)
    _tidy(keep)


def read_json_table(path: str | Path) -> dict:
    """A JSON file holding one table of settings; a ValueError naming the file when it is broken."""
    path = Path(path)
    try:
        out = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} does not hold a table of settings")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_checkpoint(path: str | Path) -> Path:
    """``path``, put back from ``.NAME.old-PID`` if a :func:`save_checkpoint` was killed between its two
    renames (the previous checkpoint set aside, the new one not yet in place) and that process is gone."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        for old in sorted(path.parent.glob(f".{path.name}.old-*")):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                os.replace(old, path)
                break
    return path


def load_config(path: str | Path) -> dict:
    """Read ``config.json`` of a checkpoint directory, with a clear error when it is absent or broken."""
    path = recover_checkpoint(path)
    cfg = path / CONFIG
    if path.is_file():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory (with {CONFIG})")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not cfg.is_file():
        raise CheckpointDamaged(f"{path} is not a condiff checkpoint: no {CONFIG}")
    try:
        out = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"corrupted {cfg}: {e}") from None
    if not isinstance(out, dict):
        raise CheckpointDamaged(f"corrupted {cfg}: it holds a {type(out).__name__}, not a table of settings")
    return out


def load_group(path: str | Path, stem: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load one ``stem.safetensors`` file of a checkpoint; a truncated file gives a CheckpointError."""
    f = Path(path) / f"{stem}.safetensors"
    if not f.is_file():
        raise CheckpointDamaged(f"checkpoint {path} has no {f.name}")
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointDamaged(f"corrupted or truncated checkpoint file {f}: {e}") from None


def has_group(path: str | Path, stem: str) -> bool:
    return (Path(path) / f"{stem}.safetensors").is_file()


# --- optimizer state <-> flat tensors + JSON ---------------------------------------------------


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and JSON-ready metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- module save / load ------------------------------------------------------------------------


def dtype_entry(module: torch.nn.Module) -> dict:
    """What a model's config records of its weights' dtype: nothing for float32, else ``{"dtype": name}``
    (:func:`condiff.models.load_net` restores it)."""
    dtype = checks.param_dtype(module)
    return {} if dtype == torch.float32 else {"dtype": str(dtype).removeprefix("torch.")}


def to_recorded_dtype(module: torch.nn.Module, cfg: dict, where: Path | str) -> torch.nn.Module:
    """``module`` in the dtype its config records (:func:`dtype_entry`; float32 where it records none)."""
    if cfg.get("dtype") is None:
        return module
    dtype = getattr(torch, str(cfg["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{where}/config.json: dtype {cfg['dtype']!r} is no floating-point torch dtype")
    return module.to(dtype)


def save_module(path: str | Path, module: torch.nn.Module, config: dict) -> Path:
    """Save a module's state as ``model.safetensors`` with ``config`` (enough to rebuild it)."""
    return save_checkpoint(path, {"model": module.state_dict()}, config)


def _mismatch(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """A one-line account of how a state dict differs from a module's (missing, unexpected, shapes)."""
    parts = []
    for label, keys in (("missing", [k for k in want if k not in got]),
                        ("unexpected", [k for k in got if k not in want])):
        if keys:
            parts.append(f"{len(keys)} {label} tensor(s), e.g. {keys[0]}")
    shapes = [k for k in want if k in got and tuple(want[k].shape) != tuple(got[k].shape)]
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of other shape, e.g. {k} {tuple(got[k].shape)} "
                     f"where the model has {tuple(want[k].shape)}")
    return "; ".join(parts) or "the tensors do not fit"


def load_state_into(module: torch.nn.Module, path: str | Path, stem: str = "model") -> None:
    """Load ``stem.safetensors`` into ``module``; a file for another architecture, or one holding
    non-finite weights (a corrupted file whose header survived), is a one-line CheckpointError."""
    state = load_group(path, stem, device=next(module.parameters(), torch.empty(0)).device)
    f = f"{path}/{stem}.safetensors"
    try:
        module.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(f"{f} does not match the model (other settings?): "
                              f"{_mismatch(module.state_dict(), state)}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointDamaged(f"{f} holds non-finite weights in {len(bad)} tensor(s) (e.g. {bad[0]}): "
                                "the file is corrupted")


def cache_dir(make: bool = True) -> Path:
    """Where project-made artefacts (the digits classifier, generated data sets) are cached, made unless
    ``make`` is False.

    ``$CONDIFF_CACHE`` if set, else ``~/.cache/condiff``; where no home folder is known (a container's user
    without one), ``condiff-cache-UID`` in the temporary folder, not a ``~`` folder below each working directory.
    """
    home = os.path.expanduser("~")  # (os.path's leaves a "~user" it cannot find as it is; pathlib's raises)
    shared = False
    if os.environ.get("CONDIFF_CACHE"):
        p = Path(os.path.abspath(os.path.expanduser(os.environ["CONDIFF_CACHE"])))
    elif os.path.isabs(home):
        p = Path(home, ".cache", "condiff")
    else:  # in a folder every user writes to: this user's own, which no one else may write (it holds trust records)
        p, shared = Path(tempfile.gettempdir(), f"condiff-cache-{os.getuid()}"), True
    if make:
        try:
            p.mkdir(mode=0o700 if shared else 0o777, parents=True, exist_ok=True)
        except OSError as e:
            raise _errno_kept(OSError(f"cannot make the cache folder {p} ({e.strerror}): set CONDIFF_CACHE to a "
                                      "writable folder"), e.errno) from None
        if shared:  # a link, or another user's folder, could be planted there: neither is taken
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
                raise PermissionError(f"the cache folder {p} is a link or belongs to another user: set "
                                      "CONDIFF_CACHE to a folder of your own")
            if st.st_mode & 0o077:  # made under a looser umask (before it was made 0700): this user's own, closed
                p.chmod(0o700)
    return p


def _errno_kept(e: OSError, number: int | None) -> OSError:
    """``e`` with ``number`` as its errno, its message left without the "[Errno N]" that the two-argument form
    puts before it (what a one-line error shows)."""
    e.errno = number
    return e
