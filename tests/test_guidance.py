"""Guidance methods: DSG's sphere, each base method's update against its equation, the analytic
oracle (Gaussian prior + linear Gaussian measurement), and runs on diffusers and condiff UNets."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from condiff import readback, sample
from condiff.denoiser import GaussianDenoiser, NetDenoiser
from condiff.guidance import (
    DPS,
    DSG,
    METHODS,
    UGD,
    FreeDoM,
    SphericalStep,
    default_hyperparameters,
    guided_sample,
    make_guidance,
)
from condiff.guidance.ugd import forward_kappa
from condiff.operators import Inpainting
from condiff.sample import make_step
from condiff.schedule import Schedule


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _oracle(T=1000):
    return GaussianDenoiser(Schedule.linear(T), mean=0.0, std=1.0)


def _step(den, x, t=600, t_prev=580, eta=1.0, seed=0, noise=None):
    """A step record at x (tracking gradients), as the sampler loop builds it."""
    B = x.shape[0]
    x_t = x.clone().requires_grad_(True)
    tt = torch.full((B,), t, dtype=torch.long)
    tp = torch.full((B,), t_prev, dtype=torch.long)
    return make_step(den, x_t, 0, tt, tp, eta, _gen(seed), noise=noise)


def _half_mask_loss(B, value=1.0, sigma_y=0.1):
    """Observe the top half of 4x4 images at `value`: a linear Gaussian measurement."""
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    op = Inpainting(mask, sigma_y=sigma_y)
    return op, op.loss(mask * torch.full((B, 1, 4, 4), value))


def _norm(x):
    return x.flatten(1).norm(dim=1)


# --- DSG's spherical step ------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.7, 1.0])
def test_dsg_step_lands_on_the_sphere(rate):
    den = _oracle()
    step = _step(den, torch.randn(5, 3, 4, 4, generator=_gen()))
    g = torch.randn(5, 3, 4, 4, generator=_gen(1))
    x = SphericalStep(rate)(step, g, 1.0)
    r = math.sqrt(48) * step.sigma
    assert step.sigma > 0.05
    torch.testing.assert_close(_norm(x - step.mean), torch.full((5,), r), rtol=1e-5, atol=0)


def test_dsg_rate_one_is_the_closed_form():
    den = _oracle()
    step = _step(den, torch.randn(4, 1, 4, 4, generator=_gen()))
    g = torch.randn(4, 1, 4, 4, generator=_gen(1))
    r = math.sqrt(16) * step.sigma
    expect = step.mean - r * g / _norm(g).view(-1, 1, 1, 1)
    torch.testing.assert_close(SphericalStep(1.0)(step, g, 123.0), expect)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_dsg_where_the_loss_is_flat_steps_in_the_sampling_direction(rate):
    """A zero gradient (a constraint met exactly) has no descent direction; every rate, 1 included,
    then takes the unconditional direction onto the sphere, mean + r z / ||z||, not the mean itself.
    Rows with a gradient are unaffected."""
    den = _oracle()
    step = _step(den, torch.randn(4, 1, 4, 4, generator=_gen()))
    g = torch.randn(4, 1, 4, 4, generator=_gen(1))
    g[:2] = 0
    out = SphericalStep(rate)(step, g, 1.0)
    r = 4.0 * step.sigma
    u = step.noise / _norm(step.noise).view(-1, 1, 1, 1)
    torch.testing.assert_close(out[:2], (step.mean + r * u)[:2])
    d = step.sigma * step.noise + rate * (-r * g / _norm(g).view(-1, 1, 1, 1) - step.sigma * step.noise)
    torch.testing.assert_close(out[2:], (step.mean + r * d / _norm(d).view(-1, 1, 1, 1))[2:])


def test_dsg_intermediate_rates_mix_the_directions_then_rescale():
    """0 < w < 1: d_m = sigma z + w (-r g/||g|| - sigma z), x = mean + r d_m/||d_m|| (METHODS.md, section 4);
    a (B,) tensor of rates applies row by row."""
    den = _oracle()
    step = _step(den, torch.randn(4, 1, 4, 4, generator=_gen()))
    g = torch.randn(4, 1, 4, 4, generator=_gen(1))
    r = 4.0 * step.sigma
    w = torch.tensor([0.0, 0.2, 0.7, 1.0])
    d = step.sigma * step.noise + w.view(-1, 1, 1, 1) * (-r * g / _norm(g).view(-1, 1, 1, 1) - step.sigma * step.noise)
    expect = step.mean + r * d / _norm(d).view(-1, 1, 1, 1)
    torch.testing.assert_close(SphericalStep(w)(step, g, 1.0), expect)
    for i, wi in enumerate(w.tolist()):
        torch.testing.assert_close(SphericalStep(wi)(step, g, 1.0)[i], expect[i])


def test_dsg_rate_zero_is_the_unconditional_step():
    """w = 0 ignores the gradient and takes the unconditional direction, rescaled onto the sphere;
    when the noise already has norm sqrt(n) that is exactly the unconditional draw mean + sigma z."""
    den = _oracle()
    x = torch.randn(4, 1, 4, 4, generator=_gen())
    z = torch.randn(4, 1, 4, 4, generator=_gen(2))
    z = z / _norm(z).view(-1, 1, 1, 1) * 4.0  # ||z|| = sqrt(16)
    step = _step(den, x, noise=z)
    for seed in (1, 3):
        g = torch.randn(4, 1, 4, 4, generator=_gen(seed))
        torch.testing.assert_close(SphericalStep(0.0)(step, g, 1.0), step.sample())
    # generic noise: same direction as z, norm sqrt(n) sigma
    step = _step(den, x)
    out = SphericalStep(0.0)(step, torch.randn_like(x), 1.0)
    u = step.noise / _norm(step.noise).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, step.mean + 4.0 * step.sigma * u)


def test_dsg_plus_dps_takes_the_loss_gradient():
    """DSG(DPS) with w = 1 steps to mean - r g/||g|| with g = grad_{x_t} ||y - A x0_hat(x_t)||."""
    den = _oracle()
    x = torch.randn(3, 1, 4, 4, generator=_gen())
    op, loss = _half_mask_loss(3)
    out = DSG(DPS(loss), rate=1.0)(_step(den, x))
    ref = _step(den, x)
    (g,) = torch.autograd.grad(loss(ref.x0_hat).sum(), ref.x_t)
    expect = ref.mean - 4.0 * ref.sigma * g / _norm(g).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expect)


def test_dsg_refuses_a_deterministic_sampler():
    den = _oracle(200)
    op, loss = _half_mask_loss(2)
    with pytest.raises(ValueError, match="eta > 0"):
        guided_sample(den, DSG(DPS(loss)), (2, 1, 4, 4), 5, eta=0.0, generator=_gen())
    with pytest.raises(ValueError, match="stochastic sampler"):
        DSG(DPS(loss))(_step(den, torch.randn(2, 1, 4, 4), t=100, t_prev=80, eta=0.0))


def test_dsg_interval_guides_every_kth_step_only():
    den = _oracle(200)
    op, loss = _half_mask_loss(2)
    # 7 steps, i = 0..6; the last (t_prev = -1, sigma = 0) never needs a gradient
    for interval, expect in ((1, 6), (3, 2), (10, 1)):
        g = DSG(DPS(loss), rate=0.3, interval=interval)
        res = guided_sample(den, g, (2, 1, 4, 4), 7, generator=_gen())
        assert res.grad_evals == expect and res.nfe == 7


def test_dsg_between_base_runs_the_base_step_off_the_interval():
    """between = "base": off the interval the step is the base method's own (DPS: the unconditional
    draw minus zeta g, same noise), on it the spherical step; every step then costs a gradient.
    between = "sample" (the default) draws the off-interval steps unconditionally."""
    den = _oracle(200)
    x = torch.randn(3, 1, 4, 4, generator=_gen())
    op, loss = _half_mask_loss(3)

    def at(i):  # the same step record with step index i (the loop's counter)
        s = _step(den, x, t=100, t_prev=80)
        return dataclasses.replace(s, i=i)

    hyb = DSG(DPS(loss, zeta=0.7), rate=0.4, interval=3, between="base")
    torch.testing.assert_close(hyb(at(1)), DPS(loss, zeta=0.7)(at(1)))
    torch.testing.assert_close(DSG(DPS(loss, zeta=0.7), rate=0.4, interval=3)(at(1)), at(1).sample())
    torch.testing.assert_close(hyb(at(3)), DSG(DPS(loss), rate=0.4, interval=3)(at(3)))
    plain = guided_sample(den, DSG(DPS(loss), rate=0.3, interval=3), (3, 1, 4, 4), 7, generator=_gen())
    both = guided_sample(den, DSG(DPS(loss), rate=0.3, interval=3, between="base"), (3, 1, 4, 4), 7,
                         generator=_gen())
    assert (plain.grad_evals, both.grad_evals) == (2, 6)
    assert hyb.hyperparameters()["between"] == "base" and "between" not in DSG(DPS(loss)).hyperparameters()
    assert "between=base" in hyb.describe()


def test_dsg_final_step_is_a_euclidean_step_of_size_final():
    """At the last step (t_prev = -1, sigma = 0) DSG returns the mean; with `final` it returns
    mean - final * g, g the base's gradient there, at one more gradient evaluation; earlier steps
    are unchanged. final = 0 is exactly the paper's DSG."""
    den = _oracle(200)
    x = torch.randn(3, 1, 4, 4, generator=_gen())
    op, loss = _half_mask_loss(3)
    last = _step(den, x, t=10, t_prev=-1)
    assert last.sigma == 0
    (g,) = torch.autograd.grad(loss(last.x0_hat).sum(), last.x_t)
    torch.testing.assert_close(DSG(DPS(loss), final=0.0)(_step(den, x, t=10, t_prev=-1)), last.mean)
    torch.testing.assert_close(DSG(DPS(loss), final=0.8)(_step(den, x, t=10, t_prev=-1)), last.mean - 0.8 * g)
    per = torch.tensor([0.0, 0.8, 2.0])  # per-sample values, as the sweep batches them
    torch.testing.assert_close(DSG(DPS(loss), final=per)(_step(den, x, t=10, t_prev=-1)),
                               last.mean - per.view(-1, 1, 1, 1) * g)
    mid = DSG(DPS(loss), rate=0.4, final=0.8)(_step(den, x, t=100, t_prev=80))
    torch.testing.assert_close(mid, DSG(DPS(loss), rate=0.4)(_step(den, x, t=100, t_prev=80)))
    plain = guided_sample(den, DSG(DPS(loss), rate=0.3), (3, 1, 4, 4), 7, generator=_gen())
    ext = guided_sample(den, DSG(DPS(loss), rate=0.3, final=0.5), (3, 1, 4, 4), 7, generator=_gen())
    assert (plain.grad_evals, ext.grad_evals) == (6, 7)
    assert DSG(DPS(loss), final=0.5).hyperparameters()["final"] == 0.5
    assert "final" not in DSG(DPS(loss)).hyperparameters()
    with pytest.raises(ValueError, match="DSG final must lie in"):
        DSG(DPS(loss), final=-1.0)


