"""Plug-and-play inference against the Gaussian oracle, its schedules, constraints and segmentation."""

import math
import re

import numpy as np
import pytest
import torch

from condiff.data import load_dataset
from condiff.data.scenes import make_scenes, split_scene
from condiff.denoiser import GaussianDenoiser
from condiff.guidance import DPS
from condiff.pnp import schedules as sch
from condiff.pnp.conditional import ClassConstraint, MirrorSymmetry, mean_pairwise_distance, within_class_diversity
from condiff.pnp.engine import denoising_term, finish, infer
from condiff.pnp.segmentation import iou, kmeans_segment, otsu_segment, segment, vote
from condiff.readback import READ_EVERY
from condiff.schedule import Schedule

M, S = 0.3, 0.1  # the oracle prior N(M, S^2 I)


def oracle(T=1000):
    return GaussianDenoiser(Schedule.linear(T), mean=M, std=S)


def stationary_point(abar, target, w, through_net):
    """Minimiser of E F for the prior N(M, S^2 I) and the constraint ||x - target||^2 / n.

    With v = a S^2 + 1 - a the expected denoising gradient is 2 k (x - M) / n, where
    k = a (1 - a) / v^2 through the network and k = a sqrt(1 - a) / v with the stop-gradient,
    so x* = (k M + w target) / (k + w)."""
    a, v = abar, abar * S**2 + 1 - abar
    k = a * (1 - a) / v**2 if through_net else a * math.sqrt(1 - a) / v
    return (k * M + w * target) / (k + w)


# --- schedules ---------------------------------------------------------------------------------------


def test_paper_anneal_formula_and_range():
    T, S_ = 1000, 1000
    ts = sch.timesteps(sch.PAPER_MNIST, S_, T)
    assert ts[0] == T - 1  # (S + S/4) / S * T is clipped to T - 1
    i = 300
    expect = int(((S_ - i) + math.floor((S_ - i) / 4) * math.cos(i / 50)) / S_ * T)
    assert ts[i] == expect
    assert int(ts.min()) >= 1 and ts[-1] == 1
    # the wobble revisits higher t, but the trend falls: quarter means decrease
    q = ts.float().view(4, -1).mean(1)
    assert bool((q[1:] < q[:-1]).all())
    assert sch.timesteps(sch.PAPER_TSP, 256, T)[100] == int((156 + 52 * math.cos(2.0)) / 256 * T)


def test_linear_schedules_and_weights():
    ts = sch.timesteps(sch.LinearAnneal(0.5, 0.0), 11, 1000)
    assert ts[0] == 500 and ts[-1] == 1 and bool((ts[1:] <= ts[:-1]).all())
    w = sch.PAPER_MNIST_WEIGHT
    assert w(0, 100) == pytest.approx(0.01) and w(50, 100) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="outside"):
        sch.ConstantTime(1000)(0, 10, 1000)
    with pytest.raises(ValueError, match="divisor"):
        sch.PaperAnneal(divisor=0)
    with pytest.raises(ValueError, match=r"t_min=1000 must be in \[0, T\)"):  # would pin t at T-1
        sch.PaperAnneal(t_min=1000)(0, 10, 1000)
    for bad in (lambda: sch.ConstantWeight(-5), lambda: sch.LinearWeight(float("nan"), 0.0)):
        with pytest.raises(ValueError, match="must be a number >= 0"):
            bad()


# --- the objective --------------------------------------------------------------------------------------


@pytest.mark.parametrize("through_net", [True, False])
def test_denoising_term_value_and_gradient_closed_form(through_net):
    den, t = oracle(), 300
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g).requires_grad_(True)
    eps = torch.randn(3, 5, generator=g)
    tt = torch.full((3,), t)
    d = denoising_term(den, x, tt, eps, through_net)
    a = float(den.schedule.abar[t])
    v = a * S**2 + 1 - a
    x_t = math.sqrt(a) * x.detach() + math.sqrt(1 - a) * eps
    eps_hat = math.sqrt(1 - a) * (x_t - math.sqrt(a) * M) / v
    assert torch.allclose(d.detach(), (eps - eps_hat).pow(2).mean(1), atol=1e-6)
    (grad,) = torch.autograd.grad(d.sum(), x)
    # through the net: d/dx ||eps - eps_hat||^2 / n = 2 (eps_hat - eps) J sqrt(a) / n with J = sqrt(1-a)/v
    jac = math.sqrt(1 - a) / v if through_net else 1.0
    assert torch.allclose(grad, 2 * math.sqrt(a) * jac * (eps_hat - eps) / 5, atol=1e-6)


@pytest.mark.parametrize("through_net", [True, False])
def test_infer_converges_to_the_gaussian_stationary_point(through_net):
    den, t, w, target = oracle(), 300, 0.2, -0.5
    res = infer(den, torch.zeros(64, 4), constraint=lambda x: (x - target).pow(2).mean(1),
                schedule=sch.ConstantTime(t), weight=sch.ConstantWeight(w), steps=120, lr=0.02,
                through_net=through_net, generator=torch.Generator().manual_seed(0))
    expect = stationary_point(float(den.schedule.abar[t]), target, w, through_net)
    other = stationary_point(float(den.schedule.abar[t]), target, w, not through_net)
    assert abs(expect - other) > 0.02  # the two variants are told apart
    assert float(res.x.mean()) == pytest.approx(expect, abs=0.003)  # observed errors < 0.001
    assert len(res.denoise) == 120 and res.nfe == 120 and res.t == [t] * 120


