"""Training loop: learning, exact resume after SIGKILL, atomic checkpoints, DDP."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from condiff import io
from condiff.nets import TimeMLP
from condiff.schedule import Schedule
from condiff.train import (
    DenoisingObjective,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    denoising_loss,
    list_checkpoints,
    read_log,
)

TINY = ["--data", "toy2d", "--set", "model.hidden=32", "--set", "model.depth=1", "--set", "data.n=512",
        "--set", "train.batch_size=32", "--set", "train.log_every=10", "--set", "train.progress=false",
        "--set", "schedule.T=100"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _cli(*args):
    return [sys.executable, "-m", "condiff.cli.main", *args]


def test_training_reduces_loss(tmp_path):
    """200 steps on N([0.5, -0.5], 0.1^2 I) data bring the denoising loss (fixed t and noise) within
    1.25x of the exact posterior-mean denoiser's, the least any network can reach (measured: 1.05-1.06x)."""
    from condiff.denoiser import GaussianDenoiser
    from condiff.train import denoising_loss, read_log

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g) * 0.1 + torch.tensor([0.5, -0.5])
    s = Schedule.linear(100)
    net = TimeMLP(2, hidden=32, depth=1)
    tr = Trainer(net, DenoisingObjective(x, s, 64), TrainConfig(steps=200, lr=3e-3, warmup=10, progress=False,
                                                                log_every=20, ckpt_every=100), tmp_path)
    tr.fit()
    log = read_log(tmp_path / "log.jsonl")
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    oracle = GaussianDenoiser(s, mean=torch.tensor([0.5, -0.5]), std=0.1)
    t, xs = torch.arange(100).repeat(20), x[torch.randint(0, 512, (2000,), generator=g)]

    def loss(f):
        with torch.no_grad():
            return float(denoising_loss(f, s, xs, None, torch.Generator().manual_seed(9), t).mean())

    assert loss(tr.ema) < 1.25 * loss(oracle.predict_eps)
    # the loss itself: a network that predicts 0 scores the mean square of the very noise drawn
    eps = torch.randn(xs.shape, generator=torch.Generator().manual_seed(9))
    assert loss(lambda x_t, t: torch.zeros_like(x_t)) == pytest.approx(float(eps.pow(2).mean()), rel=1e-6)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000100", "step_00000200"]


def test_a_non_finite_loss_names_the_data_at_step_0_and_the_learning_rate_later():
    s = Schedule.linear(100)
    cfg = TrainConfig(steps=5, lr=1e-3, warmup=0, progress=False)
    bad = torch.randn(64, 2)
    bad[3, 0] = float("nan")
    # refused up front: a NaN row drawn only at step 40 was blamed on the learning rate
    with pytest.raises(ValueError, match=r"training data hold 1 non-finite values \(the first in sample 3\)"):
        DenoisingObjective(bad, s, 8)
    objective = DenoisingObjective(torch.randn(64, 2), s, 64)
    objective.x[3, 0] = float("nan")  # data that turn bad after the check (an objective of one's own, say)
    with pytest.raises(FloatingPointError, match=r"at step 0, before any update: the network's output \(its weights\), "
                                                 "the training data"):
        Trainer(TimeMLP(2, hidden=8, depth=1), objective, cfg).fit()
    # a learning rate that blows the weights up: the loss turns non-finite after some updates
    net = TimeMLP(2, hidden=8, depth=1)
    wild = TrainConfig(steps=200, lr=1e30, warmup=0, progress=False, grad_clip=1e30)
    with pytest.raises(FloatingPointError, match=r"became .* at step [1-9]\d*; try a lower learning rate"):
        Trainer(net, DenoisingObjective(torch.randn(64, 2) * 1e3, s, 64), wild).fit()


def test_losses_read_once_per_interval_give_the_same_log_and_name_the_first_bad_step(tmp_path):
    """The GPU path (losses read from the device once per log interval) logs what the per-step CPU
    path logs, names the exact step of the first non-finite loss, and saves no checkpoint after it."""
    from condiff.train import read_log

    s = Schedule.linear(100)
    x = torch.randn(64, 2)
    logs = []
    for each in (True, False):
        cfg = TrainConfig(steps=12, log_every=5, ckpt_every=100, warmup=0, progress=False)
        torch.manual_seed(0)
        tr = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 16), cfg, run_dir=tmp_path / str(each))
        tr.check_each_step = each
        tr.fit()
        logs.append({r["step"]: r["loss"] for r in read_log(tmp_path / str(each) / "log.jsonl")})
    assert list(logs[0]) == list(logs[1]) == [5, 10, 12]
    assert list(logs[0].values()) == pytest.approx(list(logs[1].values()), rel=1e-12)

    class NanAt:  # the denoising objective, with a non-finite loss from step 7 on
        def __init__(self):
            self.base = DenoisingObjective(x, s, 16)

        def loss(self, model, step, gen):
            loss, logs = self.base.loss(model, step, gen)
            return (loss * float("nan") if step >= 7 else loss), logs

        def __getattr__(self, name):
            return getattr(self.base, name)

    for first_bad in (7, 0):
        obj = NanAt() if first_bad else DenoisingObjective(torch.zeros(64, 2), s, 16)
        if not first_bad:
            obj.x.fill_(float("nan"))  # after the objective's own check of its data
        cfg = TrainConfig(steps=20, log_every=10, ckpt_every=5, warmup=0, progress=False)
        tr = Trainer(TimeMLP(2, hidden=8, depth=1), obj, cfg, run_dir=tmp_path / f"bad{first_bad}")
        tr.check_each_step = False
        want = "at step 0, before any update" if first_bad == 0 else "became nan at step 7;"
        with pytest.raises(FloatingPointError, match=want):
            tr.fit()
        saved = [p.name for p in list_checkpoints(tmp_path / f"bad{first_bad}" / "checkpoints")]
        assert saved == ([] if first_bad == 0 else ["step_00000005"])  # nothing saved after step 7


