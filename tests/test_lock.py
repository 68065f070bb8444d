"""Run-directory lock (mpinewton.train.lock): taking, refusing, stale takeover, heartbeat."""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpinewton.config import ConfigError
from mpinewton.train import lock as lockmod
from mpinewton.train.lock import LOCK_NAME, RunDirLock, RunDirLocked, RunDirLockLost, read_holder

HOST = socket.gethostname()

# A holder in a separate process. lock.py is loaded by path so that the child does not
# import the whole training driver (mpinewton/train/__init__.py).
CHILD = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("lock_under_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.RunDirLock(Path(sys.argv[2])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "MPINEWTON_LOCK_STALE_SECONDS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def child_holder(tmp_path):
    """Start a process that holds the lock on tmp_path/run; yields (Popen, run dir)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, lockmod.__file__, str(run)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert (run / LOCK_NAME).exists()
        yield proc, run
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def write_lock(directory: Path, *, age: float = 0.0, **fields) -> dict:
    """A hand-written lock record (other host by default), its mtime `age` seconds old."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "host": "othernode17",
        "pid": 4711,
        "start_time": 123,
        "boot_id": "not-this-boot",
        "token": secrets.token_hex(16),
        "time": time.time() - age,
        "slurm_job_id": None,
        "slurm_restart_count": None,
        "command": "python -m mpinewton.train job.toml",
    }
    record.update(fields)
    path = directory / LOCK_NAME
    path.write_text(json.dumps(record))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return record


def assert_ours(lock: RunDirLock) -> None:
    holder = read_holder(lock.directory)
    assert holder is not None
    assert holder["pid"] == os.getpid() and holder["host"] == HOST
    assert holder["token"] == lock._token
    assert sorted(p.name for p in lock.directory.iterdir() if p.name.startswith(".lock")) == [
        LOCK_NAME
    ]


def test_acquire_writes_record_and_release_removes_it(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    assert read_holder(run) is None
    lock = RunDirLock(run)
    assert not lock.held
    lock.acquire()
    assert lock.held
    holder = json.loads((run / LOCK_NAME).read_text())
    assert holder["host"] == HOST and holder["pid"] == os.getpid()
    assert isinstance(holder["token"], str) and len(holder["token"]) >= 16
    assert holder == read_holder(run)
    assert abs(holder["time"] - time.time()) < 60
    if sys.platform.startswith("linux"):
        assert holder["start_time"] == lockmod._proc_start_time(os.getpid()) is not None
        assert holder["boot_id"]
    lock.check()
    assert_ours(lock)
    lock.release()
    assert not lock.held
    assert not (run / LOCK_NAME).exists()
    lock.release()  # idempotent
    assert read_holder(run) is None
    assert not [t for t in threading.enumerate() if t.name.startswith("mpinewton-lock")]


def test_context_manager_and_record_of_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "987")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with RunDirLock(tmp_path) as lock:
        assert lock.held
        holder = read_holder(tmp_path)
        assert holder["slurm_job_id"] == "987" and holder["slurm_restart_count"] == "2"
    assert not lock.held
    assert read_holder(tmp_path) is None


def test_second_lock_in_same_process_is_refused(tmp_path):
    with RunDirLock(tmp_path) as first:
        token = read_holder(tmp_path)["token"]
        with pytest.raises(RunDirLocked) as info:
            RunDirLock(tmp_path).acquire()
        assert isinstance(info.value, ConfigError)
        msg = str(info.value)
        assert f"host {HOST}" in msg and f"pid {os.getpid()}" in msg
        assert str(tmp_path / LOCK_NAME) in msg and "--run-dir" in msg
        assert read_holder(tmp_path)["token"] == token
        assert first.held


def test_live_process_holds_lock(child_holder):
    proc, run = child_holder
    say = []
    with pytest.raises(RunDirLocked) as info:
        RunDirLock(run, say=say.append).acquire()
    msg = str(info.value)
    assert f"host {HOST}" in msg and f"pid {proc.pid}" in msg and "holding it since" in msg
    assert read_holder(run)["pid"] == proc.pid
    assert say == []


def test_lock_of_killed_process_is_taken_over(child_holder):
    proc, run = child_holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    say = []
    with RunDirLock(run, say=say.append) as lock:
        assert_ours(lock)
    assert len(say) == 1 and f"pid {proc.pid}" in say[0] and "no longer exists" in say[0]


