"""condiff.data: built-in data sets, user files, validation errors and PNG output."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.data import (
    DATASETS,
    ArrayData,
    DataError,
    load_array,
    load_dataset,
    load_digits,
    load_patches,
    load_png_folder,
    load_toy2d,
    native,
    nominal_range,
    save_png,
    save_png_grid,
    validate,
    warn_range,
)
from condiff.data.patches import TEST_IMAGES, TRAIN_IMAGES, source_image
from condiff.data.toy2d import KINDS

# --- digits ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return {s: load_digits(s) for s in ("train", "test", "all")}


def test_digits_shapes_range_and_labels(digits):
    from sklearn.datasets import load_digits as sk_load_digits

    assert [len(digits[s]) for s in ("train", "test", "all")] == [1438, 359, 1797]
    for d in digits.values():
        assert d.x.dtype == torch.float32 and d.shape == (1, 8, 8)
        assert d.y.dtype == torch.long and set(d.y.tolist()) == set(range(10))
    v = digits["all"].x * 8 + 8  # back to 0..16
    assert torch.equal(v, v.round()) and v.min() == 0 and v.max() == 16
    sk = sk_load_digits()
    assert np.array_equal(digits["all"].x.squeeze(1).numpy(), (sk.images / 8 - 1).astype(np.float32))
    assert np.array_equal(digits["all"].y.numpy(), sk.target)


def test_digits_split_is_disjoint_stratified_and_fixed(digits):
    train, test = set(digits["train"].meta["indices"]), set(digits["test"].meta["indices"])
    assert not train & test and train | test == set(range(1797))
    all_counts = torch.bincount(digits["all"].y)
    assert torch.equal(torch.bincount(digits["test"].y), (0.2 * all_counts).round().long())
    again = load_digits("test")
    assert torch.equal(again.x, digits["test"].x) and torch.equal(again.y, digits["test"].y)
    # Pinned: the split must not drift across machines or library versions.
    assert digits["test"].meta["indices"][:8] == [5, 6, 7, 15, 16, 18, 25, 53]
    assert sum(digits["test"].meta["indices"]) == 321697
    assert load_digits("test", seed=1).meta["indices"] != digits["test"].meta["indices"]


def test_subset_keeps_labels_and_meta_aligned(digits):
    d = digits["train"]
    sevens = d.subset(d.y == 7)
    assert len(sevens) == int((d.y == 7).sum()) and bool((sevens.y == 7).all())
    picked = d.subset([4, 0, 2])
    assert torch.equal(picked.x, d.x[[4, 0, 2]])
    assert picked.meta["indices"] == [d.meta["indices"][i] for i in (4, 0, 2)]
    with pytest.raises(DataError, match="mask"):
        d.subset(torch.ones(3, dtype=torch.bool))
    with pytest.raises(DataError, match="empty"):
        d.subset(d.y == 11)


# --- toy2d -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_toy2d_kinds(kind):
    train = load_toy2d("train", kind=kind, n=500)
    test = load_toy2d("test", kind=kind, n=500)
    assert train.x.shape == (500, 2) and train.x.dtype == torch.float32
    assert train.x.abs().max() < 1.3 and train.x.abs().max() > 0.8
    assert set(train.y.tolist()) <= set(range(train.meta["components"]))
    assert torch.equal(train.x, load_toy2d("train", kind=kind, n=500).x)
    assert not torch.allclose(train.x, test.x)


def test_toy2d_gmm_weights_and_modes():
    w = torch.tensor([4.0, 1, 1, 2, 0, 1, 3, 4])
    n = 20_000
    d = load_toy2d("train", kind="gmm", n=n, weights=w)
    p = w.double() / w.sum()
    assert torch.allclose(torch.tensor(d.meta["weights"], dtype=torch.float64), p)
    # Component counts are Binomial(n, p_k): a 5-sigma band fails with probability < 1e-6 per component
    # if the sampler is right (and the draw is seeded, so the test is deterministic besides).
    freq = torch.bincount(d.y, minlength=8).double() / n
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all())
    assert freq[4] == 0
    # meta describes the mixture: each point is nearest its own mean (means 0.61 apart, std 0.05)
    # and the spread around the mean matches meta["std"] (relative error ~ 1/sqrt(2 n_k) < 3%).
    means = torch.tensor(d.meta["means"], dtype=torch.float32)
    nearest = torch.cdist(d.x, means).argmin(1)
    assert float((nearest == d.y).float().mean()) > 0.999
    resid = d.x - means[d.y]
    assert abs(float(resid.std()) / d.meta["std"] - 1) < 0.05


def test_toy2d_bad_arguments():
    with pytest.raises(DataError, match="expected 8 weights"):
        load_toy2d(kind="gmm", weights=[1, 2])
    with pytest.raises(DataError, match="non-negative"):
        load_toy2d(kind="gmm", weights=[-1] + [1] * 7)
    with pytest.raises(DataError, match="unknown kind"):
        load_toy2d(kind="spiral")
    with pytest.raises(DataError, match="split"):
        load_toy2d("validation")


# --- patches ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patches():
    return {s: load_patches(s) for s in ("train", "test")}


def test_patches_split_by_source(patches):
    train, test = patches["train"], patches["test"]
    assert (len(train), len(test)) == (5236, 1323)
    assert set(train.meta["sources"]) == set(TRAIN_IMAGES)
    assert set(test.meta["sources"]) == set(TEST_IMAGES)
    assert not set(train.meta["sources"]) & set(test.meta["sources"])
    for d in (train, test):
        assert d.shape == (3, 32, 32) and d.y is None
        assert d.x.min() >= -1 and d.x.max() <= 1 and d.x.min() < -0.9 and d.x.max() > 0.9


def test_patches_are_crops_of_their_source(patches):
    d = patches["train"]
    for i in (0, len(d) - 1):
        r, c = d.meta["positions"][i]
        img = source_image(d.meta["sources"][i])[r : r + 32, c : c + 32]
        assert np.array_equal(d.x[i].permute(1, 2, 0).numpy(), img / np.float32(127.5) - 1)


def test_patches_random_crops_are_seeded():
    a = load_patches("test", size=16, n=64, seed=3)
    assert a.x.shape == (64, 3, 16, 16) and set(a.meta["sources"]) <= set(TEST_IMAGES)
    assert torch.equal(a.x, load_patches("test", size=16, n=64, seed=3).x)
    assert not torch.equal(a.x, load_patches("test", size=16, n=64, seed=4).x)


# --- registry ----------------------------------------------------------------------------------------


def test_load_dataset_by_name_and_unknown_name(tmp_path):
    assert {"digits", "toy2d", "patches"} <= set(DATASETS)
    assert load_dataset("toy2d", "test", kind="rings", n=10).x.shape == (10, 2)
    with pytest.raises(DataError, match=r"not a registered name \(.*digits.*patches.*toy2d.*\).*no file"):
        load_dataset("digitz")
    for gone in (tmp_path / "missing.npy", "sub/data", "x.NPZ"):  # a path, not a misspelt name
        with pytest.raises(DataError, match=rf"^data file {re.escape(str(gone))} does not exist \(moved or deleted"):
            load_dataset(str(gone))


# --- user files ----------------------------------------------------------------------------------------


def test_npy_round_trip(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (6, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    d = load_dataset(str(tmp_path / "a.npy"))
    assert np.array_equal(d.x.numpy(), x) and d.y is None
    np.save(tmp_path / "hw.npy", x[:, 0])  # (N, H, W) gains a channel axis
    assert load_array(tmp_path / "hw.npy").x.shape == (6, 1, 4, 5)
    u8 = np.array([[0, 255], [51, 204]], dtype=np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    assert torch.allclose(load_array(tmp_path / "u8.npy").x, torch.tensor([[-1.0, 1], [-0.6, 0.6]]))


def test_npz_round_trip_keys_labels_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 2)).astype(np.float32), rng.integers(0, 3, 8)
    np.savez(tmp_path / "xy.npz", x=x, y=y, other=np.ones((2, 3)))
    d = load_array(tmp_path / "xy.npz")
    assert np.array_equal(d.x.numpy(), x) and np.array_equal(d.y.numpy(), y) and d.y.dtype == torch.long
    other = load_array(tmp_path / "xy.npz", key="other")
    assert other.x.shape == (2, 3) and other.y is None
    np.savez(tmp_path / "one.npz", samples=x)
    assert np.array_equal(load_array(tmp_path / "one.npz").x.numpy(), x)
    np.savez(tmp_path / "split.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3])
    test = load_dataset(str(tmp_path / "split.npz"), "test")
    assert np.array_equal(test.x.numpy(), x[:3]) and np.array_equal(test.y.numpy(), y[:3])
    assert len(load_dataset(str(tmp_path / "split.npz"), "all")) == 11
    with pytest.raises(DataError, match="no test split"):
        load_dataset(str(tmp_path / "one.npz"), "test")
    # x beside x_test is the training split: 'all' joins both (it used to leave x out)
    np.savez(tmp_path / "x_and_test.npz", x=x, x_test=x[:3] + 5)
    both = load_dataset(str(tmp_path / "x_and_test.npz"), "all").x.numpy()
    assert np.array_equal(both, np.concatenate([x, x[:3] + 5]))
    assert np.array_equal(load_dataset(str(tmp_path / "x_and_test.npz"), "train").x.numpy(), x)
    np.savez(tmp_path / "both.npz", x=x, x_train=x, x_test=x[:3])
    with pytest.raises(DataError, match="holds both x and x_train"):
        load_dataset(str(tmp_path / "both.npz"), "train")
    assert len(load_dataset(str(tmp_path / "both.npz"), "train", key="x")) == 8  # an explicit key decides
    # a test split alone is not taken for training data
    np.savez(tmp_path / "test_only.npz", x_test=x)
    with pytest.raises(DataError, match="holds a test split but no training data"):
        load_dataset(str(tmp_path / "test_only.npz"), "train")
    with pytest.raises(DataError, match=r"no array 'nope'.*\['samples'\]"):
        load_array(tmp_path / "one.npz", key="nope")


def _write_pngs(folder, arrays):
    folder.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img{i:02d}.png")


def test_png_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (5, 7), dtype=np.uint8) for _ in range(3)]
    _write_pngs(tmp_path / "grey", grey)
    d = load_dataset(str(tmp_path / "grey"))
    assert d.x.shape == (3, 1, 5, 7) and d.meta["files"] == ["img00.png", "img01.png", "img02.png"]
    assert np.array_equal(((d.x[:, 0] + 1) * 127.5).round().numpy(), np.stack(grey))
    _write_pngs(tmp_path / "grey" / "test", grey[:1])  # PNGs beside test/ are the training split
    assert len(load_dataset(str(tmp_path / "grey"), "train")) == 3
    assert len(load_dataset(str(tmp_path / "grey"), "test")) == 1
    assert len(load_dataset(str(tmp_path / "grey"), "all")) == 4
    rgb = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(2)]
    _write_pngs(tmp_path / "rgb", rgb)
    d = load_png_folder(tmp_path / "rgb")
    assert np.array_equal(((d.x + 1) * 127.5).round().permute(0, 2, 3, 1).numpy(), np.stack(rgb))
    assert load_png_folder(tmp_path / "grey", channels=3).x.shape == (3, 3, 5, 7)
    one = load_dataset(str(tmp_path / "grey" / "img01.png"))  # a single image file: a batch of one
    assert one.x.shape == (1, 1, 5, 7) and one.meta["files"] == ["img01.png"]
    assert torch.equal(one.x[0], load_dataset(str(tmp_path / "grey")).x[1])


def test_save_png_round_trip(tmp_path):
    x = torch.rand(3, 4, 6) * 2 - 1
    path = save_png(x, tmp_path / "one.png")
    back = np.asarray(Image.open(path)).astype(np.float32)
    assert np.abs(back.transpose(2, 0, 1) / 127.5 - 1 - x.numpy()).max() <= 1 / 127.5 + 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]  # no temporary file left


def test_save_png_grid_size_and_tiles(tmp_path):
    x = torch.linspace(-1, 1, 10 * 64).reshape(10, 1, 8, 8)
    img = np.asarray(Image.open(save_png_grid(x, tmp_path / "grid.png")))
    # 10 images -> 4 per row, 3 rows; 8 px tiles upscaled x4 to 32 px; 1 px padding including borders.
    assert img.shape == (3 * 32 + 4, 4 * 32 + 5)
    tile = ((x[5, 0] + 1) * 127.5).round().numpy().repeat(4, 0).repeat(4, 1)
    assert np.array_equal(img[1 + 33 : 1 + 33 + 32, 1 + 33 : 1 + 33 + 32], tile)  # row 1, column 1
    rgb = np.asarray(
        Image.open(save_png_grid(torch.zeros(3, 3, 5, 7), tmp_path / "rgb.png", nrow=3, pad=2, scale=2))
    )
    assert rgb.shape == (5 * 2 + 2 * 2, 3 * 7 * 2 + 4 * 2, 3)
    with pytest.raises(DataError, match="C 1 or 3"):
        save_png_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.array([[0.0, np.nan], [1, 2]], dtype=np.float32), "NaN"),
        (np.array([[0.0, np.inf], [1, 2]], dtype=np.float32), "inf"),
        (np.zeros((0, 2), dtype=np.float32), "empty"),
        (np.zeros((2, 1, 2, 2, 2), dtype=np.float32), "rank 5"),
        (np.zeros(4, dtype=np.float32), "rank 1"),
        (np.array(3.0, dtype=np.float32), "a single number"),
        (np.zeros((2, 8, 8, 3), dtype=np.float32), "looks channels-last"),
        (np.array([[0.0, 1e39], [1, 2]]), "values reach 1e\\+39, beyond float32's range"),
    ],
)
def test_bad_arrays_raise_data_error(tmp_path, array, problem):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=problem) as err:
        load_dataset(str(tmp_path / "bad.npy"))
    assert "bad" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match=problem):
        validate(torch.from_numpy(array))


@pytest.mark.parametrize(("shape", "refused"), [
    ((2, 8, 8, 3), True), ((2, 8, 8, 4), True), ((2, 8, 8, 1), True), ((2, 5, 5, 3), True),
    ((2, 3, 8, 8), False), ((2, 4, 8, 3), False), ((2, 8, 4, 3), False), ((2, 8, 8, 5), False),
])
def test_channels_last_is_refused_only_where_the_last_axis_looks_like_channels(shape, refused):
    """Last axis 1, 3 or 4 with both leading image axes over 4 is taken for (N, H, W, C); a 4-channel
    image or a small picture with a narrow last axis is left as (N, C, H, W)."""
    x = torch.zeros(shape)
    if refused:
        with pytest.raises(DataError, match="looks channels-last"):
            validate(x)
    else:
        assert validate(x).shape == shape


def test_big_endian_and_extended_precision_arrays_load_as_their_native_twins(tmp_path):
    """Byte order is storage, not data: a big-endian file (FITS conversions write them) loads, scaled
    and labelled as its native twin; so do extended-precision floats (torch has none)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, (3, 1, 4, 4)).astype(np.uint16)
    lab = np.array([0, 2, 1])
    np.savez(tmp_path / "le.npz", x=img, y=lab)
    np.savez(tmp_path / "be.npz", x=img.astype(">u2"), y=lab.astype(">i8"))
    le, be = load_array(tmp_path / "le.npz"), load_array(tmp_path / "be.npz")
    assert torch.equal(le.x, be.x) and torch.equal(le.y, be.y) and float(be.x.max()) <= 1.0
    f = rng.uniform(-1, 1, (2, 3)).astype(np.float32)
    np.save(tmp_path / "be.npy", f.astype(">f4"))
    np.save(tmp_path / "ld.npy", f.astype(np.longdouble))
    for name in ("be.npy", "ld.npy"):
        assert torch.equal(load_array(tmp_path / name).x, torch.from_numpy(f))
    assert torch.equal(validate(f.astype(">f8")), torch.from_numpy(f))


