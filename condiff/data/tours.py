"""Pictures of optimal TSP tours, for training a plug-and-play TSP prior (Graikos et al., NeurIPS 2022).

Instances are uniform cities in the unit square; their reference tours come from
:func:`condiff.pnp.tsp.default_solver` (LKH through ``elkai`` when installed, else exact Held-Karp for
``N <= 12``, else a multi-start 2-opt heuristic, with a warning). Solved instances are cached under
``io.cache_dir()/tours`` so that a training run and a benchmark share them; pictures are rendered on load.

``load_tours(split, n, cities, size, seed)`` returns ``x`` ``(n, 1, size, size)`` in [-1, 1] with
``meta["coords"]`` (one ``(N, 2)`` array per picture), ``meta["tours"]`` and ``meta["lengths"]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from condiff import io
from condiff.data import ArrayData, DataError, check_split, generator, register_dataset

SPLIT_SEEDS = {"train": "train", "test": "test"}


def _cities(cities: int | Sequence[int]) -> list[int]:
    sizes = [int(cities)] if isinstance(cities, int | np.integer) else [int(c) for c in cities]
    if not sizes or min(sizes) < 3:
        raise DataError(f"tours: cities must be an integer >= 3 or a list of them, got {cities!r}")
    return sizes


def solved_instances(split: str, n: int, n_cities: int, seed: int = 0,
                     cache: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """``n`` instances of ``n_cities`` cities with reference tours: coords ``(n, N, 2)``, tours ``(n, N)``
    and the solver's name. Deterministic in ``(split, n_cities, seed)``; a larger ``n`` extends a
    smaller one (instance ``k`` is the same), so caches of different sizes agree."""
    from condiff.pnp.tsp import default_solver, random_instances, solve_all

    check_split(split, tuple(SPLIT_SEEDS), source="tours")
    solver = default_solver(n_cities)
    key = hashlib.sha256(f"{split}:{n}:{n_cities}:{seed}:{solver.name}".encode()).hexdigest()[:16]
    path = io.cache_dir() / "tours" / f"{split}-n{n_cities}-{n}-{solver.name}-{key}.npz"
    if cache and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return f["coords"], f["tours"], solver.name
    # one generator per instance: instance k does not depend on how many are drawn
    coords = torch.stack([random_instances(1, n_cities, generator(seed, "tours", split, n_cities, k))[0]
                          for k in range(n)]).numpy()
    tours = solve_all(coords, solver)
    if cache:
        io.write_file_atomic(path, lambda f: np.savez(f, coords=coords, tours=tours), binary=True)
    return coords, tours, solver.name


def load_tours(split: str = "train", n: int | None = None, cities: int | Sequence[int] = 20, size: int = 32,
               seed: int = 0, line_width: float | None = None, city_radius: float | None = None) -> ArrayData:
    """Rendered optimal tours ``(n, 1, size, size)``; ``cities`` may list several sizes (equal shares).

    Defaults: ``n`` = 8000 for train, 256 for test; the drawing style is
    :meth:`condiff.pnp.tsp.TourStyle.for_size` unless ``line_width`` / ``city_radius`` are given.
    ``split="all"`` is refused: the two splits are independent draws, not a partition.
    """
    from condiff.pnp.tsp import TourStyle, render_tours, tour_length

    check_split(split, tuple(SPLIT_SEEDS), source="tours")
    sizes = _cities(cities)
    n = int(n if n is not None else (8000 if split == "train" else 256))
    if n < len(sizes):
        raise DataError(f"tours: n={n} is smaller than the number of city counts {sizes}")
    base = TourStyle.for_size(int(size))
    style = TourStyle(int(size), line_width if line_width is not None else base.line_width,
                      city_radius if city_radius is not None else base.city_radius)
    xs, coords, tours, solvers = [], [], [], set()
    for k, nc in enumerate(sizes):
        m = n // len(sizes) + (k < n % len(sizes))
        c, t, name = solved_instances(split, m, nc, seed)
        xs.append(render_tours(torch.from_numpy(c), t, style))
        coords += list(c)
        tours += list(t)
        solvers.add(name)
    meta = {"split": split, "cities": sizes, "size": int(size), "seed": seed, "style": style.config(),
            "solver": sorted(solvers), "coords": coords, "tours": tours,
            "lengths": [tour_length(c, t) for c, t in zip(coords, tours)],
            "per_sample": ("coords", "tours", "lengths")}
    return ArrayData(torch.cat(xs), None, "tours", meta)


register_dataset("tours", load_tours)
