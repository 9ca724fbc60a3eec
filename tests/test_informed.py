"""The informed inverse map (condiff.mirror.informed): f given its constraint's distance and gradient."""

import pytest
import torch
from torch import nn

from condiff.constraints import Ball, TotalBrightness
from condiff.mirror import InformedInverse, NAMMLoss, build_mirror, finetune_inverse, load_mirror
from condiff.train import TrainConfig


def _mirror(seed=0, **inverse):
    m = build_mirror((1, 8, 8), {"name": "icnn", "filters": 8, "layers": 2},
                     {"name": "resnet", "base": 8, "blocks": 1, "downsamples": 1, **inverse}, 0.9, seed=seed)
    with torch.no_grad():  # a fitted-looking inverse: not the identity
        for p in m.inverse.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m


def _ft_cfg(steps):
    return TrainConfig(steps=steps, batch_size=8, lr=2e-3, betas=(0.5, 0.999), warmup=0, lr_decay="constant",
                       ema_decay=0.9, ckpt_every=steps, progress=False)


class _NetDistance(nn.Module):
    """A distance with weights of its own (as the counting CNN has): |sum of a linear map of x - 1|."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 1)
        self.requires_grad_(False)

    def forward(self, x):
        return (self.lin(x.flatten(1))[:, 0] - 1).abs()


@pytest.mark.parametrize("context", [False, True])
def test_an_informed_inverse_starts_as_the_inverse_it_is_made_from(context):
    m = _mirror(context=context)
    m.inverse.train()  # the global branch's statistics: set by a batch, as a fitted map's are
    m.inverse(torch.randn(16, 1, 8, 8))
    m.inverse.eval()
    y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    con = TotalBrightness(10.0)
    f = InformedInverse.from_inverse(m.inverse, con, y).eval()
    with torch.no_grad():
        torch.testing.assert_close(f(y), m.inverse(y), rtol=0, atol=1e-6)
        assert float((f.features(y)[:, 1:2]).abs().max()) > 0  # the new inputs are there, unused until trained
    assert f.config["net"]["in_channels"] == 3 and f.config["residual"] is True


def test_the_features_are_the_distance_and_the_gradient_of_its_half_square():
    """For the ball ||x|| <= r: l = ||x|| - r outside and grad(l^2 / 2) = l x / ||x||; both zero inside."""
    r = 4.0
    con = Ball(radius=r)
    y = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y[:3] *= 3.0  # outside
    y[3:] *= 0.2  # inside
    norm = y.flatten(1).norm(dim=1)
    assert bool((norm[:3] > r).all() and (norm[3:] < r).all())
    f = InformedInverse.from_inverse(_mirror().inverse, con, y)
    feats = f.features(y)
    dist = (norm - r).clamp_min(0)
    want_grad = dist.view(-1, 1, 1, 1) * y / norm.view(-1, 1, 1, 1)
    torch.testing.assert_close(feats[:, :1], y)
    torch.testing.assert_close(feats[:, 1:2] * f.scale, want_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats[:, 2:3], dist.view(-1, 1, 1, 1).expand(-1, 1, 8, 8), rtol=1e-5, atol=1e-6)
    assert float(feats[3:, 1:].abs().max()) == 0.0
    torch.testing.assert_close(torch.tensor(f.scale), want_grad.std(), rtol=1e-5, atol=0)


def test_an_informed_inverse_is_differentiable_through_its_features():
    """Mirror DPS differentiates through f: the features' own derivatives (l's second ones) count."""
    torch.manual_seed(0)
    m = _mirror().double()
    con = lambda x: (x.square().flatten(1).sum(1) - 1).square()  # noqa: E731 (smooth, second derivatives nonzero)
    y = 0.3 * torch.randn(2, 1, 8, 8, dtype=torch.float64)
    f = InformedInverse.from_inverse(m.inverse, con, y)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the feature channels' weights no longer zero
    yr = y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: f(v).square().sum(), (yr,), eps=1e-6, atol=1e-5)
    # and without the features' derivatives the gradient would differ: they matter here
    (full,) = torch.autograd.grad(f(yr).square().sum(), yr)
    feats = f.features(y)  # no graph: as if the features were fixed inputs
    yr2 = y.clone().requires_grad_(True)
    part = torch.cat([yr2, feats[:, 1:]], 1)
    (partial_,) = torch.autograd.grad((yr2 + f.net(part)).square().sum(), yr2)
    assert float((full - partial_).abs().max()) > 1e-3 * float(full.abs().max())


def test_informed_fine_tuning_saves_a_map_that_loads_and_needs_its_constraint_back(tmp_path):
    torch.manual_seed(0)
    m = _mirror()
    con = _NetDistance()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = m.to_mirror(x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    con_before = {k: v.clone() for k, v in con.state_dict().items()}
    with torch.no_grad():
        l_before = float(con(m.to_data(y)).mean())
    out = finetune_inverse(m, x, y, con, _ft_cfg(40), NAMMLoss(l_con=1.0), run_dir=tmp_path, informed=True)
    assert isinstance(out.inverse, InformedInverse) and not isinstance(m.inverse, InformedInverse)
    with torch.no_grad():
        got = out.to_data(y)
    assert float(con(got).mean()) < 0.5 * l_before
    for k, v in con.state_dict().items():  # the constraint is read, never trained
        assert torch.equal(v, con_before[k])
    assert set(out.inverse.state_dict()) == {f"net.{k}" for k in out.inverse.net.state_dict()}  # nor saved
    back, cfg = load_mirror(tmp_path / "mirror")
    assert cfg["mirror"]["inverse"]["name"] == "informed"
    with pytest.raises(RuntimeError, match=r"load_mirror\(path, constraint=...\), or call mirror.inverse.attach"):
        back.to_data(y)
    back.inverse.attach(con)
    given, _ = load_mirror(tmp_path / "mirror", constraint=con)  # the same, in the loading
    with torch.no_grad():
        torch.testing.assert_close(back.to_data(y), got)
        torch.testing.assert_close(given.to_data(y), got)
    assert given.inverse.constraint is con
    # fine-tuning an informed map again keeps it informed, with the constraint given
    again = finetune_inverse(back, x, y, con, _ft_cfg(2), NAMMLoss(l_con=1.0), informed=False)
    assert isinstance(again.inverse, InformedInverse) and again.inverse.constraint is not None


def test_moving_an_informed_inverse_moves_its_constraint():
    con = _NetDistance()
    f = InformedInverse.from_inverse(_mirror().inverse, con, torch.randn(4, 1, 8, 8))
    f.double()
    assert con.lin.weight.dtype == torch.float64
    assert f(torch.randn(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_informed_inverses_refuse_what_they_cannot_use():
    y = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="starts from a 'resnet'"):
        InformedInverse.from_inverse(nn.Conv2d(1, 1, 3, padding=1), TotalBrightness(1.0), y)
    with pytest.raises(ValueError, match="zero everywhere"):
        InformedInverse.from_inverse(_mirror().inverse, lambda x: x.new_zeros(len(x)), y)
    with pytest.raises(ValueError, match=r"in_channels = 2 \* 1 \+ 1 = 3"):
        InformedInverse({"name": "resnet", "in_channels": 1, "out_channels": 1, "residual": False})
    with pytest.raises(ValueError, match="own residual must be off"):
        InformedInverse({"name": "resnet", "in_channels": 3, "out_channels": 1, "residual": True})
    f = InformedInverse.from_inverse(_mirror().inverse, TotalBrightness(1.0), y)
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\)"):
        f(torch.randn(2, 2, 8, 8))
    with pytest.raises(TypeError, match="distance x -> "):
        f.attach("box")


def test_an_informed_inverse_refuses_inference_mode_where_its_gradient_would_be_zero():
    y = torch.randn(4, 1, 8, 8)
    f = InformedInverse.from_inverse(_mirror().inverse, TotalBrightness(1.0), y)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"outside torch.inference_mode\(\)"):
        f(y)
    with torch.no_grad():  # no_grad is fine: the features turn gradients on for themselves
        assert float(f.features(y)[:, 1:2].abs().max()) > 0


class _Uncopyable:
    """A distance holding a lock, which cannot be copied (a file handle, a connection...)."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()

    def __call__(self, x):
        return (x.flatten(1).sum(1) - 1).abs()