@pytest.mark.parametrize("start", [60, 200])
def test_finish_samples_the_gaussian_posterior_given_the_renoised_point(start):
    """Re-noised to ``a = abar_start`` and sampled back exactly, a point ``x_in`` under the prior N(M, S^2)
    ends at mean ``M + a S^2 (x_in - M) / v`` and variance ``S^2 (1 - a)(v + a S^2) / v^2``, v = a S^2 + 1 - a."""
    den, x_in = oracle(), -0.5
    out = finish(den, torch.full((4096, 8), x_in), start, steps=start + 1, clip_x0=None,
                 generator=torch.Generator().manual_seed(0))
    a = float(den.schedule.abar[start])
    v = a * S**2 + 1 - a
    assert abs(a * S**2 * (x_in - M) / v) > 0.01  # the point is remembered: the mean is not the prior's
    assert float(out.mean()) == pytest.approx(M + a * S**2 * (x_in - M) / v, abs=0.003)
    assert float(out.std()) == pytest.approx(math.sqrt(S**2 * (1 - a) * (v + a * S**2)) / v, rel=0.06)


def test_finish_applies_guidance_and_rejects_bad_input():
    den, x = oracle(), torch.zeros(256, 4)
    kw = dict(steps=21, generator=torch.Generator().manual_seed(0))
    free = finish(den, x, 200, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    pulled = finish(den, x, 200, guidance=DPS(lambda x0: (x0 - 1.0).pow(2).sum(1), zeta=0.5), **kw)
    assert float(free.mean()) == pytest.approx(M, abs=0.05)  # unguided: the prior's mean
    assert float(pulled.mean()) == pytest.approx(1.0, abs=0.05)  # guided: pulled to the loss's minimum
    for bad, needle in [(dict(start=1000), "start"), (dict(start=-1), "start"), (dict(start=10, steps=12), "steps"),
                        (dict(start=10, steps=0), "steps")]:
        with pytest.raises(ValueError, match=needle):
            finish(den, x, **bad)
    short = oracle(50)
    assert finish(short, x[:4], 20).shape == (4, 4)  # the default step count fits a short schedule (21, not 41)


def test_chains_are_independent():
    den = oracle(200)
    z = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    z2 = z.clone()
    z2[1] = 5.0
    kw = dict(schedule=sch.LinearAnneal(0.8, 0.0), steps=20, lr=0.05, constraint=lambda x: x.pow(2).sum(1))
    a = infer(den, z, generator=torch.Generator().manual_seed(3), **kw)
    b = infer(den, z2, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.x[0], b.x[0]) and not torch.equal(a.x[1], b.x[1])


def test_infer_with_a_render_and_projection():
    den = oracle(200)
    # optimise a scalar per chain that renders to a constant picture; the prior pulls it towards M
    res = infer(den, torch.zeros(64, 1), render=lambda z: z[:, :, None, None].expand(-1, 1, 4, 4),
                schedule=sch.ConstantTime(50), steps=200, lr=0.02, project=lambda z: z.clamp(max=0.2),
                generator=torch.Generator().manual_seed(0))
    assert res.x.shape == (64, 1, 4, 4) and res.latent.shape == (64, 1)
    # the prior's optimum (M = 0.3) lies beyond the projection's bound: every chain ends on the bound
    torch.testing.assert_close(res.latent, torch.full((64, 1), 0.2), atol=1e-3, rtol=0)


def test_infer_works_under_no_grad():
    kw = dict(schedule=sch.ConstantTime(50), steps=3, lr=0.1)
    with torch.no_grad():
        res = infer(oracle(100), torch.zeros(2, 3), generator=torch.Generator().manual_seed(0), **kw)
    same = infer(oracle(100), torch.zeros(2, 3), generator=torch.Generator().manual_seed(0), **kw)
    assert float(res.latent.abs().sum()) > 0 and torch.equal(res.latent, same.latent)  # moved, as with grad on


@pytest.mark.parametrize("read_every", [1, 4])  # 4: the GPU path (values read from the device in blocks)
def test_infer_rejects_bad_input(monkeypatch, read_every):
    monkeypatch.setitem(READ_EVERY, "cpu", read_every)
    den = oracle(100)
    with pytest.raises(ValueError, match="steps"):
        infer(den, torch.zeros(2, 3), steps=0)
    for constraint, weight, got in ((lambda x: x, 1.0, "shape (2, 3)"), (lambda x: 0.5, 1.0, "a float"),
                                    (lambda x: x, 0.0, "shape (2, 3)")):  # weight 0: read, not followed
        with pytest.raises(ValueError, match=re.escape(f"constraint must return one value per sample, a tensor "
                                                       f"of shape (2,), got {got}")):
            infer(den, torch.zeros(2, 3), constraint=constraint, weight=sch.ConstantWeight(weight), steps=1)
    with pytest.raises(ValueError, match="lr"):
        infer(den, torch.zeros(2, 3), lr=0.0)
    for betas in ((0.9,), 0.9, (0.9, 1.0), ("a", 0.9)):
        with pytest.raises(ValueError, match=re.escape(f"betas must be two numbers in [0, 1) (Adam's), got {betas!r}")):
            infer(den, torch.zeros(2, 3), betas=betas, steps=1)
    for latent in (torch.zeros(3), torch.zeros(()), torch.zeros(0, 3)):
        with pytest.raises(ValueError, match=r"starting latent must be a batch \(B, ...\) with B >= 1"):
            infer(den, latent, steps=1)
    with pytest.raises(ValueError, match=r"project must return the latent's shape \(2, 3\), got shape \(2, 2\)"):
        infer(den, torch.zeros(2, 3), project=lambda z: z[:, :2], steps=1)
    with pytest.raises(ValueError, match="starting latent holds NaN"):
        infer(den, torch.full((2, 3), float("nan")), steps=1)
    # a non-finite gradient names its source: a constraint that turns NaN late, one whose gradient
    # alone is not finite (sqrt at 0), a learning rate that blows the samples up
    calls = []

    def late_nan(x):
        calls.append(1)
        return x.pow(2).sum(1) * (float("nan") if len(calls) > 3 else 1.0)

    with pytest.raises(FloatingPointError, match=r"step 3 .*the constraint returned non-finite values"):
        infer(den, torch.zeros(2, 3), constraint=late_nan, steps=10)
    with pytest.raises(FloatingPointError, match="step 0 .*check the constraint's gradient"):
        infer(den, torch.zeros(2, 3), constraint=lambda x: x.pow(2).sum(1).sqrt(), steps=2)
    with pytest.raises(FloatingPointError, match="samples are not finite; lower the learning rate"):
        infer(den, torch.zeros(2, 3), constraint=lambda x: x.pow(2).sum(1), render=lambda z: z * 1e300, steps=2)

    def strict(x):  # a user's constraint that refuses the NaN samples a bad step leaves
        if not bool(torch.isfinite(x).all()):
            raise ValueError("my constraint got non-finite samples")
        return x.pow(2).sum(1).sqrt()

    with pytest.raises(FloatingPointError, match="step 0 .*check the constraint's gradient"):
        infer(den, torch.zeros(2, 3), constraint=strict, steps=6)  # the cause is named, not the consequence


def test_infer_traces_are_the_same_whether_read_each_step_or_in_blocks(monkeypatch):
    runs = []
    for every in (1, 4):
        monkeypatch.setitem(READ_EVERY, "cpu", every)
        res = infer(oracle(100), torch.zeros(3, 2), constraint=lambda x: (x - 1).pow(2).sum(1),
                    weight=lambda i, n: 0.0 if i % 3 == 0 else 0.5, steps=10, lr=0.05,
                    generator=torch.Generator().manual_seed(0))
        runs.append(res)
    a, b = runs
    assert len(a.denoise) == len(a.constraint) == 10 and all(isinstance(v, float) for v in a.constraint)
    assert (a.denoise, a.constraint, a.t, a.w) == (b.denoise, b.constraint, b.t, b.w)
    assert torch.equal(a.x, b.x)


def test_infer_with_a_diffusers_denoiser_both_gradient_variants(tiny_diffusers_denoiser):
    den = tiny_diffusers_denoiser
    den.unet.requires_grad_(False)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 40)
    full, stop = (denoising_term(den, x, t, eps, v) for v in (True, False))
    assert torch.allclose(full, stop)  # same value; the gradients differ by the network's Jacobian
    g_full, g_stop = (torch.autograd.grad(d.sum(), x)[0] for d in (full, stop))
    assert not torch.allclose(g_full, g_stop)
    res = infer(den, x.detach(), constraint=MirrorSymmetry(-1), schedule=sch.LinearAnneal(0.5, 0.0), steps=3,
                lr=0.05, generator=torch.Generator().manual_seed(2))
    assert res.x.shape == (2, 1, 8, 8) and res.nfe == 3 and not torch.equal(res.x, x.detach())
    assert all(p.grad is None for p in den.unet.parameters())  # the prior stays fixed


