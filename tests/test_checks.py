"""The shared argument checks: what counts as a number, and that library entry points take the
one-element tensors and arrays a user naturally passes (a timestep taken from a schedule, a NumPy float)."""

import math
import re

import numpy as np
import pytest
import torch

from condiff import checks
from condiff.constraints import Box
from condiff.denoiser import GaussianDenoiser
from condiff.dual import log_mass_bounds
from condiff.guidance import DPS, FreeDoM
from condiff.operators import SeparableFilter
from condiff.pnp import schedules as sch
from condiff.pnp.engine import finish
from condiff.sample import ddim
from condiff.schedule import Schedule
from condiff.train import TrainConfig


@pytest.mark.parametrize("v, number, integer", [
    (3, True, True), (2.5, True, False), (np.float32(0.25), True, False), (np.int64(4), True, True),
    (torch.tensor(2), True, True), (np.array(0.5), True, False), (torch.tensor([1.0]), False, False),
    (torch.tensor([1.0, 2.0]), False, False), (True, False, False), (np.True_, False, False),
    (torch.tensor(True), False, False), (math.nan, False, False), (math.inf, False, False), ("1", False, False),
    (2.0**53 - 1, True, True), (2.0**53, True, False), (1e30, True, False),  # a float holds no exact count there
    (2**63 - 1, True, True), (2**63, True, False), (-2**63, True, True),  # int64, as torch and checkpoints hold
])
def test_what_counts_as_a_number(v, number, integer):
    assert checks.is_number(v) is number and checks.is_integer(v) is integer


def test_a_float_setting_given_a_whole_number_stays_a_float():
    """namm assimilate --set assimilate.constraint_weight=2 stored 2, and a later --set ...=0.2 was refused as
    no integer ("expects an integer (now 2)"); only config.json edited by hand went on."""
    from condiff.cli.config import set_path

    got = checks.check_setting("assimilate.constraint_weight", 200.0, 2)
    assert got == 2.0 and isinstance(got, float)
    assert checks.check_setting("train.steps", 100, 7) == 7 and checks.check_setting("x", True, False) is False
    with pytest.raises(ValueError, match=r"^setting loss.l_con must be a finite number, got 100000000000\.\.\. "
                                         r"\(401 digits\)$"):
        checks.check_setting("loss.l_con", 1.0, 10**400)  # (float() raised an OverflowError naming no setting)
    cfg = {"assimilate": {"constraint_weight": 200.0}}
    set_path(cfg, ["assimilate", "constraint_weight"], 2)
    set_path(cfg, ["assimilate", "constraint_weight"], 0.2)  # the earlier --set, now recorded, in its place
    assert cfg == {"assimilate": {"constraint_weight": 0.2}}


def test_a_setting_refuses_a_float_too_large_to_be_a_count():
    assert checks.check_setting("train.steps", 100, 2.5e1) == 25
    with pytest.raises(ValueError, match=r"train.steps expects an integer \(default 100\), got 1e\+30"):
        checks.check_setting("train.steps", 100, 1e30)


with np.errstate(over="ignore"):  # (where long double is float64 the literal overflows to inf)
    _WIDE_LONGDOUBLE = bool(np.isfinite(np.longdouble("1e400")))


@pytest.mark.skipif(not _WIDE_LONGDOUBLE, reason="np.longdouble holds no finite 1e400 here")
def test_a_number_beyond_float64_is_named_out_of_range_not_infinite():
    """np.longdouble("1e400") was refused as "must be a finite number"; 10**400 raised an OverflowError."""
    for v in (np.longdouble("1e400"), np.array(np.longdouble("-1e400")), 10**400):
        assert checks.beyond_float64(v) and not checks.is_number(v)
    with pytest.raises(ValueError, match=r"^--lr must be a number > 0 within float64's range \(about 1.8e308\), "
                                         "got " + re.escape(repr(np.longdouble("1e400"))) + "$"):
        checks.number("--lr", np.longdouble("1e400"), "> 0")
    with pytest.raises(ValueError, match=r"^x must be a number within float64's range \(about 1.8e308\), got "
                                         r"100000000000\.\.\. \(401 digits\)$"):  # (all 401 digits were printed)
        checks.number("x", 10**400)
    for v in (math.inf, np.longdouble("inf"), math.nan, 1e300):
        assert not checks.beyond_float64(v)
    inf = re.escape(repr(np.longdouble("inf")))
    with pytest.raises(ValueError, match=f"^x must be a finite number, got {inf}$"):
        checks.number("x", np.longdouble("inf"))


def test_labels_given_as_tensors_are_checked_as_numbers():
    assert checks.labels("m", torch.tensor([1, 2]), 10) == (1, 2)
    for dup in ([torch.tensor(1), torch.tensor(1)], [np.array(1), np.array(1)]):  # tensors hash by identity
        with pytest.raises(ValueError, match="distinct"):
            checks.labels("m", dup, 10)


