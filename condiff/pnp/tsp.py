"""The travelling salesman problem as plug-and-play inference (Graikos et al., NeurIPS 2022).

Pieces, in pipeline order:

- instances: uniform cities in the unit square, :func:`random_instances` ``(B, N, 2)``;
- reference tours: :class:`LKH` (Helsgaun's LKH through the optional ``elkai`` package), the exact
  :class:`HeldKarp` dynamic program for ``N <= 13``, and a :class:`MultiStart2Opt` heuristic;
- pictures: :func:`render_tours` draws cities as discs (value 1) and edges as lines (value 0.5) and maps
  ``[0, 1]`` to ``[-1, 1]``; a diffusion model is trained on rendered optimal tours;
- inference latent: :class:`AdjacencyRenderer` turns a latent ``L`` ``(B, N, N)`` into
  ``A = rowsoftmax(-tau L - 1e5 I)`` and renders ``sum_ij A_ij E_ij`` from pre-rendered edge images
  ``E_ij``, so the denoising loss of the picture is differentiable in ``L``;
- decoding: :func:`greedy_edges` merges path fragments by score / length, then :func:`two_opt`.

Coordinates and tours are numpy arrays in the solver and decoder functions (they are sequential,
per-instance algorithms); rendering works on torch tensors in batches.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .. import checks

# --- instances and tours --------------------------------------------------------------------------


def random_instances(count: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` instances of ``n`` cities drawn uniformly in the unit square: ``(count, n, 2)`` float64."""
    if count < 1 or n < 3:
        raise ValueError(f"need count >= 1 instances of n >= 3 cities, got count={count}, n={n}")
    return torch.rand(count, n, 2, generator=generator, dtype=torch.float64)


def _coords(coords: np.ndarray | Tensor) -> np.ndarray:
    c = coords.detach().cpu().numpy() if isinstance(coords, Tensor) else np.asarray(coords)
    c = c.astype(np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] < 3:
        raise ValueError(f"expected city coordinates of shape (N >= 3, 2), got {c.shape}")
    if not np.isfinite(c).all():  # Held-Karp returned a "tour" of 4 entries for 8 cities with a NaN among them
        raise ValueError(f"city coordinates must be finite, got NaN or inf at city "
                         f"{int(np.flatnonzero(~np.isfinite(c).all(1))[0])}")
    return c


def distance_matrix(coords: np.ndarray | Tensor) -> np.ndarray:
    """``(N, 2) -> (N, N)`` Euclidean distances (float64)."""
    c = _coords(coords)
    return np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))


def check_tour(tour: np.ndarray | list[int], n: int) -> np.ndarray:
    """``tour`` as an int array after checking it visits each of the ``n`` cities exactly once."""
    t = np.asarray(tour)
    if t.shape != (n,) or not np.array_equal(np.sort(t), np.arange(n)):
        raise ValueError(f"not a tour of {n} cities (each city exactly once): {t.tolist()}")
    return t.astype(np.int64)


def tour_length(coords: np.ndarray | Tensor, tour: np.ndarray | list[int]) -> float:
    """Length of the closed tour visiting ``coords`` ``(N, 2)`` in the order ``tour`` ``(N,)``."""
    c = _coords(coords)
    t = check_tour(tour, len(c))
    return float(np.linalg.norm(c[t] - c[np.roll(t, -1)], axis=1).sum())


def canonical(tour: np.ndarray | list[int]) -> tuple[int, ...]:
    """A tour as a tuple starting at city 0 and heading to the smaller neighbour (compare tours)."""
    t = np.asarray(tour)
    t = np.roll(t, -int(np.flatnonzero(t == 0)[0]))
    if len(t) > 2 and t[-1] < t[1]:
        t = np.concatenate([t[:1], t[1:][::-1]])
    return tuple(int(v) for v in t)


def tour_edges(tour: np.ndarray) -> np.ndarray:
    """``(N,)`` tour -> ``(N, 2)`` undirected edges ``(min, max)``."""
    t = np.asarray(tour)
    e = np.stack([t, np.roll(t, -1)], 1)
    return np.sort(e, 1)


