"""``condiff solve`` end to end on tiny random models (a condiff UNet and a diffusers UNet2DModel)."""

import json
import re

import numpy as np
import pytest
import torch

from condiff.cli.main import main
from condiff.models import save_model
from condiff.nets import build_net
from condiff.schedule import Schedule


def _solve(ckpt, out, *extra):
    return main(["solve", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--n", "3",
                 "--steps", "3", *extra])


def test_solve_writes_images_and_metrics(tiny_run, tmp_path):
    assert _solve(tiny_run, tmp_path / "a", "--operator", "inpaint-random", "--method", "dsg+dps",
                  "--rate", "0.3") == 0
    out = tmp_path / "a"
    for f in ("ground_truth.png", "measurement.png", "reconstruction.png", "comparison.png", "reconstruction.npz",
              "metrics.json"):
        assert (out / f).is_file(), f
    # no temporary files left; the mark says which command wrote the directory, and the writers' lock stays
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".condiff-run", ".writing.lock"]
    assert (out / ".condiff-run").read_text() == "condiff solve\n"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 3 and m["steps"] == 3 and m["nfe"] == 3 and m["batch_size"] == 64 and m["seed"] == 0
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["condiff"]
    # the swept default for this task adds DSG's final Euclidean step: a gradient at every step
    assert m["grad_evals"] == 3 and m["hyperparameters"]["final"] > 0
    assert m["hyperparameters"]["rate"] == 0.3 and m["task"] == "digits/inpaint-random"
    assert m["operator"]["name"] == "inpaint-random" and m["operator"]["sigma_y"] == 0.05
    assert -1 <= m["ssim"] <= 1 and m["residual"] > 0
    z = np.load(out / "reconstruction.npz")
    assert z["x"].shape == z["ground_truth"].shape == (3, 1, 8, 8)
    mse = ((z["x"].astype(np.float64) - z["ground_truth"]) ** 2).reshape(3, -1).mean(1)  # data on [-1, 1]
    np.testing.assert_allclose(m["psnr_per_image"], 10 * np.log10(2**2 / mse), rtol=1e-6)
    assert m["psnr"] == pytest.approx(np.mean(m["psnr_per_image"]))
    # the same seed reproduces the run exactly
    assert _solve(tiny_run, tmp_path / "b", "--operator", "inpaint-random", "--method", "dsg+dps",
                  "--rate", "0.3") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "reconstruction.npz")["x"], z["x"])
    # --final 0 is the paper's DSG: the last step (sigma = 0) returns x0_hat without a gradient
    assert _solve(tiny_run, tmp_path / "c", "--operator", "inpaint-random", "--method", "dsg+dps",
                  "--rate", "0.3", "--final", "0") == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["grad_evals"] == 2
    # --between base: DPS's own step off DSG's interval, a gradient there too (interval 3 over
    # 3 steps: DSG guides step 0 only; the last step adds none with --final 0)
    for between, evals in (("sample", 1), ("base", 2)):
        assert _solve(tiny_run, tmp_path / between, "--operator", "inpaint-random", "--method", "dsg+dps",
                      "--interval", "3", "--final", "0", "--between", between) == 0
        m = json.loads((tmp_path / between / "metrics.json").read_text())
        assert m["grad_evals"] == evals, between
    assert m["hyperparameters"]["between"] == "base"


# 3 steps at t = 99, 50, 0 of T = 100: FreeDoM repeats (2) the step at t = 50, inside its travel range
# [0.5 T, 0.8 T]; UGD's recurrence 2 doubles every step, and DSG leaves the last one unguided
@pytest.mark.parametrize("operator, method, nfe, grad_evals",
                         [("inpaint-box", "freedom", 4, 4), ("sr", "dsg+ugd", 5, 4), ("blur", "dps", 3, 3)])
def test_solve_operators_and_methods(tiny_run, tmp_path, operator, method, nfe, grad_evals):
    extra = ["--blur-size", "3"] if operator == "blur" else []
    assert _solve(tiny_run, tmp_path, "--operator", operator, "--method", method, *extra) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["method"] == method and (m["nfe"], m["grad_evals"]) == (nfe, grad_evals)


def test_solve_with_a_diffusers_model_and_input_files(tmp_path, tiny_diffusers_dir):
    imgs = np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", imgs)
    code = main(["solve", "--ckpt", str(tmp_path / "dm"), "--input", str(tmp_path / "imgs.npy"), "--n", "4",
                 "--operator", "sr", "--method", "ugd", "--steps", "2", "--out", str(tmp_path / "o"),
                 "--device", "cpu"])
    assert code == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 4 and m["nfe"] == m["grad_evals"] == 4 and m["images"].endswith("imgs.npy")  # recurrence 2
    gt = np.load(tmp_path / "o" / "reconstruction.npz")["ground_truth"]
    assert sorted(map(tuple, gt.reshape(4, -1).round(5))) == sorted(map(tuple, imgs.reshape(4, -1).round(5)))


