"""Denoiser contract: Tweedie, score, NetDenoiser, and the diffusers adapter."""

import json
import math

import numpy as np
import pytest
import torch

from condiff.denoiser import DiffusersDenoiser, GaussianDenoiser, NetDenoiser
from condiff.io import CheckpointError
from condiff.models import load_denoiser, load_net, save_model
from condiff.nets import TimeMLP, UNet
from condiff.schedule import Schedule


def test_tweedie_and_score_closed_form():
    s = Schedule.linear(100)
    d = GaussianDenoiser(s, mean=0.3, std=0.5)
    x = torch.randn(4, 6)
    t = torch.tensor([0, 20, 50, 99])
    a = s.abar_at(t, x)
    var = a * 0.25 + 1 - a
    # E[x0 | x_t] = m + sqrt(a) s^2 (x_t - sqrt(a) m) / var ; score = -(x_t - sqrt(a) m) / var
    torch.testing.assert_close(d.x0(x, t), 0.3 + a.sqrt() * 0.25 * (x - a.sqrt() * 0.3) / var, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(d.score(x, t), -(x - a.sqrt() * 0.3) / var, rtol=1e-5, atol=1e-5)
    assert d.nfe == 2


def test_net_denoiser_labels_and_scalar_t():
    torch.manual_seed(0)
    net = UNet(1, base=8, mults=(1, 2), num_classes=3)
    for p in net.parameters():  # the output layer starts at zero; make the net non-trivial
        torch.nn.init.normal_(p, std=0.1)
    d = NetDenoiser(net, Schedule.linear(50))
    x = torch.randn(2, 1, 8, 8)
    e_scalar = d.eps(x, 10)
    e_vec = d.eps(x, torch.tensor([10, 10]))
    torch.testing.assert_close(e_scalar, e_vec)
    dc = d.conditioned(torch.tensor([0, 2]))
    assert dc.net is net
    assert not torch.allclose(dc.eps(x, 10), e_scalar)  # labels change the prediction
    with pytest.raises(ValueError, match="labels have batch 2 but x_t has batch 3"):
        dc.eps(torch.randn(3, 1, 8, 8), 5)
    # one int label stands for the whole batch; classifier-free guidance is the closed form
    # (1 + w) eps(x | y) - w eps(x | null) from one batched call
    torch.testing.assert_close(d.conditioned(2).eps(x, 10), d.conditioned(torch.tensor([2, 2])).eps(x, 10))
    guided = d.conditioned(2, guidance_scale=1.5)
    t = torch.tensor([10, 10])
    want = 2.5 * net(x, t, torch.tensor([2, 2])) - 1.5 * net(x, t, torch.tensor([-1, -1]))
    torch.testing.assert_close(guided.eps(x, 10), want, rtol=1e-5, atol=1e-5)
    assert guided.nfe == 1
    torch.testing.assert_close(d.conditioned(2, guidance_scale=0.0).eps(x, 10), d.conditioned(2).eps(x, 10))
    with pytest.raises(ValueError, match="needs class labels"):
        d.conditioned(None, guidance_scale=1.0)
    # labels outside the model's classes: refused once, when they are fixed, and by the embedding for
    # labels given per call on the CPU (-1 means "no label"; 3 = num_classes, the null's index, is refused:
    # data labelled 1..3 trained class 3 as unconditional)
    for bad in (3, 4, -2, torch.tensor([0, 7])):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            d.conditioned(bad)
    for bad in (1.9, True, "1"):  # 1.9 drew class 1, silently
        with pytest.raises(ValueError, match="a class label must be an integer"):
            d.conditioned(bad)
    torch.testing.assert_close(d.conditioned(np.int64(2)).eps(x, 10), d.conditioned(2).eps(x, 10))
    with pytest.raises(ValueError, match=r"or be -1 \(no label\), got values in \[0, 7\]"):
        net(x, torch.tensor([1, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"got values in \[1, 3\] \(labels 1..K\? subtract 1\)"):
        net(x, torch.tensor([1, 1]), torch.tensor([1, 3]))
    torch.testing.assert_close(d.conditioned(-1).eps(x, 10), d.eps(x, 10))  # -1: the null label, as no label
    with pytest.raises(ValueError, match="x_t is torch.float64 but the network's weights are torch.float32"):
        d.eps(x.double(), 10)
    with pytest.raises(ValueError, match="std must be a number >= 0"):
        GaussianDenoiser(Schedule.linear(50), std=float("nan"))


def test_model_round_trip(tmp_path):
    torch.manual_seed(0)
    net = TimeMLP(2, hidden=16, depth=1)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    s = Schedule.cosine(40)
    save_model(tmp_path / "m", net, s, shape=[2])
    d = load_denoiser(tmp_path / "m")
    x, t = torch.randn(5, 2), torch.randint(0, 40, (5,))
    torch.testing.assert_close(d.eps(x, t), net(x, t))
    torch.testing.assert_close(d.schedule.abar, s.abar)
    net2, cfg = load_net(tmp_path / "m")
    assert cfg["shape"] == [2] and net2.config == net.config


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_adapter_saved_and_loaded(tmp_path, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet().eval()
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    unet.save_pretrained(tmp_path / "unet")
    sched.save_pretrained(tmp_path / "scheduler")
    den = load_denoiser(tmp_path)
    assert isinstance(den, DiffusersDenoiser)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 99])
    with torch.no_grad():
        out = unet(x, t).sample
        got = den.eps(x, t)
    a = den.schedule.abar_at(t, x)
    expect = {"epsilon": out, "v_prediction": a.sqrt() * out + (1 - a).sqrt() * x,
              "sample": (x - a.sqrt() * out) / (1 - a).sqrt()}[prediction_type]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(den.schedule.abar.float(), sched.alphas_cumprod.float())
    # the eps <-> x0 conversion is consistent: x0 from eps re-noises to x_t
    x0 = den.x0_from_eps(x, t, got)
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * got, x, rtol=1e-4, atol=1e-4)
    assert not math.isnan(float(got.sum()))


def test_diffusers_dir_without_scheduler_is_clear(tmp_path):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "x.json").write_text(json.dumps({}))
    with pytest.raises(CheckpointError, match="holds a unet/ but no scheduler_config.json"):
        load_denoiser(tmp_path)


