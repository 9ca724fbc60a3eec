"""NAMM: ICNN convexity and monotone mirror map, inverse net, training reduces the losses, fine-tuning,
mirror DPS, checkpoints and the CLI's settings and errors."""

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from condiff.constraints import Box, BurgersResidual, TotalBrightness
from condiff.denoiser import GaussianDenoiser
from condiff.guidance import DPS
from condiff.mirror import (
    FinetuneObjective,
    MirrorMap,
    NAMMLoss,
    NAMMObjective,
    assimilate,
    build_mirror,
    evaluate_terms,
    finetune_inverse,
    first_rows,
    fit_mirror_map,
    frames,
    load_mirror,
    mirror_dps,
    normalised_measurement_loss,
    save_mirror,
    sparse_points,
)
from condiff.mirror.fit import constraint_entry
from condiff.nets import ICNN, ResNetGenerator, build_net
from condiff.sample import sample
from condiff.schedule import Schedule
from condiff.train import TrainConfig, Trainer, list_checkpoints, read_log


def _icnn(scale=0.5, seed=0, **kw):
    torch.manual_seed(seed)
    psi = ICNN(1, filters=8, layers=3, init_scale=scale, **kw)
    return psi


def _tiny_mirror(a=0.9, seed=0):
    return build_mirror(
        (1, 8, 8),
        {"name": "icnn", "filters": 8, "layers": 2},
        {"name": "resnet", "base": 8, "blocks": 1, "downsamples": 1},
        a,
        seed=seed,
    )


# --- ICNN and the mirror map -----------------------------------------------------------------------


