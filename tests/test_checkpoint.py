"""Checkpoints: exact round trip, atomic writes, rotation, validation, failure paths.

Failures are provoked for real where the machine allows it (truncated files,
flipped bits, SIGKILL in the middle of a write, a file-size limit that makes
the kernel refuse the write, a read-only folder for an unprivileged user) and
by monkeypatching the one low-level write otherwise (a full disk).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import mpinewton
from mpinewton import checkpoint as C
from mpinewton.solvers.newton import NewtonState

SHA = "ab" * 32
TOML = '[run]\nname = "tést"\n\n[optimizer]\ndamping = 0.001\n'
DENSE = "sequential/dense/kernel"


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Keras-like ordered weights (names with '/'), float32 like a real model."""
    rng = np.random.default_rng(seed)
    return {
        "sequential/conv2d/kernel": rng.standard_normal((3, 3, 1, 4)).astype(np.float32),
        "sequential/conv2d/bias": np.zeros(4, np.float32),
        DENSE: rng.standard_normal((16, 10)).astype(np.float32),
        "sequential/dense/bias": np.array([-0.0, 1e-45, 3.4e38, 0, 0, 0, 0, 0, 0, 1], np.float32),
    }


def state(seed: int = 0) -> dict:
    warm = np.random.default_rng(seed).standard_normal(20).astype(np.float32)
    newton = NewtonState(iteration=seed, cg_warm=warm, total_cg_iters=7, fallbacks=1)
    return {"newton": newton.to_dict(), "progress": {"wall_time": 1.25, "hvps": 9}}


def write(folder: Path, iteration: int, *, seed: int | None = None, keep: int = 3, **kw) -> Path:
    seed = iteration if seed is None else seed
    kw.setdefault("weights", weights(seed))
    kw.setdefault("state", state(seed))
    return C.write_checkpoint(
        folder,
        iteration=iteration,
        config_toml=kw.pop("config_toml", TOML),
        config_sha256=SHA,
        world_size=kw.pop("world_size", 4),
        keep=keep,
        **kw,
    )


def spec() -> C.ModelSpec:
    return C.ModelSpec.of_arrays(weights())


def latest(folder: Path) -> str:
    return (folder / "latest").read_text().strip()


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def checkpoint_names(folder: Path) -> list[str]:
    return [p.name for p in C.list_checkpoints(folder)]


def assert_identical(a, b, where: str = "value") -> None:
    """Same type, same keys in the same order, same bits (NaN payloads and -0.0 included)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), where
    else:
        assert a == b, where


def reference_sha256(arr: np.ndarray) -> str:
    """The documented dataset checksum, implemented independently of the module."""
    header = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape)}, sort_keys=True)
    return hashlib.sha256(header.encode() + arr.tobytes()).hexdigest()


def flip_bit(path: Path, dataset: str, byte: int = 5, bit: int = 3) -> None:
    """Flip one bit inside the raw data of a contiguous dataset, bypassing HDF5."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        assert ds.chunks is None and ds.compression is None
        offset = ds.id.get_offset()
        assert offset is not None and byte < ds.id.get_storage_size()
    with open(path, "r+b") as fh:
        fh.seek(offset + byte)
        value = fh.read(1)[0]
        fh.seek(offset + byte)
        fh.write(bytes([value ^ (1 << bit)]))


