"""The library examples of the README and docs/*.md run as written, shrunk: each page's sizes and step
counts are swapped for tiny ones (every swap must still find its text, so an edited example fails here
until this table follows it), and its trained models are a random one."""

import math
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = '"runs/demo"'  # replaced by the tiny model's directory

SHRINK = {
    "docs/guidance.md": [("steps=50", "steps=3")],
    "docs/pnp.md": [("steps=1000", "steps=5"), (", 400,", ", 40,")],
    "docs/namm.md": [("size=32", "size=16"), ('"filters": 32', '"filters": 4'),
                ('"base": 32, "blocks"', '"base": 8, "blocks"'), ('"base": 32}', '"base": 8}'),
                ('"steps": 3000', '"steps": 3'), ('run_dir="runs/my-namm"', "run_dir=None"),
                ("steps=10000", "steps=20"), ("256, d.shape, steps=100", "4, d.shape, steps=5"),
                ('"steps": 1000', '"steps": 3')],
    "docs/dual.md": [('"runs/fair-baseline"', RUN), ("steps=1500", "steps=3"), ("base=32", "base=8"),
                ("start=300", "start=0"), ("every=25", "every=1"), ("timesteps=16", "timesteps=2"),
                ('run_dir="runs/fair"', "run_dir=None")],
    "README.md": [],
}


def run_examples(name: str, model: Path) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), re.S)
    assert blocks, f"{name} has no python example"
    src = "\n".join(blocks)
    for old, new in SHRINK[name]:
        assert old in src, f"{name}: the example no longer holds {old!r}; update SHRINK"
        src = src.replace(old, new)
    scope: dict = {}
    exec(compile(src.replace(RUN, repr(str(model))), name, "exec"), scope)
    return scope


def test_the_guidance_example_restores_the_measured_shape(tiny_run):
    s = run_examples("docs/guidance.md", tiny_run)
    assert s["res"].x.shape == (16, 1, 8, 8) and bool(torch.isfinite(s["res"].x).all())
    assert s["res"].nfe == 3  # one denoiser call a step
    assert s["res_sq"].x.shape == (16, 1, 8, 8) and s["y_sq"].shape == (16, 1, 4, 4)  # an operator of one's own


def test_the_pnp_examples_run_their_chains_and_finish(tiny_run):
    s = run_examples("docs/pnp.md", tiny_run)
    assert s["res"].x.shape == s["x"].shape == (64, 1, 8, 8)
    assert bool(torch.isfinite(s["x"]).all()) and float(s["res"].x.abs().max()) <= 1.0  # projected


@pytest.mark.filterwarnings("ignore:the mirror samples reach")  # a 20-step mirror DM is far from trained
def test_the_namm_examples_fit_sample_and_finetune(tiny_run):
    s = run_examples("docs/namm.md", tiny_run)
    assert s["d"].shape == (1, 16, 16) and s["x"].shape == s["y"].shape == (4, 1, 16, 16)
    before, after = s["mirror"].state_dict(), s["mirror_ft"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("psi."))  # g is frozen
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("inverse."))
    assert bool(torch.isfinite(s["x"]).all())


def test_the_dual_example_trains_with_one_multiplier_per_constraint(tiny_run):
    s = run_examples("docs/dual.md", tiny_run)
    lam = s["objective"].lambdas
    assert set(lam) == {"class4", "class5", "class7"}
    assert all(math.isfinite(v) and v >= 0 for v in lam.values())
    assert bool(torch.isfinite(s["objective"].estimate).all())  # a dual update ran (it sets the estimates)


def test_the_readme_examples_sample_and_solve(tiny_run):
    s = run_examples("README.md", tiny_run)
    assert s["x"].shape == s["res"].x.shape == s["sym"].x.shape == (16, 1, 8, 8)
    assert bool(torch.isfinite(s["res"].x).all() and torch.isfinite(s["sym"].x).all())


def test_every_page_with_python_examples_is_run_here():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert {str(p.relative_to(ROOT)) for p in pages if "```python" in p.read_text()} == set(SHRINK)


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Each ``condiff COMMAND ...`` line of the README and the docs (continued lines joined, comments
    dropped, ``a && b`` split, ``[--opt x|y]`` taken as ``--opt x``), as (page, argv)."""
    from condiff.cli.main import COMMANDS

    start = re.compile(rf"^\s*condiff ({'|'.join(COMMANDS)})\b")
    out = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("examples/**/*.md"))]:
        lines = iter(page.read_text().splitlines())
        for line in lines:
            if not start.match(line):
                continue
            while line.rstrip().endswith("\\"):
                line = line.rstrip()[:-1] + " " + next(lines).strip()
            line = re.sub(r"\s+#.*$", "", line)
            line = re.sub(r"\[([^\]]*)\]", lambda m: re.sub(r"([^\s|]+)(\|[^\s|]+)+", r"\1", m.group(1)), line)
            out += [(str(page.relative_to(ROOT)), shlex.split(cmd)[1:]) for cmd in line.split("&&")]
    return out


def test_every_documented_command_line_parses():
    """Subcommands, options and their choices as the pages write them exist in the CLI (nothing runs)."""
    from condiff.cli.main import build_parser

    commands = _documented_commands()
    assert len(commands) >= 30
    parser = build_parser()
    for page, argv in commands:
        try:
            _, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{page}: condiff {' '.join(argv)} does not parse")
        assert not extra, f"{page}: condiff {' '.join(argv)}: unknown {extra}"