with np.errstate(over="ignore"):  # (where long double is float64 the literal overflows to inf)
    _WIDE_LONGDOUBLE = bool(np.isfinite(np.longdouble("1e400")))


@pytest.mark.skipif(not _WIDE_LONGDOUBLE, reason="np.longdouble holds no finite 1e400 here")
def test_extended_precision_data_beyond_float64_are_named_out_of_range(tmp_path):
    """Finite values beyond float64 became inf on the way to float64, and were reported as "non-finite"."""
    big = np.full((2, 3), np.longdouble("1e400"))
    np.save(tmp_path / "ld.npy", big)
    np.savez(tmp_path / "ld.npz", x=big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor NumPy's overflow warning on the way
        for what, load in (("data", lambda: validate(big)), (f"{tmp_path / 'ld.npy'} (the array)",
                                                             lambda: load_array(tmp_path / "ld.npy")),
                           (f"{tmp_path / 'ld.npz'} (array 'x')", lambda: load_array(tmp_path / "ld.npz"))):
            with pytest.raises(DataError, match="^" + re.escape(f"{what}: values reach 1e+400, beyond float64's")):
                load()  # (said once: a file's loader wrapped it as "cannot read the array: ...")
        with pytest.raises(DataError, match=r"^data: labels: values reach 1e\+400, beyond float64's range"):
            ArrayData(np.zeros((2, 1, 2, 2), dtype=np.float32), np.full(2, np.longdouble("1e400")))
    with pytest.raises(DataError, match="contains non-finite values"):  # what is not finite still says so
        validate(np.array([[np.longdouble("inf"), 1.0]], dtype=np.longdouble))
    top = np.finfo(np.float64).max  # the largest float64 is within its range
    assert np.array_equal(native(np.array([top, -top], dtype=np.longdouble)), np.array([top, -top]))


def test_data_far_outside_the_unit_range_are_loaded_with_a_warning(tmp_path):
    np.save(tmp_path / "big.npy", np.full((2, 3), 1000.0, dtype=np.float32))
    with pytest.warns(UserWarning, match="values reach 1e\\+03"):
        x = load_array(tmp_path / "big.npy").x
    assert x.shape == (2, 3)
    assert validate(np.zeros((2, 3, 8, 8), dtype=np.float32)).shape == (2, 3, 8, 8)  # channels first: as is


def test_float_images_in_the_unit_interval_warn_but_scaled_integers_do_not(tmp_path):
    img = np.random.default_rng(0).uniform(0, 1, (2, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "unit.npz", x=img)
    with pytest.warns(UserWarning, match=r"images lie within \[0, 1\].*x \* 2 - 1"):
        assert np.array_equal(load_array(tmp_path / "unit.npz").x.numpy(), img)  # kept as stored
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.save(tmp_path / "bright.npy", np.full((2, 1, 4, 4), 200, dtype=np.uint8))  # scaled to 0.57
        load_array(tmp_path / "bright.npy")
        np.save(tmp_path / "vectors.npy", img.reshape(2, 16))  # vectors in [0, 1] may well mean [0, 1]
        load_array(tmp_path / "vectors.npy")
        np.save(tmp_path / "signed.npy", img * 2 - 1)
        load_array(tmp_path / "signed.npy")


def test_pickled_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"run": "code"}, None], dtype=object))
    with pytest.raises(DataError, match="pickled"):
        load_array(tmp_path / "obj.npz")


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="broken.npy"):
        load_array(tmp_path / "broken.npy")
    (tmp_path / "broken.npz").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="broken.npz: not an .npz"):
        load_dataset(str(tmp_path / "broken.npz"))
    folder = tmp_path / "pngs"
    _write_pngs(folder, [np.zeros((4, 4), np.uint8)])
    (folder / "img01.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="img01.png.*unreadable"):
        load_png_folder(folder)


def test_png_sizes_must_match(tmp_path):
    _write_pngs(
        tmp_path / "mixed",
        [np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)],
    )
    with pytest.raises(DataError, match=r"img02.png: image is 4x5.*share one size"):
        load_png_folder(tmp_path / "mixed")