def test_solve_clips_and_scores_on_the_models_recorded_range(tmp_path):
    """Data on [-4, 3.5]: x0_hat is clipped to [-4, 3.5] (not [-1, 1]), PSNR and SSIM use the range 8, and the npz holds
    the reconstruction unclipped; PSNR is the closed form 10 log10(8^2 / MSE) of what the npz holds."""
    torch.manual_seed(0)
    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1, 2], "groups": 4})
    save_model(tmp_path / "m", net, Schedule.linear(100), shape=[1, 8, 8], value_range=[-4.0, 3.5])
    imgs = np.random.default_rng(0).uniform(-4, 3.5, (3, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", imgs)
    args = ["solve", "--ckpt", str(tmp_path / "m"), "--input", str(tmp_path / "imgs.npy"), "--operator", "blur",
            "--method", "dps", "--steps", "3", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["clip_x0"] == [-4.0, 3.5] and m["scale"] == [-4.0, 3.5]
    z = np.load(tmp_path / "o" / "reconstruction.npz")
    mse = ((z["x"].astype(np.float64) - z["ground_truth"]) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(m["psnr_per_image"], 10 * np.log10(7.5**2 / mse), rtol=1e-6)
    assert main([*args, "--out", str(tmp_path / "p"), "--clip-x0", "0"]) == 0
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["clip_x0"] is None


def test_given_measurements_reproduce_the_simulated_run(tiny_run, tmp_path):
    """A user mask (inpaint-mask) on test images, then the same measurements given back with
    --measurement: the same seed gives the same reconstruction; only the truth-based metrics go."""
    mask = np.ones((8, 8), np.float32)
    mask[2:6, 1:7] = 0
    np.save(tmp_path / "mask.npy", mask)
    common = ["--operator", "inpaint-mask", "--mask", str(tmp_path / "mask.npy"), "--method", "dps"]
    assert _solve(tiny_run, tmp_path / "sim", *common) == 0
    z = np.load(tmp_path / "sim" / "reconstruction.npz")
    assert np.all(z["y"][:, :, 2:6, 1:7] == 0) and np.all(z["y"][:, :, 0] != 0)  # the mask was applied
    y = z["y"].copy()
    y[:, :, 2:6, 1:7] = 7.0  # what an unobserved pixel holds does not matter
    np.save(tmp_path / "y.npy", y)
    assert _solve(tiny_run, tmp_path / "given", *common, "--measurement", str(tmp_path / "y.npy")) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "given" / "reconstruction.npz")["x"], z["x"])
    m = json.loads((tmp_path / "given" / "metrics.json").read_text())
    sim = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert "psnr" not in m and "ground_truth" not in np.load(tmp_path / "given" / "reconstruction.npz")
    assert m["residual"] == pytest.approx(sim["residual"]) and m["measurement"].endswith("y.npy")
    assert (tmp_path / "given" / "comparison.png").is_file() and not (tmp_path / "given" / "ground_truth.png").exists()
    # one mask per image, and a single (H, W) measurement
    np.save(tmp_path / "masks.npy", np.broadcast_to(mask, (3, 1, 8, 8)).copy())
    assert _solve(tiny_run, tmp_path / "per", "--operator", "inpaint-mask", "--mask", str(tmp_path / "masks.npy"),
                  "--method", "dps", "--measurement", str(tmp_path / "y.npy")) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "per" / "reconstruction.npz")["x"], z["x"])
    np.save(tmp_path / "y1.npy", y[0, 0])
    assert main(["solve", "--ckpt", str(tiny_run), "--out", str(tmp_path / "one"), "--device", "cpu", "--steps", "3",
                 *common, "--measurement", str(tmp_path / "y1.npy")]) == 0
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["n"] == 1
    # a solve run's own reconstruction.npz gives back its measurements (its y, not class labels), and
    # solving from measurements in the simulated run's directory takes away that run's truth picture
    assert (tmp_path / "sim" / "ground_truth.png").is_file()
    sim_x, rec = z["x"].copy(), str(tmp_path / "sim" / "reconstruction.npz")
    assert _solve(tiny_run, tmp_path / "sim", *common, "--measurement", rec) == 0
    np.testing.assert_array_equal(np.load(rec)["x"], sim_x)
    assert not (tmp_path / "sim" / "ground_truth.png").exists()
    # one (H, W) image as --input, as for --measurement
    np.save(tmp_path / "img.npy", np.zeros((8, 8), np.float32))
    assert main(["solve", "--ckpt", str(tiny_run), "--out", str(tmp_path / "img"), "--device", "cpu", "--steps", "3",
                 *common, "--input", str(tmp_path / "img.npy")]) == 0
    assert json.loads((tmp_path / "img" / "metrics.json").read_text())["n"] == 1
    # a PNG mask: white is observed
    from PIL import Image
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert _solve(tiny_run, tmp_path / "png", "--operator", "inpaint-mask", "--mask", str(tmp_path / "mask.png"),
                  "--method", "dps", "--measurement", str(tmp_path / "y.npy")) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "png" / "reconstruction.npz")["x"], z["x"])