def test_dsg_composes_without_changing_the_base_cost():
    """FreeDoM's time travel and UGD's self-recurrence run inside DSG exactly as without it; only the
    final step differs: its sphere is a point (sigma = 0), so DSG returns the mean there without a
    gradient (and without UGD's repeat of that step)."""
    den = _oracle(200)
    op, loss = _half_mask_loss(2)
    cases = ((lambda: FreeDoM(loss, repeats=3, travel=(0.3, 0.7)), 1), (lambda: UGD(loss, recurrence=2), 2))
    for base, final_evals in cases:
        plain = guided_sample(den, base(), (2, 1, 4, 4), 10, generator=_gen())
        dsg = guided_sample(den, DSG(base()), (2, 1, 4, 4), 10, generator=_gen())
        assert plain.nfe > 10 and plain.grad_evals == plain.nfe
        assert dsg.nfe == plain.nfe - (final_evals - 1)
        assert dsg.grad_evals == plain.grad_evals - final_evals


# --- the base methods' updates -------------------------------------------------------------------


def test_dps_step_is_the_unconditional_draw_minus_zeta_grad():
    den = _oracle()
    x = torch.randn(3, 1, 4, 4, generator=_gen())
    op, loss = _half_mask_loss(3)
    out = DPS(loss, zeta=0.7)(_step(den, x))
    ref = _step(den, x)
    (g,) = torch.autograd.grad(loss(ref.x0_hat).sum(), ref.x_t)
    torch.testing.assert_close(out, ref.sample() - 0.7 * g)


