"""Constraint distances: zero on the set, positive off it, closed forms, finite gradients, registry."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from condiff.constraints import (
    CONSTRAINTS,
    Ball,
    Box,
    BurgersResidual,
    CountConstraint,
    CountingCNN,
    DivergenceFree,
    PeriodicTiling,
    Simplex,
    TotalBrightness,
    build_constraint,
    check_distance,
    safe_norm,
)
from condiff.constraints.count import _pgd, train_counter
from condiff.mirror.sample import batched_distance


def _grad(con, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(con(x).sum(), x)
    return g


# --- convex sets ---------------------------------------------------------------------------------


def test_box_zero_inside_positive_outside_with_closed_form():
    con = Box(-1, 1)
    inside = torch.rand(16, 1, 4, 4) * 2 - 1
    assert torch.equal(con(inside), torch.zeros(16))
    out = inside.clone()
    out[:, 0, 0, 0] = 1.5
    out[:, 0, 1, 1] = -3.0
    assert torch.allclose(con(out), torch.full((16,), math.hypot(0.5, 2.0)), atol=1e-6)


def test_ball_closed_form():
    con = Ball(radius=2.0, center=0.5)
    x = torch.randn(32, 3, 4)
    r = (x - 0.5).flatten(1).norm(dim=1)
    assert torch.allclose(con(x), (r - 2.0).clamp_min(0), atol=1e-5)
    inside = 0.5 + (x - 0.5) / r.view(-1, 1, 1) * 1.9
    assert torch.equal(con(inside), torch.zeros(32))


def test_simplex_projection_closed_forms():
    con = Simplex(total=1.0)
    n = 10
    p = torch.softmax(torch.randn(8, n), 1)  # on the simplex
    assert float(con(p).max()) < 1e-6
    e = torch.zeros(1, n)
    e[0, 0] = 2.0  # projects onto the vertex e_0: distance 1
    assert con(e).item() == pytest.approx(1.0, abs=1e-6)
    c = 0.3  # a uniform shift of the barycentre projects back to it: distance c sqrt(n)
    assert con(torch.full((1, n), 1 / n + c)).item() == pytest.approx(c * math.sqrt(n), abs=1e-5)
    # -1 everywhere projects onto the barycentre 1/n (a uniform shift): distance sqrt(n) (1 + 1/n)
    assert con(-torch.ones(1, n)).item() == pytest.approx(math.sqrt(n) * (1 + 1 / n), abs=1e-5)


@pytest.mark.parametrize("con", [Box(-1, 1), Ball(1.0), Simplex(1.0)], ids=["box", "ball", "simplex"])
def test_convex_distance_gradients_finite_and_unit_outside(con):
    torch.manual_seed(0)
    inside = {
        "box": torch.rand(8, 6) * 2 - 1,
        "ball": torch.randn(8, 6) * 0.05,
        "simplex": torch.softmax(torch.randn(8, 6), 1),
    }[con.family]
    g_in = _grad(con, inside)
    assert torch.isfinite(g_in).all() and float(con(inside).max()) < 1e-6
    if con.family != "simplex":  # the simplex has no interior: round-off leaves a unit gradient on it
        assert float(g_in.abs().max()) == 0.0
    outside = inside + 3.0 * torch.randn(8, 6).sign()
    d = con(outside)
    assert bool((d > 0).all())
    g_out = _grad(con, outside)
    # the gradient of a Euclidean distance to a convex set has unit norm off the set
    assert torch.allclose(g_out.norm(dim=1), torch.ones(8), atol=1e-4)
    # and on the boundary itself the gradient is still finite
    assert torch.isfinite(_grad(con, torch.ones(2, 6) if con.family == "box" else inside[:2])).all()


def test_convex_sets_reject_bad_parameters():
    with pytest.raises(ValueError, match="lo < hi"):
        Box(1, -1)
    with pytest.raises(ValueError, match="radius must be a number > 0"):
        Ball(0.0)
    with pytest.raises(ValueError, match="total must be a number > 0"):
        Simplex(-1.0)
    with pytest.raises(ValueError, match=r"box: lo and hi must be numbers \(inf allowed\), got lo='a'"):
        Box("a", 1)
    half_open = Box(0, math.inf)  # x >= 0: an infinite bound is a setting, not an error
    assert torch.equal(half_open(torch.tensor([[-3.0, 4.0], [1.0, 1e30]])), torch.tensor([3.0, 0.0]))


def test_half_precision_distances_do_not_overflow():
    """Squares summed in half precision overflowed to inf at a violation of 266 (64x64x3 pixels at 3.4)."""
    x = torch.full((1, 3, 64, 64), 3.4)
    exact = Box()(x)
    assert float(exact) == pytest.approx(2.4 * 64 * math.sqrt(3), rel=1e-5)
    assert float(Box()(x.half())) == pytest.approx(float(exact), rel=1e-3)


def test_distances_far_outside_do_not_overflow_float32():
    """Summed squares overflowed float32 from |x - P(x)| ~ 1e19: a finite violation read as inf."""
    x = torch.full((2, 300), 1e30)
    expect = 1e30 * math.sqrt(300)
    for con in (Box(), Ball(), Simplex()):
        assert torch.allclose(con(x).double(), torch.full((2,), expect, dtype=torch.float64), rtol=1e-5)
    # the norm's gradient is still v / ||v||, 0 at 0, and a broken sample stays broken
    v = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(safe_norm(v).sum(), v)
    torch.testing.assert_close(g, v.detach() / v.detach().norm(dim=1, keepdim=True))
    z = torch.zeros(2, 4, requires_grad=True)
    (g0,) = torch.autograd.grad(safe_norm(z).sum(), z)
    assert torch.equal(g0, torch.zeros(2, 4))
    assert torch.equal(safe_norm(torch.empty(2, 0)), torch.zeros(2))  # no features: distance 0
    out = safe_norm(torch.tensor([[math.inf, 1.0], [math.nan, 1.0], [3.0, 4.0]]))
    assert math.isinf(out[0]) and math.isnan(out[1]) and float(out[2]) == 5.0


# --- data constraints ------------------------------------------------------------------------------


def test_brightness_closed_form():
    con = TotalBrightness(flux=10.0)
    img = torch.full((3, 1, 8, 8), -1.0)
    img[:, 0, :2, :5] = 1.0  # 10 pixels at intensity 1
    assert torch.equal(con(img), torch.zeros(3))
    shifted = img + 0.1  # every pixel +0.05 in intensity: 64 * 0.05 = 3.2
    assert torch.allclose(con(shifted), torch.full((3,), 3.2), atol=1e-5)
    # data on another range: intensity (x - lo) / (hi - lo), so 4 pixels at 0.5 of [0, 1] hold 2, at 255 of
    # [0, 255] hold 4 (the default range hid a hard-coded (x + 1) / 2)
    assert float(TotalBrightness(flux=2.0, lo=0.0, hi=1.0)(torch.full((1, 1, 2, 2), 0.5))) == 0.0
    assert float(TotalBrightness(flux=4.0, lo=0.0, hi=255.0)(torch.full((1, 1, 2, 2), 255.0))) == 0.0
    assert float(TotalBrightness(flux=0.0, lo=-3.0, hi=5.0)(torch.full((1, 1, 2, 2), 1.0))) == 2.0


def test_burgers_constant_state_is_a_fixed_point_and_perturbations_are_caught():
    con = BurgersResidual(nu=0.05, length=5.0)
    x = torch.full((2, 1, 8, 16), 0.3)
    assert float(con(x).max()) < 1e-6
    x[:, :, 4, 3] += 0.5
    assert bool((con(x) > 1e-3).all())
    assert con.violation_map(x).shape == (2, 8, 16)


def test_burgers_distance_clips_what_enters_the_stepper_and_charges_the_excess():
    """A constant state is a fixed point of the stepper; within the clip its distance is 0, beyond it
    the rows step from the clipped state and the excess is charged twice: ``l = 2 (v - CLIP)``."""
    from condiff.constraints.burgers import CLIP

    con = BurgersResidual()
    assert float(con(torch.full((1, 1, 6, 16), CLIP - 0.5)).max()) < 1e-6
    x = torch.full((2, 1, 6, 16), 5.0, requires_grad=True)
    d = con(x)
    torch.testing.assert_close(d, torch.full((2,), 2 * (5.0 - CLIP)))
    d.sum().backward()
    assert bool((x.grad[:, :, :-1] > 0).all())  # descent brings the rows back towards the clip


@pytest.mark.parametrize("length", [10.0, 2.5, 1.25])
@pytest.mark.parametrize("n", [8, 16, 32, 64])
def test_burgers_distance_and_gradients_stay_finite_far_beyond_the_data(n, length):
    """The raw RK4 stepper overflows on rough rows of a few times the data's range (NaN for
    ``u = +-3`` alternating, at the data's grid); the clipped distance is finite and positive at any scale."""
    con = BurgersResidual(length=length * n / 16)  # grid spacing length / 16: coarse, the data's, fine
    g = torch.Generator().manual_seed(n)
    for scale in (3.0, 10.0, 1e3, 1e6):
        x = (torch.randn(16, 1, 4, n, generator=g) * scale).requires_grad_(True)
        d = con(x)
        d.sum().backward()
        assert bool(torch.isfinite(d).all() and (d > 0).all()) and bool(torch.isfinite(x.grad).all())
    assert bool(torch.isfinite(con.violation_map(x)).all())