@pytest.mark.parametrize("make, extra, message", [
    (None, ["--operator", "inpaint-random", "--measurement", "{y}"], "needs an operator fixed in advance"),
    (None, ["--operator", "blur", "--mask", "{m}"], "--mask goes with --operator inpaint-mask, not blur"),
    (None, ["--operator", "inpaint-mask", "--mask", "{m}", "--p-drop", "0.5"], "--p-drop goes with --operator inp"),
    (None, ["--operator", "blur", "--factor", "4"], "--factor goes with --operator sr, not blur"),
    (None, ["--operator", "inpaint-mask"], "needs a mask: --mask FILE"),
    (None, ["--operator", "blur", "--measurement", "nope.npy"], "--measurement nope.npy: no such file or folder"),
    (np.ones((4, 1, 8, 8)), ["--operator", "inpaint-mask", "--mask", "{m}"], "one mask per image: pass --n 4"),
    (np.full((8, 8), 255, np.uint8), ["--operator", "inpaint-mask", "--mask", "{m}"], r"found values \[255\]"),
    (None, ["--operator", "sr", "--measurement", "{y}"], r"holds items of shape \(1, 8, 8\) but sr maps"),
    (None, ["--operator", "blur", "--measurement", "{y}", "--split", "test"], "--input, --data and --split"),
    (np.full((8, 8), 0.5), ["--operator", "inpaint-mask", "--mask", "{m}"], "holds only 0 .missing. and 1"),
    (np.zeros((8, 8)), ["--operator", "inpaint-mask", "--mask", "{m}"], "observes no pixel"),
    ("text", ["--operator", "inpaint-mask", "--mask", "{m}"], r"--mask .*m\.npy: not a \.npy file \(no NumPy header\)"),
    (np.ones((5, 8)), ["--operator", "inpaint-mask", "--mask", "{m}"], r"shape \(5, 8\) does not fit"),
    (None, ["--operator", "inpaint-mask", "--mask", "{t}"], r"--mask .* is a folder: give one \.npy, \.npz or"),
    # a data set's file as measurements: its splits were joined and read as measurements, without a word
    ("splits", ["--operator", "blur", "--measurement", "{s}"],
     r"--measurement .*s\.npz holds data split into train and test: measurements are one set"),
    # with measurements given, --n cannot exceed them: the hint said "pass --n 5", which was then refused
    (np.ones((5, 1, 8, 8)), ["--operator", "inpaint-mask", "--mask", "{m}", "--measurement", "{y}"],
     "one mask per image, but 5 masks for 3 measurements$"),
])
def test_bad_masks_and_measurements_are_refused(tiny_run, tmp_path, capsys, make, extra, message):
    if isinstance(make, str) and make == "splits":
        np.savez(tmp_path / "s.npz", x_train=np.zeros((3, 1, 8, 8), np.float32), x_test=np.zeros((2, 1, 8, 8)))
    elif isinstance(make, str):  # a text file named .npy, which numpy would read as a pickle
        (tmp_path / "m.npy").write_text("0 1 1 0\n")
    else:
        np.save(tmp_path / "m.npy", np.ones((8, 8)) if make is None else make)
    np.save(tmp_path / "y.npy", np.zeros((3, 1, 8, 8), np.float32))
    extra = [e.format(y=tmp_path / "y.npy", m=tmp_path / "m.npy", t=tmp_path, s=tmp_path / "s.npz") for e in extra]
    assert _solve(tiny_run, tmp_path / "o", "--method", "dps", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_an_operator_of_ones_own_from_a_python_file(tiny_run, tmp_path, capsys):
    """--operator FILE.py:NAME: an Operator subclass or factory, called with sigma_y = --noise; a measurement
    that is no picture is solved too (only its picture is left out)."""
    import hashlib

    (tmp_path / "ops.py").write_text(
        "import torch\nfrom condiff.operators import Operator\n\n"
        "class Squares(Operator):\n    def A(self, x):\n        return torch.nn.functional.avg_pool2d(x ** 2, 2)\n\n"
        "class Sums(Operator):\n    def A(self, x):\n        return x.flatten(1).sum(1, keepdim=True)\n\n"
        "class Twice(Operator):\n    def A(self, x):\n        return torch.cat([x, -x], 1)\n\n"
        "class Drawn(Operator):  # draws from torch's global stream, sized by the shape it is given\n"
        "    def __init__(self, sigma_y, shape):\n        super().__init__(sigma_y)\n"
        "        self.register_buffer('w', torch.rand(shape))\n"
        "    def A(self, x):\n        return self.w * x\n\n"
        "class Broken(Operator):\n    def A(self, x):\n        raise RuntimeError('boom')\n\n"
        "def three(sigma_y):\n    return 3\n")
    spec = f"{tmp_path / 'ops.py'}:Squares"
    assert _solve(tiny_run, tmp_path / "o", "--operator", spec, "--noise", "0.1") == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["operator"]["name"] == spec and m["operator"]["sigma_y"] == 0.1 and m["task"].endswith("/ops-Squares")
    assert m["operator"]["file_sha256"] == hashlib.sha256((tmp_path / "ops.py").read_bytes()).hexdigest()
    assert (tmp_path / "o" / "measurement.png").is_file()
    with np.load(tmp_path / "o" / "reconstruction.npz") as z:
        assert z["y"].shape[1:] == (1, 4, 4)  # avg-pooled 8x8 images
        np.save(tmp_path / "one.npy", z["y"][0, 0])  # one (4, 4) measurement saved as a plain 2-D array
    # ... is one picture for an operator that returns pictures, not 4 vectors (that failed mid-run)
    assert _solve(tiny_run, tmp_path / "o1", "--operator", spec, "--measurement", str(tmp_path / "one.npy"),
                  "--n", "1") == 0
    with np.load(tmp_path / "o1" / "reconstruction.npz") as z1:
        assert z1["y"].shape == (1, 1, 4, 4) and np.array_equal(z1["y"][0, 0], np.load(tmp_path / "one.npy"))
    assert _solve(tiny_run, tmp_path / "v", "--operator", f"{tmp_path / 'ops.py'}:Sums") == 0
    assert (tmp_path / "v" / "comparison.png").is_file() and not (tmp_path / "v" / "measurement.png").exists()
    # a vector measurement reads back through --measurement (it was taken for one (H, W) picture)
    assert _solve(tiny_run, tmp_path / "v2", "--operator", f"{tmp_path / 'ops.py'}:Sums", "--measurement",
                  str(tmp_path / "v" / "reconstruction.npz")) == 0
    # a two-channel measurement of one-channel images: solved, no picture of it (it failed after the run)
    assert _solve(tiny_run, tmp_path / "t", "--operator", f"{tmp_path / 'ops.py'}:Twice") == 0
    assert (tmp_path / "t" / "metrics.json").is_file() and not (tmp_path / "t" / "measurement.png").exists()
    # what the operator draws is fixed by --seed, and it is given the images' shape
    for out in ("d1", "d2"):
        assert _solve(tiny_run, tmp_path / out, "--operator", f"{tmp_path / 'ops.py'}:Drawn") == 0
    with np.load(tmp_path / "d1" / "reconstruction.npz") as a, np.load(tmp_path / "d2" / "reconstruction.npz") as b:
        assert np.array_equal(a["y"], b["y"]) and np.array_equal(a["x"], b["x"])
    capsys.readouterr()
    # per-image state without select(): named before any sampling, not mid-run
    assert _solve(tiny_run, tmp_path / "d3", "--operator", f"{tmp_path / 'ops.py'}:Drawn", "--batch-size", "2") == 2
    assert "A raised RuntimeError" in capsys.readouterr().err and not (tmp_path / "d3").exists()
    for name, message in (("three", "three(sigma_y=...) returned a int, not a condiff.operators.Operator"),
                          ("Broken", "--operator " + str(tmp_path / "ops.py") + ":Broken: A raised RuntimeError: boom"),
                          ("Nope", "has no 'Nope'; its callables: ['Broken', 'Drawn', 'Squares', 'Sums', 'Twice', "
                                   "'three']")):
        assert _solve(tiny_run, tmp_path / "x", "--operator", f"{tmp_path / 'ops.py'}:{name}") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    # the file runs before any model loads: a missing NAME is named even where the model is missing too
    assert _solve(tmp_path / "no-model", tmp_path / "x", "--operator", f"{tmp_path / 'ops.py'}:Nope") == 2
    assert "has no 'Nope'" in capsys.readouterr().err


def test_an_operator_of_ones_own_that_returns_another_batch_size_is_refused_before_sampling(tiny_run, tmp_path,
                                                                                              capsys):
    (tmp_path / "ops.py").write_text(
        "from condiff.operators import Operator\n\n"
        "class Pooled(Operator):  # one measurement of the whole batch\n"
        "    def A(self, x):\n        return x.mean(0, keepdim=True)\n")
    spec = f"{tmp_path / 'ops.py'}:Pooled"
    assert _solve(tiny_run, tmp_path / "o", "--operator", spec) == 2  # --n 3
    err = capsys.readouterr().err.strip()
    assert (f"--operator {spec}: A of a batch of 3 images must return a batch of 3 measurements, got (1, 1, 8, 8)"
            in err and "\n" not in err), err
    assert not (tmp_path / "o").exists()


def test_a_model_that_is_no_image_model_or_records_a_bad_shape_is_named(tiny_run, tmp_path, capsys):
    from condiff.nets import TimeMLP

    save_model(tmp_path / "toy", TimeMLP(2, hidden=8, depth=1), Schedule.linear(50), shape=[2])
    assert main(["solve", "--ckpt", str(tmp_path / "toy"), "--operator", "inpaint-random", "--out",
                 str(tmp_path / "o")]) == 2
    assert "is a model of (2,) vectors; condiff solve restores images (C, H, W)" in capsys.readouterr().err
    import shutil

    shutil.copytree(tiny_run, tmp_path / "odd")
    cfg = json.loads((tmp_path / "odd" / "config.json").read_text())
    (tmp_path / "odd" / "config.json").write_text(json.dumps({**cfg, "shape": [1, "8", 8]}))
    assert main(["sample", "--ckpt", str(tmp_path / "odd"), "--n", "2", "--out", str(tmp_path / "s")]) == 2
    assert "records a bad sample shape [1, '8', 8]: positive integers expected" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "odd" / "config.json"), "--n", "2"]) == 2  # a file: --ckpt's
    assert "config.json is a file; a checkpoint is a directory" in capsys.readouterr().err


