"""The condiff command end to end on tiny settings, and its error messages."""

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from condiff.cli.config import ConfigError, parse_override, resolve
from condiff.cli.main import main
from condiff.train import read_log

TINY = ["--data", "toy2d", "--set", "model.hidden=32", "--set", "model.depth=1", "--set", "data.n=512",
        "--set", "train.steps=30", "--set", "train.batch_size=32", "--set", "train.progress=false",
        "--set", "schedule.T=50", "--set", "sample.n=64", "--set", "sample.steps=10"]


@pytest.fixture
def trained(train_once):
    """``trained(dest)``: a copy of one `condiff train` run of the TINY settings at ``dest`` (training
    it once per session, rather than in every test that only needs a trained run)."""
    return lambda dest: shutil.copytree(train_once(TINY), dest)


def test_train_sample_eval_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 30 and cfg["schedule"]["T"] == 50 and cfg["data"]["kind"] == "moons"
    assert (run / "model" / "model.safetensors").is_file() and (run / "loss.png").is_file()
    from condiff.data import load_dataset  # the model records its training data's [min, max]
    train_x = load_dataset("toy2d", split="train", kind="moons", n=512).x
    recorded = json.loads((run / "model" / "config.json").read_text())["value_range"]
    assert recorded == [float(train_x.min()), float(train_x.max())]
    assert main(["sample", "--ckpt", str(run), "--n", "7", "--steps", "5", "--seed", "3"]) == 0
    x = np.load(run / "samples" / "samples.npz")["x"]
    assert x.shape == (7, 2) and np.isfinite(x).all()
    assert main(["sample", "--ckpt", str(run), "--n", "7", "--steps", "5", "--seed", "3", "--out",
                 str(tmp_path / "again")]) == 0
    assert np.array_equal(x, np.load(tmp_path / "again" / "samples.npz")["x"])  # same seed, same samples
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run)]) == 0
    assert "warning: on 64 samples the MMD ratio cannot judge a model" in capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["mmd_n"] == 64 and m["mmd"] > 0 and m["mmd_ref"] > 0
    assert m["targets"] == {} and "stated at n = 2000" in m["targets_not_judged"]  # a ratio near 1 for any model
    # the run's model and its checkpoints sample with the run's [sample] settings (they took the defaults: other
    # batches, so other samples for one seed)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    for path in (run / "model", ckpt):
        assert main(["sample", "--ckpt", str(path), "--out", str(tmp_path / path.name)]) == 0
        said = json.loads((tmp_path / path.name / "sample_config.json").read_text())
        assert (said["n"], said["steps"]) == (64, 10), said  # TINY's sample.n and sample.steps
    assert (run / "samples.png").is_file()


def test_a_net_of_ones_own_trains_and_samples_from_the_command_line(tmp_path, monkeypatch, capsys):
    """``model.name = FILE.py:NAME``: the bundled example net, named relative to the working directory,
    replaces the digits UNet's table (its base, mults... mean nothing to it), takes its channels from the data
    and is rebuilt from the run's record by later commands run anywhere."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    small = ["--set", "train.steps=2", "--set", "train.warmup=0", "--set",
             "train.batch_size=8", "--set", "train.progress=false", "--set", "schedule.T=20"]
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--set", "model.name=examples/own_net/net.py:SmallConvNet",
                 "--set", "model.width=8", *small, "--out", str(run)]) == 0
    net = json.loads((run / "model" / "config.json").read_text())["net"]
    own = f"{root / 'examples' / 'own_net' / 'net.py'}:SmallConvNet"
    assert {k: v for k, v in net.items() if k != "file_sha256"} == {"name": own, "width": 8, "in_channels": 1}
    assert json.loads((run / "config.json").read_text())["model"] == {"name": own, "width": 8}
    toml = tmp_path / "own.toml"  # a config file's [model] table of another net replaces the preset's too
    toml.write_text('[model]\nname = "examples/own_net/net.py:SmallConvNet"\ndepth = 1\n')
    assert main(["train", "--data", "digits", "--config", str(toml), *small, "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "config.json").read_text())["model"] == {"name": own, "depth": 1}
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--steps", "2"]) == 0
    assert np.load(run / "samples" / "samples.npz")["x"].shape == (3, 1, 8, 8)
    capsys.readouterr()
    assert main(["train", "--data", "digits", "--set", "model.name=nowhere.py:Net", *small, "--out",
                 str(tmp_path / "r3")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"net file {tmp_path / 'nowhere.py'} does not exist")
    # a net that cannot denoise the data is refused before its run begins (it failed in training, the run begun)
    (tmp_path / "wrong.py").write_text("import torch\nclass Wrong(torch.nn.Module):\n"
                                       "    def __init__(self, in_channels: int = 1):\n        super().__init__()\n"
                                       "        self.c = torch.nn.Conv2d(in_channels, 3, 1)\n"
                                       "    def forward(self, x, t):\n        return self.c(x)\n")
    for data, net, says in (("digits", "wrong.py:Wrong", r"model .*wrong.py:Wrong maps x of shape \(2, 1, 8, 8\) to "
                             r"\(2, 3, 8, 8\): a denoising net returns its prediction of the noise"),
                            ("toy2d", f"{own}", r"model .*net.py:SmallConvNet fails on two training samples \(x "
                             r"\(2, 2\), t \(2,\)\): RuntimeError: Expected 3D")):
        assert main(["train", "--data", data, "--set", f"model.name={net}", *small, "--out", str(tmp_path / "r3")]) == 2
        assert re.search(says, capsys.readouterr().err)
    assert not (tmp_path / "r3").exists()


def test_a_net_named_by_a_set_keeps_every_other_setting_given_for_it_in_any_order(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    rel, own = "examples/own_net/net.py:SmallConvNet", f"{root / 'examples' / 'own_net' / 'net.py'}:SmallConvNet"
    want = {"name": own, "width": 64}
    assert resolve("digits", None, ["model.width=64", f"model.name={rel}"])["model"] == want
    assert resolve("digits", None, [f"model.name={rel}", "model.width=64"])["model"] == want
    toml = tmp_path / "m.toml"
    toml.write_text("[model]\nwidth = 64\n")
    assert resolve("digits", toml, [f"model.name={rel}"])["model"] == want  # the file's settings for it stay
    toml.write_text(f'[model]\nname = "{own}"\nwidth = 64\n')
    assert resolve("digits", toml, [f"model.name={rel}"])["model"] == want  # two spellings of one file: one net
    toml.write_text('[model]\nname = "mlp"\nhidden = 8\n')
    assert resolve("digits", toml, [f"model.name={rel}", "model.depth=2"])["model"] == {"name": own, "depth": 2}


def test_a_config_table_naming_the_same_net_file_spelled_otherwise_merges_into_the_old_one(tmp_path, monkeypatch):
    from condiff.cli.config import merge_checked

    monkeypatch.chdir(tmp_path)
    own = f"{tmp_path / 'own.py'}:Net"
    merged = merge_checked({"model": {"name": own, "width": 8}}, {"model": {"name": "own.py:Net", "depth": 1}},
                           "f.toml")
    assert merged == {"model": {"name": own, "width": 8, "depth": 1}}  # one net: its settings kept, its name absolute


def test_a_net_of_ones_own_takes_its_channels_or_dimension_from_the_data_unless_given(tmp_path):
    from condiff.cli.common import net_config
    from condiff.data import ArrayData

    file = tmp_path / "nets.py"
    file.write_text("import torch\n"
                    "class Img(torch.nn.Module):\n    def __init__(self, in_channels: int = 1, width: int = 4):\n"
                    "        super().__init__()\n"
                    "class Vec(torch.nn.Module):\n    def __init__(self, dim: int = 2):\n        super().__init__()\n")
    images, points = ArrayData(torch.zeros(4, 3, 8, 8)), ArrayData(torch.zeros(4, 5))

    def cfg(name, **given):
        return {"model": {"name": f"{file}:{name}", **given}, "data": {}}

    assert net_config(cfg("Img"), images)["in_channels"] == 3
    assert net_config(cfg("Vec"), points)["dim"] == 5
    assert "dim" not in net_config(cfg("Vec"), images)  # a vector net's dimension is no picture's
    assert net_config(cfg("Img", in_channels=4), images)["in_channels"] == 4  # given: as given


def test_the_check_of_a_new_net_changes_none_of_its_statistics_draws_nothing_and_keeps_its_mode():
    from condiff.cli.common import check_denoising_net

    class Noisy(torch.nn.Module):  # running statistics in training mode, and a draw of its own in either mode
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(1)

        def forward(self, x, t):
            return self.bn(x) + 0 * torch.randn_like(x)

    net, x = Noisy(), torch.randn(4, 1, 8, 8) + 3
    before, state = {k: v.clone() for k, v in net.state_dict().items()}, torch.get_rng_state()
    check_denoising_net(net, x)
    assert torch.equal(torch.get_rng_state(), state) and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # run in eval mode
    check_denoising_net(net.eval(), x)
    assert not net.training  # left as it was


def test_the_check_of_a_new_net_leaves_training_as_it_was_and_probes_each_call_of_a_labelled_net():
    from condiff.cli.common import check_denoising_net
    from condiff.nets import UNet

    net = UNet(1, base=8, mults=(1,), num_classes=3, dropout=0.5).train()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    state = torch.get_rng_state()
    check_denoising_net(net, x, y)
    assert torch.equal(torch.get_rng_state(), state) and net.training  # no draw taken, train mode kept

    class NeedsLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, y):
            return x * self.w

    with pytest.raises(ValueError, match=r"model NeedsLabels fails on two training samples without labels, as "
                       r"net\(x, t\) \(x \(2, 1, 8, 8\), t \(2,\)\): TypeError: .*missing 1 required positional"):
        check_denoising_net(NeedsLabels(), x, y)
    check_denoising_net(NeedsLabels(), x, y, device="cuda")  # may need the GPU to run: left to training there

    class Half(NeedsLabels):
        def forward(self, x, t, y=None):
            return x[:, :, :4]

    with pytest.raises(ValueError, match=r"maps x of shape \(2, 1, 8, 8\) to \(2, 1, 4, 8\)"):
        check_denoising_net(Half(), x, y, device="cuda")  # a wrong shape is wrong anywhere
    check_denoising_net(Half().double(), x, y)  # weights of another dtype: the trainer says what to do

    class NoNullLabel(NeedsLabels):  # an embedding of the K classes alone: label drop's -1 fails mid-run
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(3, 1)

        def forward(self, x, t, y=None):
            return x * self.w if y is None else x * self.emb(y)[:, :, None, None]

    with pytest.raises(ValueError, match=r"model NoNullLabel fails on two training samples with a label -1 \(no "
                       r"label, as label drop and classifier-free guidance give it\) \(x \(2, 1, 8, 8\), t \(2,\), "
                       r"y \(2,\)\): IndexError: index out of range"):
        check_denoising_net(NoNullLabel(), x, y, null_label=True)  # a run with label drop
    check_denoising_net(NoNullLabel(), x, y)  # without label drop it never gets a -1: fine


def test_a_saved_model_runs_a_net_file_at_load_only_if_it_is_trusted(tmp_path, monkeypatch, capsys):
    """Loading must not run code a saved file merely names: a model naming a net file that condiff has not run as it
    is (a model from elsewhere, or one whose file was replaced since) is refused until `condiff trust FILE`."""
    from condiff.models import load_denoiser
    from condiff.userfile import UntrustedCode

    net_file = tmp_path / "net.py"
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "own_net" / "net.py", net_file)
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--set", f"model.name={net_file}:SmallConvNet", "--set", "model.width=8",
                 "--set", "train.steps=2", "--set", "train.warmup=0", "--set", "train.progress=false",
                 "--out", str(run)]) == 0
    load_denoiser(run)  # the file this machine trained with
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "elsewhere"))  # as on a machine that never ran it
    with pytest.raises(UntrustedCode, match=rf"the model at {run / 'model'} names the net file {net_file}, and condiff "
                       rf"has not run it with the trust record {tmp_path / 'elsewhere' / 'trusted_code.json'}: loading "
                       rf"would run its code. If you trust the file as it is, run `condiff trust {net_file}`"):
        load_denoiser(run)
    # nor does resuming its training from the run's own settings run the file (it did, and then trusted it)
    marker = tmp_path / "ran"
    net_file.write_text(net_file.read_text() + f"\nopen({str(marker)!r}, 'a').write('ran')\n")
    assert main(["train", "--out", str(run), "--resume", "--set", "train.steps=3"]) == 2
    assert not marker.exists() and "the run's settings in" in capsys.readouterr().err
    net_file.write_text(net_file.read_text().replace(f"\nopen({str(marker)!r}, 'a').write('ran')\n", ""))
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--steps", "2"]) == 2
    assert "condiff trust" in capsys.readouterr().err and not (run / "samples").exists()
    assert main(["trust", str(net_file), str(tmp_path / "missing.py")]) == 2  # nothing trusted: one was wrong
    assert not (tmp_path / "elsewhere" / "trusted_code.json").exists()
    assert main(["trust", str(net_file)]) == 0
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["trust", "--list"]) == 0 and capsys.readouterr().out == f"{net_file}  (1 version)\n"
    assert main(["trust", "--forget", str(net_file)]) == 0 and main(["trust", "--list"]) == 0
    assert capsys.readouterr().out == f"forgot {net_file}\nno file is trusted\n"
    with pytest.raises(UntrustedCode):
        load_denoiser(run)
    assert main(["trust"]) == 2 and "name the files to trust" in capsys.readouterr().err
    assert main(["trust", str(net_file)]) == 0
    net_file.write_text(net_file.read_text() + "\n# edited\n")  # replaced: no longer the file trusted
    with pytest.raises(UntrustedCode, match=r"net.py, and it was edited since condiff last ran it"):
        load_denoiser(run)
    assert main(["trust", str(net_file)]) == 0
    with pytest.warns(UserWarning, match="has changed since this net's settings were recorded"):
        load_denoiser(run)  # trusted, and loaded into the edited code with a word
    # training on after an edit goes on with the edited code, with a word, rather than refusing the run
    assert main(["train", "--out", str(run), "--resume", "--set", "train.steps=3"]) == 0
    assert re.search(r"net file .*net.py was edited since the newest checkpoint, step_00000002: training goes on",
                     capsys.readouterr().err)


def test_results_of_a_model_or_checkpoint_default_to_the_run_never_inside_the_weights(trained, tmp_path, capsys,
                                                                                     monkeypatch):
    """sample --ckpt RUN/model wrote RUN/model/samples, which the next save of the model deleted (and a
    checkpoint's samples went with the checkpoint when it was pruned)."""
    run = tmp_path / "run"
    trained(run)
    step = sorted((run / "checkpoints").iterdir())[-1]
    assert main(["sample", "--ckpt", str(run / "model"), "--n", "2", "--steps", "2"]) == 0
    assert main(["sample", "--ckpt", str(step), "--n", "2", "--steps", "2"]) == 0
    assert (run / "samples" / "samples.npz").is_file() and not (run / "model" / "samples").exists()
    assert (run / f"samples_{step.name}" / "samples.npz").is_file() and not (step / "samples").exists()
    assert main(["eval", "--ckpt", str(step), "--n", "4", "--steps", "2"]) == 0
    assert (run / f"eval_{step.name}" / "metrics.json").is_file()
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--steps", "2", "--out", str(run / "model" / "s")]) == 2
    assert f"lies inside {run / 'model'}, a model checkpoint directory" in capsys.readouterr().err
    monkeypatch.chdir(run / "model")  # a relative --ckpt: the same places
    shutil.rmtree(run / "samples")
    assert main(["sample", "--ckpt", ".", "--n", "2", "--steps", "2"]) == 0
    assert (run / "samples" / "samples.npz").is_file()
    monkeypatch.chdir(tmp_path)
    # a run that starts over sets the checkpoints' results aside with them (new step_N, other weights)
    assert main(["train", *TINY, "--out", str(run), "--fresh"]) == 0
    assert not (run / f"samples_{step.name}").exists() and not (run / f"eval_{step.name}").exists()


def test_a_sample_table_naming_some_settings_takes_the_defaults_for_the_rest(trained, tmp_path, capsys):
    """A hand-edited [sample] table of {"n": 4} failed with the bare error 'steps'."""
    run = tmp_path / "run"
    trained(run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "sample": {"n": 3, "steps": 2}}))
    assert main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "s")]) == 0
    record = json.loads((tmp_path / "s" / "sample_config.json").read_text())
    assert (record["n"], record["steps"], record["eta"]) == (3, 2, 1.0)