def _save_dm(path, unet, **sched):
    diffusers = pytest.importorskip("diffusers")
    unet.save_pretrained(path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100, **sched).save_pretrained(path / "scheduler")
    return path


@pytest.mark.parametrize("sched, message", [
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr = true is not supported"),
    ({"thresholding": True}, "thresholding = true is not supported"),
])
def test_diffusers_scheduler_settings_condiff_would_ignore_are_refused(tmp_path, sched, message):
    _save_dm(tmp_path, _tiny_unet(), **sched)
    with pytest.raises(ValueError, match=r"scheduler_config.json: the scheduler setting " + message):
        load_denoiser(tmp_path)


def test_diffusers_unets_condiff_cannot_drive_are_refused_at_load(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
              down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    _save_dm(tmp_path / "cls", diffusers.UNet2DModel(in_channels=1, out_channels=1, num_class_embeds=10, **kw))
    with pytest.raises(ValueError, match="class-conditional diffusers UNets"):
        load_denoiser(tmp_path / "cls")
    _save_dm(tmp_path / "in2", diffusers.UNet2DModel(in_channels=2, out_channels=1, **kw))
    with pytest.raises(ValueError, match="in_channels=2 but out_channels=1"):
        load_denoiser(tmp_path / "in2")
    # twice the output channels is a learned variance only with a learned-variance scheduler
    _save_dm(tmp_path / "out2", diffusers.UNet2DModel(in_channels=1, out_channels=2, **kw), variance_type="fixed_small")
    with pytest.raises(ValueError, match="in_channels=1 but out_channels=2"):
        load_denoiser(tmp_path / "out2")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"scheduler_config.json is not valid JSON"):
        load_denoiser(tmp_path / "bad")