def test_solve_warns_when_images_exceed_an_unrecorded_range(tiny_run, tmp_path, capsys):
    np.save(tmp_path / "imgs.npy", np.full((2, 1, 8, 8), 3.0, dtype=np.float32))
    assert main(["solve", "--ckpt", str(tiny_run), "--input", str(tmp_path / "imgs.npy"), "--operator", "blur",
                 "--method", "dps", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "o")]) == 0
    assert "warning: the images reach [3, 3] but the model records no value range" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["scale"] == [-1.0, 1.0]


def test_solve_warns_when_the_guidance_diverged(tiny_run, tmp_path, capsys):
    """A step far too large wrote PSNR -40 dB results and exit 0 without a word."""
    for zeta, warned in ((1e5, True), (0.1, False)):
        assert _solve(tiny_run, tmp_path / "o", "--operator", "inpaint-random", "--method", "dps",
                      "--zeta", str(zeta)) == 0
        err = capsys.readouterr().err
        assert ("far outside the model's scale [-1, 1]: the guidance diverged (lower --zeta)" in err) == warned, err
    assert _solve(tiny_run, tmp_path / "o", "--operator", "inpaint-random", "--method", "ugd",
                  "--forward", "1e6", "--backward-lr", "1e4") == 0
    assert "the guidance diverged (lower --forward or --backward-lr)" in capsys.readouterr().err