def run_python(code: str, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_exact(tmp_path):
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_0123))[0]
    w = weights(3)
    w["extra/float64"] = np.array([[5e-324, -0.0], [np.pi, -1e308]])
    w["extra/int8_counter"] = np.array([-128, 0, 127], np.int8)
    w["extra/scalar"] = np.array(0.5, np.float32)
    w["extra/empty"] = np.zeros((0, 3), np.float32)
    w["extra/fortran"] = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    s = state(3)
    s["edge"] = {
        "none": None,
        "true": True,
        "false": False,
        "zero": 0,
        "negative": -(2**63),
        "huge": 2**80 + 1,
        "minus_zero": -0.0,
        "inf": float("inf"),
        "minus_inf": float("-inf"),
        "nan_payload": nan_payload,
        "tiny": 5e-324,
        "text": "Newton–CG ü \x00 end",
        "empty_text": "",
        "empty_dict": {},
        "deep": {"deeper": {"deepest": np.arange(3, dtype=np.uint16)}},
        "bools": np.array([True, False, True]),
        "complex": np.array([1 + 2j, -0.0 - 1j], np.complex64),
        "zero_d": np.array(7, np.int32),
        "empty_array": np.empty((2, 0), np.float64),
        "nan_array": np.array([np.nan, np.inf, -np.inf]),
        "np_float32": np.float32(1.5),
        "np_int64": np.int64(-3),
        "np_bool": np.bool_(True),
    }
    path = write(tmp_path, 12, weights=w, state=s, world_size=28)

    assert path == tmp_path / "ckpt-00000012.h5"
    ck = C.load_checkpoint(path, expected=C.ModelSpec.of_arrays(w))
    assert ck.path == path
    assert ck.iteration == 12 and ck.world_size == 28
    assert ck.config_toml == TOML and ck.config_sha256 == SHA
    assert ck.version == mpinewton.__version__ and ck.format_version == C.FORMAT_VERSION == 1
    assert ck.spec == C.ModelSpec.of_arrays(w)
    assert list(ck.weights) == list(w)  # the model's order, which the driver relies on
    for name, arr in w.items():
        assert_identical(np.asarray(arr, order="C"), ck.weights[name], name)
    assert_identical(s, ck.state, "state")
    assert NewtonState.from_dict(ck.state["newton"]) == NewtonState.from_dict(s["newton"])


def test_special_names_round_trip_and_are_escaped_on_disk(tmp_path):
    w = {
        name: np.full(2, i, np.float64)
        for i, name in enumerate(["a/b", "a%2Fb", "a", "a/b/c", ".hidden", "%", "ü/ß", "."])
    }
    s = {"a/b": 1, ".dot": 2, "%2F": 3, "nested/key": {"x/y": None}}
    path = write(tmp_path, 1, weights=w, state=s)
    ck = C.load_checkpoint(path)
    assert list(ck.weights) == list(w)
    for name, arr in w.items():
        assert_identical(arr, ck.weights[name], name)
    assert_identical(s, ck.state)
    with h5py.File(path, "r") as f:
        assert set(f["weights"]) == {
            "a%2Fb",
            "a%252Fb",
            "a",
            "a%2Fb%2Fc",
            "%2Ehidden",
            "%25",
            "ü%2Fß",
            "%2E",
        }
        assert set(f["state"]) == {"a%2Fb", "%2Edot", "%252F", "nested%2Fkey"}


def test_layout_on_disk_matches_the_documented_format(tmp_path):
    path = write(tmp_path, 5)
    w = weights(5)
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        assert attrs["format"] == "mpinewton-checkpoint"
        assert attrs["format_version"] == 1
        assert attrs["iteration"] == 5 and attrs["world_size"] == 4
        assert attrs["mpinewton_version"] == mpinewton.__version__
        assert attrs["config_sha256"] == SHA
        entries = [[n, list(a.shape), a.dtype.name] for n, a in w.items()]
        blob = json.dumps(entries, separators=(",", ":")).encode()
        assert attrs["model_fingerprint"] == hashlib.sha256(blob).hexdigest()
        assert attrs["model_fingerprint"] == spec().fingerprint()
        assert json.loads(bytes(f["model_variables"][()]).decode()) == entries
        assert bytes(f["config_toml"][()]).decode() == TOML
        assert list(f["weights"]) == [n.replace("/", "%2F") for n in w]  # creation order kept
        datasets = []
        f.visititems(
            lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None
        )
        assert len(datasets) >= 2 + len(w) + 3
        for ds in datasets:  # every dataset: contiguous, uncompressed, documented checksum
            assert ds.chunks is None and ds.compression is None, ds.name
            assert ds.attrs["sha256"] == reference_sha256(np.asarray(ds[()])), ds.name
        for name, arr in w.items():
            ds = f["weights"][name.replace("/", "%2F")]
            assert ds.dtype == arr.dtype and ds.shape == arr.shape
            assert ds.id.get_offset() is not None
        assert f["state/newton/cg_warm"].attrs["kind"] == "ndarray"
        assert f["state/newton/iteration"].attrs["kind"] == "int"
        assert f["state"].attrs["kind"] == "dict"


