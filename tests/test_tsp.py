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
    # a row that visits a city twice (or one out of range) is no tour: refused, not drawn
    c = np.random.default_rng(0).random((2, 4, 2))
    for bad in ([[0, 1, 2, 3], [0, 1, 1, 3]], [[0, 1, 2, 3], [0, 1, 2, 4]]):
        with pytest.raises(ValueError, match=r"not a tour of 4 cities .*\[0, 1, (1, 3|2, 4)\]"):
            tsp.render_tours(c, np.array(bad), tsp.TourStyle())
        with pytest.raises(ValueError, match="not a tour of 4 cities"):
            tsp.tours_to_adjacency(np.array(bad), 4)
    with pytest.raises(ValueError, match=r"tours must have shape \(2, 4\), got \(4,\)"):
        tsp.render_tours(c, np.arange(4), tsp.TourStyle())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_cities_that_are_not_finite_are_refused(bad):
    """Held-Karp returned [0, 1, 2, 1] for 8 cities with a NaN among them; 2-opt returned None."""
    c = np.random.default_rng(0).random((8, 2))
    c[2, 0] = bad
    for solve in (tsp.HeldKarp().solve, tsp.MultiStart2Opt().solve, tsp.distance_matrix,
                  lambda c: tsp.tour_length(c, range(8))):
        with pytest.raises(ValueError, match="city coordinates must be finite, got NaN or inf at city 2"):
            solve(c)
    den = GaussianDenoiser(Schedule.linear(100), mean=-0.8, std=0.3)
    for run in (lambda: tsp.solve_with_prior(den, c[None], tsp.TourStyle(16), steps=2),
                lambda: tsp.render_tours(c[None], np.arange(8)[None], tsp.TourStyle(16))):
        with pytest.raises(ValueError, match="city coordinates must be finite, got NaN or inf"):
            run()


@pytest.mark.parametrize("kw", [{"line_width": float("nan")}, {"city_radius": float("inf")}, {"size": 16.5},
                                {"edge_value": float("nan")}, {"margin": float("nan")}])
def test_tour_style_refuses_widths_and_values_that_are_not_finite(kw):
    with pytest.raises(ValueError, match="TourStyle needs an integer size >= 8, positive widths and finite values"):
        tsp.TourStyle(**{"size": 16, **kw})


def test_a_prior_of_another_picture_size_is_warned_of_by_the_engine():
    """A 16 px prior ran on 32 px tour pictures without a word (the command line checked; the library not). A
    warning, not a refusal: a net a Trainer trained records its size, and a prior may be run at another on purpose."""
    from condiff.denoiser import NetDenoiser
    from condiff.nets import build_net

    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1], "num_res": 1, "groups": 4})
    den = NetDenoiser(net, Schedule.linear(100), sample_shape=(1, 16, 16))
    c = instances(1, 5)
    with pytest.warns(UserWarning, match=r"the prior was trained on samples of shape \(1, 16, 16\), but the "
                                         r"rendered samples have shape \(1, 32, 32\)"):
        tsp.solve_with_prior(den, c, tsp.TourStyle(32), steps=2)
    assert tsp.solve_with_prior(den, c, tsp.TourStyle(16), steps=2).tours.shape == (1, 5)
    assert den.conditioned(None).sample_shape == (1, 16, 16)  # kept by a conditioned copy


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
    # a low latent favours an edge (A = softmax(-tau L)): L = 0 on a tour's edges and 1 elsewhere, tau = 50, picks it
    tours = np.stack([np.random.default_rng(k).permutation(6) for k in range(2)])
    one_hot = tsp.tours_to_adjacency(tours, 6)
    sharp = tsp.AdjacencyRenderer(c, tsp.TourStyle(16), tau=50)
    torch.testing.assert_close(sharp.adjacency(1 - one_hot), one_hot, atol=1e-6, rtol=0)


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
        assert tsp.tour_length(x, t) == length  # measured on the cities as given (float32 ones put a tour
        assert length >= brute_force(x) - 1e-12  # up to 1e-8 below the optimum: negative gaps)
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


# --- pinned details (mutation review) ------------------------------------------------------------------


def test_canonical_starts_at_zero_and_heads_to_the_smaller_neighbour():
    assert tsp.canonical([0, 3, 2, 1]) == (0, 1, 2, 3)
    assert tsp.canonical([2, 0, 3, 1]) == (0, 2, 1, 3)  # rolled to (0, 3, 1, 2), then reversed
    assert tsp.canonical([1, 2, 0, 4, 3]) == (0, 2, 1, 3, 4)  # already heads to 2 < 4: kept


def test_nearest_neighbour_measures_from_the_current_city():
    # from 0.5: 0.6 is nearest; from 0.6 the city at 1.0 (0.4 away) beats 0.05 (0.55 away), though from
    # the start city 0.05 (0.45 away) would beat 1.0 (0.5 away)
    x = np.array([[0.5, 0], [0.6, 0], [1.0, 0], [0.05, 0]])
    assert tsp.nearest_neighbour(x, 0).tolist() == [0, 1, 2, 3]


def test_two_opt_takes_improvements_far_below_a_thousandth():
    """A 1 x 0.001 rectangle toured along its diagonals: uncrossing saves only about 1e-6."""
    r = np.array([[0, 0], [1, 1e-3], [1, 0], [0, 1e-3]])
    crossed = [0, 1, 2, 3]
    assert tsp.tour_length(r, crossed) - 2.002 == pytest.approx(2 * (math.sqrt(1 + 1e-6) - 1), rel=1e-6)
    t = tsp.two_opt(r, crossed)
    assert tsp.canonical(t) == (0, 2, 1, 3)
    assert tsp.tour_length(r, t) == pytest.approx(2.002, abs=1e-12)


