"""Dual training: closed forms (mixture optimum, exact mixture denoiser), the dual step, checkpointed
dual state with exact resume, DDP agreement of lambda, the CLI, and the theory check on a mixture."""

import json
import math
import shutil
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from condiff.cli.main import main
from condiff.data import ArrayData, DataError, load_digits
from condiff.denoiser import GaussianDenoiser
from condiff.dual import (
    Constraint,
    DualConfig,
    DualObjective,
    GaussianMixtureDenoiser,
    estimate_losses,
    fixed_timesteps,
    keep_fraction,
    log_mass_bounds,
    mixture_weights,
    mode_weights,
    reference_losses,
    refine_log_mass_bounds,
    select,
)
from condiff.nets import TimeMLP
from condiff.schedule import Schedule
from condiff.train import DenoisingObjective, TrainConfig, Trainer, denoising_loss, list_checkpoints, read_log

MEANS = torch.tensor([[-0.6, 0.0], [0.6, 0.0]])
STD = 0.1


def _two_modes(n: int, w: tuple[float, float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(torch.tensor(w), n, True, generator=g)
    return MEANS[comp] + STD * torch.randn(n, 2, generator=g)


# --- closed forms ------------------------------------------------------------------------------


def test_fixed_timesteps_are_stratum_midpoints():
    assert fixed_timesteps(100, 4).tolist() == [12, 37, 62, 87]
    assert fixed_timesteps(10, 10).tolist() == list(range(10))
    with pytest.raises(ValueError, match=r"1 <= k <= 10 points in \[0, 10\)"):
        fixed_timesteps(10, 11)


def test_fixed_timesteps_on_a_sub_range():
    assert fixed_timesteps(100, 2, (0.5, 1.0)).tolist() == [62, 87]
    with pytest.raises(ValueError, match="dual.t_range"):
        DualConfig(t_range=(0.6, 0.2))


def test_dual_estimate_uses_t_range_and_the_primal_all_timesteps():
    s = Schedule.linear(100)
    seen = []

    def net(x_t, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    x = torch.randn(50, 2)
    obj = DualObjective(x, [Constraint("c", x, 1.0, 300)], s, 300,
                        DualConfig(t_range=(0.3, 0.6), lambda_init=1.0, timesteps=4))
    obj.loss(net, 0, torch.Generator().manual_seed(0))
    t0, tc = seen[0][:300], seen[0][300:]
    assert min(t0.min(), tc.min()) < 30 and max(t0.max(), tc.max()) >= 60
    obj.dual_update(net, 0)
    assert seen[1].tolist() == obj.grid0.repeat(32)[:128].tolist()  # L_0: grid over all of [0, T)
    assert set(seen[2].tolist()) == {33, 41, 48, 56} == set(obj.grid.tolist())


def test_log_mass_bounds_recover_the_slope():
    f = torch.tensor([0.3, 0.3, 0.3, 0.05, 0.05], dtype=torch.float64)
    A = torch.tensor([1.0, 1.1, 0.9, 0.9, 1.1], dtype=torch.float64)  # class offsets, mean 1 in each group
    L = A - 0.02 * f.log()
    b, slope = log_mass_bounds(L, f, [3, 4], 0.2)
    assert slope == pytest.approx(0.02)
    assert torch.allclose(b, A[[3, 4]] - 0.02 * torch.log(torch.tensor(0.2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="one weight"):
        log_mass_bounds(L, torch.full((5,), 0.2), [3], 0.5)
    for i, v in ((1, float("nan")), (0, float("inf"))):
        bad = L.clone()
        bad[i] = v
        with pytest.raises(ValueError, match="losses and class weights must be finite"):  # gave NaN bounds
            log_mass_bounds(bad, f, [3, 4], 0.2)
    bad = f.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):  # a NaN weight passed the sum and sign checks
        log_mass_bounds(L, bad, [3, 4], 0.2)


def test_refined_bounds_follow_each_class_log_line():
    s = torch.tensor([0.01, 0.03], dtype=torch.float64)       # per-class slopes
    A = torch.tensor([0.5, 0.7], dtype=torch.float64)
    line = lambda f: A - s * f.log()
    fb, fp = torch.tensor([0.01, 0.02], dtype=torch.float64), torch.tensor([0.3, 0.05], dtype=torch.float64)
    b, slope = refine_log_mass_bounds(line(fb), fb, line(fp), fp, 0.1)
    assert torch.allclose(slope, s) and torch.allclose(b, line(torch.full((2,), 0.1, dtype=torch.float64)))
    with pytest.raises(ValueError, match="differ between the two models"):
        refine_log_mass_bounds(line(fb), fb, line(fb), fb, 0.1)
    nan = torch.tensor([float("nan"), 0.5], dtype=torch.float64)
    for args in ((nan, fb, line(fp), fp), (line(fb), fb, line(fp), nan)):
        with pytest.raises(ValueError, match="losses and class weights must be finite"):
            refine_log_mass_bounds(*args, 0.1)


def test_a_constraint_changed_after_it_was_made_is_checked_again_by_the_objective():
    x = torch.randn(32, 2)
    c = Constraint("c", x + 1, 0.5)
    for field, value, message in (("bound", float("nan"), "bound must be a finite number >= 0, got nan"),
                                  ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
                                  ("name", "a b", "constraint name")):
        bad = Constraint("c", x + 1, 0.5)
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=message):
            DualObjective(x, [bad], Schedule.linear(50), 8)
    assert DualObjective(x, [c], Schedule.linear(50), 8).bounds.tolist() == [0.5]


def test_a_dual_step_size_too_large_for_the_losses_is_named():
    """dual.lr = 1e300 sent lambda past float32's range: the weighted loss turned NaN and the message
    blamed the (primal) learning rate."""
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    obj = DualObjective(x, [Constraint("far", x + 3, 0.01)], Schedule.linear(50), 16,
                        DualConfig(lr=1e300, every=1, batch_size=8, timesteps=4))
    with pytest.raises(FloatingPointError, match=r"the dual variable of constraint 'far' reached .* at step 0, .*"
                                                 r"dual.lr 1e\+300 is too large .*; lower it$"):
        Trainer(TimeMLP(2, hidden=8, depth=1), obj, TrainConfig(steps=5, warmup=0, progress=False)).fit()
    # float64 losses hold a lambda past float32's range: trained as before
    x64 = x.double()
    obj = DualObjective(x64, [Constraint("far", x64 + 3, 0.01)], Schedule.linear(50), 16,
                        DualConfig(lr=1e39, every=1, batch_size=8, timesteps=4))
    Trainer(TimeMLP(2, hidden=8, depth=1).double(), obj, TrainConfig(steps=3, warmup=0, progress=False)).fit()
    assert 1e38 < float(obj.lam[0]) < math.inf
    # a model whose weights blew up (the primal learning rate): said by the trainer, not blamed on dual.lr
    obj = DualObjective(x, [Constraint("far", x + 3, 0.01)], Schedule.linear(50), 16,
                        DualConfig(lr=0.1, every=1, batch_size=8, timesteps=4))
    with pytest.raises(FloatingPointError, match="training loss became nan at step 1.*try a lower learning rate"):
        Trainer(TimeMLP(2, hidden=8, depth=1), obj, TrainConfig(steps=5, lr=1e30, warmup=0, grad_clip=1e30,
                                                                progress=False)).fit()


def test_mixture_weights_closed_form():
    w = mixture_weights(torch.tensor([0.9, 0.1]), torch.tensor([1.0]), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(w, torch.tensor([0.45, 0.55], dtype=torch.float64))
    w = mixture_weights(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.0, 2.0]),
                        torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    assert torch.allclose(w, torch.tensor([0.5, 1.3, 1.2], dtype=torch.float64) / 3)
    with pytest.raises(ValueError, match="lambda must be finite and >= 0"):
        mixture_weights(torch.tensor([0.5, 0.5]), torch.tensor([-1.0]), torch.tensor([[1.0, 0.0]]))
    # weights that are not a distribution gave [-1, 2] or [nan, nan] without a word
    for w0, wq in (([-0.5, 1.0], [[1.0, 0.0]]), ([0.0, 0.0], [[1.0, 0.0]]), ([0.5, 0.5], [[0.0, 0.0]])):
        with pytest.raises(ValueError, match="must be finite weights >= 0 with a positive sum"):
            mixture_weights(torch.tensor(w0), torch.tensor([1.0]), torch.tensor(wq))
    with pytest.raises(ValueError, match="expected w0"):
        mixture_weights(torch.tensor([0.5, 0.5]), torch.tensor([1.0]), torch.tensor([[1.0, 0.0, 0.0]]))


def test_mode_weights_counts_nearest_mean():
    x = torch.tensor([[-0.5, 0.1], [0.7, 0.0], [0.4, -0.2], [0.9, 0.3]])
    assert mode_weights(x, MEANS).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"means \(K, D\), got \(4, 2\), \(0, 2\)"):
        mode_weights(x, MEANS[:0])


def test_mixture_denoiser_reduces_to_the_gaussian_oracle():
    s = Schedule.linear(100)
    x = torch.randn(64, 2)
    t = torch.randint(0, 100, (64,))
    one = GaussianMixtureDenoiser(s, MEANS[:1], STD, torch.ones(1))
    ref = GaussianDenoiser(s, MEANS[0], STD)
    assert torch.allclose(one.eps(x, t), ref.eps(x, t), rtol=1e-4, atol=1e-4)
    # far from the other mode, a two-mode mixture is the Gaussian of the near mode
    two = GaussianMixtureDenoiser(s, MEANS, STD, torch.tensor([0.5, 0.5]))
    near = MEANS[0] + 0.05 * torch.randn(16, 2)
    t0 = torch.zeros(16, dtype=torch.long)
    assert torch.allclose(two.eps(near, t0), ref.eps(near, t0), atol=1e-4)


def test_lagrangian_is_minimised_by_the_mixture():
    """For fixed lambda the best model is the denoiser of (q_0 + lambda q_1) / (1 + lambda)."""
    s = Schedule.linear(100)
    x0, x1 = _two_modes(10000, (0.9, 0.1), 0), _two_modes(10000, (0.0, 1.0), 1)
    with pytest.warns(UserWarning, match=r"\['m1'\]: a bound of 0 can never hold .* lr = 0 to keep lambda fixed"):
        DualObjective(x0, [Constraint("m1", x1, 0.0, 10000)], s, 10000, DualConfig(lambda_init=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fixed lambda reads no bound: 0 is fine there
        obj = DualObjective(x0, [Constraint("m1", x1, 0.0, 10000)], s, 10000, DualConfig(lambda_init=1.0, lr=0.0))
    best = mixture_weights(torch.tensor([0.9, 0.1]), obj.lam, torch.tensor([[0.0, 1.0]]))[1].item()
    assert best == pytest.approx(0.55)

    def lagrangian(p1: float) -> float:  # same draws for every candidate (common random numbers)
        den = GaussianMixtureDenoiser(s, MEANS, STD, torch.tensor([1 - p1, p1]))
        return obj.loss(den, 0, torch.Generator().manual_seed(1))[0].item()

    at_best = lagrangian(best)
    for p1 in (0.2, 0.45, 0.65, 0.9):
        assert lagrangian(p1) > at_best, p1


# --- the dual step -----------------------------------------------------------------------------


def test_fixed_grid_estimate_has_lower_variance_than_random_timesteps():
    """The dual estimate noises example j at grid[j mod k], so it carries no timestep-sampling noise.
    The "net" knows the data (about 0.5) and errs by t / T: its loss is about (t / T)^2 per entry."""
    s = Schedule.linear(100)
    x = 0.5 + 0.01 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))

    def net(x_t, t):
        a = s.abar_at(t, x_t)
        return (x_t - a.sqrt() * 0.5) / (1 - a).sqrt() + t[:, None] / 100
    grid = fixed_timesteps(100, 16)
    g = torch.Generator().manual_seed(3)
    est = estimate_losses(net, s, [x], 32, grid, g)
    g = torch.Generator().manual_seed(3)
    x0 = x[torch.randint(0, 1000, (32,), generator=g)]
    manual = denoising_loss(net, s, x0, None, g, t=grid.repeat(2)).double().mean()
    assert torch.equal(est[0], manual)
    fixed, rand = [], []
    for k in range(60):
        fixed.append(estimate_losses(net, s, [x], 64, grid, torch.Generator().manual_seed(k)).item())
        g = torch.Generator().manual_seed(10_000 + k)
        x0 = x[torch.randint(0, 1000, (64,), generator=g)]
        rand.append(denoising_loss(net, s, x0, None, g).mean().item())
    fixed, rand = torch.tensor(fixed), torch.tensor(rand)
    assert fixed.var() < 0.05 * rand.var()
    assert abs(fixed.mean() - rand.mean()) < 3 * (rand.var() / 60).sqrt() + 0.01  # the same quantity


def test_dual_step_is_projected_ascent():
    """A net predicting eps = 0 has loss E|eps|^2 / n = 1 on any data: lambda moves by lr (1 - b)."""
    s = Schedule.linear(100)
    net = TimeMLP(2, hidden=8, depth=1)  # zero-initialised output layer
    x = torch.randn(100, 2)
    cons = [Constraint("a", x, 0.5), Constraint("b", x, 2.0)]
    obj = DualObjective(x, cons, s, 8, DualConfig(every=3, lr=0.5, batch_size=4096, lambda_init=0.3))
    for step in range(2):
        assert obj.after_step(net, step)["lambda/a"] == pytest.approx(0.3)  # not a dual step yet
    logs = obj.after_step(net, 2)
    assert torch.allclose(obj.estimate, torch.ones(2, dtype=torch.float64), atol=0.05)
    expect = (0.3 + 0.5 * (obj.estimate - torch.tensor([0.5, 2.0], dtype=torch.float64))).clamp_min(0)
    assert torch.equal(obj.lam, expect)
    assert obj.lam[1] == 0.0 and obj.lam[0] > 0.5
    assert logs["slack/b"] == pytest.approx(float(obj.estimate[1]) - 2.0)
    assert logs["lambda/b"] == 0.0 and "L0_est" in logs


def test_inactive_constraints_leave_the_plain_objective():
    s = Schedule.linear(50)
    net = TimeMLP(2, hidden=16, depth=1)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x, xc = torch.randn(300, 2), torch.randn(40, 2) + 3
    dual = DualObjective(x, [Constraint("c", xc, 1.0)], s, 32)
    plain = DenoisingObjective(x, s, 32)
    a = dual.loss(net, 0, torch.Generator().manual_seed(5))[0]
    b = plain.loss(net, 0, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)  # lambda = 0: same draws, same loss
    dual.lam = torch.tensor([3.0], dtype=torch.float64)
    c, logs = dual.loss(net, 0, torch.Generator().manual_seed(5))
    assert not torch.equal(a, c)
    lagrangian = float(logs["L0"]) + 3.0 * float(logs["L/c"])
    assert float(c.detach()) == pytest.approx(lagrangian / 4.0 if dual.cfg.normalize else lagrangian, rel=1e-6)


def test_a_run_too_short_for_any_dual_update_is_warned_about():
    import warnings

    s, x = Schedule.linear(50), torch.randn(10, 2)
    one = (Constraint("c", x, 1.0),)

    def warned(steps, constraints=one, **dual):
        obj = DualObjective(x, list(constraints), s, 4, DualConfig(**dual))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            obj.warn_if_idle(steps)
        return [str(w.message) for w in seen]

    assert "no dual update happens in 10 steps (the first would be at step 100" in warned(10, start=100, every=5)[0]
    assert "the first would be at step 50" in warned(49, every=50)[0]
    assert warned(50, every=50) == [] and warned(100, start=96, every=5) == []
    assert warned(99, start=96, every=5) and not warned(5, every=5, start=0)
    assert warned(10, constraints=(), start=100) == []  # no constraints: no dual variables to update


def test_bad_input_is_a_clear_error():
    s = Schedule.linear(50)
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="samples of shape"):
        DualObjective(x, [Constraint("c", torch.randn(5, 3), 1.0)], s, 4)
    with pytest.raises(ValueError, match="unique"):
        DualObjective(x, [Constraint("c", x, 1.0), Constraint("c", x, 2.0)], s, 4)
    with pytest.raises(ValueError, match="finite"):
        Constraint("c", x, float("nan"))
    with pytest.raises(ValueError, match="without '/'"):
        Constraint("a/b", x, 1.0)
    with pytest.raises(ValueError, match="dual.every"):
        DualConfig(every=0)
    with pytest.raises(ValueError, match="unknown dual option"):
        DualConfig.from_dict({"evry": 3})
    with pytest.raises(ValueError, match=r"dual.every must be an integer >= 1, got 2.5"):
        DualConfig(every=2.5)
    with pytest.raises(ValueError, match=r"dual.t_range must be two numbers"):
        DualConfig(t_range=("a", 1))
    with pytest.raises(ValueError, match="bound must be a finite number >= 0"):
        Constraint("c", x, -1.0)
    obj = DualObjective(x, [Constraint("c", x, 1.0)], s, 4)
    with pytest.raises(ValueError, match="1 constraints"):
        obj.load_state_dict({"lambda": torch.zeros(2), "estimate": torch.zeros(2),
                             "objective_estimate": torch.zeros(1)})
    with pytest.raises(ValueError, match="no dual variables"):  # a checkpoint of another objective
        obj.load_state_dict({})


def test_keep_fraction_and_select():
    d = load_digits("train")
    imb = keep_fraction(d, {4: 0.1, 7: 0.5})
    for c, f in ((4, 0.1), (7, 0.5), (3, 1.0)):
        assert int((imb.y == c).sum()) == max(1, round(f * int((d.y == c).sum())))
    assert keep_fraction(d, {4: 0.1}).meta["indices"] == keep_fraction(d, {4: 0.1}).meta["indices"]
    a, b = select(d, n=30, seed=3), select(d, offset=30, seed=3)
    assert len(a) == 30 and len(a) + len(b) == len(d)
    assert not set(a.meta["indices"]) & set(b.meta["indices"])
    assert set(select(d, classes=[2, 5]).y.tolist()) == {2, 5}
    with pytest.raises(DataError, match="needs class labels"):
        select(ArrayData(torch.randn(5, 2)), classes=[1])
    with pytest.raises(DataError, match=r"in \(0, 1\]"):
        keep_fraction(d, {4: 0.0})


# --- training: checkpointed dual state, resume, DDP --------------------------------------------


def _toy_objective(seed: int = 0) -> DualObjective:
    s = Schedule.linear(50)
    x0, x1 = _two_modes(2000, (0.95, 0.05), seed), _two_modes(500, (0.0, 1.0), seed + 1)
    return DualObjective(x0, [Constraint("m1", x1, 0.2, 32)], s, 64,
                         DualConfig(every=5, lr=1.0, batch_size=256, timesteps=8, seed=seed))


def _fit(run_dir: Path, steps: int, resume: bool = False) -> tuple[Trainer, DualObjective]:
    torch.manual_seed(0)
    obj = _toy_objective()
    tr = Trainer(TimeMLP(2, hidden=32, depth=1), obj,
                 TrainConfig(steps=steps, batch_size=64, lr=3e-3, warmup=5, lr_decay="constant",  # a prefix
                             ckpt_every=10, log_every=5, progress=False), run_dir)  # of a longer run
    if resume:
        assert tr.resume()
    tr.fit()
    return tr, obj


def test_resume_restores_lambda_and_matches_uninterrupted(tmp_path):
    ref, ref_obj = _fit(tmp_path / "ref", 40)
    assert ref_obj.lam.item() > 0, "the constraint must be active for this test to mean anything"
    _fit(tmp_path / "cut", 20)
    tr, obj = _fit(tmp_path / "cut", 40, resume=True)
    assert torch.equal(obj.lam, ref_obj.lam)
    for a, b in zip(ref.model.state_dict().values(), tr.model.state_dict().values()):
        assert torch.equal(a, b)
    log = read_log(tmp_path / "cut" / "log.jsonl")
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all("lambda/m1" in r and "slack/m1" in r and "L0" in r for r in log)
    untimed = lambda recs: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in recs]
    assert untimed(log) == untimed(read_log(tmp_path / "ref" / "log.jsonl"))
    state = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    from condiff import io

    assert torch.equal(io.load_group(state, "objective")["lambda"], obj.lam)


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from condiff.dual import Constraint, DualConfig, DualObjective, estimate_losses
    from condiff.nets import TimeMLP
    from condiff.schedule import Schedule
    from condiff.train import Trainer, TrainConfig, step_seed
    from condiff.dual.objective import _DUAL_SEED_TAG
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(500, 2, generator=g) * 0.1 - 0.5
    x1 = torch.randn(200, 2, generator=g) * 0.1 + 0.5
    s = Schedule.linear(50)
    obj = DualObjective(x0, [Constraint("m1", x1, 0.1, 16)], s, 32,
                        DualConfig(every=5, batch_size=64, timesteps=8))
    torch.manual_seed(0)
    tr = Trainer(TimeMLP(2, hidden=16, depth=1), obj, TrainConfig(steps=20, batch_size=32, warmup=2,
                 ckpt_every=100, log_every=10, progress=False, device="cpu"), sys.argv[1])
    tr.fit()
    rank = dist.get_rank()
    gl = torch.Generator().manual_seed(step_seed(obj.cfg.seed ^ _DUAL_SEED_TAG, 19, rank))
    local = estimate_losses(tr.model, s, [x0, x1], 64, obj.grid, gl)  # this rank's draws at the last update
    out = {"lambda": obj.lam.tolist(), "estimate": obj.estimate.tolist(), "local": local.tolist()}
    json.dump(out, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
""")


def test_ddp_ranks_hold_the_same_lambda(tmp_path, run_on_two_ranks):
    run_on_two_ranks(DDP_SCRIPT)
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["lambda"] == r1["lambda"] and r0["lambda"][0] > 0
    assert r0["estimate"] == r1["estimate"]
    assert r0["local"] != r1["local"]  # the ranks drew different batches ...
    mean = [(a + b) / 2 for a, b in zip(r0["local"], r1["local"])]
    assert r0["estimate"] == pytest.approx(mean[1:], rel=1e-6)  # ... and hold their average


def test_train_cached_builds_the_trainer_before_clearing_stale_checkpoints(tmp_path, monkeypatch):
    from condiff.dual import experiments
    from condiff.dual.experiments import train_cached

    def cannot_build(*args, **kw):  # a device that cannot be reached, say
        raise RuntimeError("nosuch device")

    monkeypatch.setattr(experiments, "Trainer", cannot_build)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "key.json").write_text('"another key"')
    s = Schedule.linear(10)
    x = torch.randn(8, 2)
    with pytest.raises(RuntimeError, match="nosuch"):  # a trainer that cannot be built: nothing cleared
        train_cached(run, TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4),
                     TrainConfig(steps=1, progress=False), s, {"k": 1}, {"name": "toy2d"}, x, fresh=True)
    assert (run / "checkpoints" / "step_00000010").is_dir() and (run / "key.json").read_text() == '"another key"'


def test_train_cached_reuses_refuses_or_retrains_and_saves_a_model_other_commands_take(tmp_path):
    """Same settings: the model is reused. Other settings: refused, naming them, with nothing touched,
    unless ``fresh``. The model records its data set, sample shape and value range, so ``condiff sample``
    and ``eval`` load it like any trained model."""
    from condiff import io
    from condiff.cli.common import load_model_for
    from condiff.dual.experiments import train_cached

    s = Schedule.linear(10)
    x = torch.randn(64, 2)
    run = tmp_path / "run"

    def fit(key, fresh=False, steps=3, lr=1e-3):
        cfg = TrainConfig(steps=steps, batch_size=8, warmup=0, progress=False, lr=lr)
        return train_cached(run, TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 8), cfg, s, key,
                            {"name": "toy2d", "kind": "moons"}, x, fresh)

    _, cfg = fit({"a": 1, "b": {"c": 2}})
    assert cfg["shape"] == [2] and cfg["data"] == {"name": "toy2d", "kind": "moons"}
    assert cfg["value_range"] == pytest.approx([float(x.min()), float(x.max())])
    den, run_cfg, shape = load_model_for(run, "cpu")
    assert shape == (2,) and run_cfg["data"]["name"] == "toy2d"
    before = {q: q.read_bytes() for q in run.rglob("*") if q.is_file()}
    _, again = fit({"a": 1, "b": {"c": 2}}, steps=99)  # the steps are part of the key in the experiments
    assert again["steps"] == 3  # reused, not retrained
    assert {q: q.read_bytes() for q in run.rglob("*") if q.is_file()} == before
    # a float setting recorded as a whole number (as before such numbers were kept as floats) is the same key:
    # the key's text differs ("1" against "1.0"), which retrained the model
    _, again = fit({"a": 1.0, "b": {"c": 2.0}}, steps=99)
    assert again["steps"] == 3 and {q: q.read_bytes() for q in run.rglob("*") if q.is_file()} == before
    old = {k: v for k, v in cfg.items() if k not in ("data", "shape", "value_range")}
    io.write_json_atomic(run / "model" / "config.json", old)  # a model saved before they were recorded
    with pytest.raises(io.CheckpointError, match="older `condiff dual` experiment.*run that experiment again"):
        load_model_for(run, "cpu")
    _, again = fit({"a": 1, "b": {"c": 2}})
    assert again["shape"] == [2] and again["data"]["name"] == "toy2d" and again["steps"] == 3  # completed
    with pytest.raises(FileExistsError, match=r"trained with other settings \(b.c differ\); pass --fresh"):
        fit({"a": 1, "b": {"c": 3}})
    assert {q: q.read_bytes() for q in run.rglob("*") if q.is_file()} == before
    (run / "samples_drawn_from_the_model.safetensors").write_bytes(b"x")  # e.g. finetune's cached q_1
    with pytest.raises(FloatingPointError):  # a replacement that fails loses nothing of the old model
        fit({"a": 1, "b": {"c": 3}}, fresh=True, lr=1e30)
    kept = tmp_path / ".replaced" / "run"
    assert {q.relative_to(kept): q.read_bytes() for q in (kept / "model").rglob("*")} == {
        q.relative_to(run): v for q, v in before.items() if q.parent.name == "model"}
    _, new = fit({"a": 1, "b": {"c": 3}}, fresh=True, steps=4)
    assert not kept.exists()
    assert new["steps"] == 4 and [c.name for c in list_checkpoints(run / "checkpoints")][-1] == "step_00000004"
    assert not (run / "samples_drawn_from_the_model.safetensors").exists()  # drawn from the old model: gone

    # a run that failed before its first checkpoint trained nothing: a retry with other settings proceeds
    run = tmp_path / "failed"
    run.mkdir()
    (run / "key.json").write_text('{"a": 0}')
    (run / "log.jsonl").write_text("")
    _, cfg = fit({"a": 2})
    assert cfg["steps"] == 3 and json.loads((run / "key.json").read_text()) == {"a": 2}
    # no key.json, but a model that records another key: refused, naming the difference
    (run / "key.json").unlink()
    with pytest.raises(FileExistsError, match=r"\(a differ\)"):
        fit({"a": 5})


def test_dual_train_refuses_an_init_model_of_another_shape_before_writing(tmp_path, capsys):
    from condiff.models import save_model

    out = tmp_path / "out"
    for recorded, needle in (([3], "takes samples of shape (3,), the objective data have (2,)"),
                             (None, "does not take the objective data's samples of shape (2,)")):
        init = tmp_path / f"init{recorded}"
        save_model(init / "model", TimeMLP(3, hidden=8, depth=1), Schedule.linear(50),
                   **({} if recorded is None else {"shape": recorded}))
        (tmp_path / "run.toml").write_text(RUN_FILE.replace("[dual]\n", f'[dual]\ninit = "{init}"\n'))
        assert main(["dual", "train", "--config", str(tmp_path / "run.toml"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "[dual] init: the model at" in err[0] and needle in err[0], err
        assert not out.exists()


# --- CLI ---------------------------------------------------------------------------------------

RUN_FILE = """
[data]
name = "toy2d"
kind = "gmm"
components = 2
weights = [0.95, 0.05]
n = 1000

[model]
name = "mlp"
hidden = 32
depth = 1

[schedule]
T = 50

[train]
steps = 30
batch_size = 64
ckpt_every = 10
log_every = 10
progress = false
warmup = 5

[dual]
every = 5
batch_size = 128
timesteps = 8

[[constraint]]
name = "mode1"
data = "objective"
classes = [1]
bound = 0.2
batch_size = 16
"""


def test_cli_dual_train_writes_model_plots_metrics_and_resumes(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE)
    out = tmp_path / "run"
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 30 and m["constraints"][0]["name"] == "mode1" and m["lambda"]["mode1"] > 0
    from condiff.data import load_toy2d

    y = load_toy2d("train", kind="gmm", components=2, weights=[0.95, 0.05], n=1000).y
    assert m["constraints"][0]["n"] == int((y == 1).sum())  # data = "objective", classes = [1]
    for f in ("lambda.png", "slack.png", "loss.png", "model/config.json", "config.json"):
        assert (out / f).is_file(), f
    assert all("lambda/mode1" in r for r in read_log(out / "log.jsonl"))
    capsys.readouterr()
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--resume",
                 "--set", "train.steps=40", "--set", "schedule.kind=cosine"]) == 2  # went on silently
    assert "was trained with another noise schedule" in capsys.readouterr().err
    # the examples the model trains on, chosen by [objective]: resumed on other ones without a word
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--resume",
                 "--set", "train.steps=40", "--set", "objective.keep={1=0.5}"]) == 2
    assert "was trained on other objective data (keep" in capsys.readouterr().err
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--resume",
                 "--set", "train.steps=40", "--set", "dual.lr=0.5"]) == 0
    assert "resumed from step 30" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40
    # --resume without --config takes the run's recorded settings (it was "--config is required")
    assert main(["dual", "train", "--out", str(out), "--device", "cpu", "--resume", "--set", "train.steps=50"]) == 0
    said = capsys.readouterr()
    json.loads(said.out)  # the results alone on stdout, notes on stderr
    said = said.err
    assert f"--resume: the settings recorded in {out / 'config.json'}, with --set" in said
    assert "resumed from step 40" in said
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["train"]["steps"] == 50 and recorded["dual"]["lr"] == 0.5
    assert recorded["constraint"][0]["name"] == "mode1"
    assert main(["dual", "train", "--out", str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert "--config is needed (without it, --resume with the --out of an earlier run" in capsys.readouterr().err
    # the result is an ordinary condiff run: condiff sample reads it
    assert main(["sample", "--ckpt", str(out), "--n", "8", "--steps", "5", "--device", "cpu"]) == 0
    # and eval scores it beside, not over, the run's own metrics.json (which it used to replace)
    assert main(["eval", "--ckpt", str(out), "--n", "64", "--steps", "5", "--device", "cpu"]) == 0
    assert "lambda" in json.loads((out / "metrics.json").read_text())
    assert "mmd_ratio" in json.loads((out / "eval" / "metrics.json").read_text())
    assert main(["eval", "--ckpt", str(out / "model"), "--n", "64", "--steps", "5", "--device", "cpu"]) == 0
    assert "lambda" in json.loads((out / "metrics.json").read_text()) and not (out / "model" / "metrics.json").exists()


def test_cli_dual_train_resumed_from_its_recorded_settings_runs_a_net_file_only_once_trusted(tmp_path, capsys,
                                                                                              monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "vec.py").write_text(
        "import torch\n"
        f"open({str(marker)!r}, 'a').write('ran')\n"
        "class Vec(torch.nn.Module):\n"
        "    def __init__(self, dim: int = 2):\n"
        "        super().__init__()\n        self.lin = torch.nn.Linear(dim, dim)\n"
        "    def forward(self, x, t):\n        return self.lin(x)\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE.replace('name = "mlp"\nhidden = 32\ndepth = 1', f'name = "{tmp_path / "vec.py"}:Vec"')
                   .replace("steps = 30", "steps = 10"))
    out = tmp_path / "run"
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 0
    assert marker.read_text() == "ran"  # the net file ran once, though the command needed its class twice
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "elsewhere"))  # as on a machine that never ran it
    capsys.readouterr()
    assert main(["dual", "train", "--out", str(out), "--device", "cpu", "--resume", "--set", "train.steps=12"]) == 2
    assert "the run's settings in" in capsys.readouterr().err and marker.read_text() == "ran"


def test_cli_dual_train_refuses_a_net_that_cannot_denoise_the_data_before_its_run_begins(tmp_path, capsys):
    (tmp_path / "wide.py").write_text("import torch\nclass Wide(torch.nn.Module):\n"
                                      "    def __init__(self, dim: int = 2):\n        super().__init__()\n"
                                      "        self.lin = torch.nn.Linear(dim, 3)\n"
                                      "    def forward(self, x, t):\n        return self.lin(x)\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE.replace('name = "mlp"\nhidden = 32\ndepth = 1', f'name = "{tmp_path / "wide.py"}:Wide"'))
    out = tmp_path / "run"
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 2
    assert "maps x of shape (2, 2) to (2, 3): a denoising net returns" in capsys.readouterr().err
    assert not out.exists()


def test_cli_dual_train_says_how_to_trust_a_constraints_model_whose_net_file_is_not_trusted(tmp_path, capsys,
                                                                                          monkeypatch):
    from condiff.models import save_model
    from condiff.nets import build_net

    (tmp_path / "vec.py").write_text("import torch\nclass Vec(torch.nn.Module):\n"
                                     "    def __init__(self, dim: int = 2):\n        super().__init__()\n"
                                     "        self.lin = torch.nn.Linear(dim, dim)\n"
                                     "    def forward(self, x, t):\n        return self.lin(x)\n")
    save_model(tmp_path / "gen", build_net({"name": f"{tmp_path / 'vec.py'}:Vec"}), Schedule.linear(50), shape=[2])
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE.split("[[constraint]]")[0] + f'[[constraint]]\nname = "gen"\n'
                   f'model = "{tmp_path / "gen"}"\nn = 16\nsteps = 5\nbound = 0.5\n')
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "elsewhere"))  # as on a machine that never ran it
    assert main(["dual", "train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "names the net file" in err and f"condiff trust {tmp_path / 'vec.py'}" in err
    assert "(train that model first)" not in err  # it is trained: its file is not trusted here


def test_cli_dual_train_refuses_before_touching_an_existing_run(tmp_path, capsys):
    """Bad settings, an unloadable checkpoint, a bad device: one line, and every file of the run intact
    (--fresh deletes nothing, --resume rewrites no config.json, no constraint samples are written)."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE.replace("steps = 30", "steps = 10"))
    out = tmp_path / "run"
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 0
    files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    before = files()
    assert (out / "checkpoints").is_dir() and (out / "model").is_dir() and (out / "log.jsonl").is_file()
    for extra, message in [
        (["--fresh", "--set", "dual.lr=-1"], "dual.lr must be a number >= 0, got -1"),
        (["--fresh", "--set", "objective.n=abc"], "objective.n must be an integer >= 1, got 'abc'"),
        (["--fresh", "--set", "dual.timesteps=60"], "dual.timesteps must be <= 50"),  # T = 50
        (["--fresh", "--set", "dual.t_range=[0.3, 0.4]"], "dual.timesteps must be <= 5"),
        (["--resume", "--set", "model.hidden=16"], "does not match the model"),
        (["--fresh", "--device", "nosuch"], "--device nosuch is not supported here (cpu, cuda, cuda:N)"),
    ]:
        capsys.readouterr()
        assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
        assert files() == before, extra
    (tmp_path / "file").write_text("x")
    assert main(["dual", "train", "--config", str(cfg), "--out", str(tmp_path / "file")]) == 2
    assert "--out " + str(tmp_path / "file") + " is a file" in capsys.readouterr().err
    # a resume that trains on drops the old model's results (eval/, samples/) before the new model is saved
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--resume",
                 "--set", "train.steps=12"]) == 0
    assert not (out / "eval").exists() and json.loads((out / "metrics.json").read_text())["steps"] == 12