def test_mirror_map_is_strongly_monotone():
    m = MirrorMap(_icnn(scale=0.5), ResNetGenerator(1, base=8, blocks=1, downsamples=1), a=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randn(64, 1, 8, 8, generator=g)
    y[:32] = x[:32] + 0.05 * y[:32]  # near pairs as well as far ones
    gx, gy = m.forward_map(x), m.forward_map(y)
    inner = ((gx - gy) * (x - y)).flatten(1).sum(1)
    assert bool((inner >= 0.9 * (x - y).flatten(1).pow(2).sum(1) * (1 - 1e-5)).all())
    # and Psi really matters: g is not just a x
    assert float((gx - 0.9 * x).abs().max().detach()) > 1e-3
    with torch.no_grad():  # like any module: a graph (for double backprop) only when autograd is on
        assert gx.requires_grad and not m.forward_map(x).requires_grad


def test_icnn_is_convex_only_with_nonnegative_weights():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(256, 1, 8, 8, generator=g), torch.randn(256, 1, 8, 8, generator=g)

    def midpoint_gap(psi):  # >= 0 everywhere for a convex function
        with torch.no_grad():
            return (psi(x) + psi(y)) / 2 - psi((x + y) / 2)

    psi = _icnn(scale=1.0)
    with torch.no_grad():  # no fresh quadratic terms after layer 0, so the W_k path decides convexity
        for conv in psi.quad[1:]:
            conv.weight.zero_()
    assert float(midpoint_gap(psi).min()) >= -1e-5
    with torch.no_grad():  # flip the last hidden weights negative: -W z is concave, convexity is lost
        psi.hidden[-1].weight.mul_(-10.0)
    assert float(midpoint_gap(psi).min()) < -1e-4
    psi.clamp_weights()
    assert all(float(c.weight.detach().min()) >= 0 for c in psi.positive())
    assert float(midpoint_gap(psi).min()) >= -1e-5


def test_icnn_is_invariant_to_circular_shifts():
    psi = _icnn()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(psi(torch.roll(x, (3, 5), (2, 3))), psi(x), atol=1e-5)


def test_icnn_is_the_papers_recursion_with_layers_counting_z0_to_zL():
    """Psi = mean(C z_L + c), z_0 = LReLU((A_0 x)^2 + B_0 x + b_0), z_{k+1} = LReLU(W_k z_k + (A_{k+1} x)^2
    + B_{k+1} x + b_{k+1}): layers = L + 1 activations, L non-negative W_k; the paper's L = 3 (2 for the
    flow and count) is what the default and full NAMM profiles build."""
    from torch.nn import functional as F

    from condiff.cli.namm import resolve

    assert len(ICNN(1).hidden) == 3  # the default: the paper's L = 3
    psi = ICNN(1, filters=4, layers=4, init_scale=0.3)
    assert len(psi.hidden) == 3 and len(psi.quad) == len(psi.lin) == 4
    x = torch.randn(3, 1, 6, 6)

    def act(k, z=None):
        pre = psi.quad[k](x) ** 2 + psi.lin[k](x) + (0 if z is None else psi.hidden[k - 1](z))
        return F.leaky_relu(pre, 0.2)

    z = act(0)
    for k in range(1, 4):
        z = act(k, z)
    torch.testing.assert_close(psi(x), psi.out(z).mean((1, 2, 3)))
    for profile in ("default", "full"):
        depth = {d: resolve(d, profile)["mirror"]["psi"]["layers"] for d in ("burgers", "kolmogorov", "count")}
        assert depth == {"burgers": 4, "kolmogorov": 3, "count": 3}
    # the quick profile keeps the depth its recorded table was measured with, one shallower
    quick = {d: resolve(d, "quick")["mirror"]["psi"]["layers"] for d in ("burgers", "count")}
    assert quick == {"burgers": 3, "count": 2}


def test_grad_psi_matches_finite_differences():
    m = MirrorMap(_icnn(scale=0.3).double(), ResNetGenerator(1, base=8, blocks=1, downsamples=1).double())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    g = m.grad_psi(x).detach()
    e = torch.zeros_like(x)
    e[0, 0, 3, 4] = 1e-6
    with torch.no_grad():
        fd = (m.psi(x + e) - m.psi(x - e))[0] / 2e-6
    assert float(g[0, 0, 3, 4]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
    assert torch.allclose(m.forward_map(x), 0.1 * g + 0.9 * x)


def test_nets_and_mirror_reject_bad_input():
    with pytest.raises(ValueError, match="must lie in \\(0, 1\\)"):
        MirrorMap(_icnn(), ResNetGenerator(1, base=8, blocks=1), a=1.0)
    with pytest.raises(ValueError, match="ICNN expects \\(B, 1, H, W\\)"):
        _icnn()(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        ResNetGenerator(1, base=8, blocks=1)(torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="padding must be one of"):
        ResNetGenerator(1, padding="mirror")
    with pytest.raises(ValueError, match="slope must lie in"):
        ICNN(1, slope=-0.5)
    for bad in (-1, float("nan"), "x"):
        with pytest.raises(ValueError, match="init_scale .* must be a number >= 0"):
            ICNN(1, init_scale=bad)


def test_resnet_starts_as_identity_and_rebuilds_from_config():
    f = ResNetGenerator(2, base=8, blocks=2, downsamples=2)
    x = torch.randn(3, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(f(x), x)
    # the config rebuilds the same architecture: the same config, the weights load, the same outputs
    for net, y in ((f, torch.randn(3, 2, 16, 16)), (_icnn(), torch.randn(3, 1, 8, 8))):
        again = build_net(net.config)
        assert type(again) is type(net) and again.config == net.config
        again.load_state_dict(net.state_dict())
        torch.testing.assert_close(again(y), net(y))


def test_context_branch_lets_a_far_pixel_change_the_correction():
    """Without the global branch the correction at a corner ignores a change at the centre, 16 px away
    even with circular padding (receptive field 3 + 2 + 3 px for one block, no downsampling); with
    it, it does not."""
    x = torch.randn(1, 1, 32, 32)
    bumped = x.clone()
    bumped[..., 16, 16] += 1.0
    delta = {}
    for context in (False, True):
        torch.manual_seed(0)
        f = ResNetGenerator(1, base=8, blocks=1, downsamples=0, norm="none", context=context)
        with torch.no_grad():
            f.net[-1].weight.normal_(0, 0.1)  # leave the identity start
            f(torch.randn(8, 1, 32, 32))  # training mode: sets the context's running statistics
            f.eval()
            delta[context] = float((f(bumped) - f(x))[..., 0, 0].abs().max())
        assert ("context" in f.config) == context
        g = build_net(f.config).eval()
        g.load_state_dict(f.state_dict())  # running statistics included
        assert torch.equal(g(x), f(x))
    assert delta[False] == 0.0 and delta[True] > 1e-6
    same = x.expand(4, 1, 32, 32)  # identical means (a clean batch on a fixed-total set) stay finite
    assert torch.isfinite(f.train()(same)).all() and torch.isfinite(f.eval()(same)).all()


def test_instance_norm_hides_absolute_levels_and_norm_none_does_not():
    """With instance norm the correction f(y) - y is blind to a constant offset of y (so it cannot fix
    a total flux); without it, it is not."""
    y = torch.randn(2, 1, 16, 16)
    out = {}
    for norm in ("instance", "none"):
        torch.manual_seed(0)
        f = ResNetGenerator(1, base=8, blocks=1, downsamples=1, norm=norm)
        with torch.no_grad():
            f.net[-1].weight.normal_(0, 0.1)  # leave the identity start
            out[norm] = (f(y + 0.7) - (y + 0.7)) - (f(y) - y)
    assert float(out["instance"].abs().max()) < 1e-4
    assert float(out["none"].abs().max()) > 1e-3
    with pytest.raises(ValueError, match="norm must be one of"):
        ResNetGenerator(1, norm="batch")


def test_save_and_load_round_trip(tmp_path):
    m = _tiny_mirror()
    with torch.no_grad():
        for p in m.inverse.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_mirror(tmp_path / "m", m, note="x")
    m2, cfg = load_mirror(tmp_path / "m")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(m.forward_map(x), m2.forward_map(x)) and torch.equal(m.to_data(x), m2.to_data(x))
    assert cfg["note"] == "x"
    from condiff import io

    with pytest.raises(io.CheckpointError, match="not a NAMM mirror map"):
        io.save_module(tmp_path / "other", torch.nn.Linear(2, 2), {"format": "something"})
        load_mirror(tmp_path / "other")


# --- training ------------------------------------------------------------------------------------


def _brightness_data(n=96):
    from condiff.data import load_dataset

    d = load_dataset("brightness", "train", size=8, n_train=n, n_test=2)
    return d.x, TotalBrightness(d.meta["constraint"]["flux"])


def test_loss_terms_match_their_formulas_and_weights():
    """A fresh map's inverse is the identity, so its terms have closed forms in g alone:
    cyc = 0.5 mean|g(x) - x| + 0.5 mean|g(y) - y|, con = mean l(y), reg = mean|grad Psi(x)|, with
    y = g(x) + sigma z, sigma ~ U(0, sigma_max) per sample; the objective's loss weighs them."""
    x, con = _brightness_data(16)
    m = _tiny_mirror()
    g = torch.Generator().manual_seed(3)
    sigma = 0.2 * torch.rand(16, generator=g)
    y = m.forward_map(x).detach() + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m.inverse_map(y), y)  # the identity at initialisation
    gx, gy = m.forward_map(x).detach(), m.forward_map(y).detach()
    terms = evaluate_terms(m, x, con, sigma_max=0.2, seed=3)
    expect = {
        "cyc": 0.5 * float((gx - x).abs().mean()) + 0.5 * float((gy - y).abs().mean()),
        "con": float(con(y).mean()),
        "reg": float(m.grad_psi(x).detach().abs().mean()),
    }
    assert terms == pytest.approx(expect, rel=1e-5)
    assert expect["cyc"] > 0 and expect["con"] > 0 and expect["reg"] > 0  # no term is trivially zero
    w = NAMMLoss(l_cyc=2.0, l_con=3.0, l_reg=5.0)
    loss, logs = NAMMObjective(x, con, batch_size=8, weights=w).loss(m, 0, torch.Generator().manual_seed(0))
    parts = {k: float(v.detach()) for k, v in logs.items()}
    assert float(loss.detach()) == pytest.approx(2 * parts["cyc"] + 3 * parts["con"] + 5 * parts["reg"])


def test_namm_training_reduces_cycle_and_constraint_losses(tmp_path):
    x, con = _brightness_data()
    m = _tiny_mirror()
    before = evaluate_terms(m, x[:32], con, sigma_max=0.1)
    cfg = TrainConfig(
        steps=120,
        batch_size=8,
        lr=2e-3,
        betas=(0.5, 0.999),
        warmup=0,
        lr_decay="constant",
        ema_decay=0.9,
        ckpt_every=60,
        log_every=20,
        progress=False,
    )
    out = fit_mirror_map(x, con, m, cfg, NAMMLoss(l_con=1.0), run_dir=tmp_path)
    after = evaluate_terms(out, x[:32], con, sigma_max=0.1)
    # measured: 12x and 8x lower (2-core x86_64)
    assert after["con"] < 0.2 * before["con"], (before, after)
    assert after["cyc"] < 0.4 * before["cyc"], (before, after)
    assert all(float(c.weight.min()) >= 0 for c in out.psi.positive())  # the clamp ran every step
    log = read_log(tmp_path / "log.jsonl")
    assert {"cyc", "con", "reg"} <= set(log[-1]) and log[-1]["step"] == 120
    assert (tmp_path / "mirror" / "config.json").is_file()


def test_fit_mirror_map_warns_where_the_data_do_not_meet_the_constraint():
    """Only `condiff namm fit` said so; the Python function fitted a map to a set its data are not on, silently."""
    import warnings

    x, con = _brightness_data(32)
    cfg = TrainConfig(steps=1, batch_size=4, warmup=0, progress=False)
    off = TotalBrightness(con.config["flux"] + 40.0)  # every training image 40 away from it
    with pytest.warns(UserWarning, match=r"the training data do not meet the constraint \{'name': 'brightness', "
                      r"'flux': [0-9.]+, [^}]*\}: their median l \(40\) is not well below that of structureless noise"):
        fit_mirror_map(x, off, _tiny_mirror(), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_mirror_map(x, con, _tiny_mirror(), cfg)  # data on the set: nothing said
        fit_mirror_map(x, off, _tiny_mirror(), cfg, check_data=False)  # measured by the caller already


def test_resuming_a_mirror_map_under_another_constraint_is_refused(tmp_path):
    """fit_mirror_map(..., resume=True) went on from a checkpoint fitted for another constraint, silently."""
    x, con = _brightness_data(32)
    cfg = TrainConfig(steps=4, batch_size=4, warmup=0, ckpt_every=2, progress=False)
    fit_mirror_map(x, con, _tiny_mirror(), cfg, run_dir=tmp_path)
    assert json.loads((tmp_path / "mirror" / "config.json").read_text())["constraint"] == con.config
    longer = TrainConfig(steps=6, batch_size=4, warmup=0, ckpt_every=2, progress=False)
    other = TotalBrightness(con.config["flux"] + 1)
    with pytest.raises(ValueError, match=r"step_00000004, was written with other settings \(constraint differ\)"):
        fit_mirror_map(x, other, _tiny_mirror(), longer, run_dir=tmp_path, resume=True)

    def my_distance(v):
        return (v.flatten(1).mean(1) - 0.1).abs()

    with pytest.raises(ValueError, match=r"\(constraint differ\)"):
        fit_mirror_map(x, my_distance, _tiny_mirror(), longer, run_dir=tmp_path, resume=True)
    fit_mirror_map(x, con, _tiny_mirror(), longer, run_dir=tmp_path, resume=True)  # the same one goes on
    assert read_log(tmp_path / "log.jsonl")[-1]["step"] == 6
    assert constraint_entry(my_distance) == {"callable": f"{__name__}.test_resuming_a_mirror_map_under_another_"
                                                         "constraint_is_refused.<locals>.my_distance"}


def _ft_cfg(steps):  # fine-tuning settings for the tests; checkpoints every 5 steps
    return TrainConfig(steps=steps, batch_size=8, lr=2e-3, betas=(0.5, 0.999), warmup=0, lr_decay="constant",
                       ema_decay=0.9, ckpt_every=5, progress=False)


def test_finetuning_trains_f_only_and_reduces_the_constraint_loss_on_mirror_samples():
    x, con = _brightness_data(64)
    m = _tiny_mirror()
    y = m.to_mirror(x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    state_before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        data_before, mirror_before = m.to_data(y), m.to_mirror(x)
    l_before = float(con(data_before).mean())
    out = finetune_inverse(m, x, y, con, _ft_cfg(60), NAMMLoss(l_con=1.0))
    l_after = float(con(out.to_data(y)).mean())
    assert l_after < 0.5 * l_before
    for k, v in out.psi.state_dict().items():
        assert torch.equal(v, state_before[f"psi.{k}"]), f"psi.{k} changed during fine-tuning"
    with torch.no_grad():
        assert torch.equal(out.to_mirror(x), mirror_before)  # the forward map is frozen
        assert torch.equal(m.to_data(y), data_before)  # the map passed in is left untouched
    for k, v in m.state_dict().items():
        assert torch.equal(v, state_before[k]), f"the input map's {k} changed"


def test_finetuning_refuses_a_non_finite_pool_and_warns_on_one_far_outside_mirror_space():
    x, con = _brightness_data(16)
    m = _tiny_mirror()
    y = m.to_mirror(x).detach()
    with pytest.raises(ValueError, match="mirror samples to fine-tune on hold NaN"):
        FinetuneObjective(m, x, torch.where(y > y.mean(), float("nan"), y), con)
    with pytest.warns(UserWarning, match="is the mirror diffusion model trained"):
        FinetuneObjective(m, x, 600 * y, con)
    for xs, ys, got in ((x, y[:0], "16 and 0"), (x[:0], y, "0 and 16")):  # torch's max() of nothing before
        with pytest.raises(ValueError, match=f"fine-tuning needs data and mirror samples, got {got}"):
            FinetuneObjective(m, xs, ys, con)


def test_realism_critic_learns_to_tell_data_from_outputs_unlike_them():
    x, con = _brightness_data(64)
    m = _tiny_mirror()
    obj = FinetuneObjective(m, x, m.to_mirror(x), con, batch_size=16, weights=NAMMLoss(l_adv=1.0))
    obj.critic_opt.param_groups[0]["lr"] = 2e-3

    class Offset(torch.nn.Module):  # an "inverse map" whose outputs sit 0.5 above the data
        def forward(self, y):
            return m.inverse(y) + 0.5

    g = torch.Generator().manual_seed(0)
    f = Offset()
    for step in range(60):
        loss, logs = obj.loss(f, step, g)
        assert set(logs) == {"cyc", "con", "adv"} and torch.isfinite(loss)
        assert "critic" in obj.after_step(f, step)
    with torch.no_grad():
        real, fake = obj.critic(x).mean(), obj.critic(f(m.to_mirror(x))).mean()
    assert real > fake + 1.0, (float(real), float(fake))


def test_finetuning_with_the_realism_term_resumes_exactly(tmp_path):
    x, con = _brightness_data(64)
    m = _tiny_mirror()
    y = m.to_mirror(x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    w = NAMMLoss(l_con=1.0, l_adv=0.5)
    whole = finetune_inverse(m, x, y, con, _ft_cfg(10), w, tmp_path / "a")
    finetune_inverse(m, x, y, con, _ft_cfg(5), w, tmp_path / "b")
    resumed = finetune_inverse(m, x, y, con, _ft_cfg(10), w, tmp_path / "b", resume=True)
    for (k, a), b in zip(whole.inverse.state_dict().items(), resumed.inverse.state_dict().values()):
        assert torch.equal(a, b), f"inverse.{k} differs after resuming"
    logs = read_log(tmp_path / "b" / "log.jsonl")
    assert all("adv" in r and "critic" in r for r in logs)
    # the checkpoint holds the critic and its optimizer; resuming with or without the term where the
    # checkpoint was written otherwise is refused, through the trainer's own resume
    from condiff import io
    state = io.load_group(list_checkpoints(tmp_path / "b" / "checkpoints")[-1], "objective")
    assert any(k.startswith("critic_opt.") for k in state)
    with pytest.raises(ValueError, match="with the realism term's critic"):
        finetune_inverse(m, x, y, con, _ft_cfg(15), NAMMLoss(l_con=1.0), tmp_path / "b", resume=True)
    finetune_inverse(m, x, y, con, _ft_cfg(5), NAMMLoss(l_con=1.0), tmp_path / "c")
    with pytest.raises(ValueError, match="without the realism term's critic"):
        finetune_inverse(m, x, y, con, _ft_cfg(10), w, tmp_path / "c", resume=True)


def test_the_realism_term_is_for_fine_tuning_only():
    x, con = _brightness_data(8)
    with pytest.raises(ValueError, match="fine-tuning only"):
        NAMMObjective(x, con, 4, NAMMLoss(l_adv=1.0))
    with pytest.raises(ValueError, match=">= 0"):
        NAMMLoss.from_dict({"l_adv": -1.0})


def test_namm_rejects_bad_constraints_and_settings():
    x, _ = _brightness_data(8)
    m = _tiny_mirror()
    cfg = TrainConfig(steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="must return shape"):
        fit_mirror_map(x, lambda v: v.sum(), m, cfg)
    with pytest.raises(ValueError, match="unknown NAMM loss option"):
        NAMMLoss.from_dict({"l_constraint": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        NAMMLoss.from_dict({"l_con": -1.0})


# --- mirror DPS ----------------------------------------------------------------------------------


def test_mirror_dps_with_identity_inverse_is_dps():
    """f starts as the identity, so DPS in mirror space with A(f(.)) is exactly DPS with A."""
    s = Schedule.linear(100)
    den = GaussianDenoiser(s, 0.0, 0.5)
    m = _tiny_mirror()
    op = first_rows((1, 8, 8), 3, sigma_y=0.1)
    truth = 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = op.measure(truth, generator=torch.Generator().manual_seed(1))
    loss = normalised_measurement_loss(op, y)
    kw = dict(steps=20, eta=1.0)
    a = sample(den, (4, 1, 8, 8), generator=torch.Generator().manual_seed(2), guidance=DPS(loss, 0.05), **kw)
    b = sample(
        den,
        (4, 1, 8, 8),
        generator=torch.Generator().manual_seed(2),
        guidance=mirror_dps(m, loss, 0.05),
        **kw,
    )
    assert torch.allclose(a, b, atol=1e-5)
    free = sample(den, (4, 1, 8, 8), generator=torch.Generator().manual_seed(2), **kw)
    # guidance pulls the observed rows towards the data
    assert float(op.residual(a, y).mean()) < 0.5 * float(op.residual(free, y).mean())


def test_assimilate_runs_all_three_methods():
    s = Schedule.linear(100)
    den = GaussianDenoiser(s, 0.0, 0.5)
    m = _tiny_mirror()
    op = first_rows((1, 8, 8), 2, sigma_y=0.1)
    y = op.measure(torch.zeros(3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    con = Box(-0.2, 0.2)
    with torch.no_grad():
        for p in m.inverse.parameters():  # an inverse map that is not the identity
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = {}
    methods = {"dps": {}, "mirror": {"mirror": m}, "guided": {"constraint": con, "constraint_weight": 10.0}}
    for name, kw in methods.items():
        out[name] = assimilate(
            den, op, y, (1, 8, 8), zeta=0.05, steps=10, generator=torch.Generator().manual_seed(0), **kw
        )
        assert out[name].shape == (3, 1, 8, 8) and bool(torch.isfinite(out[name]).all())
        assert not out[name].requires_grad
    # constraint-guided DPS pulls the samples into the box (measured: 6.6x closer than plain DPS); at
    # weight 200 with this zeta the unit-norm constraint gradient overshoots instead (a 10-unit step)
    assert float(con(out["guided"]).mean()) < 0.33 * float(con(out["dps"]).mean())
    # mirror DPS samples in mirror space with the loss applied through f, and returns f of the sample
    # (x0_hat clamped to [-1, 1] in mirror space: "auto" for a denoiser that records no data range)
    ym = sample(den, (3, 1, 8, 8), steps=10, eta=1.0, generator=torch.Generator().manual_seed(0),
                guidance=mirror_dps(m, normalised_measurement_loss(op, y), 0.05), clip_x0=1.0)
    torch.testing.assert_close(out["mirror"], m.to_data(ym))
    assert not torch.allclose(out["mirror"], out["dps"], atol=1e-3)
    with pytest.raises(ValueError, match="needs a constraint"):
        assimilate(den, op, y, (1, 8, 8), zeta=0.05, steps=2, constraint_weight=1.0)
    with pytest.raises(TypeError, match="the operator must be a condiff.operators.Operator .* got function"):
        assimilate(den, lambda x: x, y, (1, 8, 8), zeta=0.05, steps=2)  # failed with "has no attribute 'to'"


def test_assimilate_clamps_x0_hat_to_the_denoisers_data_range_by_default():
    """As guided_sample does: the recorded [min, max] of the training data where it reaches beyond [-1, 1]."""
    den = GaussianDenoiser(Schedule.linear(100), 0.0, 3.0)
    op = first_rows((1, 8, 8), 2, sigma_y=0.1)
    y = op.measure(torch.full((2, 1, 8, 8), 2.0), generator=torch.Generator().manual_seed(0))

    def run(**kw):
        return assimilate(den, op, y, (1, 8, 8), zeta=0.05, steps=10, generator=torch.Generator().manual_seed(0), **kw)

    assert torch.equal(run(), run(clip_x0=1.0))  # nothing recorded: the house range
    den.value_range = [-4.0, 5.0]
    auto, free = run(), run(clip_x0=None)
    assert torch.equal(auto, run(clip_x0=(-4.0, 5.0))) and not torch.allclose(auto, free)


def test_constraint_guided_dps_with_a_pde_constraint_stays_finite_when_x0_hat_is_clamped():
    """Early Tweedie estimates lie far outside the data range; fed to the raw Burgers stepper they
    overflow (the NaN of the first benchmark): the sampler stops with an error that names the remedy
    instead of returning NaN samples. Clamping x0_hat keeps it finite, and so does the library's
    Burgers distance, which clips the rows it steps."""
    den = GaussianDenoiser(Schedule.linear(1000), 0.0, 30.0)  # wide data: huge early x0_hat
    op = first_rows((1, 8, 8), 2, sigma_y=0.1)
    y = op.measure(torch.zeros(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    con = BurgersResidual(length=10 * 8 / 64)

    def raw(x):  # the residual of the unclipped stepper
        return (x[:, :, 1:] - con.step(x[:, :, :-1])).abs().flatten(1).mean(1)

    for constraint, clip, finite in ((raw, None, False), (raw, 1.5, True), (con, None, True)):
        kw = dict(constraint=constraint, constraint_weight=200.0, steps=5, clip_x0=clip, zeta=0.25,
                  generator=torch.Generator().manual_seed(0))
        if finite:
            assert bool(torch.isfinite(assimilate(den, op, y, (1, 8, 8), **kw)).all())
        else:
            with pytest.raises(FloatingPointError, match="not finite .* at t = 999 .*clip_x0"):
                assimilate(den, op, y, (1, 8, 8), **kw)


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_settings_resolution_and_stage_guard(tmp_path, monkeypatch, capsys):
    from condiff.cli.config import ConfigError
    from condiff.cli.namm import NAMMRun, StageMismatch, resolve

    cfg = resolve("brightness", "quick", overrides=["mirror.psi.filters=4", "loss.l_con=0.5"])
    assert cfg["mirror"]["psi"] == {"name": "icnn", "layers": 3, "filters": 4}
    assert cfg["loss"]["l_con"] == 0.5 and cfg["data"]["size"] == 16
    assert resolve("kolmogorov", "full")["loss"]["sigma_max"] == 0.5
    assert resolve("count", "quick")["data"]["k"] == 4
    with pytest.raises(ConfigError, match="section one of"):
        resolve("burgers", "quick", overrides=["optim.lr=1"])
    with pytest.raises(ConfigError, match="unknown profile"):
        resolve("burgers", "huge")
    for name in ("mine.npz", "digits"):  # a generator's size for data that have their own: recorded and ignored
        with pytest.raises(ConfigError, match=f"data.size sets a built-in generator's output; {name} does not"):
            resolve(name, "quick", overrides=["data.size=12"])
    assert "size" not in resolve("mine.npz", "quick")["data"]  # the profile's own is left out, as before
    # nor through --resume; and a run that recorded one before it was refused still matches its stages
    from condiff.cli.namm import _recorded_settings, comparable

    (tmp_path / "old").mkdir()
    recorded = {**resolve("digits", "quick"), "data": {"name": str(tmp_path / "mine.npz"), "size": 8}}
    (tmp_path / "old" / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match="data.n_train sets a built-in generator's output"):
        _recorded_settings(tmp_path / "old", ["data.n_train=5"], "")
    assert _recorded_settings(tmp_path / "old", [], "")["data"]["size"] == 8
    spec = {"data": recorded["data"], "mirror": {}}
    assert comparable(spec) == comparable({"data": {"name": str(tmp_path / "mine.npz")}, "mirror": {}})
    assert comparable({"data": {"name": "periodic", "size": 8}, "mirror": {}})["data"]["size"] == 8
    for override, message in (("mirror.A=0.5", r"unknown mirror setting\(s\) \['A'\]"),
                              ("mirror.a=1", r"mirror.a .* must be in \(0, 1\), got 1")):
        with pytest.raises(ValueError, match=message):  # a typo was recorded and ignored; a = 1 failed later
            NAMMRun(tmp_path / "typo", resolve("brightness", "quick", overrides=[override]))
    run = NAMMRun(tmp_path, cfg)
    # a folder named like the data set (e.g. the run directory itself) does not turn the built-in
    # data set into a user path whose loader drops the profile's size
    monkeypatch.chdir(tmp_path)
    (tmp_path / "brightness").mkdir()
    assert run.data("test").x.shape[-1] == 16
    d, done = run._stage("namm", run.spec("namm"))
    assert not done and (d / "stage.json").is_file()
    run._finish("namm", run.spec("namm"), 1.0)
    assert run._stage("namm", run.spec("namm"))[1]
    other = NAMMRun(tmp_path, resolve("brightness", "quick", overrides=["loss.l_con=0.7"]))
    with pytest.raises(StageMismatch, match="--fresh"):
        other._stage("namm", other.spec("namm"))
    # --fresh sets the finished stage aside until the stage replacing it finishes (a failure loses nothing)
    (d / "weights.bin").write_bytes(b"old")
    forced = NAMMRun(tmp_path, resolve("brightness", "quick", overrides=["loss.l_con=0.7"]), fresh=True)
    assert forced._stage("namm", forced.spec("namm")) == (d, False)
    kept = tmp_path / ".replaced" / "namm"
    assert (kept / "weights.bin").read_bytes() == b"old" and not (d / "weights.bin").exists()
    capsys.readouterr()
    forced._stage("namm", forced.spec("namm"))  # going on with it (a resumed fit) says what it will delete
    assert f"note: {kept} keeps the stage an unfinished --fresh replaced" in capsys.readouterr().err
    forced._finish("namm", forced.spec("namm"), 1.0)
    assert not kept.exists() and not kept.parent.exists()
    back = NAMMRun(tmp_path, cfg, fresh=True)  # back to the first settings
    back._stage("namm", back.spec("namm"))
    back._finish("namm", back.spec("namm"), 1.0)
    # a stage that failed before its first checkpoint holds nothing to lose: another setting replaces it
    d, _ = run._stage("mdm", run.spec("mdm"))
    changed = NAMMRun(tmp_path, resolve("brightness", "quick", overrides=["train.lr=1e-4"]))
    assert changed._stage("mdm", changed.spec("mdm")) == (d, False)
    (d / "checkpoints" / "step_00000010").mkdir(parents=True)  # with one, it is refused as before
    with pytest.raises(StageMismatch, match="--fresh"):
        run._stage("mdm", run.spec("mdm"))
    # a stage resumed after a stop counts the training time of its earlier sessions (its newest checkpoint's)
    (d / "checkpoints" / "step_00000010" / "config.json").write_text('{"step": 10, "train_seconds": 1000.5}')
    t0 = run._clock("mdm")
    assert 1000.5 <= time.perf_counter() - t0 < 1010
    t0 = run._clock("vanilla")  # a stage not begun: this session's time alone
    assert 0 <= time.perf_counter() - t0 < 10
    # a constraint with learned parts (the count CNN) puts their recipe in the spec: a new recipe
    # refits the map and everything downstream instead of reusing fits made against the old one
    assert "constraint" not in run.spec("namm")  # brightness has none
    learned = NAMMRun(tmp_path, cfg)
    learned._constraint = TotalBrightness(5.0)
    learned._constraint.learned_parts = lambda: {"counter": {"v": 3}}
    assert learned.spec("namm")["constraint"] == {"counter": {"v": 3}}
    assert learned.spec("finetune")["constraint"] == {"counter": {"v": 3}}
    with pytest.raises(StageMismatch, match="--fresh"):
        learned._stage("namm", learned.spec("namm"))
    # finetune.loss overrides the loss section for the fine-tuning alone (the realism term lives there)
    ft = NAMMRun(tmp_path, resolve("brightness", "quick",
                                   overrides=["finetune.loss.l_adv=0.5", "finetune.loss.l_con=3.0"]))
    assert ft.finetune_loss() == NAMMLoss(l_con=3.0, l_reg=1e-3, sigma_max=0.1, l_adv=0.5)
    plain = NAMMRun(tmp_path, resolve("brightness", "quick"))
    assert ft.spec("namm") == plain.spec("namm") and ft.spec("finetune") != plain.spec("finetune")
    with pytest.raises(ValueError, match="unknown NAMM loss option"):
        NAMMRun(tmp_path, resolve("brightness", "quick", overrides=["finetune.loss.adv=1.0"])).finetune_loss()


def test_an_unfinished_finetune_of_other_settings_names_the_command_that_goes_on(tmp_path):
    """After a Ctrl-C in `namm finetune --set ...`, the plain command was refused with --fresh as the only way
    on, which threw the steps done away; the settings it was begun with go on with it."""
    from condiff.cli.namm import NAMMRun, StageMismatch, resolve

    begun = NAMMRun(tmp_path, resolve("brightness", "quick", overrides=["finetune.steps=3000",
                                                                       "finetune.ckpt_every=50", "sample.steps=7"]))
    d, _ = begun._stage("finetune", begun.spec("finetune"))
    (d / "checkpoints" / "step_00000050").mkdir(parents=True)
    run = NAMMRun(tmp_path, resolve("brightness", "quick"))
    with pytest.raises(StageMismatch) as err:
        run._stage("finetune", run.spec("finetune"))
    go_on = re.search(r"`condiff namm finetune --run \S+ (.*)` goes on with the settings it was begun with$",
                      str(err.value))
    assert go_on is not None, str(err.value)
    assert sorted(go_on.group(1).split(" --set ")) == sorted(
        ["--set finetune.ckpt_every=50", "finetune.steps=3000", "sample.steps=7"])
    # where a stage it is made from has changed since, no flags go on with it: only --fresh is offered
    changed = NAMMRun(tmp_path, resolve("brightness", "quick", overrides=["train.steps=5"]))
    with pytest.raises(StageMismatch) as err:
        changed._stage("finetune", changed.spec("finetune"))
    assert "goes on with the settings" not in str(err.value) and "pass --fresh to redo it" in str(err.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from condiff.cli.main import main

    assert main(["namm", "sample", "--run", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist: make the run with `condiff namm fit" in capsys.readouterr().err
    fake = tmp_path / "fake"  # a directory posing as runs of several commands, beside the real ones
    fake.mkdir()
    assert main(["namm", "sample", "--run", str(fake)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "condiff namm fit" in err
    (fake / "config.json").write_text(json.dumps({"mirror": "x", "loss": {}, "mirror_train": {}}))  # hand-edited
    assert main(["namm", "sample", "--run", str(fake)]) == 2
    err = capsys.readouterr().err  # named with the subcommand, as argparse's own errors are
    assert err.startswith("condiff namm sample: error: ") and "mirror must be a table of settings, got 'x'" in err
    (fake / "config.json").unlink()
    assert main(["namm", "sample", "--run", str(fake), "--n", "-5"]) == 2
    assert "--n must be >= 2 (the MMD to held-out data needs two samples), got -5" in capsys.readouterr().err
    # one sample: refused before any set is drawn (it was drawn, replaced the cached sets, then failed in the MMD)
    assert main(["namm", "sample", "--run", str(fake), "--n", "1"]) == 2
    assert "--n must be >= 2" in capsys.readouterr().err
    assert main(["namm", "fit", "--data", "no-such-data", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "unknown data set 'no-such-data'" in capsys.readouterr().err
    core_run = json.dumps({"data": {"name": "digits"}, "model": {}, "train": {}})  # a `condiff train` run
    (fake / "config.json").write_text(core_run)
    assert main(["namm", "sample", "--run", str(fake), "--n", "2"]) == 2
    assert f"{fake} is the run of `condiff train`, not a NAMM run" in capsys.readouterr().err
    assert (fake / "config.json").read_text() == core_run  # left as it was
    (fake / "config.json").write_text(json.dumps({"data": {}, "mirror": {}, "loss": {}, "mirror_train": {}}))
    assert main(["namm", "assimilate", "--run", str(fake), "--set", "nosuch.key=1"]) == 2
    assert "section one of" in capsys.readouterr().err
    # a bad setting of a later stage is refused before any stage trains; the run is left as it was
    out = tmp_path / "earlier-run"
    out.mkdir()
    namm_run = json.dumps({"data": {"name": "brightness"}, "mirror": {}})  # an earlier `namm fit` run
    (out / "config.json").write_text(namm_run)
    fit = ["namm", "fit", "--data", "brightness", "--profile", "quick", "--out", str(out), "--quiet"]
    assert main([*fit, "--set", "finetune.lr_decay=sometimes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finetune.lr_decay must be 'cosine' or 'constant'" in err
    assert main([*fit, "--set", "finetune.n=0"]) == 2
    assert "finetune.n (the pool of MDM samples) must be an integer >= 1" in capsys.readouterr().err
    # settings only `namm sample` uses, refused by the fit that records them rather than by every sample
    for extra, needle in ((["--set", "sample.steps=2000"], "sample.steps must be <= schedule.T = 1000, got 2000"),
                          (["--set", "sample.n=1"], "sample.n must be >= 2 (the MMD to held-out data needs two"),
                          (["--set", "guide.method=foo"], "[guide] settings: unknown guidance method 'foo'")):
        assert main([*fit, *extra]) == 2
        assert needle in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == namm_run
    # the run of another command is refused as --out before anything is checked or written
    (out / "config.json").write_text(core_run)
    assert main(fit) == 2
    assert "holds the output of `condiff train`, which `condiff namm fit` would overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == core_run


def test_cli_pipeline_end_to_end(tmp_path, capsys, monkeypatch):
    env_args = [
        "--profile",
        "quick",
        "--set",
        "data.size=8",
        "--set",
        "data.n_train=64",
        "--set",
        "data.n_test=32",
        "--set",
        "mirror.inverse.downsamples=1",
        "--set",
        "mirror_train.steps=30",
        "--set",
        "train.steps=30",
        "--set",
        "model.mults=[1, 2]",
        "--quiet",
    ]
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "condiff.cli.main", "namm"]
    subprocess.run([*cli, "fit", "--data", "periodic", "--out", str(run), *env_args], check=True)
    subprocess.run(
        [
            *cli,
            "finetune",
            "--run",
            str(run),
            "--set",
            "finetune.steps=10",
            "--set",
            "finetune.n=16",
            "--set",
            "sample.steps=5",
            "--quiet",
        ],
        check=True,
    )
    subprocess.run([*cli, "sample", "--run", str(run), "--n", "16", "--guided", "--quiet"], check=True)
    for stage in ("namm", "mdm", "vanilla", "finetune"):  # each trained stage draws its curves beside its log
        assert (run / stage / "loss.png").is_file(), stage
    subprocess.run(
        [
            *cli,
            "assimilate",
            "--run",
            str(run),
            "--set",
            "assimilate.n=2",
            "--set",
            "assimilate.steps=5",
            "--quiet",
        ],
        check=True,
    )
    metrics = json.loads((run / "samples" / "metrics.json").read_text())
    assert set(metrics) == {"data (held-out)", "vanilla", "mdm", "mdm_ft", "guided", "made_from", "versions"}
    for k in ("mdm", "mdm_ft", "guided"):  # the reduction's bootstrap interval holds the reduction itself
        lo, hi = metrics[k]["reduction_interval_90"]
        assert lo <= metrics["vanilla"]["l_mean"] / metrics[k]["l_mean"] <= hi, k
    assert "reduction_interval_90" not in metrics["vanilla"]
    assert set(metrics["made_from"]) == {"namm", "mdm", "finetune", "vanilla", "samples/vanilla", "samples/mdm",
                                         "samples/mdm_ft", "samples/guided"}  # for `condiff show`
    assim = json.loads((run / "assimilate" / "metrics.json").read_text())  # what was run, and how well
    assert not (run / "assimilate" / ".condiff-run").exists()  # the run's own folder: no mark of a run of its own
    assert assim["settings"]["n"] == 2 and assim["settings"]["steps"] == 5 and assim["settings"]["obs"] == "points"
    assert all(0 < m["rmse_unobserved"] < 10 for m in assim["methods"].values())
    with np.load(run / "assimilate" / "samples.npz") as z:  # the arrays behind the figure and the figures
        assert set(z.files) == {"truth", "y", "mirror_DPS", "DPS", "constraint_guided_DPS"}
        hidden = z["y"] == 0  # points: unobserved entries are zero in y
        rmse = float(np.sqrt(((z["mirror_DPS"] - z["truth"])[hidden] ** 2).mean()))
        assert rmse == pytest.approx(assim["methods"]["mirror DPS"]["rmse_unobserved"], rel=1e-4)
    from condiff.cli.main import main as run_cli  # mirror DPS uses the fine-tuned map by default

    assert run_cli(["namm", "assimilate", "--run", str(run), "--set", "assimilate.n=2", "--set", "assimilate.steps=5",
                    "--set", "assimilate.finetuned=true", "--quiet"]) == 0
    explicit = json.loads((run / "assimilate" / "metrics.json").read_text())["methods"]["mirror DPS"]
    untimed = [{k: v for k, v in m.items() if k != "seconds"} for m in (explicit, assim["methods"]["mirror DPS"])]
    assert untimed[0] == pytest.approx(untimed[1], rel=1e-4)  # (threads round the last digits; a first call is slow)
    kept = json.loads((run / "config.json").read_text())  # the successful calls' --set values are kept
    assert kept["finetune"]["steps"] == 10 and kept["assimilate"]["n"] == 2 and kept["sample"]["steps"] == 5
    # re-running the fit keeps them (it reset them, and the fine-tuned stage then read as other settings)
    subprocess.run([*cli, "fit", "--data", "periodic", "--out", str(run), *env_args], check=True)
    assert json.loads((run / "config.json").read_text()) == kept
    failed = subprocess.run([*cli, "sample", "--run", str(run), "--set", "sample.steps=0", "--quiet"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and json.loads((run / "config.json").read_text()) == kept
    subprocess.run([*cli, "sample", "--run", str(run), "--n", "8", "--quiet"], check=True)  # another n: redone
    assert json.loads((run / "samples" / "metrics.json").read_text())["mdm"]["n"] == 8
    # failing calls leave the run as it was: a bad --data for fit, and a sampler change that the
    # fine-tuning pool depends on (refused before any sample set is redrawn)
    cached = {p: p.read_bytes() for p in sorted((run / "samples").rglob("*.npz"))}
    failed = subprocess.run([*cli, "fit", "--data", "no-such-data", "--out", str(run), "--quiet"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and json.loads((run / "config.json").read_text()) == kept
    failed = subprocess.run([*cli, "sample", "--run", str(run), "--n", "8", "--set", "sample.steps=7", "--quiet"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "fine-tuning pool is drawn with sample.steps" in failed.stderr
    assert "(sample.steps differ)" in failed.stderr  # the message names what changed, and how to go back
    assert "; --set sample.steps=5 samples with the fine-tuned map again)" in failed.stderr
    assert {p: p.read_bytes() for p in sorted((run / "samples").rglob("*.npz"))} == cached
    # a damaged cached sample set is drawn again rather than failing on a zip error
    (run / "samples" / "vanilla" / "samples.npz").write_bytes(b"not a zip")
    subprocess.run([*cli, "sample", "--run", str(run), "--n", "8", "--quiet"], check=True)
    redrawn = np.load(run / "samples" / "vanilla" / "samples.npz")["x"]
    assert np.array_equal(redrawn, np.load(io.BytesIO(cached[run / "samples" / "vanilla" / "samples.npz"]))["x"])
    # so is a damaged mirror-space set, which only the fine-tuned map reads
    from condiff.cli.main import main  # in-process from here: no interpreter start-up per call

    (run / "samples" / "mdm" / "mirror.npz").write_bytes(b"not a zip")
    assert main(["namm", "sample", "--run", str(run), "--n", "8", "--quiet"]) == 0
    assert np.load(run / "samples" / "mdm" / "mirror.npz")["y"].shape[0] == 8
    # a finished stage whose files are damaged is named (no cached figures reported for it), and
    # --fresh redoes it
    ft = run / "finetune" / "mirror" / "model.safetensors"
    ft.write_bytes(ft.read_bytes()[:-30])
    capsys.readouterr()
    assert main(["namm", "sample", "--run", str(run), "--n", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "finetune does not load" in err and "pass --fresh to redo it" in err and err.count("\n") == 1, err
    assert main(["namm", "sample", "--run", str(run), "--n", "8", "--quiet", "--fresh"]) == 0
    assert json.loads((run / "finetune" / "stage.json").read_text())["done"]
    err = capsys.readouterr().err  # a stage made on the way is announced, even with --quiet, with how to skip it
    assert (f"making {run / 'finetune'}: the inverse map fine-tuned on mirror-model samples, 10 steps; "
            "`condiff namm finetune` makes it alone; --no-finetuned leaves it out") in err, err
    assert (run / "samples" / "violations.png").is_file() and (
        run / "assimilate" / "assimilation.png"
    ).is_file()
    # the report of the sample sets (metrics.json and its pictures) stays whole until the new one replaces it:
    # a Ctrl-C while the sets were redrawn removed metrics.json and left the old pictures
    import condiff.cli.namm as cli_namm

    def fail(exc):
        def raise_(*a, **k):
            raise exc
        return raise_

    report = {f: (run / "samples" / f).read_bytes() for f in ("metrics.json", "violations.png", "distance_hist.png")}
    with monkeypatch.context() as m:
        m.setattr(cli_namm.NAMMRun, "evaluate", fail(ValueError("a check")))
        assert main(["namm", "sample", "--run", str(run), "--n", "8", "--quiet"]) == 2
    assert {f: (run / "samples" / f).read_bytes() for f in report} == report
    with monkeypatch.context() as m:
        m.setattr(cli_namm, "plot_histograms", fail(KeyboardInterrupt()))  # half-way through the new report
        assert main(["namm", "sample", "--run", str(run), "--n", "6", "--quiet"]) == 130
    assert {f: (run / "samples" / f).read_bytes() for f in report} == report
    assert np.load(run / "samples" / "vanilla" / "samples.npz")["x"].shape[0] == 6  # the sets: a cache, redrawn
    assert main(["namm", "sample", "--run", str(run), "--n", "8", "--quiet"]) == 0
    # fit again with one later setting: the others that `namm finetune --set` recorded stay (the whole section
    # went back to the profile's, sample.steps = 50, and the fine-tuned stage then read as of other settings)
    recorded = json.loads((run / "config.json").read_text())["sample"]
    assert main(["namm", "fit", "--data", "periodic", "--out", str(run), *env_args, "--set", "sample.n=7"]) == 0
    assert json.loads((run / "config.json").read_text())["sample"] == {**recorded, "n": 7} and recorded["steps"] == 5
    # the core commands: the vanilla model records its data set (8x8 here), so eval scores it on its own
    # data; the run directory itself is named as what it is
    assert main(["eval", "--ckpt", str(run / "vanilla"), "--n", "8", "--steps", "2",
                 "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["reference"] == "test split" and ev["mmd_n"] == 8  # periodic at its own 8x8 (else a shape error)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--steps", "2"]) == 2
    assert f"is a NAMM run directory, not a model: use `condiff namm sample --run {run}`" in capsys.readouterr().err
    before = {p: p.read_bytes() for p in (run / "assimilate").iterdir()}
    # --out keeps another observation's assimilation beside the run's own (which stays as it was); a folder of
    # another command's results is refused
    assert main(["namm", "assimilate", "--run", str(run), "--set", "assimilate.n=2", "--set", "assimilate.steps=5",
                 "--no-baselines", "--obs", "rows", "--out", str(run / "assimilate-rows"), "--quiet"]) == 0
    rows = json.loads((run / "assimilate-rows" / "metrics.json").read_text())
    assert rows["operator"]["mask"].startswith("first_rows") and (run / "assimilate-rows" / "assimilation.png").exists()
    assert {p: p.read_bytes() for p in (run / "assimilate").iterdir()} == before
    capsys.readouterr()
    assert main(["namm", "assimilate", "--run", str(run), "--no-baselines", "--out", str(tmp_path / "ev")]) == 2
    assert "holds the output of `condiff eval`" in capsys.readouterr().err
    samples = {q: q.read_bytes() for q in (run / "samples").rglob("*") if q.is_file()}
    (tmp_path / "link").symlink_to(run)  # the run reached through a link is the run
    for inside in (run / "samples", run / "samples" / "mdm", run / "namm", tmp_path / "link" / "samples"):
        assert main(["namm", "assimilate", "--run", str(run), "--no-baselines", "--out", str(inside)]) == 2
        assert "lies inside the run" in capsys.readouterr().err
    assert {q: q.read_bytes() for q in (run / "samples").rglob("*") if q.is_file()} == samples
    # a method that diverges (here one made to) is named, and the earlier assimilation is left as it was
    import condiff.cli.namm as namm_cli

    real = namm_cli.assimilate
    monkeypatch.setattr(namm_cli, "assimilate", lambda *a, **k: real(*a, **k) * float("nan"))
    before = {p: p.read_bytes() for p in (run / "assimilate").iterdir()}
    capsys.readouterr()
    assert main(["namm", "assimilate", "--run", str(run), "--set", "assimilate.n=2", "--set", "assimilate.steps=5",
                 "--set", "assimilate.zeta=3", "--no-baselines", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mirror DPS diverged" in err and "not finite for 2 of 2" in err and "lower assimilate.zeta (now 3)" in err
    assert err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in (run / "assimilate").iterdir()} == before

    def step_too_large(*a, **k):  # the sampler's own check of a DPS step, named in the settings' words
        raise FloatingPointError("the guidance rule DPS returned non-finite values (NaN or inf) at step 3")

    monkeypatch.setattr(namm_cli, "assimilate", step_too_large)
    assert main(["namm", "assimilate", "--run", str(run), "--set", "assimilate.n=2", "--set", "assimilate.steps=5",
                 "--set", "assimilate.zeta=3", "--no-baselines", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ("mirror DPS diverged (the guidance rule DPS returned non-finite values (NaN or inf) at step 3): lower "
            "assimilate.zeta (now 3)") in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in (run / "assimilate").iterdir()} == before


def test_violation_maps_that_are_not_finite_are_said_and_left_out():
    """A map of NaN drew a blank panel titled "0 (black) to nan", without a word."""
    from condiff.mirror.plots import violation_maps

    class Con:
        def violation_map(self, x):
            return x[:, 0].abs() * (float("nan") if x.shape[0] > 1 else 1.0)  # finite on the probe of one

    x = torch.rand(3, 1, 8, 8)
    with pytest.warns(UserWarning, match="violation_map is not finite on 3 of 3 finite samples: the pictures show"):
        assert violation_maps(Con(), x) is None
    x[0] = float("nan")  # samples not finite themselves: theirs is the distances' warning, not this one
    Con.violation_map = lambda self, x: x[:, 0].abs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = violation_maps(Con(), x)
    assert maps.shape == (3, 8, 8)
    from condiff.mirror.plots import shared_scale

    assert shared_scale([maps, torch.full((2, 8, 8), 0.5)]) == float(maps[1:].max())  # NaN made the scale NaN
    assert shared_scale([torch.full((1, 8, 8), float("nan"))]) == 1.0


def test_violation_grid_gives_a_map_column_only_to_methods_with_maps(tmp_path):
    from PIL import Image

    from condiff.mirror.plots import plot_violation_grid

    x, v, d = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 8, 8), torch.rand(3)
    widths = {}
    for name, cols in {"mixed": {"a": (x, v, d), "b": (x, None, d)}, "two": {"a": (x, v, d), "b": (x, v, d)},
                       "none": {"a": (x, None, d), "b": (x, None, d)}}.items():
        widths[name] = Image.open(plot_violation_grid(cols, tmp_path / f"{name}.png", rows=2)).size[0]
    assert widths["none"] < widths["mixed"] < widths["two"]  # 2, 3 and 4 image columns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.png", "none.png", "two.png"]


def test_skips_carry_full_resolution_features_past_the_bottleneck():
    """With the stride-2 convs zeroed, the correction of a plain downsampling generator no longer
    depends on the input; with ``skips`` it still does (the way down reaches the way up directly)."""
    x, other = torch.randn(2, 1, 16, 16).chunk(2)
    for skips in (False, True):
        torch.manual_seed(0)
        f = ResNetGenerator(1, base=8, blocks=1, downsamples=2, norm="none", skips=skips).eval()
        with torch.no_grad():
            f.net[-1].weight.normal_(0, 0.1)  # leave the identity start
            for m in f.modules():
                if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2):
                    m.weight.zero_()
            change = float(((f(x) - x) - (f(other) - other)).abs().max())
        assert (change > 1e-4) == skips
        assert ("skips" in f.config) == skips
        g = build_net(f.config).eval()  # a checkpoint's config rebuilds the same net
        g.load_state_dict(f.state_dict())
        assert torch.equal(g(x), f(x))
    with pytest.raises(ValueError, match="skips=True needs downsamples"):
        ResNetGenerator(1, downsamples=0, skips=True)


CRITIC_DDP_SCRIPT = """
import copy, json, os, sys, torch
torch.set_num_threads(1)
import torch.distributed as dist
from condiff.constraints import Box
from condiff.mirror import FinetuneObjective, NAMMLoss, build_mirror
from condiff.train import Trainer, TrainConfig
x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
m = build_mirror((1, 8, 8), {"name": "icnn", "filters": 8, "layers": 2},
                 {"name": "resnet", "base": 8, "blocks": 1, "downsamples": 1}, 0.9, seed=0)
f = copy.deepcopy(m.inverse)  # the trained inverse, as finetune_inverse trains a copy of f
obj = FinetuneObjective(m, x, m.to_mirror(x) + 0.5, Box(-1.0, 1.0), 8, NAMMLoss(l_adv=1.0))
tr = Trainer(f, obj, TrainConfig(steps=6, batch_size=8, ckpt_every=100, progress=False, device="cpu"),
             sys.argv[1])
tr.fit()
critic = torch.cat([p.detach().flatten() for p in obj.critic.parameters()])
json.dump(critic.tolist(), open(os.path.join(sys.argv[1], f"critic{dist.get_rank()}.json"), "w"))
"""


def test_ddp_ranks_train_one_critic(tmp_path, run_on_two_ranks):
    run_on_two_ranks(CRITIC_DDP_SCRIPT)
    c0, c1 = (torch.tensor(json.loads((tmp_path / f"critic{k}.json").read_text())) for k in (0, 1))
    # the ranks drew different batches, yet hold the same critic: its gradients were averaged
    assert torch.equal(c0, c1)


@pytest.mark.parametrize("value, message", [
    ("bogus", "names unknown data sets ['bogus']"),
    (",", "names no data set"),  # not "all five", which would record over the whole table
])
def test_bench_namm_refuses_a_bad_data_restriction_before_running(tmp_path, monkeypatch, capsys, value, message):
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NAMM_BENCH_DATA", value)
    assert main(["bench", "namm", "--profile", "quick", "--no-record"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_assimilation_settings_and_operators_refuse_meaningless_values():
    from condiff.cli.namm import check_assimilate

    check_assimilate({"obs": "rows", "fraction": 0.25, "noise": 0.2, "n": 4, "clip_x0": 3.0})
    for bad, msg in [({"clip_x0": -1}, "clip_x0 must be a number > 0"),
                     ({"constraint_weight": -5}, "constraint_weight must be a number >= 0"),
                     ({"noise": 0}, "noise must be a number > 0"), ({"n": 2.5}, "n must be an integer"),
                     ({"bogus": 1}, "unknown assimilate setting"), ({"obs": "pixels"}, "obs must be one of")]:
        with pytest.raises(ValueError, match=msg):
            check_assimilate(bad)
    assert frames((4, 8, 8), [0], 0.1).mask.mean() == 0.5  # one of two snapshots
    with pytest.raises(ValueError, match="leaving nothing to infer"):
        frames((2, 8, 8), [0], 0.1)  # the only snapshot
    with pytest.raises(ValueError, match=r"snapshots \[1, 1\] repeat one"):
        frames((6, 8, 8), [1, 1], 0.1)
    with pytest.raises(ValueError, match="a non-empty list of snapshot indices, got 3"):
        frames((6, 8, 8), 3, 0.1)
    with pytest.raises(ValueError, match="all 8 rows leaves nothing to infer"):  # rows and points likewise
        first_rows((1, 8, 8), 8, 0.1)
    with pytest.raises(ValueError, match="observes all 64 points, leaving nothing to infer"):
        sparse_points((1, 8, 8), 1.0, 0.1)
    assert first_rows((1, 8, 8), 7, 0.1).mask.mean() == 7 / 8 and sparse_points((1, 8, 8), 0.99, 0.1).mask.mean() < 1
    from condiff.cli.namm import _default_frames

    assert _default_frames((16, 8, 8)) == [0, 3] and _default_frames((6, 8, 8)) == [0, 1]
    with pytest.raises(ValueError, match="at least 3 snapshots"):  # two: the default would observe both
        _default_frames((4, 8, 8))
    from condiff.cli.namm import OBSERVATIONS  # named frames of two snapshots: no default is made (it was, and failed)

    mask = OBSERVATIONS["frames"]((4, 8, 8), {"frames": [0]}, 0.1).mask
    assert mask[:, :2].all() and not mask[:, 2:].any()
    with pytest.raises(ValueError, match="downsamples = 5 needs H and W divisible by 32"):
        build_mirror((1, 16, 16), {"name": "icnn"}, {"name": "resnet", "downsamples": 5})
    with pytest.raises(ValueError, match="one sample's \\(C, H, W\\)"):
        build_mirror((2, 1, 8, 8), {"name": "icnn"}, {"name": "resnet"})
    for bad, msg in [((4, 8, 8), []), ((3, 8, 8), [0]), ((4, 8, 8), [0.5])]:
        with pytest.raises(ValueError, match="frames:"):
            frames(bad, msg, 0.1)


def test_cli_takes_a_constraint_from_the_users_python_file(tmp_path, capsys, monkeypatch):
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "con.py").write_text("def zero_sum(x):\n    return x.flatten(1).sum(1).abs()\n")
    x = np.random.default_rng(0).uniform(-1, 1, (96, 1, 8, 8)).astype("float32")
    x -= x.mean((1, 2, 3), keepdims=True)  # the data satisfy it
    np.savez(tmp_path / "data.npz", x=x[:64], x_test=x[64:])
    tiny = ["--profile", "quick", "--set", "mirror_train.steps=10", "--set", "train.steps=10",
            "--set", "model.mults=[1, 2]", "--set", "mirror.inverse.downsamples=1", "--quiet"]
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "con.py:zero_sum", "--out", "run",
                 "--no-baseline", *tiny]) == 0
    assert "constraint {'name': 'python'" in capsys.readouterr().out
    assert main(["namm", "sample", "--run", "run", "--n", "4", "--no-finetuned", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "samples" / "metrics.json").read_text())
    assert metrics["data (held-out)"]["l_max"] < 1e-4 and metrics["mdm"]["n"] == 4
    # an edited file runs only once trusted as it is now, and is other settings: the fitted stages are not reused
    # without --fresh
    (tmp_path / "con.py").write_text("def zero_sum(x):\n    return 2 * x.flatten(1).sum(1).abs()\n")
    capsys.readouterr()
    assert main(["namm", "sample", "--run", "run", "--n", "4", "--no-finetuned", "--quiet"]) == 2
    assert "it was edited since condiff last ran it" in capsys.readouterr().err
    assert main(["trust", "con.py"]) == 0
    assert main(["namm", "sample", "--run", "run", "--n", "4", "--no-finetuned", "--quiet"]) == 2
    assert "--fresh" in capsys.readouterr().err
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "con.py:zerosum", "--out", "r2", *tiny]) == 2
    assert "has no 'zerosum'; its callables: ['zero_sum']" in capsys.readouterr().err
    # data without a test split: fit says so before it trains, not only `namm sample` afterwards
    np.savez(tmp_path / "only.npz", x=x[:64])
    assert main(["namm", "fit", "--data", "only.npz", "--constraint", "con.py:zero_sum", "--out", "r3",
                 "--no-baseline", *tiny]) == 0
    assert re.search(r"warning: .*only.npz has no test split: .*; until then `namm sample` and `namm "
                     r"assimilate` refuse this run \(fit goes on\)", capsys.readouterr().err)
    # a broken distance, a broken violation map or a setting the fitting refuses fails before anything is
    # written: --fresh no longer discards the finished stages first
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}
    (tmp_path / "con.py").write_text("def zero_sum(x):\n    return x.flatten(1).sum(1, keepdim=True).abs()\n"
                                     "def scalar(x):\n    return 0.0\n"
                                     "class Mapped:\n    def __call__(self, x):\n"
                                     "        return x.flatten(1).sum(1).abs()\n"
                                     "    def violation_map(self, x):\n        return x.flatten(1)\n"
                                     "def nan_off(x):\n"  # finite on the data, NaN on noise below -1.5
                                     "    return x.flatten(1).sum(1).abs() + 0 * (x + 1.5).sqrt().flatten(1).mean(1)\n")
    for spec, extra, needle in (("con.py:zero_sum", [], "must return shape (2,) for a batch of 2, got (2, 1)"),
                                ("con.py:scalar", [], "must return shape (2,) for a batch of 2, got float"),
                                ("con.py:Mapped", [], "violation_map must return (B, H, W) = (1, 8, 8)"),
                                ("con.py:Mapped", ["--set", "loss.l_adv=1"], "is for fine-tuning only"),
                                ("con.py:nan_off", [], "images of Gaussian noise")):  # config.json kept too
        assert main(["namm", "fit", "--data", "data.npz", "--constraint", spec, "--out", "run", "--no-baseline",
                     "--fresh", *tiny, *extra]) == 2, spec
        assert needle in capsys.readouterr().err, spec
        after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before, spec


def test_cli_warns_once_where_the_data_do_not_meet_the_constraint(tmp_path, capsys, monkeypatch):
    """namm fit measures the data first and warns; the mirror map's fitting, which warns too (for the Python
    API), does not say it again."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "con.py").write_text("def zero_sum(x):\n    return x.flatten(1).sum(1).abs()\n")
    x = np.random.default_rng(0).uniform(-1, 1, (48, 1, 8, 8)).astype("float32")  # sums far from 0
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "con.py:zero_sum", "--out", "run",
                 "--no-baseline", "--profile", "quick", "--set", "mirror_train.steps=2", "--set", "train.steps=2",
                 "--set", "model.mults=[1, 2]", "--set", "mirror.inverse.downsamples=1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("the training data do not meet the constraint {'name': 'python'") == 1, err
    assert (tmp_path / "run" / "namm" / "mirror" / "config.json").is_file()  # the map was fitted in this run


def test_a_stage_made_by_a_command_that_fails_later_is_recorded_in_the_runs_settings(tmp_path, capsys, monkeypatch):
    """`namm sample --set finetune.steps=...` made the fine-tuned stage, then failed at scoring: config.json kept
    the old finetune settings, so the next plain `namm sample` refused the stage as made with other settings."""
    from condiff.cli import namm as namm_cli
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(-1, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    tiny = ["--profile", "quick", "--set", "mirror_train.steps=4", "--set", "train.steps=4", "--set", "train.warmup=0",
            "--set", "model.mults=[1, 2]", "--set", "mirror.inverse.downsamples=1", "--quiet"]
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--no-baseline",
                 *tiny]) == 0
    later = ["--set", "finetune.n=4", "--set", "sample.steps=3"]

    def scoring_fails(*a, **k):
        raise ValueError("scoring failed")

    with monkeypatch.context() as m:
        m.setattr(namm_cli, "write_sample_report", scoring_fails)
        assert main(["namm", "sample", "--run", "run", "--n", "2", "--set", "finetune.steps=3", *later, "--quiet"]) == 2
    assert "scoring failed" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["finetune"]["steps"] == 3 and cfg["sample"]["steps"] == 3  # the stage's settings, as made
    assert main(["namm", "sample", "--run", "run", "--n", "2", "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["sample", "--ckpt", "run/finetune", "--n", "2"]) == 2  # it suggested `condiff train --resume`
    assert "run/finetune is a stage of a NAMM run that holds a mirror map, not a diffusion model: use `condiff " \
           "namm sample --run run`" in capsys.readouterr().err


def test_another_constraint_or_a_moved_file_keeps_the_vanilla_stage(tmp_path, capsys, monkeypatch):
    """Another constraint on the same data, or a moved constraint file, made the vanilla DM's stage "made with
    other settings" too, though it never uses the constraint. The mirror stages are still redone: a file's
    sha256 does not cover what it may read beside it."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "con.py").write_text("def zero_sum(x):\n    return x.flatten(1).sum(1).abs()\n")
    x = np.random.default_rng(0).uniform(-1, 1, (48, 1, 8, 8)).astype("float32")
    x -= x.mean((1, 2, 3), keepdims=True)
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    tiny = ["--profile", "quick", "--set", "mirror_train.steps=4", "--set", "train.steps=4", "--set", "train.warmup=0",
            "--set", "model.mults=[1, 2]", "--set", "mirror.inverse.downsamples=1", "--quiet"]
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "con.py:zero_sum", "--out", "run", *tiny]) == 0
    stamps = {s: (tmp_path / "run" / s / "stage.json").read_text() for s in ("namm", "mdm", "vanilla")}
    # an edited file is named as one, and how to use the stage as made (only "constraint.file_sha256 differ")
    source = (tmp_path / "con.py").read_text()
    (tmp_path / "con.py").write_text(source + "# a comment\n")
    capsys.readouterr()
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "con.py:zero_sum", "--out", "run", *tiny]) == 2
    assert (f"run/namm was made with other settings (constraint.file_sha256 differ) (the constraint file "
            f"{tmp_path / 'con.py'} was edited since the stage was made: put back the version it was made with to "
            "use it); pass --fresh") in capsys.readouterr().err
    (tmp_path / "con.py").write_text(source)
    (tmp_path / "moved").mkdir()
    (tmp_path / "con.py").rename(tmp_path / "moved" / "con.py")
    capsys.readouterr()
    assert main(["namm", "sample", "--run", "run", "--n", "2", "--quiet"]) == 2  # the run names the old place
    err = capsys.readouterr().err
    assert (f"constraint file {tmp_path / 'con.py'} does not exist (named by the NAMM run run: if it was moved or "
            "deleted, put it back or link it there; or mend the path, or make the run again)") in err
    moved = ["namm", "fit", "--data", "data.npz", "--constraint", "moved/con.py:zero_sum", "--out", "run", *tiny]
    assert main(moved) == 2
    assert "run/namm was made with other settings (data.constraint.path" in capsys.readouterr().err
    assert main([*moved, "--fresh"]) == 0
    assert (tmp_path / "run" / "vanilla" / "stage.json").read_text() == stamps["vanilla"]
    assert (tmp_path / "run" / "namm" / "stage.json").read_text() != stamps["namm"]
    stamps = {s: (tmp_path / "run" / s / "stage.json").read_text() for s in stamps}
    # another constraint: the mirror stages are made again, the vanilla DM is kept
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--fresh", *tiny]) == 0
    assert (tmp_path / "run" / "vanilla" / "stage.json").read_text() == stamps["vanilla"]
    assert (tmp_path / "run" / "namm" / "stage.json").read_text() != stamps["namm"]


def test_rerunning_fit_after_a_failed_fresh_puts_the_kept_stage_back(tmp_path, capsys, monkeypatch):
    """A `namm fit --fresh` that failed (a loss that blew up) left the finished map in .replaced and a failed stage
    in its place; rerunning the command that made the map was refused as "made with other settings"."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(-1, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    fit = ["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--no-baseline", "--profile",
           "quick", "--set", "mirror_train.steps=4", "--set", "train.steps=4", "--set", "train.warmup=0", "--set",
           "model.mults=[1, 2]", "--set", "mirror.inverse.downsamples=1", "--quiet"]
    assert main(fit) == 0
    mirror = {p.name: p.read_bytes() for p in (tmp_path / "run" / "namm" / "mirror").iterdir()}
    assert main([*fit, "--set", "mirror_train.lr=1e12", "--fresh"]) == 2
    assert (tmp_path / "run" / ".replaced" / "namm").is_dir()
    capsys.readouterr()
    assert main(fit) == 0  # the original command: its finished map comes back, untrained again
    assert "restored run/namm: the finished stage of these settings" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "namm" / "mirror").iterdir()} == mirror
    assert not (tmp_path / "run" / ".replaced").exists()
    assert main(["namm", "sample", "--run", "run", "--n", "2", "--no-finetuned", "--quiet"]) == 0
    assert not (tmp_path / "run" / "vanilla").exists()  # a run fitted with --no-baseline samples no vanilla DM
    # a failed --fresh that left checkpoints (a Ctrl-C mid-stage): the rerun is refused before anything changes,
    # naming the kept stage of these settings and how to take it back (it named only --fresh, which redoes it)
    assert main([*fit, "--set", "mirror_train.lr=1e12", "--fresh"]) == 2
    (tmp_path / "run" / "namm" / "checkpoints" / "step_00000002").mkdir(parents=True)
    config = (tmp_path / "run" / "config.json").read_bytes()
    capsys.readouterr()
    assert main(fit) == 2
    err = capsys.readouterr().err
    assert ("run/namm holds an unfinished stage of other settings (mirror_train.lr differ), with checkpoints; "
            "run/.replaced/namm keeps the finished stage of these settings that it was to replace: move that back "
            "over run/namm to use it, or pass --fresh to redo the stage") in err, err
    assert (tmp_path / "run" / "config.json").read_bytes() == config


def _tiny_box_fit(tmp_path, n_test=16):
    """The argv of a seconds-long `namm fit` (box constraint, no vanilla DM) of 32 random 8x8 pictures written to
    ``tmp_path/data.npz``, with ``n_test`` held out, into ``run`` (relative: chdir to ``tmp_path`` first)."""
    x = np.random.default_rng(0).uniform(-1, 1, (32 + n_test, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    return ["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--no-baseline", "--profile",
            "quick", "--set", "mirror_train.steps=4", "--set", "train.steps=4", "--set", "train.warmup=0", "--set",
            "model.mults=[1, 2]", "--set", "mirror.inverse.downsamples=1", "--quiet"]


def test_a_namm_run_from_elsewhere_runs_its_constraint_file_only_once_trusted(tmp_path, capsys, monkeypatch):
    """A run's config.json names the user's constraint file, which later commands run again: not on a machine
    where condiff never ran that file (a run from elsewhere) until `condiff trust`."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "con.py").write_text("def box(x):\n    return (x.abs() - 1).clamp(min=0).flatten(1).sum(1)\n")
    fit = [a if a != "box" else "con.py:box" for a in _tiny_box_fit(tmp_path)]
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "examples", "own_net", "net.py"), tmp_path / "net.py")
    at = fit.index("model.mults=[1, 2]")  # the mirror DMs' net of one's own, whose constructor has no mults
    fit[at] = "model.name=net.py:SmallConvNet"
    assert main(fit) == 0  # named on the command line: trusted from then on, here
    sample = ["namm", "sample", "--run", "run", "--set", "sample.n=2", "--set", "sample.steps=2", "--quiet",
              "--no-finetuned"]
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "elsewhere"))
    capsys.readouterr()
    assert main(sample) == 2
    err = capsys.readouterr().err
    assert f"the NAMM run run names the constraint file {tmp_path / 'con.py'}, and condiff has not run it" in err
    # `namm fit --resume` takes its settings from config.json too: it ran the file and trusted it
    assert main(["namm", "fit", "--out", "run", "--resume", "--quiet"]) == 2
    assert "names the constraint file" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere" / "trusted_code.json").exists()
    assert main(["trust", "con.py"]) == 0 and main(sample) == 2
    err = capsys.readouterr().err
    assert f"the model at run/mdm/model names the net file {tmp_path / 'net.py'}, and condiff has not run it" in err
    assert "--fresh" not in err  # the stage is sound: it is not to be redone
    assert main(["trust", "net.py"]) == 0 and main(sample) == 0


_EXAMPLE_NET = os.path.join(os.path.dirname(__file__), "..", "examples", "own_net", "net.py")


@pytest.mark.parametrize(("file", "code", "fit_set", "redo_set"), [
    # a mirror DM's net of one's own, its stage redone with another width
    ("net.py", open(_EXAMPLE_NET).read(), "model.name=net.py:SmallConvNet", "model.width=8"),
    # a Psi of one's own (a subclass of the library's ICNN), the mirror map redone with more steps
    ("psi.py", "from condiff.nets.icnn import ICNN\n\n\nclass Psi(ICNN):\n    pass\n",
     "mirror.psi={name='psi.py:Psi', filters=4, layers=2}", "mirror_train.steps=5"),
])
def test_a_namm_run_from_elsewhere_does_not_run_a_net_file_to_check_a_stage_it_would_redo(
        tmp_path, capsys, monkeypatch, file, code, fit_set, redo_set):
    """The check before a stage is redone (other settings, --fresh) builds the stage's nets from the run's settings:
    an untrusted net file is refused there, not run."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / file).write_text(code + f"\nopen({str(marker)!r}, 'a').write('ran')\n")
    fit = _tiny_box_fit(tmp_path)
    if fit_set.startswith("model."):  # in place of the UNet's setting, which a net of one's own does not take
        fit[fit.index("model.mults=[1, 2]")] = fit_set
    else:
        fit += ["--set", fit_set]
    assert main(fit) == 0
    assert f'"{tmp_path / file}:' in (tmp_path / "run" / "config.json").read_text()  # recorded by its full path
    marker.unlink()
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "elsewhere"))
    capsys.readouterr()
    assert main(["namm", "sample", "--run", "run", "--fresh", "--set", redo_set, "--set", "sample.n=2",
                 "--set", "sample.steps=2", "--quiet", "--no-finetuned"]) == 2
    assert "names the net file" in capsys.readouterr().err and not marker.exists()


def test_a_stage_that_failed_before_its_first_checkpoint_is_replaced_with_nothing_kept(tmp_path, capsys, monkeypatch):
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    fit = _tiny_box_fit(tmp_path)
    assert main([*fit, "--set", "mirror_train.lr=1e12"]) == 2  # the loss blows up at step 1
    capsys.readouterr()
    assert main([*fit, "--set", "mirror_train.lr=1e13"]) == 2  # other settings: the empty stage is replaced
    err = capsys.readouterr().err
    assert "training loss became nan at step 1" in err and "--fresh" not in err
    assert not (tmp_path / "run" / ".replaced").exists()


def test_refitting_other_data_takes_none_of_the_later_settings_recorded_for_the_old(tmp_path, monkeypatch):
    from condiff.cli.main import main
    from condiff.cli.namm import resolve

    monkeypatch.chdir(tmp_path)
    fit = _tiny_box_fit(tmp_path)
    assert main([*fit, "--set", "sample.steps=3"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sample"]["steps"] == 3
    with np.load(tmp_path / "data.npz") as z:
        np.savez(tmp_path / "other.npz", **z)
    other = [a if a != "data.npz" else "other.npz" for a in fit]
    assert main([*other, "--fresh"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sample"] == \
        resolve("other.npz", "quick", None, [], "box")["sample"]


def test_assimilate_uses_at_most_the_held_out_truths_and_says_so(tmp_path, capsys, monkeypatch):
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(_tiny_box_fit(tmp_path, n_test=4)) == 0
    capsys.readouterr()
    assert main(["namm", "assimilate", "--run", "run", "--no-baselines", "--set", "assimilate.n=6", "--set",
                 "assimilate.steps=3", "--set", "assimilate.finetuned=false", "--quiet"]) == 0
    assert "assimilate.n = 6, but the held-out split has 4 truths: using 4" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "assimilate" / "metrics.json").read_text())["n"] == 4
    with np.load(tmp_path / "run" / "assimilate" / "samples.npz") as z:
        assert len(z["truth"]) == len(z["mirror_DPS"]) == 4


def test_assimilate_refuses_a_directory_where_it_writes_before_sampling(tmp_path, capsys, monkeypatch):
    import condiff.cli.namm as namm_cli
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(_tiny_box_fit(tmp_path, n_test=2)) == 0

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the check")

    monkeypatch.setattr(namm_cli, "assimilate", no_sampling)
    for name in ("assimilation.png", "samples.npz", "metrics.json"):
        (tmp_path / "run" / "assimilate" / name).mkdir(parents=True)
        capsys.readouterr()
        assert main(["namm", "assimilate", "--run", "run", "--no-baselines", "--set", "assimilate.finetuned=false",
                     "--quiet"]) == 2, name
        err = capsys.readouterr().err
        assert f"{name} is a directory: move it away, it is where this command writes" in err, err
        (tmp_path / "run" / "assimilate" / name).rmdir()


def test_a_negative_constraint_term_stops_training_at_its_step_on_either_read_path(tmp_path):
    """The constraint term is read back where the trainer reads its losses (each step on the CPU, at
    log lines and checkpoints on a GPU); either way the first negative one stops training, naming its
    step, and no checkpoint is written after it. The logged terms are the same on both paths."""
    x = torch.rand(32, 1, 8, 8)

    def wrong_sign_from_step_5(v, scale=-1.0):  # a distance with a sign error once training reaches step 5
        return scale * v.flatten(1).abs().mean(1) if state["step"] >= 5 else v.flatten(1).abs().mean(1)

    def minus_inf_from_step_5(v):  # the sign error makes the loss non-finite too: the sign is named
        return wrong_sign_from_step_5(v, float("-inf"))

    class Counted(NAMMObjective):
        def loss(self, model, step, generator):
            state["step"] = step
            return super().loss(model, step, generator)

    logged = []
    for each in (True, False):
        state = {"step": 0}
        cfg = TrainConfig(steps=4, batch_size=4, log_every=2, ckpt_every=100, progress=False)
        tr = Trainer(_tiny_mirror(), Counted(x, wrong_sign_from_step_5, 4), cfg, run_dir=tmp_path / f"ok{each}")
        tr.check_each_step = each
        tr.fit()
        log = read_log(tmp_path / f"ok{each}" / "log.jsonl")
        logged.append([{k: r[k] for k in ("step", "cyc", "con", "reg")} for r in log])
        assert all(isinstance(r["con"], float) for r in logged[-1])
        for bad in (wrong_sign_from_step_5, minus_inf_from_step_5):
            state = {"step": 0}
            cfg = TrainConfig(steps=12, batch_size=4, log_every=10, ckpt_every=3, progress=False)
            run = tmp_path / f"{bad.__name__}{each}"
            tr = Trainer(_tiny_mirror(), Counted(x, bad, 4), cfg, run_dir=run)
            tr.check_each_step = each
            with pytest.raises(ValueError, match=r"mean constraint distance at step 5 reaches -([0-9.]+|inf) < 0"):
                tr.fit()
            saved = [q.name for q in list_checkpoints(run / "checkpoints")]
            assert saved == ["step_00000003"], each  # the checkpoint at step 6 would hold the bad step's update
    assert [r["step"] for r in logged[0]] == [2, 4]
    assert logged[0] == logged[1]


def test_a_users_file_named_like_a_family_gets_generic_settings_and_an_absolute_path(tmp_path, monkeypatch):
    from condiff.cli.config import resolve as resolve_train
    from condiff.cli.namm import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "count.npy", np.zeros((4, 1, 8, 8), np.float32))
    cfg = resolve("sub/count.npy", "quick", constraint="box")
    assert cfg["mirror"]["psi"]["layers"] == 3 and "k" not in cfg["data"]  # not the count family's 2 and k = 4
    assert "size" not in cfg["data"] and "n_train" not in cfg["data"]
    assert cfg["data"]["name"] == str(tmp_path / "sub" / "count.npy")
    assert resolve_train("sub/count.npy")["data"]["name"] == str(tmp_path / "sub" / "count.npy")
    assert resolve("count", "quick")["data"]["k"] == 4 and resolve_train("digits")["data"]["name"] == "digits"


def test_data_violation_tells_data_on_the_set_from_data_off_it():
    from condiff.mirror import data_violation
    from condiff.pnp.conditional import MirrorSymmetry

    g = torch.Generator().manual_seed(0)
    raw = torch.rand(600, 1, 4, 4, generator=g) * 2 - 1
    symmetric = (raw + raw.flip(-1)) / 2  # on the set (l = 0); noise of their mean and std is not
    v = data_violation(MirrorSymmetry(-1), symmetric)
    assert v["n"] == 512 and v["median"] == 0 and v["noise_median"] > 0.1 and v["satisfied"]
    v = data_violation(MirrorSymmetry(-1), raw)  # as asymmetric as noise
    assert v["median"] > 0.25 * v["noise_median"] and not v["satisfied"]
    # finite on the data but NaN off them (a square root of x + 1): a map trained on noisy images would fail
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) on \d+ of 512 images of Gaussian noise"):
        data_violation(lambda v: (v + 1).sqrt().flatten(1).mean(1), raw)
    # a distance with no slope off the set (rounded) teaches the map nothing: said before the fit, not after
    with pytest.warns(UserWarning, match="a constraint distance is > 0 on 4 of 4 samples but its gradient is zero"):
        data_violation(lambda v: torch.round(10 * v.sum(-1).abs()).flatten(1).mean(1), symmetric)
    with torch.inference_mode():  # a measurement: taken in inference mode too (the slope probe is left out)
        assert data_violation(MirrorSymmetry(-1), symmetric)["satisfied"]


def test_map_inputs_of_another_dtype_or_no_samples():
    """float64 data failed deep inside a convolution, and an empty set inside torch.cat."""
    m = MirrorMap(_icnn(scale=0.5), ResNetGenerator(1, base=8, blocks=1, downsamples=1), a=0.9)
    for fn in (m.to_mirror, m.to_data):
        assert fn(torch.zeros(0, 1, 8, 8)).shape == (0, 1, 8, 8)
        with pytest.raises(ValueError, match="is torch.float64 but the network's weights are torch.float32"):
            fn(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
        with pytest.raises(TypeError, match="must be a floating-point tensor, got dtype torch.int64"):
            fn(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    x = torch.randn(6, 1, 8, 8)
    x[4, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NAMM data hold 1 non-finite values \(the first in sample 4\)"):
        NAMMObjective(x, Box(-1, 1))


def test_weights_made_directly_are_checked_too():
    """NAMMLoss(l_con=-1) built directly trained the map towards violating its constraint."""
    from condiff.mirror import with_constraint

    with pytest.raises(ValueError, match="NAMM loss l_con must be a number >= 0, got -1.0"):
        NAMMLoss(l_con=-1.0)
    with pytest.raises(ValueError, match=r"constraint weight must lie in \[0, inf\], got -1"):
        with_constraint(lambda x: x.sum(1), Box(-1, 1), weight=-1)
    assert NAMMLoss.from_dict({"l_con": 3}).l_con == 3.0


def test_mirror_generate_samples_in_mirror_space_and_maps_back():
    """(x, y): y is the diffusion model's draw in mirror space (the same as generate's for the seed),
    x = f(y) through the map's inverse, whatever the batch size."""
    from condiff.mirror import mirror_generate
    from condiff.sample import generate

    den = GaussianDenoiser(Schedule.linear(50), mean=0.2, std=0.5)
    m = _tiny_mirror()
    with torch.no_grad():
        for p in m.inverse.parameters():  # an inverse map that is not the identity
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x, y = mirror_generate(den, m, 5, (1, 8, 8), steps=4, generator=torch.Generator().manual_seed(0))
    ref = generate(den, 5, (1, 8, 8), steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x, m.to_data(y))
    assert not torch.allclose(x, y, atol=1e-3)
    x2, y2 = mirror_generate(den, m, 5, (1, 8, 8), batch_size=2, steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x2, m.to_data(y2))


def test_psi_is_a_spatial_mean_so_tiling_leaves_it_unchanged():
    psi, x = _icnn(), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(psi(x.repeat(1, 1, 2, 2)), psi(x))  # circular padding: exact up to rounding


class _Scale(torch.nn.Module):
    """f(y) = y / a: the exact inverse of g(x) = a x."""

    def __init__(self, a):
        super().__init__()
        self.a, self.w = a, torch.nn.Parameter(torch.ones(()))
        self.config = {"name": "scale"}

    def forward(self, y):
        return self.w * y / self.a


def _exact_pair(a=0.9):
    psi = _icnn()
    with torch.no_grad():
        psi.out.weight.zero_()  # Psi constant: g(x) = a x
    return MirrorMap(psi, _Scale(a), a)


def test_finetuning_terms_on_an_exact_inverse_pair():
    """With g(x) = a x and f(y) = y / a the cycle term is 0 whatever the mirror-space noise; the constraint
    sees f(y0 + sigma z), spread about f(y0); the realism term is softplus(-D(f(y))); Psi gets no gradient."""
    m = _exact_pair()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y0 = torch.full((8, 1, 8, 8), 0.45)
    seen = []

    def con(z):
        seen.append(z.detach())
        return z.flatten(1).abs().mean(1)

    obj = FinetuneObjective(m, x, y0, con, batch_size=8, weights=NAMMLoss(sigma_max=0.2, l_adv=1.0))

    class Constant(torch.nn.Module):
        def forward(self, z):
            return torch.full((z.shape[0],), 0.7)

    obj.critic = Constant()
    f = copy.deepcopy(m.inverse).requires_grad_(True)  # as finetune_inverse trains a copy of f
    loss, logs = obj.loss(f, 0, torch.Generator().manual_seed(1))
    assert float(logs["cyc"]) < 1e-6
    assert float(logs["adv"]) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-0.7))))
    spread = (seen[-1] - 0.5).flatten(1).std(1)  # f(y0) = 0.45 / 0.9 = 0.5
    assert float(spread.max()) > 0.01 and float(spread.max()) < 0.2 / 0.9 * 1.5
    loss.backward()
    assert all(p.grad is None for p in obj.psi_map.psi.parameters()) and f.w.grad is not None
    assert all(p.grad is None for p in m.psi.parameters())