def test_greedy_edges_ranks_by_score_per_length():
    """Scores equal to the lengths make ``score / length`` constant, so the ties (shorter first) decide:
    the classic greedy-edge tour. (Ranking by the score alone would take the longest edges first.)"""
    for c in instances(4, 9, seed=10):
        D = tsp.distance_matrix(c)
        t = tsp.greedy_edges(c, scores=D)
        assert tsp.canonical(t) == tsp.canonical(tsp.greedy_edges(c))
        assert tsp.canonical(t) != tsp.canonical(tsp.greedy_edges(c, scores=D**2))  # longest first differs
    # cities on a line at 0, 0.1, 0.5, 0.9; per length, (0, 1) 1.0 > (0, 2) 0.6 > (0, 3) 0.28, so city 0 is
    # full before (0, 3) comes, and (2, 3) joins the fragments; by score alone (0, 2) 0.3 > (0, 3) 0.25 would
    # fill city 0 first and leave (0, 1) out
    c = np.array([[0.0, 0], [0.1, 0], [0.5, 0], [0.9, 0]])
    s = np.zeros((4, 4))
    s[0, 1], s[0, 2], s[3, 0] = 0.1, 0.3, 0.25  # symmetrised: the lower triangle counts too
    edges = {tuple(e) for e in tsp.tour_edges(tsp.greedy_edges(c, s)).tolist()}
    assert edges == {(0, 1), (0, 2), (2, 3), (1, 3)}


def test_tour_style_maps_the_unit_square_inside_the_margin():
    s = tsp.TourStyle(32, city_radius=1.0)  # margin = radius + 1 = 2 px
    px = s.to_pixels(torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 0.25]]))
    assert torch.equal(px, torch.tensor([[2.0, 2.0], [16.0, 16.0], [30.0, 9.0]]))
    s = tsp.TourStyle(20, margin=3.0)
    assert torch.equal(s.to_pixels(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([3.0, 10.0, 17.0]))


def test_segment_coverage_closed_form():
    """Coverage ``clamp(width/2 + 1/2 - dist, 0, 1)`` with the distance to the segment, not to its line."""
    a, b = torch.tensor([4.0, 4.0]), torch.tensor([8.0, 4.0])
    p = torch.tensor([[6.0, 4.0], [6.0, 4.75], [6.0, 5.0], [8.75, 4.0], [9.0, 4.0], [12.0, 4.0], [0.0, 4.0],
                      [8.3, 4.4]])
    d = torch.tensor([0.0, 0.75, 1.0, 0.75, 1.0, 4.0, 4.0, 0.5])
    for width in (1.0, 2.0):
        expect = (width / 2 + 0.5 - d).clamp(0, 1)
        assert torch.allclose(tsp._segment_coverage(p, a, b, width), expect, atol=1e-6), width
    assert torch.allclose(tsp._segment_coverage(p[:3], a, b, 1.0), torch.tensor([1.0, 0.25, 0.0]))
    # rendered: the pixels on the extension of an edge beyond its end cities are background
    c = np.array([[[0.3, 0.5], [0.7, 0.5], [0.5, 0.9]]])
    style = tsp.TourStyle(32, city_radius=1.0)
    pic = tsp.render_tours(c, np.array([[0, 1, 2]]), style)[0, 0]
    row = int(style.to_pixels(torch.tensor(0.5)))  # the pixel row of the edge 0 -> 1 (centres at 16.5)
    assert float(pic[row, 3]) == -1.0 and float(pic[row, 28]) == -1.0
    # on the edge, half a pixel from it: coverage 1/2 of the edge value 0.5, i.e. 0.25 -> -0.5 in [-1, 1]
    assert float(pic[row, 16]) == -0.5


def test_tours_to_adjacency_points_from_each_city_to_the_next():
    A = tsp.tours_to_adjacency(np.array([[0, 1, 2, 3], [2, 0, 3, 1]]), 4)
    first = torch.zeros(4, 4)
    first[[0, 1, 2, 3], [1, 2, 3, 0]] = 1
    second = torch.zeros(4, 4)
    second[[2, 0, 3, 1], [0, 3, 1, 2]] = 1
    assert torch.equal(A, torch.stack([first, second]))


def test_optimality_gap_is_relative_to_the_optimum():
    assert np.allclose(tsp.optimality_gap([1.1, 1.5, 2.0], [1.0, 1.0, 1.6]), [0.1, 0.5, 0.25], atol=1e-12)
    # the optimum found, its length summed in another order (pnp tsp reported gaps of -2.2e-16)
    lengths = [0.1 + 0.2 + 0.3, 0.3 + 0.2 + 0.1]
    assert lengths[0] != lengths[1] and tsp.optimality_gap(lengths, lengths[::-1]).tolist() == [0.0, 0.0]


def test_solve_with_prior_keeps_the_shortest_chain(monkeypatch):
    square = np.array([[0, 0], [1, 1], [1, 0], [0, 1.0]])
    crossed, ring = np.array([0, 1, 2, 3]), np.array([0, 2, 1, 3])  # lengths 2 + 2 sqrt(2) and 4
    per_chain = iter([crossed, ring, ring, crossed])  # instance 0: the second chain wins; instance 1: the first
    monkeypatch.setattr(tsp, "decode", lambda coords, scores: next(per_chain))
    den = GaussianDenoiser(Schedule.linear(100), mean=-0.8, std=0.3)
    res = tsp.solve_with_prior(den, np.stack([square, square]), tsp.TourStyle(16), chains=2, steps=1,
                               generator=torch.Generator().manual_seed(0))
    assert res.tours.tolist() == [ring.tolist(), ring.tolist()]
    assert res.lengths.tolist() == pytest.approx([4.0, 4.0])
