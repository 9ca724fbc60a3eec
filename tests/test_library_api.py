"""The Python API as a researcher meets it: what it accepts, what it refuses early and in one line, and what it
writes for the next call to read (found by walking through the five methods as a library user)."""

import re
import warnings

import pytest
import torch

from condiff import io
from condiff.denoiser import GaussianDenoiser, NetDenoiser
from condiff.dual import Constraint, DualConfig, DualObjective
from condiff.guidance import DPS, guided_sample
from condiff.models import load_denoiser, save_model
from condiff.nets import TimeMLP
from condiff.pnp import schedules as sch
from condiff.pnp.engine import finish, infer
from condiff.sample import default_clip, sample
from condiff.schedule import Schedule
from condiff.train import DenoisingObjective, TrainConfig, Trainer, list_checkpoints


def test_samplers_draw_their_noise_in_the_dtype_of_the_models_weights():
    """sample() drew float32 noise whatever the model, so a float64 model failed with "convert the input"."""
    s = Schedule.linear(50)
    den = NetDenoiser(TimeMLP(2, hidden=8, depth=1).double(), s)
    assert sample(den, (4, 2), steps=3).dtype == torch.float64
    res = guided_sample(den, DPS(lambda x: x.pow(2).sum(1), zeta=0.1), (4, 2), 3)
    assert res.x.dtype == torch.float64
    assert sample(GaussianDenoiser(s, mean=0.0, std=1.0), (4, 2), steps=3).dtype == torch.float32  # no weights


def test_a_bare_network_is_refused_naming_the_wrapper():
    net = TimeMLP(2, hidden=8, depth=1)
    for call in (lambda: sample(net, (2, 2), steps=3),
                 lambda: guided_sample(net, DPS(lambda x: x.sum(1)), (2, 2), 3),
                 lambda: infer(net, torch.zeros(2, 2), steps=2),
                 lambda: finish(net, torch.zeros(2, 2), 5)):
        with pytest.raises(TypeError, match=r"got a TimeMLP: wrap a network as NetDenoiser\(net, schedule\)"):
            call()


def test_pnp_takes_numbers_for_its_schedules_and_refuses_the_noise_schedule_up_front():
    s = Schedule.linear(100)
    den = GaussianDenoiser(s, mean=0.0, std=1.0)
    z = torch.zeros(3, 2)
    g = torch.Generator().manual_seed(0)
    a = infer(den, z, constraint=lambda x: x.sum(1), schedule=20, weight=0.5, steps=4, generator=g)
    g = torch.Generator().manual_seed(0)
    b = infer(den, z, constraint=lambda x: x.sum(1), schedule=sch.ConstantTime(20), weight=sch.ConstantWeight(0.5),
              steps=4, generator=g)
    assert torch.equal(a.x, b.x)
    with pytest.raises(TypeError, match="not the noise Schedule, which comes with the denoiser"):
        infer(den, z, schedule=s, steps=2)
    with pytest.raises(TypeError, match="weight must be a weight schedule .* or a number, got str"):
        infer(den, z, weight="high", steps=2)
    with pytest.raises(ValueError, match=r"weight \(a constant weight\) must be a number >= 0, got -1"):
        infer(den, z, weight=-1, steps=2)
    with pytest.raises(ValueError, match=r"schedule \(a fixed timestep\) must be an integer >= 0, got -1"):
        infer(den, z, schedule=-1, steps=2)


