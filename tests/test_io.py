"""condiff.io: atomic writes, JSON without NaN, checkpoints replaced in place, run locks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from condiff import io


def test_atomic_writes_go_through_a_sibling(tmp_path, monkeypatch):
    """The temporary file sits beside the target (a rename across file systems fails) and is gone after."""
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append((a, b)), real(a, b))[1])
    io.write_text_atomic(tmp_path / "sub" / "f.txt", "hello")
    assert len(seen) == 1 and os.path.dirname(seen[0][0]) == str(tmp_path / "sub")
    assert os.listdir(tmp_path / "sub") == ["f.txt"] and (tmp_path / "sub" / "f.txt").read_text() == "hello"


def test_json_holds_no_nan_anywhere_and_takes_sets(tmp_path):
    io.write_json_atomic(tmp_path / "m.json", {"a": [1.0, math.nan, {"b": math.nan}], "s": {2}, "t": (3, 4)})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"a": [1.0, None, {"b": None}], "s": [2], "t": [3, 4]}


def test_a_value_json_cannot_hold_is_named_by_its_key_and_a_checkpoint_holds_no_bare_nan(tmp_path):
    """save_model(..., note=object()) said "cannot write object to JSON" without naming note."""
    with pytest.raises(TypeError, match=r"cannot write object to JSON \(the value of note.parts.1\)"):
        io.save_checkpoint(tmp_path / "m", {"model": {"w": torch.ones(1)}}, {"note": {"parts": [1, object()]}})
    assert not (tmp_path / "m").exists()
    io.save_checkpoint(tmp_path / "m", {"model": {"w": torch.ones(1)}}, {"span": [math.nan, 1.0]})
    assert "NaN" not in (tmp_path / "m" / "config.json").read_text() and io.load_config(tmp_path / "m")["span"] == [
        None, 1.0]


def test_a_checkpoint_saved_again_replaces_the_old_one_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "ckpt" / "step_1"
    for value in (1.0, 2.0):
        io.save_checkpoint(path, {"model": {"w": torch.full((2,), value)}}, {"step": value})
    assert os.listdir(path.parent) == ["step_1"]
    assert io.load_config(path)["step"] == 2.0 and torch.equal(io.load_group(path, "model")["w"], torch.full((2,), 2.0))


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_checkpoint_is_not_saved_over_what_is_not_one(tmp_path):
    """save_model(run, ...) deleted the run's checkpoints and log; a path naming a file became a directory
    with the real weights hidden beside it."""
    run = tmp_path / "run"
    io.save_checkpoint(run / "checkpoints" / "step_1", {"model": {"w": torch.ones(2)}}, {})
    (run / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match=rf"cannot save a checkpoint at {run}: it holds checkpoints/, "
                                              r"notes.txt, which are not a checkpoint's files"):
        io.save_checkpoint(run, {"model": {"w": torch.zeros(2)}}, {})
    weights = run / "checkpoints" / "step_1" / "model.safetensors"
    with pytest.raises(FileExistsError, match=r"it is a file, and a checkpoint is a directory"):
        io.save_checkpoint(weights, {"model": {"w": torch.zeros(2)}}, {})
    assert _tree(tmp_path) == before
    (tmp_path / "empty").mkdir()  # an empty directory, or a checkpoint, is replaced
    for path in (tmp_path / "empty", run / "checkpoints" / "step_1"):
        io.save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, {})
        assert torch.equal(io.load_group(path, "model")["w"], torch.zeros(2))


def test_save_model_names_a_wrong_schedule_and_value_range():
    from condiff.models import save_model
    from condiff.nets import build_net
    from condiff.schedule import Schedule

    net = build_net({"name": "mlp", "dim": 2, "hidden": 8, "depth": 1})
    with pytest.raises(TypeError, match="save_model needs the noise schedule .*, got NoneType"):
        save_model("unused", net, None)
    for bad in ([math.nan, 1.0], [1.0, 0.0], [0, 1, 2]):
        with pytest.raises(ValueError, match=r"value_range must be the data's \[min, max\].*min <= max, got"):
            save_model("unused", net, Schedule.linear(10), value_range=bad)
    assert not Path("unused").exists()


def test_save_model_takes_the_value_range_of_constant_data_and_as_an_array(tmp_path):
    """min < max was asked for: a model trained on constant data could never be saved."""
    import numpy as np

    from condiff.models import save_model
    from condiff.nets import build_net
    from condiff.schedule import Schedule

    net = build_net({"name": "mlp", "dim": 2, "hidden": 8, "depth": 1})
    for span in ([0.5, 0.5], np.array([-1.0, 2.0])):
        save_model(tmp_path / "m", net, Schedule.linear(10), value_range=span)
        assert io.load_config(tmp_path / "m")["value_range"] == [float(v) for v in span]


@pytest.mark.parametrize("fail_on", [1, 2])
def test_a_checkpoint_replace_that_fails_keeps_the_old_one_at_its_name(tmp_path, monkeypatch, fail_on):
    """Replacing takes two renames (old aside, new in); whichever fails, the previous checkpoint is
    still at its name, whole, and no temporary directory is left beside it."""
    path = tmp_path / "step_1"
    io.save_checkpoint(path, {"model": {"w": torch.ones(2)}}, {"step": 1})
    real, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == fail_on:
            raise OSError("disk gone")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        io.save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["step_1"]
    assert io.load_config(path)["step"] == 1 and torch.equal(io.load_group(path, "model")["w"], torch.ones(2))


def test_broken_configs_and_non_finite_weights_are_one_line_errors(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(io.CheckpointError, match="corrupted"):
        io.load_config(tmp_path / "c")
    (tmp_path / "t.json").write_text("[1]")
    with pytest.raises(ValueError, match="does not hold a table"):
        io.read_json_table(tmp_path / "t.json")
    net = torch.nn.Linear(2, 2)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["weight"][0, 0] = math.inf
    (tmp_path / "m").mkdir()
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(io.CheckpointError, match="non-finite weights"):
        io.load_state_into(net, tmp_path / "m")


def test_run_locks(tmp_path):
    """The lock file names this process (stale digits cleared), this process's own lock is not another
    holder, release frees them all, and another process is then refused only while one is held."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / ".lock").write_text("1234567\n")
    try:
        io.lock_run(a)
        io.lock_run(b)
        assert (a / ".lock").read_text() == f"{os.getpid()}\n"
        assert io.run_holder(a) is None  # our own
        probe = ("import sys; from condiff import io\n"
                 "try:\n    io.lock_run(sys.argv[1]); print('free')\nexcept io.RunInUseError as e:\n    print('held')")
        held = subprocess.run([sys.executable, "-c", probe, str(b)], capture_output=True, text=True)
        assert held.stdout.strip() == "held", held.stderr
    finally:
        io.release_runs()
    assert io._LOCKS == {}
    for d in (a, b):
        free = subprocess.run([sys.executable, "-c", probe, str(d)], capture_output=True, text=True)
        assert free.stdout.strip() == "free", free.stderr