# --- constraints ---------------------------------------------------------------------------------------


def test_mirror_symmetry_is_zero_exactly_on_symmetric_pictures():
    x = torch.randn(3, 1, 4, 4)
    sym = x + x.flip(-1)
    assert torch.allclose(MirrorSymmetry(-1)(sym), torch.zeros(3))
    assert bool((MirrorSymmetry(-1)(x) > 0).all())
    assert float(MirrorSymmetry(-2)(sym).min()) > 0
    with pytest.raises(ValueError, match="axis"):
        MirrorSymmetry(0)


def test_class_constraint_is_negative_log_probability():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    log_prob = lambda x, y: (x * 0 + logits).log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    c = ClassConstraint(log_prob, 1)(torch.zeros(2, 2))
    assert torch.allclose(c, torch.tensor([-math.log(0.75), -math.log(0.25)]))
    with pytest.raises(ValueError, match="labels"):
        ClassConstraint(log_prob, torch.tensor([0, 1, 1]))(torch.zeros(2, 2))


def test_mean_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert mean_pairwise_distance(x) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        mean_pairwise_distance(x[:1])
    # per class, then averaged: class 0 at distance 5, class 1 at distance 1, a lone class 2 left out
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [9.0, 9.0]])
    assert within_class_diversity(pts, torch.tensor([0, 0, 1, 1, 2])) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least 2"):
        within_class_diversity(pts, torch.arange(5))


# --- segmentation ---------------------------------------------------------------------------------------


def test_iou_closed_form():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, 0, :2], b[0, 0, 1:3] = True, True  # 8 and 8 pixels, 4 shared -> 4 / 12
    assert torch.allclose(iou(a, b), torch.tensor([1 / 3, 1.0], dtype=torch.float64))


def test_baselines_segment_a_clean_two_tone_scene():
    img = torch.full((1, 3, 12, 12), -0.5)
    truth = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    truth[..., 3:8, 4:9] = True
    img = torch.where(truth, torch.tensor(0.6), img)
    assert float(iou(otsu_segment(img), truth)) == 1.0
    assert float(iou(kmeans_segment(img), truth)) == 1.0
    # a dark shape on a bright background: still the inner region is foreground
    assert float(iou(kmeans_segment(-img), truth)) == 1.0
    img[0, 1, 2, 2] = float("nan")  # k-means gave an empty mask; segment blamed the learning rate
    for run in (kmeans_segment, otsu_segment, lambda x: segment(oracle(200), x, chains=1, steps=2)):
        with pytest.raises(ValueError, match="the images hold NaN or inf values"):
            run(img)