def test_a_trainers_checkpoint_loads_as_a_model_and_its_run_directory_says_where_it_is(tmp_path):
    """Trainer(...) without meta wrote checkpoints no loader could rebuild a model from, and load_denoiser on its
    run directory said only "no config.json"."""
    s = Schedule.linear(50)
    x = torch.randn(64, 2)
    net = TimeMLP(2, hidden=8, depth=1)
    tr = Trainer(net, DenoisingObjective(x, s, 16), TrainConfig(steps=3, warmup=0, progress=False, ckpt_every=3),
                 tmp_path / "run")
    ema = tr.fit()
    newest = tmp_path / "run" / "checkpoints" / "step_00000003"
    den = load_denoiser(newest)
    assert den.schedule.config() == s.config()
    xt, t = torch.randn(5, 2), torch.full((5,), 10)
    torch.testing.assert_close(den.eps(xt, t), NetDenoiser(ema, s).eps(xt, t))
    with pytest.raises(io.CheckpointError, match=r"or load its newest checkpoint, .*step_00000003 \(a Trainer"):
        load_denoiser(tmp_path / "run")
    assert list_checkpoints(tmp_path / "run") == list_checkpoints(tmp_path / "run" / "checkpoints") == [newest]
    from condiff.cli.main import main  # the command line takes it too: the checkpoint records the sample shape

    assert main(["sample", "--ckpt", str(newest), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    # a network config that is no JSON is left out (its checkpoints then name no net, and are not offered)
    odd = TimeMLP(2, hidden=8, depth=1)
    odd.config = {"dtype": torch.float32}
    Trainer(odd, DenoisingObjective(x, s, 16), TrainConfig(steps=1, warmup=0, progress=False), tmp_path / "odd").fit()
    with pytest.raises(io.CheckpointError, match="no model/") as e:
        load_denoiser(tmp_path / "odd")
    assert "newest checkpoint" not in str(e.value)


def test_a_dual_objective_that_would_make_no_update_warns_when_its_trainer_is_built(tmp_path):
    s, x = Schedule.linear(50), torch.randn(16, 2)
    obj = DualObjective(x, [Constraint("c", x, 1.0)], s, 4, DualConfig(every=100))
    with pytest.warns(UserWarning, match="no dual update happens in 10 steps"):
        Trainer(TimeMLP(2, hidden=8, depth=1), obj, TrainConfig(steps=10, progress=False))
    with pytest.raises(ValueError, match=r"constraint 'd': samples of dtype torch.float64 but the objective data are "
                                         r"torch.float32: convert them with .to\(torch.float32\)"):
        DualObjective(x, [Constraint("d", x.double(), 1.0)], s, 4)
    both = DualObjective(x, [Constraint("c", x, 1.0, 3), Constraint("d", x, 1.0)], s, 4, DualConfig(lambda_init=1.0))
    assert both.examples_per_step == 4 + 3 + 4  # what the throughput log counts


def test_a_mirror_diffusion_model_is_refused_as_a_data_space_model(tmp_path):
    s = Schedule.linear(50)
    save_model(tmp_path / "mdm", TimeMLP(2, hidden=8, depth=1), s, stage="mdm")
    with pytest.raises(io.CheckpointError, match="NAMM mirror diffusion model, whose samples lie in mirror space"):
        load_denoiser(tmp_path / "mdm")
    assert load_denoiser(tmp_path / "mdm", mirror_space=True).schedule.T == 50


def test_assimilate_says_when_its_constraint_is_not_used():
    from condiff.constraints import Box
    from condiff.mirror.assimilate import assimilate
    from condiff.operators import Inpainting

    den = GaussianDenoiser(Schedule.linear(20), mean=0.0, std=0.5)
    op = Inpainting(torch.ones(1, 1, 4, 4), sigma_y=0.1)
    y = torch.zeros(2, 1, 4, 4)
    with pytest.warns(UserWarning, match="constraint_weight = 0, so it is not used"):
        assimilate(den, op, y, (1, 4, 4), 0.1, steps=3, constraint=Box())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assimilate(den, op, y, (1, 4, 4), 0.1, steps=3)


def test_label_drop_without_labels_is_refused():
    with pytest.raises(ValueError, match="label_drop drops labels .* but no labels y were given"):
        DenoisingObjective(torch.randn(8, 2), Schedule.linear(10), 4, label_drop=0.1)
    import condiff.pnp

    assert condiff.pnp.infer is infer  # the PnP entry points from the package itself


def test_guided_sampling_passes_each_step_to_a_callback():
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    seen = []
    guided_sample(den, DPS(lambda x: x.pow(2).sum(1), zeta=0.1), (2, 2), 4, callback=lambda st: seen.append(st.t))
    assert len(seen) == 4


def test_read_every_takes_a_device_or_its_name():
    from condiff.readback import READ_EVERY_DEFAULT, read_every

    assert read_every("cpu") == read_every(torch.device("cpu")) == 1
    assert read_every("meta") == READ_EVERY_DEFAULT


def test_training_labels_are_checked_against_the_networks_classes():
    """Data labelled 1..K on a K-class network trained class K as the unconditional (null) label."""
    x, s = torch.randn(12, 2), Schedule.linear(10)
    cfg = TrainConfig(steps=1, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or be -1 \(no label\), got values in "
                                         r"\[1, 3\] \(labels 1..K\? subtract 1\)"):
        Trainer(TimeMLP(2, hidden=8, depth=1, num_classes=3), DenoisingObjective(x, s, 4, y=torch.arange(12) % 3 + 1),
                cfg)
    with pytest.raises(ValueError, match=r"labels y for a network built without classes \(num_classes = 0\)"):
        Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(x, s, 4, y=torch.arange(12) % 3), cfg)
    Trainer(TimeMLP(2, hidden=8, depth=1, num_classes=3), DenoisingObjective(x, s, 4, y=torch.arange(12) % 3), cfg)


def test_array_data_scales_image_bytes_as_the_file_loaders_do(tmp_path):
    import numpy as np

    from condiff.data import ArrayData, load_dataset

    u8 = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", u8)
    direct = ArrayData(torch.from_numpy(u8)).x
    assert float(direct.min()) >= -1 and float(direct.max()) <= 1
    torch.testing.assert_close(direct, load_dataset(str(tmp_path / "x.npy")).x)
    torch.testing.assert_close(ArrayData(u8).x, direct)
    u16 = ArrayData(np.array([[0, 65535]], dtype=np.uint16)).x  # torch has no max of uint16: it failed there
    assert u16.tolist() == [[-1.0, 1.0]]
    with pytest.warns(UserWarning, match=r"uint8 values of at most 1 \(a 0/1 mask\?\) are scaled as image bytes"):
        ArrayData(torch.ones(3, 4, dtype=torch.uint8))


def test_labels_beside_data_named_otherwise_are_found(tmp_path):
    import numpy as np

    from condiff.data import load_dataset

    x = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(6) % 2, other=np.zeros(3))
    assert load_dataset(str(tmp_path / "a.npz"), key="images").y.tolist() == [0, 1, 0, 1, 0, 1]
    np.savez(tmp_path / "b.npz", X_train=x, Y_train=np.arange(6) % 3)
    assert load_dataset(str(tmp_path / "b.npz"), key="X_train").y.tolist() == [0, 1, 2, 0, 1, 2]
    np.savez(tmp_path / "c.npz", images=x, labels=np.arange(5))  # not one per sample: not the labels
    assert load_dataset(str(tmp_path / "c.npz"), key="images").y is None
    np.savez(tmp_path / "d.npz", X=x, y=np.arange(6) % 2)  # scikit-learn's names
    assert load_dataset(str(tmp_path / "d.npz"), key="X").y.tolist() == [0, 1, 0, 1, 0, 1]
    np.savez(tmp_path / "e.npz", x_train=x, labels=np.arange(6) % 2)
    assert load_dataset(str(tmp_path / "e.npz"), key="x_train").y.tolist() == [0, 1, 0, 1, 0, 1]
    # other arrays are data of their own, left alone (they loaded before labels were looked for there)
    np.savez(tmp_path / "f.npz", X_train=x, Y_train=np.eye(3)[np.arange(6) % 3])  # one-hot rows
    assert load_dataset(str(tmp_path / "f.npz"), key="X_train").y is None
    np.savez(tmp_path / "g.npz", images=x, y=np.linspace(0, 1, 6))  # regression targets
    assert load_dataset(str(tmp_path / "g.npz"), key="images").y is None