@pytest.mark.parametrize("setting, message", [
    ("dual.every=often", "setting dual.every expects a number"),  # type-checked against the run file
    ("model.hidden=wide", "setting model.hidden expects a number"),  # and against the preset
    ("dule.every=5", "override key 'dule.every' must be section.key"),
    ("dual.nosuch=1", "unknown dual option(s) ['nosuch']; known: ['batch_size', 'every', 'init', 'lambda_init'"),
])
def test_cli_dual_train_checks_set_values(tmp_path, capsys, setting, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE)
    out = tmp_path / "o"
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("edit, message", [
    (("bound = 0.2", ""), "exactly one of bound"),
    (("bound = 0.2", "relative = 1.1"), "needs reference"),
    (("bound = 0.2", "bound = 0.2\ncolour = 3"), "unknown key(s) ['colour']"),
    (("every = 5", "every = 0"), "dual.every must be an integer >= 1, got 0"),
    (("[dual]", "[duel]"), "unknown section(s) ['duel']; expected some of ['data', 'model', 'schedule', "
                           "'train', 'sample', 'dual', 'objective', 'constraint']"),
    (("timesteps = 8", "t_range = [0.3]"), "dual.t_range must be two numbers [a, b] with 0 <= a < b <= 1"),
    (("classes = [1]", "classes = [1.5]"), "constraint 'mode1' classes must be a non-empty list of distinct "
                                           "class labels (integers >= 0), got [1.5]"),
    (("classes = [1]", 'classes = ["a"]'), "classes must be a non-empty list"),
    (("classes = [1]", "classes = 1"), "classes must be a non-empty list"),
    (("classes = [1]", "keep = {a = 0.1}"), "constraint 'mode1' keep must be a table {class = fraction in (0, 1]}"),
    (("classes = [1]", "seed = 1.5"), "constraint 'mode1' seed must be an integer in [0, 2**63), got 1.5"),
    (("classes = [1]", "model = 'm'"), "constraint 'mode1' data does not apply to samples of a model"),
    (("bound = 0.2", 'bound = "x"'), "constraint 'mode1' bound must be a number > 0"),
    (("bound = 0.2", "bound = -1.0"), "bound <= 0 can never hold), got -1.0"),
    (("bound = 0.2", "relative = 0.0\nreference = 'm'"), "constraint 'mode1' relative must be a number > 0"),
    (("name = \"mode1\"", "name = \"mode 1\""), "constraint name must be non-empty without '/' or spaces"),
    (("[[constraint]]", "[[constraint]]\nname = 'mode1'\nbound = 1.0\n\n[[constraint]]"),
     "constraint 'mode1': constraint names must be unique"),
])
def test_cli_dual_train_bad_config_is_one_line(tmp_path, capsys, edit, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(RUN_FILE.replace(*edit))
    assert main(["dual", "train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_dual_train_names_a_reference_model_of_another_shape(tmp_path, capsys):
    from condiff.models import save_model

    save_model(tmp_path / "ref3", TimeMLP(3, hidden=8, depth=1), Schedule.linear(50), shape=[3])
    cfg = tmp_path / "rel.toml"
    cfg.write_text(RUN_FILE.replace("bound = 0.2", f"relative = 1.1\nreference = '{tmp_path / 'ref3'}'"))
    assert main(["dual", "train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"constraint 'mode1': the reference model at {tmp_path / 'ref3'} takes samples of shape (3,)" in err
    assert len(err.splitlines()) == 1
    # a reference not trained yet: the message names the constraint and its key, not only the path
    cfg.write_text(RUN_FILE.replace("bound = 0.2", f"relative = 1.1\nreference = '{tmp_path / 'none'}'"))
    assert main(["dual", "train", "--config", str(cfg), "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert (f"constraint 'mode1': its reference model: no model at {tmp_path / 'none'}: the path does not exist "
            "(train that model first)") in err and len(err.splitlines()) == 1


def test_cli_dual_train_gives_a_constraints_other_data_set_none_of_the_objectives_data_settings(tmp_path):
    import numpy as np

    from condiff.data import load_dataset

    pts = tmp_path / "pts.npy"  # 2-D points like the objective's, from a file that takes no toy2d settings
    np.save(pts, np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32) * 0.3)
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE.split("[[constraint]]")[0] + f'[[constraint]]\nname = "pts"\ndata = "{pts}"\nbound = 0.5\n')
    out = tmp_path / "run"
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu",
                 "--set", "train.steps=5"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["constraints"][0]["n"] == len(load_dataset(pts)) == 40


def test_cli_dual_train_fine_tunes_with_the_init_models_network_and_schedule_and_resumes(tmp_path, capsys):
    """With [dual] init the run file's [model] and [schedule] are ignored: the init model's are used, recorded,
    and a --resume with the same file goes on (the file's schedule is nothing to compare)."""
    from condiff.models import save_model

    init = tmp_path / "init"
    save_model(init / "model", TimeMLP(2, hidden=8, depth=1), Schedule.linear(40), shape=[2])
    cfg = tmp_path / "ft.toml"
    cfg.write_text(RUN_FILE.replace("[dual]\n", f'[dual]\ninit = "{init}"\n'))  # the file's: hidden 32, T 50
    out = tmp_path / "ft"
    args = ["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--set", "train.steps=10"]) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["model"]["hidden"] == 8 and recorded["schedule"] == Schedule.linear(40).config()
    assert json.loads((out / "model" / "config.json").read_text())["schedule"] == Schedule.linear(40).config()
    capsys.readouterr()
    assert main([*args, "--resume", "--set", "train.steps=20"]) == 0
    assert "resumed from step 10" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20


def test_cli_dual_train_keeps_a_constraints_model_samples_until_its_table_changes(tmp_path, capsys):
    from condiff.models import save_model

    save_model(tmp_path / "gen", TimeMLP(2, hidden=8, depth=1), Schedule.linear(50), shape=[2])
    cfg = tmp_path / "run.toml"

    def write(n):
        cfg.write_text(RUN_FILE.split("[[constraint]]")[0] + f'[[constraint]]\nname = "gen"\n'
                       f'model = "{tmp_path / "gen"}"\nn = {n}\nsteps = 5\nbound = 0.5\n')

    out = tmp_path / "run"
    args = ["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--set", "train.progress=true"]
    write(16)
    assert main([*args, "--set", "train.steps=10"]) == 0
    assert "drawing 16 samples of" in capsys.readouterr().err
    assert (out / "constraint_data").is_dir()
    assert main([*args, "--resume", "--set", "train.steps=15"]) == 0
    assert "drawing" not in capsys.readouterr().err  # the cached samples
    write(24)  # another table: drawn again, not the 16 cached ones
    assert main([*args, "--resume", "--set", "train.steps=20"]) == 0
    assert "drawing 24 samples of" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["constraints"][0]["n"] == 24


def test_cli_experiment_rejects_unknown_setting(capsys):
    assert main(["dual", "fair", "--set", "minorty=[4]"]) == 2
    assert "unknown setting 'minorty'" in capsys.readouterr().err


@pytest.mark.parametrize("experiment, setting, message", [
    ("fair", "dual.lr_dual=1", "unknown dual option(s) ['lr_dual']"),
    ("fair", "train.stpes=3", "unknown training option(s) ['stpes']"),
    ("fair", "dual.lr=abc", "setting dual.lr expects a number"),
    ("fair", "n_samples=-3", "n_samples must be an integer >= 1, got -3"),
    ("fair", "n_samples=1", "n_samples must be an integer >= 2, got 1"),
    ("finetune", "n_target=100000", "n_target = 100000: digits: asked for examples"),
    ("fair", "sample_steps=5000", "sample_steps (5000) must be <= T (1000)"),
    ("fair", "target_freq=2", "target_freq must be a number in (0, 1), got 2"),
    ("fair", "bound=-1", "bound must be a number > 0 (a denoising loss is positive"),
    ("fair", "relative=[0.7]", "relative must be one number or 3 (one per minority class [4, 5, 7]), got [0.7]"),
    ("fair", "minority=[3]", "got [0.698, 0.796, 0.7] (the default, one per default minority class [4, 5, 7]: set "
                             "relative with minority"),
    ("fair", "minority=[4,4]", "minority must be a non-empty list of distinct digits 0-9, got [4, 4]"),
    ("fair", "minority=['a']", "minority must be a non-empty list of distinct digits 0-9, got ['a']"),
    ("fair", "dual=5", "dual must be a table of settings, got 5"),
    ("fair", "dual.t_range=[0.3]", "dual.t_range must be two numbers [a, b]"),
    ("fair", "dual.timesteps=800", "dual.timesteps must be <= 700, the timesteps in dual.t_range [0.3, 1.0] of a "
                                   "schedule of T = 1000, got 800"),
    ("toy", "constraint_batch=0", "constraint_batch must be an integer >= 1, got 0"),
    ("toy", "minority=[0.5]", "minority must be a non-empty list of distinct modes 0-7 (components = 8), got [0.5]"),
    ("toy", "minority=[0,1,2,3,4,5,6,7]", "minority must leave at least one of the 8 modes out"),
    ("toy", "average=2", "average must be a number in (0, 1], got 2"),
    ("toy", "average=0", "average must be a number in (0, 1], got 0"),
    ("toy", "relative=0", "relative must be a number > 0"),
    ("toy", "slack_tolerance=nan", "slack_tolerance must be a finite number, got nan"),
    ("toy", "seed=1.5", "seed must be an integer in [0, 2**63), got 1.5"),
    ("toy", "lr=-1", "lr must be a number > 0, got -1"),
    ("finetune", "finetune.steps=0", "finetune.steps must be an integer >= 1, got 0"),
    ("finetune", "pretrain.lr_decay='linear'", "pretrain.lr_decay must be 'cosine' or 'constant', got 'linear'"),
    ("finetune", "relative=-1", "relative must be a number > 0"),
    ("finetune", "constraint_classes=[]", "constraint_classes must be a non-empty list of distinct digits 0-9, got []"),
    ("finetune", "target_classes=3", "target_classes must be a non-empty list of distinct digits 0-9, got 3"),
    ("finetune", "quantile=2", "quantile must be a number in (0, 1), got 2"),
])
def test_cli_experiment_checks_settings_before_training(tmp_path, capsys, experiment, setting, message):
    """Refused in the config check: the cached models of an earlier run are neither retrained nor deleted."""
    out = tmp_path / "out"
    for f in ("constrained/key.json", "constrained/log.jsonl", "constrained/checkpoints/step_00000010/config.json"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("{}")
    before = sorted(out.rglob("*"))
    assert main(["dual", experiment, "--set", setting, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    after = sorted(q for q in out.rglob("*") if q.name != ".lock")  # the directory's lock stays, by design
    assert after == before and (out / "constrained" / "key.json").read_text() == "{}"


@pytest.mark.parametrize("args, message", [
    (["--device", "nosuch"], "--device nosuch is not supported here (cpu, cuda, cuda:N)"),
    (["--out", "FILE"], " is a file, not a directory"),
])
def test_cli_experiment_checks_device_and_out_first(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    assert main(["dual", "toy", "--out", str(tmp_path / "toy"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "toy").exists()


def test_experiment_settings_of_several_kinds(capsys):
    """fair's relative: one number or one per minority class (a single number is not refused as
    'expects a list'); settings help names each experiment's own tables."""
    from condiff.cli.dual import apply_overrides
    from condiff.dual.experiments import FairConfig

    assert apply_overrides(FairConfig(), ["relative=0.7"]).relative == 0.7
    assert apply_overrides(FairConfig(), ["minority=[4]", "relative=[0.7]"]).relative == [0.7]
    assert apply_overrides(FairConfig(), ["minority=[4]", "target_freq=0.1"]).minority == (4,)  # relative unused
    with pytest.raises(ValueError, match="bound and target_freq each set the constraints' bounds: give one"):
        apply_overrides(FairConfig(), ["target_freq=0.1", "bound=0.3"])  # target_freq was ignored silently
    helps = {}
    for exp in ("toy", "fair", "finetune"):
        with pytest.raises(SystemExit):
            main(["dual", exp, "--help"])
        helps[exp] = " ".join(capsys.readouterr().out.split())
    assert "--set steps=800" in helps["toy"] and "train." not in helps["toy"]
    assert "--set train.steps=800" in helps["fair"]
    assert "--set finetune.steps=200" in helps["finetune"] and "--set train." not in helps["finetune"]


def test_cli_finetune_rejects_a_class_that_is_no_digit_before_training(tmp_path, capsys):
    assert main(["dual", "finetune", "--set", "constraint_classes=[12]", "--out", str(tmp_path / "ft")]) == 2
    assert "constraint_classes must be a non-empty list of distinct digits 0-9, got [12]" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "pretrained").exists()


# --- theory check --------------------------------------------------------------------------------


def _legends(figs: list) -> dict:
    """``{path: legend texts}`` of the figures saved (the ``saved_figures`` fixture's list)."""
    return {f.saved_to: [t.get_text() for ax in f.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
            for f in figs}


DUAL_LEGEND = ["Lagrangian (the loss stepped on)", "L_0: the objective's denoising loss"]


def test_toy_theory_check(saved_figures, tmp_path):
    """Dual training on a 4-mode mixture with mode 0 at weight 0.05 and one constraint on it: the
    trained model's mode weights match the mixture (q_0 + lambda q_1) / (1 + lambda) for the learned
    lambda, and the constraint holds. (`condiff bench dual` runs the 8-mode, 3-constraint version.)"""
    from condiff.dual.experiments import ToyConfig, run_toy

    figs = saved_figures()

    cfg = ToyConfig(components=4, minority=(0,), minority_weight=0.05, n=4096, T=50, hidden=64, depth=2,
                    steps=500, lr=3e-3, dual={"every": 10, "lr": 0.5, "batch_size": 1024, "timesteps": 10,
                                              "start": 60},
                    n_samples=4000, tolerance=0.04, slack_tolerance=0.01)
    m = run_toy(cfg, tmp_path)
    assert all(m["targets"].values()), m
    assert m["lambda_avg"][0] > 0.1
    assert m["model_weights"][0] > 0.15 > 0.05 == m["data_weights"][0]  # far from q_0's weight of the mode
    for f in ("metrics.json", "mode_weights.png", "lambda.png", "slack.png", "constrained/loss.png"):
        assert (tmp_path / f).is_file(), f
    assert _legends(figs)[tmp_path / "constrained" / "loss.png"] == DUAL_LEGEND  # the Lagrangian and L_0, each by name


def test_cli_experiment_refuses_a_changed_model_unless_fresh_and_its_models_serve_other_commands(tmp_path, capsys):
    import numpy
    out = tmp_path / "toy"
    tiny = ["--set", "n=400", "--set", "n_samples=200", "--set", "hidden=16", "--set", "T=20",
            "--set", "dual.timesteps=4", "--set", "dual.start=10", "--set", "dual.every=5"]
    assert main(["dual", "toy", "--out", str(out), *tiny, "--set", "steps=20"]) == 0
    printed = capsys.readouterr()
    assert f"training constrained (20 steps) in {out / 'constrained'}" in printed.err
    assert f"plots: {out}/ lambda.png, mode_weights.png, samples.png, slack.png" in printed.err
    assert isinstance(json.loads(printed.out), dict)  # stdout: the JSON alone
    assert json.loads((out / "metrics.json").read_text())["versions"]["condiff"]
    before = {q: q.read_bytes() for q in (out / "constrained").rglob("*") if q.is_file()}
    record = (out / "metrics.json").read_bytes()
    assert main(["dual", "toy", "--out", str(out), *tiny, "--set", "steps=30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with other settings (toy.steps, warmup differ); pass --fresh" in err[0], err
    assert {q: q.read_bytes() for q in (out / "constrained").rglob("*") if q.is_file()} == before
    assert (out / "metrics.json").read_bytes() == record  # the refused rerun deleted the last run's results
    assert main(["dual", "toy", "--out", str(out), *tiny, "--set", "steps=30", "--fresh"]) == 0
    assert json.loads((out / "constrained" / "model" / "config.json").read_text())["steps"] == 30
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(out / "constrained"), "--n", "4", "--steps", "5",
                 "--out", str(tmp_path / "s")]) == 0  # a model like any other: shape and data recorded
    with numpy.load(tmp_path / "s" / "samples.npz") as z:
        assert z["x"].shape == (4, 2)


def test_reference_losses_match_the_estimator():
    s = Schedule.linear(100)
    x = _two_modes(3000, (0.5, 0.5), 2)
    den = GaussianMixtureDenoiser(s, MEANS, STD, torch.tensor([0.5, 0.5]))
    a = reference_losses(den, s, [x], timesteps=16, n=8192, seed=0)
    b = estimate_losses(den, s, [x], 8192, fixed_timesteps(100, 16), torch.Generator().manual_seed(1))
    assert a.shape == (1,) and abs(float(a[0] - b[0])) < 0.03
    with pytest.raises(ValueError, match="reference_losses: n must be an integer >= 1, got 10.5"):
        reference_losses(den, s, [x], n=10.5)
    with pytest.raises(ValueError, match=r"reference_losses: data set\(s\) \[1\] hold no examples"):
        reference_losses(den, s, [x, x[:0]], n=16)
    holes = x.clone()
    holes[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the examples of data set 1 hold 1 non-finite values \(the first in sample "
                                         r"5\)"):  # was a silent [nan]
        reference_losses(den, s, [x, holes], n=16)
    from condiff.nets import TimeMLP

    with pytest.raises(ValueError, match="data set 0 is torch.float64 but the network's weights are torch.float32"):
        reference_losses(TimeMLP(2, hidden=8, depth=1), s, [x.double()], n=16)  # was a raw matmul dtype error
    # a chunk that is no whole number of grid sweeps is trimmed to one: every call sees each grid
    # timestep equally often, so the quadrature stays exact
    seen = []

    def spy(x_t, t):
        seen.append(torch.bincount(t, minlength=100)[fixed_timesteps(100, 16)])
        return torch.zeros_like(x_t)

    reference_losses(spy, s, [x], timesteps=16, n=4000, chunk=1000)
    assert len(seen) >= 4 and all(int(c.min()) == int(c.max()) > 0 for c in seen)
    assert sum(int(c.sum()) for c in seen) <= 4000


def test_class_restricted_constraint_samples_keep_only_those_classes(monkeypatch):
    """q_1 restricted to some classes: drawn in rounds until n_constraint kept, all of the wanted
    classes; a model that never makes them is a clear error."""
    import condiff.classifier
    from condiff.dual import experiments as ex

    class FakeJudge:  # "class" = the sample's value mod 9: never a 9
        def __init__(self, device="cpu"):
            pass

        def probs(self, x):
            return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long() % 9, 10).double()

    def fake_samples(net, schedule, n, steps, seed, device):
        return (torch.arange(n) + seed).double().view(n, 1, 1, 1).expand(n, 1, 8, 8).clone()

    monkeypatch.setattr(condiff.classifier, "DigitsJudge", FakeJudge)
    monkeypatch.setattr(ex, "_samples", fake_samples)
    cfg = ex.FinetuneConfig(n_constraint=25, constraint_classes=(3, 7))
    q1 = ex._constraint_samples(None, None, cfg, "cpu")
    assert q1.shape == (25, 1, 8, 8)
    assert set((q1[:, 0, 0, 0].long() % 9).tolist()) == {3, 7}
    with pytest.raises(ValueError, match=r"made only 0 samples of classes \[9\] in 2 x 5 draws"):
        ex._constraint_samples(None, None, ex.FinetuneConfig(n_constraint=5, constraint_classes=(9,),
                                                             constraint_rounds=2), "cpu")
    with pytest.raises(ValueError, match=r"constraint_classes must be a non-empty list of distinct digits 0-9, "
                                         r"got \(3, 10\)"):
        ex.run_finetune(ex.FinetuneConfig(constraint_classes=(3, 10)), "/nonexistent/never-written")


def test_dual_data_must_be_finite():
    from condiff.dual import Constraint, DualObjective

    with pytest.raises(ValueError, match="non-finite"):
        Constraint("a", torch.full((5, 2), float("nan")), 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        DualObjective(torch.full((4, 2), float("nan")), [], Schedule.linear(10), 2)
    # and floating-point: integer data trained on the noise alone
    with pytest.raises(TypeError, match="constraint 'a': data must be a floating-point tensor"):
        Constraint("a", torch.ones(5, 2, dtype=torch.long), 0.1)
    with pytest.raises(TypeError, match="objective data must be a floating-point tensor"):
        DualObjective(torch.ones(4, 2, dtype=torch.uint8), [], Schedule.linear(10), 2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 2.5"):
        DualObjective(torch.randn(4, 2), [], Schedule.linear(10), 2.5)


def test_memorisation_reduction_is_null_with_a_warning_when_plain_finetuning_memorised_nothing():
    from condiff.dual import experiments as ex

    assert ex.memorisation_reduction(0.8, 0.2) == pytest.approx(0.75)
    assert ex.memorisation_reduction(0.5, 0.5) == 0.0
    with pytest.warns(UserWarning, match="memorised none of the target images"):
        assert ex.memorisation_reduction(0.0, 0.1) is None


def test_theory_helpers_refuse_what_they_cannot_answer():
    from condiff.dual import class_frequencies, log_mass_bounds

    s = Schedule.linear(20)
    with pytest.raises(ValueError, match=r"expected x_t of shape \(B, 2\), got \(4, 1, 2, 2\)"):
        GaussianMixtureDenoiser(s, torch.zeros(1, 2), 0.4, torch.ones(1)).eps(torch.randn(4, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="weights must be finite and >= 0 with a positive sum"):
        GaussianMixtureDenoiser(s, torch.zeros(2, 2), 0.4, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="std must be a number >= 0, got nan"):
        GaussianMixtureDenoiser(s, torch.zeros(2, 2), float("nan"), torch.ones(2))
    freqs = class_frequencies(torch.tensor([1, 0, 1, 1]), 2)
    assert torch.equal(freqs, torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"labels must be a \(N,\) integer tensor in \[0, 2\).*values in \[0, 5\]"):
        class_frequencies(torch.tensor([5, 0]), 2)  # gave a vector of length 6
    losses, freqs = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="constrained must be a non-empty list of distinct class indices 0-2"):
        log_mass_bounds(losses, freqs, [-1], 0.3)  # wrapped to the last class


def test_lagrangian_weighs_each_active_constraint_by_its_own_lambda():
    """lam = [0, 2]: the first constraint is skipped and the second weighs 2 (not the first's 0); lam = [1, 2]
    normalised: (L0 + L1 + 2 L2) / (1 + 3)."""
    s, net = Schedule.linear(50), TimeMLP(2, hidden=16, depth=1)
    x = torch.randn(64, 2)
    cons = [Constraint("c1", torch.randn(16, 2) + 2, 1.0), Constraint("c2", torch.randn(16, 2) - 2, 1.0)]
    plain = DualObjective(x, cons, s, 8, DualConfig(normalize=False))
    plain.lam = torch.tensor([0.0, 2.0], dtype=torch.float64)
    total, logs = plain.loss(net, 0, torch.Generator().manual_seed(0))
    assert set(logs) == {"L0", "L/c2"}
    assert float(total.detach()) == pytest.approx(float(logs["L0"]) + 2 * float(logs["L/c2"]), rel=1e-6)
    mixed = DualObjective(x, cons, s, 8, DualConfig(normalize=True))
    mixed.lam = torch.tensor([1.0, 2.0], dtype=torch.float64)
    total, logs = mixed.loss(net, 0, torch.Generator().manual_seed(0))
    parts = [float(logs[k]) for k in ("L0", "L/c1", "L/c2")]
    assert float(total.detach()) == pytest.approx((parts[0] + parts[1] + 2 * parts[2]) / 4, rel=1e-6)


def test_the_first_dual_update_is_at_step_start():
    """every = 5, start = 10: lambda is unchanged after 9 primal steps and has moved after the 10th."""
    s, x = Schedule.linear(50), torch.randn(64, 2)
    obj = DualObjective(x, [Constraint("c", torch.randn(16, 2) + 3, 1e-6)], s, 8,  # violated: lambda moves
                        DualConfig(every=5, start=10, batch_size=16, timesteps=4))
    net = TimeMLP(2, hidden=8, depth=1)
    before = obj.lam.clone()
    for step in range(9):
        obj.after_step(net, step)
    assert torch.equal(obj.lam, before)
    obj.after_step(net, 9)
    assert not torch.equal(obj.lam, before)


def test_reference_losses_leave_the_network_in_its_mode():
    net = TimeMLP(2, hidden=8, depth=1).eval()
    reference_losses(net, Schedule.linear(20), [torch.randn(32, 2)], timesteps=4, n=32)
    assert not net.training
    reference_losses(net.train(), Schedule.linear(20), [torch.randn(32, 2)], timesteps=4, n=32)
    assert net.training


def test_select_with_an_offset_takes_the_next_examples():
    d = ArrayData(torch.arange(40, dtype=torch.float32).view(40, 1).repeat(1, 2), name="toy")
    first, later = select(d, n=10), select(d, n=5, offset=10)
    assert len(first) == 10 and len(later) == 5
    assert not set(first.x[:, 0].tolist()) & set(later.x[:, 0].tolist())
    assert set(select(d, n=15).x[:, 0].tolist()) == set(first.x[:, 0].tolist()) | set(later.x[:, 0].tolist())


@pytest.mark.parametrize("exp, key", [("toy", "relative=1.05"), ("fair", "target_freq=unset"),
                                      ("finetune", "pretrain.{")])
def test_experiment_help_is_plain_text_and_lists_its_settings(exp, key, capsys):
    """`condiff dual --help` showed reST (``fresh``, :func:`run_toy`) and the experiments' --set keys
    could only be found by making an error."""
    from condiff.cli.main import main

    for argv in (["dual", "--help"], ["dual", exp, "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text, argv
    assert key in " ".join(text.split())


def test_dual_train_logs_at_every_dual_update_unless_told_otherwise(tmp_path):
    """lambda.png and slack.png are drawn from the log; at the preset's 50 steps a line they showed every
    other update of the example's dual.every = 25 and hid lambda's rise from 0."""
    from pathlib import Path

    from condiff.cli.dual import resolve

    example = Path(__file__).resolve().parents[1] / "examples" / "dual" / "fair_digits.toml"
    assert resolve(example, [])["train"]["log_every"] == 25
    assert resolve(example, ["dual.every=10"])["train"]["log_every"] == 10
    assert resolve(example, ["train.log_every=50"])["train"]["log_every"] == 50  # the user's choice stands
    assert resolve(example, ["dual.every=100"])["train"].get("log_every", 50) == 50  # never sparser than 50
    f = tmp_path / "own.toml"
    f.write_text(example.read_text().replace("[train]", "[train]\nlog_every = 40", 1))
    assert resolve(f, [])["train"]["log_every"] == 40


def test_finetune_refuses_a_stale_fine_tuned_model_before_drawing_the_constraint_data(tmp_path, monkeypatch):
    """`dual finetune` drew its constraint data (minutes at the defaults) and only then refused a
    constrained model of other settings; the settings known before the draw (all but the bound) are now
    compared first."""
    import condiff.dual.experiments as ex
    from condiff.models import save_model

    cfg = ex.profile_config(ex.FinetuneConfig, "quick")
    pre_key = {"n_target": cfg.n_target, "target_classes": cfg.target_classes, "model": cfg.model, "T": cfg.T,
               "pretrain": cfg.pretrain, "seed": cfg.seed}
    out = tmp_path / "ft"
    save_model(out / "pretrained" / "model", ex._digits_net(cfg.model, cfg.seed), Schedule.linear(cfg.T),
               key=ex._key({"pretrain": pre_key}), data=ex.DIGITS_DATA, shape=[1, 8, 8])
    stage = out / "constrained"
    (stage / "model").mkdir(parents=True)
    old = {"constrained": {"pretrain": pre_key, "finetune": cfg.finetune}, "bound": 0.3,
           "n_constraint": cfg.n_constraint + 1}
    (stage / "key.json").write_text(ex._key(old))

    def no_draw(*a, **k):
        raise AssertionError("the constraint data were drawn before the refusal")

    monkeypatch.setattr(ex, "_constraint_samples", no_draw)
    with pytest.raises(FileExistsError, match=r"constrained holds a model trained with other settings \(.*"
                                              r"n_constraint.* differ\)"):
        ex.run_finetune(cfg, out, progress=False)
    # the bound alone is no reason before the draw (it is only known after it); afterwards it is
    ex.refuse_other_key(stage, {**old, "bound": 0.9}, unknown=("bound",))
    with pytest.raises(FileExistsError, match=r"\(bound differ\)"):
        ex.refuse_other_key(stage, {**old, "bound": 0.9})


def test_finetune_refuses_a_model_of_another_bound_before_any_fine_tuning(tmp_path, monkeypatch):
    """A constrained model that differs only in its bound (``relative``) was refused after the plain
    fine-tuning had trained; the bound is now compared as soon as the constraint data are at hand."""
    import condiff.dual.experiments as ex

    cfg = ex.profile_config(ex.FinetuneConfig, "quick")
    out, keys = tmp_path / "ft", {}

    class Stop(Exception):
        pass

    def fake_train(run_dir, net, objective, tcfg, schedule, key, *a, **k):
        if run_dir.name == "pretrained":
            return net.eval(), {}
        if run_dir.name == "plain" and not keys:
            return net.eval(), {}
        keys[run_dir.name] = key
        raise Stop(run_dir.name)

    monkeypatch.setattr(ex, "train_cached", fake_train)
    monkeypatch.setattr(ex, "_constraint_samples", lambda *a, **k: torch.rand(cfg.n_constraint, 1, 8, 8) * 2 - 1)
    (out / "pretrained" / "model").mkdir(parents=True)
    monkeypatch.setattr(ex, "load_net", lambda d, dev: (ex._digits_net(cfg.model, cfg.seed), {}))
    with pytest.raises(Stop, match="constrained"):
        ex.run_finetune(cfg, out, progress=False)
    stage = out / "constrained"
    (stage / "model").mkdir(parents=True)
    (stage / "key.json").write_text(ex._key({**keys["constrained"], "bound": 2 * keys["constrained"]["bound"]}))
    with pytest.raises(FileExistsError, match=r"constrained holds a model trained with other settings \(bound differ"):
        ex.run_finetune(cfg, out, progress=False)  # fake_train would raise Stop("plain") had it trained


def test_a_constraints_own_batch_size_sets_its_minibatch():
    seen = []

    def net(x_t, t):
        seen.append(x_t.shape[0])
        return torch.zeros_like(x_t)

    x = torch.randn(50, 2)
    obj = DualObjective(x, [Constraint("c", x, 1.0, 7), Constraint("d", x, 1.0)], Schedule.linear(20), 16,
                        DualConfig(lambda_init=1.0))  # at lambda 0 a constraint's term is not drawn
    obj.loss(net, 0, torch.Generator().manual_seed(0))
    assert seen == [16 + 7 + 16]  # one pass: the objective's 16, c's own 7, d's default (the objective's)


def test_cli_dual_train_fresh_sets_aside_its_metrics_and_an_interruption_names_restore(saved_figures, tmp_path, capsys,
                                                                                        monkeypatch):
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN_FILE)
    out = tmp_path / "run"
    figs = saved_figures()
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]) == 0
    assert _legends(figs)[out / "loss.png"] == DUAL_LEGEND
    metrics = (out / "metrics.json").read_bytes()
    (out / "pnp" / "digits-3").mkdir(parents=True)  # what `condiff pnp` writes of the model beside it by default
    from condiff.train import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    capsys.readouterr()
    assert main(["dual", "train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--fresh"]) == 130
    assert f"the run --fresh replaced is kept in {out / '.replaced'} (--restore in place of --fresh puts it back)" \
        in capsys.readouterr().err
    assert not (out / "metrics.json").exists() and (out / ".replaced" / "metrics.json").read_bytes() == metrics
    assert not (out / "pnp").exists() and (out / ".replaced" / "pnp" / "digits-3").is_dir()
    monkeypatch.undo()
    import condiff.cli.common as common

    drawn = []
    monkeypatch.setattr(common, "plot_loss_curve", lambda log, png, **kw: drawn.append(kw))
    assert main(["dual", "train", "--out", str(out), "--restore"]) == 0
    assert (out / "metrics.json").read_bytes() == metrics and not (out / ".replaced").exists()
    # the restored run's curves are redrawn as training drew them: the Lagrangian and L_0, each by name
    labels = {"loss": "Lagrangian (the loss stepped on)", "L0": "L_0: the objective's denoising loss"}
    assert drawn == [{"keys": ("loss", "L0"), "ylabel": "loss (mean over the log interval)", "labels": labels}]


def test_cli_experiment_takes_back_the_model_an_unfinished_fresh_set_aside(tmp_path, capsys, monkeypatch):
    """After a --fresh cut short, the command run again with the old settings was refused ('other settings'),
    the old model waiting in .replaced unnamed; with nothing of the attempt's to lose it comes back, and with
    the attempt's checkpoints the refusal names it."""
    out = tmp_path / "toy"
    tiny = ["--set", "n=400", "--set", "n_samples=200", "--set", "hidden=16", "--set", "T=20",
            "--set", "dual.timesteps=4", "--set", "dual.start=10", "--set", "dual.every=5"]
    assert main(["dual", "toy", "--out", str(out), *tiny, "--set", "steps=20"]) == 0
    model = {q.name: q.read_bytes() for q in (out / "constrained" / "model").iterdir()}
    from condiff.train import Trainer

    def cut(self):  # the attempt: a checkpoint, then a Ctrl-C
        (self.run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)
        (self.run_dir / "checkpoints" / "step_00000010" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", cut)
        assert main(["dual", "toy", "--out", str(out), *tiny, "--set", "steps=30", "--fresh"]) == 130
    capsys.readouterr()
    assert main(["dual", "toy", "--out", str(out), *tiny, "--set", "steps=20"]) == 2
    assert (f"{out / 'constrained'} holds an unfinished model of other settings, and "
            f"{out / '.replaced' / 'constrained'} the model of these settings") in capsys.readouterr().err
    shutil.rmtree(out / "constrained" / "checkpoints")  # nothing of the attempt's left: it comes back by itself
    assert main(["dual", "toy", "--out", str(out), *tiny, "--set", "steps=20"]) == 0
    err = capsys.readouterr().err
    assert "restored the model of these settings" in err and "training constrained" not in err
    assert {q.name: q.read_bytes() for q in (out / "constrained" / "model").iterdir()} == model
    assert not (out / ".replaced").exists()


def test_resuming_dual_training_under_constraints_of_other_names_is_refused_and_moved_bounds_said(tmp_path):
    """Only the number of constraints was checked: the lambdas of "a" went on as those of "b", and new bounds
    were taken without a word."""
    s, x = Schedule.linear(50), torch.randn(64, 2)
    qa, qb = torch.randn(32, 2) + 2, torch.randn(32, 2) - 2

    def trainer(cs, steps):
        obj = DualObjective(x, cs, s, 16, DualConfig(every=5, batch_size=32))
        return Trainer(TimeMLP(2, hidden=8, depth=1), obj,  # (a constant rate: going on to 20 steps is no warning)
                       TrainConfig(steps=steps, warmup=0, ckpt_every=10, progress=False, lr_decay="constant"), tmp_path)

    first = trainer([Constraint("a", qa, 0.3), Constraint("b", qb, 0.3)], 10)
    first.fit()
    with pytest.raises(ValueError, match=r"written for constraints named \['a', 'b'\], not \['b', 'zzz'\]"):
        trainer([Constraint("b", qb, 0.3), Constraint("zzz", x, 0.3)], 20).resume()
    # a bound that moved (one relative to a reference loss is computed again at each start): said, and gone on
    again = trainer([Constraint("a", qa, 0.3), Constraint("b", qb, 0.9)], 20)
    with pytest.warns(UserWarning, match=r"bounds differ from those this checkpoint was trained under \(b 0.3 -> "
                                         r"0.9\)"):
        assert again.resume()
    assert again.objective.lambdas == first.objective.lambdas
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same bounds, other data: on, without a word
        assert trainer([Constraint("a", qa * 1.1, 0.3), Constraint("b", qb, 0.3)], 20).resume()


def test_dual_objective_names_arguments_of_the_wrong_kind():
    s, x = Schedule.linear(50), torch.randn(16, 2)
    c = Constraint("a", torch.randn(8, 2), 0.1)
    for args, kind, msg in (((x, [c], s, 8, {"every": 5}), TypeError, "settings are a DualConfig .*got dict"),
                            ((ArrayData(x), [c], s, 8), TypeError, r"a torch tensor \(N, \.\.\.\) \(its \.x\)"),
                            ((x, c, s, 8), TypeError, "constraints must be a list of condiff.dual.Constraint"),
                            ((x, [("a", x, 0.1)], s, 8), TypeError, "got tuple"),
                            ((x, [c], None, 8), TypeError, "needs the noise schedule")):
        with pytest.raises(kind, match=msg):
            DualObjective(*args)


def test_select_and_keep_fraction_refuse_labels_and_arguments_that_are_not_whole_classes():
    """select(classes=[4.5]) and keep_fraction({4.7: 0.1}) were read as class 4, without a word."""
    data = load_digits("train")
    for call, msg in ((lambda: select(data, classes=[4.5]), "a class label is a whole number >= 0, got 4.5"),
                      (lambda: keep_fraction(data, {4.7: 0.1}), "a class label is a whole number >= 0, got 4.7"),
                      (lambda: select(data, classes=4), "classes must be a non-empty list of class labels, got 4"),
                      (lambda: select(data, classes=["four"]), "a class label is a whole number >= 0, got 'four'"),
                      (lambda: select(data, n=2.5), r"need whole numbers offset >= 0 and n >= 1, got offset=0, n=2.5"),
                      (lambda: keep_fraction(data, [(4, 0.1)]), "keep maps each class to the fraction of it kept"),
                      (lambda: keep_fraction(data, {4: "a"}), "the kept fraction of class 4 must lie in")):
        with pytest.raises(DataError, match=msg):
            call()
    with pytest.raises(TypeError, match="select takes a labelled data set, a condiff.data.ArrayData"):
        select(data.x, classes=[4])
    fours = int((data.y == 4).sum())
    for classes in (torch.tensor([4]), [4.0], range(4, 5), {4}, ["4"]):  # a tensor, 4.0, a range, a set, a JSON key
        assert len(select(data, classes=classes)) == fours
    assert len(keep_fraction(data, {"4": 0.5})) == len(data) - fours + round(0.5 * fours)


def test_select_and_keep_fraction_edge_cases():
    """A selection one past the end was taken short; each class is shuffled by its own seed; a tiny fraction
    keeps one example; the fine-tuning source holds every training image but the targets."""
    from types import SimpleNamespace

    from condiff.dual.data import keep_fraction, select
    from condiff.dual.experiments import finetune_data

    d = ArrayData(torch.arange(40.0)[:, None], y=torch.arange(40) % 2)
    with pytest.raises(DataError, match=r"asked for examples \[1, 41\) of 40"):
        select(d, n=40, offset=1)
    assert len(select(d, n=39, offset=1)) == 39
    kept = keep_fraction(d, {0: 0.5, 1: 0.5})
    ranks = [sorted(int(i) // 2 for i in kept.x[:, 0] if int(i) % 2 == c) for c in (0, 1)]  # x holds the index
    assert len(ranks[0]) == len(ranks[1]) == 10 and ranks[0] != ranks[1]  # not one shuffle for both classes
    assert (keep_fraction(d, {1: 1e-6}).y == 1).sum() == 1
    source, target, _ = finetune_data(SimpleNamespace(target_classes=None, n_target=30, seed=0))
    train = load_digits("train")
    assert not set(source.meta["indices"]) & set(target.meta["indices"])
    assert len(source) + len(target) == len(train)


def test_cli_dual_train_records_absolute_paths_and_resumes_from_another_directory(tmp_path, capsys, monkeypatch):
    """A run whose config named files relative to the working directory resumed only from that directory."""
    import numpy as np

    from condiff.data import load_toy2d

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pts = load_toy2d("train", kind="gmm", components=2, weights=[0.5, 0.5], n=200)
    np.savez(tmp_path / "a" / "mode.npz", x=pts.x[pts.y == 1].numpy())
    text = RUN_FILE.replace('data = "objective"\nclasses = [1]', 'data = "mode.npz"')
    (tmp_path / "a" / "run.toml").write_text(text)
    monkeypatch.chdir(tmp_path / "a")
    assert main(["dual", "train", "--config", "run.toml", "--out", "../run", "--device", "cpu"]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["constraint"][0]["data"] == str(tmp_path / "a" / "mode.npz")
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert main(["dual", "train", "--out", str(tmp_path / "run"), "--device", "cpu", "--resume",
                 "--set", "train.steps=40"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 40


def test_a_dual_run_recorded_with_relative_paths_still_resumes_and_names_keep_their_words(tmp_path, capsys,
                                                                                         monkeypatch):
    """Runs recorded before paths were made absolute hold them as typed: resumed from their directory, they were
    refused as "trained on other objective data"; and a mistyped data set's name read as a missing file."""
    import numpy as np

    from condiff.cli.dual import absolute_paths
    from condiff.data import load_toy2d

    monkeypatch.chdir(tmp_path)
    pts = load_toy2d("train", kind="gmm", components=2, weights=[0.9, 0.1], n=300)
    np.savez(tmp_path / "all.npz", x=pts.x.numpy(), y=pts.y.numpy())
    text = RUN_FILE + '\n[objective]\ndata = "all.npz"\n'
    (tmp_path / "run.toml").write_text(text)
    assert main(["dual", "train", "--config", "run.toml", "--out", "run", "--device", "cpu"]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["objective"]["data"] == str(tmp_path / "all.npz")
    recorded["objective"]["data"] = "all.npz"  # as a run recorded before 2026-12-06 holds it
    (tmp_path / "run" / "config.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["dual", "train", "--config", "run.toml", "--out", "run", "--device", "cpu", "--resume",
                 "--set", "train.steps=40"]) == 0, capsys.readouterr().err
    cfg = absolute_paths({"objective": {"data": "toy2"}, "constraint": [{"data": "objective", "model": "nosuch"}],
                          "dual": {"init": "run"}})
    assert cfg == {"objective": {"data": "toy2"}, "constraint": [{"data": "objective", "model": "nosuch"}],
                   "dual": {"init": str(tmp_path / "run")}}  # only what exists is a path


def test_toy_warm_up_shortens_with_a_short_run():
    """A 40-step toy run warned that its 100-step warm-up never ended, naming a --set that toy does not take."""
    from condiff.dual.experiments import ToyConfig

    assert ToyConfig(steps=40).train_config("cpu").warmup == 4
    assert ToyConfig(steps=3000).train_config("cpu").warmup == 100
