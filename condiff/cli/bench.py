"""``condiff bench NAME``: run a benchmark module from ``benchmarks/`` and record its table.

Each module ``benchmarks/<name>.py`` (dashes become underscores) defines ``run(profile, device) -> dict``
returning ``{"title", "columns", "rows", "notes", ...}``; this command writes
``benchmarks/results/<name>-<profile>.json`` and ``.md`` and replaces the table's section in
BENCHMARKS.md. With ``--no-record`` (a trial run) the two files go to ``runs/bench-results/`` instead,
so that the recorded results stay as they were; so do a benchmark's results that mark themselves
``partial`` (a part of its table, such as ``NAMM_BENCH_DATA=count condiff bench namm``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import io
from .common import add_device_arg, check_writable, pick_device, plain_text, run_kind


def bench_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    return here if here.is_dir() else Path.cwd() / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in bench_dir().glob("*.py") if not p.stem.startswith("_"))


def summary(name: str) -> str:
    """The first sentence of a benchmark's docstring, read without importing it."""
    doc = " ".join(docstring(name).split("\n\n")[0].split())
    return re.split(r"(?<!\bal)\. ", doc)[0].rstrip(".")  # "et al. 2022" ends no sentence


def docstring(name: str) -> str:
    """A benchmark's whole docstring, read without importing it."""
    import ast

    return plain_text(ast.get_docstring(ast.parse((bench_dir() / f"{name.replace('-', '_')}.py").read_text())) or "")


def profile_names(name: str) -> list[str]:
    """The profiles a benchmark offers (its ``PROFILES``, which some build in code: read by importing it)."""
    try:
        profiles = getattr(load(name), "PROFILES", None)
    except Exception:  # a benchmark that does not import: its help is still shown
        return []
    return list(profiles) if isinstance(profiles, dict) else []


def load(name: str):
    """Import ``benchmarks/<name>.py`` as a module (benchmarks share helpers such as _timing)."""
    file = bench_dir() / f"{name.replace('-', '_')}.py"
    if str(bench_dir()) not in sys.path:
        sys.path.insert(0, str(bench_dir()))
    spec = importlib.util.spec_from_file_location(f"condiff_bench_{file.stem}", file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="run a benchmark and record its table", description=__doc__, add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # a flag rather than argparse's help action, which would print before NAME is read in `--help NAME`
    p.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: what that benchmark runs)")
    p.add_argument("name", help="benchmark name (see --list)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("--profile", default="quick",
                   help="quick (CPU: a few minutes to about two hours, by benchmark) or full (GPU); some "
                        "benchmarks have more (`condiff bench NAME --help` lists them); default quick")
    add_device_arg(p)
    p.add_argument("--no-record", action="store_true",
                   help="a trial run: leave BENCHMARKS.md and benchmarks/results as they are "
                        "(results go to runs/bench-results/ under the current directory)")
    p.set_defaults(func=run, parser=p, interrupted="nothing was recorded (BENCHMARKS.md and benchmarks/results are as "
                                                   "they were)")