def test_a_saved_model_comes_back_in_its_dtype(tmp_path):
    net = TimeMLP(2, hidden=8, depth=1).double()
    s = Schedule.linear(20)
    save_model(tmp_path / "m", net, s, shape=[2])
    den = load_denoiser(tmp_path / "m")
    assert next(den.net.parameters()).dtype == torch.float64
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 5)
    assert torch.equal(den.eps(x, t), NetDenoiser(net, s).eps(x, t))
    tr = Trainer(TimeMLP(2, hidden=8, depth=1).double(), DenoisingObjective(x, s, 3),
                 TrainConfig(steps=1, warmup=0, progress=False), tmp_path / "run")  # a Trainer's checkpoints too
    tr.fit()
    assert next(load_denoiser(list_checkpoints(tmp_path / "run")[-1]).net.parameters()).dtype == torch.float64
    save_model(tmp_path / "f", TimeMLP(2, hidden=8, depth=1), s)
    assert "dtype" not in io.load_config(tmp_path / "f")  # float32 models are written as before
    with pytest.raises(TypeError, match="save_model needs a condiff network .* got a Linear"):
        save_model(tmp_path / "bad", torch.nn.Linear(2, 2), s)


def test_one_label_may_be_a_zero_dimensional_tensor_and_a_classless_net_takes_none():
    net = TimeMLP(2, hidden=8, depth=1, num_classes=3)
    den = NetDenoiser(net, Schedule.linear(20))
    x = torch.randn(4, 2)
    torch.testing.assert_close(den.conditioned(torch.tensor(1)).eps(x, 5), den.conditioned(1).eps(x, 5))
    with pytest.raises(ValueError, match=r"class labels for a network built without classes \(num_classes = 0\)"):
        NetDenoiser(TimeMLP(2, hidden=8, depth=1), Schedule.linear(20)).conditioned(1)