def test_solve_warns_when_inputs_do_not_match_the_recorded_range(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1, 2], "groups": 4})
    save_model(tmp_path / "one", net, Schedule.linear(100), shape=[1, 8, 8], value_range=[-1.0, 1.0])
    save_model(tmp_path / "five", net, Schedule.linear(100), shape=[1, 8, 8], value_range=[-5.0, 5.0])
    np.save(tmp_path / "big.npy", np.full((2, 1, 8, 8), 4.0, dtype=np.float32))
    from PIL import Image
    (tmp_path / "pngs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "pngs" / "a.png")
    for ckpt, given, message in (("one", "big.npy", r"reach \[4, 4\] but the model was trained on \[-1, 1\]"),
                                 ("five", "pngs", "PNG images are read on \\[-1, 1\\], but the model's data lie on")):
        assert main(["solve", "--ckpt", str(tmp_path / ckpt), "--input", str(tmp_path / given), "--operator", "blur",
                     "--method", "dps", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / f"o-{ckpt}")]) == 0
        assert re.search(message, capsys.readouterr().err), ckpt
    assert main(["solve", "--ckpt", str(tmp_path / "five"), "--input", str(tmp_path / "big.npy"), "--operator",
                 "blur", "--method", "dps", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "q")]) == 0
    assert "warning" not in capsys.readouterr().err  # within the recorded range: nothing to say


@pytest.mark.parametrize("extra, message", [
    (["--operator", "inpaint-random", "--method", "dsg+dps", "--eta", "0"], "eta > 0"),
    (["--operator", "inpaint-random", "--method", "dps", "--rate", "0.2"],
     "applies to DSG only; use method .dsg\\+dps."),
    (["--operator", "inpaint-random", "--method", "dsg+xyz"], r"unknown guidance method 'dsg\+xyz'"),
    (["--operator", "inpaint-random", "--method", "dps", "--forward", "1"], "--forward does not apply to --method dps"),
    (["--operator", "inpaint-random", "--method", "dsg+ugd", "--zeta", "0.5"],  # was UGD.__init__()'s TypeError
     "--zeta does not apply to --method dsg\\+ugd; it takes --forward, --backward-steps, --backward-lr, "
     "--recurrence, --rate, --interval, --final, --between"),
    (["--operator", "inpaint-random", "--method", "dsg+dps", "--rate", "2"], r"rate must lie in \[0, 1\]"),
    (["--operator", "inpaint-random", "--method", "dsg+dps", "--zeta", "2"],  # accepted, recorded, without effect
     "--zeta does not apply to --method dsg\\+dps unless --between base and --interval >= 2: DSG's step sets"),
    (["--operator", "blur", "--noise", "nan"], "--noise must be a number >= 0, got nan"),  # was "sigma_y must be"
    (["--operator", "nosuch"], r"unknown operator 'nosuch'; expected one of \[.*\], or FILE.py:NAME for your own"),
    (["--operator", "no/such.py:Op"], "operator file .*no/such.py does not exist"),
    (["--operator", "sr", "--factor", "3"], "not divisible by the factor 3"),
    (["--operator", "inpaint-random", "--n", "100000"], "--n must be between 1 and 359"),
    (["--operator", "inpaint-random", "--task", "digits/inpaint-randon"],  # a typo fell back to GENERIC
     r"--task 'digits/inpaint-randon' has no swept defaults; known: \["),
])
def test_bad_input_is_one_line_error(tiny_run, tmp_path, capsys, extra, message):
    assert _solve(tiny_run, tmp_path, *extra) == 2  # a repeated flag (--n) takes its last value
    err = capsys.readouterr().err.strip()
    assert err.startswith("condiff solve: error:") and "\n" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("shape, extra, message", [
    ((2, 3, 16, 16), ["--n", "2"], "images have shape (3, 16, 16) but the model expects (1, 8, 8)"),
    ((2, 1, 8, 8), ["--split", "train"], "--input FILE uses every image in the file"),
    ((2, 1, 8, 8), ["--data", "digits"], "--input gives the true images itself; --data picks them"),
])
def test_bad_input_is_refused(tiny_run, tmp_path, capsys, shape, extra, message):
    np.save(tmp_path / "imgs.npy", np.zeros(shape, dtype=np.float32))
    code = main(["solve", "--ckpt", str(tiny_run), "--input", str(tmp_path / "imgs.npy"), *extra,
                 "--operator", "blur", "--out", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_scores_a_diffusers_model_against_the_data_named_by_data(tmp_path, tiny_diffusers_dir, capsys):
    args = ["eval", "--ckpt", str(tmp_path / "dm"), "--n", "4", "--steps", "2", "--out", str(tmp_path / "e"),
            "--device", "cpu"]
    assert main(args) == 2 and "pass --data NAME" in capsys.readouterr().err
    assert main([*args, "--data", "toy2d"]) == 2
    assert "shape (1, 8, 8) but toy2d holds (2,)" in capsys.readouterr().err
    np.save(tmp_path / "mine.npy", np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32))
    assert main([*args, "--data", str(tmp_path / "mine.npy")]) == 0  # scored by MMD (no digits classifier)
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["sample_steps"] == 2 and (tmp_path / "e" / "samples.npz").is_file()
    (tmp_path / "f").write_text("a file")
    assert main(["sample", "--ckpt", str(tmp_path / "dm"), "--out", str(tmp_path / "f" / "sub")]) == 2
    assert "f is a file, not a directory" in capsys.readouterr().err


def test_a_sample_run_that_fails_half_way_leaves_the_previous_set_as_it_was(tiny_run, tmp_path, monkeypatch, capsys):
    """A failure between samples.npz and the picture left the new samples beside the old picture and the
    old run's record; then (the record removed first) the old samples without their record. The new set is
    gathered aside and moved in whole."""
    import condiff.cli.common as common

    out = tmp_path / "s"
    args = ["sample", "--ckpt", str(tiny_run), "--out", str(out), "--n", "4", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--seed", "0"]) == 0
    assert {p.name for p in out.iterdir()} >= {"samples.npz", "samples.png", "sample_config.json"}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(common, "save_png_grid", disk_full)
    assert main([*args, "--seed", "1"]) == 74  # EX_IOERR
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.is_dir()]  # nothing gathered is left behind
    monkeypatch.undo()
    assert main([*args, "--seed", "1"]) == 0
    record = json.loads((out / "sample_config.json").read_text())
    assert record["seed"] == 1 and record["versions"]["torch"] == torch.__version__


def test_out_is_refused_when_it_is_a_model_checkpoint_directory(tiny_run, capsys):
    """eval --out RUN/model wrote its files into the checkpoint, which the next save replaces whole."""
    before = sorted(p.name for p in tiny_run.iterdir())
    assert main(["sample", "--ckpt", str(tiny_run), "--out", str(tiny_run), "--n", "2", "--steps", "2"]) == 2
    assert "is a model checkpoint directory" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_eval_of_a_bare_model_directory_writes_beside_it_not_into_it(tiny_run, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_run, model)
    np.save(tmp_path / "ref.npy", np.random.default_rng(0).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32))
    args = ["eval", "--ckpt", str(model), "--n", "4", "--steps", "2", "--device", "cpu", "--data",
            str(tmp_path / "ref.npy")]
    assert main(args) == 0
    assert (tmp_path / "m_eval" / "metrics.json").is_file() and not (model / "metrics.json").exists()
    assert not (model / "eval").exists()  # inside it, the next save of the model deleted it