@pytest.mark.parametrize("each", [True, False])
def test_a_non_finite_loss_names_the_logged_terms_that_were_not_finite_at_its_step(each, tmp_path):
    """A constraint term turning NaN mid-training was reported as the loss alone, the learning rate blamed.
    The log lines before it hold each value as a number or a list (a numpy float failed the log's writing)."""
    s = Schedule.linear(100)
    base = DenoisingObjective(torch.randn(64, 2), s, 16)

    class TermGoesBad:
        def loss(self, model, step, gen):
            loss, logs = base.loss(model, step, gen)
            term = loss.detach() * 0 + (float("nan") if step >= 3 else 1.0)
            odd = {3: term, "n": 10**400, "f32": np.float32(1.0), "parts": torch.full((2,), math.nan),
                   "tag": None, "flag": True, "names": ["a"]}  # not numbers, or not one: passed over, not a crash
            return loss + term, {**logs, "constraint": term, "weight": 0.5, "note": "text", **odd}

        def after_step(self, model, step):  # added to the step's logs after the update: not the step's loss
            return {"after": float("nan")}

    tr = Trainer(TimeMLP(2, hidden=8, depth=1), TermGoesBad(),
                 TrainConfig(steps=8, log_every=2, warmup=0, progress=False), run_dir=tmp_path)
    tr.check_each_step = each
    with pytest.raises(FloatingPointError, match=r"^training loss became nan at step 3 \(constraint, 3 not finite "
                                                 r"there\); try a lower learning rate$"):
        tr.fit()
    rec = read_log(tmp_path / "log.jsonl")[0]
    assert rec["step"] == 2 and rec["3"] == 1.0 and rec["f32"] == 1.0 and rec["parts"] == [None, None]
    assert rec["n"] == 10**400 and rec["names"] == ["a"] and rec["flag"] is True