def test_scenes_are_deterministic_and_consistent():
    d = load_dataset("scenes", "test", n=8, size=16)
    assert d.x.shape == (8, 4, 16, 16) and torch.equal(d.x, load_dataset("scenes", "test", n=8, size=16).x)
    img, mask = split_scene(d.x)
    assert set(mask.unique().tolist()) <= {-1.0, 1.0}
    assert float(img.abs().max()) <= 1.0
    assert 0.02 < float((mask > 0).float().mean()) < 0.6
    assert not torch.equal(load_dataset("scenes", "train", n=8, size=16).x, d.x)
    with pytest.raises(ValueError, match="n >= 1"):
        make_scenes(0)


def test_segment_infers_the_mask_channel_only():
    # prior: picture channels ~ N(0.3, .1^2) and a mask channel that the prior pushes towards 0.3 > 0
    den = oracle(200)
    pics = torch.randn(2, 3, 8, 8)
    res = segment(den, pics, chains=3, steps=60, lr=0.05, generator=torch.Generator().manual_seed(0))
    assert res.soft.shape == (2, 1, 8, 8) and res.mask.dtype == torch.bool
    assert float(res.soft.abs().max()) <= 1.0 and bool(res.mask.all())
    assert res.nfe == 60
    # in batches of pictures: the same result where one batch holds them all; the same shapes and the
    # chains of each picture kept together otherwise, one search per batch
    same = segment(den, pics, chains=3, steps=60, lr=0.05, generator=torch.Generator().manual_seed(0), batch_size=2)
    assert torch.equal(same.latents, res.latents)
    one = segment(den, pics, chains=3, steps=60, lr=0.05, generator=torch.Generator().manual_seed(0), batch_size=1)
    assert one.latents.shape == res.latents.shape and one.nfe == 120 and bool(one.mask.all())
    first = segment(den, pics[:1], chains=3, steps=60, lr=0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one.latents[:1], first.latents)


class _Correlated(GaussianDenoiser):
    """Exact denoiser for 4-channel pixels x0 ~ N(0, C) (independent across pixels), the mask channel
    (3) correlated ``rho`` with picture channel 0: the posterior mask mean is ``rho * picture_0``."""

    def __init__(self, schedule, rho):
        super().__init__(schedule)
        self.C = torch.eye(4)
        self.C[0, 3] = self.C[3, 0] = rho

    def predict_eps(self, x_t, t):
        a = self.schedule.abar_at(t, x_t).view(-1, 1, 1)
        cov = a * self.C + (1 - a) * torch.eye(4)  # of x_t, per pixel
        z = torch.linalg.solve(cov[:, None, None], x_t.permute(0, 2, 3, 1)[..., None])[..., 0]
        return (1 - a).sqrt().view(-1, 1, 1, 1) * z.permute(0, 3, 1, 2)


@pytest.mark.parametrize("rho", [0.9, -0.9])
def test_segment_reads_the_mask_off_the_pictures(rho):
    """With a prior that ties the mask to picture channel 0, the inferred mask follows that channel's
    sign (times rho's) on most pixels: the search conditions on the pictures (measured: 92-93%)."""
    pics = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = segment(_Correlated(Schedule.linear(200), rho), pics, chains=3, steps=60, lr=0.05,
                  generator=torch.Generator().manual_seed(0))
    assert float((res.mask == (rho * pics[:, :1] > 0)).float().mean()) > 0.85


def test_segment_votes_count_the_chains():
    den, pics = oracle(200), torch.randn(3, 3, 8, 8)
    masks = {}
    for votes in (1, 2, 4):
        res = segment(den, pics, chains=4, steps=2, votes=votes, generator=torch.Generator().manual_seed(0))
        assert res.latents.shape == (3, 4, 1, 8, 8)
        assert torch.equal(res.mask, (res.latents > 0).sum(1) >= votes)
        masks[votes] = res.mask
    # after two steps from N(0, I) the chains still disagree: union > 2 of 4 > intersection, nested
    assert int(masks[1].sum()) > int(masks[2].sum()) > int(masks[4].sum())
    assert bool((masks[4] <= masks[2]).all()) and bool((masks[2] <= masks[1]).all())
    for bad in (0, 5):
        with pytest.raises(ValueError, match="votes must be between 1 and chains"):
            segment(den, pics, chains=4, steps=1, votes=bad)
    with pytest.raises(ValueError, match="votes must be between 1 and chains"):
        vote(res.latents, 5)


# --- command line --------------------------------------------------------------------------------------


def tiny_prior(path, channels, size, data):
    from condiff.models import save_model
    from condiff.nets import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=channels, base=8, mults=(1, 2))
    return save_model(path, net, Schedule.linear(100), data=data, shape=[channels, size, size])