def test_constraint_weight_frames_mask_and_data_violation():
    from condiff.mirror import data_violation, with_constraint

    con = Box(-0.2, 0.2)
    x = 2 * torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(with_constraint(lambda z: torch.zeros(z.shape[0]), con, 200.0)(x), 200 * con(x))
    mask = frames((6, 4, 4), [1], 0.1).mask
    assert mask[0, 2:4].eq(1).all() and mask[0, :2].eq(0).all() and mask[0, 4:].eq(0).all()
    # l = mean |x|; data with a fraction p of pixels at +-1: against noise of the same mean and std the
    # median ratio is sqrt(p) / 0.798: 0.5 at p = 0.16 (not "well below", a quarter), 0.125 at p = 0.01
    def sparse(p):
        g = torch.Generator().manual_seed(0)
        on = torch.rand(512, 1, 32, 32, generator=g) < p
        return torch.where(on, torch.sign(torch.randn(on.shape, generator=g)), torch.zeros(on.shape))

    def mean_abs(z):
        return z.flatten(1).abs().mean(1)

    assert data_violation(mean_abs, sparse(0.16))["satisfied"] is False
    assert data_violation(mean_abs, sparse(0.01))["satisfied"] is True


@pytest.mark.parametrize(("damage", "message"), [
    (lambda c: c.pop("mirror"), "has no 'mirror' entry"),
    (lambda c: c["mirror"].pop("inverse"), "has no 'inverse' entry"),
    (lambda c: c.update(mirror=3), "holds a bad setting"),
    (lambda c: c["mirror"].update(a="x"), "holds a bad setting"),
])
def test_a_damaged_mirror_config_is_a_checkpoint_error_naming_the_file(tmp_path, damage, message):
    from condiff.io import CheckpointError

    save_mirror(tmp_path / "m", _tiny_mirror())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    damage(cfg)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"m/config.json {message}"):
        load_mirror(tmp_path / "m")


