import json
import re

import pytest
import torch

from condiff.nets import NETS, TimeMLP, UNet, build_net, register_net, timestep_embedding


def _perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: the zero-initialised output layers would hide any difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def _t(batch: int) -> torch.Tensor:
    return torch.arange(batch) * 97 % 1000


# --- embeddings --------------------------------------------------------------------------------


def test_timestep_embedding_long_and_float_agree():
    t = torch.tensor([0, 5, 999])
    e = timestep_embedding(t, 7)
    assert e.shape == (3, 7)
    assert torch.allclose(e, timestep_embedding(t.float(), 7))
    assert torch.equal(e[:, -1], torch.zeros(3))  # odd width: zero pad column
    w = 10000.0 ** (-torch.arange(3, dtype=torch.float64) / 3)  # w_k = max_period^(-k / half), half = 3
    args = t.double()[:, None] * w
    torch.testing.assert_close(e[:, :6].double(), torch.cat([args.cos(), args.sin()], 1), atol=2e-4, rtol=0)


def test_timestep_embedding_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        timestep_embedding(torch.zeros(2, 3), 8)


# --- UNet --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cin, cout, h, w, mults",
    [
        (1, None, 8, 8, (1, 2, 2)),
        (3, None, 16, 16, (1, 2)),
        (2, 5, 32, 16, (1, 2, 2)),
        (1, 2, 8, 24, (1, 1, 2, 2)),
        (1, None, 64, 64, (1, 1, 2, 2)),
    ],
)
def test_unet_output_shape(cin, cout, h, w, mults):
    net = UNet(cin, cout, base=8, mults=mults)
    out = net(torch.randn(2, cin, h, w), _t(2))
    assert out.shape == (2, cout or cin, h, w)
    assert torch.equal(out, torch.zeros_like(out))  # output conv starts at zero


def test_a_unet_refusing_an_image_side_names_the_levels_that_fit():
    """`train` on 10x10 data said only "UNet with 3 levels needs sizes divisible by 4"; --set model.mults=[1, 2]
    was the fix, which the message now gives (the levels both sides allow)."""
    net = UNet(1, base=8, mults=[1, 2, 2], groups=4)
    t = torch.zeros(2, dtype=torch.long)
    for (h, w), fits in (((10, 10), "[1, 2]"), ((12, 9), "[1]"), ((16, 20), None)):
        if fits is None:
            assert net(torch.zeros(2, 1, h, w), t).shape == (2, 1, h, w)
            continue
        with pytest.raises(ValueError, match=re.escape(f"--set 'model.mults={fits}'), or the images are padded to "
                                                       "a multiple of 4")):
            net(torch.zeros(2, 1, h, w), t)
    # attention at a level the advice drops is dropped with it; an empty side is named as such
    attn = UNet(1, base=8, mults=[1, 2, 2], groups=4, attn_res=(4,))
    with pytest.raises(ValueError, match=re.escape("(mults=[1, 2], attn_res=[]; training on the command line, --set "
                                                   "'model.mults=[1, 2]' --set 'model.attn_res=[]')")):
        attn(torch.zeros(2, 1, 6, 6), t)
    with pytest.raises(ValueError, match="x has height 0; images need at least one pixel a side"):
        net(torch.zeros(2, 1, 0, 4), t)


def test_unet_attention_num_res_and_dropout():
    net = _perturb(UNet(2, base=8, mults=(1, 2, 2), num_res=2, attn_res=(2, 4), dropout=0.1))
    x = torch.randn(3, 2, 8, 16)
    out = net(x, _t(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, net(x, _t(3)))  # eval mode: dropout off, deterministic
    net.train()
    assert not torch.equal(net(x, _t(3)), net(x, _t(3)))  # train mode: dropout acts
    # the settings build what they say: more attention layers at the named resolutions, more residual blocks
    def count(kind, **kw):
        return sum(type(m).__name__ == kind for m in UNet(2, base=8, mults=(1, 2, 2), **kw).modules())

    assert count("_Attention", attn_res=(2, 4)) > count("_Attention", attn_res=(4,)) > count("_Attention", attn_res=())
    assert count("_ResBlock", num_res=2) > count("_ResBlock", num_res=1)
    assert count("Dropout", dropout=0.1) == count("_ResBlock")  # one in every residual block


def test_unet_gradient_reaches_input():
    net = _perturb(UNet(1, base=8))
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    net(x, _t(2)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unet_time_changes_output():
    net = _perturb(UNet(1, base=8))
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([10, 10])), net(x, torch.tensor([500, 500])))
    assert torch.equal(net(x, torch.tensor(10)), net(x, torch.tensor([10, 10])))  # scalar t broadcasts