def test_solve_and_pnp_treat_a_class_conditional_model_as_sample_does(tmp_path, capsys):
    """solve ran a labelled model with its never-trained unconditional predictions, without a word and
    without a way to name a class; it now takes --label (recorded) and warns as sample does, pnp too."""
    torch.manual_seed(0)
    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1, 2], "groups": 4, "num_classes": 10})
    with torch.no_grad():  # the zero-started output layer would hide the label
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = tmp_path / "labelled"
    save_model(model, net, Schedule.linear(100), data={"name": "digits"}, shape=[1, 8, 8], label_drop=0.0)
    capsys.readouterr()
    assert _solve(model, tmp_path / "a", "--operator", "blur", "--method", "dps") == 0
    assert "without label drop" in capsys.readouterr().err
    assert _solve(model, tmp_path / "b", "--operator", "blur", "--method", "dps", "--label", "3") == 0
    assert "without label drop" not in capsys.readouterr().err
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["label"] == 3 and m["guidance_scale"] == 0.0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["label"] is None
    # the class changes the reconstruction (the same seed otherwise)
    a, b = (np.load(tmp_path / d / "reconstruction.npz")["x"] for d in ("a", "b"))
    assert not np.array_equal(a, b)
    assert _solve(model, tmp_path / "c", "--operator", "blur", "--method", "dps", "--label", "10") == 2
    assert re.search(r"--label must lie in \[0, 10\)", capsys.readouterr().err)
    assert main(["pnp", "digits", "--ckpt", str(model), "--label", "3", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert "without label drop" in capsys.readouterr().err


def test_solve_draws_its_true_images_by_seed_and_keeps_each_budget_apart(tiny_run, tmp_path):
    """Found by the CLI mutation round: images taken in order, or a default --out without the step count
    (a second budget overwrote the first), went unnoticed."""
    def truth(seed):
        out = tmp_path / f"s{seed}"
        assert _solve(tiny_run, out, "--operator", "blur", "--method", "dps", "--seed", str(seed)) == 0
        with np.load(out / "reconstruction.npz") as z:
            return z["ground_truth"]

    assert not np.array_equal(truth(1), truth(2))
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_run, model)
    for steps in ("2", "3"):
        assert main(["solve", "--ckpt", str(model), "--operator", "blur", "--method", "dps", "--n", "2",
                     "--steps", steps, "--device", "cpu"]) == 0
    assert {p.name for p in (tmp_path / "m_solve").iterdir()} == {"blur-dps-2", "blur-dps-3"}


def test_a_png_mask_of_zeros_and_ones_is_read_as_it_is_and_a_grey_picture_is_no_mask(tmp_path):
    from PIL import Image

    from condiff.cli.solve import load_mask

    mask = (np.arange(64).reshape(8, 8) % 3 != 0).astype(np.uint8)
    for name, arr in (("white.png", mask * 255), ("ones.png", mask), ("ones16.png", mask.astype(np.uint16))):
        Image.fromarray(arr).save(tmp_path / name)
        got = load_mask(tmp_path / name, (1, 8, 8), 2)
        np.testing.assert_array_equal(got[0, 0].numpy(), mask)  # 0/1 saved as a picture: 0 missing, 1 observed
    soft = (mask * 255).astype(np.uint8)
    soft[0, :3] = 100  # a few anti-aliased edge pixels are thresholded at mid-grey
    Image.fromarray(soft).save(tmp_path / "soft.png")
    expect = mask.copy()
    expect[0, :3] = 0
    np.testing.assert_array_equal(load_mask(tmp_path / "soft.png", (1, 8, 8), 2)[0, 0].numpy(), expect)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match=r"grey.png: 100% of its pixels are grey; a mask PNG is black \(missing\) "
                                         r"and white \(observed\), or holds the values 0 and 1"):
        load_mask(tmp_path / "grey.png", (1, 8, 8), 2)


