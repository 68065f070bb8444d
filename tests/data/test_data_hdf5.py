"""Tests of the dataset HDF5 format: sharding, atomic writes, reader errors."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinewton.data import hdf5
from mpinewton.data.hdf5 import (
    DataError,
    DatasetWriter,
    inspect_dataset,
    read_shard,
    read_splits_concat,
    shard_bounds,
    write_dataset,
)

SHAPE = (4, 5, 1)
NUM_CLASSES = 7


def make_split(n: int, first_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples whose pixels encode a sample id (id = first_id + row), labels = id % NUM_CLASSES."""
    ids = np.arange(first_id, first_id + n)
    x = np.zeros((n, *SHAPE), dtype=np.uint8)
    x[:, 0, 0, 0] = ids % 256
    x[:, 0, 1, 0] = ids // 256
    return x, (ids % NUM_CLASSES).astype(np.int64)


def ids_of(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(np.int64) + 256 * x[:, 0, 1, 0].astype(np.int64)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "ds.h5"
    write_dataset(
        path,
        {"train": make_split(23), "validation": make_split(8, 1000), "test": make_split(5, 2000)},
        num_classes=NUM_CLASSES,
        source="unit test",
        class_names=[f"c{i}" for i in range(NUM_CLASSES)],
    )
    return path


def raw_dataset(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a file in the dataset layout without the writer's validation (to plant bad data)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = hdf5.FORMAT
        f.attrs["format_version"] = hdf5.FORMAT_VERSION
        f.attrs["task"] = "classification"
        f.attrs["num_classes"] = NUM_CLASSES
        f.attrs["source"] = "raw"
        for name, (x, y) in splits.items():
            f.create_dataset(f"{name}/x", data=x)
            f.create_dataset(f"{name}/y", data=y)


# --------------------------------------------------------------------------- shard_bounds


@pytest.mark.parametrize("n", [*range(0, 41), 997, 60_000, 1_281_167])
def test_shard_bounds_partition(n: int) -> None:
    for size in [1, 2, 3, 4, 5, 7, 8, 13, 28, 64, 100]:
        bounds = [shard_bounds(n, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False):
            assert hi == lo  # contiguous, no gaps, no overlap
        counts = [hi - lo for lo, hi in bounds]
        assert all(c >= 0 for c in counts)
        assert counts == [n // size + (1 if r < n % size else 0) for r in range(size)]


def test_shard_bounds_more_ranks_than_rows() -> None:
    assert [shard_bounds(2, r, 5) for r in range(5)] == [(0, 1), (1, 2), (2, 2), (2, 2), (2, 2)]
    assert shard_bounds(0, 3, 4) == (0, 0)


@pytest.mark.parametrize(("n", "rank", "size"), [(-1, 0, 1), (5, 0, 0), (5, 2, 2), (5, -1, 2)])
def test_shard_bounds_rejects_bad_arguments(n: int, rank: int, size: int) -> None:
    with pytest.raises(ValueError):
        shard_bounds(n, rank, size)


# --------------------------------------------------------------------------- read_shard


@pytest.mark.parametrize("size", [1, 2, 3])
def test_read_shard_reads_exactly_its_rows(dataset: Path, size: int) -> None:
    seen = []
    for rank in range(size):
        shard = read_shard(dataset, "train", rank, size)
        lo, hi = shard_bounds(23, rank, size)
        assert (shard.lo, shard.hi, shard.total, len(shard)) == (lo, hi, 23, hi - lo)
        assert shard.split == "train" and shard.path == str(dataset)
        assert shard.x.dtype == np.uint8 and shard.x.shape == (hi - lo, *SHAPE)
        assert shard.y.dtype == np.int64
        np.testing.assert_array_equal(ids_of(shard.x), np.arange(lo, hi))
        np.testing.assert_array_equal(shard.y, np.arange(lo, hi) % NUM_CLASSES)
        seen.append(ids_of(shard.x))
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(23))


def test_read_shard_reads_only_its_rows(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader slices the HDF5 dataset to [lo, hi); it never loads the whole split."""
    requested = []
    original = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, key: object) -> object:
        requested.append((self.name, key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    read_shard(dataset, "train", 1, 3)
    assert requested == [("/train/x", slice(8, 16)), ("/train/y", slice(8, 16))]


def test_read_shard_limit(dataset: Path) -> None:
    shards = [read_shard(dataset, "train", r, 3, limit=10) for r in range(3)]
    assert [s.total for s in shards] == [10, 10, 10]
    np.testing.assert_array_equal(np.concatenate([ids_of(s.x) for s in shards]), np.arange(10))
    assert read_shard(dataset, "train", 0, 1, limit=1000).total == 23
    assert len(read_shard(dataset, "train", 0, 2, limit=0)) == 0


def test_read_shard_more_ranks_than_rows(dataset: Path) -> None:
    shards = [read_shard(dataset, "test", r, 8) for r in range(8)]
    assert [len(s) for s in shards] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert shards[-1].x.shape == (0, *SHAPE) and shards[-1].y.shape == (0,)
    np.testing.assert_array_equal(
        np.concatenate([ids_of(s.x) for s in shards]), 2000 + np.arange(5)
    )


@pytest.mark.parametrize("spec", ["train+validation", ["train", "validation"]])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_read_train_plus_validation(dataset: Path, spec: object, size: int) -> None:
    expected = np.concatenate([np.arange(23), 1000 + np.arange(8)])
    got = []
    for rank in range(size):
        shard = read_shard(dataset, spec, rank, size)  # type: ignore[arg-type]
        assert shard.total == 31 and shard.split == "train+validation"
        np.testing.assert_array_equal(ids_of(shard.x), expected[shard.lo : shard.hi])
        np.testing.assert_array_equal(shard.y, expected[shard.lo : shard.hi] % NUM_CLASSES)
        got.append(ids_of(shard.x))
    np.testing.assert_array_equal(np.concatenate(got), expected)


def test_read_splits_concat_with_limit_across_the_boundary(dataset: Path) -> None:
    shard = read_splits_concat(dataset, ["train", "validation"], 1, 2, limit=27)
    assert (shard.lo, shard.hi, shard.total) == (14, 27, 27)
    np.testing.assert_array_equal(ids_of(shard.x), [*range(14, 23), 1000, 1001, 1002, 1003])


def test_inspect_dataset(dataset: Path) -> None:
    info = inspect_dataset(dataset)
    assert info.splits == {"train": 23, "validation": 8, "test": 5}
    assert info.sample_shape == SHAPE and info.dtype == "uint8"
    assert info.num_classes == NUM_CLASSES
    assert info.class_names == tuple(f"c{i}" for i in range(NUM_CLASSES))
    assert info.source == "unit test" and info.path == str(dataset)
    with h5py.File(dataset) as f:
        assert f.attrs["pixel_max"] == 255 and f.attrs["format"] == "mpinewton-dataset"
        assert f["train/x"].dtype == np.uint8 and f["train/y"].dtype == np.int64
    assert "validation" in str(info) and "23" in str(info)


# --------------------------------------------------------------------------- atomic writes


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_invalid_labels_write_nothing(tmp_path: Path) -> None:
    x, y = make_split(10)
    y[5] = NUM_CLASSES
    y[8] = -1
    with pytest.raises(DataError, match=r"index 5 is 7, outside \[0, 7\)") as err:
        write_dataset(tmp_path / "d.h5", {"train": (x, y)}, num_classes=NUM_CLASSES, source="t")
    assert "d.h5" in str(err.value) and "'train'" in str(err.value)
    assert listing(tmp_path) == []


def test_failure_mid_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = hdf5._write_split_rows

    def fail_on_second(*args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full (simulated)")
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(hdf5, "_write_split_rows", fail_on_second)
    splits = {"train": make_split(10), "test": make_split(4)}
    with pytest.raises(RuntimeError, match="simulated"):
        write_dataset(tmp_path / "d.h5", splits, num_classes=NUM_CLASSES, source="t")
    assert listing(tmp_path) == []


def test_failure_mid_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "d.h5"
    write_dataset(target, {"train": make_split(6)}, num_classes=NUM_CLASSES, source="old")
    before = hashlib.sha256(target.read_bytes()).hexdigest()

    def boom(*args: object) -> None:
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(hdf5, "_write_split_rows", boom)
    with pytest.raises(OSError, match="simulated"):
        write_dataset(target, {"train": make_split(9)}, num_classes=NUM_CLASSES, source="new")
    assert listing(tmp_path) == ["d.h5"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    assert inspect_dataset(target).source == "old"


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "d.h5"  # parent directories are created
    write_dataset(target, {"train": make_split(6)}, num_classes=NUM_CLASSES, source="old")
    write_dataset(target, {"test": make_split(3)}, num_classes=NUM_CLASSES, source="new")
    info = inspect_dataset(target)
    assert info.splits == {"test": 3} and info.source == "new"
    assert listing(target.parent) == ["d.h5"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_dataset_mode_is_0666_less_umask(tmp_path: Path, mask: int) -> None:
    """Like any file the user creates, whatever the temp file machinery does."""
    old = os.umask(mask)
    try:
        write_dataset(tmp_path / "d.h5", {"train": make_split(3)}, num_classes=NUM_CLASSES,
                      source="t")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d.h5").stat().st_mode) == 0o666 & ~mask


def test_failed_rename_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new file is complete and fsynced, then the commit's os.replace fails."""
    target = tmp_path / "d.h5"
    write_dataset(target, {"train": make_split(6)}, num_classes=NUM_CLASSES, source="old")

    def failing(src: str, dst: str) -> None:
        assert inspect_dataset(src).source == "new"  # the temp file is complete
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        write_dataset(target, {"train": make_split(9)}, num_classes=NUM_CLASSES, source="new")
    monkeypatch.undo()
    assert listing(tmp_path) == ["d.h5"] and inspect_dataset(target).source == "old"


@pytest.mark.parametrize(
    ("splits", "kwargs", "message"),
    [
        ({"train": (np.zeros((2, 4, 5, 1), np.int16), np.zeros(2, int))}, {},
         "x has dtype int16; a dataset holds uint8"),
        ({"train": (np.zeros(2, np.uint8), np.zeros(2, int))}, {}, r"use x\[:, None\]"),
        (
            {"train": (np.zeros((3, 4, 5, 1), np.uint8), np.zeros(2, int))},
            {},
            "x has 3 rows but y has 2",
        ),
        ({"train": (np.zeros((2, 4, 5, 1), np.uint8), np.zeros(2))}, {},
         r"float targets \(regression\) but num_classes=7"),
        ({"train": (np.zeros((2, 4, 5, 1), np.uint8), np.zeros(2, bool))}, {}, "dtype bool"),
        ({"a/b": make_split(2)}, {}, "invalid split name"),
        ({"a+b": make_split(2)}, {}, "invalid split name"),
        ({}, {}, "no splits"),
        ({"train": make_split(2)}, {"class_names": ["a"]}, "1 class_names"),
        (
            {"train": make_split(2), "test": (np.zeros((2, 3, 3, 1), np.uint8), np.zeros(2, int))},
            {},
            r"sample shape \(3, 3, 1\) differs",
        ),
    ],
)
def test_write_validation(tmp_path: Path, splits: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        write_dataset(tmp_path / "d.h5", splits, num_classes=NUM_CLASSES, source="t", **kwargs)
    assert listing(tmp_path) == []


def test_incremental_writer(tmp_path: Path) -> None:
    target = tmp_path / "d.h5"
    x, y = make_split(10)
    with DatasetWriter(target, num_classes=NUM_CLASSES, source="blocks") as w:
        w.add_split("train", 10, SHAPE)
        for lo in range(0, 10, 3):
            w.write_rows("train", lo, x[lo : lo + 3], y[lo : lo + 3])
    np.testing.assert_array_equal(ids_of(read_shard(target, "train", 0, 1).x), np.arange(10))

    other = tmp_path / "e.h5"
    with (
        pytest.raises(DataError, match="3 of 10 rows written"),
        DatasetWriter(other, num_classes=NUM_CLASSES, source="blocks") as w,
    ):
        w.add_split("train", 10, SHAPE)
        w.write_rows("train", 0, x[:3], y[:3])
    assert not other.exists() and listing(tmp_path) == ["d.h5"]


# --------------------------------------------------------------------------- reader errors


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "nope.h5"
    with pytest.raises(DataError) as err:
        read_shard(path, "train", 0, 1)
    assert str(path) in str(err.value)
    assert f"python -m mpinewton.data mnist --out {path}" in str(err.value)
    # the ResNet jobs' 32 x 32 RGB digits are made by resize, not by mnist
    assert f"python -m mpinewton.data resize data/mnist.h5 --out {path} --size 32 32" in \
        str(err.value)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "junk.h5"
    path.write_bytes(b"this is not HDF5" * 100)
    with pytest.raises(DataError, match="not a readable HDF5 file") as err:
        inspect_dataset(path)
    assert str(path) in str(err.value)


def test_truncated_file(dataset: Path) -> None:
    data = dataset.read_bytes()
    dataset.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError) as err:
        read_shard(dataset, "train", 0, 1)
    assert str(dataset) in str(err.value)


def test_hdf5_but_not_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["weights"] = np.zeros(3)
    with pytest.raises(DataError, match="not an mpinewton dataset") as err:
        read_shard(path, "train", 0, 1)
    assert str(path) in str(err.value)


def test_missing_split_lists_available(dataset: Path) -> None:
    with pytest.raises(DataError) as err:
        read_shard(dataset, "holdout", 0, 1)
    msg = str(err.value)
    assert str(dataset) in msg and "'holdout'" in msg
    assert "train, validation, test" in msg


def test_sample_shape_mismatch_names_both_shapes(dataset: Path) -> None:
    with pytest.raises(DataError) as err:
        read_shard(dataset, "train", 0, 1, expected_sample_shape=(32, 32, 3))
    msg = str(err.value)
    assert str(dataset) in msg and "(4, 5, 1)" in msg and "(32, 32, 3)" in msg
    assert read_shard(dataset, "train", 0, 1, expected_sample_shape=SHAPE).total == 23


def test_bad_label_names_first_global_index(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    x, y = make_split(30)
    y[17], y[25] = 9, -3
    raw_dataset(path, {"train": (x, y)})
    for rank in range(3):  # rows [0,10) [10,20) [20,30)
        if rank == 0:
            assert len(read_shard(path, "train", rank, 3)) == 10  # its rows are fine
            continue
        with pytest.raises(DataError) as err:
            read_shard(path, "train", rank, 3)
        msg = str(err.value)
        assert str(path) in msg and "'train'" in msg
        expect = (
            "global index 17 of 'train') is 9" if rank == 1 else "global index 25 of 'train') is -3"
        )
        assert expect in msg


def test_num_classes_argument_checks_labels(dataset: Path) -> None:
    with pytest.raises(DataError, match=r"global index 3 of 'train'\) is 3, outside \[0, 3\)"):
        read_shard(dataset, "train", 0, 1, num_classes=3)


def test_bad_label_in_second_concatenated_split(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    xv, yv = make_split(8, 1000)
    yv[2] = 99
    raw_dataset(path, {"train": make_split(23), "validation": (xv, yv)})
    with pytest.raises(DataError) as err:
        read_shard(path, "train+validation", 0, 1)
    msg = str(err.value)
    assert "split 'validation': label at row 2" in msg and "global index 25" in msg and "99" in msg


def test_length_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    x, y = make_split(10)
    raw_dataset(path, {"train": (x, y[:7])})
    with pytest.raises(DataError, match="x has 10 rows but y has 7") as err:
        read_shard(path, "train", 0, 1)
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match="x has 10 rows but y has 7"):
        inspect_dataset(path)