def test_a_run_of_another_command_is_never_overwritten(tmp_path, capsys, monkeypatch):
    """--out naming another command's run is refused before any work, with the directory left as it was;
    runs made before marks are recognised by their config.json / metrics.json."""
    from condiff.cli.common import run_kind

    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert run_kind(run) == "condiff train" and (run / ".condiff-run").read_text() == "condiff train\n"
    legacy = {"namm": {"data": {}, "mirror": {}}, "dual": {"data": {}, "dual": {}, "train": {}}}
    for name, cfg in legacy.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "samples").mkdir()
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    cases = [  # (command, --out, the command that wrote it)
        (["dual", "train", "--config", "examples/dual/fair_baseline.toml"], "namm", "condiff namm fit"),
        (["dual", "fair"], "dual", "condiff dual train"),
        (["pnp", "digits", "--ckpt", str(run), "--label", "3"], "dual", "condiff dual train"),
        (["namm", "fit", "--data", "brightness", "--quiet"], str(run), "condiff train"),
        (["solve", "--ckpt", str(run), "--operator", "inpaint-random"], "samples", "condiff sample"),
        (["train", *TINY], "samples", "condiff sample"),
        (["eval", "--ckpt", str(run), "--n", "4", "--steps", "2"], "samples", "condiff sample"),
        (["demo"], "samples", "condiff sample"),  # demo writes a `condiff train` run, and names itself
    ]
    # a training run inside another run: the two would overwrite each other's files
    for cmd in (["train", *TINY], ["namm", "fit", "--data", "brightness", "--quiet"],
                ["dual", "train", "--config", "examples/dual/fair_baseline.toml"]):  # "condiff dual train" too
        assert main([*cmd, "--out", str(run / "checkpoints")]) == 2
        assert f"lies inside {run}, the run of `condiff train`" in capsys.readouterr().err
    here = Path.cwd()
    monkeypatch.chdir(run / "checkpoints")  # the same, named from inside the run
    assert main(["train", *TINY, "--out", "sub"]) == 2
    assert f"lies inside {run}, the run of `condiff train`" in capsys.readouterr().err
    monkeypatch.chdir(here)
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--out", str(run / "checkpoints")]) == 2  # was written
    assert f"--out {run / 'checkpoints'} is a run's folder of checkpoints" in capsys.readouterr().err
    monkeypatch.chdir(run / "model")  # inside a model directory, which is replaced whole when saved again
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--out", "sub"]) == 2
    assert f"lies inside {run / 'model'}, a model checkpoint directory" in capsys.readouterr().err
    monkeypatch.chdir(here)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for cmd, out, other in cases:
        assert main([*cmd, "--out", str(tmp_path / out)]) == 2, cmd
        err = capsys.readouterr().err
        this = " ".join(cmd[:2]) if cmd[0] in ("dual", "pnp", "namm") else cmd[0]
        assert f"holds the output of `{other}`, which `condiff {this}` would overwrite" in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # the same command may write its own run again
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    # eval scores a run beside its model, or writes a directory of its own that others then refuse
    assert main(["eval", "--ckpt", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "ev")]) == 0
    assert run_kind(tmp_path / "ev") == "condiff eval"
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["ckpt"] == str(run)
    capsys.readouterr()
    assert main(["solve", "--ckpt", str(run), "--operator", "inpaint-random", "--out", str(tmp_path / "ev")]) == 2
    assert "holds the output of `condiff eval`" in capsys.readouterr().err


def test_config_resolution_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[data]\nname = "toy2d"\nkind = "rings"\n[train]\nsteps = 7\nlr = 0.5\n')
    cfg = resolve(None, f, ["train.lr=0.25", "sample.eta=0"])
    assert cfg["data"] == {"name": "toy2d", "kind": "rings"}
    assert cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == 0.25 and cfg["sample"]["eta"] == 0
    assert cfg["model"]["name"] == "mlp"  # preset of the data set named in the file
    assert parse_override("data.kind=moons") == (["data", "kind"], "moons")
    assert parse_override("model.mults=[1, 2]") == (["model", "mults"], [1, 2])
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("steps=3")
    with pytest.raises(ConfigError, match="must be section.key"):  # a key too deep for the flat sections
        parse_override("train.lr.x=1")
    assert parse_override("mirror.psi.filters=8", ("mirror",), nested=True) == (["mirror", "psi", "filters"], 8)
    for given in (resolve("digits", None, ["data.name=toy2d"]),  # --set beats --data
                  resolve(None, None, ["data.name=digits", "data.name=toy2d"])):  # the last --set wins
        assert given["model"]["name"] == "mlp" and given["data"]["kind"] == "moons"  # the toy2d preset, whole
    bad = tmp_path / "bad.toml"
    bad.write_text("[trian]\nsteps = 3\n")
    with pytest.raises(ConfigError, match="unknown section"):
        resolve(None, bad, [])