def test_building_and_training_leave_the_callers_random_stream_alone():
    """build_mirror and train_diffusion seed their own weights; they used to reseed the global RNG, so
    the caller's next draw was the same whatever seed the caller had set."""
    from condiff.mirror import train_diffusion

    draws, x = [], torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        _tiny_mirror(seed=0)
        train_diffusion(x, {"name": "mlp", "dim": 2, "hidden": 8, "depth": 1}, Schedule.linear(20),
                        TrainConfig(steps=2, batch_size=4, progress=False), seed=0)
        draws.append(torch.randn(3))
        torch.manual_seed(caller_seed)
        assert torch.equal(draws[-1], torch.randn(3))  # as if the calls had not happened
    assert not torch.equal(draws[0], draws[1])
    a, b = _tiny_mirror(seed=0).state_dict(), _tiny_mirror(seed=1).state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the seed given still decides the weights


def test_an_inline_table_override_merges_like_a_config_file():
    """``--set mirror.psi={filters=32}`` replaced the whole table (dropping its name and depth) while
    ``--set mirror.psi.filters=32`` merged, so the same intent gave other nets by spelling and order."""
    from condiff.cli.config import ConfigError
    from condiff.cli.namm import resolve

    def mirror(*sets):
        return resolve("count", "quick", None, list(sets), None)["mirror"]

    nested = mirror("mirror.psi.filters=32", "mirror.psi.layers=4")
    assert nested["psi"] == {"name": "icnn", "layers": 4, "filters": 32}
    assert mirror("mirror.psi={filters=32, layers=4}") == nested
    assert mirror("mirror.psi={filters=32}", "mirror.psi.layers=4") == nested
    assert mirror("mirror.psi.layers=4", "mirror.psi={filters=32}") == nested
    # another kind replaces the table (the old kind's keys would not fit it), and so does a plain value
    assert mirror("mirror.inverse={name='unet', base=8}")["inverse"] == {"name": "unet", "base": 8}
    from condiff.cli.config import set_path

    for value, want in (({"name": "box", "lo": -1.0}, {"name": "box", "lo": -1.0}),
                        ({"radius": 2.0}, {"name": "ball", "radius": 2.0}), ("box", "box")):
        cfg = {"data": {"constraint": {"name": "ball", "radius": 1.0}}}
        set_path(cfg, ["data", "constraint"], value)
        assert cfg["data"]["constraint"] == want
    # naming another kind by its name alone starts its table afresh too, and a config file's table of another kind
    # replaces the old one; the data table, whose name chose the defaults, keeps its keys
    assert mirror("mirror.inverse.name=unet", "mirror.inverse.base=8")["inverse"] == {"name": "unet", "base": 8}
    assert mirror("mirror.inverse.name=resnet") == mirror()  # the same kind: its settings stay
    from condiff.cli.config import merge_checked

    base = {"data": {"name": "count", "k": 4}, "mirror": {"psi": {"name": "icnn", "filters": 16}}}
    new = {"data": {"name": "other"}, "mirror": {"psi": {"name": "own.py:Psi", "width": 3}}}
    assert merge_checked(base, new, "f.toml") == {"data": {"name": "other", "k": 4},
                                                   "mirror": {"psi": {"name": f"{os.path.abspath('own.py')}:Psi",
                                                                      "width": 3}}}  # found from anywhere
    cfg = {"data": {"name": "digits", "seed": 0}}
    set_path(cfg, ["data", "name"], "toy2d")
    assert cfg == {"data": {"name": "toy2d", "seed": 0}}
    with pytest.raises(ConfigError, match=r"setting mirror.psi.filters expects a number \(now 16\), got 'x'"):
        mirror("mirror.psi={filters='x'}")


