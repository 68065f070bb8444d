"""read_rows: a rank's part of a mini-batch, read straight from the HDF5 file (thesis 8.2)."""

import h5py
import numpy as np
import pytest

from mpinewton.data import DataError, read_shard, write_dataset
from mpinewton.data.hdf5 import read_rows


@pytest.fixture()
def two_splits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.h5"
    write_dataset(path, {"train": (rng.integers(0, 256, (30, 4, 3, 2), dtype=np.uint8),
                                   rng.integers(0, 5, 30)),
                         "validation": (rng.integers(0, 256, (12, 4, 3, 2), dtype=np.uint8),
                                        rng.integers(0, 5, 12))},
                  num_classes=5, source="test")
    return path


def test_rows_equal_the_same_rows_of_the_whole_concatenation(two_splits):
    whole = read_shard(two_splits, ["train", "validation"], 0, 1)
    idx = np.array([0, 3, 17, 29, 30, 31, 40, 41])  # across the split boundary
    x, y = read_rows(two_splits, ["train", "validation"], idx)
    np.testing.assert_array_equal(x, whole.x[idx])
    np.testing.assert_array_equal(y, whole.y[idx])
    x0, y0 = read_rows(two_splits, "train", np.empty(0, np.int64))
    assert x0.shape == (0, 4, 3, 2) and y0.shape == (0,)


def test_rows_past_the_limit_or_unsorted_are_refused(two_splits):
    with pytest.raises(DataError, match="row 35 requested, but there are 35 rows"):
        read_rows(two_splits, "train+validation", np.array([1, 35]), limit=35)
    with pytest.raises(ValueError, match="sorted"):
        read_rows(two_splits, "train", np.array([3, 1]))


def test_bad_label_and_wrong_shape_are_named(two_splits):
    with h5py.File(two_splits, "r+") as f:
        f["validation/y"][2] = 7
    with pytest.raises(DataError, match=r"label at row 2 \(global index 32 .* is 7"):
        read_rows(two_splits, ["train", "validation"], np.array([5, 32]))
    read_rows(two_splits, ["train", "validation"], np.array([5, 33]))  # other rows are fine
    with pytest.raises(DataError, match=r"shape \(4, 3, 2\) but the model expects \(28, 28, 1\)"):
        read_rows(two_splits, "train", np.array([1]), expected_sample_shape=(28, 28, 1))