def machine(device: str = "cpu") -> str:
    """The machine a benchmark ran on, naming the GPU it used (``device``) where it ran on one."""
    cpu = platform.processor() or platform.machine()
    used_gpu = torch.device(device) if str(device).startswith("cuda") else None
    if not torch.cuda.is_available():
        dev = "no GPU"
    elif used_gpu is None:  # a benchmark run on the CPU of a GPU machine
        dev = f"GPU not used ({torch.cuda.get_device_name(0)} present)"
    else:
        dev = torch.cuda.get_device_name(used_gpu if used_gpu.index is not None else 0)
    threads = torch.get_num_threads()  # what the benchmark ran on (OMP_NUM_THREADS=1 on a 2-core machine: 1)
    used = f", {threads} thread{'s' * (threads > 1)} used" if threads != os.cpu_count() else ""
    return (f"{os.cpu_count()} CPU cores ({cpu}{used}), {dev}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def to_markdown(res: dict, flags: str = "") -> str:
    """The result as a Markdown section; ``flags``: more of the command than its name and profile."""
    cols = res["columns"]
    lines = [f"## {res['title']}", "", f"`condiff bench {res['name']} --profile {res['profile']}{flags}` on "
             f"{res['machine']}, {res['date']}, {res['seconds']:.0f} s.", "",
             "| " + " | ".join(_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in res["rows"]:
        lines.append("| " + " | ".join(_cell(_fmt(row.get(c, ""))) for c in cols) + " |")
    for note in res.get("notes", []):
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A table cell's text, its ``|`` escaped (``max |diff|`` split its row into one cell too many)."""
    return str(text).replace("|", "\\|")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def benchmarks_md() -> Path:
    return bench_dir().parent / "BENCHMARKS.md"


def section_key(name: str, profile: str) -> str:
    # one section per profile: a GPU "full" table sits beside the CPU "quick" one instead of replacing it
    return name if profile == "quick" else f"{name}/{profile}"


def check_section(text: str, key: str) -> tuple[str, str]:
    """The markers of section ``key`` of BENCHMARKS.md (``text``), refused when damaged."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    if text.count(start) > 1 or text.count(start) != text.count(end) or (
            start in text and text.index(end) < text.index(start)):
        raise ValueError(f"{benchmarks_md()}: the markers of section {key!r} are damaged (each must appear once, "
                         f"{start} before {end}); mend them by hand")
    return start, end


def with_section(text: str, res: dict) -> str:
    """``text`` (BENCHMARKS.md) with this benchmark's section replaced, or appended if it has none."""
    start, end = check_section(text, section_key(res["name"], res.get("profile", "quick")))
    block = f"{start}\n{to_markdown(res)}{end}"
    if start in text:
        return text[: text.index(start)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def _table_text(path: Path) -> str:
    if not path.is_file():
        return "# Benchmarks\n\nTables written by `condiff bench NAME`.\n"
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def run(args: argparse.Namespace) -> int:
    if args.name and args.name not in available() and args.name.replace("_", "-") in available():
        args.name = args.name.replace("_", "-")  # the module's file name (sampler_overhead.py) names it too
    if args.name and args.name not in available():
        raise ValueError(f"unknown benchmark {args.name!r}; available: {', '.join(available())}")
    if args.help:
        args.parser.print_help()
        if args.name:
            print(f"\n{'-' * 70}\nbenchmarks/{args.name.replace('-', '_')}.py:\n\n{docstring(args.name)}")
            if profiles := profile_names(args.name):
                print(f"\nprofiles: {', '.join(profiles)}")
        return 0
    if args.list and args.name:
        raise ValueError(f"--list takes no benchmark name (got {args.name!r}): run `condiff bench {args.name}`")
    if args.list or not args.name:
        print("benchmarks (condiff bench NAME [--profile quick|full]):")
        for name in available():
            print(f"  {name:<18} {summary(name)}")
        return 0
    mod = load(args.name)
    profiles = getattr(mod, "PROFILES", None)
    if isinstance(profiles, dict) and args.profile not in profiles:
        raise ValueError(f"benchmark {args.name} has no profile {args.profile!r}; its profiles: {', '.join(profiles)}")
    device = pick_device(args.device)
    if args.profile == "full" and not device.startswith("cuda"):
        warnings.warn(f"the full profile is sized for a GPU, and runs far longer on {device}"
                      + ("" if args.no_record else "; its recorded section (GPU figures) would be replaced by these: "
                         "--no-record keeps it"), stacklevel=2)
    if not args.no_record:  # a damaged table is refused before the benchmark runs, not after
        check_section(_table_text(benchmarks_md()), section_key(args.name, args.profile))
    # where the results go, checked before minutes or hours of work (a partial run writes the trial folder)
    targets = [Path("runs") / "bench-results"] + ([] if args.no_record else [bench_dir() / "results", benchmarks_md()])
    for target in targets:
        check_writable(target, "bench: results to", folder=target != benchmarks_md())
    if (kind := run_kind(targets[0])) is not None:  # a run given that folder as its --out: not bench's to write
        raise FileExistsError(f"{targets[0]} holds a run of `{kind}`, where bench writes its trial results: move "
                              "that run away")
    t0 = time.perf_counter()
    res = mod.run(profile=args.profile, device=device)
    res.update({"name": args.name, "profile": args.profile, "device": device, "machine": machine(device),
                "seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")})
    # a benchmark that ran only part of its table (e.g. NAMM_BENCH_DATA) says so in "partial": such
    # a result would replace the whole recorded table with a part of it, so it is never recorded
    trial = args.no_record or bool(res.get("partial"))
    out = Path("runs") / "bench-results" if trial else bench_dir() / "results"
    md, text = to_markdown(res, " --no-record" if args.no_record else ""), io.json_text(res)
    # all three are made before any is written, and the json (the record) is written last
    table = None if trial else with_section(_table_text(benchmarks_md()), res)
    io.write_text_atomic(out / f"{args.name}-{args.profile}.md", md)
    if table is not None:
        io.write_text_atomic(benchmarks_md(), table)
    io.write_text_atomic(out / f"{args.name}-{args.profile}.json", text)
    print(md)
    if trial:
        why = f"partial run ({res['partial']}), not recorded; " if res.get("partial") else ""
        print(f"{why}results in {out} (BENCHMARKS.md unchanged)")
    else:
        print(f"recorded in {benchmarks_md()}")
    return 0
