import pytest
import torch

from condiff.readback import DeviceRows


def test_rows_are_read_in_order_as_floats_once_every_rows_are_kept():
    seen = []
    rows = DeviceRows(every=3)
    for k in range(5):
        rows.keep(torch.tensor([k, k / 2]), seen.append)
    assert seen == [[0.0, 0.0], [1.0, 0.5], [2.0, 1.0]] and len(rows.unread) == 2
    rows.read()
    assert seen[3:] == [[3.0, 1.5], [4.0, 2.0]] and rows.unread == []


def test_the_first_reader_that_raises_ends_the_read_and_drops_the_rest():
    seen = []

    def bad(row):
        raise FloatingPointError(f"bad row {row}")

    rows = DeviceRows()
    rows.keep(torch.tensor(1.0), seen.append)
    rows.keep(torch.tensor(2.0), bad)
    rows.keep(torch.tensor(3.0), seen.append)
    with pytest.raises(FloatingPointError, match=r"bad row \[2.0\]"):
        rows.read()
    assert seen == [[1.0]] and rows.unread == []
    rows.read()  # nothing left over
    assert seen == [[1.0]]


def test_read_before_raises_a_readers_error_from_the_one_at_hand_and_keeps_it_when_the_transfer_fails():
    def bad(row):
        raise FloatingPointError("the kept step")

    rows, err = DeviceRows(), ValueError("a later failure")
    rows.keep(torch.tensor(0.0), bad)
    with pytest.raises(FloatingPointError, match="the kept step") as got:
        rows.read_before(err)
    assert got.value.__cause__ is err
    rows.keep(torch.empty(1, device="meta"), bad)  # a device whose values cannot be read back
    assert rows.read_before(err) is None and rows.unread == []


def test_rows_keep_float64_values_and_the_cpu_reads_every_step():
    from condiff.readback import read_every

    seen = []
    rows = DeviceRows(every=1)
    rows.keep(torch.tensor([16777217.0, 0.1], dtype=torch.float64), seen.append)
    assert seen == [[16777217.0, 0.1]]  # not rounded through float32 (16777216.0, 0.10000000149)
    assert read_every(torch.device("cpu")) == 1  # on the CPU a bad step is named at that step


def test_a_stratified_split_that_would_empty_a_class_is_refused():
    import numpy as np

    from condiff.data import DataError
    from condiff.data.digits import split_indices

    labels = np.repeat(np.arange(3), 10)
    train, test = split_indices(labels, 0.2, 0)
    assert [int((labels[test] == c).sum()) for c in range(3)] == [2, 2, 2] and len(train) == 24
    for bad in (0.999, 0.01):  # round(0.999 * 10) = 10 and round(0.01 * 10) = 0
        with pytest.raises(DataError, match="leaves class 0 empty"):
            split_indices(labels, bad, 0)