def test_solve_on_data_of_four_channels_draws_channel_0_and_keeps_its_results(tmp_path):
    """It sampled, then failed on the ground-truth picture (save_png_grid takes 1 or 3 channels), leaving an empty
    output folder."""
    from PIL import Image

    from condiff.models import save_model
    from condiff.nets import build_net
    from condiff.schedule import Schedule

    x = np.random.default_rng(0).uniform(-1, 1, (6, 4, 8, 8)).astype("float32")
    np.savez(tmp_path / "four.npz", x=x[:3], x_test=x[3:])
    torch.manual_seed(0)
    net = build_net({"name": "unet", "in_channels": 4, "base": 8, "mults": [1, 2], "groups": 4})
    save_model(tmp_path / "model", net, Schedule.linear(100), data={"name": str(tmp_path / "four.npz")},
               shape=[4, 8, 8])
    assert _solve(tmp_path / "model", tmp_path / "out", "--operator", "sr", "--factor", "2") == 0
    for name in ("ground_truth.png", "measurement.png", "reconstruction.png", "comparison.png"):
        assert (tmp_path / "out" / name).is_file()
    assert Image.open(tmp_path / "out" / "ground_truth.png").mode == "L"  # channel 0, grey
    assert np.load(tmp_path / "out" / "reconstruction.npz")["x"].shape == (3, 4, 8, 8)


def test_out_is_refused_as_the_folder_of_images_given(tiny_run, tmp_path, capsys):
    """solve wrote its pictures and metrics.json among the user's own images, then refused that folder."""
    from PIL import Image

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pngs / "a.png")
    (tmp_path / "link").symlink_to(pngs)
    (tmp_path / "real_test").mkdir()
    (pngs / "test").symlink_to(tmp_path / "real_test")  # a split that is a link
    for out, given, where in ((pngs, pngs, "the folder"), (pngs / "train", pngs, "the train/ split of the folder"),
                              (tmp_path / "real_test", pngs, "the real_test/ split of the folder"),
                              (tmp_path / "link", pngs, "the folder"), (pngs, tmp_path / "link", "the folder")):
        assert _solve(tiny_run, out, "--operator", "blur", "--input", str(given), "--n", "1") == 2
        assert capsys.readouterr().err.strip() == (
            f"condiff solve: error: --out {out} is {where} given as --input ({given}): its results would be read "
            "as data with those files: give another directory")
    assert sorted(p.name for p in pngs.rglob("*")) == ["a.png", "test"]
    (pngs / "test").unlink()
    assert main(["train", "--data", str(pngs), "--out", str(pngs / "test")]) == 2
    assert "is the test/ split of the folder given as --data" in capsys.readouterr().err
    # a subfolder of another name is not read as data: results may go there
    assert _solve(tiny_run, pngs / "results", "--operator", "blur", "--input", str(pngs), "--n", "1") == 0
    # the method's name in any case is recorded (and names the default folder) in lower case
    assert _solve(tiny_run, tmp_path / "o", "--operator", "blur", "--input", str(pngs), "--method", "DSG+DPS",
                  "--n", "1") == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["method"] == "dsg+dps"


def test_solve_names_what_it_was_given_in_its_own_terms(tiny_run, tmp_path, capsys):
    """A solve result given as --input, a model's data without a test split, an .npz of two masks, a step
    count that guides nothing: each was a puzzle (labels must be integers; no way out named; the prefix
    twice; a silent unguided run)."""
    assert _solve(tiny_run, tmp_path / "a", "--operator", "blur") == 0
    assert _solve(tiny_run, tmp_path / "b", "--operator", "blur", "--input", str(tmp_path / "a" / "reconstruction.npz"),
                  "--n", "1") == 2
    err = capsys.readouterr().err
    assert "(a condiff solve result's reconstruction.npz keeps its measurements in y" in err
    np.savez(tmp_path / "two.npz", a=np.ones((8, 8)), b=np.ones((8, 8)))
    assert _solve(tiny_run, tmp_path / "c", "--operator", "inpaint-mask", "--mask", str(tmp_path / "two.npz")) == 2
    assert capsys.readouterr().err.strip() == (f"condiff solve: error: --mask {tmp_path / 'two.npz'}: expected one "
                                               "array or one named 'mask', found ['a', 'b']")
    assert _solve(tiny_run, tmp_path / "d", "--operator", "inpaint-random", "--steps", "1", "--final", "0") == 0
    assert ("warning: dsg+dps guided no step (of 1), so the reconstructions ignore the measurements (with one step, "
            "DSG guides only through --final)") in capsys.readouterr().err
    assert _solve(tiny_run, tmp_path / "d", "--operator", "inpaint-random", "--steps", "1", "--final", "0.5") == 0
    assert "guided no step" not in capsys.readouterr().err
    np.save(tmp_path / "own.npy", np.zeros((4, 1, 8, 8), np.float32))
    assert main(["train", "--data", str(tmp_path / "own.npy"), "--out", str(tmp_path / "own"), "--set",
                 "train.steps=2", "--set", "model.base=8", "--set", "model.mults=[1]", "--set", "train.warmup=0"]) == 0
    capsys.readouterr()
    assert _solve(tmp_path / "own", tmp_path / "e", "--operator", "blur") == 2
    assert capsys.readouterr().err.strip().endswith("(or draw from the training images: --split train; or give them: "
                                                    "--input FILE)")