def test_the_losses_kept_for_the_next_read_hold_no_graph(monkeypatch):
    """The logs kept until the next read of the losses held their autograd graphs: memory grew with
    log_every on the interval (GPU) path."""
    import condiff.train as train_mod

    kept = []
    real = train_mod._finite_sum
    monkeypatch.setattr(train_mod, "_finite_sum", lambda rows, first: kept.extend(rows) or real(rows, first))
    base = DenoisingObjective(torch.randn(64, 2), Schedule.linear(100), 16)

    class LogsAGraph:
        def loss(self, model, step, gen):
            loss, logs = base.loss(model, step, gen)
            return loss, {**logs, "extra": loss * 2}

        def after_step(self, model, step):
            return {}

    tr = Trainer(TimeMLP(2, hidden=8, depth=1), LogsAGraph(), TrainConfig(steps=6, log_every=3, warmup=0,
                                                                            progress=False))
    tr.check_each_step = False
    tr.fit()
    assert len(kept) == 6 and all(v.grad_fn is None for _, _, logs in kept for v in logs.values()
                                  if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("each", [True, False])
def test_a_finite_loss_with_a_non_finite_gradient_stops_before_its_update_is_saved(tmp_path, each):
    """sqrt(|0 * w|) has a finite value and a NaN gradient: the loss checks alone let that update
    through and the next checkpoint held NaN weights. The step is named, and the checkpoints kept
    (every step, on both the per-step and the deferred read path) are all from before it."""
    s = Schedule.linear(100)

    class NanGradAt3:
        def __init__(self):
            self.base = DenoisingObjective(torch.randn(64, 2), s, 16)

        def loss(self, model, step, gen):
            loss, logs = self.base.loss(model, step, gen)
            if step == 3:
                loss = loss + (sum(p.sum() for p in model.parameters()) * 0).abs().sqrt()
            return loss, logs

        def __getattr__(self, name):
            return getattr(self.base, name)

    cfg = TrainConfig(steps=8, ckpt_every=1, keep=2, log_every=4, warmup=0, progress=False)
    tr = Trainer(TimeMLP(2, hidden=8, depth=1), NanGradAt3(), cfg, run_dir=tmp_path)
    tr.check_each_step = each
    with pytest.raises(FloatingPointError, match=r"the gradient norm became nan at step 3 \(the loss is [0-9.]+\)"):
        tr.fit()
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step_00000002", "step_00000003"]
    assert all(bool(torch.isfinite(v).all()) for p in saved for v in io.load_group(p, "model").values())


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    steps = ["--set", "train.steps=300", "--set", "train.ckpt_every=20"]
    ref = tmp_path / "ref"
    subprocess.run(_cli("train", *TINY, *steps, "--out", str(ref)), check=True, env=_env(),
                   capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", *TINY, *steps, "--out", str(run)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(run / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_checkpoints(run / "checkpoints")
    assert done and not (run / "model").exists(), "the run must have been killed mid-way"
    killed_at = int(done[-1].name.split("_")[1])
    assert killed_at < 300
    r = subprocess.run(_cli("train", *TINY, *steps, "--out", str(run), "--resume"), env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resumed from step {killed_at}" in r.stderr
    for group in ("model", "ema"):
        a = load_file(str(list_checkpoints(ref / "checkpoints")[-1] / f"{group}.safetensors"))
        b = load_file(str(list_checkpoints(run / "checkpoints")[-1] / f"{group}.safetensors"))
        for k in a:
            assert torch.equal(a[k], b[k]), f"{group}.{k} differs after resume"
    steps_logged = [rec["step"] for rec in __import__("condiff.train", fromlist=["read_log"]).read_log(
        run / "log.jsonl")]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 300


@pytest.fixture
def sigint():
    """Set the process's SIGINT handler for one test (restored after): a shell that starts pytest in
    the background sets it to 'ignore', and the Trainer rightly leaves an ignored SIGINT alone."""
    prev = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, prev)


def _ctrl_c_at(step: int, signum: int = signal.SIGINT) -> type[DenoisingObjective]:
    """An objective that sends this process ``signum`` while computing the loss of ``step`` (mid-step)."""

    class CtrlC(DenoisingObjective):
        def loss(self, model, s, gen):
            if s == step:
                os.kill(os.getpid(), signum)
            return super().loss(model, s, gen)

    return CtrlC


def test_ctrl_c_checkpoints_the_finished_step_and_resume_is_exact(tmp_path, sigint):
    sigint(signal.default_int_handler)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    s = Schedule.linear(100)
    cfg = TrainConfig(steps=30, lr=3e-3, warmup=5, progress=False, log_every=5, ckpt_every=100, batch_size=32)

    def net():
        torch.manual_seed(0)
        return TimeMLP(2, hidden=16, depth=1)

    ref = Trainer(net(), DenoisingObjective(x, s, 32), cfg, tmp_path / "ref")
    ref.fit()
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        Trainer(net(), _ctrl_c_at(12)(x, s, 32), cfg, tmp_path / "run").fit()
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    # the step in flight was finished and saved, although no checkpoint was due before step 30
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000013"]
    again = Trainer(net(), DenoisingObjective(x, s, 32), cfg, tmp_path / "run")
    assert again.resume() and again.step == 13
    again.fit()
    for a, b in ((ref.model, again.model), (ref.ema, again.ema)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k
    # and the log too: the line at step 15 averages steps 11-15 although the run stopped after step 13
    keys = ("step", "loss", "lr", "grad_norm")
    logs = [[{k: r[k] for k in keys} for r in read_log(d / "log.jsonl")] for d in (tmp_path / "ref", tmp_path / "run")]
    assert logs[0] == logs[1] and [r["step"] for r in logs[0]] == [5, 10, 15, 20, 25, 30]


def test_sigterm_also_checkpoints_the_finished_step(tmp_path):
    """A scheduler or `timeout` stops a job with SIGTERM: training saves the step in flight, as for Ctrl-C."""
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=20, progress=False, log_every=5, ckpt_every=100, batch_size=16)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        Trainer(TimeMLP(2, hidden=8, depth=1), _ctrl_c_at(6, signal.SIGTERM)(x, Schedule.linear(50), 16), cfg,
                tmp_path).fit()
    assert signal.getsignal(signal.SIGTERM) is before
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000007"]


def test_an_ignored_ctrl_c_stays_ignored(tmp_path, sigint):
    """A process started in the background ignores SIGINT: training neither installs its handler
    nor stops."""
    sigint(signal.SIG_IGN)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=4, progress=False, log_every=2, ckpt_every=100, batch_size=16)
    tr = Trainer(TimeMLP(2, hidden=8, depth=1), _ctrl_c_at(1)(x, Schedule.linear(50), 16), cfg, tmp_path)
    tr.fit()
    assert tr.step == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_existing_run_needs_resume_or_fresh(tmp_path):
    args = _cli("train", *TINY, "--set", "train.steps=5", "--out", str(tmp_path))
    subprocess.run(args, check=True, env=_env(), capture_output=True)
    r = subprocess.run(args, env=_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert "already holds checkpoints" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_trained_model_without_checkpoints_is_not_overwritten_without_fresh(tmp_path):
    from condiff.cli.main import main

    base = ["train", *TINY, "--set", "train.steps=5", "--out", str(tmp_path), "--device", "cpu"]
    assert main(base) == 0
    for ck in (tmp_path / "checkpoints").iterdir():  # checkpoints deleted to save space; the model kept
        io.shutil.rmtree(ck)
    before = (tmp_path / "model" / "model.safetensors").read_bytes()
    assert main([*base, "--set", "train.steps=3"]) == 2
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before
    assert main([*base, "--set", "train.steps=3", "--fresh"]) == 0
    assert io.load_config(tmp_path / "model")["steps"] == 3


def test_a_run_directory_held_by_another_process_is_refused(tmp_path, capsys):
    import fcntl

    from condiff.cli.main import main

    held = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(held, b"4242\n")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(["train", *TINY, "--set", "train.steps=3", "--out", str(tmp_path), "--device", "cpu"]) == 75
        assert "in use by another condiff process (pid 4242)" in capsys.readouterr().err
        assert not (tmp_path / "model").exists()
        # sampling a run still in training says so, rather than advise a --resume the lock would refuse
        (tmp_path / "log.jsonl").write_text("")
        (tmp_path / "config.json").write_text('{"data": {"name": "toy2d"}}')  # written as training starts
        assert main(["sample", "--ckpt", str(tmp_path), "--n", "2"]) == 75  # busy: a script may wait and retry
        assert "another condiff process (pid 4242) is still training it" in capsys.readouterr().err
    finally:
        os.close(held)
    assert main(["train", *TINY, "--set", "train.steps=3", "--out", str(tmp_path), "--device", "cpu"]) == 0
    probe = os.open(tmp_path / ".lock", os.O_RDWR)  # released at the end of the command
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)


def test_a_config_that_is_not_a_table_and_a_run_without_its_model_are_named(tmp_path):
    from condiff.models import load_denoiser

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("[]")
    with pytest.raises(io.CheckpointError, match="holds a list, not a table of settings"):
        io.load_config(tmp_path / "ck")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"name": "toy2d"}}))
    with pytest.raises(io.CheckpointError, match="run directory with no model/"):
        load_denoiser(run)