def test_pid_reuse_is_stale(tmp_path):
    if lockmod._proc_start_time(os.getppid()) is None:
        pytest.skip("needs /proc/<pid>/stat")
    ppid = os.getppid()
    real = lockmod._proc_start_time(ppid)
    boot = lockmod._boot_id()
    write_lock(tmp_path, host=HOST, pid=ppid, start_time=real, boot_id=boot)
    with pytest.raises(RunDirLocked, match=f"pid {ppid}"):
        RunDirLock(tmp_path).acquire()  # same start time: the holder is alive
    write_lock(tmp_path, host=HOST, pid=ppid, start_time=real + 1, boot_id=boot)
    say = []
    with RunDirLock(tmp_path, say=say.append) as lock:
        assert_ours(lock)
    assert "another process" in say[0] and f"pid {ppid}" in say[0]


def test_lock_of_a_zombie_is_taken_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)  # exited, not reaped: a zombie, os.kill(pid, 0) still succeeds
    try:
        write_lock(tmp_path, host=HOST, pid=child.pid,
                   start_time=lockmod._proc_start_time(child.pid), boot_id=lockmod._boot_id())
        say = []
        with RunDirLock(tmp_path, say=say.append) as lock:
            assert_ours(lock)
        assert f"pid {child.pid}" in say[0]
    finally:
        child.wait()


def test_same_host_other_boot_is_stale(tmp_path):
    if lockmod._boot_id() is None:
        pytest.skip("needs a boot id")
    write_lock(tmp_path, host=HOST, pid=os.getppid(), start_time=None, boot_id="other-boot")
    say = []
    with RunDirLock(tmp_path, say=say.append) as lock:
        assert_ours(lock)
    assert "rebooted" in say[0]


def test_other_host_fresh_is_refused_old_is_taken_over(tmp_path):
    write_lock(tmp_path, slurm_job_id="123")
    with pytest.raises(RunDirLocked) as info:
        RunDirLock(tmp_path).acquire()
    msg = str(info.value)
    assert "host othernode17, pid 4711 (SLURM job 123)" in msg
    assert "python -m mpinewton.train job.toml" in msg

    write_lock(tmp_path, age=1000)
    say = []
    with RunDirLock(tmp_path, say=say.append) as lock:
        assert_ours(lock)
    assert "othernode17" in say[0] and "pid 4711" in say[0] and "not refreshed" in say[0]

    # A shorter stale_after makes a 100 s old lock stale; the default 300 s does not.
    write_lock(tmp_path, age=100)
    with pytest.raises(RunDirLocked):
        RunDirLock(tmp_path).acquire()
    with RunDirLock(tmp_path, stale_after=50, heartbeat=1) as lock:
        assert_ours(lock)


def test_server_clock_is_used(tmp_path, monkeypatch):
    # The local clock runs an hour ahead; the lock is fresh by the file server's clock.
    write_lock(tmp_path)
    real_time = time.time
    monkeypatch.setattr(lockmod.time, "time", lambda: real_time() + 3600)
    with pytest.raises(RunDirLocked):
        RunDirLock(tmp_path).acquire()
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # probe removed


def test_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    write_lock(tmp_path, slurm_job_id="556")
    with pytest.raises(RunDirLocked, match="SLURM job 556"):
        RunDirLock(tmp_path).acquire()
    write_lock(tmp_path, slurm_job_id="555")
    say = []
    with RunDirLock(tmp_path, say=say.append) as lock:
        assert_ours(lock)
    assert "SLURM job 555" in say[0] and "requeued" in say[0]


def test_same_slurm_job_same_process_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    with RunDirLock(tmp_path), pytest.raises(RuntimeError, match="already holds"):
        RunDirLock(tmp_path).acquire()


@pytest.mark.parametrize("content", ["", "{not json", '{"token": 5}', "[1, 2]"])
def test_unreadable_lock(tmp_path, content):
    path = tmp_path / LOCK_NAME
    path.write_text(content)
    assert read_holder(tmp_path) == {}
    with pytest.raises(RunDirLocked, match="unknown holder"):
        RunDirLock(tmp_path).acquire()
    assert path.read_text() == content
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    say = []
    with RunDirLock(tmp_path, say=say.append) as lock:
        assert_ours(lock)
    assert "unknown holder" in say[0]