# --- solvers ----------------------------------------------------------------------------------------


class Solver(Protocol):
    """Anything that returns a (near-)optimal tour ``(N,)`` for coordinates ``(N, 2)``."""

    name: str

    def solve(self, coords: np.ndarray | Tensor) -> np.ndarray: ...


class HeldKarp:
    """The exact Held-Karp dynamic program, ``O(2^N N^2)``: for ``N <= max_n`` (tests, small instances).

    ``C[S, j]`` = the shortest path from city 0 through the set ``S`` of other cities ending at ``j``;
    each subset is filled from ``S - {j}`` in one vectorised step.
    """

    name = "held-karp"

    def __init__(self, max_n: int = 13) -> None:
        self.max_n = int(max_n)

    def solve(self, coords: np.ndarray | Tensor) -> np.ndarray:
        D = distance_matrix(coords)
        n = len(D)
        if n > self.max_n:
            raise ValueError(f"HeldKarp is exact but exponential: N={n} exceeds max_n={self.max_n}")
        m = n - 1  # cities 1..n-1 are bit 0..m-1
        d = D[1:, 1:]
        cost = np.full((1 << m, m), np.inf)
        parent = np.full((1 << m, m), -1, dtype=np.int64)
        bits = 1 << np.arange(m)
        cost[bits, np.arange(m)] = D[0, 1:]
        for mask in range(1, 1 << m):
            js = np.flatnonzero(mask & bits)
            if len(js) < 2:
                continue
            prev = cost[mask ^ bits[js]] + d[:, js].T  # (|js|, m): end at k, then k -> j
            k = prev.argmin(1)
            cost[mask, js] = prev[np.arange(len(js)), k]
            parent[mask, js] = k
        full = (1 << m) - 1
        j = int((cost[full] + D[1:, 0]).argmin())
        path, mask = [], full
        while j >= 0:
            path.append(j + 1)
            mask, j = mask ^ (1 << j), int(parent[mask, j])
        return check_tour([0, *path[::-1]], n)


def lkh_available() -> bool:
    """True when the optional ``elkai`` package (LKH) is installed."""
    return importlib.util.find_spec("elkai") is not None


class LKH:
    """Helsgaun's Lin-Kernighan heuristic (LKH-3) through ``elkai``; optimal in practice for ``N <= 100``.

    Distances are scaled by ``scale`` and rounded, since LKH works on integer weights.
    Note: LKH's licence allows non-commercial use only; it is an optional dependency (``condiff[pnp]``).
    """

    name = "lkh"

    def __init__(self, runs: int = 10, scale: float = 1e6) -> None:
        if not lkh_available():
            raise ImportError("the LKH solver needs the optional package elkai: pip install 'condiff[pnp]'")
        self.runs, self.scale = int(runs), float(scale)

    def solve(self, coords: np.ndarray | Tensor) -> np.ndarray:
        import elkai

        D = np.rint(distance_matrix(coords) * self.scale).astype(np.int64)
        tour = elkai.DistanceMatrix(D.tolist()).solve_tsp(runs=self.runs)[:-1]  # elkai repeats the start
        return check_tour(tour, len(D))


class MultiStart2Opt:
    """Nearest neighbour from ``starts`` cities, each improved by 2-opt; the shortest wins.
    A heuristic fallback when LKH is not installed (not guaranteed optimal)."""

    name = "multistart-2opt"

    def __init__(self, starts: int | None = None) -> None:
        self.starts = None if starts is None else checks.integer("MultiStart2Opt: starts", starts, 1)

    def solve(self, coords: np.ndarray | Tensor) -> np.ndarray:
        c = _coords(coords)
        D = distance_matrix(c)
        best, best_len = None, math.inf
        for s in range(len(c) if self.starts is None else min(self.starts, len(c))):
            t = two_opt(D, nearest_neighbour(D, s))
            length = _length(D, t)
            if length < best_len - 1e-12:
                best, best_len = t, length
        return best