def test_freedom_step_size_and_time_travel_count():
    den = _oracle()
    x = torch.randn(3, 1, 4, 4, generator=_gen())
    op, loss = _half_mask_loss(3)
    out = FreeDoM(loss, zeta=0.7, repeats=1)(_step(den, x))
    ref = _step(den, x)
    (g,) = torch.autograd.grad(loss(ref.x0_hat).sum(), ref.x_t)
    torch.testing.assert_close(out, ref.sample() - 0.7 * math.sqrt(ref.abar_t) * g)
    # time travel: r evaluations at each step whose t lies in [lo T, hi T]
    f = FreeDoM(loss, repeats=3, travel=(0.4, 0.6))
    res = guided_sample(den, f, (3, 1, 4, 4), 20, generator=_gen())
    ts = den.schedule.timesteps(20)
    inside = int(((ts >= 400) & (ts <= 600)).sum())
    assert inside > 0 and res.nfe == 20 + 2 * inside and res.grad_evals == res.nfe


def test_ugd_forward_guidance_is_the_eps_shift():
    """eps' = eps + s sqrt(1 - abar_t) g, rebuilt through Step.with_eps, equals UGD's gradient step."""
    den = _oracle()
    x = torch.randn(3, 1, 4, 4, generator=_gen())
    op, loss = _half_mask_loss(3)
    for eta in (0.0, 1.0):
        out = UGD(loss, forward=2.5, backward_steps=0, recurrence=1)(_step(den, x, eta=eta))
        ref = _step(den, x, eta=eta)
        (g,) = torch.autograd.grad(loss(ref.x0_hat).sum(), ref.x_t)
        expect = ref.with_eps(ref.eps_hat + 2.5 * math.sqrt(1 - ref.abar_t) * g).sample()
        torch.testing.assert_close(out, expect)
        assert forward_kappa(ref) > 0


def test_ugd_backward_guidance_fits_the_measurement_and_recurrence_costs():
    den = _oracle()
    op, loss = _half_mask_loss(3)
    x0 = torch.randn(3, 1, 4, 4, generator=_gen())
    u = UGD(loss, backward_steps=5, backward_lr=0.2)
    fitted = u.backward(x0)
    # the loss ||y - A x|| has the unit gradient -A^T r / ||r||: each of the 5 steps of 0.2 moves x
    # by 0.2 along the residual r = y - A x0 and shortens it by exactly 0.2 (while ||r|| > 1)
    r = op.mask * (1.0 - x0)
    assert bool((loss(x0) > 1.5).all())
    torch.testing.assert_close(loss(fitted), loss(x0) - 1.0)
    torch.testing.assert_close(fitted, x0 + r / _norm(r).view(-1, 1, 1, 1))
    # only measured pixels move (the loss gradient lives on the mask)
    torch.testing.assert_close(fitted[..., 2:, :], x0[..., 2:, :])
    res = guided_sample(den, UGD(loss, recurrence=3, backward_steps=2), (3, 1, 4, 4), 8, generator=_gen())
    assert res.nfe == 24 and res.grad_evals == 24


def test_per_sample_hyperparameters_match_separate_runs():
    """A (B,) tensor of zetas gives each sample the run it would get alone (a grid can run in one batch)."""
    den = _oracle(200)
    op, loss = _half_mask_loss(4)
    runs = {z: guided_sample(den, DPS(loss, zeta=z), (4, 1, 4, 4), 6, generator=_gen()).x for z in (0.3, 2.0)}
    mixed = guided_sample(den, DPS(loss, zeta=torch.tensor([0.3, 2.0, 0.3, 2.0])), (4, 1, 4, 4), 6,
                          generator=_gen()).x
    torch.testing.assert_close(mixed[0::2], runs[0.3][0::2])
    torch.testing.assert_close(mixed[1::2], runs[2.0][1::2])
    rates = torch.tensor([0.1, 0.9, 0.1, 0.9])
    mixed = guided_sample(den, DSG(DPS(loss), rate=rates), (4, 1, 4, 4), 6, generator=_gen()).x
    alone = guided_sample(den, DSG(DPS(loss), rate=0.9), (4, 1, 4, 4), 6, generator=_gen()).x
    torch.testing.assert_close(mixed[1::2], alone[1::2])


# --- analytic oracle: Gaussian prior, linear Gaussian measurement --------------------------------