def test_ctrl_c_before_training_does_not_claim_a_checkpoint(tmp_path, capsys, monkeypatch):
    from condiff.cli import train as train_cli
    from condiff.cli.main import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "start_run", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err  # nothing saved: no --resume advice
    assert "no checkpoint was saved yet: run the same command again" in err and "--resume" not in err
    # with a checkpoint in the run, --resume is the advice
    (tmp_path / "r" / "checkpoints" / "step_00000005").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "step_00000005" / io.CONFIG).write_text("{}")
    assert main(["train", *TINY, "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "stopped at a checkpoint" not in err and "add --resume" in err and "when training was under way" in err
    # under --fresh, --resume replaces the flag, and the run set aside is named
    (tmp_path / "r" / io.REPLACED / "model").mkdir(parents=True)
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--fresh"]) == 130
    err = capsys.readouterr().err
    assert "pass --resume (instead of --fresh) to the same command" in err
    assert (f"the run --fresh replaced is kept in {tmp_path / 'r' / io.REPLACED} (--restore in place of --fresh "
            "puts it back)") in err
    # a command that resumed already is told to run again, not to add the flag it has
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--resume"]) == 130
    err = capsys.readouterr().err
    assert "run the same command to continue from the newest checkpoint" in err and "add --resume" not in err


def test_corrupted_checkpoint_is_a_clear_error_and_previous_survives(tmp_path, monkeypatch):
    net = TimeMLP(2, hidden=8, depth=1)
    good = io.save_checkpoint(tmp_path / "ck", {"model": net.state_dict()}, {"step": 1})
    # a failing write must leave the previous checkpoint intact and no temporary directory behind
    import condiff.io as iomod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(iomod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint(tmp_path / "ck", {"model": net.state_dict()}, {"step": 2})
    monkeypatch.undo()
    assert io.load_config(good)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    io.load_state_into(TimeMLP(2, hidden=8, depth=1), good)
    # truncation
    f = good / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(io.CheckpointError, match="corrupted or truncated"):
        io.load_state_into(TimeMLP(2, hidden=8, depth=1), good)
    (good / "config.json").write_text("{not json")
    with pytest.raises(io.CheckpointError, match="corrupted"):
        io.load_config(good)


def test_atomic_file_write_failing_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.md"
    io.write_text_atomic(path, "old\n")

    def half(f):
        f.write("half a ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.write_file_atomic(path, half)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    io.write_json_atomic(path, {"b": 1, "a": [1.5]})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}


def test_atomic_writes_get_the_permissions_the_umask_gives_ordinary_files(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    io.write_text_atomic(tmp_path / "a.txt", "x")
    io.save_checkpoint(tmp_path / "ck", {"model": {"w": torch.zeros(2)}}, {"k": 1})
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt")  # not mkstemp's private 0600
    assert mode(tmp_path / "ck") == mode(tmp_path / "plain")  # not mkdtemp's 0700
    assert mode(tmp_path / "ck" / "model.safetensors") == mode(tmp_path / "plain.txt")


def test_checkpoint_never_unpickles(tmp_path):
    import pickle

    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(io.CheckpointError):
        io.load_group(d, "model")


def test_optimizer_state_round_trip():
    net = TimeMLP(2, hidden=8, depth=1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)).sum().backward()
    opt.step()
    t, meta = io.flatten_optimizer(opt.state_dict())
    back = io.unflatten_optimizer(t, meta)
    opt2 = torch.optim.AdamW(net.parameters(), lr=1e-3)
    opt2.load_state_dict(back)
    for k, v in opt.state_dict()["state"].items():
        for kk, vv in v.items():
            assert torch.equal(torch.as_tensor(vv), torch.as_tensor(opt2.state_dict()["state"][k][kk]))


def test_optimizer_state_with_numbers_round_trips_through_json():
    """Non-tensor state (LBFGS keeps counters) goes to the JSON side and comes back under the integer
    parameter ids, beside the tensors of the same parameter."""
    state = {"state": {0: {"n_iter": 3, "d": torch.arange(3.0)}, 1: {"func_evals": 7}},
             "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    t, meta = io.flatten_optimizer(state)
    assert set(t) == {"0.d"}
    back = io.unflatten_optimizer(t, json.loads(json.dumps(meta)))
    assert back["param_groups"] == state["param_groups"] and set(back["state"]) == {0, 1}
    assert back["state"][0]["n_iter"] == 3 and torch.equal(back["state"][0]["d"], torch.arange(3.0))
    assert back["state"][1] == {"func_evals": 7}


@pytest.mark.parametrize(("device", "rank", "gpus", "message"), [
    ("cuda", "1", 1, "process 1 of this machine needs its own GPU, but 1 are visible"),
    # --device cuda:0 under torchrun put every process on GPU 0 (NCCL: duplicate GPU, or a hang)
    ("cuda:0", "0", 2, "device cuda:0 under torchrun: each of the 2 processes takes the GPU of its local rank"),
])
def test_a_gpu_layout_torchrun_cannot_use_is_refused_before_joining_the_group(monkeypatch, device, rank, gpus,
                                                                              message):
    from condiff.train import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ValueError, match=message):
        init_distributed(device)


def test_seeded_and_kept_streams_give_back_every_stream_they_touch(monkeypatch):
    """fork_rng(devices=[]) kept only the CPU stream, while torch.manual_seed inside it reseeds every GPU's
    too: the caller's GPU stream was reset by each seeded build of weights."""
    from condiff import determinism

    torch.manual_seed(5)
    before = torch.get_rng_state()
    with determinism.seeded(11):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's CPU stream as it was
    torch.manual_seed(11)
    assert torch.equal(inside, torch.rand(3))  # the block drew from seed 11
    forked, started = [], [False]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: started[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: forked.append(list(devices)) or nullcontext())
    with determinism.kept_streams():
        pass
    started[0] = True
    with determinism.kept_streams():
        pass
    # no GPU stream is read before CUDA starts (reading one starts CUDA on that GPU, for a run on the CPU too);
    # once it has, every GPU's stream is kept, as manual_seed seeds every GPU
    assert forked == [[], [0, 1]]
    # before CUDA starts, seeded() seeds the CPU's stream alone: torch.manual_seed would queue a GPU seed that
    # lands when CUDA starts, after the block, in the caller's stream
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(("all", seed)))
    cpu_only = SimpleNamespace(manual_seed=lambda seed: seeds.append(("cpu", seed)))
    monkeypatch.setattr(torch, "default_generator", cpu_only)
    started[0] = False
    with determinism.seeded(3):
        pass
    started[0] = True
    with determinism.seeded(4):
        pass
    assert seeds == [("cpu", 3), ("all", 4)]
    # a block that draws on a GPU (train_diffusion's dropout) starts CUDA first, so its stream is seeded and kept:
    # started inside the block, it drew unseeded and kept what it drew
    started[0], seeds[:], forked[:] = False, [], []
    monkeypatch.setattr(torch.cuda, "init", lambda: started.__setitem__(0, True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with determinism.seeded(5, "cpu"):
        pass
    assert not started[0]
    with determinism.seeded(6, torch.device("cuda", 1)):
        pass
    assert started[0] and seeds == [("cpu", 5), ("all", 6)] and forked == [[], [0, 1]]


def test_a_callers_own_process_group_outlives_condiff_commands_and_leave_process_group(tmp_path, tiny_run):
    """A successful command left whatever process group there was, a script's own included: a torchrun script
    calling main([...]) lost its group (or, called on rank 0 alone, hung in the barrier)."""
    import torch.distributed as dist

    from condiff.cli.main import main
    from condiff.train import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "s"), "--n", "2", "--steps",
                     "2"]) == 0
        leave_process_group(only_joined=True)  # the commands' call: a group condiff did not make stays
        assert dist.is_initialized()
        leave_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_cpu_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "condiff.cli.main", "train", *TINY,
           "--device", "cpu", "--set", "train.steps=40", "--set", "train.ckpt_every=20", "--out", str(tmp_path)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = io.load_config(tmp_path / "model")
    assert cfg["steps"] == 40
    from condiff.train import read_log

    log = read_log(tmp_path / "log.jsonl")
    assert [rec["step"] for rec in log] == [10, 20, 30, 40]  # only rank 0 writes
    assert log[-1]["samples_per_s"] > 0


DDP_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
import torch.distributed as dist
from condiff.nets import TimeMLP
from condiff.schedule import Schedule
from condiff.train import DenoisingObjective, Trainer, TrainConfig, step_seed
x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
obj = DenoisingObjective(x, Schedule.linear(50), 16)
torch.manual_seed(0)
cfg = TrainConfig(steps=10, warmup=0, lr=1e-2, ckpt_every=100, log_every=5, progress=False, device="cpu")
tr = Trainer(TimeMLP(2, hidden=16, depth=1), obj, cfg, sys.argv[1])
tr.fit()
rank = dist.get_rank()
first = obj.loss(tr.model, 0, torch.Generator().manual_seed(step_seed(cfg.seed, 0, rank)))[0]  # this rank's batch
out = {"params": [p.tolist() for p in tr.model.parameters()], "first": float(first.detach())}
json.dump(out, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
"""


def test_ddp_ranks_draw_different_batches_and_keep_one_model(tmp_path, run_on_two_ranks):
    """The ranks' batches differ, yet after 10 steps their weights agree exactly: the gradients are
    averaged across ranks (without it, each rank would fit its own batches)."""
    run_on_two_ranks(DDP_SCRIPT)
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["first"] != r1["first"]
    assert r0["params"] == r1["params"]


def test_every_rank_refuses_a_run_dir_of_another_runs_checkpoints_together(tmp_path, run_on_two_ranks):
    """Rank 0 alone refused, and the other ranks went on into the first all-reduce (a hang outside torchrun)."""
    run_on_two_ranks(DDP_SCRIPT)  # a finished run of 10 steps, its checkpoint at step 10
    run_on_two_ranks(DDP_SCRIPT.replace("tr.fit()", """try:
    tr.fit()
except FileExistsError as e:
    open(os.path.join(sys.argv[1], f"refused{dist.get_rank()}.txt"), "w").write(str(e))""")
                     .replace("steps=10", "steps=20"))
    for k in (0, 1):
        assert "holds the checkpoints of another run (the newest step_00000010)" in (
            tmp_path / f"refused{k}.txt").read_text()


def test_a_train_config_made_directly_is_checked_too():
    # from_dict checked its ranges, the constructor did not: steps=-1 trained nothing, silently
    with pytest.raises(ValueError, match=r"TrainConfig.steps must be an integer >= 1, got -1"):
        TrainConfig(steps=-1)
    with pytest.raises(ValueError, match=r"TrainConfig.ema_decay must be a number in \[0, 1\)"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match=r"finetune.batch_size must be an integer >= 1, got 0"):
        TrainConfig.from_dict({"batch_size": 0}, "finetune")
    # kinds too: steps=2.5 trained 3 steps and never wrote its final checkpoint; seed=1.5 failed deep
    # inside the trainer; lr=inf trained to NaN; a bad device name failed inside torch
    for kw, match in [({"steps": 2.5}, "steps must be an integer >= 1, got 2.5"),
                      ({"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*63\), got 1.5"),
                      ({"lr": "a"}, "lr must be a number > 0, got 'a'"),
                      ({"lr": math.inf}, "lr must be a number > 0, got inf"),
                      ({"betas": (1.5, 0.0)}, r"betas must be two numbers in \[0, 1\)"),
                      ({"device": "bogus"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'bogus'"),
                      ({"progress": 1}, "progress must be true or false, got 1")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)
    assert TrainConfig(steps=20.0, betas=[0.5, 0.9]).steps == 20  # normalised: an int and a tuple
    assert TrainConfig(betas=[0.5, 0.9]).betas == (0.5, 0.9)
    # a zero batch was blamed on the data ("training loss is nan") at the first step
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        DenoisingObjective(torch.randn(5, 2), Schedule.linear(10), 0)


def test_objective_data_must_be_floating_point_with_one_label_each():
    """Integer data trained on noise alone (abar and the noise cast to integers); a label vector of
    the wrong length failed with an IndexError at the first step."""
    s = Schedule.linear(10)
    with pytest.raises(TypeError, match="training data must be a floating-point tensor, got dtype torch.int64"):
        DenoisingObjective(torch.ones(8, 2, dtype=torch.long), s, 4)
    with pytest.raises(ValueError, match=r"labels y must be a \(8,\) integer tensor, one per training sample, "
                                         r"got shape \(7,\)"):
        DenoisingObjective(torch.randn(8, 2), s, 4, y=torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="labels y must be"):
        DenoisingObjective(torch.randn(8, 2), s, 4, y=torch.zeros(8))
    # the loss runs without a generator (the hint allows None): the global one draws
    torch.manual_seed(0)
    a = denoising_loss(lambda x, t: torch.zeros_like(x), s, torch.randn(4, 2), None, None)
    assert a.shape == (4,) and bool(torch.isfinite(a).all())


def test_data_of_another_dtype_than_the_network_is_refused_before_training():
    """float64 data for a float32 network failed inside its first layer with a matmul dtype error."""
    objective = DenoisingObjective(torch.randn(8, 2, dtype=torch.float64), Schedule.linear(10), 4)
    with pytest.raises(ValueError, match="the training data is torch.float64 but the network's weights are "
                                         "torch.float32"):
        Trainer(TimeMLP(2, hidden=8, depth=1), objective, TrainConfig(steps=2, progress=False))


# --- the loop's arithmetic against closed forms ----------------------------------------------------


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    """Linear warm-up from lr/warmup to lr over the first `warmup` steps, then a cosine from lr to 0.1 lr."""
    x, s = torch.randn(8, 2), Schedule.linear(10)
    tr = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4),
                 TrainConfig(steps=20, lr=1.0, warmup=4, progress=False))
    assert [tr.lr_at(k) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert tr.lr_at(4) == pytest.approx(1.0) and tr.lr_at(12) == pytest.approx(0.1 + 0.9 * 0.5)
    assert tr.lr_at(20) == pytest.approx(0.1) and tr.lr_at(25) == pytest.approx(0.1)
    flat = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4),
                   TrainConfig(steps=20, lr=1.0, warmup=4, lr_decay="constant", progress=False))
    assert flat.lr_at(15) == 1.0


def test_resume_on_other_data_or_another_network_is_refused(tmp_path):
    """Trainer.resume() went on from any checkpoint whose weights loaded: other data, trained towards silently."""
    x, s = torch.rand(16, 2), Schedule.linear(10)

    def trainer(data, steps, meta=None):
        cfg = TrainConfig(steps=steps, warmup=0, ckpt_every=2, progress=False)
        return Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(data, s, 4), cfg, tmp_path, meta)

    trainer(x, 2).fit()
    with pytest.raises(ValueError, match=r"step_00000002, was written with other settings \(value_range differ\)"):
        trainer(x * 3, 4).resume()
    with pytest.raises(ValueError, match=r"\(schedule differ\)"):  # a meta of one's own is compared too
        trainer(x, 4, {"schedule": Schedule.linear(20).config()}).resume()
    assert trainer(x, 4, {"note": "not in the checkpoint: not compared"}).resume()
    tr = trainer(x, 4)
    assert tr.resume() and tr.step == 2
    # weights that do not fit the model: the refusal lists them and names the recorded settings that differ
    other = tmp_path / "other"
    Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4),
            TrainConfig(steps=2, warmup=0, ckpt_every=2, progress=False), other, {"net": {"hidden": 8}}).fit()
    wider = Trainer(TimeMLP(2, hidden=16, depth=1), DenoisingObjective(x, s, 4),
                    TrainConfig(steps=4, warmup=0, ckpt_every=2, progress=False), other, {"net": {"hidden": 16}})
    with pytest.raises(io.CheckpointError, match=r"does not match the model .*; it was written with other "
                                                 r"settings \(net differ\)$"):
        wider.resume()


def test_a_run_shorter_than_its_warm_up_is_warned_of_when_it_trains():
    x, s = torch.randn(8, 2), Schedule.linear(10)

    def fit(steps, warmup):
        tr = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4),
                     TrainConfig(steps=steps, warmup=warmup, progress=False))
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            tr.fit()
        return [str(w.message) for w in got]

    said = fit(5, 10)
    assert len(said) == 1 and "warm-up (10 steps) is longer than the run (5 steps)" in said[0]
    assert "never reaches 0.001" in said[0]
    assert fit(10, 10) == [] and fit(5, 0) == []  # with warmup = steps the last step reaches lr


class _BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.lin = torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2)

    def forward(self, x, t):
        return self.lin(self.bn(x))


def test_ema_after_one_step_and_its_buffers():
    """After step 1 the EMA decay is min(ema_decay, 2/11): ema = d p0 + (1 - d) p1; buffers are copied."""
    torch.manual_seed(0)
    net = _BatchNormNet()
    p0 = [p.detach().clone() for p in net.parameters()]
    tr = Trainer(net, DenoisingObjective(torch.randn(64, 2) + 3, Schedule.linear(10), 16),
                 TrainConfig(steps=1, lr=0.1, warmup=0, ema_decay=0.999, progress=False))
    tr.fit()
    d = 2 / 11
    for e, a, b in zip(tr.ema.parameters(), p0, tr.model.parameters()):
        assert not torch.equal(a, b)
        torch.testing.assert_close(e, d * a + (1 - d) * b)
    for e, b in zip(tr.ema.buffers(), tr.model.buffers()):
        assert torch.equal(e, b)
    assert float(tr.ema.bn.running_mean.abs().min()) > 0.1  # the buffers did move (data near 3)


def test_training_draws_every_timestep_including_zero():
    seen = []

    def spy(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    denoising_loss(spy, Schedule.linear(10), torch.randn(5000, 2), None, torch.Generator().manual_seed(0))
    assert torch.unique(seen[0]).tolist() == list(range(10))


class _GradNorm(DenoisingObjective):
    def after_step(self, model, step):
        self.norm = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
        return {}


def test_gradients_are_clipped_to_grad_clip():
    obj = _GradNorm(torch.randn(64, 2) * 5, Schedule.linear(10), 16)
    Trainer(TimeMLP(2, hidden=8, depth=1), obj, TrainConfig(steps=1, grad_clip=1e-3, progress=False)).fit()
    assert 0.5e-3 < obj.norm <= 1e-3 * (1 + 1e-5)


def test_checkpoints_kept_resume_of_a_finished_run_and_the_rng(tmp_path):
    x, s = torch.randn(32, 2), Schedule.linear(10)
    cfg = TrainConfig(steps=8, ckpt_every=2, keep=2, warmup=0, progress=False)
    Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4), cfg, tmp_path).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000006", "step_00000008"]
    again = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4), cfg, tmp_path)
    torch.manual_seed(123)
    assert again.resume() and again.step == 8  # a finished run resumes at its end, without an error
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000008" / "rng.safetensors"))["torch_cpu"]
    assert torch.equal(torch.get_rng_state(), saved)  # the global RNG is restored (dropout resumes exactly)
    # going on to more steps is no exact resume: the cosine decay spans the new count (said, not left to be found)
    longer = TrainConfig(steps=12, ckpt_every=2, keep=2, warmup=0, progress=False)
    with pytest.warns(UserWarning, match="set for 8 steps and now goes on to 12: its learning rate now decays"):
        assert Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4), longer, tmp_path).resume()
    flat = TrainConfig(steps=12, ckpt_every=2, keep=2, warmup=0, progress=False, lr_decay="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant rate does not depend on the step count
        Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4), flat, tmp_path).resume()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda c: c.pop("step"), "has no 'step' entry"),
    (lambda c: c.pop("optim"), "has no 'optim' entry"),
    (lambda c: c.update(step="abc"), "holds a bad setting: step must be an integer >= 0, got 'abc'"),
])
def test_resuming_from_a_damaged_checkpoint_config_names_the_file(tmp_path, damage, message):
    s = Schedule.linear(50)
    cfg = TrainConfig(steps=2, ckpt_every=2, warmup=0, progress=False)
    Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(torch.randn(8, 2), s, 4), cfg, run_dir=tmp_path).fit()
    (ckpt,) = list_checkpoints(tmp_path / "checkpoints")
    c = json.loads((ckpt / "config.json").read_text())
    damage(c)
    (ckpt / "config.json").write_text(json.dumps(c))
    tr = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(torch.randn(8, 2), s, 4), cfg, run_dir=tmp_path)
    with pytest.raises(io.CheckpointError, match=f"step_00000002/config.json {message}"):
        tr.resume()


def test_read_log_skips_a_garbled_line_as_it_skips_a_torn_one(tmp_path):
    from condiff.train import read_log

    (tmp_path / "log.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe garbage\n{"step": 2}\n{"step": 3')
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]


def test_label_drop_replaces_that_fraction_of_labels_by_the_null_class():
    obj = DenoisingObjective(torch.randn(10, 2), Schedule.linear(10), 20000, y=torch.arange(10) % 3, label_drop=0.2)
    _, y = obj.batch(torch.Generator().manual_seed(0))
    assert abs(float((y == -1).double().mean()) - 0.2) < 0.012  # 4 standard errors
    assert set(y[y != -1].tolist()) == {0, 1, 2}


def test_ema_decay_reaches_its_cap():
    """Past the warm-up of the decay (min(ema_decay, (1 + step) / (10 + step))), an EMA step is
    ema = d * ema + (1 - d) * param with d = ema_decay."""
    torch.manual_seed(0)
    tr = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(torch.randn(64, 2), Schedule.linear(10), 16),
                 TrainConfig(steps=30, lr=0.05, warmup=0, ema_decay=0.5, progress=False))
    tr.fit()
    before = [p.detach().clone() for p in tr.ema.parameters()]
    tr.cfg.steps = 31
    tr.fit()  # one more step: d = min(0.5, 32 / 41) = 0.5
    for e, b, p in zip(tr.ema.parameters(), before, tr.model.parameters()):
        torch.testing.assert_close(e, 0.5 * b + 0.5 * p)


def test_the_optimiser_takes_the_configs_betas_and_weight_decay():
    net = TimeMLP(2, hidden=8, depth=1)
    tr = Trainer(net, DenoisingObjective(torch.randn(8, 2), Schedule.linear(10), 4),
                 TrainConfig(steps=1, betas=(0.5, 0.99), weight_decay=0.01, progress=False))
    group = tr.opt.param_groups[0]
    assert group["betas"] == (0.5, 0.99) and group["weight_decay"] == 0.01


def test_a_second_ctrl_c_while_condiff_shuts_down_is_ignored(tmp_path):
    """After "condiff: interrupted" the process takes about a second to exit; a second Ctrl-C then ended it
    with -2 instead of 130, or printed a traceback from an atexit callback."""
    import time

    err, run = tmp_path / "err", tmp_path / "r"
    with open(err, "w") as f:  # SIGINT as a terminal gives it (a shell running pytest in the background ignores it)
        proc = subprocess.Popen(_cli("train", *TINY, "--set", "train.steps=100000", "--out", str(run)), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=f,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        while "condiff: interrupted" not in err.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)  # while it shuts down
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert rc == 130 and "Traceback" not in text and "Exception ignored" not in text, (rc, text)


def test_resuming_from_a_damaged_newest_checkpoint_names_the_one_before(tmp_path):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def trainer(hidden=8):
        cfg = TrainConfig(steps=4, progress=False, log_every=2, ckpt_every=2, batch_size=16, warmup=0)
        return Trainer(TimeMLP(2, hidden=hidden, depth=1), DenoisingObjective(x, Schedule.linear(50), 16), cfg,
                       tmp_path)

    trainer().fit()
    with pytest.raises(io.CheckpointError, match=r"does not match the model \(other settings\?\)") as err:
        trainer(hidden=16).resume()
    assert "delete" not in str(err.value)  # a good checkpoint of other settings: no advice to delete it
    newest = tmp_path / "checkpoints" / "step_00000004"
    for f in newest.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(io.CheckpointError, match=f"; delete {newest} to resume from step_00000002$"):
        trainer().resume()


def test_the_log_after_a_kill_and_a_fresh_start_is_that_of_one_uninterrupted_run(tmp_path):
    """Resuming from a checkpoint keeps its own step's log line (it dropped it), and a run from step 0 starts
    its log afresh (it appended to a killed run's lines)."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    s = Schedule.linear(50)
    cfg = TrainConfig(steps=15, warmup=0, progress=False, log_every=5, ckpt_every=10, batch_size=8)

    def trainer(d):
        torch.manual_seed(0)
        return Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 8), cfg, d)

    trainer(tmp_path / "ref").fit()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 3, "loss": 9.0}\n')  # a killed run's, before any checkpoint
    trainer(tmp_path / "run").fit()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000015")  # killed after step 15's log line
    again = trainer(tmp_path / "run")
    assert again.resume() and again.step == 10
    again.fit()
    keys = ("step", "loss", "lr")
    logs = [[{k: r[k] for k in keys} for r in read_log(d / "log.jsonl")] for d in (tmp_path / "ref", tmp_path / "run")]
    assert [r["step"] for r in logs[1]] == [5, 10, 15] and logs[0] == logs[1]


def _trainer4(tmp_path, x):
    cfg = TrainConfig(steps=4, progress=False, log_every=2, ckpt_every=2, batch_size=16, warmup=0)
    return Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, Schedule.linear(50), 16), cfg, tmp_path)