def default_solver(n: int) -> Solver:
    """LKH when ``elkai`` is installed, else Held-Karp for ``n <= 12``, else the 2-opt heuristic (warned)."""
    if lkh_available():
        return LKH()
    if n <= 12:
        return HeldKarp()
    warnings.warn("elkai (LKH) is not installed: reference tours come from a multi-start 2-opt heuristic, "
                  "which is not always optimal; pip install 'condiff[pnp]'", stacklevel=2)
    return MultiStart2Opt()


def solve_all(coords: Tensor | np.ndarray, solver: Solver) -> np.ndarray:
    """Tours ``(B, N)`` for instances ``(B, N, 2)``."""
    return np.stack([solver.solve(c) for c in np.asarray(coords)])


# --- construction heuristics and local search ----------------------------------------------------------


def _dist(coords_or_D: np.ndarray | Tensor) -> np.ndarray:
    """Accept coordinates ``(N, 2)`` or a precomputed distance matrix ``(N, N)``."""
    a = coords_or_D.detach().cpu().numpy() if isinstance(coords_or_D, Tensor) else np.asarray(coords_or_D)
    if a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] >= 3:
        return a.astype(np.float64)
    return distance_matrix(a)


def _length(D: np.ndarray, t: np.ndarray) -> float:
    return float(D[t, np.roll(t, -1)].sum())


def nearest_neighbour(coords_or_D: np.ndarray | Tensor, start: int = 0) -> np.ndarray:
    """The nearest-neighbour tour from ``start``: always go to the closest unvisited city."""
    D = _dist(coords_or_D)
    n = len(D)
    seen = np.zeros(n, dtype=bool)
    tour = [int(start)]
    seen[start] = True
    for _ in range(n - 1):
        d = np.where(seen, np.inf, D[tour[-1]])
        tour.append(int(d.argmin()))
        seen[tour[-1]] = True
    return np.array(tour, dtype=np.int64)


def two_opt(coords_or_D: np.ndarray | Tensor, tour: np.ndarray | list[int],
            max_iter: int = 100_000) -> np.ndarray:
    """Best-improvement 2-opt until no move shortens the tour by more than 1e-12 (a local optimum).

    Move ``(i, j)`` with ``i < j`` replaces edges ``(t_i, t_i+1)`` and ``(t_j, t_j+1)`` by
    ``(t_i, t_j)`` and ``(t_i+1, t_j+1)``, i.e. reverses ``t[i+1 .. j]``.
    """
    D = _dist(coords_or_D)
    t = check_tour(tour, len(D)).copy()
    n = len(t)
    i_idx, j_idx = np.triu_indices(n, 2)
    keep = ~((i_idx == 0) & (j_idx == n - 1))  # these two edges share a city: not a move
    i_idx, j_idx = i_idx[keep], j_idx[keep]
    if len(i_idx) == 0:  # three cities or fewer: every tour is the same cycle
        return t
    for _ in range(max_iter):
        a, b = t, np.roll(t, -1)
        d_e = D[a, b]
        delta = D[a[i_idx], a[j_idx]] + D[b[i_idx], b[j_idx]] - d_e[i_idx] - d_e[j_idx]
        k = int(delta.argmin())
        if delta[k] >= -1e-12:
            break
        i, j = i_idx[k], j_idx[k]
        t[i + 1 : j + 1] = t[i + 1 : j + 1][::-1].copy()
    return t