def test_cli_tsp_and_segment_write_pictures_and_metrics(tmp_path, capsys):
    import json

    from condiff.cli.main import main

    tiny_prior(tmp_path / "tours", 1, 16, {"name": "tours", "size": 16, "cities": [5]})
    assert main(["pnp", "tsp", "--ckpt", str(tmp_path / "tours"), "--n", "2", "--cities", "6", "--steps", "3",
                 "--chains", "2", "--out", str(tmp_path / "tsp")]) == 0
    err = capsys.readouterr().err  # a city count beyond the prior's is said, and the reference solve announced
    assert "learned tours of [5] cities; 6 is beyond them" in err and "solving the 2 instances of 6 cities" in err
    m = json.loads((tmp_path / "tsp" / "metrics.json").read_text())
    assert m["n"] == 2 and len(m["gaps"]) == 2 and min(m["gaps"]) > -1e-6
    assert (tmp_path / "tsp" / "tours.png").is_file() and (tmp_path / "tsp" / "pictures.png").is_file()
    with np.load(tmp_path / "tsp" / "tours.npz") as z:  # the tours as arrays, agreeing with the metrics
        assert z["coords"].shape == (2, 6, 2) and sorted(z["tours"][0]) == list(range(6))
        assert np.allclose(z["lengths"] / z["optimal_lengths"] - 1, m["gaps"])

    # --train beside a prior of one's own (not the default one) uses it as it is, where it was refused
    capsys.readouterr()
    assert main(["pnp", "tsp", "--ckpt", str(tmp_path / "tours"), "--n", "1", "--cities", "6", "--steps", "3",
                 "--train", "--out", str(tmp_path / "tsp-own")]) == 0
    assert "holds a prior of other settings than the default tsp prior; using it as it is" in capsys.readouterr().err
    tiny_prior(tmp_path / "scenes", 4, 16, {"name": "scenes", "size": 16})
    assert main(["pnp", "segment", "--ckpt", str(tmp_path / "scenes"), "--n", "3", "--chains", "2",
                 "--steps", "3", "--out", str(tmp_path / "seg")]) == 0
    m = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert 0.0 <= m["iou_pnp"] <= 1.0 and 0.0 <= m["iou_kmeans"] <= 1.0
    assert (tmp_path / "seg" / "segment.png").is_file()
    with np.load(tmp_path / "seg" / "masks.npz") as z:  # the masks as arrays, agreeing with the metrics
        assert z["mask"].shape == z["truth"].shape == (3, 1, 16, 16) and z["mask"].dtype == bool
        inter, union = (z["mask"] & z["truth"]).sum((1, 2, 3)), (z["mask"] | z["truth"]).sum((1, 2, 3))
        assert np.allclose(z["iou"], np.where(union > 0, inter / np.maximum(union, 1), 1.0))
        assert z["iou"].mean() == pytest.approx(m["iou_pnp"])