def test_an_inline_table_naming_a_net_of_ones_own_goes_first_and_is_recorded_by_its_files_full_path(
        tmp_path, monkeypatch):
    """``--set mirror.inverse={name="own.py:Inv"}`` names another kind, as ``mirror.inverse.name=`` does: it is
    applied before the config file, whose settings for the new net stay, and names the file by its absolute path."""
    from condiff.cli.namm import resolve

    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "m.toml"
    toml.write_text("[mirror.inverse]\nwidth = 3\n")
    want = {"name": f"{tmp_path / 'own.py'}:Inv", "width": 3}
    for sets in (["mirror.inverse={name='own.py:Inv'}"], ["mirror.inverse.name=own.py:Inv"]):
        assert resolve("count", "quick", toml, sets, None)["mirror"]["inverse"] == want, sets
    from condiff.cli.config import set_path

    cfg = {"mirror": {"inverse": {"name": "resnet", "filters": 8}}}  # a run's recorded settings, then --set
    set_path(cfg, ["mirror", "inverse"], {"name": "own.py:Inv", "width": 3})
    assert cfg["mirror"]["inverse"] == want
    set_path(cfg, ["mirror", "inverse"], {"name": "own.py:Inv", "depth": 2})  # the same net: merged
    assert cfg["mirror"]["inverse"] == {**want, "depth": 2}


