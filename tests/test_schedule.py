import math

import pytest
import torch

from condiff.schedule import Schedule


def test_linear_abar_closed_form():
    s = Schedule.linear(10, 0.1, 0.5)
    betas = [0.1 + 0.4 * i / 9 for i in range(10)]
    expect = 1.0
    for i, b in enumerate(betas):
        expect *= 1 - b
        assert float(s.abar[i]) == pytest.approx(expect, rel=1e-12)


def test_cosine_matches_definition():
    T, s0 = 1000, 0.008
    s = Schedule.cosine(T)
    f = lambda u: math.cos((u + s0) / (1 + s0) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        assert float(s.abar[t]) == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)


def test_add_noise_and_abar_at():
    s = Schedule.linear(100)
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 10, 50, 99])
    xt = s.add_noise(x0, eps, t)
    for i in range(4):
        a = float(s.abar[t[i]])
        torch.testing.assert_close(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i])
    # t = -1 means clean data
    assert float(s.abar_at(torch.tensor([-1]), x0[:1]).flatten()[0]) == 1.0
    # outside [-1, T): refused, where t = -2 used to wrap round to abar_T and t = T to fail in indexing
    for bad in (-2, 100):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 100\)"):
            s.abar_at(torch.tensor([5, bad]), x0[:2])


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps(spacing, steps):
    ts = Schedule.linear(1000).timesteps(steps, spacing)
    assert ts.shape == (steps,) and ts.dtype == torch.long
    assert bool((ts[1:] < ts[:-1]).all())
    assert 0 <= int(ts.min()) and int(ts.max()) <= 999
    if spacing == "linspace":
        assert int(ts[0]) == 999 and int(ts[-1]) == 0 or steps == 1


def test_timesteps_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    s = Schedule.linear(1000)
    # 30 and 7 steps do not divide T: the rounding of each spacing shows (linspace 999, 965, 930 for 30)
    for spacing in ("linspace", "leading", "trailing"):
        for steps in (50, 30, 7):
            sch = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
            sch.set_timesteps(steps)
            assert torch.equal(s.timesteps(steps, spacing), sch.timesteps.long()), (spacing, steps)
    assert s.timesteps(30)[:3].tolist() == [999, 965, 930]


def test_from_diffusers_config_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        sch = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule=kind)
        s = Schedule.from_diffusers_config(dict(sch.config))
        torch.testing.assert_close(s.abar.float(), sch.alphas_cumprod.float(), rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="steps must be between"):
        Schedule.linear(10).timesteps(11)
    with pytest.raises(ValueError, match="betas"):
        Schedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="unknown spacing"):
        Schedule.linear(10).timesteps(5, "weird")
    with pytest.raises(ValueError, match="unknown schedule kind"):
        Schedule.from_config({"kind": "sigmoid"})


def test_config_round_trip():
    for s in (Schedule.linear(123, 2e-4, 0.03), Schedule.cosine(77)):
        torch.testing.assert_close(Schedule.from_config(s.config()).abar, s.abar)


def test_config_round_trips_every_kind_of_schedule():
    for sch in (Schedule.linear(30), Schedule.cosine(20, s=0.1, max_beta=0.5),
                Schedule(torch.linspace(0.01, 0.1, 50))):
        assert torch.equal(Schedule.from_config(sch.config()).betas, sch.betas)


@pytest.mark.parametrize("T", [10, 37, 50, 1000])
def test_trailing_spacing_gives_exactly_the_steps_asked_for(T):
    for steps in range(1, T + 1):
        ts = Schedule.linear(T).timesteps(steps, "trailing")
        assert len(ts) == steps and int(ts[0]) == T - 1 and int(ts[-1]) >= 0
        assert bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError, match="steps must be an integer"):
        Schedule.linear(T).timesteps(2.5)


def test_add_noise_refuses_integer_data_and_mismatched_noise():
    """Integer x0 made abar an integer (0): x_t was the truncated noise alone, silently."""
    s = Schedule.linear(50)
    t = torch.tensor([0, 10, 25, 49])
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor, got dtype torch.uint8"):
        s.add_noise(torch.full((4, 2), 200, dtype=torch.uint8), torch.randn(4, 2), t)
    with pytest.raises(ValueError, match=r"eps must have x0's shape \(4, 2\), got \(1, 2\)"):
        s.add_noise(torch.randn(4, 2), torch.randn(1, 2), t)
    with pytest.raises(ValueError, match=r"t must be one step or one per sample, shape \(4,\), got shape \(2,\)"):
        s.add_noise(torch.randn(4, 2), torch.randn(4, 2), t[:2])