def test_model_spec_normalises_and_fingerprints():
    a = C.ModelSpec(names=("x", "y"), shapes=([2, 3], ()), dtypes=(np.float32, "float64"))
    b = C.ModelSpec(names=["x", "y"], shapes=((2, 3), []), dtypes=("float32", np.dtype("<f8")))
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.shapes == ((2, 3), ()) and a.dtypes == ("float32", "float64")
    assert (
        a.fingerprint()
        != C.ModelSpec(("x", "y"), ((3, 2), ()), ("float32", "float64")).fingerprint()
    )
    with pytest.raises(ValueError, match="twice"):
        C.ModelSpec(names=("x", "x"), shapes=((), ()), dtypes=("f4", "f4"))
    with pytest.raises(ValueError, match="2 names, 1 shapes"):
        C.ModelSpec(names=("x", "y"), shapes=((),), dtypes=("f4", "f4"))


# --------------------------------------------------------------------------- rotation


def test_keep_last_n_and_latest_pointer(tmp_path):
    folder = tmp_path / "run" / "checkpoints"  # created on demand
    for it in range(1, 6):
        path = write(folder, it, keep=3)
        assert latest(folder) == path.name
        assert checkpoint_names(folder)[-1] == path.name
        assert len(checkpoint_names(folder)) == min(it, 3)
    assert checkpoint_names(folder) == [f"ckpt-{i:08d}.h5" for i in (3, 4, 5)]
    assert temporaries(folder) == []
    write(folder, 6, keep=1)
    assert checkpoint_names(folder) == ["ckpt-00000006.h5"] and latest(folder) == "ckpt-00000006.h5"
    found, messages = C.find_latest_valid(folder, expected=spec())
    assert messages == [] and found is not None and found.iteration == 6


def test_rewriting_an_iteration_replaces_it(tmp_path):
    write(tmp_path, 2, seed=1)
    write(tmp_path, 2, seed=2)
    assert (
        checkpoint_names(tmp_path) == ["ckpt-00000002.h5"]
        and latest(tmp_path) == "ckpt-00000002.h5"
    )
    ck = C.load_checkpoint(tmp_path / "ckpt-00000002.h5")
    assert_identical(weights(2)[DENSE], ck.weights[DENSE])


def test_rotation_leaves_checkpoints_of_a_later_abandoned_run_alone(tmp_path):
    # A run resumed from iteration 4 writes 5: the old 9 (its abandoned future) stays, 5 is latest.
    for it in (3, 4, 9):
        write(tmp_path, it, keep=5)
    write(tmp_path, 5, keep=2)
    assert checkpoint_names(tmp_path) == [f"ckpt-{i:08d}.h5" for i in (4, 5, 9)]
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.iteration == 5 and messages == []


# --------------------------------------------------------------------------- validation