def test_a_registered_data_set_that_is_no_generator_gets_none_of_the_generators_sizes():
    """`namm fit --data digits --constraint box` stopped with "data set 'digits' has no setting(s)
    ['n_test', 'n_train', 'size']", settings the user never gave (the profile's, for the generators)."""
    from condiff.cli.namm import resolve
    from condiff.data import load_dataset

    for profile in ("quick", "default", "full"):
        data = resolve("digits", profile, constraint="box")["data"]
        assert not {"size", "n_train", "n_test"} & set(data)
        load_dataset("digits", "train", **{k: v for k, v in data.items() if k not in ("name", "constraint")})
        assert {"size", "n_train", "n_test"} <= set(resolve("count", profile)["data"])


def test_a_run_fitted_at_the_old_icnn_depth_is_told_how_to_keep_it(tmp_path, capsys, monkeypatch):
    """The default and full profiles' ICNN grew one layer (to the paper's depth): refitting an earlier run
    is refused as other settings, and the message says which --set keeps the run's depth."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(0, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    tiny = ["--data", "data.npz", "--constraint", "box", "--out", "run", "--no-baseline", "--quiet",
            "--set", "mirror_train.steps=2", "--set", "train.steps=2", "--set", "model.mults=[1, 2]",
            "--set", "mirror.psi.filters=4", "--set", "mirror.inverse.base=4", "--set", "mirror.inverse.blocks=1"]
    assert main(["namm", "fit", *tiny, "--set", "mirror.psi.layers=3"]) == 0  # as made before the change
    capsys.readouterr()
    assert main(["namm", "fit", *tiny]) == 2
    err = capsys.readouterr().err
    assert "(mirror.psi.layers differ) (made with mirror.psi.layers=3, now 4; --set mirror.psi.layers=3 takes the " \
        "stage as made) (the default and full profiles build the paper's ICNN depth since 2026-12-05)" in err, err
    assert main(["namm", "fit", *tiny, "--set", "mirror.psi.layers=3"]) == 0
    # a run without the baseline is still named as a NAMM run by the core commands
    capsys.readouterr()
    assert main(["sample", "--ckpt", "run", "--n", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "run is a NAMM run directory, not a model: use `condiff namm sample --run run`" in err
    assert "vanilla" not in err


def test_batched_distance_scores_every_row():
    """The NAMM metrics' distances come in batches: all of them, in order, as unbatched."""
    from condiff.mirror.sample import batched_distance

    x = torch.randn(600, 3)
    torch.testing.assert_close(batched_distance(lambda v: v.pow(2).sum(1), x, batch_size=256), x.pow(2).sum(1))


def test_to_mirror_and_to_data_take_inputs_that_require_grad():
    """They failed with "the differentiated tensor ... not used in the graph" on such an input (a
    network's output, a parameter), and so did fine-tuning on one; the result has no graph."""
    m = _tiny_mirror()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    leaf = x.clone().requires_grad_()
    for fn in (m.to_mirror, m.to_data):
        out = fn(leaf, batch_size=2)
        assert not out.requires_grad and torch.equal(out, fn(x, batch_size=2))
        assert torch.equal(fn(leaf * 1.0), out)  # a non-leaf
    with pytest.raises(ValueError, match="to_mirror: batch_size must be an integer >= 1, got 0"):
        m.to_mirror(x, batch_size=0)
    with pytest.raises(ValueError, match="to_data: batch_size must be an integer >= 1, got 2.5"):
        m.to_data(x, batch_size=2.5)
    from condiff.mirror.objective import FinetuneObjective

    with pytest.raises(ValueError, match="the mirror samples is torch.float64 but the network's weights are "
                                         "torch.float32"):  # was a raw conv error mid-training
        FinetuneObjective(m, x, x.double(), Box())
    w = torch.ones((), requires_grad=True)
    obj = FinetuneObjective(m, x, x * w, Box(), batch_size=4)  # mirror samples that carry a graph
    g = torch.Generator().manual_seed(0)
    for step in range(2):  # the second backward went through the samples' freed graph
        loss, _ = obj.loss(m.inverse, step, g)
        loss.backward()
    assert w.grad is None  # and nothing leaks into it


@pytest.mark.parametrize("make", [lambda s: first_rows(s, 2, 0.1), lambda s: sparse_points(s, 0.1, 0.1),
                                  lambda s: frames(s, [0], 0.1)])
def test_observations_name_a_shape_with_a_batch_dimension(make):
    with pytest.raises(ValueError, match=r"shape must be one sample's \(C, H, W\), three integers >= 1 "
                                         r"\(no batch\), got \(1, 2, 8, 8\)"):  # "too many values to unpack" before
        make((1, 2, 8, 8))
    assert make((4, 8, 8)).mask.shape[-2:] == (8, 8)