def test_a_run_directory_is_not_a_folder_of_images(tmp_path):
    """--data RUN trained on the run's loss.png, a 3 x 388 x 580 plot, without a word."""
    run = tmp_path / "run"
    _write_pngs(run, [np.zeros((4, 4), np.uint8)])
    (run / ".condiff-run").write_text("condiff train")
    with pytest.raises(DataError, match="is a condiff run directory, not a folder of images"):
        load_png_folder(run)


def test_array_data_checks_labels():
    with pytest.raises(DataError, match="expected 3 labels"):
        ArrayData(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="integers"):
        ArrayData(torch.zeros(2, 2), torch.tensor([0.5, 1.0]))
    assert ArrayData(torch.ones(2, 2), np.array([0.0, 1.0])).y.dtype == torch.long


def test_an_empty_data_set_name_is_refused():
    with pytest.raises(DataError, match="name is empty"):
        load_dataset("")


def test_splits_of_different_shapes_are_named(tmp_path):
    from condiff.data import DataError, load_dataset

    np.savez(tmp_path / "mix.npz", x_train=np.zeros((4, 1, 8, 8), np.float32),
             x_test=np.zeros((2, 1, 16, 16), np.float32))
    from condiff.cli.namm import NAMMRun, resolve
    from condiff.evaluate import generic_eval

    path = str(tmp_path / "mix.npz")
    assert load_dataset(path, split="train").x.shape == (4, 1, 8, 8)
    assert load_dataset(path, split="test").x.shape == (2, 1, 16, 16)  # one split alone loads as it is
    # where the splits meet: joined, scored against each other (not silently replaced by train halves),
    # or evaluated for models built on the training split
    named = r"splits hold items of different shapes .*'train': \(1, 8, 8\)"
    with pytest.raises(DataError, match=named):
        load_dataset(path, split="all")
    with pytest.raises(DataError, match=named):
        generic_eval(torch.zeros(4, 1, 8, 8), {"name": path})
    with pytest.raises(DataError, match=named):
        NAMMRun(tmp_path / "run", resolve(path, "quick", constraint="box")).data("test")