def test_burgers_stepper_matches_linear_diffusion_decay():
    """u = eps sin(2 pi k x / L) with zero mean flow: the nonlinear term is O(eps^2), so each RK4 step
    multiplies the mode by the discrete heat factor exp(-nu k_eff^2 dt) (to RK4 accuracy)."""
    from condiff.constraints import burgers_step

    n, L, nu, dt, sub = 32, 10.0, 0.05, 0.025, 5
    dx = L / n
    x = torch.arange(n, dtype=torch.float64) * dx
    eps, k = 1e-6, 3
    u = eps * torch.sin(2 * math.pi * k * x / L)
    out = burgers_step(u, nu, dx, dt, sub)
    k_eff2 = 4 / dx**2 * math.sin(math.pi * k / n) ** 2
    assert torch.allclose(out, u * math.exp(-nu * k_eff2 * dt * sub), rtol=1e-6, atol=1e-15)


def test_divergence_closed_forms():
    n = 32
    c = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    Y, X = torch.meshgrid(c, c, indexing="ij")
    # from psi = sin 2x cos 3y: u = d psi / dy, v = -d psi / dx, divergence-free
    solenoidal = torch.stack(
        [-3 * torch.sin(2 * X) * torch.sin(3 * Y), -2 * torch.cos(2 * X) * torch.cos(3 * Y)]
    )
    con = DivergenceFree()
    assert con(solenoidal[None]).item() < 1e-12
    # u = cos(x), v = 0: div = -sin(x), mean |sin| over the grid
    grad_field = torch.stack([torch.cos(X), torch.zeros_like(X)])[None]
    assert con(grad_field).item() == pytest.approx(float(torch.sin(c).abs().mean()), abs=1e-10)
    with pytest.raises(ValueError, match="even number of channels"):
        con(torch.zeros(1, 3, 8, 8))
    # no half-precision FFT on the CPU: half fields are measured in float32
    half = con(grad_field.half())
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(con(grad_field)), rel=1e-2)