@pytest.mark.parametrize(("rank", "local_rank", "holds"), [("0", "0", True), ("2", "0", False), ("0", "1", True)])
def test_only_global_rank_0_of_a_torchrun_job_holds_the_run(tmp_path, monkeypatch, rank, local_rank, holds):
    """The ranks of one job share their run: the job's rank 0 locks it, and the first process of each
    other machine (LOCAL_RANK 0, RANK > 0) must not, or a shared run would be refused to its own job."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    try:
        io.lock_run(tmp_path)
        assert (tmp_path / ".lock").exists() == holds and (tmp_path.resolve() in io._LOCKS) == holds
    finally:
        io.release_runs()


def test_a_claimed_run_is_locked_from_the_start_and_a_failed_claim_leaves_nothing(tmp_path):
    new = tmp_path / "a" / "b" / "run"
    try:
        with pytest.raises(RuntimeError, match="refused"):
            with io.claimed_run(new):
                assert new.resolve() in io._LOCKS  # held before the block reads or clears anything
                raise RuntimeError("refused")
        assert not (tmp_path / "a").exists() and new.resolve() not in io._LOCKS  # the directories made go too
        (tmp_path / "kept").mkdir()
        with pytest.raises(RuntimeError):
            with io.claimed_run(tmp_path / "kept"):
                raise RuntimeError("refused")
        assert (tmp_path / "kept").is_dir()  # it was there before
        with io.claimed_run(new) as d:
            (d / "out.txt").write_text("x")
        assert (new / "out.txt").is_file() and new.resolve() in io._LOCKS  # held for the rest of the command
    finally:
        io.release_runs()


def test_train_or_reuse_is_refused_on_a_run_another_process_writes_before_it_clears_anything(tmp_path):
    """`condiff demo --retrain` on a run that `condiff train` was writing deleted its checkpoints."""
    from condiff.cli.common import train_or_reuse

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom condiff import io\n"
                               "io.lock_run(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(io.RunInUseError, match="in use by another condiff process"):
            train_or_reuse({}, run, retrain=True)
        assert (run / "checkpoints" / "step_00000010").is_dir()
    finally:
        holder.kill()
        holder.wait()
        io.release_runs()


def test_start_run_locks_a_new_run_before_building_it_and_a_refused_build_leaves_nothing(tmp_path):
    """The lock used to be taken after build() and the --fresh deletions when --out did not exist yet."""
    from condiff.cli.common import start_run

    run, seen = tmp_path / "new", []

    def build():
        seen.append(run.resolve() in io._LOCKS)
        raise ValueError("bad settings")

    try:
        with pytest.raises(ValueError, match="bad settings"):
            start_run(run, resume=False, fresh=True, build=build)
        assert seen == [True] and not run.exists()
    finally:
        io.release_runs()


def test_a_failed_write_names_its_file_and_leaves_the_old_one(tmp_path):
    io.write_text_atomic(tmp_path / "m.json", "old")

    def disk_full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"writing .*m.json: No space left on device; the previous file is unchanged"):
        io.write_file_atomic(tmp_path / "m.json", disk_full)
    assert os.listdir(tmp_path) == ["m.json"] and (tmp_path / "m.json").read_text() == "old"


def test_a_checkpoint_set_aside_by_a_killed_writer_is_put_back_on_load(tmp_path, tiny_run):
    """kill -9 between save_checkpoint's two renames leaves nothing at NAME and the previous checkpoint
    at .NAME.old-PID; the next load puts it back once that process is gone (not while it runs)."""
    import shutil

    from condiff.models import load_denoiser

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    path = tmp_path / "step_1"
    io.save_checkpoint(path, {"model": {"w": torch.ones(2)}}, {"step": 1})
    os.replace(path, tmp_path / f".step_1.old-{os.getpid()}")  # a writer still running: left alone
    with pytest.raises(io.CheckpointError, match="not found"):
        io.load_config(path)
    os.replace(tmp_path / f".step_1.old-{os.getpid()}", tmp_path / f".step_1.old-{pid}")
    assert io.load_config(path)["step"] == 1 and os.listdir(tmp_path) == ["step_1"]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run / "model")
    os.replace(run / "model", run / f".model.old-{pid}")
    assert load_denoiser(run).schedule.T == 100 and (run / "model").is_dir()


def test_a_write_sweeps_the_temporaries_a_killed_writer_left_and_no_fresh_ones(tmp_path):
    stale_file, stale_dir = tmp_path / ".m.json.abc123.tmp", tmp_path / ".ckpt.tmp-xyz"
    fresh = tmp_path / ".m.json.def456.tmp"  # another writer at work now
    stale_file.write_text("half")
    stale_dir.mkdir()
    fresh.write_text("half")
    old = os.path.getmtime(fresh) - 2 * io.STALE_SECONDS
    for p in (stale_file, stale_dir):
        os.utime(p, (old, old))
    io.write_text_atomic(tmp_path / "m.json", "{}")
    io.save_checkpoint(tmp_path / "ckpt", {"model": {"w": torch.ones(1)}}, {})
    assert sorted(os.listdir(tmp_path)) == [".m.json.def456.tmp", "ckpt", "m.json"]


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and not p.name.startswith(".")}


def test_writing_outputs_moves_a_whole_set_in_and_leaves_the_old_one_on_failure(tmp_path):
    out = tmp_path / "out"
    with io.writing_outputs(out, "metrics.json", "a.png", "b.npz") as staged:
        assert staged.parent == out and staged.name.startswith(".")  # aside, on the same disk
        (staged / "a.png").write_bytes(b"a1")
        (staged / "sub").mkdir()
        (staged / "sub" / "c.txt").write_text("c1")
        (staged / "metrics.json").write_text("m1")
    assert _files(out) == {"a.png": b"a1", "sub/c.txt": b"c1", "metrics.json": b"m1"}
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["sub"]
    (out / "b.npz").write_bytes(b"old")
    (out / "mine.txt").write_text("kept")  # not one of the set's files
    before = _files(out)
    for fail in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(fail)), io.writing_outputs(out, "metrics.json", "a.png", "b.npz") as staged:
            (staged / "a.png").write_bytes(b"a2")
            raise fail
        assert _files(out) == before and not list(out.glob(".staged-*"))
    with pytest.raises(OSError, match=f"^.Errno 28. writing {out / 'a.png'}: No space left on device$"), \
            io.writing_outputs(out, "metrics.json") as staged:
        raise OSError(28, f"writing {staged / 'a.png'}: No space left on device")
    with pytest.raises(RuntimeError, match="lacks its record metrics.json"), \
            io.writing_outputs(out, "metrics.json", "a.png") as staged:
        (staged / "a.png").write_bytes(b"a2")
    assert _files(out) == before
    (out / "d.png").mkdir()  # where the new set puts a file: refused before anything changes
    (out / "sub2").write_text("a file")
    for name, error, message in (("d.png", IsADirectoryError, "d.png is a directory, where this command writes a "
                                  "file: move it away"), ("sub2/e.txt", NotADirectoryError, "sub2 is a file, where "
                                  "this command writes .*sub2/e.txt: move it away")):
        with pytest.raises(error, match=message + r" \(nothing was changed\)$"), \
                io.writing_outputs(out, "metrics.json", "a.png") as staged:
            (staged / name).parent.mkdir(exist_ok=True)
            (staged / name).write_bytes(b"new")
            (staged / "metrics.json").write_text("m2")
        assert _files(out) == {**before, "sub2": b"a file"}
    (out / "b.npz").unlink()
    (out / "b.npz").mkdir()  # an old file to remove that is a folder: refused before the record goes
    with pytest.raises(IsADirectoryError, match=r"b.npz is a directory.*\(nothing was changed\)$"), \
            io.writing_outputs(out, "metrics.json", "b.npz") as staged:
        (staged / "metrics.json").write_text("m2")
    assert (out / "metrics.json").read_bytes() == b"m1"
    (out / "b.npz").rmdir()
    (out / "b.npz").write_bytes(b"old")
    (out / "d.png").rmdir()
    (out / "sub2").unlink()
    with io.writing_outputs(out, "metrics.json", "a.png", "b.npz") as staged:  # a set without a.png and b.npz
        (staged / "metrics.json").write_text("m2")
    assert _files(out) == {"sub/c.txt": b"c1", "metrics.json": b"m2", "mine.txt": b"kept"}


def test_a_write_that_cannot_make_its_temporary_names_the_file_it_was_for(tmp_path, monkeypatch):
    """ENOSPC (or a quota) from making the temporary named the hidden temporary, a file that never existed."""
    import tempfile

    def full(*a, dir=None, **k):
        raise OSError(28, "No space left on device", str(Path(dir) / ".a.json.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(OSError, match=rf"^\[Errno 28\] writing {tmp_path / 'a.json'}: No space left on device; the "
                                      "previous file is unchanged$"):
        io.write_text_atomic(tmp_path / "a.json", "{}")


def test_writing_outputs_clears_what_a_killed_writer_gathered(tmp_path):
    out = tmp_path / "out"
    (out / ".staged-x1y2").mkdir(parents=True)  # SIGKILL mid-write: nothing removes it then
    (out / ".staged-x1y2" / "samples.npz").write_bytes(b"big")
    with io.writing_outputs(out, "metrics.json") as staged:
        (staged / "metrics.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [".writing.lock", "metrics.json"]


def test_begin_outputs_removes_the_record_and_the_named_files_only(tmp_path):
    out = tmp_path / "o"
    assert io.begin_outputs(out, "metrics.json") == out and out.is_dir()
    for name in ("metrics.json", "a.png", "keep.txt"):
        (out / name).write_text("old")
    io.begin_outputs(out, "metrics.json", "a.png")
    assert os.listdir(out) == ["keep.txt"]


def test_a_command_that_fails_before_changing_anything_keeps_the_last_record(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("last run")
    (out / "a.png").write_text("picture")
    with pytest.raises(ValueError), io.record_kept_on_failure(out):
        io.begin_outputs(out, "metrics.json")
        raise ValueError("refused: a model of other settings")
    assert (out / "metrics.json").read_text() == "last run"
    with pytest.raises(ValueError), io.record_kept_on_failure(out):  # it had changed a file: no record
        io.begin_outputs(out, "metrics.json")
        (out / "a.png").write_text("half of a new picture")
        raise ValueError("failed later")
    assert not (out / "metrics.json").exists()
    (out / "gone").symlink_to(out / "nowhere")  # a dangling link is no file, and no reason to fail
    (out / "metrics.json").write_text("last run")
    with pytest.raises(ValueError, match="refused"), io.record_kept_on_failure(out):
        io.begin_outputs(out, "metrics.json")
        raise ValueError("refused")
    assert (out / "metrics.json").read_text() == "last run"
    with io.record_kept_on_failure(out):  # success: the command's own record stands
        io.begin_outputs(out, "metrics.json")
        (out / "metrics.json").write_text("new run")
    assert (out / "metrics.json").read_text() == "new run"


def test_set_aside_keeps_the_first_replaced_run_until_dropped(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "w").write_text("old")
    (run / "log.jsonl").write_text("old log")
    assert io.set_aside(run, ["model", "log.jsonl", "absent"]) == ["model", "log.jsonl"]
    kept = run / io.REPLACED
    assert (kept / "model" / "w").read_text() == "old" and not (run / "model").exists()
    # a replacement that failed left its own files: a second replacement deletes those, keeps the first run's
    (run / "model").mkdir()
    (run / "model" / "w").write_text("failed attempt")
    assert io.set_aside(run, ["model"]) == [] and not (run / "model").exists()
    assert (kept / "model" / "w").read_text() == "old"
    # one that lacks some of the kept entries (checkpoints deleted before the first replacement) does not mix in
    (run / "checkpoints").mkdir()
    (run / "log.jsonl").write_text("failed attempt's log")
    assert io.set_aside(run, ["checkpoints", "model", "log.jsonl"]) == []
    assert not (kept / "checkpoints").exists() and not (run / "checkpoints").exists()
    assert (kept / "log.jsonl").read_text() == "old log"
    monkeypatch.setenv("RANK", "1")  # the other ranks of a torchrun job leave it to rank 0
    (run / "log.jsonl").write_text("new log")
    assert io.set_aside(run, ["log.jsonl"]) == [] and (run / "log.jsonl").read_text() == "new log"
    io.drop_replaced(run, ["model"])
    assert not (kept / "model").exists() and (kept / "log.jsonl").is_file()
    io.drop_replaced(run)
    assert not kept.exists() and (run / "log.jsonl").is_file()
    io.drop_replaced(run)  # nothing kept: nothing to do


def test_restore_replaced_puts_the_kept_run_back_over_the_failed_attempt(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "w").write_text("old")
    (run / "config.json").write_text("old settings")
    assert io.set_aside(run, ["model", "config.json"]) == ["model", "config.json"]
    (run / "model").mkdir()
    (run / "model" / "w").write_text("failed attempt")
    io.restore_replaced(run, ["model"])  # one entry: the rest stays kept
    assert (run / "model" / "w").read_text() == "old" and (run / io.REPLACED / "config.json").is_file()
    io.restore_replaced(run)
    assert (run / "config.json").read_text() == "old settings" and not (run / io.REPLACED).exists()
    io.restore_replaced(run)  # nothing kept: nothing to do


def _old_run(run):
    (run / "model").mkdir(parents=True)
    (run / "model" / "w").write_text("old")
    (run / "checkpoints").mkdir()
    (run / "config.json").write_text("old settings")


def _cut_after(monkeypatch, name, calls):
    """Make ``io.<name>`` raise KeyboardInterrupt (a Ctrl-C) on its ``calls``-th call."""
    real, n = getattr(io, name) if name != "replace" else os.replace, [0]

    def cut(*a, **k):
        n[0] += 1
        if n[0] == calls:
            raise KeyboardInterrupt
        return real(*a, **k)

    if name == "replace":
        monkeypatch.setattr(io.os, "replace", cut)
    else:
        monkeypatch.setattr(io, name, cut)


def test_a_set_aside_cut_short_is_finished_not_read_as_the_whole_kept_run(tmp_path, monkeypatch):
    """A Ctrl-C between set_aside's moves left part of the old run in .replaced and part beside it; the
    next --fresh read the part as the kept run and deleted the rest (the old model) as a failed attempt's."""
    run = tmp_path / "run"
    _old_run(run)
    with monkeypatch.context() as m:
        _cut_after(m, "replace", 3)  # the marker written (atomically), checkpoints moved, model not yet
        with pytest.raises(KeyboardInterrupt):
            io.set_aside(run, ["checkpoints", "model", "config.json"])
    assert (run / io.REPLACED / "checkpoints").is_dir() and (run / "model").is_dir()
    assert io.set_aside(run, ["checkpoints", "model", "config.json"]) == []  # a second --fresh
    kept = run / io.REPLACED
    assert (kept / "model" / "w").read_text() == "old" and (kept / "config.json").read_text() == "old settings"
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoints", "config.json", "model"]
    assert not any((run / n).exists() for n in ("checkpoints", "model", "config.json"))


