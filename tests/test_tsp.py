"""TSP pieces: exact and heuristic solvers, local search, fragment merging, rendering, the tours data set."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from condiff.data import load_dataset
from condiff.denoiser import GaussianDenoiser
from condiff.pnp import tsp
from condiff.schedule import Schedule


def instances(count, n, seed=0):
    return tsp.random_instances(count, n, torch.Generator().manual_seed(seed)).numpy()


def brute_force(c):
    n = len(c)
    best = min(itertools.permutations(range(1, n)), key=lambda p: tsp.tour_length(c, [0, *p]))
    return tsp.tour_length(c, [0, *best])


def is_two_opt_optimal(c, t):
    D = tsp.distance_matrix(c)
    n = len(t)
    for i in range(n):
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue
            a, b, x, y = t[i], t[i + 1], t[j], t[(j + 1) % n]
            if D[a, x] + D[b, y] < D[a, b] + D[x, y] - 1e-9:
                return False
    return True


# --- solvers -------------------------------------------------------------------------------------------


def test_held_karp_matches_brute_force():
    for c in instances(4, 8, seed=1):
        t = tsp.HeldKarp().solve(c)
        assert tsp.tour_length(c, t) == pytest.approx(brute_force(c), abs=1e-12)


def test_held_karp_square_and_size_limit():
    square = np.array([[0, 0], [1, 1], [1, 0], [0, 1.0]])
    assert tsp.tour_length(square, tsp.HeldKarp().solve(square)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="max_n"):
        tsp.HeldKarp(max_n=5).solve(instances(1, 6)[0])


@pytest.mark.skipif(not tsp.lkh_available(), reason="elkai (LKH) is not installed")
def test_lkh_is_optimal_on_small_instances():
    for c in instances(3, 11, seed=2):
        exact = tsp.tour_length(c, tsp.HeldKarp().solve(c))
        assert tsp.tour_length(c, tsp.LKH(runs=3).solve(c)) == pytest.approx(exact, rel=1e-6)


def test_default_solver_without_lkh(monkeypatch):
    monkeypatch.setattr(tsp, "lkh_available", lambda: False)
    assert isinstance(tsp.default_solver(12), tsp.HeldKarp)
    with pytest.warns(UserWarning, match="heuristic"):
        assert isinstance(tsp.default_solver(13), tsp.MultiStart2Opt)


def test_multistart_heuristic_is_close_to_exact():
    for c in instances(3, 10, seed=3):
        exact = tsp.tour_length(c, tsp.HeldKarp().solve(c))
        assert exact - 1e-12 <= tsp.tour_length(c, tsp.MultiStart2Opt().solve(c)) <= exact * 1.05


# --- local search and construction -----------------------------------------------------------------


def test_two_opt_removes_the_crossing_of_a_square():
    square = np.array([[0, 0], [1, 1], [1, 0], [0, 1.0]])
    crossed = [0, 1, 2, 3]  # the diagonals cross: length 2 + 2 sqrt(2)
    assert tsp.tour_length(square, crossed) == pytest.approx(2 + 2 * math.sqrt(2))
    assert tsp.tour_length(square, tsp.two_opt(square, crossed)) == pytest.approx(4.0)


def test_two_opt_reaches_a_local_optimum_and_never_lengthens():
    for k, c in enumerate(instances(5, 15, seed=4)):
        start = np.random.default_rng(k).permutation(15)
        t = tsp.two_opt(c, start)
        assert sorted(t.tolist()) == list(range(15))
        assert tsp.tour_length(c, t) <= tsp.tour_length(c, start) + 1e-12
        assert is_two_opt_optimal(c, t)


def test_two_opt_on_three_cities_returns_the_only_cycle():
    c = np.array([[0.0, 0], [1, 0], [0, 1]])
    assert tsp.two_opt(c, [2, 0, 1]).tolist() == [2, 0, 1]


def test_nearest_neighbour_on_a_line():
    x = np.array([[0.0, 0], [0.3, 0], [0.1, 0], [0.9, 0], [0.5, 0]])
    assert tsp.nearest_neighbour(x, 0).tolist() == [0, 2, 1, 4, 3]


def test_greedy_edges_recovers_a_tour_given_as_scores():
    c = instances(1, 12, seed=5)[0]
    perm = np.random.default_rng(0).permutation(12)  # any tour, not just the optimum
    scores = tsp.tours_to_adjacency(perm[None], 12)[0].numpy()
    assert tsp.canonical(tsp.greedy_edges(c, scores)) == tsp.canonical(perm)


def test_greedy_edges_distance_only_is_a_valid_tour_with_shortest_edge():
    for c in instances(4, 9, seed=6):
        t = tsp.greedy_edges(c)
        D = tsp.distance_matrix(c) + np.eye(9) * 9
        i, j = np.unravel_index(D.argmin(), D.shape)
        assert tuple(sorted((i, j))) in {tuple(e) for e in tsp.tour_edges(t).tolist()}


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match="not a tour"):
        tsp.tour_length(instances(1, 5)[0], [0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        tsp.greedy_edges(instances(1, 5)[0], np.zeros((4, 4)))
    with pytest.raises(ValueError, match="unit square"):
        tsp.render_tours(np.full((1, 4, 2), 2.0), np.arange(4)[None], tsp.TourStyle())
    with pytest.raises(ValueError, match="positive"):
        tsp.optimality_gap(np.ones(2), np.zeros(2))


# --- rendering ---------------------------------------------------------------------------------------


def test_rendered_adjacency_of_a_tour_equals_the_rendered_tour():
    c = instances(3, 9, seed=7)
    tours = np.stack([np.random.default_rng(k).permutation(9) for k in range(3)])
    style = tsp.TourStyle(24, line_width=1.0, city_radius=2.0)
    pics = tsp.render_tours(c, tours, style)
    r = tsp.AdjacencyRenderer(c, style)
    assert torch.allclose(r.render_adjacency(tsp.tours_to_adjacency(tours, 9)), pics, atol=1e-5)
    assert pics.shape == (3, 1, 24, 24)
    assert float(pics.min()) == -1.0  # background
    # the pixel holding a city is within sqrt(2)/2 < radius - 1/2 of it, so it is forced to 1
    px = style.to_pixels(torch.as_tensor(c)).floor().long()
    assert torch.allclose(pics[0, 0, px[0, :, 1], px[0, :, 0]], torch.ones(9))


def test_adjacency_latent_is_row_stochastic_and_differentiable():
    c = instances(2, 6, seed=8)
    r = tsp.AdjacencyRenderer(c, tsp.TourStyle(16))
    L = r.init(torch.Generator().manual_seed(0)).requires_grad_(True)
    A = r.adjacency(L)
    assert torch.allclose(A.sum(-1), torch.ones(2, 6), atol=1e-6)
    assert float(A.detach().diagonal(dim1=1, dim2=2).abs().max()) == 0.0
    r(L).sum().backward()
    assert L.grad is not None and float(L.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="latent must have shape"):
        r.adjacency(torch.zeros(2, 5, 5))


def test_tour_style_for_size_follows_the_paper():
    s = tsp.TourStyle.for_size(64)
    assert (s.line_width, s.city_radius) == (2.0, 2.0)
    assert tsp.TourStyle.for_size(32).line_width == 1.0


# --- data set and pipeline --------------------------------------------------------------------------


def test_tours_dataset_is_deterministic_and_optimal(monkeypatch):
    monkeypatch.setattr(tsp, "lkh_available", lambda: False)  # exact Held-Karp for n <= 12
    d = load_dataset("tours", "test", n=6, cities=[7, 8], size=16)
    again = load_dataset("tours", "test", n=6, cities=[7, 8], size=16)
    assert d.x.shape == (6, 1, 16, 16) and torch.equal(d.x, again.x)
    assert d.meta["solver"] == ["held-karp"]
    for c, t, length in zip(d.meta["coords"], d.meta["tours"], d.meta["lengths"]):
        assert length == pytest.approx(brute_force(c), abs=1e-12)
        assert tsp.tour_length(c, t) == pytest.approx(length)
    train = load_dataset("tours", "train", n=6, cities=[7, 8], size=16)
    assert not torch.equal(train.x, d.x)
    with pytest.raises(ValueError, match="split"):
        load_dataset("tours", "all", n=4, cities=7)


def test_solve_with_prior_returns_valid_tours_no_shorter_than_optimal():
    c = instances(2, 7, seed=9)
    den = GaussianDenoiser(Schedule.linear(100), mean=-0.8, std=0.3)
    res = tsp.solve_with_prior(den, c, tsp.TourStyle(16), chains=2, steps=5,
                               generator=torch.Generator().manual_seed(0))
    assert res.tours.shape == (2, 7) and res.scores.shape == (2, 7, 7) and res.pictures.shape == (2, 1, 16, 16)
    for x, t, length in zip(c, res.tours, res.lengths):
        assert tsp.tour_length(x, t) == pytest.approx(length)
        assert length >= brute_force(x) - 1e-12
        assert is_two_opt_optimal(x, t)
    gaps = tsp.optimality_gap(res.lengths, np.array([brute_force(x) for x in c]))
    assert (gaps >= -1e-12).all()


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5, 6], [0, 3, 1, 5, 2, 6, 4]])
def test_the_prior_picks_the_edges_of_the_tour_it_was_centred_on(order):
    """A Gaussian prior centred on the picture of one tour (optimal or not, crossing or not): the
    seven highest adjacency scores are exactly that tour's edges, so the scores come from the prior."""
    c, style = instances(1, 7, seed=9), tsp.TourStyle(16)
    den = GaussianDenoiser(Schedule.linear(100), mean=tsp.render_tours(c, np.array([order]), style)[0], std=0.1)
    S = tsp.solve_with_prior(den, c, style, steps=30, generator=torch.Generator().manual_seed(0)).scores[0]
    i, j = torch.triu_indices(7, 7, 1)
    best = S[i, j].argsort(descending=True)[:7]
    top = {(int(a), int(b)) for a, b in zip(i[best], j[best])}
    assert top == {tuple(sorted((order[k], order[(k + 1) % 7]))) for k in range(7)}


def test_no_warning_when_lkh_is_used():
    if not tsp.lkh_available():
        pytest.skip("elkai (LKH) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tsp.default_solver(30).name == "lkh"