def greedy_edges(coords_or_D: np.ndarray | Tensor, scores: np.ndarray | Tensor | None = None) -> np.ndarray:
    """Greedy fragment merging: take edges in decreasing ``score / length`` (ties: shorter first) and keep
    an edge when both ends still have degree < 2 and it joins two different fragments; the last
    fragment is then closed into a tour.

    ``scores`` ``(N, N)`` (symmetrised here) are e.g. ``A + A^T`` of the inferred adjacency; ``None``
    ranks by length alone, the classic greedy-edge heuristic.
    """
    D = _dist(coords_or_D)
    n = len(D)
    iu, ju = np.triu_indices(n, 1)
    length = np.maximum(D[iu, ju], 1e-12)
    if scores is None:
        key = 1.0 / length
    else:
        s = scores.detach().cpu().double().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
        s = s.astype(np.float64)
        if s.shape != (n, n):
            raise ValueError(f"scores must have shape ({n}, {n}), got {s.shape}")
        key = (s + s.T)[iu, ju] / length
    order = np.lexsort((length, -key))  # primary: key descending; ties: shorter first
    root = list(range(n))

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    deg = np.zeros(n, dtype=np.int64)
    nbrs: list[list[int]] = [[] for _ in range(n)]
    added = 0
    for k in order:
        i, j = int(iu[k]), int(ju[k])
        if deg[i] >= 2 or deg[j] >= 2:
            continue
        ri, rj = find(i), find(j)
        if ri == rj:  # would close a cycle early
            continue
        root[ri] = rj
        deg[i] += 1
        deg[j] += 1
        nbrs[i].append(j)
        nbrs[j].append(i)
        added += 1
        if added == n - 1:
            break
    ends = np.flatnonzero(deg < 2)  # the two ends of the Hamiltonian path
    a, b = int(ends[0]), int(ends[-1])
    nbrs[a].append(b)
    nbrs[b].append(a)
    tour, prev = [0], -1
    while len(tour) < n:
        cur = tour[-1]
        nxt = nbrs[cur][0] if nbrs[cur][0] != prev else nbrs[cur][1]
        prev = cur
        tour.append(nxt)
    return check_tour(tour, n)


# --- rendering --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TourStyle:
    """How tours are drawn: ``size`` pixels square, lines of ``line_width`` px and value ``edge_value``,
    city discs of radius ``city_radius`` px and value 1 (both anti-aliased), on a 0 background; the
    picture is then mapped from ``[0, 1]`` to ``[-1, 1]``. The unit square is inset by ``margin`` px
    (default ``city_radius + 1``) so discs are not cut by the border.

    The paper's 64 px style is ``TourStyle(64, line_width=2, city_radius=2)``.
    """

    size: int = 32
    line_width: float = 1.0
    city_radius: float = 1.0
    edge_value: float = 0.5
    margin: float | None = None

    def __post_init__(self) -> None:
        widths = (self.line_width, self.city_radius)  # (a NaN width passed a `<= 0` test)
        if not (checks.is_integer(self.size, 8) and all(checks.is_number(w) and w > 0 for w in widths)
                and checks.is_number(self.edge_value) and (self.margin is None or checks.is_number(self.margin))):
            raise ValueError(f"TourStyle needs an integer size >= 8, positive widths and finite values, got {self}")

    @classmethod
    def for_size(cls, size: int) -> TourStyle:
        """The paper's proportions (2 px at 64 px) scaled to ``size``, never below 1 px."""
        w = max(1.0, 2.0 * size / 64)
        return cls(int(size), line_width=w, city_radius=w)

    def config(self) -> dict:
        return {"size": self.size, "line_width": self.line_width, "city_radius": self.city_radius,
                "edge_value": self.edge_value, "margin": self.margin}

    def to_pixels(self, coords: Tensor) -> Tensor:
        """Unit-square coordinates ``(..., 2)`` to pixel coordinates (x = column, y = row)."""
        m = self.city_radius + 1.0 if self.margin is None else self.margin
        return m + coords * (self.size - 2 * m)

    def grid(self, device: torch.device | str = "cpu") -> Tensor:
        """Pixel centres ``(H*W, 2)`` as (x, y), row-major."""
        r = torch.arange(self.size, device=device, dtype=torch.float32) + 0.5
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        return torch.stack([xx.flatten(), yy.flatten()], 1)