def test_truncated_checkpoint_is_skipped_for_the_older_one(tmp_path):
    write(tmp_path, 1)
    newest = write(tmp_path, 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with pytest.raises(C.CheckpointError, match="truncated") as info:
        C.load_checkpoint(newest)
    assert str(newest) in str(info.value) and info.value.path == newest
    found, messages = C.find_latest_valid(tmp_path, expected=spec())
    assert found is not None and found.iteration == 1
    assert_identical(weights(1)[DENSE], found.weights[DENSE])
    assert len(messages) == 1 and newest.name in messages[0] and "truncated" in messages[0]


@pytest.mark.parametrize(
    "dataset", ["weights/sequential%2Fdense%2Fkernel", "state/newton/cg_warm", "config_toml"]
)
def test_bit_flip_is_caught_by_the_checksum(tmp_path, dataset):
    write(tmp_path, 1)
    newest = write(tmp_path, 2)
    flip_bit(newest, dataset)
    with h5py.File(newest, "r") as f:  # HDF5 itself reads the damaged data without complaint
        f[dataset][()]

    with pytest.raises(C.CheckpointError, match="checksum mismatch") as info:
        C.load_checkpoint(newest)
    assert str(newest) in str(info.value) and "/" + dataset in str(info.value)
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.iteration == 1
    assert len(messages) == 1 and "checksum mismatch" in messages[0]


def test_tampered_root_attribute_is_caught(tmp_path):
    path = write(tmp_path, 3)
    with h5py.File(path, "r+") as f:
        f.attrs["iteration"] = 4
    with pytest.raises(C.CheckpointError, match="root attributes"):
        C.load_checkpoint(path)


def test_nan_weight_is_refused_on_load_even_with_a_matching_checksum(tmp_path):
    write(tmp_path, 1)
    newest = write(tmp_path, 2)
    with h5py.File(newest, "r+") as f:
        ds = f["weights/sequential%2Fdense%2Fkernel"]
        arr = ds[()]
        arr[3, 7] = np.nan
        ds[...] = arr
    with pytest.raises(C.CheckpointError, match="checksum mismatch"):  # checked first
        C.load_checkpoint(newest)
    with h5py.File(newest, "r+") as f:  # forge the checksum: now only the NaN check can object
        ds = f["weights/sequential%2Fdense%2Fkernel"]
        ds.attrs["sha256"] = reference_sha256(ds[()])

    with pytest.raises(
        C.CheckpointError, match=r"NaN/Inf value\(s\) \(first at index \(3, 7\)\)"
    ) as info:
        C.load_checkpoint(newest)
    assert DENSE in str(info.value) and str(newest) in str(info.value)
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.iteration == 1 and "NaN/Inf" in messages[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_are_never_written(tmp_path, bad):
    write(tmp_path, 1)
    w = weights(2)
    w["sequential/conv2d/bias"][2] = bad
    with pytest.raises(C.CheckpointError, match="NaN/Inf") as info:
        write(tmp_path, 2, weights=w)
    assert "ckpt-00000002.h5" in str(info.value) and "sequential/conv2d/bias" in str(info.value)
    assert (
        checkpoint_names(tmp_path) == ["ckpt-00000001.h5"]
        and latest(tmp_path) == "ckpt-00000001.h5"
    )
    assert temporaries(tmp_path) == []


def test_wrong_model_names_the_first_mismatching_variable(tmp_path):
    path = write(tmp_path, 1)
    w = weights()
    names, shapes, dtypes = list(w), [a.shape for a in w.values()], ["float32"] * 4

    wrong_shape = C.ModelSpec(names, [*shapes[:2], (16, 12), (12,)], dtypes)
    with pytest.raises(C.CheckpointError, match="does not fit the model") as info:
        C.load_checkpoint(path, expected=wrong_shape)
    msg = str(info.value)
    assert str(path) in msg and f"variable 2 '{DENSE}'" in msg
    assert "(16, 10) float32 in the checkpoint but (16, 12) float32 in the model" in msg

    wrong_dtype = C.ModelSpec(names, shapes, ["float64"] * 4)
    with pytest.raises(C.CheckpointError, match="variable 0 'sequential/conv2d/kernel'"):
        C.load_checkpoint(path, expected=wrong_dtype)

    renamed = C.ModelSpec([*names[:1], "other/bias", *names[2:]], shapes, dtypes)
    with pytest.raises(C.CheckpointError) as info:
        C.load_checkpoint(path, expected=renamed)
    assert "variable 1 is 'sequential/conv2d/bias' (4,) float32 in the checkpoint" in str(
        info.value
    )
    assert "but 'other/bias' (4,) float32 in the model" in str(info.value)

    bigger = C.ModelSpec([*names, "head/kernel"], [*shapes, (10, 2)], [*dtypes, "float32"])
    with pytest.raises(
        C.CheckpointError, match="4 variables, the model 5; first missing: variable 4 'head/kernel'"
    ):
        C.load_checkpoint(path, expected=bigger)
    smaller = C.ModelSpec(names[:3], shapes[:3], dtypes[:3])
    with pytest.raises(C.CheckpointError, match="first extra: variable 3 'sequential/dense/bias'"):
        C.load_checkpoint(path, expected=smaller)

    found, messages = C.find_latest_valid(tmp_path, expected=wrong_shape)
    assert found is None and len(messages) == 1 and DENSE in messages[0]


def test_newer_format_version_is_refused(tmp_path):
    path = write(tmp_path, 1)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(C.CheckpointError, match="format version 2, newer than the 1") as info:
        C.load_checkpoint(path)
    assert str(path) in str(info.value) and "upgrade mpinewton" in str(info.value)


def test_other_files_are_refused_with_the_reason(tmp_path):
    other = tmp_path / "ckpt-00000001.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(C.CheckpointError, match="not an mpinewton checkpoint"):
        C.load_checkpoint(other)
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_checkpoint(tmp_path / "ckpt-00000099.h5")
    with pytest.raises(C.CheckpointError, match="not a regular file"):
        C.load_checkpoint(tmp_path)
    (tmp_path / "ckpt-00000002.h5").write_text("not hdf5")
    with pytest.raises(C.CheckpointError, match="cannot be opened as HDF5"):
        C.load_checkpoint(tmp_path / "ckpt-00000002.h5")


def test_find_latest_valid_handles_bad_or_missing_pointers(tmp_path):
    assert C.find_latest_valid(tmp_path / "missing") == (None, [])
    assert C.find_latest_valid(tmp_path) == (None, [])
    write(tmp_path, 1)
    write(tmp_path, 2)

    (tmp_path / "latest").write_text("../../etc/passwd\n")
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.iteration == 2
    assert len(messages) == 1 and "does not hold a checkpoint file name" in messages[0]

    (tmp_path / "latest").write_text("ckpt-00000007.h5\n")
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.iteration == 2
    assert messages == [
        f"pointer {tmp_path / 'latest'} names ckpt-00000007.h5, which does not exist"
    ]

    (tmp_path / "latest").write_text("ckpt-00000001.h5\n")  # the pointer wins over newer files
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.iteration == 1 and messages == []

    (tmp_path / "latest").unlink()
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.iteration == 2 and messages == []


# --------------------------------------------------------------------------- crashes and I/O errors

KILL_SCRIPT = """
import os, sys, time
import numpy as np
from mpinewton import checkpoint as C

folder, marker, stage = sys.argv[1], sys.argv[2], sys.argv[3]
real = C._write_all

def stalling(fd, data):
    is_pointer = len(data) < 64
    if is_pointer == (stage == "pointer"):
        real(fd, data[: len(data) // 2])
        os.fsync(fd)
        open(marker, "w").close()
        time.sleep(120)  # SIGKILLed here
    real(fd, data)

C._write_all = stalling
rng = np.random.default_rng(0)
C.write_checkpoint(
    folder, iteration=2, weights={"w": rng.standard_normal(50_000)}, state={"step": 2},
    config_toml="", config_sha256="0" * 64, world_size=1,
)
"""


@pytest.mark.parametrize("stage", ["data", "pointer"])
def test_killed_mid_write_leaves_the_previous_checkpoint(tmp_path, stage):
    first = C.write_checkpoint(
        tmp_path,
        iteration=1,
        weights={"w": np.ones(50_000)},
        state={"step": 1},
        config_toml="",
        config_sha256="0" * 64,
        world_size=1,
    )
    marker = tmp_path.parent / f"{tmp_path.name}.marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(marker), stage],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the writer never reached the stalling write"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    left = temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(
        ".ckpt-00000002.h5." if stage == "data" else ".latest."
    )
    assert latest(tmp_path) == first.name  # the pointer is never half-written
    found, messages = C.find_latest_valid(tmp_path)
    assert found is not None and found.path == first and messages == []
    assert found.state == {"step": 1}
    if stage == "data":
        assert checkpoint_names(tmp_path) == [first.name]
    else:  # committed but never pointed at: complete and valid, just not chosen
        assert C.load_checkpoint(tmp_path / "ckpt-00000002.h5").state == {"step": 2}

    removed = C.cleanup_temporaries(tmp_path)
    assert [p.name for p in removed] == left and temporaries(tmp_path) == []
    write(tmp_path, 3)  # and writing goes on
    assert latest(tmp_path) == "ckpt-00000003.h5"


def _enospc(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("fail_on", ["data", "pointer"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_on):
    write(tmp_path, 1)
    real = C._write_all

    def full_disk(fd, data):
        if (len(data) < 64) == (fail_on == "pointer"):
            real(fd, data[: len(data) // 3])  # part of it reaches the disk, then it is full
            raise _enospc()
        real(fd, data)

    monkeypatch.setattr(C, "_write_all", full_disk)
    with pytest.raises(C.CheckpointError) as info:
        write(tmp_path, 2)
    msg = str(info.value)
    assert str(tmp_path / "ckpt-00000002.h5") in msg and "disk is full" in msg and "ENOSPC" in msg
    assert f"`latest` still names {tmp_path / 'ckpt-00000001.h5'}" in msg
    assert isinstance(info.value.__cause__, OSError)

    assert temporaries(tmp_path) == []
    assert checkpoint_names(tmp_path) == [
        "ckpt-00000001.h5"
    ]  # a committed-but-unpointed 2 is withdrawn
    assert latest(tmp_path) == "ckpt-00000001.h5"
    found, messages = C.find_latest_valid(tmp_path, expected=spec())
    assert found is not None and found.iteration == 1 and messages == []


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_failing_fsync_or_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch, call):
    write(tmp_path, 1)
    real = getattr(os, call)

    def failing(*args, **kwargs):
        target = args[1] if call == "replace" else os.readlink(f"/proc/self/fd/{args[0]}")
        if "ckpt-00000002" in str(target):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return real(*args, **kwargs)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell the checkpoint's fsync from others")
    monkeypatch.setattr(C.os, call, failing)
    with pytest.raises(C.CheckpointError, match="Input/output error"):
        write(tmp_path, 2)
    monkeypatch.undo()
    assert temporaries(tmp_path) == [] and checkpoint_names(tmp_path) == ["ckpt-00000001.h5"]
    assert latest(tmp_path) == "ckpt-00000001.h5" and C.load_checkpoint(
        tmp_path / "ckpt-00000001.h5"
    )


def test_a_real_write_error_from_the_kernel(tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the write with EFBIG, like a quota would."""
    pytest.importorskip("resource")
    write(tmp_path, 1)
    proc = run_python(
        """
        import resource, signal, sys
        import numpy as np
        from mpinewton import checkpoint as C
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            C.write_checkpoint(sys.argv[1], iteration=2, weights={"w": np.ones(100_000)},
                               state={}, config_toml="", config_sha256="0" * 64, world_size=1)
        except C.CheckpointError as e:
            print(e)
            sys.exit(3)
        """,
        str(tmp_path),
    )
    assert proc.returncode == 3, proc.stderr
    assert str(tmp_path / "ckpt-00000002.h5") in proc.stdout and "File too large" in proc.stdout
    assert temporaries(tmp_path) == [] and checkpoint_names(tmp_path) == ["ckpt-00000001.h5"]
    assert C.find_latest_valid(tmp_path)[0].iteration == 1


# --------------------------------------------------------------------------- bad paths


def test_folder_that_is_a_file(tmp_path):
    not_a_folder = tmp_path / "checkpoints"
    not_a_folder.write_text("oops")
    for call in (
        lambda: write(not_a_folder, 1),
        lambda: C.find_latest_valid(not_a_folder),
        lambda: C.cleanup_temporaries(not_a_folder),
    ):
        with pytest.raises(C.CheckpointError, match="exists and is not a directory") as info:
            call()
        assert str(not_a_folder) in str(info.value)
    run_dir_is_a_file = not_a_folder / "checkpoints"
    with pytest.raises(C.CheckpointError, match="cannot create checkpoint folder") as info:
        write(run_dir_is_a_file, 1)
    assert str(run_dir_is_a_file) in str(info.value) and "a parent path is a file" in str(
        info.value
    )
    assert not_a_folder.read_text() == "oops"


def test_no_write_permission_simulated(tmp_path, monkeypatch):
    """A denied create (what a read-only folder gives a normal user), on any machine."""
    write(tmp_path, 1)

    real_open = os.open

    def denied(path, flags, *args, **kwargs):  # the create of the new checkpoint's temp file
        if flags & os.O_CREAT and Path(path).name.startswith(".ckpt-00000002.h5."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(C.CheckpointError, match="no write permission") as info:
        write(tmp_path, 2)
    assert str(tmp_path / "ckpt-00000002.h5") in str(info.value)
    monkeypatch.undo()
    assert latest(tmp_path) == "ckpt-00000001.h5" and checkpoint_names(tmp_path) == [
        "ckpt-00000001.h5"
    ]


def _try_writes(folders: list[str]) -> list[str]:
    out = []
    for folder in folders:
        try:
            C.write_checkpoint(
                folder,
                iteration=2,
                weights={"w": np.ones(3)},
                state={},
                config_toml="",
                config_sha256="0" * 64,
                world_size=1,
            )
            out.append(f"WROTE {folder}")
        except C.CheckpointError as e:
            out.append(str(e))
    return out


def _as_nobody(folders: list[str]) -> list[str]:
    """Run :func:`_try_writes` in a forked child that dropped root for user ``nobody``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = json.dumps(_try_writes(folders))
        except BaseException as e:
            result = json.dumps({"error": repr(e)})
        finally:
            try:
                with os.fdopen(w, "w") as fh:
                    fh.write(result)
            except BaseException:
                code = 1
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    if isinstance(result, dict):
        pytest.skip(f"root ignores permissions and cannot become user nobody: {result['error']}")
    return result


def test_no_write_permission_real(tmp_path):
    """A read-only folder and a read-only run directory, enforced by the kernel.

    Root ignores permissions, so as root the writes run in a forked child
    that became user ``nobody``, in a world-readable scratch folder.
    """
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="mpinewton-perm-")) if as_root else tmp_path
    folder, run_dir = base / "checkpoints", base / "run"
    try:
        base.chmod(0o755)
        write(folder, 1)
        run_dir.mkdir()
        for p in (folder, run_dir):
            p.chmod(0o555)
        if not as_root and os.access(folder, os.W_OK):
            pytest.skip("this user ignores permissions (e.g. CAP_DAC_OVERRIDE)")
        args = [str(folder), str(run_dir / "checkpoints")]
        lines = _as_nobody(args) if as_root else _try_writes(args)
        assert len(lines) == 2 and not any(line.startswith("WROTE") for line in lines), lines
        assert str(folder / "ckpt-00000002.h5") in lines[0] and "no write permission" in lines[0]
        assert (
            str(run_dir / "checkpoints") in lines[1]
            and "cannot create checkpoint folder" in lines[1]
        )
        assert "Permission denied" in lines[1]
        assert temporaries(folder) == [] and checkpoint_names(folder) == ["ckpt-00000001.h5"]
        assert (
            latest(folder) == "ckpt-00000001.h5" and C.find_latest_valid(folder)[0].iteration == 1
        )
    finally:
        for p in (folder, run_dir):
            if p.exists():
                p.chmod(0o755)
        if as_root:
            shutil.rmtree(base)


def test_cleanup_temporaries_removes_only_leftovers(tmp_path):
    assert C.cleanup_temporaries(tmp_path / "missing") == []
    write(tmp_path, 1)
    leftovers = [tmp_path / ".ckpt-00000002.h5.k3j2.tmp", tmp_path / ".latest.x9.tmp"]
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "ckpt-00000003.h5.tmp"]
    for p in leftovers + keep:
        p.write_bytes(b"partial")
    (tmp_path / ".dir.tmp").mkdir()
    removed = C.cleanup_temporaries(tmp_path)
    assert sorted(removed) == sorted(leftovers)
    assert all(not p.exists() for p in leftovers) and all(p.exists() for p in keep)
    assert (tmp_path / ".dir.tmp").is_dir() and latest(tmp_path) == "ckpt-00000001.h5"
    assert C.cleanup_temporaries(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"iteration": -1}, "iteration must be an integer >= 0"),
        ({"keep": 0}, "keep must be an integer >= 1"),
        ({"world_size": 0}, "world_size must be an integer >= 1"),
        ({"config_sha256": "xyz"}, "config_sha256 must be 64 lowercase hex digits"),
        ({"state": {"newton": {"history": [1, 2]}}}, r"state\['newton'\]\['history'\]: type list"),
        ({"state": {"a": np.array(["x"], dtype=object)}}, r"state\['a'\]: numpy dtype object"),
        ({"state": {1: 2}}, "keys must be non-empty UTF-8 strings, got 1"),
        ({"weights": {"": np.zeros(2)}}, "variable names must be non-empty UTF-8 strings"),
        ({"weights": {"w": np.array(["a"])}}, "variable 'w' has unsupported dtype"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, change, match):
    kwargs = {
        "iteration": 1,
        "weights": weights(),
        "state": state(),
        "config_toml": TOML,
        "config_sha256": SHA,
        "world_size": 1,
        "keep": 3,
        **change,
    }
    with pytest.raises(C.CheckpointError, match=match):
        C.write_checkpoint(tmp_path / "ck", **kwargs)
    assert not (tmp_path / "ck").exists()


def test_module_imports_neither_tensorflow_nor_mpi():
    proc = run_python(
        """
        import sys
        import mpinewton.checkpoint
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "mpi4py"))
        print(bad)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