@pytest.mark.parametrize("arrays, counts", [
    ({"x_train": np.zeros((4, 1, 8, 8), np.float32), "x_test": np.zeros((1, 1, 8, 8), np.float32)},
     r"1 held-out \(test split\) and 4 reference"),
    ({"x": np.zeros((3, 1, 8, 8), np.float32)}, r"2 held-out \(training data \(no test split\)\) and 1 reference"),
])
def test_eval_names_too_little_held_out_data(tmp_path, arrays, counts):
    from condiff.evaluate import generic_eval

    np.savez(tmp_path / "few.npz", **arrays)
    with pytest.raises(DataError, match=f"too little data to score samples against: {counts}"), \
            warnings.catch_warnings(record=True):  # the no-test-split warning of the second case
        generic_eval(torch.zeros(4, 1, 8, 8), {"name": str(tmp_path / "few.npz")})


def test_a_broken_test_split_is_an_error_not_a_fallback_to_training_data(tmp_path):
    from condiff.evaluate import generic_eval

    bad = np.zeros((3, 1, 8, 8), np.float32)
    bad[1, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=np.zeros((6, 1, 8, 8), np.float32), x_test=bad)
    with pytest.raises(DataError, match="non-finite"):
        generic_eval(torch.zeros(4, 1, 8, 8), {"name": str(tmp_path / "nan.npz")})