def test_entry_points_take_one_element_tensors_and_arrays():
    s = Schedule.linear(50)
    den = GaussianDenoiser(s)
    x = torch.randn(2, 3)
    g = torch.Generator().manual_seed(0)
    a = finish(den, x, s.timesteps(5)[1], steps=torch.tensor(3), generator=g)  # a timestep from a schedule
    b = finish(den, x, 37, steps=3, generator=torch.Generator().manual_seed(0))
    assert int(s.timesteps(5)[1]) == 37 and torch.equal(a, b)
    assert torch.equal(ddim(den, x, s.timesteps(4), eta=torch.tensor(0.0)), ddim(den, x, s.timesteps(4), eta=0.0))
    assert Box(torch.tensor(0.0), np.float64(1.0)).hi == 1.0
    bounds, _ = log_mass_bounds(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.3, 0.2]), torch.tensor([1, 2]),
                                0.25)
    assert bounds.shape == (2,)
    assert FreeDoM(lambda v: v.sum(1), travel=np.array([0.5, 0.8])).travel == (0.5, 0.8)
    assert DPS(lambda v: v.sum(1), zeta=np.array(0.5)).zeta == 0.5
    assert SeparableFilter(torch.tensor([1, 2, 1]), pad=np.array([1, 1])).pad == (1, 1)  # integer taps, as before
    cfg = TrainConfig(device=torch.device("cpu"), progress=np.False_, steps=np.int64(5))
    assert (cfg.device, cfg.progress, cfg.steps) == ("cpu", False, 5)
    with pytest.raises(ValueError, match="ConstantTime: t must be an integer >= 0, got 20.7"):
        sch.ConstantTime(20.7)
    assert sch.ConstantTime(torch.tensor(20)).t == 20 and isinstance(sch.LinearAnneal(np.float64(1)).start, float)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):  # a (1,) tensor is not a number
        ddim(den, x, s.timesteps(4), eta=torch.tensor([0.5]))
    from fractions import Fraction
    assert Box(Fraction(1, 2), 1).lo == 0.5


def test_schedule_and_denoiser_keep_the_clean_data_convention():
    s = Schedule.linear(50)
    assert s.snr(torch.tensor(3)).shape == () and s.snr(torch.tensor([[1, 2], [3, -1]])).shape == (2, 2)
    den = GaussianDenoiser(s)
    x = torch.randn(4, 3)
    assert torch.equal(den.x0_from_eps(x, -1, torch.randn(4, 3)), x)  # t = -1: clean data, x0 = x_t
    with pytest.raises(ValueError, match=r"must be an integer in \[0, 50\), got -1"):
        den.eps(x, -1)


def test_small_checkers_at_their_edges():
    assert checks.changed_keys({"a": {"b": {"c": 1}}, "d": 1}, {"a": {"b": {"c": 2}}, "d": 1}) == ["a.b.c"]
    assert checks.changed_keys({}, {"x": 1}) == ["x"] and checks.changed_keys({"x": 1}, {}) == ["x"]
    assert checks.changed_keys({"a": {"b": 1}}, {"a": 3}) == ["a"]
    assert checks.pair([1, 2]) == (1.0, 2.0)
    for bad in ([1, math.nan], [math.inf, 1], [1], [1, 2, 3], "12", [1, "a"]):
        assert checks.pair(bad) is None, bad
    assert checks.bound("b", 0.5) == 0.5
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="must be a number > 0"):
            checks.bound("b", bad)
    assert checks.constraint_name("fair-3") == "fair-3"
    for bad in ("", "a/b", "a b", "a\tb", "a\nb", 3):
        with pytest.raises(ValueError, match="constraint name must be non-empty"):
            checks.constraint_name(bad)


def test_an_integer_beyond_int64_is_named_out_of_range_not_as_no_integer():
    """checks.integer("n", 10**400) said "must be an integer >= 1", of an integer >= 1, printing all 401 digits."""
    with pytest.raises(ValueError, match=r"^n must be an integer >= 1 within int64's range \(below 2\*\*63\), "
                                         r"got 100000000000\.\.\. \(401 digits\)$"):
        checks.integer("n", 10**400)
    with pytest.raises(ValueError, match=r"within int64's range \(below 2\*\*63\), got 9223372036854775808$"):
        checks.integer("n", 2**63)
    assert checks.integer("n", 2**63 - 1) == 2**63 - 1
    with pytest.raises(ValueError, match=r"^--seed must be an integer in \[0, 2\*\*63\), got 100000000000\.\.\. "
                                         r"\(401 digits\)$"):  # a bounded one is not printed whole either
        checks.seed("--seed", 10**400)
    with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got 0$"):  # the range still says it
        checks.integer("n", 0)
    with pytest.raises(ValueError, match=r"^t must be an integer in \[0, 1000\), got 1180591620717411303424$"):
        checks.integer("t", 2**70, 0, 1000)  # a bound of its own: the range says it, not int64's


def test_shown_abbreviates_every_integer_longer_than_forty_characters():  # m02 checks.py:97
    assert checks.shown(10**39) == repr(10**39)  # 40 digits: printed whole
    assert checks.shown(10**40) == "100000000000... (41 digits)"
    assert checks.shown(-(10**60)) == "-10000000000... (61 digits)"  # the sign is no digit
    assert checks.shown(1e300) == repr(1e300)  # floats are never cut


def test_finite_rows_names_the_first_bad_sample_not_the_last():  # m09 checks.py:170
    x = torch.zeros(6, 2, 3)
    x[2, 1, 0], x[4, 0, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"^x hold 2 non-finite values \(the first in sample 2\)$"):
        checks.finite_rows("x", x)


def test_mps_is_refused_with_its_reason_however_it_is_named():
    """The reason (float64) was given for the word "mps" alone; an indexed name or a torch.device got the
    generic refusal."""
    for v in ("mps", "mps:0", torch.device("mps")):
        with pytest.raises(ValueError, match="float64, which MPS lacks"):
            checks.device("--device", v)


def test_weights_dtype_checks_the_device_only_when_asked():
    """weights_dtype is every sampler step's check: the device is compared only with device=True (one look at the
    first weight for both)."""
    from condiff.nets import TimeMLP

    net = TimeMLP(2, hidden=8, depth=1).to("meta")
    x = torch.zeros(2, 2)
    assert checks.weights_dtype("x", x, net) is x
    with pytest.raises(ValueError, match="x is on cpu but the network's weights are on meta"):
        checks.weights_dtype("x", x, net, device=True)
