"""Resizing a dataset file with OpenCV: pixels as cv2.resize, labels unchanged, atomic."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mpinewton.data import resize as resize_module
from mpinewton.data.hdf5 import DataError, inspect_dataset, read_shard, write_dataset
from mpinewton.data.resize import main, resize_dataset, resize_images

NUM_CLASSES = 5


def _split(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.integers(0, NUM_CLASSES, n).astype(np.int64))


@pytest.fixture
def grey(tmp_path: Path) -> Path:
    path = tmp_path / "grey.h5"
    write_dataset(path, {"train": _split(37, (9, 7, 1), 0), "validation": _split(5, (9, 7, 1), 1),
                         "test": _split(0, (9, 7, 1), 2)},
                  num_classes=NUM_CLASSES, source="unit test", class_names=list("abcde"))
    return path


def test_grey_to_rgb_matches_cv2_and_keeps_labels(grey: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resize_module, "_BLOCK_BYTES", 10 * 12 * 3 * 8)  # blocks of 8 rows
    out = tmp_path / "rgb.h5"
    resize_dataset(grey, out, (10, 12), channels=3)
    info = inspect_dataset(out)
    assert info.sample_shape == (10, 12, 3)
    assert info.splits == {"train": 37, "validation": 5, "test": 0}
    assert info.num_classes == NUM_CLASSES and info.class_names == tuple("abcde")
    assert "grey.h5" in info.source and "cv2.resize to 10x12" in info.source
    assert "1 -> 3 channels" in info.source
    for split in ("train", "validation"):
        before, after = read_shard(grey, split, 0, 1), read_shard(out, split, 0, 1)
        np.testing.assert_array_equal(after.y, before.y)
        for image, resized in zip(before.x, after.x, strict=True):
            ref = cv2.cvtColor(cv2.resize(image, (12, 10)), cv2.COLOR_GRAY2RGB)
            np.testing.assert_array_equal(resized, ref)
            assert (resized[..., 0] == resized[..., 2]).all()


@pytest.mark.parametrize("interpolation", ["area", "cubic", "nearest"])
def test_rgb_resize_with_each_interpolation(tmp_path: Path, interpolation: str) -> None:
    src = tmp_path / "rgb.h5"
    x, y = _split(6, (16, 16, 3), 3)
    write_dataset(src, {"train": (x, y)}, num_classes=NUM_CLASSES, source="rgb")
    out = tmp_path / "small.h5"
    resize_dataset(src, out, (5, 8), channels=3, interpolation=interpolation)
    got = read_shard(out, "train", 0, 1)
    flag = resize_module.INTERPOLATIONS[interpolation]
    ref = np.stack([cv2.resize(image, (8, 5), interpolation=flag) for image in x])
    np.testing.assert_array_equal(got.x, ref)
    np.testing.assert_array_equal(got.y, y)


def test_rgb_to_grey_and_keep_channels() -> None:
    x, _ = _split(3, (6, 6, 3), 4)
    grey = resize_images(x, (4, 4), channels=1)
    assert grey.shape == (3, 4, 4, 1)
    np.testing.assert_array_equal(grey[1, ..., 0],
                                  cv2.cvtColor(cv2.resize(x[1], (4, 4)), cv2.COLOR_RGB2GRAY))
    assert resize_images(x, (4, 4), channels=None).shape == (3, 4, 4, 3)


def test_refuses_to_overwrite_and_bad_arguments(grey: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(DataError, match="exists; pass force"):
        resize_dataset(grey, out, (4, 4))
    assert out.read_bytes() == b"keep me"
    with pytest.raises(DataError, match="is the source file"):
        resize_dataset(grey, grey, (4, 4), force=True)
    with pytest.raises(DataError, match="unknown interpolation 'bilinear'"):
        resize_dataset(grey, out, (4, 4), interpolation="bilinear", force=True)
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        resize_dataset(grey, out, (4, 4), channels=2, force=True)
    with pytest.raises(DataError, match="does not exist"):
        resize_dataset(tmp_path / "missing.h5", out, (4, 4), force=True)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.h5", "out.h5"]  # no temp files


def test_cli(grey: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.h5"
    assert main([str(grey), "--out", str(out), "--size", "32", "32"]) == 0
    assert inspect_dataset(out).sample_shape == (32, 32, 3)
    assert "written in" in capsys.readouterr().out
    assert main([str(grey), "--out", str(out), "--size", "32", "32"]) == 1
    assert "exists" in capsys.readouterr().err


def test_progress_lines_and_regression_files(grey: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    resize_dataset(grey, tmp_path / "p.h5", (4, 4), progress=True)
    assert "resize: 42/42 images (100%)" in capsys.readouterr().err
    resize_dataset(grey, tmp_path / "q.h5", (4, 4))  # library default: no progress lines
    assert capsys.readouterr().err == ""
    images = tmp_path / "reg.h5"  # image regression: targets are copied unchanged
    x, _ = _split(6, (5, 5, 1), 3)
    y = np.linspace(0, 1, 12).reshape(6, 2)
    write_dataset(images, {"train": (x, y)}, source="t")
    resize_dataset(images, tmp_path / "reg8.h5", (8, 8), channels=None)
    info = inspect_dataset(tmp_path / "reg8.h5")
    assert info.task == "regression" and info.target_shape == (2,)
    np.testing.assert_array_equal(read_shard(tmp_path / "reg8.h5", "train", 0, 1).y, y)
    features = tmp_path / "f.h5"
    write_dataset(features, {"train": (np.zeros((3, 4), np.float32), np.zeros(3))}, source="t")
    with pytest.raises(DataError, match=r"samples of shape \(4,\) float32; only uint8 images"):
        resize_dataset(features, tmp_path / "f8.h5", (8, 8))