@pytest.mark.parametrize(("constraint", "says"), [
    ("box", "samples and their constraint violations"),
    ("con.py:total", "samples and their distances l(x) (the constraint draws no violation map)"),
])
def test_namm_samples_figure_says_whether_it_holds_violation_maps(tmp_path, monkeypatch, constraint, says):
    """A constraint with no violation map (a total) gets a figure of samples and their distances, titled so."""
    import condiff.cli.namm as cli_namm
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "con.py").write_text("def total(x):\n    return x.flatten(1).sum(1).abs()\n")
    titles = []
    real = cli_namm.plot_violation_grid
    monkeypatch.setattr(cli_namm, "plot_violation_grid",
                        lambda cols, out, **kw: titles.append((kw["title"], [c[1] is None for c in cols.values()]))
                        or real(cols, out, **kw))
    fit = [a if a != "box" else constraint for a in _tiny_box_fit(tmp_path)]
    assert main(fit) == 0
    assert main(["namm", "sample", "--run", "run", "--set", "sample.n=2", "--set", "sample.steps=2", "--quiet",
                 "--no-finetuned"]) == 0
    (title, none), = titles
    assert title == f"{tmp_path / 'data.npz'}: {says}" and all(none) == (constraint != "box")
    assert (tmp_path / "run" / "samples" / "violations.png").is_file()


def _fit_with_own_net(tmp_path, cls: str, init: str, conv: str) -> list[str]:
    """The argv of :func:`_tiny_box_fit` with a one-convolution net of one's own, ``net.py:cls``, as its diffusion
    nets: ``__init__(self, init)`` and ``Conv2d(conv)``."""
    (tmp_path / "net.py").write_text(f"import torch\n\n\nclass {cls}(torch.nn.Module):\n"
                                     f"    def __init__(self, {init}):\n        super().__init__()\n"
                                     f"        self.conv = torch.nn.Conv2d({conv})\n\n"
                                     "    def forward(self, x, t, y=None):\n        return self.conv(x)\n")
    fit = _tiny_box_fit(tmp_path)
    fit[fit.index("model.mults=[1, 2]")] = f"model.name=net.py:{cls}"
    return fit


def test_namm_fit_checks_a_net_of_ones_own_before_the_mirror_map_is_trained(tmp_path, capsys, monkeypatch):
    """A diffusion net that returns another shape than its input's is refused before any stage trains (it failed
    only in the mirror DM's training, after the mirror map's, which takes minutes on a real profile)."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    fit = _fit_with_own_net(tmp_path, "Shrink", "in_channels=1", "in_channels, in_channels, 3")
    capsys.readouterr()
    assert main(fit) == 2
    assert (f"model {tmp_path / 'net.py'}:Shrink maps x of shape (2, 1, 8, 8) to (2, 1, 6, 6): a denoising net "
            "returns its prediction of the noise") in capsys.readouterr().err
    assert not (tmp_path / "run" / "namm").exists()


def test_namm_fit_gives_a_net_of_ones_own_in_channels_only_where_its_constructor_takes_it(tmp_path, monkeypatch):
    """namm forced in_channels onto every diffusion net; `train` fills it in only where the constructor takes it."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(_fit_with_own_net(tmp_path, "OneChannel", "width=4", "1, 1, 3, padding=1")) == 0
    net = json.loads((tmp_path / "run" / "mdm" / "model" / "config.json").read_text())["net"]
    assert net["name"] == f"{tmp_path / 'net.py'}:OneChannel" and "in_channels" not in net


def test_namm_fit_names_vector_data_as_what_its_maps_cannot_take(tmp_path, capsys, monkeypatch):
    """Vectors were refused as "build_mirror: shape is one sample's (C, H, W), got (5,)"."""
    import numpy as np

    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(-1, 1, (48, 5)).astype("float32")
    np.savez("v.npz", x=x[:32], x_test=x[32:])
    assert main(["namm", "fit", "--data", "v.npz", "--constraint", "box", "--out", "r", "--profile", "quick"]) == 2
    assert ("NAMM's mirror maps are convolutional and take images (C, H, W); these samples have shape (5,)"
            in capsys.readouterr().err)
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_second_fit_into_a_run_dir_of_checkpoints_is_refused_unless_it_resumes(tmp_path):
    """A fresh fit into the same run_dir pruned its own checkpoints under the old run's higher ones, overwrote
    the log, and a later resume=True went on with the old run."""
    x, con = _brightness_data(32)
    cfg = TrainConfig(steps=4, batch_size=4, warmup=0, ckpt_every=2, progress=False)
    fit_mirror_map(x, con, _tiny_mirror(), cfg, run_dir=tmp_path)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    with pytest.raises(FileExistsError, match=r"holds the checkpoints of another run \(the newest step_00000004\): "
                                              r"call resume\(\) first"):
        fit_mirror_map(x, con, _tiny_mirror(), cfg, run_dir=tmp_path)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    fit_mirror_map(x, con, _tiny_mirror(), cfg, run_dir=tmp_path, resume=True)  # a finished run: reused as it is
    from condiff.train import DenoisingObjective

    tr = Trainer(build_net({"name": "mlp", "dim": 2, "hidden": 8, "depth": 1}),
                 DenoisingObjective(torch.randn(16, 2), Schedule.linear(10), 4), cfg, tmp_path / "own")
    tr.save()  # its own initial weights, at step 0: not another run's
    tr.fit()
    assert [c.name for c in list_checkpoints(tmp_path / "own")][-1] == "step_00000004"


def test_the_mirror_api_names_what_it_was_given_wrong():
    from condiff.mirror import data_violation

    x, con = _brightness_data(16)
    cfg = TrainConfig(steps=2, batch_size=4, warmup=0, progress=False)
    m = _tiny_mirror()
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")  # in the first two samples: the constraint's probe was blamed
    icnn, res = {"name": "icnn", "filters": 8, "layers": 2}, {"name": "resnet", "base": 8, "blocks": 1}
    cases = [
        (lambda: fit_mirror_map(nan, con, m, cfg), ValueError, r"the data x hold 1 non-finite values \(the first in "
                                                                r"sample 0\)"),
        (lambda: fit_mirror_map((x * 10).long(), con, m, cfg), TypeError, "the data x must be a floating"),
        (lambda: fit_mirror_map(x, con, m.psi, cfg), TypeError, "fit_mirror_map needs a mirror map .*got ICNN"),
        (lambda: fit_mirror_map(x, con, m, {"steps": 2}), TypeError, "needs its training settings as a TrainConfig"),
        (lambda: fit_mirror_map(x, con, m, cfg, weights={"l_con": 1}), TypeError, "weights are a NAMMLoss"),
        (lambda: finetune_inverse(m.inverse, x, x, con, cfg), TypeError, "finetune_inverse needs a mirror map"),
        (lambda: MirrorMap(build_net({"name": "unet", "base": 8, "in_channels": 1}), m.inverse), TypeError,
         "psi must be an input-convex network"),
        (lambda: MirrorMap(m.psi, m.inverse, None), ValueError, "a must lie in"),
        (lambda: build_mirror((1, 8.5, 8), icnn, res), ValueError, "whole numbers >= 1"),
        (lambda: build_mirror((1, 8, 8), icnn, res, seed=-1), ValueError, "build_mirror: seed must be"),
        (lambda: build_mirror((1, 8, 8), icnn, {**res, "downsamples": -1}), ValueError,
         "mirror.inverse.downsamples must be an integer >= 0"),
        (lambda: build_mirror((1, 8, 8), m.psi, res), TypeError, "psi is a net's settings, a dict"),
        (lambda: mirror_dps(m.psi, lambda v: v.sum(1), 0.1), TypeError, "mirror_dps needs a mirror map"),
        (lambda: save_mirror("unused", m, format="mine"), ValueError, "format are the map's own entries"),
        (lambda: fit_mirror_map(x, con, m, cfg, meta={"dtype": "x"}), ValueError,  # before training, not after it
         "fit_mirror_map: dtype are the map's own entries"),
        (lambda: data_violation(con, x, n=0), ValueError, "data_violation: n must be an integer >= 1"),
        (lambda: sparse_points((1, 8, 8), "0.2", 0.1), ValueError, "fraction must be a number in"),
    ]
    for call, kind, msg in cases:
        with pytest.raises(kind, match=msg):
            call()
    assert not os.path.exists("unused")


def test_a_mirror_map_keeps_its_dtype_and_loads_from_the_run_dir_it_was_fitted_into(tmp_path):
    m = _tiny_mirror().double()
    save_mirror(tmp_path / "run" / "mirror", m)
    back, _ = load_mirror(tmp_path / "run")  # the run_dir fit_mirror_map wrote it into
    assert next(back.parameters()).dtype == torch.float64
    (tmp_path / "namm-run" / "namm" / "mirror").mkdir(parents=True)
    from condiff.io import CheckpointError

    with pytest.raises(CheckpointError, match=r"is a NAMM run; its maps are .*namm/mirror \(fitted\)"):
        load_mirror(tmp_path / "namm-run")


def test_constraint_guided_dps_checks_the_constraint_it_is_given():
    from condiff.mirror.dps import with_constraint

    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    loss = lambda v: v.flatten(1).pow(2).sum(1)  # noqa: E731
    with pytest.raises(TypeError, match="the guiding constraint must be a distance x -> \\(B,\\), a callable"):
        with_constraint(loss, "zm", 1.0)
    for bad, msg in ((lambda v: -v.flatten(1).abs().mean(1), r"the guiding constraint reaches -.* < 0"),
                     (lambda v: v.flatten(1).abs().mean(1, keepdim=True),
                      r"one value per sample, a tensor of shape \(2,\)")):
        with pytest.raises(ValueError, match=msg):
            sample(den, (2, 1, 4, 4), steps=3, eta=1.0, guidance=DPS(with_constraint(loss, bad, 1.0), 0.1))
    # where a sampler reads its checks in blocks (a GPU), the sign is kept and read with them (it went unchecked)
    from condiff import readback

    with pytest.MonkeyPatch.context() as m:
        m.setitem(readback.READ_EVERY, "cpu", 4)
        with pytest.raises(ValueError, match=r"the guiding constraint reaches -.* < 0"):
            sample(den, (2, 1, 4, 4), steps=3, eta=1.0,
                   guidance=DPS(with_constraint(loss, lambda v: -v.flatten(1).abs().mean(1), 1.0), 0.1))


def test_a_mirror_dm_made_in_python_is_kept_from_data_space_and_a_maps_run_is_named(tmp_path):
    """A mirror DM from train_diffusion loaded as an ordinary model (only the CLI recorded what it is), and a
    fit_mirror_map run directory given to load_denoiser was told to run `condiff train ... --resume`."""
    from condiff.io import CheckpointError
    from condiff.mirror import train_diffusion
    from condiff.models import load_denoiser

    x, con = _brightness_data(8)
    cfg = TrainConfig(steps=2, batch_size=4, warmup=0, progress=False)
    net = {"name": "unet", "in_channels": 1, "base": 8, "mults": [1], "num_res": 1}
    train_diffusion(x, net, Schedule.linear(20), cfg, run_dir=tmp_path / "mdm", mirror_space=True)
    with pytest.raises(CheckpointError, match=r"mdm is a NAMM mirror diffusion model, .* in Python, use "
                                                 r"condiff.mirror.mirror_generate, or load_denoiser\(\.\.\., "
                                                 r"mirror_space=True\)$"):
        load_denoiser(tmp_path / "mdm")
    assert load_denoiser(tmp_path / "mdm", mirror_space=True).sample_shape == (1, 8, 8)
    train_diffusion(x, net, Schedule.linear(20), cfg, run_dir=tmp_path / "mdm2", mirror_space=True,
                    meta={"stage": "vanilla"})  # the flag, not a stage of the caller's meta, says what it is
    with pytest.raises(CheckpointError, match="is a NAMM mirror diffusion model"):
        load_denoiser(tmp_path / "mdm2")
    train_diffusion(x, net, Schedule.linear(20), cfg, run_dir=tmp_path / "vanilla")
    load_denoiser(tmp_path / "vanilla")  # data space by default
    fit_mirror_map(x, con, _tiny_mirror(), cfg, run_dir=tmp_path / "map")
    with pytest.raises(CheckpointError, match=r"map is the run of a mirror map .* load its map with "
                                                 "condiff.mirror.load_mirror"):
        load_denoiser(tmp_path / "map")


def test_a_mirror_dm_without_its_map_and_a_data_model_with_one_are_refused(tmp_path):
    """assimilate given a mirror DM and no mirror= returned its mirror-space samples as the posterior's, with
    a constraint distance 3x the mirror DPS one, without a word."""
    from condiff.mirror import assimilate, mirror_generate, train_diffusion
    from condiff.models import load_denoiser
    from condiff.operators import Inpainting

    x, _ = _brightness_data(8)
    cfg = TrainConfig(steps=2, batch_size=4, warmup=0, progress=False)
    net = {"name": "unet", "in_channels": 1, "base": 8, "mults": [1], "num_res": 1}
    mdm = train_diffusion(x, net, Schedule.linear(20), cfg, run_dir=tmp_path / "mdm", mirror_space=True)
    op = Inpainting(torch.ones(1, 1, 8, 8), sigma_y=0.1)
    for den in (mdm, load_denoiser(tmp_path / "mdm", mirror_space=True)):
        with pytest.raises(ValueError, match="^assimilate: the denoiser is a mirror diffusion model .* pass mirror="):
            assimilate(den, op, x[:2], (1, 8, 8), zeta=0.1, steps=2)
    mirror = _tiny_mirror()
    assert assimilate(mdm, op, x[:2], (1, 8, 8), zeta=0.1, steps=2, mirror=mirror).shape == (2, 1, 8, 8)
    # a NAMM run's vanilla stage is a data-space model: refused as a mirror DM
    train_diffusion(x, net, Schedule.linear(20), cfg, run_dir=tmp_path / "vanilla", meta={"stage": "vanilla"})
    vanilla = load_denoiser(tmp_path / "vanilla")
    with pytest.raises(ValueError, match="^mirror_generate: the denoiser is a data-space model"):
        mirror_generate(vanilla, mirror, 2, (1, 8, 8), steps=2)
    assert assimilate(vanilla, op, x[:2], (1, 8, 8), zeta=0.1, steps=2).shape == (2, 1, 8, 8)
    # a model that does not say (trained on g(x) without mirror_space=True, say) is taken either way
    plain = train_diffusion(x, net, Schedule.linear(20), cfg)
    assert mirror_generate(plain, mirror, 2, (1, 8, 8), steps=2)[0].shape == (2, 1, 8, 8)


def test_the_fine_tuning_stage_is_made_from_its_samplers_steps_and_eta():
    """The pool's sampler settings decide the fine-tuning's data: another eta must call for another stage."""
    from condiff.cli.namm import NAMMRun, resolve

    spec = NAMMRun("unused", resolve("brightness", "quick", overrides=["sample.eta=0.5", "sample.steps=7"]))
    assert spec.spec("finetune")["sampler"] == {"steps": 7, "eta": 0.5}
    other = NAMMRun("unused", resolve("brightness", "quick", overrides=["sample.eta=1.0", "sample.steps=7"]))
    assert other.spec("finetune") != spec.spec("finetune") and other.spec("mdm") == spec.spec("mdm")


def test_stages_made_on_the_way_are_announced_in_the_order_they_are_made(tmp_path, capsys, monkeypatch):
    """A mirror DM made where its mirror map was missing too said "making RUN/mdm" before "making RUN/namm",
    though the map is made first (the mirror DM is trained on its g(x))."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(0, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    tiny = ["--set", "mirror_train.steps=2", "--set", "train.steps=2", "--set", "model.mults=[1, 2]",
            "--set", "mirror.psi.filters=4", "--set", "mirror.inverse.base=4", "--set", "mirror.inverse.blocks=1"]
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--no-baseline",
                 "--quiet", *tiny]) == 0
    for stage in ("namm", "mdm"):
        shutil.rmtree(tmp_path / "run" / stage)
    capsys.readouterr()
    assert main(["namm", "finetune", "--run", "run", "--set", "finetune.steps=2", "--set", "finetune.n=4",
                 "--set", "sample.steps=2", "--quiet"]) == 0
    made = [line.split(":")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("making ")]
    assert made == [f"making {os.path.join('run', s)}" for s in ("namm", "mdm", "finetune")], made


def test_each_trained_stage_draws_its_logged_terms_by_name(saved_figures, tmp_path, monkeypatch):
    """A stage's loss.png showed the weighted sum alone, under the title of a denoising run."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    figs = saved_figures()
    assert main(_tiny_box_fit(tmp_path)) == 0
    axes = {ax.get_title().split(":")[0]: ax for f in figs for ax in f.axes}
    assert set(axes) == {"namm", "mdm"} and all((tmp_path / "run" / s / "loss.png").is_file() for s in axes)
    logged = json.loads((tmp_path / "run" / "namm" / "log.jsonl").read_text().splitlines()[-1])
    terms = [t.get_text() for t in axes["namm"].get_legend().get_texts()]
    assert terms[0] == "loss (the weighted sum)" and "cycle terms" in terms and "constraint l(f(y))" in terms
    assert len(terms) == len({"loss", "cyc", "con", "reg", "adv"} & set(logged))