def test_losing_the_rename_race_retries(tmp_path, monkeypatch):
    # Another contender's rename of the stale lock came first (it then died).
    write_lock(tmp_path, age=1000)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            real_rename(src, Path(str(dst) + "-other"))
            os.unlink(Path(str(dst) + "-other"))
            raise FileNotFoundError(errno.ENOENT, "gone", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(lockmod.os, "rename", rename)
    with RunDirLock(tmp_path) as lock:
        assert_ours(lock)
    assert len(calls) == 1  # the retry found no lock and created one


def test_rename_fails_once_then_takeover(tmp_path, monkeypatch):
    write_lock(tmp_path, age=1000)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise FileNotFoundError(errno.ENOENT, "gone", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(lockmod.os, "rename", rename)
    say = []
    with RunDirLock(tmp_path, say=say.append) as lock:
        assert_ours(lock)
    assert len(calls) == 2 and len(say) == 1


def test_contender_that_won_is_respected(tmp_path, monkeypatch):
    # Between our staleness check and our rename, another contender replaced the stale
    # lock by its own fresh one: we must put it back and refuse, not steal it.
    write_lock(tmp_path, age=1000)
    real_rename = os.rename
    winner = {}

    def rename(src, dst):
        if not winner:
            (tmp_path / LOCK_NAME).unlink()
            winner.update(write_lock(tmp_path, host="winnernode", pid=99))
        return real_rename(src, dst)

    monkeypatch.setattr(lockmod.os, "rename", rename)
    with pytest.raises(RunDirLocked, match="host winnernode, pid 99"):
        RunDirLock(tmp_path).acquire()
    assert read_holder(tmp_path) == winner
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_link_not_supported_falls_back_to_o_excl(tmp_path, monkeypatch):
    def link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(lockmod.os, "link", link)
    with RunDirLock(tmp_path) as lock:
        assert_ours(lock)
        with pytest.raises(RunDirLocked):
            RunDirLock(tmp_path).acquire()
    assert read_holder(tmp_path) is None


def wait_for(cond, timeout=3.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_heartbeat_refreshes_and_detects_takeover(tmp_path):
    path = tmp_path / LOCK_NAME
    said = []
    lock = RunDirLock(tmp_path, heartbeat=0.05, stale_after=1, say=said.append)
    lock.acquire()
    try:
        past = time.time() - 100
        os.utime(path, (past, past))
        wait_for(lambda: path.stat().st_mtime > past + 50)
        lock.check()
        assert lock.held

        other = tmp_path / "other"
        other.write_text(
            json.dumps(dict(read_holder(tmp_path), host="thief", pid=1234, token="f" * 32))
        )
        os.replace(other, path)
        wait_for(lambda: not lock.held)
        with pytest.raises(RunDirLockLost, match="host thief, pid 1234"):
            lock.check()
        assert said and "thief" in said[-1]
        # The heartbeat stopped: it no longer touches the other job's lock.
        os.utime(path, (past, past))
        time.sleep(0.2)
        assert path.stat().st_mtime == pytest.approx(past)
    finally:
        lock.release()
    assert read_holder(tmp_path)["token"] == "f" * 32  # not ours: not deleted
    assert not [t for t in threading.enumerate() if t.name.startswith("mpinewton-lock")]


def test_stale_after_must_exceed_three_heartbeats(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="3 x the heartbeat"):
        RunDirLock(tmp_path, stale_after=2, heartbeat=1)
    RunDirLock(tmp_path, stale_after=3, heartbeat=1)
    monkeypatch.setenv("MPINEWTON_LOCK_STALE_SECONDS", "2")
    with pytest.raises(ValueError, match="3 x the heartbeat"):
        RunDirLock(tmp_path, heartbeat=1)
    monkeypatch.setenv("MPINEWTON_LOCK_STALE_SECONDS", "12.5")
    assert RunDirLock(tmp_path, heartbeat=1).stale_after == 12.5
    monkeypatch.setenv("MPINEWTON_LOCK_STALE_SECONDS", "soon")
    with pytest.raises(ConfigError, match="MPINEWTON_LOCK_STALE_SECONDS"):
        RunDirLock(tmp_path)
    monkeypatch.delenv("MPINEWTON_LOCK_STALE_SECONDS")
    assert RunDirLock(tmp_path).stale_after == 300