@pytest.mark.parametrize("method, hp", [
    ("dps", {"zeta": 0.5}), ("dsg+dps", {"rate": 0.3}), ("freedom", {"zeta": 0.5}),
    ("dsg+freedom", {"rate": 0.3}), ("ugd", {"forward": 20.0, "backward_steps": 2, "backward_lr": 0.2}),
    ("dsg+ugd", {"rate": 0.3}),
])
def test_oracle_moves_mean_to_the_posterior_mean(method, hp):
    """x0 ~ N(0, I) in 16 dims, the top 8 pixels observed at y = 1 with sigma_y = 0.1.

    Exact posterior: observed pixels N(1/(1 + 0.01), ~0.1^2), unobserved pixels N(0, 1) (the prior
    factorises). Guided sampling is approximate, so we ask for what it promises: the observed mean
    moves from the prior mean 0 to within 0.1 of the posterior mean 0.990 (90% of the way; the
    samplers land within 0.02 at these settings), and the unobserved mean stays at 0 within 0.05
    (8000 values of std <= 1: 4.5 standard errors).
    """
    den = _oracle()
    B = 1000
    op, loss = _half_mask_loss(B)
    res = guided_sample(den, make_guidance(method, loss, **hp), (B, 1, 4, 4), 50, generator=_gen(),
                        clip_x0=None)
    post = 1.0 / (1.0 + 0.1**2)
    obs, hidden = res.x[..., :2, :], res.x[..., 2:, :]
    assert abs(float(obs.mean()) - post) < 0.1
    assert abs(float(hidden.mean())) < 0.05
    # and the guided draws are concentrated around the measurement (prior std is 1), while the
    # unobserved pixels keep the prior's spread (the posterior factorises: std 1 there)
    assert float(obs.std()) < 0.6
    assert 0.75 < float(hidden.std()) < 1.1


def test_classifier_loss_drives_guidance():
    """Any differentiable x -> (B,) works as the loss: -log p(class 1 | x) of a fixed logistic model
    pulls samples toward the class-1 half-space (unguided, half the samples are there)."""
    den = _oracle(200)
    w = torch.randn(1, 16, generator=_gen(5))

    def neg_log_p1(x):
        logit = x.flatten(1) @ w.T
        return torch.nn.functional.softplus(-logit).squeeze(1)  # -log sigmoid(logit)

    B = 400
    free = guided_sample(den, DPS(neg_log_p1, zeta=0.0), (B, 1, 4, 4), 20, generator=_gen()).x
    guided = guided_sample(den, DSG(DPS(neg_log_p1), rate=0.3), (B, 1, 4, 4), 20, generator=_gen()).x
    frac = lambda x: float(((x.flatten(1) @ w.T) > 0).double().mean())
    # binomial SE at p = 0.5, n = 400 is 0.025: 0.5 +- 0.1 is 4 SE; guidance must reach 0.9
    assert abs(frac(free) - 0.5) < 0.1 and frac(guided) > 0.9


# --- real networks: a condiff UNet and a diffusers UNet2DModel -----------------------------------


def _condiff_unet():
    from condiff.nets import build_net

    torch.manual_seed(0)
    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1, 2], "groups": 4})
    return NetDenoiser(net.eval(), Schedule.linear(100))


@pytest.mark.parametrize("backend", ["condiff", "diffusers"])
def test_every_method_runs_on_real_unets(backend, request):
    den = _condiff_unet() if backend == "condiff" else request.getfixturevalue("tiny_diffusers_denoiser")
    shape = (2, 1, 8, 8)
    op = Inpainting.random(shape, 0.5, _gen())
    y = op.measure(torch.zeros(shape).uniform_(-1, 1, generator=_gen(1)), _gen(2))
    free = guided_sample(den, DPS(op.loss(y), zeta=0.0), shape, 4, generator=_gen(3)).x
    for method in METHODS:
        hp = default_hyperparameters(method)
        hp.update({"repeats": 2, "travel": (0.0, 1.0)} if "freedom" in method else {})
        res = guided_sample(den, make_guidance(method, op.loss(y), **hp), shape, 4, generator=_gen(3))
        assert res.x.shape == shape and bool(torch.isfinite(res.x).all()), method
        # 4 steps of one network call each, twice over with FreeDoM's 2 repeats and UGD's recurrence 2;
        # the DSG versions leave the last step (t = 0) unguided: one call, no gradient
        per_step = 2 if ("freedom" in method or "ugd" in method) else 1
        last = (1, 0) if method.startswith("dsg+") else (per_step, per_step)
        assert (res.nfe, res.grad_evals) == (3 * per_step + last[0], 3 * per_step + last[1]), method
        assert not torch.allclose(res.x, free), method  # the guidance acted
        assert not res.x.requires_grad


# --- construction errors -------------------------------------------------------------------------


@pytest.mark.parametrize("build, match", [
    (lambda loss: make_guidance("dps2", loss), "unknown guidance method 'dps2'"),
    (lambda loss: make_guidance("dps", loss, rate=0.2), "applies to DSG only; use method .dsg\\+dps."),
    (lambda loss: make_guidance("dsg+dps", loss, bogus=1),
     "bad hyperparameters for 'dsg\\+dps': .*; it takes zeta, rate, interval, final, between"),
    # the base's step length under DSG's own step: accepted, recorded, and without effect
    (lambda loss: make_guidance("dsg+dps", loss, zeta=100.0), "zeta does not apply to 'dsg\\+dps': DSG's step "),
    (lambda loss: make_guidance("dsg+freedom", loss, zeta=2.0, between="base"), "zeta does not apply"),
    (lambda loss: make_guidance("dsg+ugd", loss, forward=5.0, interval=3), "forward does not apply to 'dsg\\+ugd'"),
    (lambda loss: DSG(DPS(loss), rate=1.5), r"DSG rate must lie in \[0, 1\]"),
    (lambda loss: DSG(DPS(loss), interval=0), "interval must be an integer >= 1"),
    (lambda loss: DSG(DPS(loss), between="dps"), "DSG between must be one of"),
    (lambda loss: DSG(lambda s: s.mean), "wraps a gradient-guidance method"),
    (lambda loss: DPS(loss, zeta=-1.0), r"DPS zeta must lie in \[0, inf\]"),
    (lambda loss: FreeDoM(loss, repeats=0), "repeats must be an integer >= 1"),
    (lambda loss: FreeDoM(loss, travel=(0.8, 0.2)), "0 <= lo <= hi <= 1"),
    (lambda loss: UGD(loss, recurrence=0), "recurrence must be an integer >= 1"),
    (lambda loss: DPS("not a loss"), "loss must be a callable"),
    (lambda loss: default_hyperparameters("dsg+xyz"), "unknown guidance method"),
    (lambda loss: UGD(loss, backward_steps=True), "UGD backward_steps must be an integer >= 0, got True"),
    (lambda loss: UGD(loss, recurrence=2.5), "UGD recurrence must be an integer >= 1, got 2.5"),
    (lambda loss: UGD(loss, recurrence=0), "UGD recurrence must be an integer >= 1, got 0"),
])
def test_bad_settings_are_clear_errors(build, match):
    op, loss = _half_mask_loss(2)
    with pytest.raises(ValueError, match=match):
        build(loss)


