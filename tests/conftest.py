import contextlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

# the project's cache while modules are collected, before the per-test one below: a module that builds a constraint
# of one's own at import records its file as trusted there, which went into the user's ~/.cache/condiff
os.environ["CONDIFF_CACHE"] = os.environ.get("CONDIFF_TEST_CACHE") or tempfile.mkdtemp(prefix="condiff-test-cache-")

# one intra-op thread: the suite's tensors are tiny, and on a loaded 2-core machine a second thread's
# synchronisation cost a test 54 s instead of 2 s; unloaded, the whole suite takes the same time (2 min 30 s)
torch.set_num_threads(1)


@pytest.fixture
def bench_module(monkeypatch):
    """``bench_module(name)``: the module ``benchmarks/NAME.py`` (the benchmarks are scripts, not a package)."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    return importlib.import_module


@pytest.fixture
def saved_figures(monkeypatch):
    """``saved_figures(*modules)``: the list of figures the modules' ``save_figure`` saves from here on (condiff.plots
    by default), each still written and marked with the path as ``fig.saved_to``."""
    import condiff.plots

    figs = []

    def record(*modules):
        for m in modules or (condiff.plots,):
            def keep(fig, path, save=m.save_figure):
                fig.saved_to = Path(path)
                figs.append(fig)
                return save(fig, path)

            monkeypatch.setattr(m, "save_figure", keep)
        return figs

    return record


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Project caches (classifier, generated data) go to a per-session temp dir, never ~/.cache."""
    root = os.environ.get("CONDIFF_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("CONDIFF_CACHE", root)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A random digits-shaped condiff model directory (1x8x8, T = 100), standing in for a trained one."""
    from condiff.models import save_model
    from condiff.nets import build_net
    from condiff.schedule import Schedule

    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1, 2], "groups": 4})
    save_model(d, net, Schedule.linear(100), data={"name": "digits"}, shape=[1, 8, 8])
    return d


@pytest.fixture(scope="session")
def train_once(tmp_path_factory):
    """``train_once(args)``: a run directory that ``condiff train ARGS`` trained, once per session for each
    ``args`` (copy it before changing it)."""
    from condiff.cli.main import main

    runs: dict[tuple[str, ...], Path] = {}

    def make(args: list[str]) -> Path:
        if tuple(args) not in runs:  # its output kept out of the calling test's captured output
            run = tmp_path_factory.mktemp("trained") / "run"
            said = io.StringIO()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                assert main(["train", *args, "--out", str(run)]) == 0, said.getvalue()
            runs[tuple(args)] = run
        return runs[tuple(args)]

    return make


@pytest.fixture
def tiny_diffusers_denoiser():
    """A randomly initialised 8x8 one-channel diffusers UNet2DModel (T = 100) as a condiff denoiser."""
    diffusers = pytest.importorskip("diffusers")
    from condiff.denoiser import DiffusersDenoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    return DiffusersDenoiser(unet.eval(), {"num_train_timesteps": 100})


@pytest.fixture
def tiny_diffusers_dir(tmp_path):
    """A local diffusers model directory (``unet/`` + ``scheduler/``, T = 100) of a random 8x8 UNet."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    unet.save_pretrained(tmp_path / "dm" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "dm" / "scheduler")
    return tmp_path / "dm"


@pytest.fixture
def run_on_two_ranks(tmp_path):
    """``run(script_text)``: run a script under ``torchrun`` with two CPU ranks (gloo), its only
    argument ``tmp_path`` (where it writes its results); fails with the ranks' error output."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")

    def run(text: str) -> None:
        script = tmp_path / "ddp_script.py"
        # the ranks leave together, then each says it got to the end
        script.write_text(text + "\nimport os, sys\nfrom condiff.train import leave_process_group\n"
                                 "leave_process_group()\n"
                                 "open(os.path.join(sys.argv[1], 'ended' + os.environ['RANK']), 'w').close()\n")
        for k in (0, 1):
            (tmp_path / f"ended{k}").unlink(missing_ok=True)
        r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0 and ended_then_aborted(r, [tmp_path / f"ended{k}" for k in (0, 1)]):
            return
        assert r.returncode == 0, r.stderr[-2000:]

    return run


def ended_then_aborted(r: subprocess.CompletedProcess, ended: list[Path]) -> bool:
    """Whether a torchrun job failed only by a rank aborting in the interpreter's teardown after every rank
    had finished its work (each wrote its ``ended`` file after leaving the process group): an intermittent
    fault of torch's gloo teardown outside condiff (pytorch/pytorch#190489), said as a warning rather than
    failed on. Seen in 3 of some 430 two-rank jobs on the development machine and once in CI, all of
    ranks that left without a barrier; none yet after one."""
    if not (all(p.exists() for p in ended) and "(SIGABRT)" in r.stderr):
        return False
    warnings.warn("a rank aborted in the interpreter's teardown after the job ended (torch's gloo at exit)",
                  stacklevel=2)
    return True