def test_generate_gives_each_batch_its_own_labels():
    """generate(den.conditioned(y), n) with one label per sample failed once n exceeded the batch size."""
    from condiff.sample import generate

    torch.manual_seed(0)
    net = TimeMLP(2, hidden=8, depth=1, num_classes=3)
    for p in net.parameters():  # the output layer starts at zero: make the labels matter
        torch.nn.init.normal_(p, std=0.3)
    den = NetDenoiser(net, Schedule.linear(20))
    y = torch.arange(6) % 3
    batched = generate(den.conditioned(y), 6, (2,), batch_size=4, steps=3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # one generator, one batch after the other
    first = sample(den.conditioned(y[:4]), (4, 2), steps=3, generator=g)
    last = sample(den.conditioned(y[4:]), (2, 2), steps=3, generator=g)
    torch.testing.assert_close(batched, torch.cat([first, last]))  # the last batch its own labels too
    other = generate(den.conditioned(torch.zeros(6, dtype=torch.long)), 6, (2,), batch_size=4, steps=3,
                     generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(batched, other)


def test_a_loaded_model_trained_without_label_drop_refuses_classifier_free_guidance(tmp_path):
    net = TimeMLP(2, hidden=8, depth=1, num_classes=3)
    save_model(tmp_path / "plain", net, Schedule.linear(20), shape=[2], label_drop=0.0)
    den = load_denoiser(tmp_path / "plain")
    den.conditioned(1)  # plain conditioning is what it was trained for
    with pytest.warns(UserWarning, match="without label drop, so its unconditional predictions were never trained: "
                                         r"condition it with .conditioned\(label\)") as seen:
        sample(den, (2, 2), steps=3)  # without a label: said once, at the first call
    assert len(seen) == 1
    with pytest.raises(ValueError, match="needs a model trained with label_drop > 0; this one never learned"):
        den.conditioned(1, guidance_scale=2.0)
    save_model(tmp_path / "cfg", net, Schedule.linear(20), shape=[2], label_drop=0.1)
    assert load_denoiser(tmp_path / "cfg").conditioned(1, guidance_scale=2.0).label_drop == 0.1
    # a Trainer's checkpoint of a labelled model records its label drop too
    obj = DenoisingObjective(torch.randn(6, 2), Schedule.linear(20), 3, y=torch.arange(6) % 3)
    Trainer(net, obj, TrainConfig(steps=1, warmup=0, progress=False), tmp_path / "run").fit()
    with pytest.raises(ValueError, match="needs a model trained with label_drop > 0"):
        load_denoiser(list_checkpoints(tmp_path / "run")[-1]).conditioned(1, guidance_scale=2.0)


# --- the third walk-through: PnP, dual, NAMM's constraints, data and objectives --------------------


def test_a_finetune_objective_leaves_the_inverse_it_trains_trainable():
    """FinetuneObjective froze the whole map it was given, inverse included, so a Trainer of that inverse
    changed nothing, silently; a Trainer of a model with nothing to train is refused."""
    from condiff.constraints import Box
    from condiff.mirror import FinetuneObjective, build_mirror

    m = build_mirror((1, 4, 4), {"name": "icnn", "filters": 4, "layers": 2},
                     {"name": "resnet", "base": 4, "blocks": 1, "downsamples": 0})
    x = torch.rand(8, 1, 4, 4) * 2 - 1
    obj = FinetuneObjective(m, x, m.to_mirror(x).detach() + 0.1, Box(), batch_size=4)
    before = [p.detach().clone() for p in m.inverse.parameters()]
    Trainer(m.inverse, obj, TrainConfig(steps=3, warmup=0, lr=1e-2, progress=False)).fit()
    assert any(not torch.equal(b, p) for b, p in zip(before, m.inverse.parameters()))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        FinetuneObjective(m, x, x, Box(), batch_size=0)
    # finetune_inverse returns the objective's frozen psi (moved with it to the training device), the
    # caller's map left as it was
    from condiff.mirror import finetune_inverse

    out = finetune_inverse(m, x, m.to_mirror(x).detach(), Box(), TrainConfig(steps=2, warmup=0, progress=False,
                                                                              batch_size=4))
    assert not any(p.requires_grad for p in out.psi.parameters()) and out.psi is not m.psi
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        Trainer(TimeMLP(2, hidden=8, depth=1).requires_grad_(False), DenoisingObjective(torch.randn(8, 2),
                Schedule.linear(10), 4), TrainConfig(steps=1, progress=False))


def test_pnp_helpers_refuse_or_read_edge_inputs_right():
    from condiff.pnp.conditional import MirrorSymmetry
    from condiff.pnp.segmentation import iou
    from condiff.pnp.tsp import MultiStart2Opt

    mask = torch.tensor([[[[1.0, -1.0], [-1.0, -1.0]]]])  # the scenes data's mask channel: {-1, +1}
    assert float(iou(mask > 0, mask)) == 1.0 and float(iou(mask, mask)) == 1.0
    assert float(iou(torch.ones_like(mask, dtype=torch.bool), mask)) == 0.25  # -1 is background, not foreground
    with pytest.raises(ValueError, match="MultiStart2Opt: starts must be an integer >= 1, got 0"):
        MultiStart2Opt(starts=0)
    with pytest.raises(ValueError, match=r"MirrorSymmetry: expected pictures \(B, C, H, W\), got shape \(3, 4\)"):
        MirrorSymmetry(axis=-2)(torch.randn(3, 4))


def test_dual_log_mass_bounds_refuse_weights_that_are_not_a_distribution():
    from condiff.dual.theory import log_mass_bounds, refine_log_mass_bounds

    losses, f = torch.tensor([1.0, 1.2, 1.5]), torch.tensor([0.5, 0.3, 0.2])
    log_mass_bounds(losses, f, [2], 0.3)
    with pytest.raises(ValueError, match="must sum to 1, got sum 5"):
        log_mass_bounds(losses, 5 * f, [2], 0.3)
    with pytest.raises(ValueError, match=r"weights must lie in \(0, 1\]"):
        refine_log_mass_bounds(losses[:1], torch.tensor([2.0]), losses[1:2], torch.tensor([0.3]), 0.3)


def test_constraint_configs_rebuild_what_was_built(tmp_path, monkeypatch):
    from condiff.constraints import (
        CONSTRAINTS,
        Box,
        PythonConstraint,
        TotalBrightness,
        build_constraint,
        register_constraint,
    )

    @register_constraint("box_of_the_test")
    class Wider(Box):
        pass

    try:
        assert type(build_constraint(Wider(lo=-2, hi=2).config)) is Wider  # was rebuilt as a Box
    finally:
        CONSTRAINTS.pop("box_of_the_test")
    (tmp_path / "con.py").write_text("def zero(x):\n    return x.flatten(1).sum(1).abs()\n")
    monkeypatch.chdir(tmp_path)
    con = PythonConstraint("con.py", "zero")
    monkeypatch.chdir("/")
    assert build_constraint(con.config).config == con.config  # the path is absolute: any working directory
    for bad in (float("inf"), "3"):
        with pytest.raises(ValueError, match="brightness: flux must be a number >= 0"):
            TotalBrightness(bad)
    with pytest.raises(ValueError, match="brightness: hi must be a finite number"):
        TotalBrightness(3.0, hi=float("inf"))


def test_namm_data_generators_refuse_odd_sizes_seeds_and_fluxes():
    from condiff.data import DataError, load_dataset

    for kw, msg in (({"size": 8.9}, "size must be an even integer >= 8, got 8.9"),
                    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
                    ({"seed": True}, "seed must be an integer, got True"),
                    ({"n_train": 2.5}, "n_train must be an integer >= 1, got 2.5"),
                    ({"flux": 1000.0}, r"flux must lie in \(0, size\^2 = 64\)")):
        with pytest.raises(DataError, match=msg):
            load_dataset("brightness", "train", **{"size": 8, **kw})
    with pytest.raises(DataError, match="kolmogorov: sim_size must be an even integer >= 8, got 4"):
        load_dataset("kolmogorov", "train", size=8, sim_size=4)


def test_small_edges_of_the_task_helpers():
    from condiff.data import ArrayData
    from condiff.dual.data import select
    from condiff.mirror.sample import batched_distance
    from condiff.pnp.segmentation import otsu_segment

    d = ArrayData(torch.randn(12, 2), torch.arange(12) % 3)
    as_list = select(d, [2, 1], n=4, seed=3)
    assert torch.equal(select(d, torch.tensor([2, 1]), n=4, seed=3).x, as_list.x)  # was an ambiguous-truth error
    with pytest.raises(ValueError, match=r"otsu_segment: expected images \(B, C, H, W\) of at least 2 pixels"):
        otsu_segment(torch.zeros(1, 1, 1, 1))
    assert batched_distance(lambda v: v.sum(1), torch.empty(0, 3)).shape == (0,)


def test_guided_samplers_clip_to_the_loaded_models_data_range(tmp_path):
    """guided_sample and finish clipped x0_hat to [-1, 1] whatever range the model was trained on: a model of
    data on [0, 3] had every guided sample squashed into [0, 1], silently."""
    s = Schedule.linear(50)
    save_model(tmp_path / "wide", TimeMLP(2, hidden=8, depth=1), s, value_range=[0.0, 3.0], shape=[2])
    save_model(tmp_path / "unit", TimeMLP(2, hidden=8, depth=1), s, value_range=[-0.9, 0.8])
    wide, unit = load_denoiser(tmp_path / "wide"), load_denoiser(tmp_path / "unit")
    assert wide.sample_shape == (2,) and unit.sample_shape is None  # the shape recorded, where it is
    assert wide.value_range == [0.0, 3.0] and wide.conditioned(None).value_range == [0.0, 3.0]
    assert default_clip(wide, "auto") == (0.0, 3.0) and default_clip(unit, "auto") == (-1.0, 1.0)
    assert default_clip(wide, None) is None and default_clip(wide, 2.0) == 2.0
    # the clip in action: an exact denoiser of data near 2.5, with and without a recorded range
    oracle = GaussianDenoiser(s, mean=2.5, std=0.05)
    loss = DPS(lambda x: (x - 2.5).flatten(1).norm(dim=1), zeta=0.0)
    g = torch.Generator().manual_seed(0)
    squashed = guided_sample(oracle, loss, (4, 2), 20, generator=g).x
    assert float(squashed.max()) < 1.5  # no recorded range: [-1, 1], the house range
    oracle.value_range = [0.0, 3.0]
    g.manual_seed(0)
    kept = guided_sample(oracle, loss, (4, 2), 20, generator=g).x
    assert torch.allclose(kept, torch.full_like(kept, 2.5), atol=0.3)
    g.manual_seed(0)
    assert torch.allclose(finish(oracle, kept, 30, generator=g), torch.full_like(kept, 2.5), atol=0.3)


def test_library_entry_points_name_a_device_this_machine_lacks_or_a_misspelt_one(tmp_path):
    """device="gpu" gave torch's list of device types; "cuda" on a CPU build, "Torch not compiled with CUDA"."""
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    net = TimeMLP(2, hidden=8, depth=1)
    obj = DenoisingObjective(torch.randn(16, 2), den.schedule, batch_size=4)
    calls = {"sample": lambda d: sample(den, (2, 2), steps=3, device=d),
             "guided_sample": lambda d: guided_sample(den, DPS(lambda x: x.sum(1)), (2, 2), 3, device=d),
             "guided_sample with x_T": lambda d: guided_sample(den, DPS(lambda x: x.sum(1)), (2, 2), 3, device=d,
                                                               x_T=torch.zeros(2, 2)),
             "load_denoiser": lambda d: load_denoiser(tmp_path / "nowhere", device=d),
             "Trainer": lambda d: Trainer(net, obj, TrainConfig(steps=2, device=d, progress=False))}
    for call in calls.values():
        with pytest.raises(ValueError, match=r"device (gpu is not supported here \(cpu, cuda, cuda:N\)|must be "
                                             "'cpu', 'cuda' or 'cuda:N', got 'gpu')"):
            call("gpu")
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="device cuda:0 was asked for but no CUDA device is available"):
                call("cuda:0")


def test_objects_of_the_wrong_kind_are_named_where_they_are_given():
    s = Schedule.linear(50)
    net = TimeMLP(2, hidden=8, depth=1)
    obj = DenoisingObjective(torch.randn(16, 2), s, batch_size=4)
    cfg = TrainConfig(steps=2, progress=False)
    cases = [(lambda: Trainer(lambda x, t: x, obj, cfg), "Trainer trains a network, a torch.nn.Module, got function"),
             (lambda: Trainer(net, lambda m, i, g: 0, cfg), "Trainer needs an objective with a loss"),
             (lambda: Trainer(net, obj, {"steps": 2}),
              "Trainer needs its training settings as a TrainConfig .*, got dict"),
             (lambda: NetDenoiser(lambda x, t: x, s), "NetDenoiser wraps a network, a torch.nn.Module .*got function"),
             (lambda: NetDenoiser(net, "linear"), "a denoiser needs the noise schedule .*, got str"),
             (lambda: DenoisingObjective(torch.randn(16, 2), None, 4), "DenoisingObjective needs the noise schedule"),
             (lambda: DenoisingObjective(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), s, 4),
              r"scale image bytes to condiff's \[-1, 1\] as its loaders do: x.float\(\) / 127.5 - 1"),
             (lambda: sample(NetDenoiser(net, s), (2, 2), steps=3, generator=0),
              "generator must be a torch.Generator .*, got int 0"),
             (lambda: guided_sample(NetDenoiser(net, s), "dps", (2, 2), 3), "guidance must be a rule step -> x_"),
             (lambda: infer(NetDenoiser(net, s), torch.zeros(2, 2), constraint=3.0, steps=2),
              "constraint must be a callable .*got float 3.0")]
    for call, msg in cases:
        with pytest.raises(TypeError, match=msg):
            call()