def test_the_own_data_example_writes_what_condiff_reads(tmp_path):
    """examples/own_data/make_shapes.py (docs/own-data.md): splits with labels, a PNG mask and
    measurements seen through it."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "own_data" / "make_shapes.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--n-train", "30", "--n-test", "9"],
                   check=True, capture_output=True)
    train = load_dataset(str(tmp_path / "shapes.npz"), "train")
    test = load_dataset(str(tmp_path / "shapes.npz"), "test")
    assert train.x.shape == (30, 1, 16, 16) and test.x.shape == (9, 1, 16, 16)
    assert set(train.y.tolist()) <= {0, 1, 2} and float(train.x.min()) == -1.0 and float(train.x.max()) <= 1.0
    mask = np.asarray(Image.open(tmp_path / "mask.png")) >= 128
    observed = np.load(tmp_path / "observed.npy")
    assert observed.shape == (8, 1, 16, 16) and np.all(observed[:, 0, ~mask] == 0)
    assert np.abs(observed[:, 0, mask] - test.x.numpy()[:8, 0, mask]).max() < 0.3  # noise 0.05


def test_load_reference_covers_class_scoring_of_registered_data():
    from condiff.evaluate import load_reference

    test, train, what = load_reference({"name": "digits", "label": 3})  # the held-out threes
    assert what == "test split, class 3"
    # exactly the threes of each split: 37 + 146 = the 183 threes of scikit-learn's digits
    held_out = load_dataset("digits", "test")
    rows = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731 - the same images, any order
    assert rows(test) == rows(held_out.x[held_out.y == 3]) and len(test) == 37 and len(train) == 146
    assert load_reference({"name": "digits"}) is None  # digits' own evaluator scores whole samples
    with pytest.raises(DataError, match=r"0 held-out \(test split, class 7\)"):
        load_reference({"name": "toy2d", "kind": "moons", "label": 7})  # toy2d's evaluator would not have told


def test_periodic_length_must_be_positive():
    from condiff.data import load_dataset

    for bad in (0, -1.0, True):  # 0 made every tile -1, silently
        with pytest.raises(ValueError, match="length \\(the GP's length scale\\) must be a number > 0"):
            load_dataset("periodic", split="train", length=bad, n_train=2, size=8)


def test_derived_seeds_are_pinned():
    """Cached data sets are keyed by these seeds and promised the same on every machine and version: a
    change to derive_seed would silently make new data (the count set's train seed, pinned)."""
    from condiff.data import derive_seed, generator

    assert derive_seed(0, "count", "train") == 4796150521379304166
    assert derive_seed(0, "count", "test") != derive_seed(1, "count", "test") != derive_seed(0, "count", "train")
    assert 0 <= derive_seed(2**40, "x") < 2**63
    assert torch.equal(torch.rand(3, generator=generator(0, "count", "train")),
                       torch.rand(3, generator=torch.Generator().manual_seed(4796150521379304166)))


def test_the_data_cache_keys_by_name_and_regenerates_unreadable_files(tmp_path, monkeypatch):
    """A truncated or garbage cache file (a full disk, a killed copy) is made again, not a crash; a failed
    write leaves no file; the generator's name is part of the key."""
    from condiff.data.cache import cache_path, cached_arrays

    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    assert cache_path("a", {"n": 1}) != cache_path("b", {"n": 1})
    made = []

    def make():
        made.append(1)
        return {"x": np.arange(1000.0)}

    path = cache_path("t", {"n": 1})
    cached_arrays("t", {"n": 1}, make)
    full = path.read_bytes()
    for bad in (full[: len(full) // 2], b"not a zip file at all"):
        path.write_bytes(bad)
        np.testing.assert_array_equal(cached_arrays("t", {"n": 1}, make)["x"], np.arange(1000.0))
        assert path.read_bytes() == full
    assert len(made) == 3
    np.testing.assert_array_equal(cached_arrays("t", {"n": 1}, make)["x"], np.arange(1000.0))
    assert len(made) == 3  # read back, not made again

    def failing_save(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cached_arrays("t", {"n": 2}, make)
    assert not cache_path("t", {"n": 2}).exists() and list(path.parent.iterdir()) == [path]


def test_user_files_decode_exactly(tmp_path):
    """npz key preference, 16-bit and colour PNGs, one size per folder, channels, labels of "all"."""
    from PIL import Image

    from condiff.data.files import load_path

    a, b = np.zeros((2, 1, 2, 2), np.float32), np.ones((2, 1, 2, 2), np.float32)
    np.savez(tmp_path / "both.npz", arr_0=b, x=a)
    assert torch.equal(load_array(tmp_path / "both.npz").x, torch.from_numpy(a))  # "x" before "arr_0"
    (tmp_path / "p16").mkdir()
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "p16" / "w.png")
    assert float(load_png_folder(tmp_path / "p16").x.min()) == 1.0  # 16-bit white is exactly 1
    (tmp_path / "rgb").mkdir()
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "rgb" / "r.png")
    grey = load_png_folder(tmp_path / "rgb", channels=1).x
    assert grey.shape == (1, 1, 4, 4) and float(grey[0, 0, 0, 0]) == pytest.approx(0.299 * 2 - 1, abs=1e-6)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "rgb" / "s.png")
    assert load_png_folder(tmp_path / "rgb").x.shape == (2, 3, 4, 4)  # one colour image: all in colour
    (tmp_path / "sizes").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sizes" / "a.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "sizes" / "b.png")
    with pytest.raises(DataError, match="must share one size"):
        load_png_folder(tmp_path / "sizes")
    y_train, y_test = np.array([0, 1, 1]), np.array([2, 0])
    np.savez(tmp_path / "split.npz", x_train=np.zeros((3, 2), np.float32), y_train=y_train,
             x_test=np.ones((2, 2), np.float32), y_test=y_test)
    d = load_path(tmp_path / "split.npz", "all")
    assert d.y.tolist() == [0, 1, 1, 2, 0] and d.x.shape == (5, 2)