def test_a_tuned_base_step_is_dropped_where_dsg_takes_no_base_steps(tiny_run, tmp_path, capsys):
    """The 1000-step digits defaults take DPS steps of zeta 0.1 between DSG's (between base, interval 20):
    --between sample or --interval 1 turned those off and the default zeta was then refused as if given."""
    from condiff.cli.main import build_parser
    from condiff.cli.solve import hyperparameters

    def hp(*extra):
        args = build_parser().parse_args(["solve", "--ckpt", "x", "--operator", "blur", "--steps", "1000", *extra])
        return hyperparameters(args, "digits/inpaint-random")

    assert hp() == {"interval": 20, "rate": 0.4, "final": 0.25, "zeta": 0.1, "between": "base"}
    assert "zeta" not in hp("--between", "sample") and "zeta" not in hp("--interval", "1")
    assert hp("--zeta", "0.3")["zeta"] == 0.3
    with pytest.raises(ValueError, match="--zeta does not apply to --method dsg\\+dps unless --between base"):
        hp("--zeta", "0.3", "--between", "sample")


def test_the_default_box_fits_a_wide_image_and_a_box_too_large_names_its_limit():
    """The default box (half the width, an eighth of it kept from the border) did not fit 12x20 images, and a
    --box that did not fit named a margin no flag sets."""
    from condiff.cli.solve import build_operator

    g = torch.Generator().manual_seed(0)
    op = build_operator("inpaint-box", (3, 1, 12, 20), g, 0.05)
    assert op.kind == "box(6x6)" and int((op.mask == 0).sum()) == 3 * 36  # half the shorter side
    square = build_operator("inpaint-box", (3, 1, 8, 8), g, 0.05)  # square images as before: 4x4, 1 from the border
    assert square.kind == "box(4x4)" and not bool((square.mask[..., 0, :] == 0).any())
    with pytest.raises(ValueError, match=r"--box 11 does not fit 12x20 images, whose box stays 1 pixel from each "
                                         r"border: at most 10x18"):
        build_operator("inpaint-box", (3, 1, 12, 20), g, 0.05, {"box": 11})
    # a pair of sides, as the library's Inpainting.box takes it, is checked side by side
    assert build_operator("inpaint-box", (2, 1, 16, 16), g, 0.05, {"box": (4, 6)}).kind == "box(4x6)"
    with pytest.raises(ValueError, match=r"--box \(4, 15\) does not fit 16x16 images"):
        build_operator("inpaint-box", (2, 1, 16, 16), g, 0.05, {"box": (4, 15)})


def test_a_kernel_too_large_for_the_images_is_said_in_the_flags_terms(tiny_run, tmp_path, capsys):
    """sr --factor 8 on 8x8 images stopped mid-run on "a kernel of 32 taps with padding (12, 12)", naming no flag."""
    cases = [  # (flags, a part of the error, its hint)
        (["sr", "--factor", "8"], "--operator sr: SuperResolution: a kernel of 32 taps",
         "(a smaller --factor, or --kernel box, keeps the kernel within the image)"),
        # a factor that does not divide the sides is another fault, with its own hint
        (["sr", "--factor", "3"], "is not divisible by the factor 3",
         "(--factor must divide the images' sides, 8 and 8)"),
        # with the box kernel already chosen, only the factor is left to change
        (["sr", "--factor", "16", "--kernel", "box"], "a kernel of",
         "(a smaller --factor keeps the kernel within the image)"),
        # blur's kernel, in blur's flag
        (["blur", "--blur-size", "17"], "--operator blur: GaussianBlur: a kernel of 17 taps",
         "(a smaller --blur-size keeps the kernel within the image)"),
    ]
    for flags, error, hint in cases:
        assert _solve(tiny_run, tmp_path / "s", "--method", "dps", "--operator", *flags) == 2
        err = capsys.readouterr().err
        assert error in err and err.rstrip().endswith(hint), flags
        assert ("kernel within" in err) == ("kernel within" in hint)  # one hint, the fault's own
        assert not (tmp_path / "s").exists()


def test_a_factor_that_does_not_divide_the_sides_names_each_side(tmp_path, capsys):
    """The sides of a picture that is not square, height then width (an 8x8 test could not tell them apart)."""
    from condiff.models import save_model
    from condiff.nets import build_net
    from condiff.schedule import Schedule

    np.save(tmp_path / "wide.npy", np.zeros((8, 1, 16, 20), np.float32))
    net = build_net({"name": "unet", "in_channels": 1, "base": 8, "mults": [1, 2], "groups": 4})
    save_model(tmp_path / "m", net, Schedule.linear(100), data={"name": str(tmp_path / "wide.npy")}, shape=[1, 16, 20])
    assert main(["solve", "--ckpt", str(tmp_path / "m"), "--operator", "sr", "--factor", "3", "--kernel", "box",
                 "--split", "train", "--method", "dps", "--steps", "2", "--n", "2", "--device", "cpu",
                 "--out", str(tmp_path / "s")]) == 2
    assert "(--factor must divide the images' sides, 16 and 20)" in capsys.readouterr().err