def test_resume_sweeps_a_half_written_checkpoint_and_takes_the_newest_whole_one(tmp_path):  # m58 train.py:420
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    _trainer4(tmp_path, x).fit()
    half = tmp_path / "checkpoints" / ".step_00000006"  # a write killed half-way
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"torn")
    tr = _trainer4(tmp_path, x)
    assert tr.resume() and tr.step == 4
    assert not half.exists() and [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "step_00000004"


def test_a_damaged_only_checkpoint_is_named_with_no_other_to_resume_from(tmp_path):  # m59 train.py:428
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=2, progress=False, ckpt_every=2, batch_size=16, warmup=0)
    Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, Schedule.linear(50), 16), cfg, tmp_path).fit()
    (only,) = list_checkpoints(tmp_path / "checkpoints")
    for f in only.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:40])
    tr = Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, Schedule.linear(50), 16), cfg, tmp_path)
    with pytest.raises(io.CheckpointDamaged, match=r"corrupted or truncated checkpoint file .*step_00000002") as err:
        tr.resume()
    assert "delete" not in str(err.value)  # no checkpoint before it to point to


def test_the_training_bar_in_a_log_is_not_redrawn_at_every_log_line(capsys):
    """Off a terminal a bar refreshes every 10 s; the trainer's loss figures redrew it at each log line
    (set_postfix refreshes), a line in a CI log every 50 steps."""
    s = Schedule.linear(50)
    cfg = TrainConfig(steps=40, batch_size=8, warmup=0, log_every=1, progress=True)
    Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(torch.randn(32, 2), s, 8), cfg).fit()
    drawn = capsys.readouterr().err.count("\r")
    assert 1 <= drawn <= 4, drawn  # its first draw, the last, and its clearing; 40 steps of a log line each drew 42