def test_toy2d_and_reference_sizes_at_their_edges():
    from condiff.evaluate import mmd_with_reference

    for bad in (dict(noise=float("nan")), dict(kind="gmm", components=0), dict(noise=-0.1)):
        with pytest.raises(DataError, match="toy2d"):
            load_toy2d(**bad)
    g = torch.Generator().manual_seed(0)
    s, a, b = torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g), torch.randn(5, 2, generator=g)
    assert mmd_with_reference(s, a, b)["mmd_n"] == 5  # every set cut to the shortest


def test_ranges_display_and_subsets_at_their_edges():
    from condiff.data import nominal_range, to_display

    assert nominal_range(None) == (-1.0, 1.0) and nominal_range([-1.0005, 1.0]) == (-1.0, 1.0)  # round-off
    assert nominal_range([-1.01, 1.0]) == (-1.01, 1.0) and nominal_range([0.0, 255.0]) == (0.0, 255.0)
    assert nominal_range([5.0, 5.0]) == (-1.0, 5.0)  # constant data beyond [-1, 1]: a scale of some width
    shown = to_display(torch.tensor([0.0, 5.0, 10.0]), (0.0, 10.0))
    torch.testing.assert_close(shown, torch.tensor([-1.0, 0.0, 1.0]))
    d = ArrayData(torch.arange(6.0).view(3, 2), name="t")
    assert d.subset([2, 0]).x[:, 0].tolist() == [4.0, 0.0] and d.subset([-1]).x[0, 0] == 4.0
    for bad in ([3], [-4], torch.tensor([[0]]), [0.5]):
        with pytest.raises(DataError, match="t: "):
            d.subset(bad)


