"""Dataset format version 2: any array data (uint8/float samples of any rank, labels or targets)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinewton.data import (
    DataError,
    DatasetWriter,
    Standardization,
    inspect_dataset,
    read_rows,
    read_shard,
    read_splits_concat,
    read_standardization,
    write_dataset,
)


def gather(path: Path, split: str, size: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """All rows of ``split`` read as ``size`` ranks' shards, concatenated."""
    shards = [read_shard(path, split, r, size, **kwargs) for r in range(size)]
    return np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# --------------------------------------------------------------------------- round trips


def test_uint8_images_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "img.h5"
    x = rng.integers(0, 256, (13, 6, 5, 1), dtype=np.uint8)
    y = rng.integers(0, 4, 13)
    write_dataset(path, {"train": (x, y)}, num_classes=4, source="t")
    for size in (1, 3, 5):
        gx, gy = gather(path, "train", size)
        assert gx.dtype == np.uint8 and gy.dtype == np.int64
        np.testing.assert_array_equal(gx, x)
        np.testing.assert_array_equal(gy, y)
    info = inspect_dataset(path)
    assert (info.format_version, info.task, info.x_dtype, info.dtype) == (2, "classification",
                                                                          "uint8", "uint8")
    assert info.sample_shape == (6, 5, 1) and info.target_shape == () and info.num_classes == 4
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 2 and f.attrs["task"] == "classification"
        assert f.attrs["pixel_max"] == 255 and f.attrs["num_classes"] == 4


def test_float32_features_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "feat.h5"
    x = rng.normal(size=(40, 10)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    xv = rng.normal(size=(7, 10)).astype(np.float32)
    yv = rng.integers(0, 3, 7)
    write_dataset(path, {"train": (x, y), "validation": (xv, yv)}, num_classes=3, source="t",
                  class_names=["a", "b", "c"])
    gx, gy = gather(path, "train+validation", 4)
    assert gx.dtype == np.float32 and gx.shape == (47, 10)
    np.testing.assert_array_equal(gx, np.concatenate([x, xv]))
    np.testing.assert_array_equal(gy, np.concatenate([y, yv]))
    info = inspect_dataset(path)
    assert info.x_dtype == "float32" and info.sample_shape == (10,)
    assert info.task == "classification"
    with h5py.File(path) as f:
        assert "pixel_max" not in f.attrs  # only where x is uint8
    text = str(info)
    assert "(10,) float32" in text and "classification, 3 classes" in text


@pytest.mark.parametrize("target_shape", [(), (3,)])
def test_float64_regression_round_trip(tmp_path: Path, rng: np.random.Generator,
                                       target_shape: tuple[int, ...]) -> None:
    path = tmp_path / "reg.h5"
    x = rng.normal(size=(30, 4, 2))
    w = rng.normal(size=(8, *target_shape))
    y = x.reshape(30, -1) @ w  # float64 targets (30,) or (30, 3)
    xt, yt = x[:5] * 2, y[:5] * 2
    write_dataset(path, {"train": (x, y), "test": (xt, yt)}, source="regression test")
    info = inspect_dataset(path)
    assert info.task == "regression" and info.num_classes is None and info.class_names is None
    assert info.target_shape == target_shape and info.y_dtype == "float64"
    assert info.x_dtype == "float64" and info.sample_shape == (4, 2)
    assert "regression" in str(info) and "float64" in str(info)
    with h5py.File(path) as f:
        assert "num_classes" not in f.attrs and f.attrs["task"] == "regression"
    for size in (1, 2, 7):
        gx, gy = gather(path, "train", size)
        assert gy.dtype == np.float64 and gy.shape == (30, *target_shape)
        np.testing.assert_array_equal(gx, x)
        np.testing.assert_array_equal(gy, y)
    shard = read_splits_concat(path, ["train", "test"], 1, 2, limit=33)
    assert shard.task == "regression" and (shard.lo, shard.hi) == (17, 33)
    np.testing.assert_array_equal(shard.y, np.concatenate([y, yt])[17:33])
    idx = np.array([0, 9, 29, 30, 34])
    rx, ry = read_rows(path, ["train", "test"], idx)
    np.testing.assert_array_equal(rx, np.concatenate([x, xt])[idx])
    np.testing.assert_array_equal(ry, np.concatenate([y, yt])[idx])
    # num_classes checks labels of classification files only: ignored here
    assert len(read_shard(path, "train", 0, 1, num_classes=2)) == 30


def test_incremental_regression_writer_casts_targets(tmp_path: Path) -> None:
    path = tmp_path / "inc.h5"
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.float64)
    with DatasetWriter(path, source="blocks") as w:  # no num_classes: regression
        w.add_split("train", 10, (2,), x_dtype=np.float32, target_shape=())
        for lo in range(0, 10, 4):
            w.write_rows("train", lo, x[lo : lo + 4], y[lo : lo + 4])
    shard = read_shard(path, "train", 0, 1)
    assert shard.y.dtype == np.float32  # the default target dtype of float32 samples
    np.testing.assert_array_equal(shard.y, y.astype(np.float32))
    with pytest.raises(DataError, match="y at row 3 contains NaN or Inf"), \
            DatasetWriter(tmp_path / "o.h5", source="t") as w:
        w.add_split("train", 5, (2,), x_dtype=np.float32)
        w.write_rows("train", 0, x[:5], np.array([0, 1, 2, 1e300, 4]))  # inf as float32
    assert not (tmp_path / "o.h5").exists()