def test_unet_class_conditioning():
    net = _perturb(UNet(1, base=8, num_classes=3))
    x = torch.randn(4, 1, 8, 8)
    t = _t(4)
    out0, out1 = net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(out0, out1)
    uncond = net(x, t)
    assert torch.equal(uncond, net(x, t, torch.full((4,), -1)))  # -1 is the null label
    with pytest.raises(ValueError, match=r"\(3 was once read as the null label: pass -1"):  # no longer a label
        net(x, t, torch.full((4,), 3))
    assert not torch.allclose(uncond, out0)
    mixed = net(x, t, torch.tensor([0, -1, 1, -1]))
    assert torch.equal(mixed[0], out0[0]) and torch.equal(mixed[1], uncond[1])


def test_unet_label_errors():
    x, t = torch.randn(2, 1, 8, 8), _t(2)
    with pytest.raises(ValueError, match="num_classes=0"):
        UNet(1, base=8)(x, t, torch.zeros(2, dtype=torch.long))
    net = UNet(1, base=8, num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        net(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        net(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        net(x, t, torch.tensor([0, 1, 2]))


def test_circular_unet_commutes_with_shifts_by_the_downsampling_factor():
    x, t = torch.randn(2, 2, 16, 8), _t(2)
    shift = (8, 4)  # multiples of 2**(len(mults) - 1) = 4
    roll = lambda z: torch.roll(z, shift, dims=(2, 3))
    net = _perturb(UNet(2, base=8, mults=(1, 2, 2), circular=True))
    assert torch.allclose(net(roll(x), t), roll(net(x, t)), atol=1e-5)
    # zero padding breaks the symmetry, so the check above can fail
    flat = _perturb(UNet(2, base=8, mults=(1, 2, 2), circular=False))
    assert (flat(roll(x), t) - roll(flat(x, t))).abs().max() > 1e-3


def test_unet_size_not_divisible():
    net = UNet(1, base=8, mults=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4.*width 10"):
        net(torch.randn(1, 1, 8, 10), _t(1))
    with pytest.raises(ValueError, match="divisible by 4.*height 6"):
        net(torch.randn(1, 1, 6, 8), _t(1))


def test_unet_input_errors():
    net = UNet(3, base=8)
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        net(torch.randn(2, 1, 8, 8), _t(2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(3, 8, 8), _t(3))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        net(torch.randn(2, 3, 8, 8), _t(3))


def test_unet_constructor_errors():
    with pytest.raises(ValueError, match="groups=8"):
        UNet(1, base=12)
    with pytest.raises(ValueError, match="base 4"):
        UNet(1, base=4, mults=(2, 4))
    with pytest.raises(ValueError, match="attn_res.*one of \\[1, 2, 4\\]"):
        UNet(1, base=8, attn_res=(8,))
    with pytest.raises(ValueError, match="base"):
        UNet(1, base=0)


# --- TimeMLP -----------------------------------------------------------------------------------


def test_mlp_shapes_and_zero_init():
    net = TimeMLP(3, hidden=32, depth=2)
    out = net(torch.randn(5, 3), _t(5))
    assert out.shape == (5, 3) and torch.equal(out, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        net(torch.randn(5, 2), _t(5))


def test_mlp_conditioning():
    net = _perturb(TimeMLP(2, hidden=32, depth=2, num_classes=4))
    x, t = torch.randn(6, 2), _t(6)
    out0, out2 = net(x, t, torch.zeros(6, dtype=torch.long)), net(x, t, torch.full((6,), 2))
    assert not torch.allclose(out0, out2)
    assert torch.equal(net(x, t), net(x, t, torch.full((6,), -1)))
    assert not torch.allclose(net(x, t), out0)
    assert not torch.allclose(net(x, torch.zeros(6, dtype=torch.long)), net(x, torch.full((6,), 900)))
    with pytest.raises(ValueError, match="num_classes=0"):
        TimeMLP(2, hidden=8)(x, t, torch.zeros(6, dtype=torch.long))


def test_mlp_learns_a_regression_target():
    torch.manual_seed(0)
    net = TimeMLP(2, hidden=32, depth=2, time_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, t = torch.randn(256, 2), torch.randint(0, 1000, (256,))
    target = torch.stack([torch.sin(2 * x[:, 0]) * (t / 1000), x[:, 0] * x[:, 1]], dim=1)
    losses = []
    for _ in range(150):
        loss = (net(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_mlp_fourier_features_are_octaves_of_pi():
    net = _perturb(TimeMLP(2, hidden=16, depth=1, fourier=3))
    assert net.inp.in_features == 2 * (1 + 2 * 3)
    x, t = torch.rand(4, 2) * 2 - 1, _t(4)
    with torch.no_grad():
        net.inp.weight[:, :2] = 0  # drop the raw coordinates: what is left has period 2 in every coordinate
        assert torch.allclose(net(x, t), net(x + torch.tensor([2.0, -2.0]), t), atol=1e-5)
        assert not torch.allclose(net(x, t), net(x + torch.tensor([1.0, 0.0]), t), atol=1e-3)
    assert "fourier" not in TimeMLP(2).config  # configs of models saved before the option stay identical
    with pytest.raises(ValueError, match="fourier"):
        TimeMLP(2, fourier=-1)
    assert TimeMLP(2, fourier=20).inp.in_features == 2 * 41
    with pytest.raises(ValueError, match="fourier must be at most 20"):  # 128 gave inf features, NaN losses
        TimeMLP(2, fourier=21)


# --- registry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"name": "unet", "in_channels": 2, "base": 8, "mults": (1, 2), "num_classes": 3, "circular": True},
        {"name": "unet", "in_channels": 1, "base": 8, "attn_res": [2], "time_dim": 16},
        {"name": "mlp", "dim": 2, "hidden": 16, "depth": 2, "num_classes": 2},
        {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "fourier": 3},
    ],
)
def test_build_net_round_trip(config):
    net = _perturb(build_net(config))
    stored = json.loads(json.dumps(net.config))
    assert stored["name"] == config["name"]
    twin = build_net(stored)
    assert twin.config == net.config
    twin.load_state_dict(net.state_dict())
    twin.eval()
    x = torch.randn(3, 2) if config["name"] == "mlp" else torch.randn(3, config["in_channels"], 8, 8)
    y = torch.tensor([0, 1, -1]) if config.get("num_classes") else None
    assert torch.equal(net(x, _t(3), y), twin(x, _t(3), y))


def test_build_net_errors():
    with pytest.raises(ValueError, match="unknown net 'resnet9'; known nets: .*mlp.*unet"):
        build_net({"name": "resnet9"})
    with pytest.raises(ValueError, match="'name' key"):
        build_net({"base": 8})
    with pytest.raises(ValueError, match="net 'unet'.*widht"):
        build_net({"name": "unet", "widht": 3})
    with pytest.raises(ValueError, match="net 'mlp'"):
        build_net({"name": "mlp"})  # dim is required


def test_register_net():
    @register_net("_toy")
    class Toy(torch.nn.Module):
        def __init__(self, k: int = 1):
            super().__init__()
            self.config = {"name": "_toy", "k": k}

    @register_net("_own")
    class Own(torch.nn.Module):  # a config of its own kind is its own business
        def __init__(self, k: int = 1):
            super().__init__()
            self.config = ("own", k)

    @register_net("_plain")
    class Plain(torch.nn.Module):  # keeps no config of its own: build_net records what built it
        def __init__(self, k: int = 1):
            super().__init__()
            self.lin = torch.nn.Linear(k, k)

    try:
        assert isinstance(build_net({"name": "_toy", "k": 2}), Toy)
        assert register_net("_toy")(Toy) is Toy  # re-registering the same class is harmless
        with pytest.raises(ValueError, match="already registered"):
            register_net("_toy")(type("Other", (torch.nn.Module,), {}))
        assert build_net({"name": "_own", "k": 2}).config == ("own", 2)
        plain = build_net({"name": "_plain", "k": 3})
        assert plain.config == {"name": "_plain", "k": 3} and build_net(plain.config).lin.in_features == 3
    finally:
        NETS.pop("_toy")
        NETS.pop("_plain")
        NETS.pop("_own")
    with pytest.raises(ValueError, match=r"unknown net '_toy'.*once the module that registers it"):
        build_net({"name": "_toy"})


_OWN_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, in_channels, 1)

    def forward(self, x, t):
        return self.out(torch.relu(self.conv(x)))

def helper(x):
    return x

class OwnConfig(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.config = {"width": width}

class Loose(nn.Module):
    def __init__(self, **settings):
        super().__init__()
        self.settings = settings

RUNS = globals().get("RUNS", 0) + 1  # how often the file ran in this process

class Fails(nn.Module):
    def __init__(self, width: int = 4):
        raise RuntimeError("no such width")
"""


def test_a_net_of_ones_own_is_built_from_its_file_and_rebuilt_from_its_config_anywhere(tmp_path, monkeypatch):
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "net.py").write_text(_OWN_NET)
    monkeypatch.chdir(tmp_path)
    net = build_net({"name": "own/net.py:Net", "width": 3})
    assert net.config["name"] == f"{tmp_path / 'own' / 'net.py'}:Net"  # absolute: found from anywhere
    assert net.config["width"] == 3 and len(net.config["file_sha256"]) == 64
    from pathlib import Path

    assert build_net({"name": Path("own/net.py:Net"), "width": 3}).config == net.config  # a path names it alike
    monkeypatch.chdir(tmp_path / "own")
    twin = build_net(json.loads(json.dumps(net.config)))
    twin.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(net(x, _t(2)), twin(x, _t(2))) and twin.config == net.config


def test_a_subclass_of_a_condiff_net_in_ones_own_file_keeps_its_parents_record_under_the_files_name(tmp_path):
    file = tmp_path / "wide.py"
    file.write_text("from condiff.nets import UNet\n\nclass Wide(UNet):\n    pass\n")
    net = build_net({"name": f"{file}:Wide", "in_channels": 1, "base": 8, "mults": [1]})
    assert net.config["name"] == f"{file}:Wide" and net.config["base"] == 8 and "num_res" in net.config
    twin = build_net(json.loads(json.dumps(net.config)))  # every setting the UNet records, rebuilt
    twin.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net.eval()(x, _t(2)), twin.eval()(x, _t(2)))


def test_a_net_of_ones_own_that_cannot_be_built_says_why_in_one_line(tmp_path):
    file = tmp_path / "net.py"
    file.write_text(_OWN_NET)
    with pytest.raises(ValueError, match=r"net .*net.py:helper is a function, not a torch.nn.Module class"):
        build_net({"name": f"{file}:helper"})
    with pytest.raises(ValueError, match=r"net .*net.py:Fails failed to build: RuntimeError: no such width"):
        build_net({"name": f"{file}:Fails"})
    with pytest.raises(ValueError, match=r"net file .*net.py has no 'Gone'; its callables: \['Fails', 'Loose', 'N"):
        build_net({"name": f"{file}:Gone"})
    with pytest.raises(ValueError, match=r"bad arguments for net '.*net.py:Net': .*'depth'.*; it accepts: in_channels"):
        build_net({"name": f"{file}:Net", "depth": 2})
    with pytest.raises(ValueError, match=r"it accepts: in_channels, width; labelled data \(data.labels = true\) give a "
                       r"net num_classes, the number of classes, which a class-conditional net takes"):
        build_net({"name": f"{file}:Net", "num_classes": 3})
    with pytest.raises(ValueError, match=r"setting .*net.py:Net.width expects a number \(default 4\), got .wide."):
        build_net({"name": f"{file}:Net", "width": "wide"})
    with pytest.raises(ValueError, match=r"net .*net.py:OwnConfig has a .config of its own, where condiff keeps what "
                       r"rebuilds the net \(the file, the class and its settings\): rename it"):
        build_net({"name": f"{file}:OwnConfig"})
    loose = build_net({"name": f"{file}:Loose", "width": 3, "mode": "a"})  # **settings: nothing to check against
    assert loose.settings == {"width": 3, "mode": "a"} and build_net(loose.config).settings == loose.settings
    from condiff.userfile import load_from_file

    assert load_from_file(file, "RUNS", once=True)[0] == 1  # a net's file ran once in all the builds above
    # a constraint's or an operator's file runs at each load: what it makes may hold state
    assert load_from_file(file, "Net", once=True)[0] is load_from_file(file, "Net", once=True)[0]
    assert load_from_file(file, "Net")[0] is not load_from_file(file, "Net")[0]
    config = build_net({"name": f"{file}:Net"}).config
    file.write_text(_OWN_NET + "\n# edited\n")
    with pytest.warns(UserWarning, match=r"net file .*net.py has changed since this net's settings were recorded"):
        build_net(config)
    file.unlink()
    with pytest.raises(ValueError, match=r"^net file .*net.py does not exist$"):
        build_net(config)


def test_a_net_file_edited_within_one_process_runs_again_as_edited(tmp_path):
    """A net's file runs once per process for each version of it: an edited file is not served from the
    run of the version before."""
    file = tmp_path / "net.py"
    file.write_text(_OWN_NET)
    assert build_net({"name": f"{file}:Net", "width": 3}).conv.out_channels == 3
    file.write_text(_OWN_NET.replace("self.conv = nn.Conv2d(in_channels, width, 3", "self.conv = nn.Conv2d("
                                     "in_channels, 2 * width, 3").replace("nn.Conv2d(width, in_channels", "nn.Conv2d("
                                     "2 * width, in_channels"))
    assert build_net({"name": f"{file}:Net", "width": 3}).conv.out_channels == 6


def test_build_net_checks_argument_types_against_the_constructor_defaults():
    base = {"name": "resnet", "in_channels": 1, "out_channels": 1}
    with pytest.raises(ValueError, match=r"setting resnet.context expects true or false .*, got .maybe."):
        build_net({**base, "context": "maybe"})  # was taken as true
    with pytest.raises(ValueError, match=r"setting unet.mults expects a list .*, got 3"):
        build_net({"name": "unet", "in_channels": 1, "mults": 3})
    with pytest.raises(ValueError, match=r"setting unet.base expects an integer .*, got 8.5"):
        build_net({"name": "unet", "in_channels": 1, "base": 8.5})
    assert build_net({**base, "context": True, "blocks": 1}).config["context"] is True


@pytest.mark.parametrize(("cfg", "size", "message"), [
    ({"downsamples": 0}, 2, r"first 7x7 convolution with circular padding needs images of at least 3x3, got 2x2"),
    ({"downsamples": 0, "padding": "reflect"}, 3, r"at least 4x4, got 3x3"),
    ({"downsamples": 3}, 8, r"3 downsamples take 8x8 images to 1x1, too small to instance-normalise"),
    ({"downsamples": 2, "padding": "reflect", "norm": "none"}, 4, r"take 4x4 images to 1x1, too small to reflect-pad"),
])
def test_resnet_refuses_images_its_layers_cannot_take_before_torch_does(cfg, size, message):
    """Each case made torch fail deep inside ("Padding value causes wrapping around more than once",
    "Expected more than 1 spatial element when training"); the same nets take images one size up."""
    from condiff.mirror import build_mirror

    net = build_net({"name": "resnet", "in_channels": 1, "base": 4, "blocks": 1, **cfg}).train()
    with pytest.raises(ValueError, match=message):
        net(torch.zeros(2, 1, size, size))
    with pytest.raises(ValueError, match=message):  # refused when the map is built, before any training
        build_mirror((1, size, size), {"name": "icnn", "filters": 4, "layers": 2}, {"name": "resnet", **cfg})
    bigger = size * 2
    assert net(torch.zeros(2, 1, bigger, bigger)).shape == (2, 1, bigger, bigger)


def test_a_channels_last_batch_is_named_as_one():
    net = UNet(in_channels=3, base=8, mults=(1,), num_res=1)
    with pytest.raises(ValueError, match=r"built for 3 input channels, got 8: x of shape \(2, 8, 8, 3\) looks "
                                         r"channels-last; permute it to \(B, C, H, W\)"):
        net(torch.zeros(2, 8, 8, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"built for 3 input channels, got 1$"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    wide = UNet(in_channels=8, base=8, mults=(1,), num_res=1)  # a width equal to the channels is no sign
    with pytest.raises(ValueError, match=r"built for 8 input channels, got 3$"):
        wide(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