def test_namm_fit_quiet_trains_a_count_constraints_counter_without_a_bar(tmp_path, capsys, monkeypatch):
    """--quiet silenced the stages' bars but not the counting CNN's, trained on the constraint's first use."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))  # a counter trained here
    fit = _tiny_box_fit(tmp_path, n_test=4)
    x = np.random.default_rng(0).uniform(-1, 1, (36, 1, 12, 12)).astype("float32")  # room for 2 sources
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    fit[fit.index("--constraint"):fit.index("--constraint") + 2] = [
        "--set", 'data.constraint={name="count", k=2, size=12, counter_steps=3, width=4}']
    assert main(fit) == 0
    err = capsys.readouterr().err
    assert "training the counting CNN" in err and "counting CNN (first use)" not in err


def test_assimilation_picture_draws_the_unobserved_entries_in_their_colour(saved_figures, tmp_path, capsys,
                                                                            monkeypatch):
    """The observed column drew unobserved entries as zeros, a measured grey."""
    import condiff.mirror.plots as mplots
    from condiff.cli.main import main
    from condiff.plots import UNOBSERVED_NOTE

    monkeypatch.chdir(tmp_path)
    assert main(_tiny_box_fit(tmp_path, n_test=4)) == 0
    figs = saved_figures(mplots)
    assert main(["namm", "assimilate", "--run", "run", "--no-baselines", "--set", "assimilate.steps=2", "--set",
                 "assimilate.finetuned=false", "--set", "assimilate.fraction=0.5", "--quiet"]) == 0
    with np.load(tmp_path / "run" / "assimilate" / "samples.npz") as z:
        y = z["y"]
    fig = figs[-1]
    assert f"observed (y): {UNOBSERVED_NOTE}" in fig._suptitle.get_text()
    drawn = fig.axes[0].get_images()[0].get_array()  # the first sample's observed entries
    assert 0 < drawn.mask.sum() == (y[0, 0] == 0).sum() < drawn.size  # masked where y is zero-filled


def test_a_run_fitted_without_its_baseline_is_given_one_by_resume_baseline(tmp_path, capsys, monkeypatch):
    """`namm fit --no-baseline` was undone only by fitting again with every --set retyped (--resume kept it)."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(0, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--no-baseline", "--quiet",
                 "--set", "mirror_train.steps=2", "--set", "train.steps=2", "--set", "model.mults=[1, 2]",
                 "--set", "mirror.psi.filters=4", "--set", "mirror.inverse.base=4"]) == 0
    capsys.readouterr()
    assert main(["namm", "assimilate", "--run", "run", "--set", "assimilate.n=2", "--set", "assimilate.steps=2"]) == 2
    assert ("it was fitted with --no-baseline (`condiff namm fit --out run --resume --baseline` makes it); or pass "
            "--no-baselines") in capsys.readouterr().err
    assert main(["namm", "fit", "--data", "data.npz", "--out", "run2", "--baseline"]) == 2
    assert "--baseline goes with --resume" in capsys.readouterr().err
    namm = (tmp_path / "run" / "namm" / "stage.json").read_bytes()
    assert main(["namm", "fit", "--out", "run", "--resume", "--baseline", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "vanilla" / "stage.json").read_text())["done"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["baseline"] is True
    assert (tmp_path / "run" / "namm" / "stage.json").read_bytes() == namm  # the rest as it was: reused


def test_a_finished_stage_given_more_steps_trains_on_from_its_last_checkpoint(tmp_path, capsys, monkeypatch):
    """`--set mirror_train.steps=N` with more steps than a finished stage's needed --fresh, which trained the
    stage anew from step 0 (longer stages are the first thing docs/own-data.md suggests)."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(0, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--quiet",
                 "--set", "mirror_train.steps=2", "--set", "train.steps=2", "--set", "model.mults=[1, 2]",
                 "--set", "mirror.psi.filters=4", "--set", "mirror.inverse.base=4"]) == 0
    namm = (tmp_path / "run" / "namm" / "stage.json").read_bytes()
    # `condiff eval` of a stage's model writes beside it, in RUN/vanilla/eval (it wrote metrics.json into the stage
    # directory, as for a run of its own), and an extension removes what was written of the old model
    capsys.readouterr()
    assert main(["eval", "--ckpt", "run/vanilla", "--n", "2", "--steps", "2", "--device", "cpu"]) == 0
    assert "--n = 2: with so few samples the distances to the data are mostly noise" in capsys.readouterr().err
    assert (tmp_path / "run" / "vanilla" / "eval" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "vanilla" / "metrics.json").exists()
    (tmp_path / "run" / "mdm" / "samples_step_00000002").mkdir()  # of a checkpoint the extension keeps as it is
    (tmp_path / "run" / "mdm" / "samples_step_00000001").mkdir()  # of a checkpoint no longer there
    capsys.readouterr()
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: removed the results of the model this run replaced (eval)" in err
    assert "note: removed the results of the model this run replaced (samples_step_00000001)" in err
    assert (tmp_path / "run" / "mdm" / "samples_step_00000002").is_dir()
    assert (tmp_path / "run" / "mdm" / "checkpoints" / "step_00000002").is_dir()
    assert not (tmp_path / "run" / "vanilla" / "eval").exists() and (tmp_path / "run" / "vanilla" / "model").is_dir()
    for stage in ("mdm", "vanilla"):  # both diffusion models go on from step 2; the map is not touched
        assert f"extending {os.path.join('run', stage)}: from step 2 (its last checkpoint) to 3" in err, err
        assert json.loads((tmp_path / "run" / stage / "stage.json").read_text())["spec"]["train"]["steps"] == 3
        log = [json.loads(line)["step"] for line in (tmp_path / "run" / stage / "log.jsonl").read_text().splitlines()]
        assert log == sorted(log) and (tmp_path / "run" / stage / "checkpoints" / "step_00000003").is_dir()
    assert (tmp_path / "run" / "namm" / "stage.json").read_bytes() == namm
    # fewer steps are no extension, and a stage made from an extended one is redone only with --fresh
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=2", "--quiet"]) == 2
    assert "made with train.steps=3, now 2; --set train.steps=3 takes the stage as made" in capsys.readouterr().err
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "mirror_train.steps=3", "--quiet"]) == 2
    assert "run/mdm was made with other settings (mirror_train.steps differ)" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "vanilla" / "stage.json").read_text())["extended_from"] == 2
    # an extension cut short: the stage as it was comes back when asked for, and one asked to go elsewhere is
    # told of the extension begun
    from condiff.train import Trainer

    real_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=5", "--quiet"]) == 130
    monkeypatch.setattr(Trainer, "fit", real_fit)
    assert json.loads((tmp_path / "run" / "mdm" / "stage.json").read_text())["extends"]["from"] == 3
    capsys.readouterr()
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=6", "--quiet"]) == 2
    assert ("(an extension from step 3 to 5 was begun: --set train.steps=5 goes on with it)"
            in capsys.readouterr().err)
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=3", "--quiet"]) == 0
    assert "is the stage as it was before its extension, which stopped unfinished" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "mdm" / "stage.json").read_text())["done"]
    # --fresh trains anew what it redoes: a stage with more steps too (a profile's longer run is no extension)
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=4", "--fresh", "--quiet"]) == 0
    assert "extending" not in capsys.readouterr().err
    assert not (tmp_path / "run" / "vanilla" / "checkpoints" / "step_00000003").exists()
    assert (tmp_path / "run" / "vanilla" / "checkpoints" / "step_00000004").is_dir()
    # an extension stopped after its model was saved, before its record: that model is not the stage as it was
    import condiff.cli.namm as namm_cli

    real_plot = namm_cli.plot_loss_curve

    def stop_at_mdm(log, png, **kw):
        if "mdm" in str(png):
            raise KeyboardInterrupt
        return real_plot(log, png, **kw)

    monkeypatch.setattr(namm_cli, "plot_loss_curve", stop_at_mdm)
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=5", "--quiet"]) == 130
    monkeypatch.setattr(namm_cli, "plot_loss_curve", real_plot)
    assert json.loads((tmp_path / "run" / "mdm" / "model" / "config.json").read_text())["steps"] == 5
    capsys.readouterr()
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=4", "--quiet"]) == 2
    assert "(an extension from step 4 to 5 was begun: --set train.steps=5 goes on with it)" in capsys.readouterr().err
    assert main(["namm", "fit", "--out", "run", "--resume", "--set", "train.steps=5", "--quiet"]) == 0
    record = json.loads((tmp_path / "run" / "mdm" / "stage.json").read_text())
    assert record["done"] and record["spec"]["train"]["steps"] == 5 and record["extended_from"] == 4


def test_a_run_recorded_with_whole_numbers_for_float_settings_takes_fractions_and_stays_the_same(tmp_path, capsys,
                                                                                                monkeypatch):
    """Runs made before float settings were kept as floats record `--set loss.l_con=2` as 2: a later
    `--set sample.eta=0.5` was refused as no integer, and results made since read as made from other stages
    (their fingerprints hashed 2.0 where stage.json holds 2)."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(0, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--no-baseline", "--quiet",
                 "--set", "mirror_train.steps=2", "--set", "train.steps=2", "--set", "model.mults=[1, 2]",
                 "--set", "mirror.psi.filters=4", "--set", "mirror.inverse.base=4", "--set", "loss.l_con=2",
                 "--set", "sample.eta=1", "--set", "sample.steps=2"]) == 0
    for f in ("config.json", "namm/stage.json", "mdm/stage.json"):  # as the older code wrote them
        (tmp_path / "run" / f).write_text((tmp_path / "run" / f).read_text().replace('"l_con": 2.0', '"l_con": 2')
                                          .replace('"eta": 1.0', '"eta": 1').replace('"noise": 0.05', '"noise": 1'))
    assert '"noise": 1,' in (tmp_path / "run" / "config.json").read_text()  # a float of the family's defaults
    assert '"l_con": 2,' in (tmp_path / "run" / "namm" / "stage.json").read_text()
    capsys.readouterr()
    assert main(["namm", "sample", "--run", "run", "--n", "2", "--no-finetuned", "--set", "sample.eta=0.5",
                 "--set", "assimilate.noise=0.5", "--quiet"]) == 0
    assert "making" not in capsys.readouterr().err  # the stages as they were, reused
    assert main(["show", "run"]) == 0
    assert "made from another" not in capsys.readouterr().out


def test_a_stage_made_with_other_settings_offers_back_only_its_own():
    """A fine-tuning made from a shorter mirror DM was told `--set train.steps=2 takes the stage as made`, which
    the mirror DM then refused the other way: a setting of a stage it is made from is named, not offered back."""
    from condiff.cli.namm import _made_with

    old = {"train": {"steps": 2}, "finetune": {"steps": 5}}
    now = {"train": {"steps": 4}, "finetune": {"steps": 6}}
    said = _made_with(old, now, ["finetune.steps", "train.steps"], "finetune")
    assert "made with finetune.steps=5, now 6; made with train.steps=2, now 4" in said
    assert "--set finetune.steps=5 takes the stage as made" in said and "--set train.steps" not in said
    assert "--set train.steps=2 takes" in _made_with(old, now, ["train.steps"], "mdm")


def test_a_split_of_one_sample_is_refused_before_any_stage_trains(tmp_path, capsys, monkeypatch):
    """One training (or held-out) sample: `namm fit` took it, and `namm sample` failed at the end, after the
    fine-tuning and every sample set, with "median_heuristic needs at least 2 points"."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(0, 1, (3, 1, 8, 8)).astype("float32")
    for name, train, test, split in (("one.npz", x[:1], x[1:], "train"), ("two.npz", x[:2], x[2:], "test")):
        np.savez(tmp_path / name, x=train, x_test=test)
        assert main(["namm", "fit", "--data", name, "--constraint", "box", "--out", f"run-{name}", "--quiet"]) == 2
        assert (f"its {split} split holds 1 sample; a NAMM run needs at least 2 in each split"
                in capsys.readouterr().err)
        assert not list((tmp_path / f"run-{name}").glob("*/stage.json"))  # nothing trained
    # a refused split stays refused (it was cached before its check, so a second call returned it)
    from condiff.cli.namm import NAMMRun, resolve
    from condiff.data import DataError

    run = NAMMRun(tmp_path / "api", resolve("two.npz", "quick", constraint="box"))
    for _ in range(2):
        with pytest.raises(DataError, match="its test split holds 1 sample; a NAMM run needs"):
            run.data("test")


def test_namm_sample_of_constant_data_records_why_it_gives_no_mmd(tmp_path, monkeypatch):
    """namm sample gave the MMD of constant held-out data as null, but recorded no reason (eval does)."""
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    x = np.full((48, 1, 8, 8), 0.5, np.float32)
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    assert main(["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--quiet",
                 "--no-baseline", "--set", "mirror_train.steps=2", "--set", "train.steps=2",
                 "--set", "model.mults=[1, 2]", "--set", "mirror.psi.filters=4", "--set", "mirror.inverse.base=4"]) == 0
    assert main(["namm", "sample", "--run", "run", "--n", "4", "--no-finetuned", "--quiet",
                 "--set", "sample.steps=2"]) == 0
    m = json.loads((tmp_path / "run" / "samples" / "metrics.json").read_text())["mdm"]
    assert m["mmd"] is None and "all identical" in m["mmd_unavailable"]


def test_mirror_stages_record_seeded_random_streams_and_leave_the_callers(tmp_path):
    """fit_mirror_map and finetune_inverse trained outside seeded(): their checkpoints recorded the process's own
    global stream (randomly seeded at import), so two runs of one seed wrote different rng.safetensors, and any
    draw from that stream would have differed between runs."""
    x, con = _brightness_data(16)
    y = _tiny_mirror().to_mirror(x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for name, caller_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        fit_mirror_map(x, con, _tiny_mirror(), _ft_cfg(2), run_dir=tmp_path / name / "fit")
        finetune_inverse(_tiny_mirror(), x, y, con, _ft_cfg(2), run_dir=tmp_path / name / "ft")
        finetune_inverse(_tiny_mirror(), x, y, con, _ft_cfg(2), informed=True)  # its new layers drawn seeded
        assert torch.equal(torch.get_rng_state(), before)  # the caller's stream as it was
    for stage in ("fit", "ft"):
        (a,), (b,) = ([c / "rng.safetensors" for c in list_checkpoints(tmp_path / r / stage / "checkpoints")]
                      for r in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), stage


def test_namm_cli_fine_tunes_an_informed_map_and_samples_with_it(tmp_path, capsys, monkeypatch):
    from condiff.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(_tiny_box_fit(tmp_path)) == 0
    bad = ["namm", "finetune", "--run", "run", "--set", "finetune.informed=2", "--quiet"]
    assert main(bad) == 2
    assert "finetune.informed must be true or false, got 2" in capsys.readouterr().err
    assert main([*_tiny_box_fit(tmp_path), "--out", "other", "--set", "mirror.inverse.name=informed"]) == 2
    err = capsys.readouterr().err
    assert "is made from a fitted one by fine-tuning (finetune.informed = true" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "other").exists()
    ft = ["--set", "finetune.informed=true", "--set", "finetune.steps=3", "--set", "finetune.n=8", "--quiet"]
    assert main(["namm", "finetune", "--run", "run", *ft]) == 0
    capsys.readouterr()
    assert main(["namm", "sample", "--run", "run", "--set", "sample.n=4", *ft]) == 0
    _, cfg = load_mirror(tmp_path / "run" / "finetune" / "mirror")
    assert cfg["mirror"]["inverse"]["name"] == "informed"
    x = np.load(tmp_path / "run" / "samples" / "mdm_ft" / "samples.npz")["x"]
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()
    # mirror DPS differentiates through the informed map (the fine-tuned map is its default)
    assert main(["namm", "assimilate", "--run", "run", "--no-baselines", "--set", "assimilate.n=2", "--set",
                 "assimilate.steps=3", *ft]) == 0
    with np.load(tmp_path / "run" / "assimilate" / "samples.npz") as z:
        assert z["mirror_DPS"].shape == (2, 1, 8, 8) and np.isfinite(z["mirror_DPS"]).all()