def test_version_1_files_are_read_unchanged(tmp_path: Path) -> None:
    """A file exactly as format version 1 wrote it (no task attribute)."""
    path = tmp_path / "v1.h5"
    x = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
    y = np.array([1, 0], dtype=np.int64)
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "mpinewton-dataset", "format_version": 1, "num_classes": 2,
                        "source": "old", "pixel_max": 255})
        for name in ("train", "stats"):  # in version 1 every group is a split
            f.create_dataset(f"{name}/x", data=x)
            f.create_dataset(f"{name}/y", data=y)
    info = inspect_dataset(path)
    assert info.format_version == 1 and info.task == "classification" and info.num_classes == 2
    assert info.splits == {"train": 2, "stats": 2} and not info.standardized
    shard = read_shard(path, "train", 0, 1, num_classes=2, task="classification",
                       expected_sample_shape=(3, 3, 1))
    np.testing.assert_array_equal(shard.x, x)
    np.testing.assert_array_equal(shard.y, y)
    assert read_standardization(path) is None
    with pytest.raises(DataError, match="regression .* was asked for"):
        read_shard(path, "train", 0, 1, task="regression")


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v9.h5"
    write_dataset(path, {"train": (np.zeros((2, 3)), np.zeros(2))}, source="t")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 9
    with pytest.raises(DataError, match="format_version 9, this mpinewton reads versions 1, 2"):
        inspect_dataset(path)


# --------------------------------------------------------------------------- standardisation


def test_standardization_stored_and_read(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = rng.normal(3, 2, size=(50, 3, 2))
    raw[:, 0, 0] = 5.0  # a constant feature gets std 1
    stats = Standardization.compute(raw)
    np.testing.assert_allclose(stats.mean, raw.mean(axis=0))
    expected_std = raw.std(axis=0)
    expected_std[0, 0] = 1.0
    np.testing.assert_allclose(stats.std, expected_std)
    x = stats.apply(raw)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, (raw - raw.mean(axis=0)) / expected_std, rtol=1e-6)
    path = tmp_path / "s.h5"
    write_dataset(path, {"train": (x, rng.normal(size=50))}, source="t", stats=stats)
    back = read_standardization(path)
    assert back is not None and back.computed_on == "train"
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.std, stats.std)
    info = inspect_dataset(path)
    assert info.splits == {"train": 50} and info.standardized  # /stats is no split
    assert "standardised" in str(info)
    with h5py.File(path) as f:
        assert f["stats/x_mean"].dtype == np.float64 and f["stats/x_std"].shape == (3, 2)
    with pytest.raises(DataError, match="split 'stats' not found"):
        read_shard(path, "stats", 0, 1)


def test_standardization_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="std > 0"):
        Standardization(mean=np.zeros(3), std=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(DataError, match=r"mean has shape \(3,\) but std \(2,\)"):
        Standardization(mean=np.zeros(3), std=np.ones(2))
    stats = Standardization(mean=np.zeros(3), std=np.ones(3))
    with pytest.raises(DataError, match=r"samples have shape \(4,\) but the standardisation"):
        write_dataset(tmp_path / "d.h5", {"train": (np.zeros((2, 4)), np.zeros(2))}, source="t",
                      stats=stats)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="reserved for the standardisation statistics"):
        write_dataset(tmp_path / "d.h5", {"stats": (np.zeros((2, 3)), np.zeros(2))}, source="t")