def _segment_coverage(p: Tensor, a: Tensor, b: Tensor, width: float) -> Tensor:
    """Anti-aliased coverage of pixels ``p`` (P, 2) by segments ``a -> b`` (..., 2): ``(..., P)``.

    Coverage ``clamp(width/2 + 1/2 - dist, 0, 1)``: 1 inside the stroke, a one-pixel linear ramp outside.
    """
    ab = (b - a)[..., None, :]
    ap = p - a[..., None, :]
    s = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    d = (ap - s[..., None] * ab).norm(dim=-1)
    return (width / 2 + 0.5 - d).clamp(0, 1)


def _coords_tensor(coords: Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> Tensor:
    """Instances ``(B, N, 2)`` in the unit square, checked, as ``dtype`` (float64 where tours are measured:
    lengths of float32-rounded cities put a prior's tour up to 1e-8 below the optimal one's)."""
    c = torch.as_tensor(np.asarray(coords) if not isinstance(coords, Tensor) else coords)
    if c.dim() != 3 or c.shape[-1] != 2 or c.shape[1] < 3:
        raise ValueError(f"expected city coordinates of shape (B, N >= 3, 2), got {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):  # NaN passed the unit-square test, and failed later as a step size's
        raise ValueError("city coordinates must be finite, got NaN or inf")
    if bool(((c < 0) | (c > 1)).any()):
        raise ValueError("city coordinates must lie in the unit square [0, 1]^2")
    return c.to(dtype)


def city_coverage(coords: Tensor, style: TourStyle) -> Tensor:
    """``(B, N, 2) -> (B, H*W)``: how much of each pixel the city discs cover (max over cities)."""
    c = style.to_pixels(_coords_tensor(coords))
    d = (style.grid(c.device)[None, None] - c[:, :, None]).norm(dim=-1)  # (B, N, P)
    return (style.city_radius + 0.5 - d).clamp(0, 1).amax(1)


def pair_index(n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The ``M = N(N-1)/2`` city pairs ``i < j`` in row-major order: two ``(M,)`` long tensors."""
    iu = torch.triu_indices(n, n, 1, device=device)
    return iu[0], iu[1]


def edge_images(coords: Tensor, style: TourStyle, chunk: int = 16) -> Tensor:
    """Pre-rendered edges ``E`` ``(B, M, H*W)``: pixel values (``edge_value * coverage``) of the segment
    between each pair ``i < j`` (order of :func:`pair_index`). Built ``chunk`` instances at a time."""
    c = style.to_pixels(_coords_tensor(coords))
    i, j = pair_index(c.shape[1], c.device)
    p = style.grid(c.device)
    out = [style.edge_value * _segment_coverage(p, c[s : s + chunk, i], c[s : s + chunk, j], style.line_width)
           for s in range(0, c.shape[0], chunk)]
    return torch.cat(out)


def _compose(edges: Tensor, cities: Tensor, style: TourStyle) -> Tensor:
    """Edge values ``(B, H*W)`` and city coverage -> image ``(B, 1, H, W)`` in [-1, 1], cities forced to 1."""
    v = edges * (1 - cities) + cities
    return (2 * v - 1).view(-1, 1, style.size, style.size)


def _tours_tensor(tours: np.ndarray | Tensor, n: int, batch: int | None = None) -> Tensor:
    """``(B, N)`` tours as a long tensor, after checking the shape and that each row is a tour."""
    a = np.asarray(tours.detach().cpu() if isinstance(tours, Tensor) else tours)
    if a.ndim != 2 or a.shape[1] != n or (batch is not None and a.shape[0] != batch):
        want = f"({batch if batch is not None else 'B'}, {n})"
        raise ValueError(f"tours must have shape {want}, got {a.shape}")
    bad = ~(np.sort(a, axis=1) == np.arange(n)).all(axis=1)  # every row at once (a data set renders thousands)
    if bad.any():
        check_tour(a[int(bad.argmax())], n)  # the first that is no tour, named as check_tour names it
    return torch.as_tensor(a.astype(np.int64))


def render_tours(coords: Tensor | np.ndarray, tours: np.ndarray | Tensor, style: TourStyle) -> Tensor:
    """Pictures ``(B, 1, H, W)`` in [-1, 1] of tours ``(B, N)`` over cities ``(B, N, 2)``.

    The same sum of edge images that :class:`AdjacencyRenderer` uses, so a one-hot adjacency of a tour
    renders exactly this picture.
    """
    c = _coords_tensor(coords)
    B, n = c.shape[:2]
    t = _tours_tensor(tours, n, B)
    px = style.to_pixels(c)
    a = px.gather(1, t[..., None].expand(-1, -1, 2))
    b = px.gather(1, t.roll(-1, 1)[..., None].expand(-1, -1, 2))
    p = style.grid()
    cover = [_segment_coverage(p, a[s : s + 64], b[s : s + 64], style.line_width) for s in range(0, B, 64)]
    edges = style.edge_value * torch.cat([c_.sum(1) for c_ in cover])
    return _compose(edges, city_coverage(c, style), style)


def tours_to_adjacency(tours: np.ndarray | Tensor, n: int) -> Tensor:
    """``(B, N)`` tours -> ``(B, N, N)`` directed one-hot adjacency (``A[t_k, t_k+1] = 1``)."""
    t = _tours_tensor(tours, n)
    A = torch.zeros(t.shape[0], n, n)
    A.scatter_(2, t.roll(-1, 1).gather(1, t.argsort(1))[..., None], 1.0)
    return A


class AdjacencyRenderer:
    """The TSP inference latent: ``L`` ``(B, N, N)`` -> picture ``(B, 1, H, W)``.

    ``A = rowsoftmax(-tau * L - 1e5 I)`` (no self-loops; each city sends unit mass), and the picture is
    ``sum_ij A_ij E_ij`` with the pre-rendered edge images, cities forced to 1, mapped to [-1, 1].
    Since ``E_ij = E_ji`` the sum runs over pairs ``i < j`` with weights ``A_ij + A_ji``.

    ``coords`` ``(B, N, 2)``: one instance per chain (repeat an instance for several chains).
    """

    def __init__(self, coords: Tensor | np.ndarray, style: TourStyle, tau: float = 0.1,
                 device: torch.device | str = "cpu") -> None:
        c = _coords_tensor(coords).to(device)
        self.style, self.tau, self.n, self.batch = style, float(tau), c.shape[1], c.shape[0]
        self.edges = edge_images(c, style)  # (B, M, P)
        self.cities = city_coverage(c, style)  # (B, P)
        self.pairs = pair_index(self.n, c.device)
        self.eye = torch.eye(self.n, device=c.device)

    def init(self, generator: torch.Generator | None = None, std: float = 1.0) -> Tensor:
        """A random initial latent ``(B, N, N)``, standard normal times ``std``."""
        g_dev = generator.device if generator is not None else self.eye.device
        L = torch.randn(self.batch, self.n, self.n, generator=generator, device=g_dev) * std
        return L.to(self.eye.device)

    def adjacency(self, L: Tensor) -> Tensor:
        """``(B, N, N)`` row-stochastic ``A`` with a zero diagonal."""
        if L.shape != (self.batch, self.n, self.n):
            raise ValueError(f"latent must have shape {(self.batch, self.n, self.n)}, got {tuple(L.shape)}")
        return torch.softmax(-self.tau * L - 1e5 * self.eye, dim=-1)

    def render_adjacency(self, A: Tensor) -> Tensor:
        """Any ``(B, N, N)`` weights -> picture ``(B, 1, H, W)``."""
        i, j = self.pairs
        w = A[:, i, j] + A[:, j, i]  # (B, M)
        edges = torch.einsum("bm,bmp->bp", w, self.edges)
        return _compose(edges, self.cities, self.style)

    def __call__(self, L: Tensor) -> Tensor:
        return self.render_adjacency(self.adjacency(L))


# --- the pipeline's decoders ---------------------------------------------------------------------------


def decode(coords: Tensor | np.ndarray, scores: Tensor | np.ndarray | None) -> np.ndarray:
    """Greedy fragment merging on ``scores`` (``None``: lengths only), then 2-opt: a tour ``(N,)``."""
    D = distance_matrix(coords)
    return two_opt(D, greedy_edges(D, scores))


def optimality_gap(pred_lengths: np.ndarray, opt_lengths: np.ndarray) -> np.ndarray:
    """Per-instance gaps ``L_pred / L_opt - 1`` (the paper's aggregate is ``sum L_pred / sum L_opt - 1``); a gap
    within 1e-12 of zero, the rounding of one tour's length summed in two orders, is 0."""
    p, o = np.asarray(pred_lengths, float), np.asarray(opt_lengths, float)
    if p.shape != o.shape or bool((o <= 0).any()):
        raise ValueError("optimality_gap needs equal-shaped arrays with positive optimal lengths")
    gap = p / o - 1.0
    # the optimal tour itself, summed in another order, reads -2.2e-16 or +2.2e-16: shown as the 0 it is
    return np.where(np.abs(gap) < 1e-12, 0.0, gap)


# --- inference with a diffusion prior ---------------------------------------------------------------


@dataclass
class TSPResult:
    """Decoded tours ``(B, N)`` and their lengths ``(B,)``, the symmetrised scores ``A + A^T`` of the best
    chain per instance ``(B, N, N)``, its picture ``(B, 1, H, W)``, and wall-clock seconds spent in
    inference and in decoding."""

    tours: np.ndarray
    lengths: np.ndarray
    scores: Tensor
    pictures: Tensor
    infer_seconds: float
    decode_seconds: float


def solve_with_prior(denoiser, coords: Tensor | np.ndarray, style: TourStyle, *, chains: int = 1,
                     steps: int = 256, lr: float = 1.0, betas: tuple[float, float] = (0.0, 0.9),
                     schedule=None, tau: float = 0.1, through_net: bool = True,
                     generator: torch.Generator | None = None, batch_size: int = 64,
                     progress: bool = False) -> TSPResult:
    """The paper's pipeline for instances ``(B, N, 2)``: optimise the adjacency latent under the prior's
    denoising loss (Adam, ``lr = 1``, ``betas = (0, 0.9)``, ``S = 256``, :data:`PAPER_TSP` anneal), then
    :func:`decode` each chain's ``A + A^T``; with ``chains > 1`` the shortest decoded tour wins.

    ``denoiser``: any :class:`~condiff.denoiser.Denoiser` for ``(1, size, size)`` pictures drawn in ``style``.
    Chains are processed ``batch_size`` at a time (the edge images take ``N^2/2 * size^2`` floats each).
    """
    import time

    from .engine import infer
    from .schedules import PAPER_TSP

    c = _coords_tensor(coords, torch.float64)
    B, n = c.shape[:2]
    if chains < 1:
        raise ValueError(f"chains must be >= 1, got {chains}")
    device = next(denoiser.parameters(), torch.empty(0)).device
    reps = c.repeat_interleave(chains, 0)
    scores, pics, t_inf = [], [], 0.0
    for s in range(0, len(reps), batch_size):
        part = reps[s : s + batch_size]
        r = AdjacencyRenderer(part, style, tau, device)
        res = infer(denoiser, r.init(generator), render=r, schedule=schedule or PAPER_TSP, steps=steps, lr=lr,
                    betas=betas, through_net=through_net, generator=generator, progress=progress)
        A = r.adjacency(res.latent)
        scores.append((A + A.transpose(1, 2)).cpu())
        pics.append(res.x.cpu())
        t_inf += res.seconds
    S, P = torch.cat(scores), torch.cat(pics)
    t0 = time.perf_counter()
    tours, lengths, best = [], [], []
    for b in range(B):
        cand = [decode(c[b], S[b * chains + k]) for k in range(chains)]
        lens = [tour_length(c[b], t) for t in cand]
        k = int(np.argmin(lens))
        tours.append(cand[k])
        lengths.append(lens[k])
        best.append(b * chains + k)
    return TSPResult(np.stack(tours), np.array(lengths), S[best], P[best], t_inf, time.perf_counter() - t0)
