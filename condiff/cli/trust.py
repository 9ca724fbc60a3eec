"""``condiff trust``: let saved models that name these Python files run them when they are loaded.

A model trained with a network of one's own (``model.name = "FILE.py:NAME"``) names the file in its
``config.json``, and loading the model runs the file. condiff runs such a file at load only if it has
run the file as it is now before (at training, or when a command was given it) or it was trusted, as
it is now, with this command; the record is kept in the cache (``$CONDIFF_CACHE``, else
``~/.cache/condiff``). Trust a file you have read, for a model (or a NAMM run) from elsewhere, or after
editing it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..userfile import forget_file, python_file, split_file_spec, trust_file, trusted_files


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="let saved models that name these Python files (a network of your own) run "
                       "them at load", description=__doc__)
    p.add_argument("files", nargs="*", metavar="FILE.py",
                   help="the files to trust, as they are now (FILE.py:NAME names FILE.py)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the trusted files (and how many versions of each)")
    what.add_argument("--forget", action="store_true", help="stop trusting the files given (every version)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        if args.files:
            raise ValueError("--list takes no files")
        table = trusted_files()
        for f, versions in sorted(table.items()):
            print(f"{f}  ({len(versions)} version{'s' if len(versions) != 1 else ''})")
        if not table:
            print("no file is trusted")
        return 0
    if not args.files:
        raise ValueError("--forget needs the files to stop trusting" if args.forget else
                         "name the files to trust (or, with --forget, to stop trusting), or pass --list")
    # FILE.py:NAME, as --set model.name and --constraint spell a file of one's own, names the file
    named = [split_file_spec(f, "trust", "a class or function") for f in args.files]
    files = [Path(s[0] if s else f).expanduser().resolve() for s, f in zip(named, args.files)]
    if args.forget:
        for f in files:
            print(f"forgot {f}" if forget_file(f) else f"{f} was not trusted")
        return 0
    for f in files:  # all checked before any is recorded
        python_file(f)
    for f in files:
        print(f"trusted {f} (SHA-256 {trust_file(f)[:16]}...)")
    return 0
