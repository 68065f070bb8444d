"""The one atomic write (mpinewton.durable): content, crash safety, modes, temp names, h5py."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinewton import checkpoint
from mpinewton import durable as D


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if D.is_temp_name(p.name))


class Boom(Exception):
    pass


def test_writers_write_the_content(tmp_path):
    D.atomic_write_text(tmp_path / "a.txt", "grüße\nline 2\n")
    assert (tmp_path / "a.txt").read_bytes() == "grüße\nline 2\n".encode()
    D.atomic_write_bytes(tmp_path / "b.bin", bytes(range(256)) * 3)
    assert (tmp_path / "b.bin").read_bytes() == bytes(range(256)) * 3
    with D.atomic_open(tmp_path / "c.json", "w", encoding="utf-8") as f:
        f.write("{")
        f.write('"k": 1}')
        assert not (tmp_path / "c.json").exists()  # nothing visible before the commit
    assert (tmp_path / "c.json").read_text() == '{"k": 1}'
    D.atomic_write_text(tmp_path / "a.txt", "new")  # replaces an existing file
    assert (tmp_path / "a.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_open_refuses_read_and_append_modes(tmp_path):
    for mode in ("r", "a", "w+", "ab", "x"):
        with (
            pytest.raises(ValueError, match="mode must be 'w' or 'wb'"),
            D.atomic_open(tmp_path / "f", mode),
        ):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["open", "path"])
def test_exception_inside_leaves_the_old_file_and_no_temp(tmp_path, how):
    target = tmp_path / "data.txt"
    target.write_text("old")
    with pytest.raises(Boom):
        if how == "open":
            with D.atomic_open(target, "w") as f:
                f.write("half of the new")
                raise Boom
        else:
            with D.atomic_path(target) as tmp:
                tmp.write_text("half of the new")
                raise Boom
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_exception_inside_without_an_old_file_creates_nothing(tmp_path):
    with pytest.raises(Boom), D.atomic_open(tmp_path / "new.bin", "wb") as f:
        f.write(b"x")
        raise Boom
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["bytes", "text", "path", "commit"])
def test_crash_before_the_replace_keeps_the_old_content(tmp_path, monkeypatch, how):
    """The temp file is written and fsynced, then the rename fails (as a crash would stop it)."""
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    seen: list[tuple[str, bytes]] = []

    def failing_replace(src, dst):
        seen.append((Path(src).name, Path(src).read_bytes()))  # complete temp, beside the target
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))

    monkeypatch.setattr(D.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        if how == "bytes":
            D.atomic_write_bytes(target, b"new")
        elif how == "text":
            D.atomic_write_text(target, "new")
        elif how == "path":
            with D.atomic_path(target) as tmp:
                tmp.write_bytes(b"new")
        else:
            tmp = D.temp_path(target)
            tmp.write_bytes(b"new")
            try:
                D.commit(tmp, target)
            finally:
                assert tmp.read_bytes() == b"new"  # commit leaves its temp to its caller
                tmp.unlink()
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0][1] == b"new" and seen[0][0].startswith(".data.bin.")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_every_byte_is_fsynced_before_the_replace(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(src).name} -> {Path(dst).name}")
        return real_replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name the fsynced files")
    monkeypatch.setattr(D.os, "fsync", fsync)
    monkeypatch.setattr(D.os, "replace", replace)
    D.atomic_write_bytes(tmp_path / "f.bin", b"abc")
    monkeypatch.undo()
    assert len(events) == 3, events
    assert events[0].startswith(f"fsync {tmp_path}/.f.bin.") and events[0].endswith(".tmp")
    assert events[1].startswith("replace .f.bin.") and events[1].endswith(".tmp -> f.bin")
    assert events[2] == f"fsync {tmp_path}"  # the folder, so the rename itself is durable


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_mode_0666_less_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        D.atomic_write_bytes(tmp_path / "a", b"x")
        with D.atomic_open(tmp_path / "b", "w") as f:
            f.write("x")
        with D.atomic_path(tmp_path / "c") as tmp, h5py.File(tmp, "w") as f:
            f["x"] = np.arange(3)
    finally:
        os.umask(old)
    for name in "abc":
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_default_mode_follows_the_current_umask(tmp_path):
    D.atomic_write_text(tmp_path / "f", "x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~umask()


def test_temp_names(tmp_path):
    names = {D.temp_path(tmp_path / "ckpt-00000001.h5") for _ in range(200)}
    assert len(names) == 200  # fresh every time
    for p in names:
        assert p.parent == tmp_path
        assert p.name.startswith(".ckpt-00000001.h5.") and p.name.endswith(D.TEMP_SUFFIX)
        assert D.is_temp_name(p.name)
        assert not p.exists()  # a name only
    assert D.temp_path("latest").parent == Path(".")
    for name in [".latest.x9.tmp", ".a.b.c.tmp", ".x.tmp"]:
        assert D.is_temp_name(name), name
    for name in [
        "ckpt-00000001.h5",
        "notes.tmp",
        "ckpt-00000003.h5.tmp",
        ".hidden",
        ".tmp",
        ".x.tmp.bak",
        "x.y.tmp",
        ".x.TMP",
    ]:
        assert not D.is_temp_name(name), name


def test_cleanup_removes_exactly_the_temp_names(tmp_path):
    """checkpoint.cleanup_temporaries removes what a killed atomic write leaves, nothing else."""
    left = D.temp_path(tmp_path / "ckpt-00000002.h5")
    left.write_bytes(b"partial")
    keep = ["ckpt-00000001.h5", "notes.tmp", ".hidden"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    assert checkpoint.cleanup_temporaries(tmp_path) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_atomic_path_with_h5py(tmp_path):
    target = tmp_path / "weights.h5"
    with D.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and D.is_temp_name(tmp.name) and not tmp.exists()
        with h5py.File(tmp, "w") as f:
            f["w"] = np.arange(6.0).reshape(2, 3)
        assert not target.exists()
    with h5py.File(target, "r") as f:
        np.testing.assert_array_equal(f["w"][()], np.arange(6.0).reshape(2, 3))

    with pytest.raises(Boom), D.atomic_path(target) as tmp:  # a failed rewrite
        with h5py.File(tmp, "w") as f:
            f["w"] = np.zeros(1)
        raise Boom
    with h5py.File(target, "r") as f:
        assert f["w"].shape == (2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.h5"]


def test_atomic_path_without_a_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError), D.atomic_path(tmp_path / "never.h5"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_an_error_like_open(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.atomic_write_text(tmp_path / "no" / "such" / "f.txt", "x")
    assert list(tmp_path.iterdir()) == []