def test_picture_writers_sizes_and_padding(tmp_path):
    from PIL import Image

    # default scale: the smallest factor making tiles at least 32 px, from the shorter side (4 -> 8)
    save_png_grid(torch.zeros(1, 1, 4, 16), tmp_path / "g.png", pad=1, pad_value=2.0)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape[:2] == (4 * 8 + 2, 16 * 8 + 2)
    assert img[0, 0] == 255 and img[1, 1] == 128  # padding clamped to 1 -> 255; a 0 pixel -> 128 (rounded)
    save_png(torch.linspace(-1, 1, 20).view(4, 5), tmp_path / "p.png")  # (H, W)
    p = np.asarray(Image.open(tmp_path / "p.png"))
    assert p.shape[:2] == (4, 5) and p.reshape(-1)[0] == 0 and p.reshape(-1)[-1] == 255


def test_toy2d_shapes_at_zero_noise():
    """Moons are sklearn's two half circles, centred and scaled by 1.5; the checkerboard fills the dark
    squares (i + j even, starting at the corner [-1, -1]) uniformly."""
    d = load_toy2d(kind="moons", n=2000, noise=0.0)
    p = d.x.double() * 1.5 + torch.tensor([0.5, 0.25], dtype=torch.float64)  # back to make_moons' frame
    outer = (p.norm(dim=1) - 1).abs() < 1e-5
    inner = ((p - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 1).abs() < 1e-5
    assert bool((outer | inner).all())
    assert bool((p[outer, 1] >= -1e-6).all()) and bool((p[inner, 1] <= 0.5 + 1e-6).all())
    assert 0.4 < float(outer.double().mean()) < 0.6
    c = load_toy2d(kind="checkerboard", n=4000, noise=0.0)
    assert c.meta["cells"][0] == [-1.0, -1.0]
    cell = torch.floor((c.x.double() + 1) / 0.5)
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())
    inside = (c.x.double() + 1) - 0.5 * cell
    assert float(inside.max()) > 0.49 and float(inside.min()) < 0.01  # each square covered edge to edge