def test_a_guidance_rule_of_ones_own_is_checked_at_the_step_it_goes_wrong():
    """NaN from a rule came out as NaN samples; None, as "'NoneType' object has no attribute"; a wrong batch
    blamed the timesteps; a rule differentiating x_t without needs_grad got torch's bare message."""
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)

    def run(rule):
        return guided_sample(den, rule, (2, 3), 5, generator=torch.Generator().manual_seed(0))

    def blows_up(step):
        return step.sample() * (float("nan") if step.i == 2 else 1.0)

    with pytest.raises(FloatingPointError, match=r"the guidance rule blows_up returned non-finite values .* at step "
                                                 r"2 \(t = "):
        run(blows_up)
    with pytest.raises(TypeError, match=r"the guidance rule <lambda> returned NoneType at step 0, not x_\{t_prev\}"):
        run(lambda step: None)
    with pytest.raises(ValueError, match=r"returned shape \(1, 3\) at step 0; x_\{t_prev\} must have x_t's shape"):
        run(lambda step: step.sample()[:1])

    def pulls(step):
        (g,) = torch.autograd.grad(step.x0_hat.sum(), step.x_t)
        return step.sample() - 0.1 * g

    with pytest.raises(RuntimeError, match="needs needs_grad = True"):
        run(pulls)
    pulls.needs_grad = True
    assert torch.isfinite(run(pulls).x).all()


