"""`condiff show`: what a run, model or checkpoint directory holds, read without changing anything."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from condiff.cli.main import main

TINY = ["--data", "toy2d", "--set", "model.hidden=32", "--set", "model.depth=1", "--set", "data.n=256",
        "--set", "train.steps=4", "--set", "train.ckpt_every=2", "--set", "train.keep=5", "--set",
        "train.batch_size=16", "--set", "train.progress=false", "--set", "schedule.T=20"]
EXAMPLE_NET = Path(__file__).resolve().parent.parent / "examples" / "own_net" / "net.py"


@pytest.fixture
def run(train_once, tmp_path):
    return Path(shutil.copytree(train_once(TINY), tmp_path / "run"))


def _show(capsys, *args):
    capsys.readouterr()
    rc = main(["show", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_show_a_finished_run_counts_its_parameters_from_the_weights_and_changes_nothing(run, capsys):
    before = _tree(run)
    rc, out, _ = _show(capsys, run, "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["kind"] == "condiff train" and d["state"] == "finished"
    t = d["trainings"]["."]
    weights = load_file(run / "model" / "model.safetensors")
    assert t["model"]["parameters"] == sum(v.numel() for v in weights.values())  # the header, read by hand
    assert t["model"]["steps"] == 4 and t["checkpoint"] == {"name": "step_00000004", "step": 4, "of": 4}
    assert t["last_log"]["step"] == 4 and d["settings"]["data"] == "toy2d" and d["settings"]["training steps"] == 4
    rc, out, _ = _show(capsys, run)
    assert rc == 0 and out.splitlines()[0] == f"{run}: condiff train run, finished"
    assert "training: finished; model/: mlp," in out and "4 steps" in out
    assert _tree(run) == before  # nothing written, moved or swept


def test_show_an_interrupted_run_says_where_it_stopped_and_the_command_that_goes_on(run, capsys):
    shutil.rmtree(run / "model")  # as a Ctrl-C after the checkpoint of step 2 leaves it
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    rc, out, _ = _show(capsys, run)
    assert rc == 0 and out.splitlines()[0] == f"{run}: condiff train run, unfinished"
    assert "training: unfinished at step 2 of 4; newest checkpoint step_00000002" in out
    go_on = f"condiff train --out {run} --resume"
    assert f"to go on: {go_on}" in out
    assert main(go_on.split()[1:]) == 0  # the command it names does go on, to the end
    rc, out, _ = _show(capsys, run)
    assert out.splitlines()[0] == f"{run}: condiff train run, finished" and "to go on" not in out


def test_show_a_checkpoint_a_model_and_a_folder_of_runs(run, tmp_path, capsys):
    rc, out, _ = _show(capsys, run / "checkpoints" / "step_00000002")
    assert rc == 0 and "a checkpoint directory" in out and "step 2 of 4" in out
    rc, out, _ = _show(capsys, run / "model", "--json")
    d = json.loads(out)
    assert d["kind"] == "model" and d["format"] == "condiff-model" and d["steps"] == 4 and d["parameters"] > 0
    shutil.copytree(run, tmp_path / "more" / "deeper" / "other")
    (tmp_path / "empty").mkdir()
    rc, out, _ = _show(capsys, tmp_path)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f"{tmp_path}: 2 runs"
    assert [ln.split()[0] for ln in lines[1:]] == ["more/deeper/other", "run"]
    assert all("condiff train" in ln and "finished" in ln for ln in lines[1:])
    # a run kept elsewhere and linked in is listed (links were not looked at); a link to a folder is not entered
    (tmp_path / "more" / "linked").symlink_to(run)
    (tmp_path / "loop").symlink_to(tmp_path)
    (tmp_path / "more" / "cycle1").symlink_to(tmp_path / "more" / "cycle2")  # a loop hid every linked run beside it
    (tmp_path / "more" / "cycle2").symlink_to(tmp_path / "more" / "cycle1")
    rc, out, _ = _show(capsys, tmp_path)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f"{tmp_path}: 3 runs"
    assert [ln.split()[0] for ln in lines[1:]] == ["more/deeper/other", "more/linked", "run"]
    # the link is marked as one (beside its target it read as a second run)
    assert [ln.endswith(f"(a link to {run.resolve()})") for ln in lines[1:]] == [False, True, False]
    rc, out, _ = _show(capsys, tmp_path, "--json")
    assert [r.get("link_to") for r in json.loads(out)["runs"]] == [None, str(run.resolve()), None]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is a file; condiff show takes a run, model or checkpoint directory"),
    (lambda p: p.mkdir(), "is not a condiff run, model or checkpoint directory, and holds no run"),
])
def test_show_refuses_what_holds_no_run_in_one_line(tmp_path, capsys, make, message):
    make(tmp_path / "x")
    rc, out, err = _show(capsys, tmp_path / "x")
    assert rc == 2 and out == "" and err.startswith(f"condiff show: error: {tmp_path / 'x'} {message}")
    assert err.count("\n") == 1


def test_show_names_the_results_figures_first_and_a_run_being_written(run, capsys):
    assert main(["eval", "--ckpt", str(run), "--n", "32", "--steps", "4"]) == 0
    rc, out, _ = _show(capsys, run)
    line = next(ln for ln in out.splitlines() if ln.startswith("  metrics.json: "))
    assert line.split(": ", 1)[1].startswith(f"[ckpt {run}, n 32] mmd ") and "more there" in line  # a figure first
    assert "no record beside it" not in out
    m = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**m, "label": 3}))  # a class-conditional eval: its class is said
    rc, out, _ = _show(capsys, run)
    assert "label 3" in next(ln for ln in out.splitlines() if ln.startswith("  metrics.json: "))
    # a stop between the final moves of a set (condiff.io.writing_outputs) leaves its data without its record
    (run / "metrics.json").unlink()
    assert main(["sample", "--ckpt", str(run), "--n", "4", "--steps", "2"]) == 0
    (run / "samples" / "sample_config.json").unlink()
    rc, out, _ = _show(capsys, run)
    notes = [ln for ln in out.splitlines() if "no record beside it" in ln]
    assert notes == ["  note: samples.npz has no record beside it (a command stopped while moving its results in): "
                     "run that command again",
                     "  note: samples/samples.npz has no record beside it (a command stopped while moving its results "
                     "in): run that command again"]
    holder = subprocess.Popen(  # another process writing the run (it holds the run's lock)
        [sys.executable, "-c", "import sys, time\nfrom condiff import io\nio.lock_run(sys.argv[1])\n"
         "print('locked', flush=True)\ntime.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, out, _ = _show(capsys, run)
        assert rc == 0 and f"note: being written now by process {holder.pid}" in out
    finally:
        holder.kill()
        holder.wait()


def test_show_says_whether_a_net_file_of_ones_own_is_as_used_and_trusted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    shutil.copy(EXAMPLE_NET, tmp_path / "net.py")
    assert main(["train", "--data", "digits", "--set", "model.name=net.py:SmallConvNet", "--set", "train.steps=2",
                 "--set", "train.batch_size=8", "--set", "train.progress=false", "--out", "own"]) == 0
    rc, out, _ = _show(capsys, "own")
    assert f"code of one's own: {tmp_path / 'net.py'} (as used; trusted here)" in out
    assert f"model/: {tmp_path / 'net.py'}:SmallConvNet," in out
    (tmp_path / "net.py").write_text((tmp_path / "net.py").read_text() + "\n# edited\n")
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "elsewhere"))
    rc, out, _ = _show(capsys, "own")
    assert (f"code of one's own: {tmp_path / 'net.py'} (edited since it was used; not trusted here: "
            f"condiff trust {tmp_path / 'net.py'})") in out
    assert not (tmp_path / "elsewhere" / "trusted_code.json").exists()  # showing trusts nothing
    os.remove(tmp_path / "net.py")
    rc, out, _ = _show(capsys, "own")
    assert rc == 0 and f"code of one's own: {tmp_path / 'net.py'} (missing)" in out


_NAMM_FIT = ["namm", "fit", "--data", "data.npz", "--constraint", "box", "--out", "run", "--profile", "quick",
             "--set", "mirror_train.steps=2", "--set", "train.steps=2", "--set", "train.warmup=0", "--set",
             "model.mults=[1, 2]", "--set", "mirror.inverse.downsamples=1", "--quiet"]


@pytest.fixture
def namm_run(tmp_path, monkeypatch):
    """A tiny NAMM run fitted in ``tmp_path/run`` (the working directory is ``tmp_path``)."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).uniform(-1, 1, (48, 1, 8, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x[:32], x_test=x[32:])
    assert main(_NAMM_FIT) == 0
    return tmp_path / "run"


