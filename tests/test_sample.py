"""Samplers against the analytic oracle: Gaussian data with its exact denoiser."""

import math

import pytest
import torch

from condiff.denoiser import GaussianDenoiser
from condiff.sample import ddim, ddim_sigma, ddpm, generate, make_step, sample
from condiff.schedule import Schedule

M, S = 0.5, 0.3


def oracle(T=200):
    return GaussianDenoiser(Schedule.linear(T, 1e-4, 0.1), mean=M, std=S)


def propagate(schedule, ts, eta):
    """Closed form: for Gaussian data every DDIM step is affine in x_t, so the law of the sample
    stays Gaussian; push (mean, var) of x_T ~ N(0, 1) through the steps by hand."""
    mu, var = 0.0, 1.0
    ts = list(ts) + [-1]
    for t, s in zip(ts[:-1], ts[1:]):
        a = float(schedule.abar[t])
        b = float(schedule.abar[s]) if s >= 0 else 1.0
        v = a * S**2 + 1 - a
        sig = eta * math.sqrt((1 - b) / (1 - a) * (1 - a / b))
        k = math.sqrt(1 - b - sig**2)
        # eps = ce * x + de ; x0 = (x - sqrt(1-a) eps)/sqrt(a) ; out = sqrt(b) x0 + k eps
        ce, de = math.sqrt(1 - a) / v, -math.sqrt(1 - a) * math.sqrt(a) * M / v
        c0, d0 = (1 - math.sqrt(1 - a) * ce) / math.sqrt(a), -math.sqrt(1 - a) * de / math.sqrt(a)
        c, d = math.sqrt(b) * c0 + k * ce, math.sqrt(b) * d0 + k * de
        mu, var = c * mu + d, c * c * var + sig**2
    return mu, math.sqrt(var)


def test_ddpm_matches_closed_form():
    d = oracle()
    g = torch.Generator().manual_seed(0)
    x = ddpm(d, torch.randn(4000, 16, generator=g), generator=g)
    mu, sd = propagate(d.schedule, range(199, -1, -1), 1.0)
    # 64,000 values: standard error of the mean ~ 1.2e-3, of the std ~ 8e-4; 0.006 is > 4 SE.
    assert x.mean().item() == pytest.approx(mu, abs=0.006)
    assert x.std().item() == pytest.approx(sd, abs=0.006)
    # and the chain targets the data law (coarse 200-step schedule: a few % discretisation bias)
    assert sd == pytest.approx(S, rel=0.06) and mu == pytest.approx(M, abs=0.01)
    assert d.nfe == 200


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_closed_form(eta):
    d = oracle()
    g = torch.Generator().manual_seed(1)
    x = sample(d, (4000, 16), steps=50, eta=eta, generator=g)
    mu, sd = propagate(d.schedule, d.schedule.timesteps(50).tolist(), eta)
    assert x.mean().item() == pytest.approx(mu, abs=0.006)
    assert x.std().item() == pytest.approx(sd, abs=0.006)


def test_ddim_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    d = oracle(1000)
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.1,
                                  timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False)
    sch.set_timesteps(25)
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    x = x0.clone()
    for t in sch.timesteps:
        x = sch.step(d.predict_eps(x, t.expand(8)), t, x, eta=0.0).prev_sample
    ours = ddim(d, x0, d.schedule.timesteps(25, "leading"), eta=0.0)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_single_step_matches_closed_form():
    d = oracle()
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 8, generator=g)
    t, tp = torch.full((3,), 150), torch.full((3,), 100)
    st = make_step(d, x_t, 0, t, tp, eta=1.0, generator=g)
    a_t, a_s = float(d.schedule.abar[150]), float(d.schedule.abar[100])
    # closed form posterior mean of x0 given x_t for Gaussian data
    var = a_t * S**2 + 1 - a_t
    x0 = M + math.sqrt(a_t) * S**2 * (x_t - math.sqrt(a_t) * M) / var
    torch.testing.assert_close(st.x0_hat, x0, rtol=1e-5, atol=1e-5)
    sig = math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    assert st.sigma == pytest.approx(sig)
    eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    torch.testing.assert_close(st.mean, math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sig**2) * eps, rtol=1e-5,
                               atol=1e-5)
    assert ddim_sigma(a_t, a_s, 0.0) == 0.0