def test_a_learned_variance_unet_predicts_with_the_first_half_of_its_output(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4).eval()
    den = load_denoiser(_save_dm(tmp_path, unet, variance_type="learned_range"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    with torch.no_grad():
        torch.testing.assert_close(den.eps(x, t), unet(x, t).sample[:, :1])


def test_diffusers_clip_sample_becomes_the_default_clip_x0(tmp_path):
    from condiff.cli.common import load_model_for

    _save_dm(tmp_path / "c", _tiny_unet(), clip_sample=True, clip_sample_range=2.0)
    _save_dm(tmp_path / "n", _tiny_unet(), clip_sample=False)
    den, run_cfg, shape = load_model_for(tmp_path / "c", "cpu")
    assert den.clip_x0 == 2.0 and run_cfg["sample"]["clip_x0"] == 2.0 and shape == (1, 8, 8)
    den, run_cfg, _ = load_model_for(tmp_path / "n", "cpu")
    assert den.clip_x0 is None and run_cfg["sample"]["clip_x0"] is None


def test_timesteps_outside_the_schedule_or_between_steps_are_refused():
    """eps(x, 1000) on a 50-step schedule, or t = 3.7 (read as 3), ran without a word."""
    s = Schedule.linear(50)
    d = NetDenoiser(TimeMLP(2, hidden=8, depth=1), s)
    x = torch.randn(3, 2)
    for t, match in [(1000, r"timestep t must be an integer in \[0, 50\), got 1000"),
                     (-5, r"in \[0, 50\), got -5"),
                     (torch.tensor([3.7, 1.0, 2.0]), r"in \[0, 50\) as whole steps, got values in \[1, 3.7\]"),
                     (torch.tensor([0, 50, 2]), r"in \[0, 50\) as whole steps, got values in \[0, 50\]")]:
        with pytest.raises(ValueError, match=match):
            d.eps(x, t)
    assert d.eps(x, torch.tensor([3.0, 1.0, 2.0])).shape == x.shape  # whole steps as floats are fine
    assert torch.equal(d.x0(x, 7), d.x0(x, torch.full((3,), 7)))


def test_gaussian_oracle_mean_must_fit_the_batch():
    d = GaussianDenoiser(Schedule.linear(10), torch.zeros(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"a mean of shape \(2, 1, 1, 1\) does not fit x_t of shape \(1, 1, 4, 4\)"):
        d.eps(torch.randn(1, 1, 4, 4), 2)


def test_diffusers_weights_other_than_safetensors_are_refused_in_one_line(tiny_diffusers_dir):
    """Only a pickled diffusion_pytorch_model.bin: diffusers logged a line of its own before our error."""
    unet = tiny_diffusers_dir / "unet"
    for f in unet.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights \(found diffusion_pytorch_model\.bin: pickled "
                                        r"weights are never loaded"):
        DiffusersDenoiser.from_pretrained(tiny_diffusers_dir)


def test_a_checkpoint_loads_its_ema_weights_unless_asked_for_the_raw_ones(tmp_path):
    from condiff import io

    net = TimeMLP(2, hidden=8, depth=1)
    raw = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ema = {k: v + 1.0 for k, v in raw.items()}
    io.save_checkpoint(tmp_path / "c", {"model": raw, "ema": ema},
                       {"net": net.config, "schedule": Schedule.linear(10).config()})
    for flag, want in ((True, ema), (False, raw)):
        got = load_denoiser(tmp_path / "c", ema=flag).net.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), flag


@pytest.mark.parametrize(("out", "got"), [
    (lambda x: x[:, :1], r"\(2, 1, 4, 4\) torch.float32"),  # one output channel for three: broadcast before
    (lambda x: x.mean((1, 2, 3), keepdim=True), r"\(2, 1, 1, 1\) torch.float32"),
    (lambda x: x.double(), None),  # failed a step later, blaming x_t
])
def test_a_prediction_unlike_its_input_is_refused_by_sampling_and_training(out, got):
    from condiff.sample import sample
    from condiff.train import denoising_loss

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return out(x)

    s = Schedule.linear(20)
    want = (r"prediction must match its input x_t, \(2, 3, 4, 4\) torch.float32, got " + got if got else
            "the network returns torch.float64 for input x_t of torch.float32")
    with pytest.raises(ValueError, match=want):
        sample(NetDenoiser(Net(), s), (2, 3, 4, 4), steps=2)
    with pytest.raises(ValueError, match=want):
        denoising_loss(Net(), s, torch.zeros(2, 3, 4, 4), None, None)


def test_a_bf16_prediction_under_autocast_is_taken_in_the_input_dtype():
    """Training under torch.autocast (benchmarks/train_speed.py's bf16 rows) was refused: the net returns
    bf16 for float32 data there, as autocast means it to; outside autocast the mismatch is still refused."""
    from condiff.train import denoising_loss

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, t):
            return self.lin(x)

    s, x = Schedule.linear(20), torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Net()(x, None).dtype == torch.bfloat16  # what autocast does to the net
        loss = denoising_loss(Net(), s, x, None, None)
    assert loss.shape == (3,) and loss.dtype == torch.float32 and bool(torch.isfinite(loss).all())
    with pytest.raises(ValueError, match="returns torch.bfloat16 for input x_t of torch.float32"):
        denoising_loss(type("Half", (Net,), {"forward": lambda self, x, t: self.lin(x).bfloat16()})(), s, x, None, None)


def test_input_on_another_device_than_the_weights_is_named_in_one_line():
    """The samplers drew their noise on the CPU by default whatever the model's device, and torch's error came
    from inside the network; they now default to the weights' device, and a mismatch is named."""
    from condiff import checks

    net = TimeMLP(2, hidden=8, depth=1)
    assert checks.param_device(net) == torch.device("cpu") and checks.param_device(None) == torch.device("cpu")
    den = NetDenoiser(net.to("meta"), Schedule.linear(10))
    assert checks.param_device(den.net) == torch.device("meta")
    with pytest.raises(ValueError, match="x_t is on cpu but the network's weights are on meta: pass device='meta'"):
        den.predict_eps(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    # an analytic denoiser has buffers and no weights: its buffers say where it is
    assert checks.param_device(GaussianDenoiser(Schedule.linear(10), mean=0.0, std=1.0).to("meta")).type == "meta"


def test_the_samplers_draw_their_noise_where_the_weights_are_by_default(monkeypatch):
    """sample and guided_sample drew x_T on the CPU unless given a device, whatever the model's."""
    import condiff.guidance.sampling as guided
    import condiff.sample as sampling
    from condiff import checks
    from condiff.guidance import DPS

    class Drawn(Exception):
        pass

    where = []

    def randn(shape, generator, like=None, device=None, dtype=None):
        where.append(device)
        raise Drawn

    monkeypatch.setattr(checks, "param_device", lambda module: "the weights' device")
    monkeypatch.setattr(sampling, "randn", randn)
    monkeypatch.setattr(guided, "randn", randn)
    den = GaussianDenoiser(Schedule.linear(10), mean=0.0, std=1.0)
    with pytest.raises(Drawn):
        sampling.sample(den, (2, 2), steps=2)
    with pytest.raises(Drawn):
        guided.guided_sample(den, DPS(lambda x: x.pow(2).sum(1), 0.1), (2, 2), steps=2)
    with pytest.raises(Drawn):
        sampling.sample(den, (2, 2), steps=2, device="cpu")  # a device given is kept
    assert where == ["the weights' device", "the weights' device", "cpu"]


def test_a_saved_model_records_the_versions_it_was_made_with(tmp_path):
    save_model(tmp_path / "m", TimeMLP(2, hidden=8, depth=1), Schedule.linear(10))
    v = json.loads((tmp_path / "m" / "config.json").read_text())["versions"]
    assert v["torch"] == torch.__version__ and v["condiff"]


def test_a_diffusers_scheduler_object_is_taken_for_its_config(tiny_diffusers_dir):
    import diffusers

    den = DiffusersDenoiser.from_pretrained(tiny_diffusers_dir)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    again = DiffusersDenoiser(den.unet, sched)
    assert again.schedule.config() == den.schedule.config()


@pytest.mark.parametrize("x, message", [
    (torch.zeros(2, 1, 8, 8, dtype=torch.float64), "x_t is torch.float64 but the network's weights are torch.float32"),
    (torch.zeros(2, 3, 8, 8), "x_t has 3 channels but the UNet takes 1"),
    (torch.zeros(1, 8, 8), r"a diffusers UNet takes images \(B, C, H, W\), got shape \(1, 8, 8\)"),
    (torch.zeros(2, 1, 15, 15), r"x_t is 15x15 but the UNet halves its sides 1 time\(s\): .* multiples of 2"),
])
def test_a_diffusers_denoiser_names_inputs_its_unet_cannot_take(tiny_diffusers_denoiser, x, message):
    """As NetDenoiser does; these failed deep inside diffusers (tensor sizes in unet_2d_blocks.py)."""
    with pytest.raises(ValueError, match=message):
        tiny_diffusers_denoiser.eps(x, torch.full((len(x),), 5))
    assert tiny_diffusers_denoiser.eps(torch.zeros(2, 1, 12, 8), torch.full((2,), 5)).shape == (2, 1, 12, 8)


def test_a_diffusers_unet_of_another_class_is_refused_by_name(tmp_path):  # m62 denoiser.py:325
    pytest.importorskip("diffusers")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
                                                                "num_train_timesteps": 100}))
    with pytest.raises(ValueError, match=r"unet holds a UNet2DConditionModel; only diffusers UNet2DModel models "
                                         r"are supported"):
        DiffusersDenoiser.from_pretrained(tmp_path)