def test_cli_any_constraint_from_a_users_file_lowers_its_distance(tmp_path):
    import json

    from condiff.cli.main import main

    tiny_prior(tmp_path / "prior", 1, 8, {"name": "digits"})
    (tmp_path / "con.py").write_text("def grey(x):\n    return (x.flatten(1).mean(1) - 0.5).abs()\n")
    out = tmp_path / "out"
    assert main(["pnp", "constraint", "--ckpt", str(tmp_path / "prior"), "--constraint", f"{tmp_path / 'con.py'}:grey",
                 "--n", "4", "--steps", "40", "--weight", "20", "--clamp", "1", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["constraint"]["name"] == "python" and m["n"] == 4
    import hashlib  # which version of the file made these figures
    assert m["constraint_parts"]["file_sha256"] == hashlib.sha256((tmp_path / "con.py").read_bytes()).hexdigest()
    s = m["settings"]  # every option, so that the figures can be reproduced from the file alone
    assert (s["seed"], s["lr"], s["steps"], s["batch_size"], s["ckpt"]) == (0, 0.05, 40, 256, str(tmp_path / "prior"))
    assert m["pnp_l_mean"] < 0.2 * m["prior_samples_l_mean"] and m["reduction"] > 5
    with np.load(out / "samples.npz") as z:
        x = torch.from_numpy(z["x"])
    assert x.shape == (4, 1, 8, 8) and float(x.abs().max()) <= 1.0
    assert float((x.flatten(1).mean(1) - 0.5).abs().mean()) == pytest.approx(m["pnp_l_mean"], rel=1e-5)
    assert (out / "samples.png").is_file()
    # in batches: one batch of >= n is the same run; smaller ones add up to n samples under the constraint
    for bs, same in ((4, True), (3, False)):
        assert main(["pnp", "constraint", "--ckpt", str(tmp_path / "prior"), "--constraint",
                     f"{tmp_path / 'con.py'}:grey", "--n", "4", "--steps", "40", "--weight", "20", "--clamp", "1",
                     "--batch-size", str(bs), "--out", str(tmp_path / f"b{bs}")]) == 0
        with np.load(tmp_path / f"b{bs}" / "samples.npz") as z:
            xb = torch.from_numpy(z["x"])
        assert xb.shape == x.shape and torch.equal(xb, x) == same, bs
        assert json.loads((tmp_path / f"b{bs}" / "metrics.json").read_text())["reduction"] > 5


def test_cli_segment_takes_its_test_scenes_from_the_priors_data_seed(tmp_path):
    from condiff.cli.main import main

    tiny_prior(tmp_path / "scenes", 4, 16, {"name": "scenes", "size": 16, "seed": 5})
    assert main(["pnp", "segment", "--ckpt", str(tmp_path / "scenes"), "--n", "2", "--chains", "1", "--steps", "2",
                 "--out", str(tmp_path / "seg")]) == 0
    scenes = {seed: split_scene(load_dataset("scenes", "test", n=2, size=16, seed=seed).x)[0].numpy()
              for seed in (0, 5)}
    with np.load(tmp_path / "seg" / "masks.npz") as z:
        assert np.array_equal(z["scene"], scenes[5]) and not np.array_equal(z["scene"], scenes[0])


def test_cli_constraint_clamps_to_the_priors_clip_x0_unless_told_otherwise(tmp_path):
    import json

    from condiff.cli.main import main

    prior = tmp_path / "prior"  # a run whose [sample] clip_x0 is 0.3
    tiny_prior(prior / "model", 1, 8, {"name": "digits"})
    (prior / "config.json").write_text(json.dumps({"data": {"name": "digits"}, "sample": {"clip_x0": 0.3}}))
    (tmp_path / "con.py").write_text("def grey(x):\n    return (x.flatten(1).mean(1) - 0.5).abs()\n")
    reach = {}  # the largest |x| of the PnP samples, pulled towards a mean of 0.5
    for name, extra in (("default", []), ("clamp 1", ["--clamp", "1"])):
        out = tmp_path / name.replace(" ", "-")
        assert main(["pnp", "constraint", "--ckpt", str(prior), "--constraint", f"{tmp_path / 'con.py'}:grey",
                     "--n", "2", "--steps", "20", "--weight", "20", *extra, "--out", str(out)]) == 0
        with np.load(out / "samples.npz") as z:
            reach[name] = float(np.abs(z["x"]).max())
    assert reach["default"] <= 0.3 + 1e-6 and 0.3 < reach["clamp 1"] <= 1.0


@pytest.mark.parametrize("args, needle", [
    (["pnp", "digits", "--label", "12"], "--label must be a digit"),
    (["pnp", "tsp", "--ckpt", "{tmp}/none"], "pass --train"),
    (["pnp", "tsp", "--ckpt", "{tmp}/scenes", "--n", "1"], "pnp tsp needs one trained on 'tours'"),
    (["pnp", "tsp", "--ckpt", "{tmp}/digits", "--n", "1"], "a prior over 'digits' data"),
    (["pnp", "segment", "--ckpt", "{tmp}/tours"], "pnp segment needs one trained on 'scenes'"),
    (["pnp", "segment", "--ckpt", "{tmp}/scenes", "--chains", "0"], "--chains must be >= 1"),
    (["pnp", "segment", "--ckpt", "{tmp}/scenes", "--n", "0"], "--n must be an integer >= 1"),
    (["pnp", "segment", "--ckpt", "{tmp}/scenes", "--profile", "bogus"], "--profile must be one of"),
    (["pnp", "tsp", "--ckpt", "{tmp}/tours", "--chains", "0"], "--chains must be an integer >= 1"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--label", "3", "--weight", "-1"], "--weight must be"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--label", "3", "--lr", "inf"], "--lr must be"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--label", "3", "--finish-zeta", "nan"], "--finish-zeta must"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--label", "3", "--out", "{tmp}/digits/config.json"],
     "is a file, not a directory"),
    (["pnp", "segment", "--ckpt", "{tmp}/scenes", "--chains", "2", "--votes", "3"], "--votes must be between"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--label", "3", "--finish", "100"], "--finish must be a timestep"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--label", "3", "--finish-zeta", "-1"], "--finish-zeta must be"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--symmetry", "--finish-zeta", "0.5"],
     "--finish-zeta sets the finish's step size, but the finish is off (as it is with --symmetry)"),
    (["pnp", "digits", "--ckpt", "{tmp}/digits", "--label", "3", "--finish", "0", "--finish-zeta", "0.5"],
     "but the finish is off: pass --finish T to turn it on"),
    (["pnp", "constraint", "--ckpt", "{tmp}/digits", "--constraint", "nosuch"], "unknown constraint 'nosuch'"),
    (["pnp", "constraint", "--ckpt", "{tmp}/digits", "--constraint", "{tmp}/no.py:f"], "no.py does not exist"),
    (["pnp", "constraint", "--ckpt", "{tmp}/digits", "--constraint", "periodic", "--n", "1"], "--n must be"),
    (["pnp", "constraint", "--ckpt", "{tmp}/digits", "--constraint", "{tmp}/nan.py:f", "--n", "2"],
     "must return finite values, got 2 not finite of 2 (sample 0: nan) on the prior's own samples"),
    (["pnp", "constraint", "--ckpt", "{tmp}/digits", "--constraint", "brightness"],
     "pnp constraint builds a constraint without arguments"),
    (["pnp", "constraint", "--ckpt", "{tmp}/digits", "--constraint", "{tmp}/nan.py:NeedsArgs"],
     "nan.py:NeedsArgs is a class whose constructor needs arguments"),
    (["pnp", "segment", "--ckpt", "{tmp}/half"], "no model/ (training unfinished, or model/ deleted): finish it by "
                                                 "running the command that trained it again"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    from condiff.cli.main import main

    tiny_prior(tmp_path / "tours", 1, 16, {"name": "tours", "size": 16})
    tiny_prior(tmp_path / "scenes", 4, 16, {"name": "scenes", "size": 16})
    tiny_prior(tmp_path / "digits", 1, 8, {"name": "digits"})
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)  # a prior whose --train was interrupted
    (tmp_path / "half" / "config.json").write_text('{"data": {"name": "scenes"}, "model": {}, "train": {}}')
    (tmp_path / "nan.py").write_text("def f(x):\n    return x.flatten(1).sum(1) * float('nan')\n\n\n"
                                     "class NeedsArgs:\n    def __init__(self, a):\n        self.a = a\n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_ensure_prior_never_discards_a_run_with_other_settings(tmp_path):
    import json

    from condiff.cli.pnp import ensure_prior, prior_config

    cfg = prior_config("tsp", "quick")
    cfg["train"] = {**cfg["train"], "steps": cfg["train"]["steps"] + 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileExistsError, match="other settings"):
        ensure_prior("tsp", "quick", tmp_path, "cpu")
    assert (tmp_path / "checkpoints").is_dir() and json.loads((tmp_path / "config.json").read_text()) == cfg


def test_a_constraint_without_a_gradient_is_refused_not_ignored():
    """A constraint through numpy gave the same samples as no constraint, while the trace reported it."""
    def via_numpy(x):
        return torch.from_numpy(np.square(x.detach().numpy()).reshape(x.shape[0], -1).sum(1))

    with pytest.raises(ValueError, match="the constraint must be differentiable in x: no gradient reaches x"):
        infer(oracle(100), torch.zeros(2, 3), constraint=via_numpy, schedule=sch.ConstantTime(50), steps=3,
              lr=0.1, generator=torch.Generator().manual_seed(0))


def test_schedules_and_budgets_of_the_wrong_kind_are_refused():
    """NaN anneals failed inside math.floor; fractional step counts were truncated silently."""
    for build, match, error in [
            (lambda: sch.LinearAnneal(float("nan")), "LinearAnneal: start must be a number in", ValueError),
            (lambda: sch.PaperAnneal(divisor=float("nan")), "PaperAnneal: divisor must be a number > 0", ValueError),
            (lambda: infer(oracle(100), torch.zeros(2, 3), steps=2.5), "steps must be an integer >= 1", ValueError),
            (lambda: infer(oracle(100), torch.zeros(2, 3, dtype=torch.long), steps=2),
             "the starting latent must be a floating-point tensor", TypeError),
            (lambda: finish(oracle(100), torch.zeros(2, 3), 20, steps=2.5),
             "steps must be an integer between 1 and start \\+ 1 = 21, got 2.5", ValueError),
            (lambda: finish(oracle(100), torch.zeros(2, 3), 2.7), "start \\(a timestep\\) must be an integer",
             ValueError)]:
        with pytest.raises(error, match=match):
            build()


# --- pinned details (mutation review) ------------------------------------------------------------------


def test_paper_anneal_floors_the_wobble_amplitude():
    """``floor((S - i) / divisor)``: at S = 256 the amplitude is 69, not 69.67, at i = 47 (r = 209)."""
    ts = sch.timesteps(sch.PAPER_TSP, 256, 1000)
    for i, expect in [(47, 975), (53, 920), (92, 584)]:
        r = 256 - i
        assert int((r + (r // 3) * math.cos(i / 50)) / 256 * 1000) == expect
        assert int((r + r / 3 * math.cos(i / 50)) / 256 * 1000) != expect  # the floor matters here
        assert int(ts[i]) == expect


def test_finish_default_step_count_is_the_100_step_density_plus_one():
    den, x = oracle(), torch.zeros(2, 3)
    for start, nfe in [(400, 41), (7, 2)]:  # round(100 * start / T) + 1
        before = den.nfe
        finish(den, x, start, generator=torch.Generator().manual_seed(0))
        assert den.nfe - before == nfe, start


class _Recording(GaussianDenoiser):
    """Predicts zero noise and records every ``(x_t, t)`` it is asked about."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.seen = []

    def predict_eps(self, x_t, t):
        self.seen.append((x_t.detach().clone(), t.clone()))
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("start", [1, 30])
def test_finish_renoises_to_the_start_timestep(start):
    """The sampler's first input is ``q(x_start | x)``: ``sqrt(abar_start) x + sqrt(1 - abar_start) eps``
    with the generator's first draw."""
    den = _Recording(Schedule.linear(100))
    x = torch.tensor([[0.5, -0.25, 0.0], [1.0, 0.75, -1.0]])
    finish(den, x, start, steps=2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    a = float(den.schedule.abar[start])
    assert abs(a - float(den.schedule.abar[start - 1])) > 1e-4  # the neighbouring level is told apart
    first, t = den.seen[0]
    assert t.tolist() == [start, start]
    torch.testing.assert_close(first, math.sqrt(a) * x + math.sqrt(1 - a) * eps, atol=1e-5, rtol=0)  # float32


def test_otsu_weighs_the_classes_so_one_stray_pixel_does_not_split_off():
    """Shape 0.3 on background -0.2, one pixel at -1: unweighted, the gap between the class means is largest
    with that pixel alone in a class (0.89 against 0.51); weighted by the class sizes, the shape wins."""
    img = torch.full((1, 3, 12, 12), -0.2)
    truth = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    truth[..., 3:8, 4:9] = True
    img = torch.where(truth, torch.tensor(0.3), img)
    img[..., 9, 2] = -1.0  # a dark pepper pixel in the background
    assert torch.equal(otsu_segment(img), truth)


def test_segment_keeps_the_mask_latent_in_the_unit_box():
    """A prior whose mask channel sits at 3: every chain's latent is held at the bound 1."""
    den = GaussianDenoiser(Schedule.linear(200), mean=3.0, std=0.1)
    pics = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    res = segment(den, pics, chains=2, steps=20, lr=0.5, generator=torch.Generator().manual_seed(1))
    assert float(res.latents.abs().max()) <= 1.0
    assert float((res.latents == 1.0).float().mean()) > 0.9


def test_pnp_digits_writes_each_prior_and_task_to_its_own_default_directory(tiny_run, tmp_path, monkeypatch):
    """--label 3 and --symmetry both wrote runs/pnp/digits, the second replacing the first; then each task wrote
    runs/pnp/digits-<task> whatever the --ckpt, so that a second prior's results replaced the first's."""
    import json
    import shutil

    from condiff.cli.main import main

    bare, run = tmp_path / "bare", tmp_path / "run"  # a bare model directory, and a run with its model/
    shutil.copytree(tiny_run, bare)
    shutil.copytree(tiny_run, run / "model")
    (run / "config.json").write_text(json.dumps({"data": {"name": "digits"}}))
    monkeypatch.chdir(tmp_path)
    for ckpt, task in ((bare, ["--label", "3"]), (bare, ["--symmetry"]), (run, ["--label", "3"])):
        assert main(["pnp", "digits", "--ckpt", str(ckpt), *task, "--n", "2", "--steps", "2",
                     "--device", "cpu"]) == 0
    outs = {"3": tmp_path / "bare_pnp" / "digits-3", "symmetry": tmp_path / "bare_pnp" / "digits-symmetry",
            "run": run / "pnp" / "digits-3"}  # beside a bare model, under a run (as sample and solve write)
    m = {k: json.loads((d / "metrics.json").read_text()) for k, d in outs.items()}
    assert (m["3"]["settings"]["ckpt"], m["run"]["settings"]["ckpt"]) == (str(bare), str(run))
    assert not (tmp_path / "runs").exists()
    assert m["3"]["success_rate"] == pytest.approx(m["3"]["class_hist"][3])  # the asked label's share
    assert (m["3"]["settings"]["weight"], m["3"]["finish"]) == (0.1, 40)  # the defaults --help states
    assert (m["symmetry"]["settings"]["weight"], m["symmetry"]["finish"]) == (0.2, 0)
    assert "interrupted" not in m["3"]["settings"]  # the Ctrl-C hint is no setting


def test_a_refused_default_out_is_named_as_the_default(tiny_run, tmp_path, capsys):
    """A default --out that cannot be written was refused as "--out PATH", a flag the user never gave."""
    import shutil

    from condiff.cli.main import main

    shutil.copytree(tiny_run, tmp_path / "bare")
    (tmp_path / "bare_pnp").write_text("not a folder")  # where the bare model's results would go
    assert main(["pnp", "digits", "--ckpt", str(tmp_path / "bare"), "--label", "3", "--device", "cpu"]) == 2
    assert f"the default --out {tmp_path / 'bare_pnp' / 'digits-3'}: " in capsys.readouterr().err


def test_pnp_default_out_names_the_task_and_its_setting(tmp_path):
    """tsp's default --out names the city count, constraint's the constraint (a file's by FILE-NAME)."""
    import argparse

    from condiff.cli.pnp import default_out

    ns = lambda cmd, **kw: argparse.Namespace(pnp_command=cmd, ckpt=str(tmp_path / "r"), **kw)  # noqa: E731
    assert default_out(ns("tsp", cities=50)) == tmp_path / "r" / "pnp" / "tsp-50"
    assert default_out(ns("segment")) == tmp_path / "r" / "pnp" / "segment"
    assert default_out(ns("constraint", constraint="periodic")) == tmp_path / "r" / "pnp" / "constraint-periodic"
    own = default_out(ns("constraint", constraint=f"{tmp_path / 'con.py'}:grey"))
    assert own == tmp_path / "r" / "pnp" / "constraint-con-grey"


def test_pnp_constraint_default_out_keeps_two_files_of_one_name_apart(tmp_path):
    """a/con.py:grey and b/con.py:grey both defaulted to constraint-con-grey, so the second run replaced the
    results of the first; the second now gets a folder of its own, named by its path, and keeps it."""
    import argparse
    import json

    from condiff.cli.pnp import default_out

    ns = lambda spec: argparse.Namespace(pnp_command="constraint", ckpt=str(tmp_path / "r"), constraint=spec)  # noqa: E731
    first, second = f"{tmp_path / 'a' / 'con.py'}:grey", f"{tmp_path / 'b' / 'con.py'}:grey"
    plain = tmp_path / "r" / "pnp" / "constraint-con-grey"
    assert default_out(ns(first)) == default_out(ns(second)) == plain  # nothing there yet
    plain.mkdir(parents=True)
    recorded = {"name": "python", "path": str(tmp_path / "a" / "con.py"), "attr": "grey"}
    (plain / "metrics.json").write_text(json.dumps({"constraint": recorded}))
    assert default_out(ns(first)) == plain  # a rerun of the first replaces its own results
    apart = default_out(ns(second))
    assert apart.parent == plain.parent and apart.name.startswith("constraint-con-grey-") and apart != plain
    assert default_out(ns(second)) == apart  # the same folder each time
    assert default_out(ns("periodic")) == tmp_path / "r" / "pnp" / "constraint-periodic"


def test_infer_passes_its_betas_to_adam():
    """The TSP setting betas = (0, 0.9) (the paper's) was not checked to reach the optimiser."""
    den = GaussianDenoiser(Schedule.linear(100), mean=0.3, std=0.1)
    kw = dict(schedule=sch.ConstantTime(50), steps=5, lr=0.05)
    a = infer(den, torch.zeros(2, 3), betas=(0.0, 0.9), generator=torch.Generator().manual_seed(0), **kw)
    b = infer(den, torch.zeros(2, 3), generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.equal(a.latent, b.latent)


def test_the_segmentation_baselines_and_class_constraint_name_or_take_what_they_are_given():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g)
    for seg in (otsu_segment, kmeans_segment):
        ref = seg(x)
        assert torch.equal(seg(x.clone().requires_grad_()), ref)  # otsu: "Can't call numpy()" before
        assert seg(x[:0]).shape == (0, 1, 8, 8)  # otsu: "stack expects a non-empty TensorList" before
        ints = (x * 255).round().to(torch.uint8)
        assert torch.equal(seg(ints), seg(ints.float()))
        with pytest.raises(ValueError, match=rf"{seg.__name__}: expected images \(B, C, H, W\) .* shape \(3, 8, 8\)"):
            seg(x[:, 0])
    den = GaussianDenoiser(Schedule.linear(50))
    with pytest.raises(TypeError, match="segment: images must be a floating-point tensor, got dtype torch.uint8"):
        segment(den, ints, steps=2)  # it blamed "the starting latent" before
    lp = lambda v, y: -(v.flatten(1).sum(1) + y)  # noqa: E731
    assert ClassConstraint(lp, torch.tensor(3)).labels == 3  # a 0-d label, as NetDenoiser takes one
    torch.testing.assert_close(ClassConstraint(lp, np.int64(2))(x), ClassConstraint(lp, torch.tensor([2, 2, 2]))(x))
    for bad in ([1, 2], True, 2.5, -1, torch.tensor([1.0, 2.0])):  # True was taken as class 1, a list failed later
        with pytest.raises(ValueError, match="ClassConstraint: labels must be one class"):
            ClassConstraint(lp, bad)
