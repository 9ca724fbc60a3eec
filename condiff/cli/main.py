"""The ``condiff`` command. Each subcommand lives in its own module whose ``add_parser`` sets ``func``.

Errors a user can cause (bad flags, bad data, bad checkpoints) end in one line on stderr and exit
status 2; set ``CONDIFF_DEBUG=1`` to see the traceback instead. Other exit statuses tell a script what to do:
75 (sysexits' EX_TEMPFAIL) when another condiff process holds the run (try again later), 74 (EX_IOERR) when the
disk is full or the file system refuses writes, 128 + the signal's number when stopped (130 for Ctrl-C, 143
for SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import warnings

# subcommand name -> module under condiff.cli
COMMANDS = {
    "train": "train",
    "sample": "sample",
    "eval": "evaluate",
    "demo": "demo",
    "bench": "bench",
    "namm": "namm",
    "dual": "dual",
    "solve": "solve",
    "pnp": "pnp",
    "trust": "trust",
    "show": "show",
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage block first) and no
    abbreviated options (`namm assimilate --n` would silently mean `--no-baselines`); the
    subcommands' parsers are made of the same class."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = Parser(prog="condiff", description="Diffusion models that satisfy constraints.")
    p.add_argument("--version", action="version", version=f"condiff {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, mod in COMMANDS.items():
        importlib.import_module(f"condiff.cli.{mod}").add_parser(sub, name)
    _add_quiet(p)
    _plain_text(p)
    return p


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` (no progress bars) on every command that runs something (each parser without subcommands;
    ``namm``'s have their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for child in action.choices.values():
            _add_quiet(child)
    if not subs and "--quiet" not in parser._option_string_actions:
        parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _plain_text(parser: argparse.ArgumentParser) -> None:
    """Strip the reST markup of the docstrings the help texts come from (``x``, :func:`x`), in every
    (sub)parser, its options and its subcommands' one-line summaries."""
    from .common import plain_text as plain

    parser.description, parser.epilog = plain(parser.description), plain(parser.epilog)
    for action in parser._actions:
        action.help = plain(action.help) if isinstance(action.help, str) else action.help
        for choice in getattr(action, "_choices_actions", ()):
            choice.help = plain(choice.help)
        for child in (action.choices or {}).values() if isinstance(action.choices, dict) else ():
            _plain_text(child)


def _say(line: str) -> None:
    """A line on stderr; with a progress bar on screen, above it (not glued to the end of the bar's line)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    if tqdm is not None and getattr(tqdm, "_instances", None):
        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


BUSY, IO_ERROR = 75, 74  # sysexits.h: EX_TEMPFAIL (try again later), EX_IOERR
PATH_ARGS = ("out", "ckpt", "run", "data", "input", "mask", "measurement", "config", "paths", "files")  # "~" expanded


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk is full (an OSError's errno, or safetensors' words)."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def exit_status(e: BaseException) -> int:
    """The exit status of a command that failed with ``e`` (see the module's docstring)."""
    from ..io import RunInUseError

    if isinstance(e, KeyboardInterrupt):
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    if isinstance(e, RunInUseError):
        return BUSY
    if _disk_full(e) or getattr(e, "errno", None) in (errno.EDQUOT, errno.EROFS, errno.EIO):
        return IO_ERROR
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch: a Ctrl-C lands here as often as anywhere
    except KeyboardInterrupt:
        print("condiff: interrupted before the command started; nothing was written", file=sys.stderr)
        return 130
    args, extra = parser.parse_known_args(argv)
    # messages name the (sub)command they come from (`condiff namm sample`), whose --help lists its options
    prog = " ".join(["condiff", args.command, *(v for k, v in sorted(vars(args).items())
                                                 if k.endswith("_command") and isinstance(v, str))])
    if extra:
        # an unknown option's value cannot be told from a positional argument (`bench --out X NAME` read X as the
        # benchmark's name and called NAME unrecognised), so the options alone are named when there are any
        options = [e for e in extra if e.startswith("-") and not _is_number(e)]
        named = (f"option{'s' * (len(options) > 1)}: {' '.join(options)}" if options
                 else f"argument{'s' * (len(extra) > 1)}: {' '.join(extra)}")
        print(f"{prog}: error: unrecognized {named} (see {prog} --help)", file=sys.stderr)
        return 2
    empty = [f"--{k}" for k in ("out", "ckpt", "run", "data") if isinstance(getattr(args, k, None), str)
             and not getattr(args, k).strip()]  # '' read as "not given" picked the default directory
    if empty:
        print(f"{prog}: error: {empty[0]} is empty: give a path", file=sys.stderr)
        return 2
    for k in PATH_ARGS:  # as a shell does: a quoted "~/runs/x" made a folder named "~"
        v = getattr(args, k, None)
        if isinstance(v, str):
            setattr(args, k, os.path.expanduser(v))
        elif isinstance(v, list):  # show's paths, trust's files
            setattr(args, k, [os.path.expanduser(p) if isinstance(p, str) else p for p in v])
    # each command's warnings afresh (a warning given by one command in this process is not swallowed as a
    # repeat in the next, as Python's once-per-line rule would), printed as one line, and the process's
    # warning settings restored afterwards
    with warnings.catch_warnings():
        return _run_command(args, prog, own_process=argv is None)


def _run_command(args: argparse.Namespace, prog: str, own_process: bool = False) -> int:
    if not os.environ.get("CONDIFF_DEBUG"):  # a warning is one line too
        warnings.showwarning = lambda message, category, *rest, **kw: _say(f"{prog}: warning: {message}")
    from .. import io
    from ..sample import quiet_progress
    from . import common

    common.forget_claims()
    io.written_sets(forget=True)
    try:
        with quiet_progress(getattr(args, "quiet", False)):
            rc = int(args.func(args) or 0)
        if rc == 0:
            common.mark_runs()
            if own_process and "condiff.train" in sys.modules:  # under torchrun, the ranks leave together
                from ..train import leave_process_group

                leave_process_group(only_joined=True)
        return rc
    except KeyboardInterrupt as e:
        if own_process:  # the condiff process itself (not a caller's main([...])): a second Ctrl-C while it
            with contextlib.suppress(ValueError):  # shuts down (about a second) printed a traceback from atexit
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        hint = getattr(args, "interrupted", None)
        if callable(hint):  # a hint that depends on what the command got to write
            hint = hint(args)
        if done := io.written_sets():  # a Ctrl-C after the set's last rename (its files are all in place)
            hint = "; ".join([f"the results in {', '.join(map(str, done))} were written whole before it",
                              *([hint] if hint else [])])
        _close_progress_bars()
        print("condiff: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return exit_status(e)
    except Exception as e:  # one line for the user; the traceback on request
        if os.environ.get("CONDIFF_DEBUG"):
            raise
        if isinstance(e, BrokenPipeError):  # the reader went away (`condiff bench --list | head`): stop quietly,
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and without a second error at exit
            return 141
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _disk_full(e):
            msg += " (the disk is full: free space and run the command again" + (
                " with --resume: the checkpoints written are whole)" if hasattr(args, "resume") else ")")
        if getattr(e, "errno", None) in (errno.EROFS, errno.EACCES) and "CONDIFF_CACHE" not in msg:
            with contextlib.suppress(Exception):  # the message must come whatever the cache's setting
                if (cache := str(io.cache_dir(make=False))) in f"{msg} {getattr(e, 'filename', '')}":
                    msg += f" (the cache, {cache}: set CONDIFF_CACHE to a writable folder)"
        _close_progress_bars()  # the message gets a line of its own, not the end of a bar's
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return exit_status(e)
    finally:
        io.release_runs()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