def test_a_non_finite_guided_step_is_put_down_to_the_model_or_the_rule_and_read_once_where_reads_wait(monkeypatch):
    import condiff.sample as sampling
    from condiff.denoiser import Denoiser

    class Broken(Denoiser):  # NaN below t = 25
        def predict_eps(self, x_t, t):
            return torch.where((t < 25).view(-1, 1), torch.full_like(x_t, float("nan")), torch.zeros_like(x_t))

    def passes(step):
        return step.sample()

    g = torch.Generator
    with pytest.raises(FloatingPointError, match=r"the denoiser's prediction is not finite \(NaN or inf\) at step 2 "
                                                 r"\(t = 24\), at x_t of largest \|x\| .*, so the guidance rule passes "
                                                 "could not be: check the model"):
        guided_sample(Broken(Schedule.linear(50)), passes, (2, 3), 5, generator=g().manual_seed(0))

    class Beyond(Broken):  # data on [250, 350]: an x_t of 300 is no sign of a rule gone wrong
        value_range = [250.0, 350.0]

    with pytest.raises(FloatingPointError, match=r"at x_t of largest \|x\| 3.*could not be: check the model"):
        guided_sample(Beyond(Schedule.linear(50)), passes, (2, 3), 5, x_T=torch.full((2, 3), 300.0), clip_x0=None,
                      generator=g().manual_seed(0))

    class FarOut(Denoiser):  # finite wherever a chain goes, NaN far beyond
        def predict_eps(self, x_t, t):
            return torch.where(x_t.abs() > 1e6, float("nan"), 0.0)

    def throws(step):  # a step far too large, still finite
        return step.sample() * (1e20 if step.i == 1 else 1.0)

    with pytest.raises(FloatingPointError, match=r"at x_t of largest \|x\| .*e\+.*: the rule's earlier steps took x_t "
                                                 "that far out: lower its step size"):
        guided_sample(FarOut(Schedule.linear(50)), throws, (2, 3), 5, generator=g().manual_seed(0), clip_x0=None)
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)

    def blows_up(step):
        return step.sample() * (float("inf") if step.i == 1 else 1.0)

    with pytest.raises(FloatingPointError, match="from a finite prediction: lower its step size"):
        guided_sample(den, blows_up, (2, 3), 5, generator=g().manual_seed(0))
    monkeypatch.setattr(sampling, "read_every", lambda device: 4)  # as on a GPU: values read in blocks
    with pytest.raises(FloatingPointError, match=r"returned non-finite values .* at step 1 \(t = .*from a finite "
                                                 "prediction"):
        guided_sample(den, blows_up, (2, 3), 5, generator=g().manual_seed(0))


def test_pnp_refuses_a_constraint_network_in_training_mode_and_a_meta_latent():
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    moody = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2, 1), torch.nn.Flatten(0))
    with pytest.raises(ValueError, match=r"a constraint that is a network in training mode \(Dropout\)"):
        infer(den, torch.zeros(2, 2), constraint=moody, steps=2)
    assert infer(den, torch.zeros(2, 2), constraint=moody.eval(), steps=2).x.shape == (2, 2)
    with pytest.raises(ValueError, match="the starting latent is on the meta device"):
        infer(den, torch.zeros(2, 2, device="meta"), steps=2)


def test_clip_x0_takes_auto_in_every_sampler_and_names_every_form_it_takes():
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    g = torch.Generator
    assert torch.equal(sample(den, (2, 2), steps=3, clip_x0="auto", generator=g().manual_seed(0)),
                       sample(den, (2, 2), steps=3, clip_x0=1.0, generator=g().manual_seed(0)))
    for bad in (-1, "high", (1, -1)):
        with pytest.raises(ValueError, match=r"clip_x0 must be a number > 0, a pair \(lo, hi\) with lo < hi, 'auto' "
                                             "or None"):
            sample(den, (2, 2), steps=3, clip_x0=bad)


def _tiny_unet(**kw) -> torch.nn.Module:
    from condiff.nets import build_net

    torch.manual_seed(0)
    return build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1], "num_res": 1, **kw})