@pytest.mark.parametrize("args, needle", [
    (["train", "--data", "/no/such/file.npy", "--out", "{tmp}/x"], "data file /no/such/file.npy does not exist"),
    (["train", "--data", "toy2d", "--set", "train.steps=0", "--out", "{tmp}/x"], "train.steps must be an integer >= 1"),
    (["train", "--data", "toy2d", "--set", "train.stpes=3", "--out", "{tmp}/x"], "unknown training option"),
    (["train", "--data", "toy2d", "--set", "model.name=resnet9", "--out", "{tmp}/x"], "unknown net"),
    (["train", "--data", "toy2d", "--set", "train.lr=abc", "--out", "{tmp}/x"], "train.lr expects a number"),
    (["train", "--data", "toy2d", "--set", "train.progress=1", "--out", "{tmp}/x"], "expects true or false"),
    (["train", "--data", "toy2d", "--config", "{tmp}/missing.toml"], "config file not found"),
    (["sample", "--ckpt", "{tmp}/nothing"], "does not exist"),
    (["sample", "--ckpt", "{tmp}", "--n", "2"], "not a condiff checkpoint"),
    (["bench", "no-such-bench"], "unknown benchmark"),
    (["namm", "fit", "--data", "burgers", "--out", ""], "--out is empty: give a path"),  # was: the default --out
    (["namm", "fit"], "--data is required (brightness, burgers, kolmogorov, periodic, count, or a file)"),
    (["sample", "--ckpt", " "], "--ckpt is empty: give a path"),
    (["bench", "--list", "namm"], "--list takes no benchmark name"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-m", "condiff.cli.main", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert lines[0].startswith("condiff ")


def _snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_failing_train_leaves_the_run_as_it_was(trained, tmp_path, capsys):
    run = tmp_path / "run"
    trained(run)
    before = _snapshot(run)
    # everything is checked before --fresh discards the run, and before --resume rewrites config.json
    assert main(["train", "--data", str(tmp_path / "typo.npy"), "--out", str(run), "--fresh"]) == 2
    assert main(["train", *TINY, "--set", "train.grad_clip=-1", "--out", str(run), "--fresh"]) == 2
    assert main(["train", *TINY, "--set", "model.hidden=16", "--set", "train.steps=40", "--out", str(run),
                 "--resume"]) == 2
    # other data of the same shape would load the checkpoint and train on, silently, on another data set
    assert main(["train", *TINY, "--set", "data.kind=rings", "--set", "train.steps=40", "--out", str(run),
                 "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"data file {tmp_path / 'typo.npy'} does not exist" in err[0] and "train.grad_clip must be a" in err[1]
    assert "does not match the model" in err[2] and "of other shape" in err[2]
    assert "; the run was trained with other model settings (hidden: 32 -> 16): resume with the run's" in err[2]
    assert "was trained on other data (kind: " in err[3] and "-> 'rings'" in err[3]
    assert _snapshot(run) == before
    assert main(["train", *TINY, "--set", "train.steps=40", "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 40
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [30, 40]


def test_a_run_records_its_versions_everywhere_and_an_older_one_still_resumes(trained, tmp_path):
    from condiff import io

    run = tmp_path / "run"
    trained(run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    for f in [run, run / "model", *ckpts]:
        assert json.loads((f / "config.json").read_text())["versions"] == io.versions(), f
    # the versions are provenance, not settings: a run made by another release is reused and resumed
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "versions": {"condiff": "0.0.1", "torch": "2.0.0"}}))
    assert main(["train", *TINY, "--set", "train.steps=40", "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "config.json").read_text())["versions"] == io.versions()
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [30, 40]


@pytest.mark.parametrize("extra, needle", [
    (["--set", "train.steps=2.5"], "train.steps expects an integer"),
    (["--set", "train.ema_decay=nan"], "train.ema_decay must be a finite number"),
    (["--set", "train.ema_decay=1.5"], "train.ema_decay must be a number in [0, 1)"),
    (["--set", "train.betas=[0.9]"], "train.betas must be two numbers"),
    (["--set", "sample.n=0"], "sample.n must be an integer >= 1"),
    (["--set", "sample.foo=1"], "unknown sample setting"),
    (["--set", "schedule.foo=1"], "unknown schedule setting"),
    (["--set", "schedule.T=-1"], "schedule.T (the number of diffusion steps) must be"),
    (["--set", "data.foo=1"], "data set 'toy2d' has no setting"),
    (["--set", "data.split=test"], "data.split is not a setting"),
    (["--set", "train.device=cuda"], "train.device is not a config setting: pass --device"),
    (["--out", "{tmp}/a-file"], "is a file, not a directory"),
])
def test_bad_settings_are_refused_before_the_run_directory_is_made(tmp_path, capsys, extra, needle):
    (tmp_path / "a-file").write_text("")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out = ["--out", str(tmp_path / "run")] if "--out" not in extra else []
    assert main(["train", *TINY, *extra, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "run").exists()


def test_sample_refuses_meaningless_settings_before_sampling(trained, tmp_path, capsys):
    run = tmp_path / "run"
    trained(run)
    capsys.readouterr()
    for extra, needle in [(["--eta", "5"], "--eta must be a number in [0, 1]"),
                          (["--seed", str(2**64)], "--seed must be"),
                          (["--n", "0"], "--n must be an integer >= 1"),
                          (["--out", str(run / "config.json")], "is a file")]:
        assert main(["sample", "--ckpt", str(run), *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not (run / "samples").exists()
    assert main(["eval", "--ckpt", str(run), "--n", "1"]) == 2
    assert "--n must be >= 2" in capsys.readouterr().err
    # an output that cannot be replaced is found before anything is written (a directory in a file's place)
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    (tmp_path / "s" / "sample_config.json").unlink()
    (tmp_path / "s" / "sample_config.json").mkdir()
    before = _snapshot(tmp_path / "s")
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s")]) == 2
    assert "sample_config.json is a directory: move it away; nothing was written" in capsys.readouterr().err
    assert _snapshot(tmp_path / "s") == before


def test_the_trust_record_keeps_a_files_last_eight_versions_and_trusts_only_python_files(tmp_path, monkeypatch):
    """Switching back to a version of a file one ran (another branch) finds it still trusted, until eight others have
    run since; `trust_file` takes a Python file that is there, nothing else."""
    from condiff.userfile import UntrustedCode, load_from_file, trust_file

    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    file, versions = tmp_path / "con.py", [f"def c(x):\n    return x  # version {i}\n" for i in range(9)]
    for text in versions[:2]:
        file.write_text(text)
        load_from_file(file, "c")  # named by the user: trusted as it is
    file.write_text(versions[0])
    load_from_file(file, "c", saved_by="the model at m")
    for text in versions[2:]:
        file.write_text(text)
        load_from_file(file, "c")
    file.write_text(versions[0])
    with pytest.raises(UntrustedCode, match="it was edited since condiff last ran it"):
        load_from_file(file, "c", saved_by="the model at m")
    (tmp_path / "notes.txt").write_text("c = 1\n")
    with pytest.raises(ValueError, match=r"notes.txt is no Python file \(.py\)"):
        trust_file(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"gone.py does not exist"):
        trust_file(tmp_path / "gone.py")


def test_trust_takes_a_file_as_other_commands_spell_it_and_forget_asks_for_files(tmp_path, monkeypatch, capsys):
    """`condiff trust net.py:SmallConvNet` (the spelling --set model.name uses) said the file does not exist, and a
    bare --forget was told to name files "to trust"."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text("class SmallConvNet:\n    pass\n")
    assert main(["trust", f"{tmp_path / 'net.py'}:SmallConvNet"]) == 0
    assert capsys.readouterr().out.startswith(f"trusted {tmp_path / 'net.py'} (SHA-256 ")
    assert main(["trust", "--forget"]) == 2
    assert "--forget needs the files to stop trusting" in capsys.readouterr().err
    assert main(["trust", "--forget", f"{tmp_path / 'net.py'}:SmallConvNet"]) == 0
    assert capsys.readouterr().out == f"forgot {tmp_path / 'net.py'}\n"


def test_a_cache_where_trust_cannot_be_recorded_still_runs_the_files_one_names(tmp_path, monkeypatch, capsys):
    from condiff import io

    def read_only(*a, **kw):  # a read-only cache (the tests run as root, which writes anywhere)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(io, "waiting_lock", read_only)
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "c1"))  # where the file is not recorded yet
    own = f"{Path(__file__).resolve().parents[1] / 'examples' / 'own_net' / 'net.py'}:SmallConvNet"
    assert main(["train", "--data", "toy2d", "--set", f"model.name={own}", "--set", "train.steps=1", "--out",
                 str(tmp_path / "r")]) == 2  # ran (a conv net on 2-D points), then refused by the check
    err = capsys.readouterr().err
    assert re.search(r"warning: .*net.py runs, but cannot be recorded as trusted in .*trusted_code.json", err)
    assert "fails on two training samples" in err
    assert main(["trust", own.rpartition(":")[0]]) == 2
    assert capsys.readouterr().err.strip().startswith("condiff trust: error: cannot write the trust record")
    monkeypatch.undo()
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "c2"))
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / "trusted_code.json").write_text('{"broken')
    from condiff.userfile import _trusted

    with pytest.warns(UserWarning, match=r"the trust record .*trusted_code.json cannot be read"):
        assert _trusted() == {}


def test_a_resumed_run_keeps_its_schedule_and_budget_and_demo_checks_before_training(trained, tmp_path, capsys):
    run = tmp_path / "run"
    trained(run)
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--set", "schedule.kind=cosine", "--out", str(run), "--resume"]) == 2
    assert "was trained with another noise schedule (kind: 'linear' -> 'cosine')" in capsys.readouterr().err
    # a shorter schedule on the recorded settings: named as such, not as the recorded sampler's 10 steps > T
    assert main(["train", "--out", str(run), "--resume", "--set", "schedule.T=5", "--set", "train.steps=40"]) == 2
    assert "was trained with another noise schedule (T: 50 -> 5)" in capsys.readouterr().err
    assert main(["train", *TINY, "--set", "train.steps=10", "--out", str(run), "--resume"]) == 2
    assert "is at step 30, beyond the 10 steps asked for" in capsys.readouterr().err
    assert _snapshot(run) == before
    # the same schedule with its defaults written out is the same schedule
    assert main(["train", *TINY, "--set", "schedule.beta_start=0.0001", "--set", "schedule.beta_end=0.02",
                 "--set", "train.steps=31", "--out", str(run), "--resume"]) == 0
    # a sampler budget beyond the schedule was saved, and failed every later `condiff sample`
    assert main(["train", *TINY, "--set", "sample.steps=51", "--out", str(tmp_path / "r2")]) == 2
    assert "sample.steps must be <= schedule.T = 50" in capsys.readouterr().err
    assert main(["demo", *TINY, "--set", "sample.n=1", "--out", str(tmp_path / "d")]) == 2
    assert "sample.n must be >= 2" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["train", *TINY, "--set", "data.name=", "--out", str(tmp_path / "r3")]) == 2
    assert "data.name must name a data set or a file, got ''" in capsys.readouterr().err


def test_user_npy_data(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "pts.npy", rng.normal(size=(256, 3)).astype(np.float32) * 0.3)
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "pts.npy"), "--set", "model.hidden=16",
            "--set", "model.depth=1", "--set", "train.steps=5", "--set", "train.progress=false",
            "--set", "schedule.T=20", "--out", str(run)]
    assert main(args) == 0
    assert main(["eval", "--ckpt", str(run), "--n", "32", "--steps", "4"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["reference"] == "training data (no test split)"
    bad = tmp_path / "nan.npy"
    np.save(bad, np.array([[0.0, np.nan]], dtype=np.float32))
    assert main(["train", "--data", str(bad), "--set", "model.name=mlp", "--out", str(tmp_path / "r2")]) == 2


def test_train_on_a_data_file_defaults_to_a_run_named_after_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32) * 0.3)
    assert main(["train", "--data", "pts.npy", "--set", "model.hidden=16", "--set", "model.depth=1",
                 "--set", "train.steps=2", "--set", "train.progress=false", "--set", "schedule.T=20"]) == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["pts"]  # runs/<data>, not runs/pts.npy
    assert (tmp_path / "runs" / "pts" / "model").is_dir()


def test_class_conditional_train_and_sample(tmp_path, capsys):
    """Two labelled clusters at -0.6 and +0.6: --label draws from the one asked for, classifier-free
    guidance too; flags a model cannot honour are refused in one line."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 512)
    x = (np.where(y[:, None] == 1, 0.6, -0.6) + 0.05 * rng.normal(size=(512, 2))).astype(np.float32)
    np.savez(tmp_path / "two.npz", x=x, y=y)
    run = tmp_path / "run"
    common = ["--set", "model.hidden=64", "--set", "model.depth=2", "--set", "train.steps=600",
              "--set", "train.progress=false", "--set", "train.lr=2e-3", "--set", "schedule.T=50"]
    assert main(["train", "--data", str(tmp_path / "two.npz"), "--set", "data.labels=true",
                 "--set", "train.label_drop=0.2", *common, "--out", str(run)]) == 0
    assert json.loads((run / "model" / "config.json").read_text())["label_drop"] == 0.2
    for label, scale in ((0, "0"), (1, "0"), (1, "2")):
        out = tmp_path / f"s{label}{scale}"
        assert main(["sample", "--ckpt", str(run), "--n", "200", "--steps", "20", "--label", str(label),
                     "--guidance-scale", scale, "--out", str(out)]) == 0
        mean = np.load(out / "samples.npz")["x"].mean(0)
        assert np.all(np.abs(mean - (0.6 if label else -0.6)) < 0.15), (label, scale, mean)
        assert json.loads((out / "sample_config.json").read_text())["label"] == label
        assert np.all(np.load(out / "samples.npz")["y"] == label)
    # eval --label scores the class against that class's held-out samples (here halves of its training data)
    assert main(["eval", "--ckpt", str(run), "--label", "1", "--n", "100", "--steps", "20",
                 "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["label"] == 1 and m["reference"] == "training data (no test split), class 1"
    assert "two.npz has no test split: the samples are scored against half of its training data" in \
        capsys.readouterr().err
    from condiff.evaluate import evaluate_samples
    drawn = torch.from_numpy(np.load(tmp_path / "ev" / "samples.npz")["x"])
    wrong = evaluate_samples(drawn, {"name": str(tmp_path / "two.npz"), "label": 0})  # scored as the other class
    assert m["mmd_n"] == 100 and wrong["mmd_ratio"] > 20 * m["mmd_ratio"], (m["mmd_ratio"], wrong["mmd_ratio"])
    capsys.readouterr()
    for extra, message in ((["--label", "2"], r"--label must lie in \[0, 2\)"),
                           (["--guidance-scale", "1"], "--guidance-scale needs --label")):
        assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2", *extra]) == 2
        assert re.search(message, capsys.readouterr().err)
    plain = tmp_path / "plain"  # labels, but no label drop: no guidance, and unlabelled sampling warns
    assert main(["train", "--data", str(tmp_path / "two.npz"), "--set", "data.labels=true", *common[:2],
                 "--set", "train.steps=2", "--set", "schedule.T=50", "--out", str(plain)]) == 0
    assert main(["sample", "--ckpt", str(plain), "--n", "4", "--steps", "2", "--label", "0",
                 "--guidance-scale", "1"]) == 2
    assert "trained with label drop" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(plain), "--n", "4", "--steps", "2"]) == 0
    assert "without label drop" in capsys.readouterr().err
    np.save(tmp_path / "nolabels.npy", x)
    assert main(["train", "--data", str(tmp_path / "nolabels.npy"), "--set", "data.labels=true",
                 "--out", str(tmp_path / "r3")]) == 2
    assert "holds no labels" in capsys.readouterr().err
    for file, labels, setting, message in (
            ("neg.npz", y - 1, "true", "labels must be class indices 0 .. K-1, got values down to -1"),
            ("far.npz", y * 10**6, "true", "labels reach 1000000 but only 2 distinct values occur"),
            ("str.npz", np.where(y == 1, "cat", "dog"), "true", "labels must be integers, got dtype <U3"),
            ("two.npz", y, "no", "data.labels must be true or false, got 'no'")):
        np.savez(tmp_path / file, x=x, y=labels)
        assert main(["train", "--data", str(tmp_path / file), "--set", f"data.labels={setting}",
                     "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err, file
        assert not (tmp_path / "bad" / "config.json").exists()
    unlabelled = tmp_path / "unlabelled"
    assert main(["train", "--data", str(tmp_path / "nolabels.npy"), *common[:2], "--set", "train.steps=2",
                 "--set", "schedule.T=50", "--out", str(unlabelled)]) == 0
    assert main(["sample", "--ckpt", str(unlabelled), "--n", "4", "--steps", "2", "--label", "0"]) == 2
    assert "takes no labels" in capsys.readouterr().err


def test_eval_refuses_too_little_held_out_data_before_sampling(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "few.npz", x_train=rng.normal(size=(64, 3)).astype(np.float32) * 0.3,
             x_test=np.zeros((1, 3), np.float32))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "few.npz"), "--set", "model.hidden=16", "--set", "model.depth=1",
                 "--set", "train.steps=2", "--set", "train.progress=false", "--set", "schedule.T=20",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    import condiff.cli.evaluate as evaluate

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the check")

    monkeypatch.setattr(evaluate, "draw_samples", no_sampling)
    assert main(["eval", "--ckpt", str(run), "--n", "8", "--steps", "2"]) == 2
    assert "too little data to score samples against: 1 held-out" in capsys.readouterr().err
    assert not (run / "samples.npz").exists() and not (run / "metrics.json").exists()


def test_demo_trains_once_then_reuses(tmp_path, capsys):
    args = ["demo", "--data", "toy2d", "--out", str(tmp_path / "demo"), *TINY[2:]]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "training on toy2d" in first.err and "MMD ratio" in first.out  # a note, and the results
    for f in ("samples.png", "loss.png", "metrics.json", "model/model.safetensors", "config.json"):
        assert (tmp_path / "demo" / f).is_file(), f
    listed = [Path(line.split()[-1]) for line in first.out.splitlines() if str(tmp_path / "demo") + os.sep in line]
    assert len(listed) == 4 and all(p.exists() for p in listed), listed  # (no class picture: toy2d has no classes)
    mtime = (tmp_path / "demo" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert "reusing the trained model" in capsys.readouterr().err
    assert (tmp_path / "demo" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    assert main([*args, "--set", "sample.steps=4"]) == 0  # a sampling setting applies to the reused model
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["sample_steps"] == 4
    assert (tmp_path / "demo" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    # a changed training setting means a new model, not a stale one; but the old one is not discarded
    # unless asked (a `condiff train` run given as --out was deleted without a word)
    before = _snapshot(tmp_path / "demo")
    assert main([*args, "--set", "train.steps=31"]) == 2
    assert "holds a model trained with other settings (changed: train.steps); pass --retrain" in \
        capsys.readouterr().err
    assert _snapshot(tmp_path / "demo") == before
    assert main([*args, "--set", "train.steps=31", "--retrain"]) == 0
    assert "training on toy2d" in capsys.readouterr().err
    # --retrain replaces a model of another architecture (its checkpoints would not load)
    assert main([*args, "--set", "train.steps=31", "--set", "model.hidden=48", "--retrain"]) == 0
    assert "training on toy2d" in capsys.readouterr().err
    assert json.loads((tmp_path / "demo" / "model" / "config.json").read_text())["net"]["hidden"] == 48
    # bookkeeping options (progress bars, checkpoint cadence) do not call for a new model
    assert main([*args, "--set", "train.steps=31", "--set", "model.hidden=48", "--set", "train.ckpt_every=7"]) == 0
    assert "reusing the trained model" in capsys.readouterr().err
    # interrupted while sampling with new settings: the run's settings stay those of the results beside them
    # (config.json took the new ones), and the hint says the model is reused (it said training resumes)
    import condiff.cli.demo as demo

    before = _snapshot(tmp_path / "demo")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    real, demo.evaluate_run = demo.evaluate_run, interrupted
    try:
        assert main([*args, "--set", "train.steps=31", "--set", "model.hidden=48", "--set", "sample.steps=5"]) == 130
    finally:
        demo.evaluate_run = real
    assert "condiff: interrupted; run the same command again: it reuses the trained model" in capsys.readouterr().err
    assert _snapshot(tmp_path / "demo") == before


def test_demo_interrupted_during_training_resumes_where_it_stopped(tmp_path, capsys):
    run = tmp_path / "demo"
    args = ["demo", *TINY, "--set", "train.ckpt_every=10", "--out", str(run)]
    assert main(args) == 0
    # what a Ctrl-C after the step-20 checkpoint leaves: no model, checkpoints up to step 20
    shutil.rmtree(run / "model")
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert newest.name.endswith("30")
    shutil.rmtree(newest)
    capsys.readouterr()
    assert main(args) == 0  # "run the same command again: training resumes where it stopped"
    assert "resumed from step 20 of 30" in capsys.readouterr().err  # a note: stdout keeps the results
    assert json.loads((run / "model" / "config.json").read_text())["steps"] == 30
    # a finished run resumed says it is finished, not "resumed from step 30 of 30"
    assert main(["train", *TINY, "--set", "train.ckpt_every=10", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "the run is already trained (30 of 30 steps): its model is saved again" in err and "resumed" not in err


def test_bench_list_names_every_benchmark_with_its_summary(capsys):
    from condiff.cli.bench import available

    assert main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [ln.split()[0] for ln in lines] == available() and len(available()) >= 8
    assert all(len(ln.split(maxsplit=1)[1]) > 20 for ln in lines)  # each has its docstring's first sentence


def test_bench_help_after_a_name_shows_what_that_benchmark_runs(capsys):
    from condiff.cli.bench import docstring

    assert main(["bench", "sampler_overhead", "--help"]) == 0  # the module's file name names it too
    assert "benchmarks/sampler_overhead.py:" in capsys.readouterr().out
    for argv, extra in ((["bench", "dual", "--help"], True), (["bench", "-h", "dual"], True),
                        (["bench", "--profile", "full", "dual", "-h"], True), (["bench", "--help"], False)):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "--no-record" in out  # the command's own help either way
        assert ("benchmarks/dual.py:" in out and docstring("dual").splitlines()[-1] in out) == extra


def test_options_are_not_abbreviated_and_unknown_ones_name_the_subcommand(capsys):
    # `--n` would have been read as `--no-baselines` and run without the baselines
    assert main(["namm", "assimilate", "--run", "nowhere", "--n"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["condiff namm assimilate: error: unrecognized option: --n (see condiff namm assimilate --help)"]
    assert main(["sample", "--ckpt", "nowhere", "--bogus", "1"]) == 2
    assert "condiff sample: error: unrecognized option: --bogus (see" in capsys.readouterr().err
    assert main(["train", "--bogus", "--other"]) == 2
    assert capsys.readouterr().err.strip() == ("condiff train: error: unrecognized options: --bogus --other "
                                               "(see condiff train --help)")
    # an unknown option's value was taken for the benchmark's name, and the real name called unrecognised
    assert main(["bench", "--out", "X", "sampler-overhead"]) == 2
    assert capsys.readouterr().err.strip() == ("condiff bench: error: unrecognized option: --out "
                                               "(see condiff bench --help)")
    assert main(["bench", "dual", "extra", "-1.5"]) == 2  # no options among them: the arguments are named
    assert capsys.readouterr().err.strip() == ("condiff bench: error: unrecognized arguments: extra -1.5 "
                                               "(see condiff bench --help)")


def test_output_into_a_closed_pipe_ends_quietly():
    """`condiff bench --list | head -1`: the reader goes away; no error message, exit 141 (as a shell's)."""
    proc = subprocess.Popen([sys.executable, "-m", "condiff.cli.main", "bench", "--list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command (which imports torch first) writes anything
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_bench_no_record_leaves_recorded_results_alone(tmp_path, monkeypatch, capsys):
    import condiff.cli.bench as bench

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "tiny.py").write_text(
        '"""A tiny benchmark. Second sentence."""\n'
        "PROFILES = {'quick': {}, 'full': {}}\n"
        "def run(profile, device):\n"
        "    return {'title': 'Tiny', 'columns': ['a'], 'rows': [{'a': 1.5}], 'notes': ['n']}\n"
    )
    monkeypatch.setattr(bench, "bench_dir", lambda: tmp_path / "benchmarks")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "tiny"]) == 0
    recorded = (tmp_path / "benchmarks" / "results" / "tiny-quick.json").read_text()
    table = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- bench:tiny -->" in table and "| 1.5 |" in table
    # another profile (the GPU's "full") gets its own section beside the quick one
    capsys.readouterr()
    assert main(["bench", "tiny", "--profile", "full"]) == 0
    assert ("warning: the full profile is sized for a GPU, and runs far longer on cpu; its recorded section (GPU "
            "figures) would be replaced by these: --no-record keeps it") in capsys.readouterr().err
    both = (tmp_path / "BENCHMARKS.md").read_text()
    assert both.startswith(table.rstrip()) and "<!-- bench:tiny/full -->" in both and "--profile full`" in both
    # recorded again, a section is replaced whole: one start and one end marker (a doubled end marker left
    # the file damaged for the next run)
    assert main(["bench", "tiny"]) == 0
    again = (tmp_path / "BENCHMARKS.md").read_text()
    assert again.count("<!-- bench:tiny -->") == 1 and again.count("<!-- /bench:tiny -->") == 1
    assert main(["bench", "tiny", "--profile", "qiuck"]) == 2  # an unknown profile records nothing
    assert (tmp_path / "BENCHMARKS.md").read_text() == again
    assert not (tmp_path / "benchmarks" / "results" / "tiny-qiuck.json").exists()
    recorded = (tmp_path / "benchmarks" / "results" / "tiny-quick.json").read_text()
    table = again[:again.index("<!-- bench:tiny/full -->")].rstrip() + "\n"
    (tmp_path / "BENCHMARKS.md").write_text(table)
    # a trial run writes its results under runs/ and touches neither the record nor the table
    assert main(["bench", "tiny", "--no-record"]) == 0
    assert "BENCHMARKS.md unchanged" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "bench-results" / "tiny-quick.json").read_text())["rows"] == [{"a": 1.5}]
    assert "`condiff bench tiny --profile quick --no-record` on" in (tmp_path / "runs" / "bench-results" /
                                                                     "tiny-quick.md").read_text()
    assert (tmp_path / "benchmarks" / "results" / "tiny-quick.json").read_text() == recorded
    assert (tmp_path / "BENCHMARKS.md").read_text() == table
    # so does a run that covered only part of its table (it marks itself partial)
    (tmp_path / "benchmarks" / "tiny.py").write_text(
        "def run(profile, device):\n"
        "    return {'title': 'Tiny', 'columns': ['a'], 'rows': [{'a': 2.5}], 'notes': [], 'partial': 'a only'}\n"
    )
    assert main(["bench", "tiny"]) == 0
    assert "partial run (a only), not recorded" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "bench-results" / "tiny-quick.json").read_text())["rows"] == [{"a": 2.5}]
    assert (tmp_path / "benchmarks" / "results" / "tiny-quick.json").read_text() == recorded
    assert (tmp_path / "BENCHMARKS.md").read_text() == table
    # Ctrl-C while it runs: said to have recorded nothing, which holds
    (tmp_path / "benchmarks" / "tiny.py").write_text("def run(profile, device):\n    raise KeyboardInterrupt\n")
    assert main(["bench", "tiny"]) == 130
    assert capsys.readouterr().err.strip() == ("condiff: interrupted; nothing was recorded (BENCHMARKS.md and "
                                               "benchmarks/results are as they were)")
    assert (tmp_path / "benchmarks" / "results" / "tiny-quick.json").read_text() == recorded
    assert (tmp_path / "BENCHMARKS.md").read_text() == table


def test_a_bench_table_escapes_a_bar_in_its_cells():
    """A column named "max |diff|" split the header into one cell more than the delimiter row: no table."""
    from condiff.cli.bench import to_markdown

    md = to_markdown({"title": "T", "name": "t", "profile": "quick", "machine": "m", "date": "d", "seconds": 1.0,
                      "columns": ["a", "max |diff|"], "rows": [{"a": "x|y", "max |diff|": 0.5}]})
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert rows[0] == "| a | max \\|diff\\| |" and rows[2] == "| x\\|y | 0.5 |"
    assert {len(re.findall(r"(?<!\\)\|", ln)) for ln in rows} == {3}  # each row: two cells


def test_bench_refuses_a_damaged_table_before_it_runs(tmp_path, monkeypatch, capsys):
    import condiff.cli.bench as bench

    (tmp_path / "benchmarks").mkdir()
    ran = tmp_path / "ran"
    (tmp_path / "benchmarks" / "tiny.py").write_text(
        "def run(profile, device):\n"
        f"    open({str(ran)!r}, 'w').close()\n"
        "    return {'title': 'Tiny', 'columns': ['a'], 'rows': [{'a': 1.5}], 'notes': []}\n"
    )
    monkeypatch.setattr(bench, "bench_dir", lambda: tmp_path / "benchmarks")
    monkeypatch.chdir(tmp_path)
    # an end marker before its start (a hand edit) would splice the table into the wrong place
    damaged = "# Benchmarks\n\n<!-- /bench:tiny -->\nkeep me\n<!-- bench:tiny -->\n"
    (tmp_path / "BENCHMARKS.md").write_text(damaged)
    assert main(["bench", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "markers of section 'tiny' are damaged" in err and len(err.strip().splitlines()) == 1
    assert not ran.exists() and not (tmp_path / "benchmarks" / "results").exists()
    assert (tmp_path / "BENCHMARKS.md").read_text() == damaged
    # an unwritable place for the results is found before the run too (it was found after it, hours later)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "runs" and real_access(p, mode))
    (tmp_path / "runs").mkdir()
    assert main(["bench", "tiny", "--no-record"]) == 2 and not ran.exists()
    assert "bench: results to runs/bench-results: runs is not writable" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", real_access)
    # so are a file where the folder goes, and a place whose permission bits say yes but where nothing can be
    # made (/proc, a read-only mount): both were found after the run
    (tmp_path / "runs").rmdir()
    (tmp_path / "runs").write_text("a file")
    assert main(["bench", "tiny", "--no-record"]) == 2 and not ran.exists()
    assert "bench: results to runs/bench-results: runs is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "runs").unlink()
    (tmp_path / "runs").mkdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if Path(dir).name == "runs":
            raise OSError(30, "Read-only file system")
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["bench", "tiny", "--no-record"]) == 2 and not ran.exists()
    assert ("bench: results to runs/bench-results: runs cannot be written (Read-only file system)"
            in capsys.readouterr().err)
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    # a file where the trial folder goes (not only above it), and a dangling link on the way
    (tmp_path / "runs" / "bench-results").write_text("a file")
    assert main(["bench", "tiny", "--no-record"]) == 2 and not ran.exists()
    assert "bench: results to runs/bench-results is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "runs" / "bench-results").unlink()
    (tmp_path / "runs" / "bench-results").symlink_to(tmp_path / "nowhere")
    assert main(["bench", "tiny", "--no-record"]) == 2 and not ran.exists()
    assert "bench: results to runs/bench-results is a link to nothing" in capsys.readouterr().err
    (tmp_path / "runs" / "bench-results").unlink()
    # a run given bench's trial folder as its --out is not written into
    (tmp_path / "runs" / "bench-results").mkdir()
    (tmp_path / "runs" / "bench-results" / ".condiff-run").write_text("condiff train")
    assert main(["bench", "tiny", "--no-record"]) == 2 and not ran.exists()
    assert "runs/bench-results holds a run of `condiff train`, where bench writes" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "runs" / "bench-results")
    # a trial run does not touch the table, so it runs
    assert main(["bench", "tiny", "--no-record"]) == 0 and ran.exists()
    # another section's markers are no concern of this one's
    (tmp_path / "BENCHMARKS.md").write_text(damaged.replace("tiny", "other"))
    assert main(["bench", "tiny"]) == 0
    table = (tmp_path / "BENCHMARKS.md").read_text()
    assert table.startswith(damaged.replace("tiny", "other")) and "<!-- bench:tiny -->" in table
    # the md beside the json and the section of BENCHMARKS.md are the same text
    md = (tmp_path / "benchmarks" / "results" / "tiny-quick.md").read_text()
    assert f"<!-- bench:tiny -->\n{md}<!-- /bench:tiny -->" in table


def test_the_recorded_tables_match_their_results_files():
    """Each section of BENCHMARKS.md is the md file beside its results json, and both say the same run
    (a hand edit of one of them, or a write that stopped between them, shows here)."""
    import re
    from pathlib import Path

    from condiff.cli.bench import to_markdown

    root = Path(__file__).resolve().parents[1]
    text = (root / "BENCHMARKS.md").read_text()
    sections = re.findall(r"<!-- bench:(\S+) -->\n(.*?)<!-- /bench:\1 -->", text, re.S)
    assert len(sections) >= 10
    for key, body in sections:
        name, _, profile = key.partition("/")
        stem = root / "benchmarks" / "results" / f"{name}-{profile or 'quick'}"
        assert (stem.with_suffix(".md")).read_text() == body, key
        res = json.loads(stem.with_suffix(".json").read_text())
        assert (res["name"], res["profile"]) == (name, profile or "quick") and to_markdown(res) == body, key


def test_a_source_tree_reads_its_version_from_pyproject():
    from pathlib import Path

    import condiff

    text = (Path(condiff.__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert condiff._source_version() == re.search(r'^version = "(.+)"', text, re.MULTILINE).group(1)
    assert condiff._source_version().count(".") >= 2


def test_version(capsys):
    import condiff

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"condiff {condiff.__version__}"
    assert condiff.__version__.count(".") >= 2


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--ckpt", "r", "--n", "4.5"], "condiff sample: error: argument --n: invalid int value: '4.5'"),
    (["namm", "sample"], "condiff namm sample: error: the following arguments are required: --run"),
])
def test_a_bad_flag_is_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(needle) and "--help" in err[0]


def test_sample_clip_takes_a_number_or_a_pair():
    from condiff.cli.config import check_sample

    assert check_sample({"clip_x0": [0, 5]})["clip_x0"] == [0, 5]
    assert check_sample({"clip_x0": 2.0})["clip_x0"] == 2.0
    for bad in ([5, 0], [0, 1, 2], -1.0):
        with pytest.raises(ConfigError, match="sample.clip_x0 must be"):
            check_sample({"clip_x0": bad})


def test_a_config_file_gets_the_type_checks_of_set(tmp_path):
    from condiff.cli.namm import resolve as resolve_namm

    f = tmp_path / "c.toml"
    for text, needle in (('[sample]\nsteps = "10"\n', "setting sample.steps expects a number"),
                         ("[sample]\nsteps = 2.5\n", "setting sample.steps expects an integer"),
                         ("[model]\ndepth = true\n", "setting model.depth expects a number")):
        f.write_text('[data]\nname = "toy2d"\n' + text)
        with pytest.raises(ConfigError, match=re.escape(f"{f}: {needle}")):
            resolve(None, f, [])
    for text, needle in (('[loss]\nl_con = "1"\n', "setting loss.l_con expects a number"),
                         ("[data]\nseed = 1.5\n", "setting data.seed expects an integer"),
                         ("[mirror]\npsi = 3\n", "mirror.psi must be a table")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(f"{f}: ") + ".*" + re.escape(needle)):
            resolve_namm("periodic", "quick", f)
    f.write_text("[loss]\nl_con = 3\n[data]\nsize = 16\n")  # an integer where a number is wanted is fine
    cfg = resolve_namm("periodic", "quick", f)
    assert cfg["loss"]["l_con"] == 3 and cfg["data"]["size"] == 16


def test_a_mirror_model_is_not_sampled_as_data_and_metrics_are_valid_json(trained, tmp_path, capsys):
    """A NAMM run's mirror DM (trained on g(x)) loaded as a plain model returned mirror-space samples."""
    run = tmp_path / "namm" / "mdm"
    trained(run)
    cfg = json.loads((run / "model" / "config.json").read_text())
    (run / "model" / "config.json").write_text(json.dumps({**cfg, "stage": "mdm"}))
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "is a NAMM mirror diffusion model" in err and "in Python, use condiff.mirror.mirror_generate" in err
    (run / "stage.json").write_text("{}")  # a stage of `condiff namm`; it, and a checkpoint of it, name the run
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s")]) == 2
    assert f"condiff namm sample --run {tmp_path / 'namm'}`" in capsys.readouterr().err
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "stage": "mdm"}))
    assert main(["sample", "--ckpt", str(ckpt), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s")]) == 2
    assert f"condiff namm sample --run {tmp_path / 'namm'}`" in capsys.readouterr().err
    from condiff import io
    io.write_json_atomic(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor(2.5)})
    text = (tmp_path / "m.json").read_text()  # a bare NaN is not JSON; inf stays (a box's hi = inf, say)
    assert json.loads(text) == {"a": None, "b": [1.0, float("inf")], "c": 2.5} and "NaN" not in text


@pytest.mark.parametrize("device", ["meta", "xpu", "nosuch"])
def test_devices_that_cannot_run_a_model_are_refused_by_name(tmp_path, capsys, device):
    assert main(["train", *TINY, "--device", device, "--out", str(tmp_path / "r")]) == 2
    assert f"--device {device} is not supported here (cpu, cuda, cuda:N)" in capsys.readouterr().err


def test_mps_is_refused_with_the_reason(tmp_path, capsys):
    """--device mps passed the check and failed at the first step: its schedules are float64, which MPS lacks."""
    assert main(["train", *TINY, "--device", "mps", "--out", str(tmp_path / "r")]) == 2
    assert "--device mps is not supported: condiff's schedules are float64, which MPS lacks" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_train_or_reuse_discards_other_settings_only_in_a_directory_of_its_own(trained, tmp_path, capsys):
    """A benchmark reusing the user's runs/demo deleted a model of other settings without a word."""
    from condiff.cli.common import train_or_reuse

    run = tmp_path / "run"
    trained(run)
    before = _snapshot(run)
    cfg = resolve("toy2d", None, [*TINY[3::2], "train.steps=31"]) | {"_device": "cpu"}
    with pytest.raises(FileExistsError, match=r"holds a model trained with other settings \(changed: train.steps\); "
                                              "move it away"):
        train_or_reuse(cfg, run)
    assert _snapshot(run) == before
    assert train_or_reuse(cfg, run, own=True)[1] is False  # a benchmark's own directory: retrained
    assert json.loads((run / "model" / "config.json").read_text())["steps"] == 31
    assert train_or_reuse(cfg, run) == (0.0, True)
    # a setting that keeps the step count (the learning rate): trained again from step 0, not resumed from
    # the finished checkpoint of the old settings, whose weights were kept as they were
    weights = (run / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    lr = resolve("toy2d", None, [*TINY[3::2], "train.steps=31", "train.lr=0.0005"]) | {"_device": "cpu"}
    assert train_or_reuse(lr, run, own=True)[1] is False
    assert "resumed from" not in capsys.readouterr().out
    assert (run / "model" / "model.safetensors").read_bytes() != weights


def test_a_hand_edited_run_is_reported_by_what_is_wrong_in_it(trained, tmp_path, capsys):
    run = tmp_path / "run"
    trained(run)
    cfg = json.loads((run / "config.json").read_text())
    capsys.readouterr()
    for sample, needle in (({**cfg["sample"], "n": -4}, "sample.n must be an integer >= 1, got -4"),  # was "--n"
                           ("x", "has a [sample] entry that is not a table: 'x'")):
        (run / "config.json").write_text(json.dumps({**cfg, "sample": sample}))
        assert main(["sample", "--ckpt", str(run), "--steps", "2", "--out", str(tmp_path / "s")]) == 2
        assert needle in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "model" / "config.json").unlink()
    assert main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "s")]) == 2
    assert "is a run directory with a model/ without its config.json" in capsys.readouterr().err


def test_a_bare_model_of_a_short_schedule_samples_with_at_most_its_steps(trained, tmp_path, capsys):
    """A bare model (no run settings) took the default 100 sampler steps, beyond a 50-step schedule."""
    run = tmp_path / "run"
    trained(run)
    shutil.copytree(run / "model", tmp_path / "bare")
    assert main(["sample", "--ckpt", str(tmp_path / "bare"), "--n", "4", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "sample_config.json").read_text())["steps"] == 50
    assert main(["sample", "--ckpt", str(run / "model"), "--n", "4", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "sample_config.json").read_text())["steps"] == 10  # the run's sample.steps


def test_eval_that_fails_to_score_leaves_the_earlier_samples_and_metrics_together(tmp_path, capsys, monkeypatch):
    """Samples were written before scoring: a scoring error left new samples beside old metrics."""
    import condiff.cli.evaluate as ev

    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert main(["eval", "--ckpt", str(run), "--n", "20", "--steps", "3"]) == 0
    before = _snapshot(run)
    capsys.readouterr()

    def fails(*args, **kwargs):
        raise ValueError("scoring failed")

    monkeypatch.setattr(ev, "evaluate_samples", fails)  # found after sampling
    assert main(["eval", "--ckpt", str(run), "--n", "30", "--steps", "3"]) == 2
    assert "scoring failed" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_eval_of_constant_data_reports_the_mmd_as_unavailable(tmp_path, capsys):
    """Held-out data all identical set no MMD bandwidth: eval failed after sampling, losing every other figure."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    np.save(tmp_path / "const.npy", np.zeros((64, 2), np.float32))
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--n", "30", "--steps", "3", "--data", str(tmp_path / "const.npy"),
                 "--out", str(tmp_path / "ev")]) == 0
    assert "no MMD: the held-out data are all identical" in capsys.readouterr().err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["mmd"] is None and m["mmd_ratio"] is None and "all identical" in m["mmd_unavailable"]
    assert m["sliced_w2"] > 0


def test_fresh_removes_the_old_models_results_with_it(trained, tmp_path):
    """Samples and metrics drawn from the old model stayed beside the new one after --fresh."""
    run = tmp_path / "run"
    trained(run)
    assert main(["eval", "--ckpt", str(run), "--n", "8", "--steps", "2"]) == 0
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2"]) == 0
    assert main(["eval", "--ckpt", str(run), "--n", "8", "--steps", "2", "--out", str(run / "eval")]) == 0
    assert (run / "metrics.json").is_file() and (run / "samples" / "samples.npz").is_file()
    (run / "notes.txt").write_text("mine")  # not the run's: kept
    assert main(["train", *TINY, "--out", str(run), "--fresh"]) == 0
    left = {p.name for p in run.iterdir()}
    assert not left & {"metrics.json", "samples.npz", "samples.png", "samples", "eval"}
    assert {"model", "notes.txt", "config.json"} <= left


def test_eval_into_a_folder_of_an_earlier_digits_eval_leaves_no_stale_class_picture(trained, tmp_path):
    """The class picture of an earlier eval stayed beside the results of one whose data have no classes."""
    run, out = tmp_path / "run", tmp_path / "ev"
    trained(run)
    out.mkdir()
    (out / "metrics.json").write_text('{"class_hist": [0.1]}')  # a digits model's eval, written here before
    (out / "class_hist.png").write_bytes(b"png")
    assert main(["eval", "--ckpt", str(run), "--n", "8", "--steps", "2", "--out", str(out)]) == 0
    assert "class_hist" not in json.loads((out / "metrics.json").read_text())
    assert not (out / "class_hist.png").exists()


def test_a_model_size_that_contradicts_the_data_is_refused_not_replaced(tmp_path, capsys):
    """--set model.dim=3 on 2-D data was replaced by 2 while the run's config.json kept 3."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--set", "model.name=mlp", "--set", "model.dim=3", "--out", str(run)]) == 2
    assert "model.dim = 3 but the data have 2: leave it out" in capsys.readouterr().err
    assert not run.exists()


def test_no_help_text_shows_rest_markup(capsys):
    """The help texts come from docstrings; their ``x`` and :func:`x` markup is stripped everywhere."""
    cmds = [[], ["train"], ["sample"], ["eval"], ["solve"], ["demo"], ["namm"], ["namm", "fit"], ["namm", "sample"],
            ["pnp"], ["pnp", "digits"], ["dual"], ["dual", "train"], ["dual", "toy"]]
    for cmd in cmds:
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        text = capsys.readouterr().out
        assert text.startswith("usage: condiff") and "``" not in text and ":func:" not in text, cmd
    # a benchmark's --help prints its module docstring (namm's and dual's hold ``x`` markup)
    for name in ("namm", "dual", "guidance"):
        assert main(["bench", name, "--help"]) == 0
        text = capsys.readouterr().out
        assert f"benchmarks/{name}.py:" in text and "``" not in text and ":func:" not in text, name


def test_resume_without_data_or_config_takes_the_runs_recorded_settings(trained, tmp_path, capsys):
    """`condiff train --out R --resume` resolved the digits preset and refused R's own run ("trained on other
    data ... or pass --fresh"), though R/config.json holds its settings."""
    run = tmp_path / "run"
    trained(run)
    assert main(["train", "--out", str(run), "--resume", "--set", "train.steps=40"]) == 0
    assert f"--resume: the settings recorded in {run / 'config.json'}, with --set" in capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 40 and cfg["data"]["kind"] == "moons" and cfg["model"]["hidden"] == 32
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [30, 40]
    # naming other data still refuses, and says where the run's settings are and how to take them
    assert main(["train", "--data", "digits", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"(recorded in {run / 'config.json'}), or pass --fresh" in err
    assert "(--resume without --data and --config takes them from there)" in err
    # a --set of the wrong kind is checked against the recorded value
    assert main(["train", "--out", str(run), "--resume", "--set", "train.lr=abc"]) == 2
    assert "train.lr expects a number" in capsys.readouterr().err
    # other data by --set alone: refused, without the hint to leave out what was not given
    assert main(["train", "--out", str(run), "--resume", "--set", "data.kind=rings"]) == 2
    err = capsys.readouterr().err
    assert "was trained on other data" in err and "takes them from there" not in err
    # a damaged config.json is named, not read as "no settings" (the digits preset, then a shape error)
    (run / "config.json").write_text('{"data": ')
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: cannot read the run's settings: {run / 'config.json'} is not valid JSON" in err
    assert err.count("\n") == 1


def test_fresh_that_fails_keeps_the_run_it_was_to_replace(trained, tmp_path, capsys):
    """--fresh deleted the old model before the new training had even started: a failure (here a loss that
    blows up) lost both. The old run now waits in .replaced until a new one finishes."""
    run = tmp_path / "run"
    trained(run)
    model = {p.name: p.read_bytes() for p in (run / "model").iterdir()}
    config, log = (run / "config.json").read_text(), (run / "log.jsonl").read_text()
    capsys.readouterr()
    for _ in range(2):  # a second failed attempt does not push the kept run out
        assert main(["train", *TINY, "--set", "train.lr=1e30", "--out", str(run), "--fresh"]) != 0
        kept = run / ".replaced"
        assert f"--fresh: the run being replaced is kept in {kept} until this one finishes" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in (kept / "model").iterdir()} == model
        assert (kept / "config.json").read_text() == config and (kept / "checkpoints").is_dir()
        assert (kept / "log.jsonl").read_text() == log and not (run / "model").exists()
    # a plain run (no --fresh, no --resume) would have finished and deleted the kept run: refused
    assert main(["train", *TINY, "--out", str(run)]) == 2
    assert f"{kept} keeps the run an unfinished --fresh replaced: pass --fresh to replace it again, --resume " \
           "to go on with the replacement, or --restore to put it back" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (kept / "model").iterdir()} == model
    # going on with the replacement says that it will delete the kept run, and does once it finishes
    assert main(["train", "--out", str(run), "--resume", "--set", "train.lr=1e-3"]) == 0
    assert f"note: {kept} keeps the run an unfinished --fresh / --retrain replaced" in capsys.readouterr().err
    assert not kept.exists() and (run / "model").is_dir()


def test_a_resumed_run_that_trains_on_removes_the_old_models_results(trained, tmp_path, capsys, monkeypatch):
    """--resume left metrics.json, samples and eval/ of the old model beside the new one, as if they were its own."""
    run = tmp_path / "run"
    trained(run)
    assert main(["eval", "--ckpt", str(run), "--n", "4", "--steps", "2"]) == 0
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--steps", "2"]) == 0
    assert (run / "metrics.json").is_file() and (run / "samples").is_dir()
    assert main(["train", "--out", str(run), "--resume"]) == 0  # finished already: nothing trained, nothing goes
    assert (run / "metrics.json").is_file() and (run / "samples").is_dir()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--set", "train.steps=40"]) == 0
    assert "note: removed the results of the model this run replaced (metrics.json, samples.npz, " \
           "samples.png, samples)" in capsys.readouterr().err
    assert not any((run / n).exists() for n in ("metrics.json", "samples.npz", "samples.png", "samples"))
    # a Ctrl-C after the new model is saved (while its loss curve is drawn) left the old results beside it,
    # and the rerun, "resumed from step 60 of 60", never removed them: they now go before the model is saved
    assert main(["eval", "--ckpt", str(run), "--n", "4", "--steps", "2"]) == 0
    import condiff.cli.common as common

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "plot_loss_curve", ctrl_c)
    assert main(["train", "--out", str(run), "--resume", "--set", "train.steps=60"]) == 130
    assert json.loads((run / "model" / "config.json").read_text())["steps"] == 60
    assert not (run / "metrics.json").exists()


def test_results_written_into_a_run_wait_for_no_training_of_it(trained, tmp_path, capsys):
    """eval and sample write into the run while it is trained no more: a `train --fresh` started meanwhile
    found the old model's metrics.json and samples written beside its new model after it had set them aside."""
    run = tmp_path / "run"
    trained(run)
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2"]) == 0  # RUN/samples, marked as sample's
    (run / "figs").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from condiff import io; "
                               "io.lock_run(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        assert holder.stdout.readline().strip() == "held"  # a `condiff train` of this run, say
        for cmd in (["eval", "--ckpt", str(run)], ["sample", "--ckpt", str(run)],
                    ["sample", "--ckpt", str(run / "model"), "--out", str(run / "mine")]):
            assert main([*cmd, "--n", "4", "--steps", "2"]) == 75  # EX_TEMPFAIL: a script may try again later
            err = capsys.readouterr().err
            assert f"{run} is in use by another condiff process (pid {holder.pid})" in err and "\n" not in err.strip()
        assert not any((run / n).exists() for n in ("metrics.json", "mine"))
        cwd = os.getcwd()
        os.chdir(run / "figs")  # a relative --out from inside the run
        try:
            assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2", "--out", "s1"]) == 75
        finally:
            os.chdir(cwd)
        assert f"{run} is in use" in capsys.readouterr().err and not (run / "figs" / "s1").exists()
        # results written outside the run need no lock
        assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    finally:
        holder.kill()
        holder.wait()
    assert main(["eval", "--ckpt", str(run), "--n", "4", "--steps", "2"]) == 0


def test_results_written_into_any_training_run_wait_for_it(tmp_path):
    """Every command whose run holds trained models is waited for, dual's experiments (marked `condiff dual toy`,
    ...) and NAMM's included, not `condiff train` alone."""
    from condiff import io
    from condiff.cli.common import check_out_dir

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from condiff import io; "
                               "io.lock_run(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(io.__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        for kind in ("condiff dual train", "condiff dual toy", "condiff namm fit", "condiff train"):
            (run / io.RUN_MARK).write_text(kind)
            with pytest.raises(io.RunInUseError):
                check_out_dir(run / "samples", kind="condiff sample")
            io.release_runs()
        (run / io.RUN_MARK).write_text("condiff solve")  # results of a model: no training to wait for
        assert check_out_dir(run / "samples", kind="condiff sample") == run / "samples"
    finally:
        io.release_runs()
        holder.kill()
        holder.wait()


def test_sample_follows_its_seed_and_the_runs_clip(trained, tmp_path):
    """Found by the CLI mutation round: a fixed seed, or no clip, went unnoticed by every test."""
    run = tmp_path / "run"
    trained(run)

    def draw(out, *extra):
        assert main(["sample", "--ckpt", str(run), "--n", "8", "--steps", "3", "--out", str(tmp_path / out),
                     *extra]) == 0
        return np.load(tmp_path / out / "samples.npz")["x"]

    a, b, c = draw("a", "--seed", "1"), draw("b", "--seed", "1"), draw("c", "--seed", "2")
    assert np.array_equal(a, b) and not np.allclose(a, c)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "sample": {**cfg["sample"], "clip_x0": 0.2}}))
    assert np.abs(draw("d", "--eta", "0")).max() <= 0.2 + 1e-6  # the last step returns the clipped x0_hat


def test_resume_with_a_config_file_takes_the_files_settings(trained, tmp_path, capsys):
    run = tmp_path / "run"
    trained(run)
    recorded = json.loads((run / "config.json").read_text())
    f = tmp_path / "more.toml"
    f.write_text('[data]\nname = "toy2d"\n[train]\nsteps = 40\n')
    overrides = [a for a in TINY[2:] if a != "--set" and not a.startswith("train.steps")]
    args = ["train", "--config", str(f), "--out", str(run), "--resume"] + [x for o in overrides for x in ("--set", o)]
    capsys.readouterr()
    assert main(args) == 0
    assert "resumed from step 30 of 40" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 40 != recorded["train"]["steps"]


def test_demo_retrain_keeps_the_old_model_until_the_new_one_is_trained(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", *TINY, "--out", str(run)]) == 0
    model = {p.name: p.read_bytes() for p in (run / "model").iterdir()}
    assert main(["demo", *TINY, "--set", "train.lr=1e30", "--out", str(run), "--retrain"]) != 0
    assert {p.name: p.read_bytes() for p in (run / ".replaced" / "model").iterdir()} == model
    assert "--retrain: the run being replaced is kept in" in capsys.readouterr().err
    # a model in the run (of the failed attempt's settings, say) is not overwritten by the kept one
    shutil.copytree(run / ".replaced" / "model", run / "model")
    assert main(["demo", *TINY, "--out", str(run)]) == 2
    assert "holds a model trained with other settings" in capsys.readouterr().err
    assert (run / ".replaced" / "model").is_dir()
    shutil.rmtree(run / "model")
    # the command that trained the kept model, run again, puts it back instead of training it again
    assert main(["demo", *TINY, "--out", str(run)]) == 0
    assert "restored the model of these settings that an unfinished --retrain had set aside" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (run / "model").iterdir()} == model and not (run / ".replaced").exists()
    # the old model's results go with it (pnp's results beside the demo model, its default prior, stayed)
    for d in ("pnp/digits-3", "pnp_step_00000030/digits-3"):  # beside the model, and beside its checkpoint
        (run / d).mkdir(parents=True)
        (run / d / "metrics.json").write_text("{}")
    assert main(["demo", *TINY, "--out", str(run), "--retrain"]) == 0
    assert (run / "model").is_dir() and not (run / ".replaced").exists() and not (run / "pnp").exists()
    assert not (run / "pnp_step_00000030").exists()


def test_a_model_saved_from_python_without_its_shape_is_named_with_the_remedy(tmp_path, capsys):
    from condiff.models import save_model
    from condiff.nets import TimeMLP
    from condiff.schedule import Schedule

    cmd = ["sample", "--ckpt", str(tmp_path / "m"), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s")]
    save_model(tmp_path / "m", TimeMLP(2, hidden=8, depth=1), Schedule.linear(50))
    assert main(cmd) == 2
    assert "records no sample shape (a model saved from Python records it with condiff.models.save_model(..., " \
           "shape=[C, H, W]))" in capsys.readouterr().err
    save_model(tmp_path / "m", TimeMLP(2, hidden=8, depth=1), Schedule.linear(50), shape=[2])
    assert main(cmd) == 0


def test_samples_with_infinities_are_refused_and_an_error_shows_its_first_line(tmp_path, capsys):
    from condiff.cli.common import check_samples

    for bad in (torch.tensor([1.0, math.inf]), torch.tensor([math.nan, 0.0])):
        with pytest.raises(FloatingPointError, match="sampling produced 1 non-finite values of 2"):
            check_samples(bad, tmp_path)
    check_samples(torch.tensor([1.0, -2.0]), tmp_path)
    import argparse

    import condiff.cli.main as cli_main

    def two_lines(args):
        raise ValueError("what went wrong\n  a detail")

    parser = cli_main.build_parser()
    real = parser.parse_known_args

    def parse(argv=None):
        ns, extra = real(["bench", "--list"])
        return argparse.Namespace(**{**vars(ns), "func": two_lines}), extra

    parser.parse_known_args = parse
    orig = cli_main.build_parser
    cli_main.build_parser = lambda: parser
    try:
        assert cli_main.main(["bench", "--list"]) == 2
    finally:
        cli_main.build_parser = orig
    err = capsys.readouterr().err
    assert "what went wrong" in err and "a detail" not in err


def test_eval_counts_network_passes_per_sample_over_partial_batches(trained, tmp_path):
    run = tmp_path / "run"
    trained(run)
    assert main(["eval", "--ckpt", str(run), "--n", "6", "--batch-size", "4", "--steps", "5"]) == 0
    assert json.loads((run / "metrics.json").read_text())["nfe_per_sample"] == 5  # 2 batches of 5 steps


def test_bench_sections_and_summaries(tiny_run, tmp_path):
    """Found by the CLI mutation round: a doubled section went unrefused, and the summary cut at "al." """
    from condiff.cli.bench import summary, with_section

    res = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "sampler-overhead-quick.json").read_text())
    one = with_section("", res)
    with pytest.raises(ValueError, match="damaged"):
        with_section(one + one, res)
    assert summary("pnp").endswith("segmentation as inference")
    assert main(["sample", "--ckpt", str(tiny_run), "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert np.load(tmp_path / "s" / "samples.npz")["x"].shape[0] == 64  # a bare model's default count


def test_a_model_of_fewer_steps_than_its_runs_settings_is_not_complete(trained, tmp_path):
    """A resume to 40 steps cut short leaves the 30-step model beside settings of 40: `demo` reused it."""
    from condiff.cli.common import model_is_complete

    run = tmp_path / "run"
    trained(run)
    cfg = json.loads((run / "config.json").read_text())
    assert model_is_complete(run, cfg)
    longer = {**cfg, "train": {**cfg["train"], "steps": 40}}
    (run / "config.json").write_text(json.dumps(longer))
    assert not model_is_complete(run, longer)


@pytest.mark.parametrize("command", [["train"], ["dual", "train"]])
def test_resume_of_a_run_that_is_not_there_is_refused_not_started_on_the_default_preset(tmp_path, capsys, command):
    """A mistyped --out with --resume and no settings named no run: it started the default preset (6000 steps)."""
    (tmp_path / "empty").mkdir()
    for out, why in (("typo", "no config.json; the directory does not exist"), ("empty", "no config.json")):
        capsys.readouterr()
        assert main([*command, "--out", str(tmp_path / out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"--resume: {tmp_path / out} records no run settings to go on with ({why}): check --out, or pass " in err
    assert not (tmp_path / "typo").exists() and list((tmp_path / "empty").iterdir()) == []


def test_restore_puts_back_the_run_an_unfinished_fresh_set_aside(trained, tmp_path, capsys, monkeypatch):
    """Moving .replaced's files back by hand failed (`mv`: the attempt's checkpoints/ is not empty); --restore
    does it, deleting the failed attempt's files (and nothing else), and is refused where nothing is kept."""
    run = tmp_path / "run"
    trained(run)
    (run / "metrics.json").write_text('{"mmd": 1}')  # a result of the old model, set aside by --fresh
    (run / "fid_step_00000030").mkdir()  # a folder of the user's, which --fresh leaves where it is
    before = _snapshot(run)
    from condiff.train import Trainer

    def cut(self):  # the attempt: a checkpoint and its samples, then a Ctrl-C
        (run / "checkpoints" / "step_00000010").mkdir(parents=True)
        (run / "samples_step_00000010").mkdir()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", cut)
        assert main(["train", *TINY, "--set", "train.lr=1e-3", "--out", str(run), "--fresh"]) == 130
    assert "(--restore in place of --fresh puts it back)" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--set", "train.steps=5", "--restore"]) == 2
    assert "--restore puts a run back as it was: it takes no --data / --config / --set" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--restore"]) == 0
    assert f"restored the run in {run} that --fresh had set aside" in capsys.readouterr().err
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k.name != "loss.png"} == {
        k: v for k, v in before.items() if k.name != "loss.png"}  # the old run whole, nothing of the attempt's
    assert Path("loss.png") in after and not (run / ".replaced").exists() and (run / "fid_step_00000030").is_dir()
    assert main(["train", "--out", str(run), "--restore"]) == 2
    assert f"--restore: {run} keeps no run that --fresh set aside (nothing in .replaced there)" in \
        capsys.readouterr().err
    assert main(["dual", "train", "--restore"]) == 2
    assert "--restore needs --out, the run to put back" in capsys.readouterr().err


def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(capsys):
    """It was printed after the bar's text, on the bar's line ("... 12.3it/s]condiff train: warning: ...")."""
    import argparse
    import sys
    import warnings

    from tqdm import tqdm

    from condiff.cli import main as cli_main

    def job(args):
        for i in tqdm(range(3), file=sys.stderr, mininterval=0):
            if i == 1:
                warnings.warn("the data look odd", stacklevel=1)
        return 0

    assert cli_main._run_command(argparse.Namespace(func=job), "condiff x") == 0
    err = capsys.readouterr().err
    line = next(s for s in re.split(r"[\r\n]", err) if "warning" in s)
    assert line == "condiff x: warning: the data look odd"


def test_an_error_a_net_of_ones_own_raises_in_training_names_the_net_and_the_step(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "boom.py").write_text(
        "import torch\n\n\nclass Net(torch.nn.Module):\n    def __init__(self, in_channels=1):\n"
        "        super().__init__()\n        self.conv = torch.nn.Conv2d(in_channels, in_channels, 3, padding=1)\n\n"
        "    def forward(self, x, t, y=None):\n        if x.shape[0] > 2:  # passes the check on two samples\n"
        "            raise RuntimeError('boom in my net')\n        return self.conv(x)\n")
    capsys.readouterr()
    assert main(["train", "--data", "digits", "--set", "model.name=boom.py:Net", "--set", "train.steps=2",
                 "--set", "train.batch_size=4", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert (f"condiff train: error: the network {tmp_path / 'boom.py'}:Net failed in training, after step 0: "
            "RuntimeError: boom in my net\n") in err
    # an error raised elsewhere is left as it is (not put down to the net)
    (tmp_path / "ok.py").write_text((tmp_path / "boom.py").read_text().replace("> 2", "> 10**9"))
    from condiff.train import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    assert main(["train", "--data", "digits", "--set", "model.name=ok.py:Net", "--set", "train.steps=2",
                 "--out", "run2"]) == 2
    assert "condiff train: error: disk on fire\n" in capsys.readouterr().err


def test_train_refuses_a_test_split_of_another_shape_before_training(tmp_path, capsys):
    """It trained, and `eval` was the first to say that the splits differ."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.uniform(-1, 1, (20, 1, 8, 8)).astype("float32"),
             x_test=rng.uniform(-1, 1, (10, 1, 16, 16)).astype("float32"))
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--set", "train.steps=2", "--out",
                 str(tmp_path / "run")]) == 2
    assert ("the splits hold items of different shapes {'train': (1, 8, 8), 'test': (1, 16, 16)}"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_fresh_sets_aside_the_old_models_solve_and_pnp_results_too(trained, tmp_path, capsys, monkeypatch):
    """solve/ of the replaced model stayed beside the new one (and `condiff show` listed it as the new model's);
    so did pnp/ and pnp_step_N/ once pnp wrote its results beside the prior by default."""
    run = tmp_path / "run"
    trained(run)
    results = ("solve/inpaint-box-dps-5", "pnp/digits-3", "pnp_step_00000002/digits-3")
    for r in results:
        (run / r).mkdir(parents=True)
        (run / r / "metrics.json").write_text('{"psnr": 5.9}')
    (run / "class_hist.png").write_bytes(b"png")  # what `condiff eval` draws in place of a digits model
    from condiff.train import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["train", *TINY, "--set", "train.lr=1e-3", "--out", str(run), "--fresh"]) == 130
    for r in results:
        assert not (run / r).exists() and (run / ".replaced" / r).is_dir(), r
    assert not (run / "class_hist.png").exists() and (run / ".replaced" / "class_hist.png").is_file()


def test_an_out_that_is_a_folder_of_runs_is_refused(trained, tmp_path, capsys):
    """`solve --out runs` marked the whole folder as a solve run, which then hid its runs (`condiff show`)."""
    trained(tmp_path / "runs" / "a")
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path / "runs" / "a"), "--n", "2", "--steps", "2", "--out",
                 str(tmp_path / "runs")]) == 2
    assert f"--out {tmp_path / 'runs'} is a folder that holds runs (a), not a run" in capsys.readouterr().err
    assert not (tmp_path / "runs" / ".condiff-run").exists()


def test_a_resumed_models_training_time_counts_every_session(trained, tmp_path):
    """train_seconds counted the last session only (a --resume of a finished run wrote 0 s)."""
    run = tmp_path / "run"
    trained(run)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1] / "config.json"
    cfg = json.loads(ckpt.read_text())
    assert cfg["train_seconds"] > 0
    ckpt.write_text(json.dumps({**cfg, "train_seconds": 1000.0}))  # as if the earlier sessions took 1000 s
    assert main(["train", "--out", str(run), "--resume", "--set", "train.steps=40"]) == 0
    assert json.loads((run / "model" / "config.json").read_text())["train_seconds"] >= 1000.0


def test_train_or_reuse_reports_the_training_time_of_every_session(trained, tmp_path):
    """A benchmark resuming its model reported the seconds of its own session as the training time."""
    from condiff.cli.common import train_or_reuse

    run = tmp_path / "run"
    trained(run)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1] / "config.json"
    ckpt.write_text(json.dumps({**json.loads(ckpt.read_text()), "train_seconds": 1000.0}))
    shutil.rmtree(run / "model")  # the run stopped after its last checkpoint: resumed, not reused
    seconds, reused = train_or_reuse(resolve("toy2d", None, TINY[3::2]) | {"_device": "cpu"}, run)
    assert not reused and 1000.0 <= seconds < 1100.0


def test_a_folder_of_models_given_as_a_model_names_them(trained, tmp_path, capsys):
    """A dual experiment's folder or a run's checkpoints/ was 'not a condiff checkpoint: no config.json'."""
    trained(tmp_path / "exp" / "constrained")
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path / "exp"), "--n", "2", "--steps", "2"]) == 2
    assert f"{tmp_path / 'exp'} is a folder of models (constrained), not one: pass one of them" in \
        capsys.readouterr().err
    ckpts = tmp_path / "exp" / "constrained" / "checkpoints"
    newest = sorted(p.name for p in ckpts.iterdir())[-1]
    assert main(["sample", "--ckpt", str(ckpts), "--n", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpts} is a folder of checkpoints (" in err and newest in err and "or the run" in err
    from condiff.io import CheckpointError
    from condiff.models import load_net  # `dual train --init` and others load the net alone: named there too

    with pytest.raises(CheckpointError, match=r"is a folder of models \(constrained\), not one"):
        load_net(tmp_path / "exp")


def test_a_file_recorded_meanwhile_by_another_process_is_not_recorded_twice(tmp_path, monkeypatch):
    """The check that a version is trusted ran before the record's lock only: two processes naming one file at
    once both appended it (a duplicate eats into the eight versions kept)."""
    from condiff import userfile

    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "net.py"
    f.write_text("x = 1\n")
    sha = userfile.trust_file(f)
    real, reads = userfile._trusted, []
    # the first read (before the lock) misses the version, as if the other process wrote it just after
    monkeypatch.setattr(userfile, "_trusted", lambda: real() if reads.append(1) or len(reads) > 1 else {})
    userfile._record_trusted(f.resolve(), sha)
    monkeypatch.setattr(userfile, "_trusted", real)
    assert userfile.trusted_files()[str(f.resolve())] == [sha]


def test_a_full_disk_is_named_with_what_to_do(monkeypatch, capsys):
    """safetensors' "I/O error: No space left on device (os error 28)" named neither the disk nor the way on."""
    import errno

    import condiff.cli.train as train_cli

    def full(args):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(train_cli, "run", full)
    assert main(["train", "--data", "toy2d"]) == 74  # EX_IOERR: not the input's fault
    assert ("(the disk is full: free space and run the command again with --resume: the checkpoints written are "
            "whole)") in capsys.readouterr().err

    def full_os(args):
        raise OSError(errno.ENOSPC, "writing x: No space left on device; the previous file is unchanged")

    monkeypatch.setattr(train_cli, "run", full_os)
    assert main(["train", "--data", "toy2d"]) == 74
    assert capsys.readouterr().err.count("the disk is full") == 1
    import condiff.cli.sample as sample_cli  # a command that resumes nothing is not told to

    monkeypatch.setattr(sample_cli, "run", full_os)
    assert main(["sample", "--ckpt", "x"]) == 74
    assert capsys.readouterr().err.endswith("(the disk is full: free space and run the command again)\n")


def test_two_commands_sampling_into_one_folder_write_one_at_a_time(trained, tmp_path, capsys):
    """A second `sample` could write its whole set between the first's samples.npz and its record, which then
    described the other command's samples."""
    run = tmp_path / "run"
    trained(run)
    out = run / "samples"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(2)",
                               str(out / ".writing.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # another writer, between its data and its record
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2"]) == 0
    holder.wait()
    assert f"waiting for another condiff command writing {out}" in capsys.readouterr().err
    record = json.loads((out / "sample_config.json").read_text())
    assert record["n"] == 4 and len(np.load(out / "samples.npz")["x"]) == 4


def test_a_ctrl_c_after_the_last_rename_says_the_set_is_whole(trained, tmp_path, capsys, monkeypatch):
    """The new set was in place, with its record, yet the command said only "interrupted"."""
    run = tmp_path / "run"
    trained(run)
    out = tmp_path / "s"
    import condiff.cli.sample as sample_cli

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "print", ctrl_c, raising=False)  # the line that follows the renames
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--steps", "2", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"condiff: interrupted; the results in {out} were written whole before it")
    assert json.loads((out / "sample_config.json").read_text())["n"] == 2 and (out / "samples.npz").is_file()
    monkeypatch.setattr(sample_cli, "write_samples", ctrl_c)  # before the set is whole: nothing is claimed
    assert main(["sample", "--ckpt", str(run), "--n", "2", "--steps", "2", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "condiff: interrupted"


def test_an_empty_config_file_is_refused_rather_than_run_on_the_defaults(tmp_path, capsys):
    """`dual train --config EMPTY` started a full unconstrained digits training without a word."""
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n")
    for cmd, hint in ((["train", "--data", "toy2d"], "leave out --config for the defaults"),
                      (["dual", "train"], "a dual run file names its [data], [model], [train] and [[constraint]] "
                                          "tables (examples/dual/ has some)"),
                      (["namm", "fit", "--data", "brightness"], "leave out --config for the profile's settings")):
        assert main([*cmd, "--config", str(empty), "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"config file {empty} holds no settings (it is empty, or comments only): {hint}")
    assert not (tmp_path / "o").exists()
    # with settings given by --set, an empty file is no mistake
    assert main(["train", "--data", "toy2d", "--config", str(empty), "--set", "train.steps=0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "train.steps must be an integer >= 1" in capsys.readouterr().err


def test_a_data_set_name_is_no_folder_and_a_default_out_is_named_as_such(tmp_path, capsys, monkeypatch):
    """`--data toy2d` beside a folder named toy2d was taken for that folder; a refused default --out was named as
    if the user had typed it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy2d").mkdir()
    assert main(["train", *TINY, "--set", "train.steps=2", "--out", "toy2d"]) == 0
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pngs / "a.png")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "runs").symlink_to(tmp_path)  # the default runs/pngs is then the folder itself
    assert main(["train", "--data", str(pngs), "--set", "train.steps=2", "--set", "model.base=8",
                 "--set", "model.mults=[1]", "--set", "train.warmup=0"]) == 2  # (a failing test trains briefly)
    assert capsys.readouterr().err.strip().endswith(
        "error: the default --out runs/pngs is the folder given as --data (" + str(pngs) + "): its results would be "
        "read as data with those files: give --out DIR to write elsewhere")
    # namm fit: its data folder as --out, and its default folder (named for the data file) holding another output
    assert main(["namm", "fit", "--data", str(pngs), "--out", str(pngs), "--quiet"]) == 2
    assert "is the folder given as --data" in capsys.readouterr().err
    np.save(tmp_path / "field.npy", np.zeros((8, 1, 8, 8), np.float32))
    (tmp_path / "namm-field").mkdir()  # runs/namm-field through the link
    (tmp_path / "namm-field" / ".condiff-run").write_text("condiff sample")
    assert main(["namm", "fit", "--data", str(tmp_path / "field.npy"), "--constraint", "box", "--quiet"]) == 2
    assert "the default --out runs/namm-field holds the output of `condiff sample`" in capsys.readouterr().err


def test_checkpoints_of_other_settings_are_not_discarded_without_a_word(tmp_path):
    """A run interrupted before its model/ holds checkpoints only; those of other settings were discarded."""
    from condiff.cli.common import refuse_other_settings

    cfg = resolve("toy2d", None, ["train.steps=20"])
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    refuse_other_settings(tmp_path, cfg, "pass --retrain")  # the same settings: going on is fine
    with pytest.raises(FileExistsError, match=r"holds a model trained with other settings \(changed: train.lr\); "
                                              "pass --retrain"):
        refuse_other_settings(tmp_path, resolve("toy2d", None, ["train.steps=20", "train.lr=0.5"]), "pass --retrain")
    shutil.rmtree(tmp_path / "checkpoints")
    refuse_other_settings(tmp_path, resolve("toy2d", None, ["train.lr=0.5"]), "pass --retrain")  # nothing held


def test_exit_statuses_tell_a_script_what_to_do(monkeypatch, capsys):
    """Every failure exited 2: a busy run (try later), a full disk and a SIGTERM (130, as Ctrl-C) read alike."""
    import signal as sig

    import condiff.cli.train as train_cli
    from condiff import io
    from condiff.train import TrainingInterrupted

    for error, status in ((ValueError("bad"), 2), (io.RunInUseError("busy"), 75), (io.ModelInTraining("busy"), 75),
                          (OSError(errno.EROFS, "Read-only file system"), 74), (TrainingInterrupted(), 130),
                          (TrainingInterrupted(sig.SIGTERM), 143), (KeyboardInterrupt(), 130)):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(train_cli, "run", fail)
        assert main(["train", "--data", "toy2d"]) == status, error
    capsys.readouterr()


def test_paths_are_recorded_absolute_and_a_quoted_tilde_is_the_home_folder(trained, tmp_path, monkeypatch, capsys):
    """Results recorded --ckpt as typed (relative), and `--out '~/x'` made a folder named "~"."""
    trained(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["sample", "--ckpt", "run", "--n", "3", "--steps", "2", "--out", "~/s"]) == 0
    record = json.loads((tmp_path / "home" / "s" / "sample_config.json").read_text())
    assert record["ckpt"] == str(tmp_path / "run") and not (tmp_path / "~").exists()
    capsys.readouterr()
    assert main(["eval", "--ckpt", "run", "--n", "64", "--steps", "2"]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["ckpt"] == str(tmp_path / "run")  # stdout: the results alone
    assert "wrote run/metrics.json" in said.err


def test_the_cache_folder_without_a_home_and_one_that_cannot_be_made(tmp_path, monkeypatch):
    from condiff import io

    monkeypatch.setenv("CONDIFF_CACHE", "rel/cache")
    monkeypatch.chdir(tmp_path)
    assert io.cache_dir() == tmp_path / "rel" / "cache"  # absolute: the same folder from any later directory
    monkeypatch.delenv("CONDIFF_CACHE")
    monkeypatch.setattr(io.os.path, "expanduser", lambda p: p)  # no home folder known ("~" stays "~")
    assert io.cache_dir(make=False).is_absolute() and io.cache_dir(make=False).name.startswith("condiff-cache-")
    monkeypatch.setattr(io.tempfile, "gettempdir", lambda: str(tmp_path))  # a folder every user may write to
    own = io.cache_dir()
    assert own == tmp_path / f"condiff-cache-{os.getuid()}" and (own.stat().st_mode & 0o777) == 0o700
    own.chmod(0o777)  # as a looser umask made it
    assert io.cache_dir() == own and (own.stat().st_mode & 0o777) == 0o700  # made under a looser umask: closed
    own.rmdir()
    (tmp_path / "elsewhere").mkdir()
    own.symlink_to(tmp_path / "elsewhere")  # planted by someone else
    with pytest.raises(PermissionError, match="is a link or belongs to another user"):
        io.cache_dir()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(OSError, match=r"cannot make the cache folder .*: set CONDIFF_CACHE to a writable folder"):
        io.cache_dir()


def test_a_busy_constraint_model_exits_75_and_a_cache_setting_that_fails_still_gives_one_line(tmp_path, capsys,
                                                                                             monkeypatch):
    from condiff import io
    from condiff.cli.dual import _named_model

    (tmp_path / "busy" / "checkpoints").mkdir(parents=True)
    (tmp_path / "busy" / "log.jsonl").write_text("")
    monkeypatch.setattr(io, "run_holder", lambda d: 4242)
    with pytest.raises(io.ModelInTraining, match=r"constraint 'c': .* is still training it; wait for it to finish$"):
        _named_model(str(tmp_path / "busy"), "cpu", "constraint 'c'")
    import condiff.cli.sample as sample_cli

    def refused(args):
        raise PermissionError(errno.EACCES, "Permission denied")

    def no_cache(make=True):
        raise RuntimeError("no cache folder can be named")

    monkeypatch.setattr(sample_cli, "run", refused)
    monkeypatch.setattr(io, "cache_dir", no_cache)  # the error handler looks at the cache for a refused write
    assert main(["sample", "--ckpt", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == "condiff sample: error: [Errno 13] Permission denied\n"


def test_resolving_paths_leaves_words_alone(tmp_path, monkeypatch):
    """A folder named like a schedule's kind made the recorded "cosine" a path, and the schedules unequal."""
    from condiff.cli.common import paths_resolved

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cosine").mkdir()
    (tmp_path / "all.npz").write_bytes(b"")
    got = paths_resolved({"schedule": {"kind": "cosine"}, "objective": {"data": "all.npz", "split": "cosine"},
                          "constraint": [{"model": "cosine", "data": "objective"}], "data": {"name": "digits"}})
    assert got == {"schedule": {"kind": "cosine"}, "objective": {"data": str(tmp_path / "all.npz"), "split": "cosine"},
                   "constraint": [{"model": str(tmp_path / "cosine"), "data": "objective"}], "data": {"name": "digits"}}


def test_an_output_folder_the_command_chose_is_named_as_such_with_the_way_out(tiny_run, tmp_path, capsys):
    """A read-only run: `sample` refused "--out RUN/samples" and `eval` "--ckpt RUN", flags the user never gave
    (or that need no writing), and neither said that --out writes elsewhere."""
    import shutil

    from condiff.cli.common import check_writable

    shutil.copytree(tiny_run, tmp_path / "bare")
    (tmp_path / "bare_samples").write_text("a file where the samples would go")
    assert main(["sample", "--ckpt", str(tmp_path / "bare"), "--n", "2", "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert (f"the default --out {tmp_path / 'bare_samples'} is a file, not a directory: give --out DIR to write "
            "elsewhere") in err
    # eval's own default folder likewise, and another command's output there is refused by its command
    (tmp_path / "bare_eval").write_text("a file where the scores would go")
    assert main(["eval", "--ckpt", str(tmp_path / "bare"), "--n", "2", "--steps", "2", "--device", "cpu"]) == 2
    assert (f"the default --out {tmp_path / 'bare_eval'} is a file, not a directory: give --out DIR"
            in capsys.readouterr().err)
    (tmp_path / "bare_eval").unlink()
    (tmp_path / "bare_eval").mkdir()
    (tmp_path / "bare_eval" / ".condiff-run").write_text("condiff sample")
    assert main(["eval", "--ckpt", str(tmp_path / "bare"), "--n", "2", "--steps", "2", "--device", "cpu"]) == 2
    assert (f"the default --out {tmp_path / 'bare_eval'} holds the output of `condiff sample`"
            in capsys.readouterr().err)
    # refusals of check_out_dir's own say the same (a checkpoint folder as the default place, say)
    from condiff.cli.common import check_out_dir

    with pytest.raises(FileExistsError, match="a model checkpoint directory; files written into it would be lost "
                                              "when the model is saved again: give --out DIR to write elsewhere"):
        check_out_dir(tmp_path / "bare" / "samples", "the default --out", kind="condiff sample")
    with pytest.raises(ValueError, match="^--out is needed: give an output directory$"):  # no flag, no default
        check_out_dir(None)
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    for flag, hint in (("the default --out", True), ("the run's folder, where eval writes beside its model,", True),
                       ("--out", False), ("bench: results to", False)):  # only a place the user did not name
        with pytest.raises(NotADirectoryError) as e:
            check_writable(blocked / "x", flag)
        assert str(e.value).startswith(f"{flag} {blocked / 'x'}: {blocked} is a file")
        assert str(e.value).endswith(": give --out DIR to write elsewhere") == hint


def test_a_step_count_beyond_the_schedule_is_named_by_its_flag(tiny_run, capsys):
    """`sample --steps 5000` said "steps must be between 1 and T=1000", naming no flag, after loading the model."""
    for cmd in ("sample", "eval"):
        assert main([cmd, "--ckpt", str(tiny_run), "--steps", "500", "--n", "2", "--device", "cpu"]) == 2
        assert "--steps must be at most the model's schedule length T = 100, got 500" in capsys.readouterr().err


def test_samples_far_beyond_the_training_data_are_said(tiny_run, tmp_path, capsys):
    """An untrained model's samples (range [-340, 515] for data in [-1, 1]) were written without a word, where
    `namm sample` asks whether the model is trained."""
    import shutil

    from condiff.models import save_model
    from condiff.nets import build_net
    from condiff.schedule import Schedule

    shutil.copytree(tiny_run, tmp_path / "bare")
    assert main(["sample", "--ckpt", str(tmp_path / "bare"), "--n", "2", "--steps", "2", "--device", "cpu"]) == 0
    assert "is the model trained" not in capsys.readouterr().err  # no range recorded: nothing to compare with
    torch.manual_seed(0)
    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1, 2], "groups": 4})
    save_model(tmp_path / "narrow", net, Schedule.linear(100), data={"name": "digits"}, shape=[1, 8, 8],
               value_range=[-0.01, 0.01])  # an untrained net's samples lie far beyond data this narrow
    assert main(["sample", "--ckpt", str(tmp_path / "narrow"), "--n", "2", "--steps", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: the samples reach |x| = " in err
    assert "while the training data stay within 0.01: is the model trained" in err
    assert (tmp_path / "narrow_samples" / "samples.npz").is_file()  # written all the same


def test_the_demo_on_constant_data_prints_its_summary_without_an_mmd(tmp_path, capsys):
    """eval gives the MMD of constant data as null; the demo's summary then failed formatting it (exit 2 after
    every result was written), and its few-samples warning named --n, which demo does not take."""
    np.save(tmp_path / "const.npy", np.zeros((64, 2), np.float32))
    assert main(["demo", "--data", str(tmp_path / "const.npy"), "--set", "model.name=mlp", "--set", "model.hidden=32",
                 "--set", "model.depth=1", "--set", "train.steps=5", "--set", "train.batch_size=32",
                 "--set", "train.progress=false", "--set", "schedule.T=50", "--set", "sample.n=64",
                 "--set", "sample.steps=5", "--device", "cpu", "--out", str(tmp_path / "d")]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"MMD ratio to real +n/a", out)
    assert ("sample.n (the run's) = 64: with so few samples" in err and "give --set sample.n=200 or more" in err
            and "--n" not in err)
    assert "eval gives no MMD to them" in err and "(the digits demo's: 5000)" in err  # its preset's n


def test_constant_training_data_are_said_before_training(tmp_path, capsys):
    """Data whose every value is 0.5 trained without a word; eval then failed on them at the end."""
    np.save(tmp_path / "const.npy", np.full((32, 2), 0.5, np.float32))
    assert main(["train", "--data", str(tmp_path / "const.npy"), "--set", "train.steps=2", "--set", "train.warmup=0",
                 "--set", "model.name=mlp", "--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    assert "every value of the training data is 0.5; a model of constant data" in capsys.readouterr().err


def test_dual_experiments_and_the_demo_name_their_default_out_as_such(tmp_path, capsys, monkeypatch):
    """`dual toy` and `demo` without --out refused "--out runs/..." (a flag the user never gave) and said only
    "give another directory"."""
    monkeypatch.chdir(tmp_path)
    for cmd, folder in ((["dual", "toy"], "runs/dual-toy"), (["demo"], "runs/demo")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / ".condiff-run").write_text("condiff sample\n")
        assert main([*cmd, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"the default --out {folder} holds the output of `condiff sample`" in err
        assert err.rstrip().endswith("give --out DIR to write elsewhere")


def test_quiet_turns_off_every_progress_bar_of_any_command(tmp_path, capsys):
    """Only `namm` took --quiet; a script running `condiff train` or `sample` got a bar refreshed every 10 s."""
    import argparse

    from condiff.cli import main as cli_main
    from condiff.sample import progress_bar

    seen = []

    def job(args):
        seen.append(progress_bar(3, True))
        return 0

    for quiet in (True, False):
        assert cli_main._run_command(argparse.Namespace(func=job, quiet=quiet), "condiff x") == 0
    assert seen[0] is None and seen[1] is not None  # and the switch is gone after the command
    seen[1].close()
    assert progress_bar(3, True) is not None
    def leaves(parser, name):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield name, parser
        for action in subs:
            for child_name, child in action.choices.items():
                yield from leaves(child, f"{name} {child_name}")

    commands = dict(leaves(cli_main.build_parser(), "condiff"))
    assert {"condiff train", "condiff sample", "condiff solve", "condiff pnp digits", "condiff dual toy",
            "condiff namm sample", "condiff bench", "condiff demo"} <= set(commands)
    assert [name for name, p in commands.items() if "--quiet" not in p._option_string_actions] == []
    off = "train.progress=false"
    tiny = [a for i, a in enumerate(TINY) if a != off and TINY[i + 1:i + 2] != [off]]
    capsys.readouterr()
    assert main(["train", *tiny, "--out", str(tmp_path / "loud")]) == 0
    assert "it/s" in capsys.readouterr().err
    assert main(["train", *tiny, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert "it/s" not in capsys.readouterr().err