def test_a_results_folder_or_a_mirror_map_given_as_a_model_is_named(tmp_path):
    """`--ckpt RUN/solve/...` was "not a condiff checkpoint: no config.json", and a saved mirror map "has no 'net'
    or 'schedule' entry": each now says what the folder is."""
    solved = tmp_path / "solve" / "inpaint"
    solved.mkdir(parents=True)
    (solved / ".condiff-run").write_text("condiff solve\n")
    with pytest.raises(CheckpointError, match="holds the results of `condiff solve`, not a model: pass the model"):
        load_denoiser(solved)
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "config.json").write_text(json.dumps({"format": "condiff mirror map", "mirror": {"a": 0.9}}))
    with pytest.raises(CheckpointError, match="is a saved mirror map \\(NAMM\\), not a diffusion model: load it with"):
        load_denoiser(tmp_path / "mirror")


def test_a_diffusers_denoiser_names_an_input_on_another_device(tiny_diffusers_denoiser):
    """As NetDenoiser does; torch's own error came from inside the UNet."""
    tiny_diffusers_denoiser.unet.to("meta")
    with pytest.raises(ValueError, match="x_t is on cpu but the network's weights are on meta"):
        tiny_diffusers_denoiser.eps(torch.zeros(2, 1, 8, 8), torch.full((2,), 5))
