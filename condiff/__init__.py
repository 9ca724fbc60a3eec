"""condiff: diffusion models that satisfy constraints.

- ``condiff.sample``, ``condiff.train``, ``condiff.models``, ``condiff.schedule``: the core engine
  (samplers, trainer, checkpoints, schedules); ``condiff.data``: bundled and user data sets.
- ``condiff.guidance``: DPS, FreeDoM, universal guidance, each with DSG; ``condiff.operators``.
- ``condiff.mirror`` and ``condiff.constraints``: neural approximate mirror maps (NAMM).
- ``condiff.dual``: dual training under distributional constraints.
- ``condiff.pnp``: plug-and-play priors (conditional digits, segmentation, TSP).

The command line is ``condiff`` (``condiff --help``); docs/core-api.md maps the API.
"""

from importlib.metadata import PackageNotFoundError, version


def _source_version() -> str:
    """The version in pyproject.toml beside the package: a source tree on PYTHONPATH, never installed."""
    import re
    from pathlib import Path

    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    except OSError:
        return "0+unknown"
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return m.group(1) if m else "0+unknown"


try:
    __version__ = version("condiff")
except PackageNotFoundError:
    __version__ = _source_version()
