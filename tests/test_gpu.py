"""GPU-only checks, skipped where PyTorch sees no CUDA device (CI and the development machines).

They guard what only a GPU shows: a loop that reads a value back from the device waits for it, so
the sampler and the trainer must not do so once per step. ``torch.cuda.set_sync_debug_mode`` warns
at each such read; the count must not grow with the number of steps.
"""

import warnings

import pytest
import torch

from condiff.denoiser import NetDenoiser
from condiff.nets import TimeMLP
from condiff.sample import ddim
from condiff.schedule import Schedule
from condiff.train import DenoisingObjective, TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _syncs(fn) -> int:
    """How many synchronising CUDA operations ``fn`` performs (the callers warm up first, so that
    one-off work such as the schedule's device table is not counted)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def _assert_not_growing(counts):
    # a per-step read-back would make the 40-step count at least 35 more than the 5-step one; the
    # first calls may still do one-off work (a lookup table's copy), hence <= rather than ==
    assert counts[1] <= counts[0], f"syncs for 5 and 40 steps: {counts}"


def test_the_sampler_reads_nothing_back_per_step():
    torch.manual_seed(0)
    s = Schedule.linear(1000)
    den = NetDenoiser(TimeMLP(2, hidden=32, depth=2).cuda().eval(), s)
    x = torch.randn(64, 2, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    ddim(den, x, s.timesteps(5), eta=1.0, generator=g)  # warm-up
    counts = [_syncs(lambda n=n: ddim(den, x, s.timesteps(n), eta=1.0, generator=g)) for n in (5, 40)]
    _assert_not_growing(counts)


def test_the_sampler_reads_nothing_back_per_step_with_labels_and_cfg():
    torch.manual_seed(0)
    s = Schedule.linear(1000)
    den = NetDenoiser(TimeMLP(2, hidden=32, depth=2, num_classes=3).cuda().eval(), s)
    x = torch.randn(64, 2, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for cond in (den.conditioned(torch.arange(64) % 3), den.conditioned(1, guidance_scale=2.0)):
        ddim(cond, x, s.timesteps(5), eta=1.0, generator=g)  # warm-up: the labels' one copy to the GPU
        counts = [_syncs(lambda n=n, d=cond: ddim(d, x, s.timesteps(n), eta=1.0, generator=g)) for n in (5, 40)]
        _assert_not_growing(counts)


def test_the_trainer_reads_its_losses_once_per_log_interval():
    s = Schedule.linear(100)
    x = torch.randn(256, 2)

    def fit(steps):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=steps, batch_size=32, log_every=1000, ckpt_every=1000, warmup=0,
                          progress=False, device="cuda")
        tr = Trainer(TimeMLP(2, hidden=32, depth=1), DenoisingObjective(x, s, 32), cfg)
        assert not tr.check_each_step
        return _syncs(tr.fit)

    fit(2)  # warm-up: the schedule's device table
    counts = [fit(5), fit(40)]
    _assert_not_growing(counts)



def _fit_syncs(make, steps: int) -> int:
    """Syncs of ``steps`` training steps of ``make() -> (model, objective)`` on the GPU."""
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=8, log_every=1000, ckpt_every=1000, warmup=0, progress=False,
                      device="cuda")
    return _syncs(Trainer(*make(), cfg).fit)


def _assert_fit_not_growing(make, name: str = "") -> None:
    _fit_syncs(make, 2)  # warm-up
    counts = [_fit_syncs(make, n) for n in (5, 40)]
    assert counts[1] <= counts[0], f"{name}: syncs for 5 and 40 steps: {counts}"


def test_mirror_map_training_and_fine_tuning_read_nothing_back_per_step():
    """The NAMM objectives keep their log terms (and the constraint term's sign check) on the device
    until the trainer reads its losses."""
    from condiff.constraints import TotalBrightness
    from condiff.mirror import FinetuneObjective, NAMMLoss, NAMMObjective, build_mirror

    x = torch.rand(64, 1, 8, 8)
    con = TotalBrightness(float(x[0].sum()))

    def mirror():
        return build_mirror((1, 8, 8), {"name": "icnn", "filters": 8, "layers": 2},
                            {"name": "resnet", "base": 8, "blocks": 1, "downsamples": 1}, 0.9, seed=0)

    def finetune(l_adv):
        m = mirror()
        y = m.to_mirror(x).detach()
        return m.inverse, FinetuneObjective(m, x, y, con, 8, NAMMLoss(l_adv=l_adv))

    _assert_fit_not_growing(lambda: (mirror(), NAMMObjective(x, con, 8)), "fit")
    for l_adv in (0.0, 1.0):
        _assert_fit_not_growing(lambda a=l_adv: finetune(a), f"finetune, l_adv = {l_adv}")


def test_dual_training_reads_nothing_back_per_step_between_dual_updates():
    """(every = 1000: no dual update in these runs; an update reads its estimates back by design.)"""
    from condiff.dual import Constraint, DualConfig, DualObjective

    s = Schedule.linear(100)
    x = torch.randn(256, 2)
    _assert_fit_not_growing(lambda: (TimeMLP(2, hidden=32, depth=1),
                                     DualObjective(x, [Constraint("c", x[:32], 1.0)], s, 8, DualConfig(every=1000))))


def test_pnp_inference_reads_back_in_blocks_not_per_step():
    from condiff.pnp.engine import infer

    torch.manual_seed(0)
    s = Schedule.linear(100)
    den = NetDenoiser(TimeMLP(2, hidden=32, depth=2).cuda().eval().requires_grad_(False), s)
    z = torch.randn(16, 2, device="cuda")

    def run(steps):
        return infer(den, z, constraint=lambda x: x.pow(2).sum(1), steps=steps, lr=0.05,
                     generator=torch.Generator(device="cuda").manual_seed(0))

    run(2)  # warm-up
    counts = [_syncs(lambda n=n: run(n)) for n in (5, 40)]
    _assert_not_growing(counts)


def test_guided_sampling_reads_back_in_blocks_not_per_step():
    from condiff.guidance import DPS, DSG, UGD, FreeDoM, guided_sample

    torch.manual_seed(0)
    s = Schedule.linear(1000)
    den = NetDenoiser(TimeMLP(2, hidden=32, depth=2).cuda().eval().requires_grad_(False), s)

    def loss(x):
        return (x - 1).pow(2).sum(1)

    # FreeDoM and UGD take several gradients a step here: the checks are read by steps (every 50), not gradients
    for make in (lambda: DPS(loss, zeta=0.1), lambda: DSG(DPS(loss, zeta=0.1)),
                 lambda: FreeDoM(loss, zeta=0.1, travel=(0.0, 1.0)),
                 lambda: UGD(loss, forward=0.1, backward_steps=2, backward_lr=0.05, recurrence=2)):
        def run(steps, make=make):
            return guided_sample(den, make(), (16, 2), steps, device="cuda", clip_x0=1.0,
                                 generator=torch.Generator(device="cuda").manual_seed(0))

        run(2)  # warm-up
        counts = [_syncs(lambda n=n: run(n)) for n in (5, 40)]
        _assert_not_growing(counts)


def test_dropout_on_the_gpu_resumes_exactly(tmp_path):
    """Checkpoints kept the CPU's random stream only: a net with dropout on a GPU went on from another stream."""
    from condiff.nets import build_net

    x, s = torch.randn(64, 1, 8, 8), Schedule.linear(50)
    net_cfg = {"name": "unet", "in_channels": 1, "base": 8, "mults": [1], "num_res": 1, "dropout": 0.3}

    def trainer(steps, run_dir):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=steps, batch_size=8, warmup=0, ckpt_every=2, progress=False, device="cuda")
        return Trainer(build_net(net_cfg), DenoisingObjective(x, s, 8), cfg, run_dir)

    whole = trainer(4, tmp_path / "whole")
    whole.fit()
    trainer(2, tmp_path / "cut").fit()
    resumed = trainer(4, tmp_path / "cut")
    torch.cuda.manual_seed_all(123)  # another GPU stream at the resume, as a new process has
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_seeded_on_a_gpu_seeds_its_stream_in_a_fresh_process(tmp_path):
    """seeded() seeded the CPU's stream alone before CUDA started, and the trainer started CUDA inside the block:
    in a fresh process a GPU dropout drew from an unseeded stream, so two runs of one seed differed."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from condiff.determinism import seeded\n"
        "with seeded(int(sys.argv[1]), 'cuda'):\n"
        "    print(torch.rand(4, device='cuda').tolist())\n"
        "print(torch.rand(4, device='cuda').tolist())\n"  # the caller's stream, as the block found it
    )

    def run(seed):
        return subprocess.run([sys.executable, "-c", script, str(seed)], capture_output=True, text=True,
                              check=True).stdout.splitlines()

    a, b, c = run(0), run(0), run(1)
    assert a[0] == b[0] and a[0] != c[0]  # the block draws from its seed
    assert a[1] == c[1]  # and leaves the caller's stream where it was
