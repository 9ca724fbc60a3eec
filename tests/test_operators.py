"""Measurement operators: one conformance test for all of them, plus each operator's own facts."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from condiff.operators import GaussianBlur, Inpainting, LinearOperator, SeparableFilter, SuperResolution

SHAPE = (3, 2, 16, 16)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# name -> builder(shape, generator, sigma_y); every operator condiff ships is listed here
OPERATORS = {
    "inpaint-random": lambda s, g, n=0.0: Inpainting.random(s, 0.7, g, sigma_y=n),
    "inpaint-box": lambda s, g, n=0.0: Inpainting.box(s, 6, g, sigma_y=n, margin=1),
    "sr-box-2": lambda s, g, n=0.0: SuperResolution(2, "box", sigma_y=n),
    "sr-bicubic-2": lambda s, g, n=0.0: SuperResolution(2, "bicubic", sigma_y=n),
    "sr-bicubic-4": lambda s, g, n=0.0: SuperResolution(4, "bicubic", sigma_y=n),
    "blur": lambda s, g, n=0.0: GaussianBlur(7, 1.5, sigma_y=n),
}
OUT_HW = {"sr-box-2": 8, "sr-bicubic-2": 8, "sr-bicubic-4": 4}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_conformance(name):
    op = OPERATORS[name](SHAPE, _gen()).double()
    g = _gen(1)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    y = op.A(x)
    # shapes: batch and channels kept, spatial size as documented
    h = OUT_HW.get(name, 16)
    assert y.shape == (SHAPE[0], SHAPE[1], h, h) and y.dtype == torch.float64
    assert torch.equal(op(x), y)
    assert isinstance(op, LinearOperator)
    # adjointness <A x, v> = <x, A^T v> (float64: agreement to ~1e-15; 1e-5 is the contract)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64)
    lhs, rhs = (y * v).sum(), (x * op.A_adjoint(v)).sum()
    assert abs(float(lhs - rhs)) <= 1e-5 * abs(float(lhs))
    assert op.A_adjoint(v).shape == x.shape
    # linearity
    x2 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.A(2.0 * x - 3.0 * x2), 2.0 * y - 3.0 * op.A(x2))
    # determinism: the same seed gives the same operator and the same noisy measurement
    op2 = OPERATORS[name](SHAPE, _gen(), 0.05).double()
    y1 = op2.measure(x, _gen(7))
    y2 = OPERATORS[name](SHAPE, _gen(), 0.05).double().measure(x, _gen(7))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, op2.measure(x, _gen(8)))
    # the loss is the per-sample residual norm
    loss = op2.loss(y1)(x)
    assert loss.shape == (SHAPE[0],)
    torch.testing.assert_close(loss, (y1 - op2.A(x)).flatten(1).norm(dim=1))


@pytest.mark.parametrize("name", ["sr-box-2", "sr-bicubic-2", "sr-bicubic-4", "blur"])
def test_filters_keep_constants(name):
    """Normalised kernels: a constant image stays the same constant (borders included)."""
    op = OPERATORS[name](SHAPE, _gen())
    y = op.A(torch.full(SHAPE, 0.3))
    torch.testing.assert_close(y, torch.full_like(y, 0.3))


@pytest.mark.parametrize("name", ["sr-box-2", "sr-bicubic-2", "sr-bicubic-4", "blur"])
def test_matrix_and_convolution_paths_agree(name):
    """Small images use per-axis matrices, large ones padding + convolutions: the same operator."""
    shape = (2, 3, 16, 24)  # non-square: the two axes get their own matrices
    op = OPERATORS[name](SHAPE, _gen()).double()
    conv = OPERATORS[name](SHAPE, _gen()).double()
    conv.MATRIX_MAX = 0
    x = torch.randn(shape, generator=_gen(2), dtype=torch.float64)
    assert op._use_matrices(16, 24) and not conv._use_matrices(16, 24)
    y = op.A(x)
    torch.testing.assert_close(y, conv.A(x), rtol=0, atol=1e-12)
    v = torch.randn(y.shape, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(op.A_adjoint(v), conv.A_adjoint(v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3, 4, 5])
def test_bicubic_matches_torch_antialias_away_from_borders(factor):
    """Antialiased bicubic resizing as torch.nn.functional.interpolate does it (Keys a=-0.5); only
    the border treatment differs (reflect here). Odd factors put zeros inside the kernel."""
    x = torch.randn(2, 3, 8 * factor, 8 * factor, generator=_gen(), dtype=torch.float64)
    ref = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(SuperResolution(factor, "bicubic").A(x)[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2])


def test_box_sr_is_average_pooling():
    x = torch.randn(SHAPE, generator=_gen())
    torch.testing.assert_close(SuperResolution(2, "box").A(x), F.avg_pool2d(x, 2))


def test_random_mask_drop_rate_and_noise_only_on_observed():
    g = _gen()
    op = Inpainting.random((64, 1, 16, 16), 0.7, g, sigma_y=0.05)
    frac = 1 - float(op.mask.mean())
    # 16384 Bernoulli(0.7) draws: standard error 0.0036, so 0.015 is > 4 SE
    assert frac == pytest.approx(0.7, abs=0.015)
    assert op.mask.shape == (64, 1, 16, 16)
    x = torch.zeros(64, 1, 16, 16)
    y = op.measure(x, g)
    assert bool((y[op.mask.expand_as(y) == 0] == 0).all())  # nothing measured where pixels are missing
    n_obs = op.num_measurements(y)
    noise_std = float(y.pow(2).sum() / n_obs.sum()) ** 0.5
    assert noise_std == pytest.approx(0.05, rel=0.05)  # ~4900 draws: SE of the std ~1%
    # RMS residual of the truth is about sigma_y
    assert float(op.residual(x, y).mean()) == pytest.approx(0.05, rel=0.1)


def test_box_mask_has_exactly_one_box():
    op = Inpainting.box((5, 3, 8, 8), (3, 4), _gen(), margin=1)
    for m in op.mask:
        zeros = (m[0] == 0).nonzero()
        assert len(zeros) == 12
        rows, cols = zeros[:, 0], zeros[:, 1]
        assert int(rows.max() - rows.min()) == 2 and int(cols.max() - cols.min()) == 3
        assert int(rows.min()) >= 1 and int(cols.min()) >= 1 and int(rows.max()) <= 6 and int(cols.max()) <= 6
    centred = Inpainting.box((1, 1, 8, 8), 4, center=True).mask[0, 0]
    assert bool((centred[2:6, 2:6] == 0).all()) and float(centred.sum()) == 48


def test_select_slices_per_sample_masks():
    op = Inpainting.random((6, 1, 8, 8), 0.5, _gen())
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(op.select(slice(2, 4)).A(x[2:4]), op.A(x)[2:4])
    y = op.measure(x, _gen(3))
    torch.testing.assert_close(op.loss(y).select(slice(1, 3))(x[1:3]), op.loss(y)(x)[1:3])
    # an int selects the sub-batch of that one sample (the batch dimension stays)
    for i in (4, -1, np.int64(2), torch.tensor(3)):
        j = [int(i)]
        torch.testing.assert_close(op.select(i).A(x[j]), op.A(x)[j])
        torch.testing.assert_close(op.loss(y).select(i)(x[j]), op.loss(y)(x)[j])


def test_loss_gradient_matches_closed_form():
    """grad_x ||y - A x|| = -A^T (y - A x) / ||y - A x||."""
    op = GaussianBlur(5, 1.0).double()
    x = torch.randn(2, 1, 8, 8, generator=_gen(), dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 1, 8, 8, generator=_gen(2), dtype=torch.float64)
    (g,) = torch.autograd.grad(op.loss(y)(x).sum(), x)
    r = y - op.A(x.detach())
    expect = -op.A_adjoint(r) / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(g, expect)


def test_to_image_shapes():
    x = torch.randn(SHAPE)
    sr = SuperResolution(2)
    assert sr.to_image(sr.A(x)).shape == x.shape
    blur = GaussianBlur(3, 1.0)
    assert blur.to_image(blur.A(x)).shape == x.shape


@pytest.mark.parametrize("build, match", [
    (lambda: GaussianBlur(4, 1.0), "odd"),
    (lambda: GaussianBlur(5, 0.0), "sigma must be a number > 0"),
    (lambda: SuperResolution(2, "lanczos"), "unknown kernel 'lanczos'"),
    (lambda: SuperResolution(0), "factor must be an integer >= 1"),
    (lambda: Inpainting.random((2, 1, 8, 8), 1.0), r"p_drop must lie in \[0, 1\)"),
    (lambda: Inpainting.box((2, 1, 8, 8), 9), "does not fit 8x8"),
    (lambda: Inpainting(torch.full((1, 1, 4, 4), 0.5)), "only 0 and 1"),
    (lambda: GaussianBlur(3, 1.0, sigma_y=-0.1), "sigma_y must be a number >= 0"),
    (lambda: SuperResolution(2).A(torch.randn(1, 1, 15, 16)), "not divisible by the factor 2"),
    (lambda: GaussianBlur(9, 2.0).A(torch.randn(1, 1, 4, 4)), "needs images larger than 4 pixels"),
    (lambda: Inpainting.random((2, 1, 8, 8), 0.5).A(torch.randn(3, 1, 8, 8)), "does not fit images"),
    (lambda: SuperResolution(2).A(torch.randn(16, 16)), r"expected images of shape \(B, C, H, W\)"),
    (lambda: GaussianBlur(7.5), "size must be a positive odd integer, got 7.5"),
    (lambda: Inpainting.box((2, 1, 8, 8), 2.5), "size must be an integer >= 1"),
    (lambda: Inpainting.box((2, 1, 8, 8), (3, 0)), "size must be an integer >= 1"),
    (lambda: Inpainting.box((2, 1, 8, 8), 3, margin=-1), "margin must be an integer >= 0, got -1"),
    (lambda: Inpainting.box((2, 1, 8, 8), 3, margin=3), "with margin 3 does not fit 8x8"),
    (lambda: SeparableFilter(torch.ones(11) / 11).A(torch.randn(1, 1, 8, 8)), "a kernel of 11 taps"),
    (lambda: SeparableFilter(torch.ones(3) / 3, stride=1.5), "stride must be an integer >= 1, got 1.5"),
    (lambda: SeparableFilter(torch.ones(3) / 3, pad=(-1, 1)), "pad must be an integer >= 0, got -1"),
])
def test_bad_input_is_a_clear_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_integer_images_are_refused_not_truncated(name):
    """A filter's weights cast to an integer image's dtype would be 0: refused, not all-zero output."""
    op = OPERATORS[name](SHAPE, _gen(), 0.0)
    with pytest.raises(TypeError, match="must be a floating-point tensor, got dtype torch.uint8"):
        op.A(torch.full(SHAPE, 200, dtype=torch.uint8))


def test_numpy_scalar_noise_level_is_a_number():
    assert GaussianBlur(3, 1.0, sigma_y=np.float32(0.25)).sigma_y == 0.25


def test_describe_is_json_ready():
    import json

    for name, b in OPERATORS.items():
        d = b(SHAPE, _gen(), 0.05).describe()
        assert d["sigma_y"] == 0.05 and json.loads(json.dumps(d)) == d, name
    assert math.isclose(Inpainting.random(SHAPE, 0.7, _gen()).describe()["observed"], 0.3, abs_tol=0.06)


@pytest.mark.parametrize("x_shape, y_shape", [
    ((1, 1, 8, 8), (2, 1, 4, 4)),  # batch: would be one norm over both measurements
    ((4, 3, 8, 8), (4, 1, 4, 4)),  # channels: would broadcast
    ((4, 1, 8, 8), (4, 4)),  # no batch dimension
])
def test_loss_and_residual_refuse_a_measurement_of_the_wrong_shape(x_shape, y_shape):
    op, x, y = SuperResolution(2, sigma_y=0.05), torch.randn(x_shape), torch.randn(y_shape)
    want = rf"y must have the shape of A\(x\), \({x_shape[0]}, {x_shape[1]}, 4, 4\), got"
    with pytest.raises(ValueError, match="loss: " + want):
        op.loss(y)(x)
    with pytest.raises(ValueError, match="residual: " + want):
        op.residual(x, y)


def test_a_sample_with_nothing_measured_has_zero_residual_not_nan():
    op = Inpainting(torch.cat([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)]))
    x = torch.randn(2, 1, 8, 8)
    r = op.residual(x, op.A(x) + 0.5 * op.mask)
    assert r[0] == 0 and r[1] == pytest.approx(0.5)


def test_random_boxes_reach_every_position_and_a_box_may_fill_the_image():
    op = Inpainting.box((400, 1, 8, 8), 2, generator=torch.Generator().manual_seed(0))
    tops = (op.mask[:, 0] == 0).any(2).float().argmax(1)  # first masked row of each image
    lefts = (op.mask[:, 0] == 0).any(1).float().argmax(1)
    assert sorted(set(tops.tolist())) == sorted(set(lefts.tolist())) == list(range(7))  # 0 .. 8 - 2
    assert float(Inpainting.box((1, 1, 8, 8), 8).mask.sum()) == 0


def test_a_one_channel_mask_counts_every_channel_it_covers():
    op = Inpainting.random((2, 3, 8, 8), 0.5, torch.Generator().manual_seed(0))
    y = op.measure(torch.randn(2, 3, 8, 8), torch.Generator().manual_seed(1))
    assert op.mask.shape[1] == 1
    torch.testing.assert_close(op.num_measurements(y), 3 * op.mask.flatten(1).sum(1).double())


def test_gaussian_blur_is_reflect_padded_correlation_with_the_sampled_gaussian():
    b = GaussianBlur(5, 1.0)
    k = b.kernel.double()
    assert float(k[3] / k[2]) == pytest.approx(math.exp(-0.5)) and float(k.sum()) == pytest.approx(1.0)
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    expect = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), (k[:, None] * k[None, :])[None, None])
    torch.testing.assert_close(b.A(x), expect)


def test_the_convolution_path_adjoint_of_an_asymmetric_kernel(monkeypatch):
    """<A x, y> = <x, A^T y> on the path without matrices (images above MATRIX_MAX), for a kernel that
    is not symmetric: a flipped kernel in the adjoint would show only there."""
    monkeypatch.setattr(SeparableFilter, "MATRIX_MAX", 0)
    op = SeparableFilter(torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), stride=2, pad=(0, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64)
    y = torch.randn(op.A(x).shape, generator=g, dtype=torch.float64)
    assert float((op.A(x) * y).sum()) == pytest.approx(float((x * op.A_adjoint(y)).sum()), rel=1e-10)


@pytest.mark.parametrize(("op", "y_size"),
                         [(GaussianBlur(7), 1), (GaussianBlur(7), 2), (SuperResolution(2, "bicubic"), 1)])
def test_the_adjoint_refuses_measurements_of_images_that_a_refuses(op, y_size):
    """A_adjoint infers the image size from the measurement; where A would refuse such images (smaller
    than the padding), the adjoint does too, in one line, rather than wrapping reflect indices around."""
    H = op.in_size(y_size)
    with pytest.raises(ValueError, match=f"got {H}x{H}"):
        op.A(torch.zeros(1, 1, H, H))
    with pytest.raises(ValueError, match=f"got {H}x{H} \\(the images a {y_size}x{y_size} measurement comes from\\)"):
        op.A_adjoint(torch.zeros(1, 1, y_size, y_size))


def test_an_empty_batch_has_an_empty_residual_and_loss():
    op = GaussianBlur(3, 1.0, sigma_y=0.1)
    x = torch.zeros(0, 1, 8, 8)
    y = op.A(x)
    assert op.residual(x, y).shape == (0,) and op.loss(y)(x).shape == (0,)


def test_a_masked_operator_counts_only_the_pixels_it_measures():
    """A full camera frame with a mask, or NaN at the missing pixels, gives the loss and residual of the
    masked measurement (the unobserved pixels of y used to enter the norm and shrink every DPS step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 8, 8, generator=g) * 2 - 1
    op = Inpainting.random(x.shape, 0.5, g, sigma_y=0.05)
    frame = x + 0.05 * torch.randn(x.shape, generator=g)
    masked = op.A(frame)
    holes = masked.masked_fill(op.mask.expand_as(masked) == 0, float("nan"))
    z = torch.randn(x.shape, generator=g)
    for y in (frame, holes):
        torch.testing.assert_close(op.loss(y)(z), op.loss(masked)(z), rtol=0, atol=0)
        torch.testing.assert_close(op.residual(x, y), op.residual(x, masked), rtol=0, atol=0)
    observed = op.mask.expand_as(masked).nonzero()[0].tolist()
    bad = masked.clone()
    bad[tuple(observed)] = float("nan")
    with pytest.raises(ValueError, match=r"loss: y holds 1 non-finite measured value"):
        op.loss(bad)
    y = torch.zeros(1, 1, 6, 6)
    y[0, 0, 0, :2] = torch.tensor([math.inf, math.nan])
    with pytest.raises(ValueError, match=r"y holds 2 non-finite"):  # an operator that measures every entry
        GaussianBlur(3, 1.0).loss(y)


def test_selecting_a_sample_beyond_the_batch_of_masks_is_refused():
    op = Inpainting.random((3, 1, 4, 4), 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(IndexError, match="Inpainting.select: sample 5 of a batch of 3 masks"):
        op.select(5)  # it returned an operator of no masks, silently
    assert torch.equal(op.select(-1).mask, op.mask[2:]) and op.select(slice(1, 3)).mask.shape[0] == 2