def test_a_trainers_net_carries_its_data_range_to_save_model_and_netdenoiser(tmp_path):
    """save_model(dir, ema, schedule) recorded no value_range, so guided sampling of data on [0, 10] clipped
    x0_hat to [-1, 1] without a word (the Trainer's own checkpoints recorded it)."""
    s = Schedule.linear(50)
    x = torch.rand(32, 1, 8, 8) * 10
    ema = Trainer(_tiny_unet(), DenoisingObjective(x, s, 8), TrainConfig(steps=2, warmup=0, progress=False)).fit()
    lo, hi = float(x.min()), float(x.max())
    assert ema.trained_on == {"shape": [1, 8, 8], "value_range": [lo, hi]}
    save_model(tmp_path / "m", ema, s)
    for den in (load_denoiser(tmp_path / "m"), NetDenoiser(ema, s)):
        assert den.value_range == [lo, hi] and den.sample_shape == (1, 8, 8)
        assert default_clip(den, "auto") == (lo, hi)  # was [-1, 1]: every sample clipped to 1
    assert NetDenoiser(ema, s, value_range=(0, 1)).value_range == [0.0, 1.0]  # what the caller gives comes first
    save_model(tmp_path / "given", ema, s, value_range=[0, 2])
    assert load_denoiser(tmp_path / "given").value_range == [0.0, 2.0]
    assert NetDenoiser(_tiny_unet(), s).value_range is None  # a net no Trainer trained knows no range


def test_samplers_refuse_a_denoiser_whose_network_is_in_training_mode():
    """Dropout in training mode made a seeded draw unrepeatable, without a word."""
    s = Schedule.linear(50)
    net = _tiny_unet(dropout=0.3)
    with pytest.raises(ValueError, match=r"the denoiser's network in training mode \(Dropout\) .* call .eval\(\)"):
        sample(NetDenoiser(net, s), (2, 1, 8, 8), steps=2)
    with pytest.raises(ValueError, match=r"the denoiser's network in training mode"):
        infer(NetDenoiser(net, s), torch.zeros(2, 1, 8, 8), steps=2)
    assert sample(NetDenoiser(net.eval(), s), (2, 1, 8, 8), steps=2).shape == (2, 1, 8, 8)
    assert sample(NetDenoiser(_tiny_unet().train(), s), (1, 1, 8, 8), steps=2).shape == (1, 1, 8, 8)  # no dropout


def test_a_guidance_loss_network_in_training_mode_is_refused_as_pnp_refuses_one():
    bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(4), torch.nn.Flatten(0))
    with pytest.raises(ValueError, match=r"a guidance loss that is a network in training mode \(BatchNorm1d\)"):
        DPS(bn)
    DPS(bn.eval())


def test_a_network_that_predicts_nan_is_named_by_every_sampler():
    """Unguided sampling returned NaN samples silently; guided sampling blamed the loss and PnP the learning rate."""
    s = Schedule.linear(50)
    net = _tiny_unet().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    den = NetDenoiser(net, s)
    with pytest.raises(FloatingPointError, match=r"2 of 2 samples are not finite .* the denoiser's predictions"):
        sample(den, (2, 1, 8, 8), steps=3)
    with pytest.raises(FloatingPointError, match=r"the denoiser's prediction x0_hat is not finite .* check the model"):
        guided_sample(den, DPS(lambda z: z.flatten(1).pow(2).sum(1)), (2, 1, 8, 8), 3)
    with pytest.raises(FloatingPointError, match=r"step 0 .* not finite on the first, finite samples: check the prior"):
        infer(den, torch.zeros(2, 1, 8, 8), steps=2)


def test_guidance_under_inference_mode_names_inference_mode_not_the_loss():
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    said = r"guided sampling takes gradients, which torch.inference_mode\(\) .* \(torch.no_grad\(\) is fine\)"
    with torch.inference_mode(), pytest.raises(ValueError, match=said):
        guided_sample(den, DPS(lambda z: z.pow(2).sum(1)), (2, 3), 3)
    with torch.no_grad():  # turned back on by the sampler
        assert guided_sample(den, DPS(lambda z: z.pow(2).sum(1)), (2, 3), 3).x.shape == (2, 3)


def test_a_numpy_measurement_is_named_with_its_conversion():
    import numpy as np

    from condiff.operators import Inpainting

    op = Inpainting.box((2, 1, 8, 8), 4)
    with pytest.raises(TypeError, match=r"the measurement y must be a torch tensor, got ndarray: convert it with "
                                        r"torch.as_tensor"):
        op.loss(np.zeros((2, 1, 8, 8), dtype=np.float32))