def test_show_a_namm_run_lists_its_stages_in_the_order_they_are_made(namm_run, capsys):
    rc, out, _ = _show(capsys, "run")
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "run: condiff namm fit run, finished"
    assert [ln.split(":")[0].strip() for ln in lines[2:5]] == ["namm", "mdm", "vanilla"]
    assert "mirror/: mirror map: psi icnn, inverse resnet," in lines[2] and "constraint box" in lines[1]
    rc, out, _ = _show(capsys, "run/namm")  # a stage: not "a run just begun (nothing written yet), finished"
    assert rc == 0 and out.splitlines()[0] == "run/namm: a stage of the NAMM run run, finished"
    for stage in ("run/namm", "run/namm/mirror"):  # given as --run: "its config.json has no mirror settings"
        assert main(["namm", "sample", "--run", stage]) == 2
        assert f"{stage} is a stage of the NAMM run run, not the run: pass --run run" in capsys.readouterr().err


def test_a_namm_fit_stopped_before_its_baseline_is_shown_unfinished_and_goes_on(namm_run, capsys):
    """A fit stopped before the vanilla DM: show said "finished", sample dropped the baseline without a word,
    and going on meant typing the whole fit command again, each --set included."""
    shutil.rmtree(namm_run / "vanilla")  # as a fit interrupted in its mdm stage leaves the run
    rc, out, _ = _show(capsys, "run")
    assert rc == 0 and out.splitlines()[0] == "run: condiff namm fit run, unfinished"
    assert "  not made yet: vanilla; to go on: condiff namm fit --out run --resume" in out.splitlines()
    assert main(["namm", "fit", "--out", "run", "--resume", "--data", "burgers"]) == 2
    assert "--resume goes on with the settings the run records; --data would change them" in capsys.readouterr().err
    assert main(["namm", "fit", "--out", "run", "--resume", "--profile", "default"]) == 2
    assert "it was fitted with --profile quick, not default" in capsys.readouterr().err
    assert main(["namm", "fit", "--out", "run", "--resume", "--profile", "quick", "--quiet"]) == 0
    assert json.loads((namm_run / "vanilla" / "stage.json").read_text())["done"]
    shutil.rmtree(namm_run / "vanilla")
    capsys.readouterr()
    assert main(["namm", "sample", "--run", "run", "--n", "4", "--no-finetuned", "--set", "sample.steps=2",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "making run/vanilla: the vanilla diffusion model, 2 steps; the fit stopped before it" in err
    assert "vanilla" in json.loads((namm_run / "samples" / "metrics.json").read_text())
    # a rerun that leaves out --profile quick is told so, not only which settings differ
    assert main([a for a in _NAMM_FIT if a not in ("--profile", "quick")]) == 2
    assert "(this run was fitted with --profile quick; this command asks for default)" in capsys.readouterr().err


def test_show_notes_namm_stages_and_results_made_from_a_stage_since_replaced(namm_run, capsys):
    tiny = ["--set", "sample.steps=2", "--set", "finetune.steps=2", "--set", "finetune.n=4", "--quiet"]
    assert main(["namm", "sample", "--run", "run", "--n", "4", "--no-finetuned", *tiny]) == 0
    assert main(["namm", "finetune", "--run", "run", *tiny]) == 0  # made after results that did not use it
    assert main(["namm", "assimilate", "--run", "run", "--no-baselines", "--set", "assimilate.steps=2", "--set",
                 "assimilate.n=2", "--quiet"]) == 0
    made = json.loads((namm_run / "assimilate" / "metrics.json").read_text())["made_from"]
    assert set(made) == {"namm", "mdm", "finetune"}  # what mirror DPS used (no baselines: no vanilla)
    rc, out, _ = _show(capsys, "run")
    assert rc == 0 and "made from another" not in out
    # the mirror map made again with other settings: the fit remakes the mdm; the fine-tuning and the
    # samples are left describing the map it replaced
    assert main([*_NAMM_FIT, "--set", "mirror_train.steps=3", "--fresh"]) == 0
    rc, out, _ = _show(capsys, "run")
    notes = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("note:")]
    assert notes == [
        "note: finetune/ was made from another namm/, mdm/ than the one there now: it describes what that replaced "
        "(condiff namm finetune --run run --fresh makes it again)",
        "note: samples/metrics.json was made from another namm/, mdm/ than the one there now (condiff namm sample "
        "--run run --n 4 --no-finetuned makes it again once the stages above are made again)",
        "note: assimilate/metrics.json was made from another namm/, mdm/ than the one there now (condiff "
        "namm assimilate --run run --obs points --no-baselines makes it again once the stages above are made again)"]
    assert main(["namm", "finetune", "--run", "run", "--fresh", *tiny]) == 0
    assert main(["namm", "sample", "--run", "run", "--n", "4", *tiny]) == 0
    assert main(["namm", "assimilate", "--run", "run", "--no-baselines", "--set", "assimilate.steps=2", "--set",
                 "assimilate.n=2", "--quiet"]) == 0
    rc, out, _ = _show(capsys, "run")
    assert "note:" not in out
    # a sample set redrawn under a report that a Ctrl-C kept (the sets are a cache; the report stays whole)
    f = namm_run / "samples" / "vanilla" / "stage.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "done": False}))
    rc, out, _ = _show(capsys, "run")
    assert [ln.strip() for ln in out.splitlines() if ln.strip().startswith("note:")] == [
        "note: samples/metrics.json was made from another samples/vanilla/ than the one there now (condiff namm "
        "sample --run run --n 4 makes it again)"]


def test_show_notes_a_kept_run_and_a_checkpoint_that_does_not_read(run, capsys):
    shutil.rmtree(run / "model")
    (run / "checkpoints" / "step_00000004" / "config.json").write_text("{broken")
    (run / ".replaced" / "model").mkdir(parents=True)
    rc, out, _ = _show(capsys, run)
    assert rc == 0 and "training: unfinished (its newest checkpoint, step_00000004, does not read)" in out
    assert f"note: {run / '.replaced'} keeps the run an unfinished --fresh / --retrain replaced (model)" in out
    assert f"(README, 'Run directories'); `condiff train --out {run} --restore` puts it back" in out


def test_show_a_hand_edited_run_shows_what_reads_and_refuses_nothing(run, capsys):
    (run / "config.json").write_text(json.dumps({"data": "digits", "model": [1], "schedule": 3, "train": None}))
    (run / ".condiff-run").unlink()
    cfg = json.loads((run / "model" / "config.json").read_text())
    (run / "model" / "config.json").write_text(json.dumps({**cfg, "steps": "four", "net": "mlp"}))
    rc, out, _ = _show(capsys, run)
    assert rc == 0 and out.splitlines()[0] == f"{run}: condiff train run, finished"  # kind guessed from config
    # the model records no step count that reads, and its training reached its last step: finished (it read
    # "unfinished at step 4 of 4")
    assert "training: finished;" in out


def test_show_a_diffusers_model_directory(tiny_diffusers_dir, capsys):
    rc, out, _ = _show(capsys, tiny_diffusers_dir, "--json")
    d = json.loads(out)
    weights = load_file(tiny_diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert rc == 0 and d["kind"] == "diffusers model" and d["net"] == "UNet2DModel"
    assert d["parameters"] == sum(v.numel() for v in weights.values())
    rc, out, _ = _show(capsys, tiny_diffusers_dir)
    assert out.splitlines()[0] == f"{tiny_diffusers_dir}: a diffusers model directory"


def test_show_reads_past_a_log_that_is_not_text_a_dangling_weights_link_and_a_replaced_of_records_only(run, capsys):
    (run / "log.jsonl").write_bytes(b"\xff\xfe not utf-8")
    (run / "model" / "extra.safetensors").symlink_to(run / "gone.safetensors")
    (run / ".replaced").mkdir()
    (run / ".replaced" / ".set-aside").write_text('["model"]')  # everything was moved back by hand
    rc, out, _ = _show(capsys, run)
    assert rc == 0 and "training: finished; model/: mlp," in out and "last logged" not in out
    assert "note:" not in out  # nothing is kept there


def test_show_each_path_that_reads_and_a_line_for_each_that_does_not(run, tmp_path, capsys):
    """One stray path (`condiff show runs/*`) hid every run; and a run a command has just claimed (its .lock
    alone) was 'not a condiff run'."""
    (tmp_path / "starting").mkdir()
    (tmp_path / "starting" / ".lock").write_text("123")
    rc, out, err = _show(capsys, run, tmp_path / "nope", tmp_path / "starting")
    assert rc == 2 and err == f"condiff show: error: {tmp_path / 'nope'} does not exist\n"
    first, second = out.split("\n\n")
    assert first.startswith(f"{run}: condiff train run, finished")
    assert second.strip() == f"{tmp_path / 'starting'}: a run just begun (nothing written yet)"
    rc, out, _ = _show(capsys, tmp_path)
    assert rc == 0 and [ln.split()[0] for ln in out.splitlines()[1:]] == ["run", "starting"]
    assert out.splitlines()[2].split()[1] == "(just" and "unrecorded" not in out  # the listing names it alike


def test_a_dual_experiment_cut_short_is_named_with_the_way_on(run, tmp_path, capsys):
    """`condiff dual toy` interrupted read as "a run just begun (nothing written yet)", its checkpoints there."""
    exp = tmp_path / "exp"
    shutil.copytree(run / "checkpoints", exp / "constrained" / "checkpoints")
    (exp / "constrained" / "key.json").write_text('"a key"')
    rc, out, _ = _show(capsys, exp)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f"{exp}: a dual experiment's run, cut short (its command is recorded when it " \
                                   "finishes), unfinished"
    assert f"    to go on: the `condiff dual` experiment that made it, run again with --out {exp}" in lines


def test_an_unfinished_fine_tuning_shows_the_settings_it_goes_on_with(tmp_path, capsys):
    """show said `condiff namm finetune --run RUN` for a fine-tuning begun with --set, and that command was refused."""
    run = tmp_path / "run"
    (run / "finetune" / "checkpoints" / "step_00000050").mkdir(parents=True)
    (run / ".condiff-run").write_text("condiff namm fit\n")
    cfg = {"mirror": {}, "train": {"steps": 4}, "finetune": {"steps": 3, "ckpt_every": 50, "loss": {"l_con": 2.0}},
           "sample": {"steps": 5, "eta": 1.0}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "finetune" / "stage.json").write_text(json.dumps({"done": False, "spec": {
        "mirror": {}, "train": {"steps": 4}, "finetune": {"steps": 3000, "ckpt_every": 50, "loss": {"l_con": 1.0}},
        "sampler": {"steps": 7, "eta": 1.0}}}))
    (run / "finetune" / "checkpoints" / "step_00000050" / "config.json").write_text(
        json.dumps({"step": 50, "optim": {}, "train": {"steps": 3000}}))
    rc, out, _ = _show(capsys, run)
    assert rc == 0 and (f"to go on: condiff namm finetune --run {run} --set finetune.loss.l_con=1.0 --set "
                        "finetune.steps=3000 --set sample.steps=7\n" in out), out
    # a stage it is made from was made again since: no flags go on with it, only --fresh
    (run / "config.json").write_text(json.dumps({**cfg, "train": {"steps": 5}}))
    rc, out, _ = _show(capsys, run)
    assert f"to go on: condiff namm finetune --run {run} --fresh\n" in out, out


def test_a_run_whose_weights_record_no_step_count_is_finished_when_its_training_was(tmp_path, capsys):
    """A run trained from Python (Trainer, then save_model without steps) read "unfinished at step 50 of 50"."""
    from condiff.models import save_model
    from condiff.nets import TimeMLP
    from condiff.schedule import Schedule

    run = tmp_path / "run"
    save_model(run / "model", TimeMLP(2, hidden=8, depth=1), Schedule.linear(10), shape=[2])
    ck = run / "checkpoints" / "step_00000050"
    ck.mkdir(parents=True)
    for of, state in ((50, "finished"), (100, "unfinished at step 50 of 100")):
        (ck / "config.json").write_text(json.dumps({"step": 50, "optim": {}, "train": {"steps": of}}))
        rc, out, _ = _show(capsys, run)
        assert rc == 0 and f"training: {state}" in out, out


def test_a_saved_mirror_map_is_shown_as_a_model_not_as_a_namm_run(tmp_path, capsys):
    """`condiff show runs` listed a save_mirror folder as a `condiff namm fit` run (its config.json names a
    mirror), with the fit's stages missing."""
    from condiff.mirror import build_mirror, save_mirror

    save_mirror(tmp_path / "runs" / "map", build_mirror((1, 8, 8), {"name": "icnn", "filters": 4, "layers": 2},
                                                        {"name": "resnet", "base": 4, "blocks": 1}, a=0.9))
    rc, out, _ = _show(capsys, tmp_path / "runs" / "map")
    assert rc == 0 and out.splitlines()[0] == f"{tmp_path / 'runs' / 'map'}: a model directory"
    assert "mirror map: psi icnn, inverse resnet" in out
    rc, out, _ = _show(capsys, tmp_path / "runs")
    assert "condiff namm fit" not in out


@pytest.mark.parametrize(("damage", "note"), [
    (lambda r: os.truncate(r / "model" / "model.safetensors", 100),
     "model/model.safetensors does not open (torn, or not a safetensors file): the weights are damaged"),
    (lambda r: (r / "config.json").write_text("{"), "config.json does not read (not valid JSON)"),
    (lambda r: (r / "model" / "config.json").write_text("[]"), "model/config.json does not read (not a table of"),
    (lambda r: (r / "metrics.json").write_text("oops"), "metrics.json does not read (not valid JSON)"),
    (lambda r: ((r / "samples").mkdir(), (r / "samples" / "sample_config.json").write_text('{"n": 2, "steps":')),
     "samples/sample_config.json does not read (not valid JSON)"),
])
def test_show_names_a_damaged_file_rather_than_leaving_its_line_out(run, capsys, damage, note):
    """A torn weights file, a broken config.json or metrics.json: show said `finished` and left their lines out."""
    (run / "metrics.json").write_text(json.dumps({"mmd": 0.5}))
    damage(run)
    rc, out, _ = _show(capsys, run)
    assert rc == 0 and f"note: {note}" in out
    rc, out, _ = _show(capsys, run, "--json")
    assert any(note in n for n in json.loads(out)["notes"])


def test_show_gives_a_sample_folders_record_and_refuses_an_empty_path(run, capsys):
    """`show RUN/samples` said only "condiff sample run", `show RUN` never listed the samples, and `show ''` showed
    the current folder as '.'."""
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--steps", "2", "--seed", "5"]) == 0
    for shown, name in ((run / "samples", "sample_config.json"), (run, "samples/sample_config.json")):
        rc, out, _ = _show(capsys, shown)
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{name}:"))
        assert rc == 0 and f"[ckpt {run}, n 3] steps 2, eta " in line and ", seed 5," in line
    # an eval's record names its n with its model, beside figures that few samples make noise of
    assert main(["eval", "--ckpt", str(run), "--n", "6", "--steps", "2", "--out", str(run / "ev6")]) == 0
    rc, out, _ = _show(capsys, run)
    assert f"ev6/metrics.json: [ckpt {run}, n 6] " in out
    rc, out, err = _show(capsys, "")
    assert rc == 2 and out == "" and err == "condiff show: error: an empty path was given\n"