def test_patch_crops_are_where_they_say_weighted_by_positions_and_reach_every_edge():
    images = [source_image(name, 8) for name in TRAIN_IMAGES]
    d = load_patches("train", size=16, n=6000, downscale=8, seed=1)
    x, meta = d.x, d.meta
    for k in range(0, 6000, 37):  # a patch is its source's crop at its recorded top-left corner
        img = images[TRAIN_IMAGES.index(meta["sources"][k])]
        r, c = meta["positions"][k]
        expect = torch.from_numpy(img[r:r + 16, c:c + 16].transpose(2, 0, 1).copy()).float() / 127.5 - 1
        assert torch.equal(x[k], expect)
    # sources drawn in proportion to their number of crop positions
    counts = np.array([(i.shape[0] - 15) * (i.shape[1] - 15) for i in images], dtype=float)
    share = np.array([meta["sources"].count(n) for n in TRAIN_IMAGES]) / 6000
    np.testing.assert_allclose(share, counts / counts.sum(), atol=0.03)
    first = TRAIN_IMAGES[0]
    rows = [r for (r, _), s in zip(meta["positions"], meta["sources"]) if s == first]
    assert max(rows) == images[0].shape[0] - 16 and min(rows) == 0  # the last row of positions is reached
    grid = load_patches("train", size=16, downscale=8, flip=True)
    half = len(grid) // 2
    assert torch.equal(grid.x[half:], grid.x[:half].flip(-1))  # mirrored left-right


def test_the_kolmogorov_flows_and_the_digits_judge_are_made_on_one_thread(monkeypatch):
    """Both are cached: with the caller's thread count the flows (a chaotic solver) became unrelated
    after a dozen snapshots between 1 and 2 threads, and the judge's weights differed by 0.2, fixed
    by whichever process made them first. The caller's count is restored."""
    import condiff.classifier as clf
    import condiff.data.physics as physics

    seen = []
    real_traj, real_digits = physics.kolmogorov_trajectories, clf._digits
    monkeypatch.setattr(physics, "kolmogorov_trajectories",
                        lambda *a, **k: (seen.append(("flow", torch.get_num_threads())), real_traj(*a, **k))[1])
    monkeypatch.setattr(clf, "_digits",
                        lambda *a: (seen.append(("judge", torch.get_num_threads())), real_digits(*a))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        load_dataset("kolmogorov", "train", size=16, n_train=2, n_test=1, per_trajectory=2, frames=1,
                     sim_size=16, spinup=0.1)
        clf.train_digits_classifier(steps=1)
        assert set(seen) == {("flow", 1), ("judge", 1)} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_warn_range_draws_the_line_at_ten():  # m12 data/__init__.py:107
    with pytest.warns(UserWarning, match=r"values reach 50; condiff's models"):
        warn_range(torch.full((2, 3), 50.0), "d")
    with pytest.warns(UserWarning, match=r"values reach 10\.5"):
        warn_range(torch.tensor([[0.0, -10.5]]), "d")  # by magnitude: a negative value counts too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_range(torch.full((2, 3), 10.0), "d")  # 10 itself is accepted


def test_unit_interval_images_reaching_exactly_one_warn(tmp_path):  # m13 data/__init__.py:110
    img = (np.arange(32).reshape(2, 1, 4, 4) % 2).astype(np.float32)  # 0/1 images: max exactly 1
    np.save(tmp_path / "binary.npy", img)
    with pytest.warns(UserWarning, match=r"images lie within \[0, 1\]"):
        load_array(tmp_path / "binary.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_range(torch.full((1, 1, 2, 2), 0.5), "d")  # at most 0.5: not taken for [0, 1] pixels


def test_nominal_range_allows_round_off_above_one_only():  # m14 data/__init__.py:127
    assert nominal_range([-1.0, 1.0005]) == (-1.0, 1.0)
    assert nominal_range([-1.0, 1.01]) == (-1.0, 1.01)
    assert nominal_range([0.0, 1.05]) == (0.0, 1.05)


def test_png_grid_has_no_empty_columns_when_nrow_exceeds_the_batch(tmp_path):  # m21 data/files.py:296
    img = np.asarray(Image.open(save_png_grid(torch.zeros(2, 1, 8, 8), tmp_path / "g.png", nrow=5, pad=1, scale=1)))
    assert img.shape == (8 + 2, 2 * 8 + 3)  # two columns, not five


def test_random_patch_crops_are_mirrored_about_half_the_time():  # m55 data/patches.py:133
    from condiff.data.patches import load_patches

    plain = load_patches("test", size=8, n=200, seed=3, downscale=4)
    flipped = load_patches("test", size=8, n=200, seed=3, downscale=4, flip=True)
    assert plain.meta["positions"] == flipped.meta["positions"]  # the same crops, drawn before the mirror
    mirrored = torch.tensor([torch.equal(b, a.flip(-1)) and not torch.equal(a, b) for a, b in zip(plain.x, flipped.x)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(plain.x, flipped.x)])
    assert bool((mirrored | kept).all()) and 60 < int(mirrored.sum()) < 140


def test_downscaled_source_images_are_rounded_block_means():  # m57 data/patches.py:65
    from condiff.data.patches import source_image

    full = source_image("coffee").astype(np.float64)
    small = source_image("coffee", downscale=3)
    h, w = full.shape[0] // 3 * 3, full.shape[1] // 3 * 3  # the ragged edge is cut
    want = full[:h, :w].reshape(h // 3, 3, w // 3, 3, 3).mean((1, 3)).round()
    assert small.dtype == np.uint8 and np.array_equal(small, want.astype(np.uint8))
