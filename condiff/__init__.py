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

try:
    __version__ = version("condiff")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