def test_the_ranks_wait_at_the_end_for_a_rank_0_busier_than_the_groups_timeout(tmp_path, run_on_two_ranks):
    """The exit barrier ran in the training group, whose timeout (30 min gloo, 10 min NCCL) a rank 0 sampling and
    scoring after training could outlast: the other ranks failed after the work was done."""
    run_on_two_ranks("""
import datetime, sys, time, torch
torch.set_num_threads(1)
import torch.distributed as dist
import condiff.train as train
from condiff.nets import TimeMLP
from condiff.schedule import Schedule
from condiff.train import DenoisingObjective, Trainer, TrainConfig
train.GROUP_TIMEOUT = datetime.timedelta(seconds=2)  # the training group's, shortened for the test
cfg = TrainConfig(steps=2, batch_size=8, warmup=0, progress=False, device="cpu")
Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(torch.randn(32, 2), Schedule.linear(20), 8), cfg,
        sys.argv[1] + "/run").fit()
if dist.get_rank() == 0:
    time.sleep(5)  # rank 0's work after training, longer than the group's timeout
""")
    assert (tmp_path / "ended0").exists() and (tmp_path / "ended1").exists()


def test_without_a_gloo_group_the_ranks_wait_in_the_training_group_with_a_warning(monkeypatch):
    """Every CUDA torchrun job now makes a gloo group for its wait at the end; a host where gloo cannot connect
    (the wrong network interface) failed a job that NCCL alone could run."""
    import torch.distributed as dist

    import condiff.train as train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "new_group", lambda **kw: (_ for _ in ()).throw(RuntimeError("no interface")))
    monkeypatch.setattr(train, "_joined", False)
    monkeypatch.setattr(train, "_exit_group", None)
    with pytest.warns(UserWarning, match=r"no gloo group for the wait at the end \(RuntimeError: no interface\).*"
                                         "GLOO_SOCKET_IFNAME"):
        info = train.init_distributed("cpu")
    assert info.world == 2 and train._joined and train._exit_group is None


def test_seeded_for_a_gpu_on_a_machine_without_one_leaves_the_device_to_the_caller(monkeypatch):
    """seeded(seed, "cuda") started CUDA before anything had checked the device: train_diffusion on a machine
    without CUDA failed with torch's "not compiled with CUDA" rather than condiff's one line."""
    from condiff import determinism
    from condiff.mirror.fit import train_diffusion

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: pytest.fail("CUDA started without a GPU"))
    with determinism.seeded(0, "cuda:1"):
        pass
    cfg = TrainConfig(steps=1, batch_size=4, warmup=0, progress=False, device="cuda")
    with pytest.raises(ValueError, match="cuda was asked for but no CUDA device is available"):
        train_diffusion(torch.randn(8, 2), {"name": "mlp", "dim": 2, "hidden": 8, "depth": 1}, Schedule.linear(20),
                        cfg)