def test_a_restore_cut_short_goes_back_into_replaced_and_a_drop_cut_short_leaves_nothing_to_restore(tmp_path,
                                                                                                   monkeypatch):
    run = tmp_path / "run"
    _old_run(run)
    io.set_aside(run, ["checkpoints", "model", "config.json"])
    (run / "model").mkdir()
    (run / "model" / "w").write_text("failed attempt")
    with monkeypatch.context() as m:
        _cut_after(m, "replace", 3)  # the marker written, one entry put back, the next not yet
        with pytest.raises(KeyboardInterrupt):
            io.restore_replaced(run)
    assert len([p for p in (run / io.REPLACED).iterdir() if p.name != io.SET_ASIDE]) < 4  # the marker, what is kept
    io.set_aside(run, ["checkpoints", "model", "config.json"])  # --fresh again: the kept run is whole
    kept = run / io.REPLACED
    assert sorted(p.name for p in kept.iterdir()) == [io.SET_ASIDE, "checkpoints", "config.json", "model"]
    assert json.loads((kept / io.SET_ASIDE).read_text()) == ["checkpoints", "config.json", "model"]
    assert (kept / "model" / "w").read_text() == "old" and not (run / "model").exists()
    (run / "model").mkdir()
    (run / "model" / "w").write_text("the finished new model")
    with monkeypatch.context() as m:
        _cut_after(m, "remove", 1)  # drop_replaced: .replaced renamed away, its deletion cut short
        with pytest.raises(KeyboardInterrupt):
            io.drop_replaced(run)
    assert not kept.exists() and list(run.glob(io.DROPPING + "*"))  # no half-deleted run to "restore"
    io.set_aside(run, ["model"])  # the next --fresh sets the new model aside, it does not delete it
    assert (kept / "model" / "w").read_text() == "the finished new model" and not list(run.glob(io.DROPPING + "*"))


