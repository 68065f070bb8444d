"""In-memory arrays: check_arrays and array_shard (the checks of read_shard, no file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mpinewton.data
from mpinewton.data import DataError, array_shard, check_arrays, read_shard, write_dataset


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(3)


def test_exported_from_the_package() -> None:
    assert mpinewton.data.array_shard is array_shard and "check_arrays" in mpinewton.data.__all__


def test_check_arrays_returns_the_task(rng: np.random.Generator) -> None:
    assert check_arrays(rng.normal(size=(5, 10)).astype(np.float32),
                        np.arange(5, dtype=np.int32)) == "classification"
    assert check_arrays(rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8),
                        np.zeros(5, np.uint8)) == "classification"
    assert check_arrays(rng.normal(size=(5, 2)), rng.normal(size=5)) == "regression"
    assert check_arrays(rng.normal(size=(5, 2)), rng.normal(size=(5, 3)).astype(np.float32)) \
        == "regression"


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((100, 3)), np.zeros(99), "data: x has 100 rows but y has 99"),
        (np.zeros((0, 3)), np.zeros(0), "data: x and y are empty"),
        (np.zeros((4, 3), np.int64), np.zeros(4), "data: x has dtype int64"),
        (np.zeros((4, 3), np.float16), np.zeros(4), "x has dtype float16"),
        (np.zeros((4, 3)), np.array(["a"] * 4), "y has dtype <U1"),
        (np.zeros((4, 3)), np.zeros((4, 2, 2)), r"y must have shape \(N,\) .* got shape"),
        (np.zeros(4), np.zeros(4), r"use x\[:, None\]"),
        (np.zeros((4, 3)), np.array([0, 1, -2, 0]), "label at row 2 is -2"),
    ],
)
def test_check_arrays_errors(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        check_arrays(x, y, where="data")


def test_check_arrays_names_the_first_bad_row() -> None:
    x = np.ones((50, 2, 2), np.float32)
    x[31, 1, 0] = np.nan
    x[44, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"^arrays: x at row 31 contains NaN or Inf \(2 such"):
        check_arrays(x, np.zeros(50, int))
    y = np.ones((50, 3))
    y[7, 2] = -np.inf
    with pytest.raises(DataError, match="mine: y at row 7 contains NaN or Inf"):
        check_arrays(np.ones((50, 1)), y, where="mine")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 60])
def test_array_shard_partitions_like_np_array_split(rng: np.random.Generator, size: int) -> None:
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = rng.normal(size=(50, 2))
    shards = [array_shard(x, y, r, size) for r in range(size)]
    for shard, xs, ys in zip(shards, np.array_split(x, size), np.array_split(y, size),
                             strict=True):
        np.testing.assert_array_equal(shard.x, xs)
        np.testing.assert_array_equal(shard.y, ys)
        assert shard.total == 50 and shard.task == "regression" and shard.split == "arrays"
        assert shard.x.dtype == np.float32 and shard.y.dtype == np.float64
        assert not np.shares_memory(shard.x, x) and not np.shares_memory(shard.y, y)


def test_array_shard_equals_read_shard_of_the_same_data(tmp_path: Path,
                                                         rng: np.random.Generator) -> None:
    x = rng.integers(0, 256, (23, 3, 3, 1), dtype=np.uint8)
    y = rng.integers(0, 5, 23).astype(np.int32)
    path = tmp_path / "d.h5"
    write_dataset(path, {"train": (x, y)}, num_classes=5, source="t")
    for rank in range(3):
        a = array_shard(x, y, rank, 3, limit=20, num_classes=5, split="train",
                        expected_sample_shape=(3, 3, 1), task="classification")
        b = read_shard(path, "train", rank, 3, limit=20, num_classes=5,
                       expected_sample_shape=(3, 3, 1), task="classification")
        assert (a.lo, a.hi, a.total, a.task) == (b.lo, b.hi, b.total, b.task)
        assert a.y.dtype == b.y.dtype == np.int64 and a.x.dtype == np.uint8
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)


def test_array_shard_checks(rng: np.random.Generator) -> None:
    x = rng.normal(size=(10, 3))
    labels = np.arange(10) % 4
    with pytest.raises(DataError, match=r"^train: label at index 3 is 3, outside \[0, 3\)"):
        array_shard(x, labels, 0, 2, num_classes=3, split="train")
    with pytest.raises(DataError, match=r"train: samples have shape \(3,\) but the model "
                                        r"expects \(4,\)"):
        array_shard(x, labels, 0, 1, expected_sample_shape=(4,), split="train")
    with pytest.raises(DataError, match=r"regression targets .* but classification"):
        array_shard(x, x[:, 0], 0, 1, task="classification", num_classes=3)
    with pytest.raises(DataError, match=r"integer class labels \(4 classes\), but regression"):
        array_shard(x, labels, 0, 1, task="regression", num_classes=4)
    # num_classes is for labels: regression targets ignore it
    assert array_shard(x, x[:, :2], 0, 1, num_classes=3).y.shape == (10, 2)
    with pytest.raises(ValueError, match="limit must be None or >= 0"):
        array_shard(x, labels, 0, 1, limit=-1)
    shard = array_shard(x, labels, 2, 3, limit=4)
    assert (shard.lo, shard.hi, shard.total) == (3, 4, 4)
    assert shard.path == "<in-memory arrays>"