def test_loss_of_wrong_shape_is_a_clear_error():
    den = _oracle(200)
    for loss, got in ((lambda x: x.sum(), r"shape \(\)"), (lambda x: 0.0, "a float")):
        with pytest.raises(ValueError, match=r"one value per sample, a tensor of shape \(2,\), got " + got):
            guided_sample(den, DPS(loss), (2, 1, 4, 4), 3, generator=_gen())


def test_non_finite_loss_is_a_clear_error_not_nan_samples():
    den = _oracle(200)

    def blows_up(x):  # finite for small x0_hat, overflows for large ones (like a stepped PDE)
        return torch.exp(200 * x.abs()).flatten(1).sum(1)

    with pytest.raises(FloatingPointError, match=r"not finite for 2 of 2 samples at t = .*clip_x0"):
        guided_sample(den, DPS(blows_up), (2, 1, 4, 4), 3, generator=_gen())
    # the same loss on a bounded x0_hat is finite: the sampler's clip_x0 is the remedy the error names
    x = guided_sample(den, DPS(blows_up, zeta=1e-30), (2, 1, 4, 4), 3, generator=_gen(), clip_x0=0.1)
    assert torch.isfinite(x.x).all()
    # the default clip (1) is named with the other remedies; without a clip, the clip is the remedy
    with pytest.raises(FloatingPointError, match=r"x0_hat is clipped to \[-1, 1\]: clip tighter \(clip_x0\), "
                                                 r"lower the guidance step size \(zeta; under DSG, rate or final\)"):
        guided_sample(den, DPS(blows_up), (2, 1, 4, 4), 3, generator=_gen())
    with pytest.raises(FloatingPointError, match=r"\): bound x0_hat with clip_x0, or make the loss finite there"):
        guided_sample(den, DPS(blows_up), (2, 1, 4, 4), 3, generator=_gen(), clip_x0=None)


class _LateNaN:
    """A loss that turns NaN for the first sample from its ``bad_from``-th call on (the second sample's
    loss stays finite), and, with ``strict``, raises on NaN input as a user's loss might."""

    def __init__(self, bad_from: int, strict: bool = False) -> None:
        self.calls, self.bad_from, self.strict = 0, bad_from, strict

    def __call__(self, x):
        if self.strict and not bool(torch.isfinite(x).all()):
            raise ValueError("this loss saw NaN")
        self.calls += 1
        v = x.pow(2).flatten(1).sum(1)
        if self.calls >= self.bad_from:
            v = v * torch.tensor([float("nan")] + [1.0] * (len(v) - 1))  # (a where() would NaN every gradient)
        return v


# each method with the number of loss calls it makes per step (None: not the same at every step)
GUIDED = {"DPS": (lambda loss: DPS(loss, zeta=0.1), 1),
          "DSG+DPS": (lambda loss: DSG(DPS(loss, zeta=0.1), rate=0.2), 1),
          "FreeDoM": (lambda loss: FreeDoM(loss, zeta=0.1, travel=(0.0, 1.0)), 2),
          "UGD": (lambda loss: UGD(loss, forward=0.1, backward_steps=0, recurrence=2), 2),
          "UGD backward": (lambda loss: UGD(loss, forward=0.1, backward_steps=2, recurrence=2), 6),
          "DSG every 3rd, base between": (lambda loss: DSG(DPS(loss, zeta=0.1), rate=0.2, interval=3,
                                                           between="base"), 1),
          "DSG every 3rd": (lambda loss: DSG(DPS(loss, zeta=0.1), rate=0.2, interval=3), None)}


def _square(x):
    return x.pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("method", list(GUIDED))