# --------------------------------------------------------------------------- write errors


def zeros(n: int, *shape: int, dtype=np.float32) -> np.ndarray:
    return np.zeros((n, *shape), dtype=dtype)


@pytest.mark.parametrize(
    ("splits", "kwargs", "message"),
    [
        ({"train": (zeros(4, 2), np.zeros(4, int))}, {},
         r"integer class labels \(classification\) but num_classes is not given"),
        ({"train": (zeros(4, 2), np.zeros(4))}, {"num_classes": 3},
         r"float targets \(regression\) but num_classes=3 was given"),
        ({"train": (zeros(4, 2), np.zeros(4)), "test": (zeros(2, 2), np.zeros(2, int))}, {},
         r"split 'test': y holds integer class labels .* but the file is for regression"),
        ({"train": (zeros(4, 2), np.zeros((4, 2, 2)))}, {}, r"got shape \(4, 2, 2\)"),
        ({"train": (zeros(4, 2), np.zeros((4, 3), int))}, {"num_classes": 3}, "one-hot"),
        ({"train": (zeros(4, 2), np.zeros(4, np.float16))}, {}, "y has dtype float16"),
        ({"train": (zeros(4, 2, dtype=np.int32), np.zeros(4))}, {}, "x has dtype int32"),
        ({"train": (zeros(4, 2), np.zeros(3))}, {}, "x has 4 rows but y has 3"),
        ({"train": (zeros(4, 2), np.zeros(4)),
          "test": (zeros(2, 2, dtype=np.float64), np.zeros(2))}, {},
         r"split 'test': samples \(2,\) float64, y \('N',\) float64 differs from split 'train'"),
        ({"train": (zeros(4, 2), np.zeros(4)), "test": (zeros(2, 2), np.zeros((2, 1)))}, {},
         "differs from split 'train'"),
        ({"train": (zeros(4, 2), np.zeros(4))}, {"class_names": ["a"]}, "class_names given for"),
    ],
)
def test_write_errors(tmp_path: Path, splits: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        write_dataset(tmp_path / "d.h5", splits, source="t", **kwargs)
    assert "d.h5" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_in_x_names_split_and_first_row(tmp_path: Path, bad: float) -> None:
    x = np.zeros((10, 3), np.float64)
    x[6, 2] = bad
    x[8, 0] = np.nan
    with pytest.raises(DataError) as err:
        write_dataset(tmp_path / "d.h5", {"train": (np.zeros((3, 3)), np.zeros(3)),
                                          "validation": (x, np.zeros(10))}, source="t")
    msg = str(err.value)
    assert "split 'validation'" in msg and "x at row 6 contains NaN or Inf" in msg
    assert "2 such row(s)" in msg and str(tmp_path / "d.h5") in msg
    assert list(tmp_path.iterdir()) == []


def test_nan_in_targets_and_in_a_block(tmp_path: Path) -> None:
    y = np.ones((5, 2))
    y[3, 1] = np.nan
    with pytest.raises(DataError, match="split 'train': y at row 3 contains NaN or Inf"):
        write_dataset(tmp_path / "d.h5", {"train": (np.zeros((5, 1)), y)}, source="t")
    x = np.zeros((4, 2), np.float32)
    x[1] = np.inf
    with pytest.raises(DataError, match="x at row 11 contains NaN"), \
            DatasetWriter(tmp_path / "e.h5", num_classes=2, source="t") as w:
        w.add_split("train", 20, (2,), x_dtype=np.float32)
        w.write_rows("train", 10, x, np.zeros(4, int))  # row 10 + 1
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- read errors


@pytest.fixture
def regression_file(tmp_path: Path) -> Path:
    path = tmp_path / "reg.h5"
    write_dataset(path, {"train": (np.arange(40.0).reshape(20, 2), np.arange(20.0)),
                         "test": (np.zeros((4, 2)), np.zeros(4))}, source="t")
    return path


def test_regression_targets_with_a_classification_loss(regression_file: Path) -> None:
    for read in (lambda **k: read_shard(regression_file, "train", 0, 1, **k),
                 lambda **k: read_rows(regression_file, "train", np.array([1]), **k)):
        with pytest.raises(DataError) as err:
            read(task="classification", num_classes=10)
        msg = str(err.value)
        assert str(regression_file) in msg and "regression targets" in msg
        assert "classification" in msg and "regression loss" in msg
    assert read_shard(regression_file, "train", 0, 1, task="regression").task == "regression"
    with pytest.raises(ValueError, match="task must be None"):
        read_shard(regression_file, "train", 0, 1, task="ranking")


def test_class_labels_with_a_regression_loss(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    write_dataset(path, {"train": (np.zeros((3, 2)), np.array([0, 1, 2]))}, num_classes=3,
                  source="t")
    with pytest.raises(DataError, match=r"integer class labels \(3 classes\), but regression") as e:
        read_shard(path, "train", 0, 1, task="regression")
    assert str(path) in str(e.value)


def test_nan_planted_in_the_file_is_found_on_reading(regression_file: Path) -> None:
    with h5py.File(regression_file, "r+") as f:
        f["train/x"][13, 1] = np.nan
        f["test/y"][2] = np.inf
    assert len(read_shard(regression_file, "train", 0, 2)) == 10  # rows [0, 10) are fine
    with pytest.raises(DataError) as err:
        read_shard(regression_file, "train", 1, 2)
    msg = str(err.value)
    assert str(regression_file) in msg and "split 'train': x at row 13" in msg
    assert "global index 13 of 'train'" in msg and "NaN or Inf" in msg
    with pytest.raises(DataError, match=r"split 'test': y at row 2 \(global index 22 of "
                                        r"'train\+test'\) contains NaN or Inf"):
        read_rows(regression_file, "train+test", np.array([0, 22]))
    read_rows(regression_file, "train+test", np.array([0, 21]))  # other rows are fine


def test_splits_of_different_dtypes_are_not_concatenated(tmp_path: Path) -> None:
    path = tmp_path / "mixed.h5"
    write_dataset(path, {"train": (np.zeros((3, 2), np.float32), np.zeros(3))}, source="t")
    with h5py.File(path, "r+") as f:  # a hand-made second split of another dtype
        f.create_dataset("test/x", data=np.zeros((2, 2), np.float64))
        f.create_dataset("test/y", data=np.zeros(2, np.float32))
    assert read_shard(path, "test", 0, 1).x.dtype == np.float64  # each split alone is fine
    with pytest.raises(DataError) as err:
        read_shard(path, "train+test", 0, 1)
    msg = str(err.value)
    assert str(path) in msg and "cannot concatenate split 'test'" in msg
    assert "float64" in msg and "float32" in msg and "different dtypes" in msg
    with pytest.raises(DataError, match=r"split 'test': samples \(2,\) float64, y \('N',\) "
                                        r"float32 differs from split 'train', which holds"):
        inspect_dataset(path)


def test_sample_shape_hint_for_a_missing_channel_axis(tmp_path: Path) -> None:
    path = tmp_path / "grey.h5"
    write_dataset(path, {"train": (np.zeros((2, 28, 28), np.uint8), np.zeros(2, int))},
                  num_classes=10, source="t")
    with pytest.raises(DataError, match=r"\(28, 28\) but the model expects \(28, 28, 1\); add a "
                                        r"channel axis"):
        read_shard(path, "train", 0, 1, expected_sample_shape=(28, 28, 1))


def test_bad_task_attribute(tmp_path: Path) -> None:
    path = tmp_path / "t.h5"
    write_dataset(path, {"train": (np.zeros((2, 1)), np.zeros(2))}, source="t")
    with h5py.File(path, "r+") as f:
        f.attrs["task"] = "ranking"
    with pytest.raises(DataError, match="attribute task='ranking'"):
        read_shard(path, "train", 0, 1)


def test_a_split_of_another_sample_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    """A file whose splits hold samples of different shapes (made by hand; the writer
    refuses them) is refused when read, naming the split and both shapes."""
    path = tmp_path / "shapes.h5"
    write_dataset(path, {"train": (np.zeros((3, 2), np.float32), np.zeros(3))}, source="t")
    with h5py.File(path, "r+") as f:
        f.create_dataset("test/x", data=np.zeros((2, 5), np.float32))
        f.create_dataset("test/y", data=np.zeros(2, np.float64))
    with pytest.raises(DataError, match=r"shapes.h5: split 'test': sample shape \(5,\) differs "
                                        r"from split 'train', whose samples have shape \(2,\)"):
        inspect_dataset(path)