def test_periodic_closed_form():
    con = PeriodicTiling()
    tile = torch.randn(4, 1, 4, 4)
    x = tile.repeat(1, 1, 2, 2)
    assert float(con(x).max()) < 1e-6
    x[:, :, :4, :4] += 1.0  # one quadrant off by 1: deviations 3/4, 1/4, 1/4, 1/4
    assert torch.allclose(con(x), torch.full((4,), 1.5), atol=1e-5)
    assert torch.allclose(con.violation_map(x)[:, :4, :4], torch.full((4, 4, 4), 0.75), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 2"):
        con(torch.zeros(1, 1, 5, 4))


class _SumCounter(nn.Module):
    """A stand-in counter: total intensity (so count is linear and the closed form is known)."""

    def forward(self, x):
        return ((x + 1) / 2).flatten(1).sum(1)


def test_the_counter_trains_where_its_user_computes_and_a_gpu_counter_is_recorded(monkeypatch):
    """The counting CNN trained on the GPU whenever one was present, `--device cpu` or not, and a run recorded
    the same learned parts for either counter, so a run fitted on one machine was scored with the other's."""
    import condiff.constraints.count as count

    with pytest.raises(ValueError, match="load_counter: device mps is not supported"):  # checked before any work
        count.load_counter(3, 8, device="mps")
    asked = []
    monkeypatch.setattr(count, "load_counter", lambda *a, device=None, progress=True: asked.append(device)
                        or _SumCounter())
    cpu = build_constraint({"name": "count", "k": 3, "size": 8}, device="cpu")
    gpu = CountConstraint(k=3, size=8, device=torch.device("cuda", 1))
    assert asked == ["cpu", torch.device("cuda", 1)]  # trained where asked; recorded (and cached) by its type
    assert cpu.learned_parts() == {"counter": count.COUNTER_RECIPE}  # as recorded by every run so far
    assert gpu.learned_parts() == {"counter": count.COUNTER_RECIPE, "trained_on": "cuda"}
    assert count.counter_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_count_distance_with_a_given_counter():
    con = CountConstraint(k=3, counter=_SumCounter())
    x = torch.full((2, 1, 4, 4), -1.0)
    x[0, 0, 0, :3] = 1.0  # count 3
    x[1, 0, 0, :1] = 1.0  # count 1
    assert torch.allclose(con(x), torch.tensor([0.0, 2.0]))
    assert con.violation_map(x) is None  # the stand-in has no density map
    assert not any(p.requires_grad for p in con.counter.parameters())
    # a user's counter: no project recipe to record; its config names it by a fingerprint (class and weights)
    # and does not rebuild the project's counter in its place
    assert con.learned_parts() is None and con.config["counter"].startswith("custom ")
    assert CountConstraint(k=3, counter=_SumCounter()).config == con.config  # the same counter, the same name
    with pytest.raises(ValueError, match="count: counter must be a network .* rebuilt by passing it again"):
        build_constraint(con.config)

    class Column(nn.Module):
        def forward(self, x):
            return x.flatten(1).sum(1, keepdim=True)

    with pytest.raises(ValueError, match=r"the counter must map a batch of 2 to \(2,\) counts, got \(2, 1\)"):
        CountConstraint(k=3, counter=Column())(x)
    # a counter with float32 weights counts a float64 batch (and its density map) in its own dtype
    cnn = CountConstraint(k=2, size=8, counter=CountingCNN(width=4))
    img = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(cnn(img), cnn(img.float()))
    torch.testing.assert_close(cnn.violation_map(img), cnn.violation_map(img.float()))


def test_counter_adversarial_batch_stays_in_budget_and_raises_the_error():
    torch.manual_seed(0)
    net = CountingCNN(8)
    x = torch.rand(6, 1, 12, 12) * 2 - 1
    counts = torch.full((6,), 2.0)
    eps = 0.1
    xa = _pgd(net, x, counts, eps, 3, torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        assert (net(xa) - counts).abs().sum() > (net(x) - counts).abs().sum()
    assert all(p.requires_grad for p in net.parameters())  # the net is left trainable


def test_counter_training_does_not_depend_on_the_callers_thread_count():
    """The same settings give the same counter on any core count (the float sums' order follows the
    thread count, and the PGD batches' signed steps amplify it), and the caller's setting is restored."""
    before = torch.get_num_threads()
    nets = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            nets.append(train_counter(2, 12, steps=30, width=8, pool=64, faint=1.0, adv_eps=0.2, progress=False))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    a, b = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_counter_cache_key_is_unchanged_on_the_cpu_and_apart_for_a_gpu(tmp_path, capsys):
    from condiff.constraints.count import counter_key, load_counter

    assert counter_key(4, 16, 3000, 0, 16) == counter_key(4, 16, 3000, 0, 16, "cpu")
    assert counter_key(4, 16, 3000, 0, 16, "cuda") != counter_key(4, 16, 3000, 0, 16)
    # an explicit CPU device trains (and caches) the same counter as the default on a CPU machine
    net = load_counter(2, 12, steps=3, width=4, path=tmp_path / "c", device="cpu")
    assert next(net.parameters()).device.type == "cpu"
    assert json.loads((tmp_path / "c" / "config.json").read_text())["device"] == "cpu"
    # its first use says so on stderr (minutes of silence otherwise, where stderr is no terminal)
    assert "training the counting CNN (k = 2, 12x12, 3 steps on cpu) on first use" in capsys.readouterr().err
    again = load_counter(2, 12, steps=3, width=4, path=tmp_path / "c")
    assert "counting CNN" not in capsys.readouterr().err  # the cached one: no word
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_a_distance_of_the_wrong_kind_is_named_without_the_warnings_its_own_code_raised_on_the_way():
    import warnings

    x = torch.randn(2, 1, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "converting a tensor with requires_grad=True to a scalar"
        with pytest.raises(ValueError, match=r"must return shape \(2,\) for a batch of 2, got float"):
            check_distance(lambda x: float(x.sum()), x)

    def chatty(x):
        warnings.warn("the distance's own word", UserWarning, stacklevel=1)
        return x.flatten(1).abs().sum(1)

    with pytest.warns(UserWarning, match="the distance's own word"):  # a distance of the right kind: said
        check_distance(chatty, x)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


_SMALL_COUNTER = dict(k=2, size=12, steps=9, width=4, pool=32, faint=1.0, adv_eps=0.2, progress=False)


def _cut_counter_training(monkeypatch, at: int) -> list:
    """Make the counter's training stop as if by Ctrl-C at its ``at``-th step from now; returns the list
    that grows by one at each step run (``at=0``: never stop)."""
    from condiff.constraints import count

    real, calls = count._counter_step, []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        real(*a, **kw)

    monkeypatch.setattr(count, "_counter_step", step)
    return calls


def test_counter_training_cut_short_goes_on_to_the_counter_an_uninterrupted_run_makes(tmp_path, monkeypatch, capsys):
    from condiff import io

    whole = train_counter(**_SMALL_COUNTER)
    with pytest.raises(KeyboardInterrupt):
        _cut_counter_training(monkeypatch, 7)
        train_counter(**_SMALL_COUNTER, checkpoint=tmp_path / "state", every=3)
    assert io.load_config(tmp_path / "state")["step"] == 6  # saved at 3 and 6
    calls = _cut_counter_training(monkeypatch, 0)
    again = train_counter(**_SMALL_COUNTER, checkpoint=tmp_path / "state", every=3)
    assert len(calls) == 3  # steps 7 to 9 only
    assert "training goes on from step 6" in capsys.readouterr().err
    assert _same_weights(whole, again)  # batches, PGD starts, Adam and the schedule all went on as they were


def test_counter_training_starts_over_on_a_saved_state_of_other_settings_or_a_damaged_one(
        tmp_path, monkeypatch, capsys):
    state, other = tmp_path / "state", {**_SMALL_COUNTER, "steps": 12}
    for damage in (None, b"damaged"):
        with pytest.raises(KeyboardInterrupt):  # a state saved at step 3
            _cut_counter_training(monkeypatch, 4)
            train_counter(**_SMALL_COUNTER, checkpoint=state, every=3)
        monkeypatch.undo()
        if damage is None:  # asked for another number of steps
            net, want = train_counter(**other, checkpoint=state, every=100), train_counter(**other)
            assert "is not used (it was saved with other settings); its training starts over" in capsys.readouterr().err
            assert not state.exists()  # set aside, and this run saved none (every=100)
        else:
            (state / "model.safetensors").write_bytes(damage)
            net, want = train_counter(**_SMALL_COUNTER, checkpoint=state, every=3), train_counter(**_SMALL_COUNTER)
            err = capsys.readouterr().err
            assert "is not used (corrupted or truncated checkpoint file" in err and "starts over" in err
        assert _same_weights(net, want)  # nothing of the state that was not used stayed in


def test_load_counter_resumes_a_training_cut_short_and_keeps_no_state_once_it_is_cached(
        tmp_path, monkeypatch, capsys):
    from condiff.constraints import count

    path = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        _cut_counter_training(monkeypatch, 8)
        monkeypatch.setattr(count, "SAVE_EVERY", 3)
        count.load_counter(2, 12, steps=10, width=4, path=path)
    assert "its next use goes on from the state saved in" in capsys.readouterr().err
    assert (tmp_path / ".c.training" / "config.json").is_file() and not path.exists()
    monkeypatch.undo()
    monkeypatch.setattr(count, "SAVE_EVERY", 3)
    net = count.load_counter(2, 12, steps=10, width=4, path=path)
    assert "training goes on from step 6" in capsys.readouterr().err
    assert not (tmp_path / ".c.training").exists() and (path / "config.json").is_file()
    (tmp_path / ".c.training").mkdir()  # left by a process killed as it kept the counter: no use now
    count.load_counter(2, 12, steps=10, width=4, path=path)
    assert not (tmp_path / ".c.training").exists()
    with pytest.raises(ValueError, match=r"every must be an integer >= 1, got 0"):
        train_counter(**_SMALL_COUNTER, checkpoint=tmp_path / "s", every=0)
    (tmp_path / "file").write_text("")  # a cache that cannot be written: said before any training
    with pytest.raises(ValueError, match=r"the counting CNN for .*file/c is not cached, and cannot be trained into "
                       r"that folder \(.*\): set CONDIFF_CACHE to a folder you can write"):
        count.load_counter(2, 12, steps=10, width=4, path=tmp_path / "file" / "c")
    assert _same_weights(net, count.load_counter(2, 12, steps=10, width=4, path=tmp_path / "whole"))  # as if uncut


def test_a_second_user_of_a_counter_in_training_waits_and_loads_it_without_training(tmp_path, capsys):
    import fcntl
    import threading

    from condiff import io
    from condiff.constraints.count import load_counter

    path, got = tmp_path / "c", []
    with open(tmp_path / ".c.lock", "a") as held:  # another process is training it
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.append(load_counter(2, 12, steps=3, width=4, path=path)))
        waiter.start()
        waiter.join(2.0)
        assert waiter.is_alive() and not got  # waiting, not training beside it
        made = CountingCNN(4)
        io.save_module(path, made, {"net": made.config})  # the other process keeps its counter
    waiter.join(60)
    assert "waiting for another process" in capsys.readouterr().err
    assert len(got) == 1 and _same_weights(got[0], made)


def test_counter_training_saves_no_state_at_its_last_step(tmp_path):
    """The finished counter is the caller's to keep: a state saved at the last step is one that no training
    could go on from (and a later use of the state folder would refuse it and start over)."""
    from condiff import io

    train_counter(**_SMALL_COUNTER, checkpoint=tmp_path / "state", every=3)
    assert io.load_config(tmp_path / "state")["step"] == 6  # saved at 3 and 6, not at 9


def test_a_counter_state_damaged_past_its_network_puts_back_everything_it_loaded(tmp_path, monkeypatch, capsys):
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):  # a state saved at step 3
        _cut_counter_training(monkeypatch, 4)
        train_counter(**_SMALL_COUNTER, checkpoint=state, every=3)
    monkeypatch.undo()
    (state / "rng.safetensors").write_bytes(b"damaged")  # read last: the network, Adam and the schedule loaded
    net = train_counter(**_SMALL_COUNTER, checkpoint=state, every=100)
    assert "is not used (corrupted or truncated checkpoint file" in capsys.readouterr().err
    assert _same_weights(net, train_counter(**_SMALL_COUNTER))  # a start from scratch, as if no state was there


# --- every family: shape, sign, gradients; registry ------------------------------------------------


FAMILY_INPUTS = {
    "box": (Box(), (3, 1, 8, 8)),
    "ball": (Ball(), (3, 1, 8, 8)),
    "simplex": (Simplex(), (3, 1, 8, 8)),
    "brightness": (TotalBrightness(5.0), (3, 1, 8, 8)),
    "burgers": (BurgersResidual(), (3, 1, 8, 8)),
    "divergence_free": (DivergenceFree(), (3, 2, 8, 8)),
    "periodic": (PeriodicTiling(), (3, 1, 8, 8)),
    "count": (CountConstraint(k=2, counter=_SumCounter()), (3, 1, 8, 8)),
    "python": (build_constraint({"name": "python", "attr": "zero_mean",
                                 "path": str(Path(__file__).parents[1] / "examples" / "constraints" / "own.py")}),
               (3, 1, 8, 8)),
}


def test_every_registered_family_is_covered():
    assert set(CONSTRAINTS) <= set(FAMILY_INPUTS)


@pytest.mark.parametrize("name", sorted(FAMILY_INPUTS))
def test_family_shape_sign_and_gradients(name):
    con, shape = FAMILY_INPUTS[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2
    d = check_distance(con, x)
    assert d.shape == (3,) and bool((d > 0).all())
    assert torch.isfinite(_grad(con, x)).all()


def test_build_constraint_round_trip_and_errors():
    for con in (Box(-2, 3), BurgersResidual(nu=0.1), PeriodicTiling(reps=4), TotalBrightness(7.0)):
        again = build_constraint(con.config)
        x = torch.randn(2, 1, 8, 8)
        assert torch.equal(again(x), con(x))
    with pytest.raises(ValueError, match="unknown constraint 'nope'"):
        build_constraint({"name": "nope"})
    with pytest.raises(ValueError, match="bad arguments for constraint 'box'"):
        build_constraint({"name": "box", "width": 3})
    with pytest.raises(ValueError, match="'name' key"):
        build_constraint({"lo": 0})
    # a second class under a taken name is refused (the registry is left as it was); the same class again is not
    from condiff.constraints import register_constraint

    with pytest.raises(ValueError, match="constraint 'box' is already registered to Box"):
        register_constraint("box")(type("MyBox", (Box,), {}))
    assert CONSTRAINTS["box"] is Box and register_constraint("box")(Box) is Box


def test_user_callables_are_checked():
    x = torch.randn(4, 1, 8, 8)
    assert check_distance(lambda v: v.flatten(1).abs().sum(1), x).shape == (4,)
    with pytest.raises(ValueError, match=r"return shape \(4,\)"):
        check_distance(lambda v: v.sum(), x)
    with pytest.raises(ValueError, match=r"a constraint distance \(\[-.*< 0: a distance must be >= 0"):
        check_distance(lambda v: -v.flatten(1).abs().sum(1), x)
    with pytest.raises(ValueError, match="finite values, got .*nan"):
        check_distance(lambda v: v.flatten(1).sum(1) * float("nan"), x)
    with pytest.raises(ValueError, match="floating-point values, got torch.int64"):
        check_distance(lambda v: (v > 0).flatten(1).sum(1), x)
    with pytest.raises(ValueError, match="no gradient reaches x"):
        check_distance(lambda v: v.detach().flatten(1).abs().sum(1), x)
    with pytest.raises(TypeError, match="callable"):
        check_distance(3, x)
    with torch.no_grad():  # the gradient check holds under no_grad too
        with pytest.raises(ValueError, match="no gradient reaches x"):
            check_distance(lambda v: v.detach().flatten(1).abs().sum(1), x)
    with pytest.raises(ValueError, match="reaches -1 < 0"):
        batched_distance(lambda v: v.flatten(1)[:, 0] * 0 - 1, x)


def test_user_callables_that_break_later_are_named_at_the_check():
    """Each passed the check and failed later with a message naming another cause (a learning rate, ...)."""
    on_set = -torch.ones(4, 1, 8, 8)

    def euclid(v):  # 0 on the set, and its square root has no gradient there
        return (v + 1).clamp_min(0).pow(2).flatten(1).sum(1).sqrt()

    with pytest.raises(ValueError,
                       match="gradient of a constraint distance is not finite .*use condiff.constraints.safe_norm"):
        check_distance(euclid, on_set)
    assert check_distance(lambda v: safe_norm((v + 1).clamp_min(0)), on_set).tolist() == [0.0] * 4
    # NaN in the branch a torch.where leaves unused still reaches the gradient: named as a cause too (the
    # message blamed a square root alone); a batch of values is shown by its first few, not whole
    def far(v):
        d = v.flatten(1).sum(1).abs()
        return torch.where(v.flatten(1).abs().amax(1) < 50, d, d * float("nan"))

    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) for 4 of 4 samples\. .*a torch\.where"):
        check_distance(far, on_set)
    with pytest.raises(ValueError, match=r"^a constraint distance \(\[-1, -1, -1, -1 \.\.\. 60 more\]\) reaches -1"):
        check_distance(lambda v: -torch.ones(len(v)), torch.zeros(64, 1, 4, 4))
    with pytest.raises(ValueError, match=r"finite values, got 1 not finite of 64 \(sample 40: nan\)$"):
        check_distance(lambda v: torch.where(torch.arange(len(v)) == 40, float("nan"), 1.0) + 0 * v.sum(),
                       torch.zeros(64, 1, 4, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.drop = nn.BatchNorm2d(1), nn.Dropout(0.1)

        def forward(self, v):
            return self.drop(self.bn(v)).abs().flatten(1).mean(1)

    net = Net()
    with pytest.raises(ValueError, match=r"network in training mode \(BatchNorm2d, Dropout\) .* call .eval\(\)"):
        check_distance(net, on_set)
    assert net.bn.num_batches_tracked == 0  # refused before it ran
    check_distance(net.eval(), on_set)
    no_drop = nn.Sequential(nn.Dropout(0.0), nn.Flatten(), nn.Linear(64, 1), nn.Softplus(), nn.Flatten(0))
    check_distance(no_drop, on_set)  # dropout with p = 0 changes nothing: not refused

    def self_differentiating(v):  # fine with gradients; scored under no_grad it cannot differentiate
        (g,) = torch.autograd.grad(v.pow(2).sum(), v, create_graph=True)
        return g.flatten(1).abs().mean(1)

    check_distance(self_differentiating, on_set)
    with pytest.raises(ValueError, match=r"does not require grad .*must run that code under torch.enable_grad\(\)"):
        batched_distance(self_differentiating, on_set)
    with pytest.raises(ValueError, match="unknown constraint 'nope'; known: .*, or FILE.py:NAME"):
        build_constraint({"name": "nope"})
    with pytest.raises(ValueError, match="data.constraint=\\{name = \"brightness\""):
        build_constraint({"name": "brightness"})


@pytest.mark.parametrize("con", [Box(), Ball(), Simplex()])
def test_a_broken_sample_never_reads_as_on_the_set(con):
    x = torch.rand(3, 1, 4, 4) * 0.01
    x[1, 0, 0, 0] = float("nan")
    x[2] = float("inf")
    d = con(x)
    assert bool(torch.isnan(d[1])) and not bool(torch.isfinite(d[2]))
    z = torch.zeros(2, 1, 4, 4, requires_grad=True)
    con(z).sum().backward()
    assert bool(torch.isfinite(z.grad).all())


def test_constraint_settings_refuse_what_they_would_truncate():
    with pytest.raises(ValueError, match="k must be an integer"):
        CountConstraint(k=2.5, counter=nn.Identity())
    for seed in (1.5, "a", -1):
        with pytest.raises(ValueError, match="count: seed must be an integer"):
            CountConstraint(k=2, seed=seed, counter=nn.Identity())
    with pytest.raises(ValueError, match="reps .* must be an integer >= 2"):
        PeriodicTiling(reps=2.5)
    with pytest.raises(ValueError, match="substeps must be an integer >= 1"):
        BurgersResidual(substeps=2.5)
    assert PeriodicTiling(reps=3.0).reps == 3 and isinstance(PeriodicTiling(reps=3.0).reps, int)
    with pytest.raises(ValueError, match="center must be a finite number"):
        Ball(center=float("nan"))


def test_a_users_python_file_is_a_constraint_and_an_edit_is_noticed(tmp_path):
    from condiff.constraints import build_constraint, parse_python_spec

    f = tmp_path / "mycon.py"
    f.write_text("import torch\n\n\ndef total(x):\n    return (x.flatten(1).sum(1) - 3.0).abs()\n\n\n"
                 "class Edge(torch.nn.Module):\n    def forward(self, x):\n"
                 "        return x[..., 0].abs().flatten(1).sum(1)\n\n"
                 "    def violation_map(self, x):\n        return x[:, 0] * 0\n")
    spec = parse_python_spec(f"{f}:total")
    assert spec == {"name": "python", "path": str(f.resolve()), "attr": "total"}
    assert parse_python_spec("box") is None and parse_python_spec("C:/data/box") is None
    con = build_constraint(spec)
    x = torch.zeros(2, 1, 4, 4, requires_grad=True)
    with torch.no_grad():
        x[0, 0, 0, :3] = 1
    d = con(x)
    assert torch.allclose(d, torch.tensor([0.0, 3.0]))
    d.sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert con.violation_map(x) is None
    edge = build_constraint(parse_python_spec(f"{f}:Edge"))  # a class is built without arguments
    assert edge(torch.ones(3, 1, 4, 4)).tolist() == [4.0, 4.0, 4.0] and edge.violation_map(x).shape == (2, 4, 4)
    assert build_constraint(con.config).learned_parts() == con.learned_parts()
    f.write_text(f.read_text() + "# edited\n")
    assert build_constraint(con.config).learned_parts() != con.learned_parts()
    with pytest.raises(ValueError, match=r"has no 'totl'; its callables: \['Edge', 'total'\]"):
        build_constraint(parse_python_spec(f"{f}:totl"))
    with pytest.raises(ValueError, match="does not exist"):
        build_constraint(parse_python_spec(f"{tmp_path / 'none.py'}:total"))
    (tmp_path / "broken.py").write_text("def total(x:\n")
    with pytest.raises(ValueError, match="broken.py failed to run: SyntaxError"):
        build_constraint(parse_python_spec(f"{tmp_path / 'broken.py'}:total"))
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")  # ended the command without a word
    with pytest.raises(ValueError, match="exits.py failed to run: SystemExit"):
        build_constraint(parse_python_spec(f"{tmp_path / 'exits.py'}:total"))
    with pytest.raises(ValueError, match="name of a callable"):
        parse_python_spec(f"{f}:")
    # the file imports its neighbours, as when it runs as a script (ModuleNotFoundError before)
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "condiff_test_helper_k.py").write_text("K = 2.0\n")
    (tmp_path / "side" / "uses.py").write_text("from condiff_test_helper_k import K\n\n\n"
                                               "def scaled(x):\n    return K * x.flatten(1).abs().sum(1)\n")
    import sys

    before = list(sys.path)
    uses = build_constraint(parse_python_spec(f"{tmp_path / 'side' / 'uses.py'}:scaled"))
    assert uses(torch.ones(1, 1, 2, 2)).tolist() == [8.0] and sys.path == before  # the path is put back
    from condiff.mirror.plots import violation_maps

    (tmp_path / "vm.py").write_text("class Bad:\n    def __call__(self, x):\n"
                                    "        return x.flatten(1).sum(1).abs()\n\n"
                                    "    def violation_map(self, x):\n        return x\n")
    with pytest.raises(ValueError, match=r"violation_map must return \(B, H, W\) = \(1, 4, 4\).* got \(1, 1, 4, 4\)"):
        violation_maps(build_constraint(parse_python_spec(f"{tmp_path / 'vm.py'}:Bad")), torch.zeros(2, 1, 4, 4))
    (tmp_path / "boom.py").write_text("def total(x):\n    raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"constraint .*boom.py:total raised RuntimeError: boom"):
        build_constraint(parse_python_spec(f"{tmp_path / 'boom.py'}:total"))(torch.zeros(2, 1, 4, 4))


def test_burgers_right_hand_side_is_the_central_difference_closed_form():
    """u = c + e sin(k x) on a periodic grid: the discrete -u u_x + nu u_xx is exactly
    -(c + e sin) e cos(k x) sin(k dx)/dx - nu e sin(k x) (2 - 2 cos(k dx))/dx^2 (the sign of the
    advection and the 2 dx of the central difference both show)."""
    from condiff.constraints.burgers import _rhs

    n, L, nu, c, e, m = 32, 10.0, 0.05, 1.0, 0.3, 3
    dx, k = L / n, 2 * math.pi * m / L
    x = torch.arange(n, dtype=torch.float64) * dx
    s, co = torch.sin(k * x), torch.cos(k * x)
    expect = -(c + e * s) * e * co * math.sin(k * dx) / dx - nu * e * s * (2 - 2 * math.cos(k * dx)) / dx**2
    torch.testing.assert_close(_rhs(c + e * s, nu, dx), expect)


def test_burgers_constraint_steps_on_the_periodic_grid_spacing():
    """BurgersResidual.step uses dx = L / N (N points on a periodic domain): a small mode about a zero
    mean flow decays by the discrete heat factor of that spacing."""
    n, L, nu, dt, sub = 16, 10.0, 0.05, 0.025, 5
    con = BurgersResidual(nu=nu, length=L, dt=dt, substeps=sub, shift=0.0, scale=1.0)
    u = 1e-6 * torch.sin(2 * math.pi * 2 * torch.arange(n, dtype=torch.float64) / n)
    k_eff2 = 4 / (L / n) ** 2 * math.sin(math.pi * 2 / n) ** 2
    torch.testing.assert_close(con.step(u), u * math.exp(-nu * k_eff2 * dt * sub), rtol=1e-6, atol=1e-15)


def test_divergence_pairs_channels_per_snapshot_and_ignores_nyquist():
    n = 16
    c = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    Y, X = torch.meshgrid(c, c, indexing="ij")
    # from psi = sin 2x cos 3y: u = d psi / dy, v = -d psi / dx
    u, v = -3 * torch.sin(2 * X) * torch.sin(3 * Y), -2 * torch.cos(2 * X) * torch.cos(3 * Y)
    div = DivergenceFree()
    two = torch.stack([u, v, 0.5 * u, 0.5 * v])[None]  # (u1, v1, u2, v2)
    assert float(div(two)) < 1e-12
    assert float(div(torch.stack([u, 0.5 * u, v, 0.5 * v])[None])) > 0.1  # read as [u..., v...] it is not
    # a Nyquist mode in y has no defined derivative: v = cos(8 y) cos(x) counts as divergence-free
    assert float(div(torch.stack([torch.zeros_like(u), torch.cos(8 * Y) * torch.cos(X)])[None])) < 1e-12


def test_periodic_violation_map_puts_each_tile_in_its_quadrant():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 5] = 1.0  # top-right quadrant (rows 0-3, columns 4-7)
    vm = PeriodicTiling().violation_map(x)[0]
    assert vm.shape == (8, 8) and tuple(divmod(int(vm.argmax()), 8)) == (1, 5)


def test_ball_projection():
    b = Ball(1.0)
    e = torch.zeros(1, 4)
    e[0, 1] = 1.0
    torch.testing.assert_close(b.project(3 * e), e)
    torch.testing.assert_close(b.project(0.5 * e), 0.5 * e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_on_the_simplex_have_zero_distance_and_zero_gradient(dtype):
    """The projection of a point on the simplex differs from it by rounding, which the norm turned into a
    unit gradient on 98% of such points (a kick to every guided step that reached the set)."""
    x = torch.rand(500, 1, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x = (x / x.flatten(1).sum(1).view(-1, 1, 1, 1)).requires_grad_()
    d = Simplex(1.0)(x)
    (g,) = torch.autograd.grad(d.sum(), x)
    assert float(d.detach().abs().max()) == 0 and float(g.abs().max()) == 0
    off = x.detach().clone()
    off[:, 0, 0, 0] += 1e-3  # just off the set: the distance and a unit gradient, as before
    d = Simplex(1.0)(off.requires_grad_())
    (g,) = torch.autograd.grad(d.sum(), off)
    assert bool((d > 0).all()) and torch.allclose(g.flatten(1).norm(dim=1), torch.ones(500, dtype=dtype))


def test_a_half_precision_point_far_off_the_simplex_is_not_projected_onto_itself():
    """The on-set tolerance grew with D * eps: 0.77 for 784 float16 entries, so a sum of 1.5 read as on the set."""
    x = torch.full((2, 1, 28, 28), 1.5 / 784, dtype=torch.float16)
    con = Simplex(1.0)
    assert not torch.equal(con.project(x), x) and float(con.violation_map(x).sum()) > 0.4
    on = torch.full((2, 1, 28, 28), 1 / 784, dtype=torch.float16)
    assert torch.equal(con.project(on), on)


def test_integer_pictures_are_measured_as_their_values_and_an_empty_flow_batch_has_no_distances():
    """PeriodicTiling failed on integer pictures (mean() of an integer tensor) while Box took them, and
    DivergenceFree's FFT refused an empty batch that every other constraint measures as (0,)."""
    x = torch.randint(0, 3, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for con in (PeriodicTiling(), Box(), Simplex(), Ball()):
        got = con(x)
        assert got.dtype == torch.float32 and torch.equal(got, con(x.float())), type(con).__name__
    empty = DivergenceFree()(torch.zeros(0, 4, 8, 8))
    assert empty.shape == (0,) and DivergenceFree().divergence(torch.zeros(0, 4, 8, 8)).shape == (0, 2, 8, 8)
    with pytest.raises(ValueError, match="even number of channels"):
        DivergenceFree()(torch.zeros(0, 3, 8, 8))


def test_the_counters_cache_key_holds_every_setting():
    from condiff.constraints.count import counter_key

    base = counter_key(8, 16, 100, 0, 16)
    others = [counter_key(4, 16, 100, 0, 16), counter_key(8, 32, 100, 0, 16), counter_key(8, 16, 200, 0, 16),
              counter_key(8, 16, 100, 1, 16), counter_key(8, 16, 100, 0, 32)]
    assert base == counter_key(8, 16, 100, 0, 16) and base not in others and len(set(others)) == len(others)


def test_a_count_constraint_trains_its_counter_with_a_bar_unless_told_not_to(tmp_path, monkeypatch, capsys):
    """namm fit --quiet showed the counter's bar anyway: build_constraint passes progress to a family that trains
    a part on first use, and leaves it out for the others (which take no such argument)."""
    from condiff.constraints import build_constraint

    spec = {"name": "count", "k": 2, "size": 12, "counter_steps": 3, "width": 4}
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "a"))
    build_constraint(spec, progress=False)
    err = capsys.readouterr().err
    assert "training the counting CNN" in err and "counting CNN (first use)" not in err
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "b"))
    c = build_constraint(spec)
    assert "counting CNN (first use)" in capsys.readouterr().err and "progress" not in c.config
    assert build_constraint({"name": "box"}, progress=False).config["name"] == "box"
    from condiff.constraints.count import load_counter

    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "c"))
    load_counter(2, 12, 3, 0, 4)  # called from Python, it shows its bar too (minutes of training are never silent)
    assert "counting CNN (first use)" in capsys.readouterr().err