def test_same_seed_same_samples_and_guidance_hook_identity():
    d = oracle()
    a = sample(d, (5, 4), steps=20, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(d, (5, 4), steps=20, eta=1.0, generator=torch.Generator().manual_seed(3))
    c = sample(d, (5, 4), steps=20, eta=1.0, generator=torch.Generator().manual_seed(3),
               guidance=lambda st: st.sample())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    e = sample(d, (5, 4), steps=20, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(a, e)


def test_callback_sees_every_step_and_remake_counts_nfe():
    d = oracle()
    seen = []
    sample(d, (2, 3), steps=10, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert [s.i for s in seen] == list(range(10))
    assert int(seen[-1].t_prev[0]) == -1 and seen[-1].abar_prev == 1.0
    # the host copies of t and t_prev (what guidance reads instead of waiting for a GPU) agree
    assert all((s.t_host, s.t_prev_host) == (int(s.t[0]), int(s.t_prev[0])) for s in seen)
    before = d.nfe
    again = seen[3].remake(seen[3].x_t)
    assert d.nfe == before + 1
    assert (again.t_host, again.t_prev_host) == (seen[3].t_host, seen[3].t_prev_host)
    torch.testing.assert_close(again.x0_hat, seen[3].x0_hat)


def test_grad_mode_backpropagates_to_noise():
    d = oracle()
    x = torch.randn(2, 4, requires_grad=True)
    out = ddim(d, x, d.schedule.timesteps(5), grad=True)
    out.sum().backward()
    # deterministic DDIM on Gaussian data is affine in x_T: out = c x_T + d elementwise, and with x_T of
    # variance 1 the closed form's output std is |c|
    _, c = propagate(d.schedule, d.schedule.timesteps(5).tolist(), 0.0)
    torch.testing.assert_close(x.grad, torch.full((2, 4), c), rtol=1e-5, atol=0)


def test_needs_grad_guidance_sees_graph():
    d = oracle()

    class G:
        needs_grad = True

        calls = 0

        def __call__(self, st):
            (g,) = torch.autograd.grad(st.x0_hat.sum(), st.x_t)
            assert g.shape == st.x_t.shape
            self.calls += 1
            return st.sample()

    guidance = G()
    ddim(d, torch.randn(2, 4), d.schedule.timesteps(3), guidance=guidance)
    assert guidance.calls == 3


def test_bad_timesteps():
    d = oracle()
    with pytest.raises(ValueError, match="decreasing"):
        ddim(d, torch.randn(2, 2), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"lie in \[0, 200\)"):
        ddim(d, torch.randn(2, 2), torch.tensor([300, 5]))


def test_generate_refuses_a_bad_step_count_before_drawing_its_progress_bar(capsys):
    with pytest.raises(ValueError, match="steps must be between 1 and T=200, got 500"):
        generate(oracle(), 4, (2,), progress=True, steps=500)
    assert capsys.readouterr().err == ""
    x = generate(oracle(), 5, (2,), batch_size=2, steps=10, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 2) and torch.isfinite(x).all()


def test_generates_progress_counts_sampler_steps_over_all_batches_and_keeps_the_callers_callback(monkeypatch):
    """The bar counted samples a batch at a time, so one batch of 500 sat at 0% until the end."""
    import condiff.sample as sample_mod

    bars, seen = [], []

    class Bar:
        def __init__(self, total, *a, **kw):
            self.total, self.n, self.desc, self.closed = total, 0, kw.get("desc"), 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            self.closed += 1

    monkeypatch.setattr(sample_mod, "progress_bar", lambda total, enabled, **kw: Bar(total, **kw) if enabled else None)
    generate(oracle(), 5, (2,), batch_size=2, steps=10, progress=True, callback=lambda step: seen.append(step.t))
    (bar,) = bars
    assert bar.total == bar.n == 3 * 10 and bar.desc == "sampling 5"  # three batches of ten steps, each counted
    assert bar.closed == 1  # by generate, once: each batch's sampler leaves the caller's bar open
    assert len(seen) == 30  # the caller's own callback still sees every step
    bars.clear()
    ddim(oracle(), torch.randn(2, 2), torch.tensor([40, 20, 1]))  # progress=False: no bar at all
    assert bars == []


@pytest.mark.parametrize("eta", [-1.0, float("nan"), float("inf"), 1.5])
def test_ddim_refuses_a_meaningless_eta(eta):
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim(oracle(), torch.randn(2, 2), torch.tensor([5, 1]), eta=eta)


def test_generate_refuses_batch_size_zero():
    with pytest.raises(ValueError, match="batch size must be an integer >= 1, got 0"):
        generate(oracle(), 4, (2,), batch_size=0, steps=5)
    with pytest.raises(ValueError, match="batch size must be an integer >= 1, got 2.5"):
        generate(oracle(), 4, (2,), batch_size=2.5, steps=5)


def test_sampler_input_of_the_wrong_kind_is_a_clear_error():
    ts = torch.tensor([4, 2, 0])
    for kw, err, match in [({"x": torch.ones(2, 2, dtype=torch.long)}, TypeError, "x must be a floating-point"),
                           ({"x": torch.ones(2, 2, device="meta")}, ValueError, "meta device, which holds no values"),
                           ({"eta": "0.5"}, ValueError, r"eta must be in \[0, 1\].*got '0.5'")]:
        args = {"x": torch.randn(2, 2), "eta": 0.0, **kw}
        with pytest.raises(err, match=match):
            ddim(oracle(), args["x"], ts, eta=args["eta"])


@pytest.mark.parametrize("kw, msg", [({"clip_x0": -1.0}, "clip_x0 must be"),
                                     ({"clip_x0": float("nan")}, "clip_x0 must be"),
                                     ({"clip_x0": (0.5, 0.2)}, r"a pair \(lo, hi\) with lo < hi"),
                                     ({"clip_x0": (0.0, 1.0, 2.0)}, r"a pair \(lo, hi\)"),
                                     ({"x": torch.full((2, 2), float("nan"))}, "non-finite"),
                                     ({"x": torch.zeros(0, 2)}, "non-empty batch"),
                                     ({"timesteps": torch.tensor([5.5, 1.0])}, r"in \[0, 200\) as whole steps")])
def test_ddim_refuses_inputs_that_would_give_garbage(kw, msg):
    args = {"x": torch.randn(2, 2), "timesteps": torch.tensor([5, 1]), **kw}
    with pytest.raises(ValueError, match=msg):
        ddim(oracle(), args.pop("x"), args.pop("timesteps"), **args)
    with pytest.raises(ValueError, match="n \\(the number of samples\\) must be"):
        generate(oracle(), 0, (2,), steps=5)


def test_a_clip_pair_bounds_x0_hat_and_a_number_is_the_symmetric_pair():
    """Deterministic DDIM ends on the last x0_hat, so clipped to [0.2, 0.5] the samples lie there, though
    the oracle's data (mean 0, std 1) mostly do not; clip c is the pair (-c, c) exactly."""
    den, ts = GaussianDenoiser(Schedule.linear(100), std=1.0), torch.tensor([90, 50, 10])
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    out = ddim(den, x, ts, clip_x0=(0.2, 0.5))
    assert float(out.min()) >= 0.2 - 1e-6 and float(out.max()) <= 0.5 + 1e-6
    assert float((out - 0.2).abs().min()) < 1e-6 and float((out - 0.5).abs().min()) < 1e-6  # both bounds bite
    torch.testing.assert_close(ddim(den, x, ts, clip_x0=0.3), ddim(den, x, ts, clip_x0=(-0.3, 0.3)))


def _step_at(d, x, t, t_prev, eta=1.0, seed=0, **kw):
    B = x.shape[0]
    return make_step(d, x, 0, torch.full((B,), t), torch.full((B,), t_prev), eta, torch.Generator().manual_seed(seed),
                     **kw)


def test_renoise_forward_diffuses_to_the_step_above():
    """x_t = sqrt(r) x_prev + sqrt(1 - r) z with r = abar_t / abar_prev, z the generator's next draw."""
    d = oracle()
    x, x_prev = torch.randn(3, 4), torch.randn(3, 4)
    st = _step_at(d, x, 120, 100)
    after = st.generator.get_state()
    z = torch.randn(3, 4, generator=torch.Generator().set_state(after))
    r = float(d.schedule.abar[120] / d.schedule.abar[100])
    torch.testing.assert_close(st.renoise(x_prev), math.sqrt(r) * x_prev + math.sqrt(1 - r) * z)


def test_a_clipped_step_keeps_eps_and_x0_consistent():
    """With x0_hat clamped, eps_hat is recomputed so that x_t = sqrt(abar) x0_hat + sqrt(1 - abar) eps_hat
    still holds (the DDIM mean is built from both)."""
    d = oracle()
    x = 3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    st = _step_at(d, x, 150, 140, clip_x0=0.5)
    assert float(st.x0_hat.abs().max()) <= 0.5 and bool((st.x0_hat.abs() == 0.5).any())  # the clamp acted
    a = float(d.schedule.abar[150])
    torch.testing.assert_close(math.sqrt(a) * st.x0_hat + math.sqrt(1 - a) * st.eps_hat, x, atol=1e-5, rtol=0)


def test_repeated_or_out_of_range_first_timesteps_are_refused():
    d = oracle()
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(d, torch.randn(2, 2), torch.tensor([5, 5, 0]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 200\)"):
        ddim(d, torch.randn(2, 2), torch.tensor([200, 0]))


class _SeenTimes(GaussianDenoiser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def predict_eps(self, x_t, t):
        self.seen.append(int(t[0]))
        return super().predict_eps(x_t, t)


def test_sample_and_guided_sample_follow_the_spacing_asked_for():
    from condiff.guidance import DPS, guided_sample

    for spacing, first in (("linspace", 999), ("leading", 900), ("trailing", 999)):
        d = _SeenTimes(Schedule.linear(1000), mean=M, std=S)
        sample(d, (2, 3), steps=10, spacing=spacing)
        assert d.seen == d.schedule.timesteps(10, spacing).tolist() and d.seen[0] == first
        d.seen.clear()
        guided_sample(d, DPS(lambda x: x.pow(2).sum(1), zeta=0.1), (2, 3), 10, spacing=spacing)
        assert d.seen == d.schedule.timesteps(10, spacing).tolist(), spacing


def test_a_seed_gives_a_float64_model_the_noise_of_a_float32_one():
    """torch draws other normals in float64 (from 16 elements on), so a float64 run could not check float32
    numerics from a seed; the noise is drawn in float32 and cast."""
    import copy

    from condiff.denoiser import NetDenoiser
    from condiff.nets import UNet
    from condiff.operators import GaussianBlur

    s = Schedule.linear(50)
    torch.manual_seed(0)
    net = UNet(1, base=8, mults=(1, 2))
    a, b = (sample(NetDenoiser(n, s), (4, 1, 8, 8), steps=5, eta=1.0, generator=torch.Generator().manual_seed(0))
            for n in (net, copy.deepcopy(net).double()))
    assert b.dtype == torch.float64 and torch.allclose(a.double(), b, atol=1e-4)
    op = GaussianBlur(3, 1.0, sigma_y=0.1)
    x = torch.zeros(2, 1, 8, 8)
    ya = op.measure(x, torch.Generator().manual_seed(1))
    yb = op.measure(x.double(), torch.Generator().manual_seed(1))
    assert torch.allclose(ya.double(), yb, atol=1e-6)