def test_taking_a_runs_lock_sweeps_what_killed_writers_left(tmp_path):
    """Temporaries of a killed writer (full model copies on a large profile) survived every rerun: they were
    swept only when the same name was written again, an hour later."""
    run = tmp_path / "run"
    (run / "mdm" / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / ".model.tmp-abc12345").mkdir()
    (run / ".model.tmp-abc12345" / "model.safetensors").write_bytes(b"x" * 100)
    (run / "mdm" / ".stage.json.q1w2e3.tmp").write_text("{")
    (run / "samples" / ".staged-k3j4").mkdir(parents=True)  # a sample set gathered by a killed `condiff sample`
    (run / "samples" / ".staged-k3j4" / "samples.npz").write_bytes(b"x")
    (run / "samples" / ".condiff-probe-x8y9").write_bytes(b"")  # a write probe of a killed command
    (run / "config.json").write_text("{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpts = run / "mdm" / "checkpoints"
    (ckpts / f".step_00000001.old-{dead.pid}").mkdir()  # the checkpoint is in place: a stale copy
    (ckpts / f".step_00000002.old-{dead.pid}").mkdir()  # killed between the renames: put back
    (ckpts / f".step_00000003.old-{os.getpid()}").mkdir()  # a live writer's: left alone
    try:
        io.lock_run(run)
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json", "mdm", "samples"]
        assert sorted(p.name for p in (run / "mdm").iterdir()) == ["checkpoints"]
        assert not list((run / "samples").iterdir())
        assert sorted(p.name for p in ckpts.iterdir()) == [f".step_00000003.old-{os.getpid()}", "step_00000001",
                                                           "step_00000002"]
    finally:
        io.release_runs()


def test_a_set_aside_cut_short_is_not_finished_by_a_run_that_went_on_as_it_lay(tmp_path, monkeypatch):
    """A --fresh cut short just after recording its moves, then --resume (as the Ctrl-C hint says): the
    finished run's drop_replaced moved the resumed run's files into .replaced, per the record, and deleted
    them. A command that goes on with the run discards the record; drop_replaced never moves anything."""
    run = tmp_path / "run"
    _old_run(run)
    with monkeypatch.context() as m:
        _cut_after(m, "replace", 2)  # the record written, nothing moved
        with pytest.raises(KeyboardInterrupt):
            io.set_aside(run, ["checkpoints", "model", "config.json"])
    assert (run / io.REPLACED / io.MOVING).is_file()
    io.drop_replaced(run)  # the run that went on finished (without discarding the record first)
    assert (run / "model" / "w").read_text() == "old" and (run / "checkpoints").is_dir()
    assert not (run / io.REPLACED).exists()
    with monkeypatch.context() as m:
        _cut_after(m, "replace", 2)
        with pytest.raises(KeyboardInterrupt):
            io.set_aside(run, ["checkpoints", "model", "config.json"])
    io.discard_moving(run)  # --resume: the run goes on as it lies
    io.set_aside(run, ["log.jsonl"])  # a later set-aside of something else moves nothing of it
    assert (run / "model" / "w").read_text() == "old" and not (run / io.REPLACED / "model").exists()


def test_a_damaged_move_record_is_refused_not_read_as_nothing_to_finish(tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    (run / io.REPLACED).mkdir()
    os.replace(run / "checkpoints", run / io.REPLACED / "checkpoints")
    (run / io.REPLACED / io.MOVING).write_text('["checkpoints", "mod')
    with pytest.raises(ValueError, match=r"\.moving is damaged .* move the run's files back into"):
        io.set_aside(run, ["checkpoints", "model", "config.json"])
    assert (run / "model" / "w").read_text() == "old" and (run / "config.json").is_file()  # nothing deleted


def test_result_writers_share_a_runs_lock_and_training_holds_it_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    script = ("import sys, time; from condiff import io; io.lock_run(sys.argv[1], shared=sys.argv[2] == 'sh'); "
              "print('held', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(Path(io.__file__).parents[1])}

    def hold(mode):
        p = subprocess.Popen([sys.executable, "-c", script, str(run), mode], stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "held"
        return p

    other = hold("sh")
    try:
        io.lock_run(run, shared=True)  # another result writer: fine
        io.release_runs()
        with pytest.raises(io.RunInUseError, match=r"in use by another condiff process \(writing results there\)"):
            io.lock_run(run)  # training waits for the result writers
    finally:
        other.kill()
        other.wait()
    trainer = hold("ex")
    try:
        with pytest.raises(io.RunInUseError, match=f"pid {trainer.pid}"):
            io.lock_run(run, shared=True)
    finally:
        trainer.kill()
        trainer.wait()
    io.lock_run(run, shared=True)
    io.lock_run(run)  # a shared hold made exclusive
    io.release_runs()


def test_a_results_command_sweeps_what_a_killed_writer_of_its_out_left_when_it_writes(tmp_path):
    """A `condiff sample`, `pnp`, ... killed while it wrote leaves its gathered set (with half-written files in
    it) in --out; the next such command's write there removes it (under the folder's writing lock, where no other
    writer gathers one), and only condiff's own names."""
    out = tmp_path / "out"
    (out / ".staged-k3j4").mkdir(parents=True)  # a killed writer's set
    (out / ".staged-k3j4" / ".samples.npz.q1w2.tmp").write_bytes(b"half")
    (out / ".notes.tmp").write_text("the user's")  # a hidden file of the user's own folder
    with io.writing_outputs(out, "metrics.json") as staged:
        (staged / "metrics.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [".notes.tmp", ".writing.lock", "metrics.json"]


def test_the_lock_time_sweep_does_not_follow_links_out_of_the_run(tmp_path):
    outside = tmp_path / "shared" / "sub"
    outside.mkdir(parents=True)
    (outside / ".data.npz.abc123.tmp").write_text("someone else's")
    run = tmp_path / "run"
    run.mkdir()
    (run / "linked").symlink_to(tmp_path / "shared")
    try:
        io.lock_run(run)
    finally:
        io.release_runs()
    assert (outside / ".data.npz.abc123.tmp").is_file()


def test_a_restore_deletes_what_only_the_failed_attempt_had_and_keeps_what_was_moved_back_by_hand(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").mkdir()
    (run / "model" / "w").write_text("old")
    (run / "config.json").write_text("old settings")
    assert io.set_aside(run, ["checkpoints", "model", "config.json"]) == ["model", "config.json"]  # no checkpoints
    (run / "checkpoints" / "step_1").mkdir(parents=True)  # the failed attempt's
    (run / "config.json").write_text("new settings")
    os.replace(run / io.REPLACED / "model", run / "model")  # a user began to put the old run back by hand
    io.restore_replaced(run, attempt=("checkpoints", "model", "config.json", "log.jsonl"))
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model"]
    assert (run / "model" / "w").read_text() == "old" and (run / "config.json").read_text() == "old settings"
    # without the record of what was set aside (an older .replaced), nothing but the kept entries is touched
    assert io.set_aside(run, ["model"]) == ["model"]
    (run / io.REPLACED / io.SET_ASIDE).unlink()
    (run / "checkpoints").mkdir()
    io.restore_replaced(run, attempt=("checkpoints", "model"))
    assert (run / "checkpoints").is_dir() and (run / "model" / "w").read_text() == "old"
    assert not (run / io.REPLACED).exists()


def test_a_kept_run_moved_back_by_hand_is_not_deleted_by_the_next_set_aside_and_its_records_go_with_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for n in ("model", "checkpoints"):
        (run / n).mkdir()
        (run / n / "w").write_text("old")
    io.set_aside(run, ["model", "checkpoints"])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "w").write_text("attempt")
    os.replace(run / io.REPLACED / "model", run / "model")  # moved back by hand (mv works: the attempt has none)
    io.set_aside(run, ["model", "checkpoints"])  # --fresh again: the kept run stays whole, the attempt goes
    assert io.kept_names(run) == ["checkpoints", "model"] and not (run / "model").exists()
    assert {n: (run / io.REPLACED / n / "w").read_text() for n in ("model", "checkpoints")} == {
        "model": "old", "checkpoints": "old"}
    for n in ("model", "checkpoints"):  # everything moved back by hand: .replaced keeps nothing
        os.replace(run / io.REPLACED / n, run / n)
    assert io.kept_names(run) == [] and (run / io.REPLACED / io.SET_ASIDE).is_file()
    io.drop_replaced(run, ["model"])  # a finished run's clean-up takes the record with it
    assert not (run / io.REPLACED).exists() and (run / "model" / "w").read_text() == "old"


def test_tied_weights_are_saved_as_copies_and_load_back_equal(tmp_path):
    """safetensors refused a module whose weights share memory, with a hint to a function of its own."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    net = Tied()
    io.save_module(tmp_path / "m", net, {})
    back = Tied()
    back.load_state_dict(io.load_group(tmp_path / "m", "model"))
    assert torch.equal(back.a.weight, net.a.weight) and torch.equal(back.b.weight, net.a.weight)
    with pytest.raises(TypeError, match="a checkpoint holds tensors: 'w' is a list"):
        io.save_checkpoint(tmp_path / "m", {"model": {"w": [1, 2]}}, {})


def test_writing_outputs_moves_the_record_last(tmp_path, monkeypatch):
    """The record goes in after the set it describes, so that a kill between renames never leaves a record beside
    the previous set's data."""
    moved, real = [], os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b))[1])
    with io.writing_outputs(tmp_path, "metrics.json") as staged:
        (staged / "metrics.json").write_text("{}")
        (staged / "samples.npz").write_bytes(b"x")
        (staged / "z.png").write_bytes(b"y")
    assert moved[-1] == "metrics.json" and sorted(moved) == ["metrics.json", "samples.npz", "z.png"]


def test_a_shared_run_lock_is_upgraded_when_the_same_process_asks_for_it_whole(tmp_path):
    import fcntl

    io.lock_run(tmp_path, shared=True)
    io.lock_run(tmp_path)  # the same process, now writing: others may not even read
    fd = os.open(tmp_path / ".lock", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        io.release_runs()
