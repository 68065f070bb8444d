"""``python -m mpinewton.data import``: npz, npy pairs and CSV into the dataset format."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinewton.data import DataError, inspect_dataset, read_shard, read_standardization
from mpinewton.data.__main__ import main
from mpinewton.data.importer import import_dataset


def whole(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    shard = read_shard(path, split, 0, 1)
    return shard.x, shard.y


def quiet_import(sources, out, **kwargs):
    return import_dataset([*sources], out, progress=False, **kwargs)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


# --------------------------------------------------------------------------- npz / npy


def test_npz_x_y_regression(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.normal(size=(60, 5))
    y = rng.normal(size=(60, 3))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    info = quiet_import([tmp_path / "d.npz"], tmp_path / "d.h5")
    assert info.splits == {"train": 60} and info.task == "regression"
    assert info.x_dtype == "float32" and info.y_dtype == "float32" and info.target_shape == (3,)
    gx, gy = whole(tmp_path / "d.h5", "train")
    np.testing.assert_array_equal(gx, x.astype(np.float32))
    np.testing.assert_array_equal(gy, y.astype(np.float32))
    info = quiet_import([tmp_path / "d.npz"], tmp_path / "d64.h5", dtype="float64")
    assert info.x_dtype == "float64" and info.y_dtype == "float64"
    np.testing.assert_array_equal(whole(tmp_path / "d64.h5", "train")[1], y)


def test_npz_splits_keep_uint8_and_class_names(tmp_path: Path, rng: np.random.Generator) -> None:
    splits = {s: (rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), rng.integers(0, 3, n))
              for s, n in (("train", 20), ("val", 6), ("test", 5))}
    np.savez(tmp_path / "k.npz", **{f"{k}_{s}": a for s, (x, y) in splits.items()
                                    for k, a in (("x", x), ("y", y))},
             class_names=np.array(["cat", "dog", "eel"]))
    info = quiet_import([tmp_path / "k.npz"], tmp_path / "k.h5")
    assert info.splits == {"train": 20, "validation": 6, "test": 5}  # val means validation
    assert info.x_dtype == "uint8" and info.task == "classification" and info.num_classes == 3
    assert info.class_names == ("cat", "dog", "eel")
    for name, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        gx, gy = whole(tmp_path / "k.h5", split)
        np.testing.assert_array_equal(gx, splits[name][0])
        np.testing.assert_array_equal(gy, splits[name][1])
    with h5py.File(tmp_path / "k.h5") as f:
        assert f.attrs["pixel_max"] == 255


def test_npy_pair(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.normal(size=(12, 2, 3)).astype(np.float32)
    y = rng.integers(0, 4, 12)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    info = quiet_import([tmp_path / "x.npy", tmp_path / "y.npy"], tmp_path / "p.h5",
                        num_classes=6)
    assert info.num_classes == 6 and info.sample_shape == (2, 3) and info.task == "classification"
    gx, gy = whole(tmp_path / "p.h5", "train")
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
    quiet_import([tmp_path / "x.npy", tmp_path / "y.npy"], tmp_path / "r.h5", task="regression")
    assert inspect_dataset(tmp_path / "r.h5").task == "regression"
    np.testing.assert_array_equal(whole(tmp_path / "r.h5", "train")[1], y.astype(np.float32))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 1)), "y": np.zeros(2), "z": np.zeros(2)}, "use either x and y"),
        ({"x_train": np.zeros((2, 1))}, "split 'train' has no y_train array"),
        ({"x_train": np.zeros((2, 1)), "y_train": np.zeros(2), "w": np.zeros(1)},
         "key 'w' is not x, y"),
        ({"x": np.zeros((3, 1)), "y": np.zeros(2)}, "x has 3 rows but y has 2"),
        ({"x": np.zeros(3), "y": np.zeros(3)}, r"use x\[:, None\]"),
        ({"x": np.array([[1.0], [np.nan]]), "y": np.zeros(2)}, "x at row 1 contains NaN"),
        ({"x": np.zeros((2, 1)), "y": np.array([0.5, 1.0])},
         r"target at row 0 is 0.5, not an integer class label"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    kwargs = {"task": "classification"} if "integer class label" in message else {}
    with pytest.raises(DataError, match=message) as err:
        quiet_import([tmp_path / "bad.npz"], tmp_path / "bad.h5", **kwargs)
    assert "bad.npz" in str(err.value)
    assert not (tmp_path / "bad.h5").exists()


def test_source_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 1)))
    with pytest.raises(DataError, match="give one .npz file, two .npy files"):
        quiet_import([tmp_path / "x.npy"], tmp_path / "o.h5")
    with pytest.raises(DataError, match="does not exist"):
        quiet_import([tmp_path / "nope.npz"], tmp_path / "o.h5")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1)), y=np.zeros(4))
    quiet_import([tmp_path / "d.npz"], tmp_path / "o.h5")
    with pytest.raises(DataError, match="exists; pass --force"):
        quiet_import([tmp_path / "d.npz"], tmp_path / "o.h5")
    quiet_import([tmp_path / "d.npz"], tmp_path / "o.h5", force=True)
    with pytest.raises(DataError, match="is a source file"):
        quiet_import([tmp_path / "d.npz"], tmp_path / "d.npz", force=True)


# --------------------------------------------------------------------------- CSV


def write_csv(path: Path, rows: list[list[object]], header: list[str] | None = None) -> Path:
    lines = [",".join(header)] if header else []
    lines += [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_header_and_named_target(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.normal(size=(25, 4)).round(3)
    csv = write_csv(tmp_path / "h.csv", data.tolist(), ["a", "price", "b", "c"])
    info = quiet_import([csv], tmp_path / "h.h5", target="price")
    assert info.task == "regression" and info.sample_shape == (3,)  # real-valued -> regression
    gx, gy = whole(tmp_path / "h.h5", "train")
    np.testing.assert_array_equal(gx, data[:, [0, 2, 3]].astype(np.float32))
    np.testing.assert_array_equal(gy, data[:, 1].astype(np.float32))
    assert "target column 'price'" in info.source


def test_csv_without_header_default_last_column_integer_labels(tmp_path: Path) -> None:
    rows = [[i * 0.5, -i, i % 3] for i in range(12)]
    csv = write_csv(tmp_path / "n.csv", rows)
    info = quiet_import([csv], tmp_path / "n.h5")
    assert info.splits == {"train": 12}  # the first line is data: no header detected
    assert info.task == "classification" and info.num_classes == 3  # integer-valued -> classes
    gx, gy = whole(tmp_path / "n.h5", "train")
    np.testing.assert_array_equal(gx, np.array([r[:2] for r in rows], np.float32))
    np.testing.assert_array_equal(gy, [r[2] for r in rows])
    info = quiet_import([csv], tmp_path / "r.h5", task="regression", target="-1")
    assert info.task == "regression" and info.y_dtype == "float32"
    info = quiet_import([csv], tmp_path / "t0.h5", target="0", header="no", task="regression")
    np.testing.assert_array_equal(whole(tmp_path / "t0.h5", "train")[1], [r[0] for r in rows])


def test_csv_text_labels_become_class_names(tmp_path: Path) -> None:
    species = ["setosa", "virginica", "versicolor"]
    rows = [[5.1 + i, 3.5, species[i % 3]] for i in range(9)]
    csv = write_csv(tmp_path / "iris.csv", rows)  # no header: 'setosa' is data, as below it
    stream = io.StringIO()
    info = import_dataset([csv], tmp_path / "iris.h5", stream=stream)
    assert info.splits == {"train": 9} and info.class_names == tuple(sorted(species))
    gy = whole(tmp_path / "iris.h5", "train")[1]
    np.testing.assert_array_equal(gy, [sorted(species).index(r[2]) for r in rows])
    assert "3 classes named by their sorted values" in stream.getvalue()
    with pytest.raises(DataError, match="class names .* regression needs numbers"):
        quiet_import([csv], tmp_path / "x.h5", task="regression")


def test_csv_tsv_and_header_forced(tmp_path: Path) -> None:
    tsv = tmp_path / "d.tsv"
    tsv.write_text("1\t2\t0\n3\t4\t1\n")
    info = quiet_import([tsv], tmp_path / "t.h5")
    assert info.splits == {"train": 2} and info.sample_shape == (2,)
    info = quiet_import([tsv], tmp_path / "h.h5", header="yes")
    assert info.splits == {"train": 1}


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("a,b,y\n1,red,0\n", {}, r"line 2, column 'b': 'red' is not a number"),
        ("a,b,y\n1,,0\n", {}, r"line 2, column 'b': empty value"),
        ("a,b,y\n1,2,0\n3,4\n", {}, "line 3 has 2 fields, the header has 3"),
        ("a,b,y\n1,2,0\n3,nan,1\n", {}, r"line 3, column 'b': 'nan' is not a finite number"),
        ("a,b,y\n1,2,0\n3,4,inf\n", {}, r"line 3, target column 'y': 'inf' is not a finite"),
        ("a,b,y\n1,2,0\n3,4,\n", {}, r"line 3, target column 'y': empty value"),
        ("a,b,y\n1,2,0\n", {"target": "z"}, "has no column 'z'; columns: a, b, y"),
        ("1,2,0\n", {"target": "7"}, "target column 7 out of range for 3 columns"),
        ("1;2;0\n", {}, "1 column"),
        ("a,b,y\n", {}, "a header line but no data lines"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        quiet_import([csv], tmp_path / "bad.h5", **kwargs)
    assert "bad.csv" in str(err.value)
    assert not (tmp_path / "bad.h5").exists()


# --------------------------------------------------------------------------- splits


def test_validation_and_test_fractions(tmp_path: Path) -> None:
    n = 200
    x = np.arange(n, dtype=np.float64)[:, None]  # the row id is the feature
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(n) % 5)
    info = quiet_import([tmp_path / "d.npz"], tmp_path / "s.h5", validation=0.1, test=0.25,
                        seed=4)
    assert info.splits == {"train": 130, "validation": 20, "test": 50}
    ids = {s: whole(tmp_path / "s.h5", s)[0][:, 0].astype(int) for s in info.splits}
    assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(n))  # a partition
    for s, got in ids.items():
        assert np.all(np.diff(got) > 0)  # rows keep their order
        np.testing.assert_array_equal(whole(tmp_path / "s.h5", s)[1], got % 5)
    # independent: the same seeded permutation, test first, then validation
    perm = np.random.default_rng(4).permutation(n)
    np.testing.assert_array_equal(ids["test"], np.sort(perm[:50]))
    np.testing.assert_array_equal(ids["validation"], np.sort(perm[50:70]))
    again = quiet_import([tmp_path / "d.npz"], tmp_path / "s2.h5", validation=0.1, test=0.25,
                         seed=4)
    assert again.splits == info.splits
    np.testing.assert_array_equal(whole(tmp_path / "s2.h5", "test")[0][:, 0], ids["test"])
    quiet_import([tmp_path / "d.npz"], tmp_path / "s3.h5", test=0.25, seed=5)
    assert not np.array_equal(whole(tmp_path / "s3.h5", "test")[0][:, 0], ids["test"])


def test_split_fraction_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x_train=np.zeros((10, 1)), y_train=np.zeros(10),
             x_validation=np.zeros((2, 1)), y_validation=np.zeros(2))
    with pytest.raises(DataError, match="already has a 'validation' split"):
        quiet_import([tmp_path / "d.npz"], tmp_path / "o.h5", validation=0.2)
    with pytest.raises(DataError, match="non-empty train split"):
        quiet_import([tmp_path / "d.npz"], tmp_path / "o.h5", test=0.99)
    with pytest.raises(DataError, match=r"fraction in \(0, 1\)"):
        quiet_import([tmp_path / "d.npz"], tmp_path / "o.h5", test=1.5)
    np.savez(tmp_path / "t.npz", x_test=np.zeros((10, 1)), y_test=np.zeros(10))
    with pytest.raises(DataError, match="source has no 'train' split"):
        quiet_import([tmp_path / "t.npz"], tmp_path / "o.h5", validation=0.2)
    assert not (tmp_path / "o.h5").exists()


# --------------------------------------------------------------------------- standardisation


def test_standardize_uses_train_only(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.normal(5, 3, size=(100, 3)) * [1, 10, 100]
    x[:, 2] = 7.0  # constant feature: std 1, values become 0
    y = rng.normal(size=100)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    info = quiet_import([tmp_path / "d.npz"], tmp_path / "std.h5", validation=0.2,
                        standardize=True, seed=1, dtype="float64")
    assert info.standardized and info.x_dtype == "float64"
    # independent: the train rows of the split, their mean and std
    perm = np.random.default_rng(1).permutation(100)
    train = np.sort(perm[20:])
    val = np.sort(perm[:20])
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[2] = 1.0
    stats = read_standardization(tmp_path / "std.h5")
    assert stats is not None and stats.computed_on == "train"
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=1e-12)
    gx, gy = whole(tmp_path / "std.h5", "train")
    np.testing.assert_allclose(gx, (x[train] - mean) / std, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx[:, :2].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(gx[:, :2].std(axis=0), 1, rtol=1e-12)
    np.testing.assert_array_equal(gy, y[train])  # targets are not standardised
    vx = whole(tmp_path / "std.h5", "validation")[0]
    np.testing.assert_allclose(vx, (x[val] - mean) / std, rtol=1e-12, atol=1e-12)
    assert np.abs(vx[:, :2].mean(axis=0)).max() > 1e-3  # not its own statistics


def test_standardize_like_applies_the_other_files_statistics(tmp_path: Path,
                                                             rng: np.random.Generator) -> None:
    x = rng.integers(0, 256, (40, 2, 2, 1), dtype=np.uint8)  # uint8 becomes float if standardised
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(40) % 2)
    quiet_import([tmp_path / "train.npz"], tmp_path / "train.h5", standardize=True)
    new = rng.integers(0, 256, (9, 2, 2, 1), dtype=np.uint8)
    np.savez(tmp_path / "new.npz", x=new, y=np.zeros(9, int))
    info = quiet_import([tmp_path / "new.npz"], tmp_path / "new.h5",
                        standardize_like=tmp_path / "train.h5")
    assert info.x_dtype == "float32" and info.standardized
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    np.testing.assert_allclose(whole(tmp_path / "new.h5", "train")[0],
                               ((new - mean) / std).astype(np.float32), rtol=1e-6)
    stored = read_standardization(tmp_path / "new.h5")
    assert stored is not None
    np.testing.assert_allclose(stored.mean, mean)
    np.savez(tmp_path / "other.npz", x=np.zeros((3, 5)), y=np.zeros(3, int))
    with pytest.raises(DataError, match=r"statistics for samples of shape \(2, 2, 1\), the "
                                        r"source's samples have shape \(5,\)"):
        quiet_import([tmp_path / "other.npz"], tmp_path / "o.h5",
                     standardize_like=tmp_path / "train.h5")
    with pytest.raises(DataError, match="holds no standardisation statistics"):
        quiet_import([tmp_path / "other.npz"], tmp_path / "o.h5",
                     standardize_like=_plain(tmp_path))
    with pytest.raises(DataError, match="not both"):
        quiet_import([tmp_path / "other.npz"], tmp_path / "o.h5", standardize=True,
                     standardize_like=tmp_path / "train.h5")
    assert not (tmp_path / "o.h5").exists()


def _plain(tmp_path: Path) -> Path:
    np.savez(tmp_path / "plain.npz", x=np.zeros((3, 5)), y=np.zeros(3, int))
    quiet_import([tmp_path / "plain.npz"], tmp_path / "plain.h5")
    return tmp_path / "plain.h5"


# --------------------------------------------------------------------------- CLI


def test_cli_summary_progress_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         rng: np.random.Generator) -> None:
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 4)), y=rng.normal(size=30))
    out = tmp_path / "d.h5"
    code = main(["import", str(tmp_path / "d.npz"), "--out", str(out), "--validation", "0.2",
                 "--standardize", "--dtype", "float64"])
    captured = capsys.readouterr()
    assert code == 0
    assert "regression" in captured.out and "validation" in captured.out
    assert "standardised" in captured.out and "written in" in captured.out
    assert "import: 30/30 rows (100%)" in captured.err
    code = main(["import", str(tmp_path / "d.npz"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and captured.err.startswith("error: import: ") and "--force" in captured.err
    code = main(["-q", "import", str(tmp_path / "d.npz"), "--out", str(out), "--force"])
    assert code == 0 and capsys.readouterr().err == ""  # --quiet: no progress lines
    code = main(["info", str(out), "--check"])
    assert code == 0 and "targets finite, samples finite" in capsys.readouterr().out