def test_guidance_checks_kept_on_the_device_report_what_checks_at_once_report(monkeypatch, method):
    make, per_step = GUIDED[method]
    den, ts = _oracle(200), Schedule.linear(200).timesteps(12)
    outcomes = {}
    for every in (1, 5, 50):  # 5, 50: the GPU's way (checks kept on the device, read in blocks or at the end)
        monkeypatch.setitem(readback.READ_EVERY, "cpu", every)
        guide = make(_LateNaN(bad_from=4))
        for clip in (1.0, None):
            with pytest.raises(FloatingPointError) as err:
                guided_sample(den, guide, (2, 1, 4, 4), 12, generator=_gen(), clip_x0=clip)
            guide.loss.calls = 0
            outcomes[every, clip] = str(err.value)
        outcomes[every] = guided_sample(den, make(_square), (2, 1, 4, 4), 12, generator=_gen()).x
    for clip in (1.0, None):  # the same step, sample count and x0_hat range, and the same remedy
        assert outcomes[1, clip] == outcomes[5, clip] == outcomes[50, clip]
    bad_t = int(ts[(4 - 1) // per_step]) if per_step else int(ts[9])  # DSG every 3rd: steps 0, 3, 6, 9
    assert f"not finite for 1 of 2 samples at t = {bad_t} (x0_hat in [" in outcomes[1, 1.0]
    for every in (5, 50):  # finite runs are the same either way
        torch.testing.assert_close(outcomes[1], outcomes[every], rtol=0, atol=0)


@pytest.mark.parametrize("every", [1, 5, 50])
def test_a_later_error_on_the_nan_samples_does_not_hide_the_bad_guidance_step(monkeypatch, every):
    monkeypatch.setitem(readback.READ_EVERY, "cpu", every)
    den, ts = _oracle(200), Schedule.linear(200).timesteps(12)
    with pytest.raises(FloatingPointError, match=f"at t = {int(ts[3])} ") as err:
        guided_sample(den, DPS(_LateNaN(bad_from=4, strict=True), zeta=0.1), (2, 1, 4, 4), 12, generator=_gen())
    if every > 1:  # the sampler went on with NaN samples until the loss refused them; the cause comes first
        assert isinstance(err.value.__cause__, ValueError) and "saw NaN" in str(err.value.__cause__)


@pytest.mark.parametrize("every", [1, 50])
def test_ugd_backward_guidance_gradients_are_checked_at_their_own_step(monkeypatch, every):
    monkeypatch.setitem(readback.READ_EVERY, "cpu", every)
    den, ts = _oracle(200), Schedule.linear(200).timesteps(6)
    # per step: the outer gradient (loss call 1), then one backward step (call 2), which goes bad
    guide = UGD(_LateNaN(bad_from=2), forward=0.1, backward_steps=1, recurrence=1)
    with pytest.raises(FloatingPointError, match=rf"gradient in backward guidance is not finite for 1 of 2 samples "
                                                 rf"at t = {int(ts[0])} .*step size \(forward or backward_lr; "
                                                 rf"under DSG, rate or final\)"):
        guided_sample(den, guide, (2, 1, 4, 4), 6, generator=_gen())


def test_dsg_final_step_checks_agree_on_both_read_paths(monkeypatch):
    den, ts = _oracle(200), Schedule.linear(200).timesteps(6)
    messages = []
    for every in (1, 50):
        monkeypatch.setitem(readback.READ_EVERY, "cpu", every)
        with pytest.raises(FloatingPointError) as err:  # the 6th call is the last step's, DSG's final one
            guided_sample(den, DSG(DPS(_LateNaN(bad_from=6), zeta=0.1), final=0.5), (2, 1, 4, 4), 6, generator=_gen())
        messages.append(str(err.value))
    assert messages[0] == messages[1] and f"at t = {int(ts[-1])} " in messages[0]


def test_kept_checks_are_read_in_steps_not_gradients(monkeypatch):
    reads = []
    real = readback.DeviceRows.read
    monkeypatch.setattr(readback.DeviceRows, "read", lambda self: reads.append(len(self.unread)) or real(self))
    monkeypatch.setitem(readback.READ_EVERY, "cpu", 5)
    # FreeDoM here takes 2 gradients a step, and the sampler checks its output: 3 rows a step, the 12 steps read
    # after steps 5 and 10 and at the end
    guided_sample(_oracle(200), FreeDoM(_square, zeta=0.1, travel=(0.0, 1.0)), (2, 1, 4, 4), 12, generator=_gen())
    assert reads == [15, 15, 6]


def test_a_cpu_run_inside_a_run_that_keeps_its_checks_checks_its_own_steps(monkeypatch):
    monkeypatch.setitem(readback.READ_EVERY, "cpu", 50)  # the outer run stands in for a GPU run
    den, inner = _oracle(200), []

    def evaluate(step):  # a callback that samples on its own (a CPU evaluation, say) with a bad loss
        if step.i == 2:
            with monkeypatch.context() as m:
                m.setitem(readback.READ_EVERY, "cpu", 1)
                with pytest.raises(FloatingPointError, match="at t = 199 "):
                    guided_sample(den, DPS(_LateNaN(bad_from=1)), (2, 1, 4, 4), 3, generator=_gen())
            inner.append(True)

    sample.ddim(den, torch.randn(2, 1, 4, 4), Schedule.linear(200).timesteps(6), eta=1.0, generator=_gen(),
                guidance=DPS(_square, zeta=0.1), callback=evaluate)  # and the outer run is not blamed
    assert inner == [True]


def test_a_failure_before_the_loop_leaves_no_checks_behind(monkeypatch):
    monkeypatch.setitem(readback.READ_EVERY, "cpu", 50)

    def broken_bar(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sample, "progress_bar", broken_bar)
        with pytest.raises(KeyboardInterrupt):
            guided_sample(_oracle(200), DPS(_square), (2, 1, 4, 4), 3, generator=_gen())
    assert sample.kept_checks() is None
    monkeypatch.setitem(readback.READ_EVERY, "cpu", 1)  # a later CPU run checks at once again
    with pytest.raises(FloatingPointError):
        guided_sample(_oracle(200), DPS(_LateNaN(bad_from=1)), (2, 1, 4, 4), 3, generator=_gen())


def test_kept_checks_are_read_inside_wrappers_and_not_outside_a_run(monkeypatch):
    monkeypatch.setitem(readback.READ_EVERY, "cpu", 50)
    den = _oracle(200)

    class Wrapper:  # a user's rule around a built-in one, with no hook for the sampler to call
        needs_grad = True

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, step):
            return self.inner(step)

    with pytest.raises(FloatingPointError, match="not finite for 1 of 2 samples"):
        guided_sample(den, Wrapper(DPS(_LateNaN(bad_from=4), zeta=0.1)), (2, 1, 4, 4), 12, generator=_gen())
    # outside a sampler run nothing would read a kept check later: a bad gradient raises at once
    with pytest.raises(FloatingPointError, match="not finite for 1 of 2 samples at t = 600"):
        DPS(_LateNaN(bad_from=1)).gradient(_step(_oracle(), torch.randn(2, 1, 4, 4)))


def test_an_interrupted_runs_checks_do_not_reach_the_next_run(monkeypatch):
    monkeypatch.setitem(readback.READ_EVERY, "cpu", 50)
    den, loss = _oracle(200), _LateNaN(bad_from=1)
    guide = DPS(loss, zeta=0.1)

    def stop(step):
        if step.i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is passed on as it is, the bad steps unread
        sample.ddim(den, torch.randn(2, 1, 4, 4), Schedule.linear(200).timesteps(12), eta=1.0,
                    generator=_gen(), guidance=guide, callback=stop)
    loss.bad_from = 10**9  # the same rule, now finite: its next run is not blamed for the old steps
    assert torch.isfinite(guided_sample(den, guide, (2, 1, 4, 4), 12, generator=_gen()).x).all()
    assert sample.kept_checks() is None


def test_a_subclass_that_skips_the_base_init_still_samples():
    class Mine(DPS):
        def __init__(self, loss):  # sets what the base's init would, without calling it
            self.loss, self.grad_evals, self.zeta = loss, 0, 0.1

    x = guided_sample(_oracle(200), Mine(_square), (2, 1, 4, 4), 5, generator=_gen()).x
    torch.testing.assert_close(x, guided_sample(_oracle(200), DPS(_square, zeta=0.1), (2, 1, 4, 4), 5,
                                                generator=_gen()).x, rtol=0, atol=0)


def test_make_guidance_wants_a_method_name():
    from condiff.guidance import make_guidance

    with pytest.raises(ValueError, match="guidance method must be a name"):
        make_guidance(None, lambda x: x.sum())


def test_dsg_takes_the_base_step_length_only_where_the_base_steps():
    """zeta sizes DPS's step between DSG's (between = "base", interval >= 2), and nowhere else."""
    from condiff.guidance import make_guidance

    def run(zeta):
        g = make_guidance("dsg+dps", _square, zeta=zeta, interval=2, between="base")
        return guided_sample(_oracle(200), g, (2, 1, 4, 4), 6, generator=_gen()).x

    assert not torch.equal(run(0.0), run(0.5))
    # the DSG steps alone (interval 1) ignore the base's length: the same samples for any zeta
    same = [guided_sample(_oracle(200), DSG(DPS(_square, zeta=z)), (2, 1, 4, 4), 6, generator=_gen()).x
            for z in (0.0, 100.0)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


def test_a_detached_loss_or_a_hyperparameter_of_another_batch_is_a_clear_error():
    den = _oracle(200)
    _, loss = _half_mask_loss(2)
    with pytest.raises(ValueError, match="the guidance loss must be differentiable in x0_hat: no gradient "
                                         "reaches x0_hat"):
        guided_sample(den, DPS(lambda x: loss(x).detach(), zeta=0.5), (2, 1, 4, 4), 4, generator=_gen())
    for rule in (DPS(loss, zeta=torch.tensor([1.0, 2.0, 3.0])), DSG(DPS(loss), rate=torch.tensor([0.1, 0.2, 0.3]))):
        with pytest.raises(ValueError, match=r"must hold 1 value or one per sample \(2\), got 3"):
            guided_sample(den, rule, (2, 1, 4, 4), 4, generator=_gen())


def test_starting_noise_of_another_shape_is_refused():
    _, loss = _half_mask_loss(2)
    with pytest.raises(ValueError, match=r"x_T has shape \(2, 1, 4, 4\) but shape asks for \(5, 1, 4, 4\)"):
        guided_sample(_oracle(200), DPS(loss), (5, 1, 4, 4), 4, x_T=torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="x_T is on the meta device, which holds no values"):  # torch's error before
        guided_sample(_oracle(200), DPS(loss), (2, 1, 4, 4), 4, x_T=torch.randn(2, 1, 4, 4, device="meta"))


def test_hyperparameters_of_the_wrong_kind_are_refused():
    _, loss = _half_mask_loss(2)
    for build, match in [(lambda: DSG(DPS(loss), interval=True), "DSG interval must be an integer >= 1, got True"),
                         (lambda: FreeDoM(loss, repeats=True), "FreeDoM repeats must be an integer >= 1, got True"),
                         (lambda: FreeDoM(loss, travel=(0.1, 0.2, 0.3)), "FreeDoM travel must be \\(lo, hi\\)"),
                         (lambda: make_guidance("dps", loss, zeta="a"), "DPS zeta must be a number in .*got 'a'")]:
        with pytest.raises(ValueError, match=match):
            build()


class _Recorder(GaussianDenoiser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def predict_eps(self, x_t, t):
        self.calls.append((int(t[0]), x_t.detach().clone()))
        return super().predict_eps(x_t, t)


def test_freedom_time_travel_renoises_to_the_same_step():
    """A repeat re-diffuses x_{t_prev} to t: the second call at t sees sqrt(r) x_prev + sqrt(1 - r) z
    (r = abar_t / abar_prev, z the generator's first draw: x_T is given and eta = 0 draws nothing)."""
    den = _Recorder(Schedule.linear(100), mean=0.3, std=0.5)
    x_T = torch.randn(2, 1, 4, 4, generator=_gen(1))
    flat = FreeDoM(lambda x: 0.0 * x.flatten(1).sum(1), zeta=1.0, repeats=2, travel=(0.0, 1.0))
    guided_sample(den, flat, (2, 1, 4, 4), 2, eta=0.0, generator=_gen(2), x_T=x_T, clip_x0=None)
    (t0, a), (t1, b) = den.calls[:2]
    assert t0 == t1 == 99 and torch.equal(a, x_T)
    ts = den.schedule.timesteps(2)
    st = make_step(GaussianDenoiser(Schedule.linear(100), mean=0.3, std=0.5), x_T, 0, ts[:1].expand(2),
                   ts[1:].expand(2), 0.0, None)
    r = float(den.schedule.abar[99] / den.schedule.abar[int(ts[1])])
    z = torch.randn(2, 1, 4, 4, generator=_gen(2))
    torch.testing.assert_close(b, math.sqrt(r) * st.mean + math.sqrt(1 - r) * z)


def test_evaluation_counts_are_per_call_when_a_guidance_is_reused():
    den, loss = _oracle(100), _half_mask_loss(2)[1]
    dps = DPS(loss, zeta=0.5)
    for _ in range(2):
        res = guided_sample(den, dps, (2, 1, 4, 4), 5, generator=_gen())
        assert (res.nfe, res.grad_evals) == (5, 5)


def test_ugd_takes_whole_numbers_in_any_integral_form():
    ugd = UGD(lambda x: x.flatten(1).sum(1), backward_steps=np.int64(3), recurrence=2.0)
    assert (ugd.backward_steps, ugd.recurrence) == (3, 2) and type(ugd.recurrence) is int


class _GradSpy:
    """A denoiser that records, per call, whether autograd was recording (a graph being built)."""

    def __init__(self, den):
        self.den, self.recording = den, []

    def __getattr__(self, name):
        return getattr(self.den, name)

    def eps(self, x, t, y=None):
        self.recording.append(torch.is_grad_enabled() and x.requires_grad)
        return self.den.eps(x, t, y) if y is not None else self.den.eps(x, t)


@pytest.mark.parametrize("interval, final, between", [(3, 0.0, "sample"), (3, 0.5, "sample"), (1, 0.0, "sample"),
                                                      (3, 0.0, "base")])
def test_dsg_builds_no_graph_at_steps_that_take_no_gradient(interval, final, between):
    """Off its interval (between = "sample") and at a last step with final = 0, DSG draws without a
    gradient, so the sampler runs the network there without recording a graph; the samples are bit for
    bit those of a sampler that records one at every step."""
    op, loss = _half_mask_loss(2)
    runs = []
    for per_step in (True, False):
        den = _GradSpy(_oracle(200))
        g = DSG(DPS(loss), rate=0.3, interval=interval, final=final, between=between)
        if not per_step:
            g.needs_grad_at = None  # the sampler then records a graph at every step, as it used to
        runs.append((guided_sample(den, g, (2, 1, 4, 4), 7, generator=_gen()), den.recording))
    (res, rec), (old, old_rec) = runs
    assert torch.equal(res.x, old.x) and res.grad_evals == old.grad_evals
    assert old_rec == [True] * 7
    guided = [between == "base" or i % interval == 0 for i in range(6)] + [final != 0]
    assert rec == guided and sum(rec) == res.grad_evals


def test_ugd_with_a_zero_backward_step_skips_backward_guidance():
    """backward_lr = 0 leaves x0_hat where it is: UGD no longer spends backward_steps loss gradients on
    it; the samples equal those of a per-sample zero step, which still runs them."""
    den = _oracle(200)
    op, loss = _half_mask_loss(3)
    skip = guided_sample(den, UGD(loss, backward_lr=0.0, backward_steps=3), (3, 1, 4, 4), 8, generator=_gen())
    run = guided_sample(den, UGD(loss, backward_lr=torch.zeros(3), backward_steps=3), (3, 1, 4, 4), 8,
                        generator=_gen())
    torch.testing.assert_close(skip.x, run.x, rtol=0, atol=1e-6)
    calls = []

    def counted(x):
        calls.append(1)
        return loss(x)

    for lr in (0.0, 0.1):
        calls.clear()
        guided_sample(den, UGD(counted, backward_lr=lr, backward_steps=3), (3, 1, 4, 4), 8, generator=_gen())
        # 8 steps, 2 recurrences (the default) each: the gradient, plus 3 backward steps where they move x0
        assert len(calls) == 16 * (1 if lr == 0 else 4)


def _ugd_step(x: torch.Tensor, t: int = 600, t_prev: int = 580):
    den = GaussianDenoiser(Schedule.linear(1000), mean=0.0, std=1.0)
    b = x.shape[0]
    return make_step(den, x.clone().requires_grad_(True), 0, torch.full((b,), t), torch.full((b,), t_prev), 1.0,
                     torch.Generator().manual_seed(0))


def test_ugd_backward_guidance_steps_from_the_moved_x0_with_its_consistent_eps():
    """Backward guidance only (forward 0, one pass): the step is the DDIM step of the fitted ``x0'`` with
    ``eps' = (x_t - sqrt(abar_t) x0') / sqrt(1 - abar_t)``. A step that computed ``x0'`` and dropped it, or
    kept the old ``eps_hat``, passed every other test."""
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    loss = Inpainting(mask, sigma_y=0.1).loss(mask * torch.ones(3, 1, 4, 4))
    u = UGD(loss, forward=0.0, backward_steps=3, backward_lr=0.2, recurrence=1)
    out = u(_ugd_step(x))
    ref = _ugd_step(x)
    x0 = u.backward(ref.x0_hat.detach())
    assert not torch.allclose(x0, ref.x0_hat)  # the fit moves it
    a, s, sig = ref.abar_t, ref.abar_prev, ref.sigma
    eps = (ref.x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
    expect = math.sqrt(s) * x0 + math.sqrt(1 - s - sig**2) * eps + sig * ref.noise
    torch.testing.assert_close(out, expect.detach())


@pytest.mark.parametrize(("steps", "row"), [(20, 20), (1000, 1000), (700, 1000), (60, 50), (3, 20)])
def test_tuned_defaults_follow_the_step_budget(steps, row):
    """The tuned row nearest the budget on a log scale (rows at 20, 50, 100, 1000 steps), not always the first."""
    from condiff.guidance.defaults import GENERIC, TUNED, default_hyperparameters

    task = "digits/inpaint-random"
    assert sorted(TUNED[task]) == [20, 50, 100, 1000]
    want = {**GENERIC["dsg+dps"], **TUNED[task][row]["dsg+dps"]}
    assert default_hyperparameters("dsg+dps", task, steps) == want
    assert want != {**GENERIC["dsg+dps"], **TUNED[task][100 if row != 100 else 20]["dsg+dps"]}  # rows differ