def test_sample_shapes_of_the_other_convention_are_named_and_another_size_warned_of():
    from condiff.sample import generate

    s = Schedule.linear(50)
    den = NetDenoiser(_tiny_unet().eval(), s, sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"shape is the batch's, \(B, \*sample shape\), e.g. \(16, 1, 8, 8\); got "
                                         r"\(1, 8, 8\)"):
        sample(den, (1, 8, 8), steps=2)
    with pytest.raises(ValueError, match=r"shape is one sample's, e.g. \(1, 8, 8\) for this model; got \(3, 1, 8, 8\)"):
        generate(den, 3, (3, 1, 8, 8), steps=2)
    with pytest.warns(UserWarning, match=r"trained on samples of shape \(1, 8, 8\); drawing \(1, 12, 12\)"):
        assert generate(den, 2, (1, 12, 12), steps=2).shape == (2, 1, 12, 12)
    # other channels (or another rank) no net runs on: refused, where it was warned of and then failed in the net
    for bad in ((3, 8, 8), (8, 8), (1, 8, 8, 8)):
        with pytest.raises(ValueError, match=r"the model makes samples of shape \(1, 8, 8\) \(1 channel\); shape "
                                             r"asks for " + re.escape(str(bad))):
            generate(den, 2, bad, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(den, 2, (1, 8, 8), steps=2).shape == (2, 1, 8, 8)


def test_a_network_that_cannot_take_x_and_t_is_named_before_its_first_call():
    class NoTime(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x)

    s = Schedule.linear(50)
    with pytest.raises(TypeError, match=r"as net\(x, t\) .* NoTime.forward\(x\) cannot take that"):
        NetDenoiser(NoTime(), s)
    with pytest.raises(TypeError, match=r"as net\(x, t, y\) .* cannot take that"):
        Trainer(NoTime(), DenoisingObjective(torch.zeros(4, 1, 4, 4), s, 2, y=torch.zeros(4, dtype=torch.long)),
                TrainConfig(steps=1, progress=False))


def test_a_loss_or_distance_without_slope_is_warned_of():
    """A rounded loss guided nothing and a rounded distance fitted nothing, without a word."""
    from condiff.constraints import check_distance

    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    with pytest.warns(UserWarning, match=r"the guidance loss is > 0 on 2 of 2 samples but its gradient is zero on "
                                         r"every one.*torch.round.* \(at t = 49\)"):
        guided_sample(den, DPS(lambda z: torch.round(z.abs().sum(1) + 1)), (2, 3), 3)
    with pytest.warns(UserWarning, match=r"a constraint distance is > 0 on 3 of 3 samples but its gradient is zero"):
        check_distance(lambda z: torch.round(z.abs().sum(1) + 1), torch.randn(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guided_sample(den, DPS(lambda z: z.pow(2).sum(1)), (2, 3), 3)
        check_distance(lambda z: z.pow(2).sum(1), torch.randn(3, 2))
        check_distance(lambda z: torch.relu(z.abs().sum(1) - 100), torch.randn(3, 2))  # 0 on the set: no slope needed


def test_a_class_conditional_net_that_requires_its_labels_trains_and_loads():
    """The (x, t) check at wrapping refused a net whose forward(x, t, y) needs y, after it had trained."""
    from condiff.nets import build_net

    class NeedsY(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_net({"name": "mlp", "dim": 2, "hidden": 8, "depth": 1, "num_classes": 3})

        def forward(self, x, t, y):
            return self.inner(x, t, y)

    s = Schedule.linear(20)
    x, y = torch.randn(8, 2), torch.arange(8) % 3
    ema = Trainer(NeedsY(), DenoisingObjective(x, s, 4, y=y), TrainConfig(steps=2, warmup=0, progress=False)).fit()
    assert sample(NetDenoiser(ema, s).conditioned(1), (2, 2), steps=2).shape == (2, 2)
    with pytest.raises(TypeError, match=r"as net\(x, t\) .* NeedsY.forward\(x, t, y\) cannot take that"):
        Trainer(NeedsY(), DenoisingObjective(x, s, 4), TrainConfig(steps=1, progress=False))


def test_a_diffusers_denoiser_in_training_mode_is_refused_too():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler, UNet2DModel

    from condiff.denoiser import DiffusersDenoiser

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=4, dropout=0.3, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    den = DiffusersDenoiser(unet.train(), DDPMScheduler(num_train_timesteps=20))
    with pytest.raises(ValueError, match=r"the denoiser's network in training mode \(Dropout\) draws random values"):
        sample(den, (1, 1, 8, 8), steps=2)
    unet.eval()
    assert sample(den, (1, 1, 8, 8), steps=2).shape == (1, 1, 8, 8)


def test_a_guided_blow_up_is_not_put_down_to_the_model():
    """Inside UGD's backward steps and recurrence a non-finite x0 + delta or x_t was named as the model's."""
    from condiff.guidance import UGD

    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    rule = UGD(lambda z: z.pow(2).sum(1), forward=0.0, backward_lr=1e30, backward_steps=3, recurrence=1)
    with pytest.raises(FloatingPointError) as err:
        guided_sample(den, rule, (2, 3), 3, clip_x0=None, generator=torch.Generator().manual_seed(0))
    assert "check the model" not in str(err.value) and "not finite" in str(err.value)


def test_pnp_and_training_under_inference_mode_are_named():
    den = GaussianDenoiser(Schedule.linear(50), mean=0.0, std=1.0)
    said = r"takes gradients, which torch.inference_mode\(\) turns off .* \(torch.no_grad\(\) is fine\)"
    with torch.inference_mode():
        with pytest.raises(ValueError, match="infer " + said):
            infer(den, torch.zeros(2, 3), steps=2)
        with pytest.raises(ValueError, match="Trainer.fit " + said):
            Trainer(TimeMLP(2, hidden=8, depth=1), DenoisingObjective(torch.randn(8, 2), Schedule.linear(20), 4),
                    TrainConfig(steps=1, progress=False)).fit()


def test_the_other_size_warning_is_given_once_and_names_the_callers_line():
    from condiff.sample import generate

    den = NetDenoiser(_tiny_unet().eval(), Schedule.linear(50), sample_shape=(1, 8, 8))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        generate(den, 5, (1, 16, 16), batch_size=2, steps=2)
    shape = [w for w in said if "trained on samples of shape" in str(w.message)]
    assert len(shape) == 1 and shape[0].filename == __file__