def test_copies_of_an_informed_inverse_share_its_constraint_which_need_not_be_copyable():
    import copy

    con = _NetDistance()
    f = InformedInverse.from_inverse(_mirror().inverse, con, torch.randn(4, 1, 8, 8))
    g = copy.deepcopy(f)
    assert g.constraint is con and g.net is not f.net
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(f.parameters(), g.parameters()))  # weights copied
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    m = _mirror()
    out = finetune_inverse(m, x, m.to_mirror(x), _Uncopyable(), _ft_cfg(2), informed=True)
    assert isinstance(out.inverse.constraint, _Uncopyable)


def test_resuming_an_informed_fine_tuning_with_another_gradient_scale_is_refused(tmp_path):
    m = _mirror()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = m.to_mirror(x)
    con = TotalBrightness(10.0)
    finetune_inverse(m, x, y, con, _ft_cfg(2), run_dir=tmp_path, informed=True)
    again = finetune_inverse(m, x, y, con, TrainConfig(**{**vars(_ft_cfg(2)), "steps": 3}), run_dir=tmp_path,
                             resume=True, informed=True)  # the same pool: goes on
    assert isinstance(again.inverse, InformedInverse)
    with pytest.raises(ValueError, match=r"\(inverse differ\)"):  # another pool, another scale s
        finetune_inverse(m, x, 3 * y, con, TrainConfig(**{**vars(_ft_cfg(2)), "steps": 4}), run_dir=tmp_path,
                         resume=True, informed=True)
    # a plain fine-tuning resumed from an informed one's checkpoints, and the other way round: the weights do not
    # fit, and the refusal names the recorded setting that differs, not only tensor names
    from condiff.io import CheckpointError

    differ = r"does not match the model .*; it was written with other settings \(inverse differ\)$"
    with pytest.raises(CheckpointError, match=differ):
        finetune_inverse(m, x, y, con, TrainConfig(**{**vars(_ft_cfg(2)), "steps": 4}), run_dir=tmp_path,
                         resume=True)
    plain = tmp_path / "plain"
    finetune_inverse(m, x, y, con, _ft_cfg(2), run_dir=plain)
    with pytest.raises(CheckpointError, match=differ):
        finetune_inverse(m, x, y, con, TrainConfig(**{**vars(_ft_cfg(2)), "steps": 4}), run_dir=plain,
                         resume=True, informed=True)
    assert [p.name for p in sorted((plain / "checkpoints").iterdir())] == ["step_00000002"]  # nothing written


def test_an_informed_inverse_is_not_fitted():
    with pytest.raises(ValueError, match=r"by fine-tuning \(finetune.informed = true"):
        build_mirror((1, 8, 8), {"name": "icnn"}, {"name": "informed", "net": {}})