def test_add_noise_takes_one_step_for_the_whole_batch():
    s = Schedule.linear(50)
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    expect = s.add_noise(x0, eps, torch.full((3,), 7))
    assert torch.equal(s.add_noise(x0, eps, 7), expect) and torch.equal(s.add_noise(x0, eps, torch.tensor(7)), expect)


def test_snr_is_infinite_for_clean_data_and_matches_abar():
    s = Schedule.linear(50)
    snr = s.snr(torch.tensor([-1, 0, 49]))
    assert math.isinf(snr[0]) and snr[1] == pytest.approx(s.abar[0] / (1 - s.abar[0]))
    assert snr[2] == pytest.approx(s.abar[49] / (1 - s.abar[49]))
    with pytest.raises(ValueError, match="timesteps must lie in"):
        s.snr(torch.tensor([-2]))


def test_a_fractional_step_count_is_refused():
    for build in (Schedule.linear, Schedule.cosine):
        with pytest.raises(ValueError, match=r"diffusion steps\) must be an integer >= 2, got 2.7"):
            build(2.7)
    assert Schedule.cosine(10.0).T == 10


def test_abar_at_refuses_timesteps_between_steps():
    """t = 3.7 was read as step 3 by the table lookup."""
    s = Schedule.linear(50)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 50\) \(-1: clean data\) as whole steps"):
        s.abar_at(torch.tensor([3.7]), torch.zeros(1, 2))
    assert s.abar_at(torch.tensor([3.0]), torch.zeros(1, 2)).item() == pytest.approx(float(s.abar[3]))


def test_cosine_max_beta_clamps_the_last_betas():
    assert float(Schedule.cosine(20, max_beta=0.5).betas[-1]) == 0.5
    assert float(Schedule.cosine(20).betas[-1]) == 0.999  # the last step's raw beta is 1


def test_a_schedule_whose_last_abar_underflows_is_refused():
    """linear(20000) ends at abar = 1.3e-88, where x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) overflows
    float32 (all-NaN samples); it is refused at construction, while 10000 steps (1.2e-44) still build."""
    with pytest.raises(ValueError, match=r"last abar is 1.32e-88: .*overflows float32 below abar = 1e-60"):
        Schedule.linear(20000)
    with pytest.raises(ValueError, match="last abar"):
        Schedule(torch.full((13,), 1 - 1e-5, dtype=torch.float64))  # abar 1e-65
    assert float(Schedule.linear(10000).abar[-1]) == pytest.approx(1.15e-44, rel=0.01)


def test_from_config_checks_t_as_its_builders_do():
    """T >= 2 (one step has no reverse process), an integral float taken as an int, as linear() takes it."""
    assert Schedule.from_config({"kind": "linear", "T": 2.0}).T == 2
    for bad in (1, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"schedule.T \(the number of diffusion steps\) must be an integer >= 2"):
            Schedule.from_config({"kind": "cosine", "T": bad})


@pytest.mark.parametrize(("cfg", "message"), [
    (3, "a schedule's settings must be a table, got 3"),
    ({"kind": ["x"]}, r"unknown schedule kind \['x'\]"),
    ({"kind": "linear", "beta_end": "x"}, "schedule beta_end must be a finite number, got 'x'"),
    ({"kind": "cosine", "s": "x"}, "schedule s must be a finite number, got 'x'"),
    ({"kind": "custom", "betas": "abc"}, "schedule betas must be a list of numbers, got 'abc'"),
    ({"kind": "custom", "betas": [0.1, None]}, r"schedule betas must be a list of numbers, got \[0.1, None\]"),
])
def test_a_damaged_schedule_config_is_one_line_naming_the_setting(cfg, message):
    with pytest.raises(ValueError, match=message):
        Schedule.from_config(cfg)


def test_diffusers_trained_betas_are_the_schedules_betas():
    betas = torch.linspace(0.001, 0.05, 20, dtype=torch.float64) ** 1.5
    s = Schedule.from_diffusers_config({"num_train_timesteps": 20, "trained_betas": betas.tolist()})
    torch.testing.assert_close(s.betas, betas)
    assert s.T == 20


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_noise_coefficients_are_those_of_float32_rounded_once(dtype):
    """1 - abar_t of the first steps rounds to 0 in half precision: computed there, the forward process
    added no noise at t = 0 and the score divided by 0."""
    s = Schedule.linear(1000)
    t = torch.arange(12)
    like = torch.zeros(12, 1, dtype=dtype)
    for got, want in zip(s.coefs(t, like), s.coefs(t, like.float())):
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    x0, eps = torch.zeros(12, 1, dtype=dtype), torch.ones(12, 1, dtype=dtype)
    noised = s.add_noise(x0, eps, t)
    assert noised.dtype == dtype and bool((noised > 0).all())
    torch.testing.assert_close(noised.float(), (1 - s.abar[:12]).sqrt().float()[:, None], rtol=1e-2, atol=0)
