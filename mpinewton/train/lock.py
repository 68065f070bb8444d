"""Run-directory lock: one job at a time writes into a run directory.

Rank 0 takes the lock, :data:`LOCK_NAME` inside the run directory, before it
touches anything there; a second job on the same directory stops at once with
:class:`RunDirLocked` (a :class:`~mpinewton.config.ConfigError`, exit code 2).

Protocol
--------
Run directories live on NFS or Lustre, where ``fcntl``/``flock`` (and with
them HDF5 file locking) may be disabled or silently local to one client. The
lock therefore uses only operations that are atomic on the file server:

* **Taking.** The record (JSON, below) is written to a private temporary file
  and fsynced, then ``os.link(tmp, DIR/.lock)``. ``link`` fails with EEXIST
  if the name exists, also over NFS (the server decides), and it publishes a
  complete file: nobody can read a half-written lock. Because an NFSv3 reply
  can be lost and the retransmitted ``link`` then answers EEXIST although it
  succeeded, EEXIST with ``st_nlink == 2`` on the temporary file counts as
  success (the recipe of open(2)). Where hard links are not supported the lock
  is created with ``O_CREAT | O_EXCL`` (atomic on NFSv3+ and Lustre) and then
  written and fsynced; a reader that meets it half-written sees an unknown
  holder with a fresh mtime and is refused, which is the safe answer.
* **Record.** ``host``, ``pid``, ``start_time`` (field 22 of
  ``/proc/<pid>/stat``: clock ticks since boot, to detect pid reuse),
  ``boot_id``, a random ``token`` (what ownership is checked by), ``time``
  (when taken), ``slurm_job_id``, ``slurm_restart_count`` and ``command``.
* **Heartbeat.** The holder touches the lock (``os.utime``; over NFS this
  sets the server's time) every ``heartbeat`` seconds, after checking that
  the token is still its own. If it is not, the lock was taken over (e.g. the
  job was stopped for longer than ``stale_after``): :meth:`RunDirLock.check`
  then raises :class:`RunDirLockLost`.
* **Staleness.** A lock left by a dead job is taken over, so that a requeued
  job is never blocked. It is stale when

  - it is from this host (same hostname, and same boot id where both are
    known) and its pid no longer exists, or the pid now belongs to a process
    with another start time (pid reuse); the same hostname with another boot
    id means the machine was rebooted since;
  - its ``slurm_job_id`` is this process's ``SLURM_JOB_ID``: a requeued job
    keeps its job id, and its earlier incarnation is gone (unless the holder
    is provably alive on this host: two job steps of one allocation on one
    directory are still refused);
  - it is from another host (or unreadable) and its mtime is older than
    ``stale_after`` seconds (default 300, environment variable
    ``MPINEWTON_LOCK_STALE_SECONDS``). "Now" is the mtime of a probe file
    created in the same directory, i.e. the file server's clock, so clock
    skew between nodes does not matter.
* **Takeover.** The stale lock is renamed to a unique ``.lock.stale-<random>``
  name. ``rename`` is atomic: of two contenders exactly one succeeds, the
  other gets FileNotFoundError and starts over (reading whatever lock is there
  by then). The winner checks that the file it renamed is the one it judged
  stale (same inode, mtime and content); if a fresh lock slipped in between it
  is put back. Then the stale file is deleted and the lock taken as above.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from mpinewton.config import ConfigError
from mpinewton.durable import write_all

#: Name of the lock file inside the run directory.
LOCK_NAME = ".lock"

#: Environment variable overriding the default ``stale_after``.
STALE_ENV = "MPINEWTON_LOCK_STALE_SECONDS"

#: Seconds without heartbeat after which a lock from another host is stale.
DEFAULT_STALE_AFTER = 300.0

#: Acquisition attempts when contenders race for a stale lock.
_MAX_ATTEMPTS = 5

#: ``os.link`` errors that mean "no hard links here": fall back to O_EXCL.
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class RunDirLocked(ConfigError):
    """The run directory is held by another, live job; the message names it."""


class RunDirLockLost(RuntimeError):
    """Our lock was taken over by another job while we held it."""


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to detect pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The command name (field 2) may contain spaces and parentheses: split after it.
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    """Boot id of this machine (Linux): the same hostname with another boot id rebooted."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a process of another user counts, a zombie not).

    A killed rank whose parent died too can stay a zombie for a while (a
    container's init may reap late); it holds nothing.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def _fmt_time(t: Any) -> str:
    """UTC time stamp for messages; '?' if ``t`` is not a number."""
    if not isinstance(t, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The lock record in ``raw``, or None if it is not one (empty, half-written, garbage)."""
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        return None
    if not isinstance(data.get("pid"), int) or not isinstance(data.get("host"), str):
        return None
    return data


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    """Raw content and stat of the lock file; FileNotFoundError when there is none."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def read_holder(directory: Path) -> dict[str, Any] | None:
    """The lock record of ``directory``, or None when it is not locked.

    An unreadable lock file (empty, half-written, garbage) gives ``{}``: locked,
    holder unknown.
    """
    try:
        raw, _ = _read(Path(directory) / LOCK_NAME)
    except FileNotFoundError:
        return None
    return _parse(raw) or {}


def _describe(holder: dict[str, Any] | None) -> str:
    """'host h, pid p (SLURM job j)' for messages."""
    if not holder:
        return "an unknown holder (unreadable lock file)"
    text = f"host {holder.get('host')}, pid {holder.get('pid')}"
    if holder.get("slurm_job_id"):
        text += f" (SLURM job {holder['slurm_job_id']})"
    return text


class RunDirLock:
    """Exclusive lock of one run directory by one job (see the module docstring).

    ``say`` receives notices (takeover of a stale lock, loss of the lock).
    """

    def __init__(
        self,
        directory: Path,
        *,
        stale_after: float | None = None,
        heartbeat: float = 30.0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if stale_after is None:
            env = os.environ.get(STALE_ENV, "").strip()
            try:
                stale_after = float(env) if env else DEFAULT_STALE_AFTER
            except ValueError:
                raise ConfigError(f"{STALE_ENV}={env!r} is not a number of seconds") from None
        if not heartbeat > 0:
            raise ConfigError(f"lock heartbeat must be positive, got {heartbeat}")
        # A holder must be able to miss a heartbeat or two without being judged dead.
        if not stale_after >= 3 * heartbeat:
            raise ConfigError(
                f"lock stale_after ({stale_after:g} s) must be at least 3 x the heartbeat "
                f"({heartbeat:g} s), or live jobs would be judged dead"
            )
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.stale_after = float(stale_after)
        self.heartbeat = float(heartbeat)
        self._say = say
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._start_time = _proc_start_time(self._pid)
        self._boot_id = _boot_id()
        self._token: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public API -------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether we hold the lock (acquired, not released, not taken over)."""
        return self._token is not None and self._lost is None

    def acquire(self) -> None:
        """Take the lock, creating the directory; RunDirLocked if a live job holds it."""
        if self._token is not None:
            raise RuntimeError(f"lock on {self.directory} acquired twice")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(_MAX_ATTEMPTS):
            token = secrets.token_hex(16)
            if self._create(token):
                self._token, self._lost = token, None
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._beat,
                    name=f"mpinewton-lock-heartbeat {self.directory}",
                    daemon=True,
                )
                self._thread.start()
                return
            try:
                raw, st = _read(self.path)
            except FileNotFoundError:
                continue  # released or taken over meanwhile: try again
            holder = _parse(raw)
            reason = self._stale_reason(holder, st)
            if reason is None:
                raise RunDirLocked(self._locked_message(holder, st))
            self._take_over(holder, raw, st, reason)
        raise RunDirLocked(
            f"run directory {self.directory} is contended: could not take its lock in "
            f"{_MAX_ATTEMPTS} attempts; another job keeps taking it. Check {self.path}"
        )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        token, self._token = self._token, None
        if token is None:
            return
        try:
            raw, _ = _read(self.path)
        except FileNotFoundError:
            return
        holder = _parse(raw)
        # Never delete a lock that another job took over: it is theirs now.
        if holder is not None and holder["token"] == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def check(self) -> None:
        """Raise RunDirLockLost if the heartbeat found our lock taken over."""
        if self._lost is not None:
            raise RunDirLockLost(self._lost)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- taking -----------------------------------------------------------

    def _record(self, token: str) -> bytes:
        """The JSON written into the lock file."""
        return (
            json.dumps(
                {
                    "host": self._host,
                    "pid": self._pid,
                    "start_time": self._start_time,
                    "boot_id": self._boot_id,
                    "token": token,
                    "time": time.time(),
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                    "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                    "command": shlex.join(sys.argv),
                },
                indent=1,
            ).encode()
            + b"\n"
        )

    def _private_name(self, kind: str) -> Path:
        """A name in the directory no other process uses."""
        name = f"{LOCK_NAME}-{kind}-{self._host}-{self._pid}-{secrets.token_hex(6)}"
        return self.directory / name

    def _create(self, token: str) -> bool:
        """Publish a complete lock file atomically; False if one exists."""
        data = self._record(token)
        tmp = self._private_name("tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                # NFS: a retransmitted link answers EEXIST although the first one worked.
                return os.stat(tmp).st_nlink == 2
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                return self._create_excl(data)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _create_excl(self, data: bytes) -> bool:
        """Fallback without hard links: O_EXCL create, write, fsync."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    # -- staleness --------------------------------------------------------

    def _stale_reason(self, holder: dict[str, Any] | None, st: os.stat_result) -> str | None:
        """Why the lock is stale, or None if its holder may be alive."""
        if holder is not None:
            same_host = holder["host"] == self._host
            their_boot = holder.get("boot_id")
            if same_host and their_boot and self._boot_id and their_boot != self._boot_id:
                return f"host {self._host} has been rebooted since (boot id changed)"
            if same_host:
                pid = holder["pid"]
                their_start = holder.get("start_time")
                if not _pid_alive(pid):
                    return f"process {pid} no longer exists on {self._host}"
                now_start = _proc_start_time(pid)
                if their_start is not None and now_start is not None and now_start != their_start:
                    return (
                        f"pid {pid} on {self._host} now belongs to another process "
                        f"(start time {now_start}, the lock says {their_start})"
                    )
                # The holder is provably alive on this host.
                if pid == self._pid and self._same_job(holder):
                    raise RuntimeError(
                        f"this process already holds the lock on {self.directory}: "
                        "a run directory is locked once per job"
                    )
                return None
            if self._same_job(holder):
                return (
                    f"it is from SLURM job {holder['slurm_job_id']}, which is this job "
                    "(requeued): its earlier run is gone"
                )
        age = self._server_now() - st.st_mtime
        if age > self.stale_after:
            return f"not refreshed for {age:.0f} s (stale after {self.stale_after:g} s)"
        return None

    def _same_job(self, holder: dict[str, Any]) -> bool:
        """Whether the lock is from this SLURM job (a requeued job keeps its id)."""
        ours = os.environ.get("SLURM_JOB_ID")
        return bool(ours) and holder.get("slurm_job_id") == ours

    def _server_now(self) -> float:
        """The file server's clock: mtime of a fresh probe file (nodes' clocks may skew)."""
        probe = self._private_name("probe")
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError:
            return time.time()
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)

    def _locked_message(self, holder: dict[str, Any] | None, st: os.stat_result) -> str:
        """The RunDirLocked message: who holds it and how to proceed."""
        if holder is None:
            who = (
                f"an unknown holder (its lock file cannot be read; last touched "
                f"{_fmt_time(st.st_mtime)})"
            )
        else:
            who = f"{_describe(holder)}, holding it since {_fmt_time(holder.get('time'))}"
            if holder.get("command"):
                who += f", command {holder['command']!r}"
        if holder is None or holder["host"] != self._host:
            who += f"; it is taken over automatically once not refreshed for {self.stale_after:g} s"
        return (
            f"run directory {self.directory} is in use by another job: {who}. Wait for "
            f"that job to end, use another --run-dir, or, if that job is certainly dead, "
            f"delete {self.path}"
        )

    def _take_over(
        self, holder: dict[str, Any] | None, raw: bytes, st: os.stat_result, reason: str
    ) -> None:
        """Move the stale lock out of the way; only one contender's rename succeeds."""
        stale = self.directory / f"{LOCK_NAME}.stale-{secrets.token_hex(8)}"
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return  # another contender was first: start over
        try:
            raw2, st2 = _read(stale)
        except FileNotFoundError:
            return
        same = (st2.st_ino, st2.st_dev, st2.st_mtime_ns, raw2) == (
            st.st_ino,
            st.st_dev,
            st.st_mtime_ns,
            raw,
        )
        if not same:
            # Between our read and our rename another contender replaced the stale lock
            # with its own fresh one (or the holder's heartbeat touched it): put it back.
            self._put_back(stale)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
        if self._say is not None:
            since = _fmt_time(holder.get("time")) if holder else _fmt_time(st.st_mtime)
            self._say(
                f"taking over run directory {self.directory}: its lock held by "
                f"{_describe(holder)} since {since} is stale: {reason}"
            )

    def _put_back(self, stale: Path) -> None:
        """Restore a lock we renamed by mistake, unless a new lock exists already."""
        try:
            os.link(stale, self.path)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            if not self.path.exists():
                os.rename(stale, self.path)
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)

    # -- heartbeat --------------------------------------------------------

    def _beat(self) -> None:
        """Touch the lock every ``heartbeat`` s while it is ours; note when it is not."""
        misses = 0
        while not self._stop.wait(self.heartbeat):
            try:
                raw, _ = _read(self.path)
            except FileNotFoundError:
                # Tolerate one miss: a contender may have moved it away and be putting it back.
                misses += 1
                if misses >= 2:
                    self._lose(None, removed=True)
                    return
                continue
            except OSError:
                continue  # transient file-system error: try at the next beat
            misses = 0
            holder = _parse(raw)
            if holder is None or holder["token"] != self._token:
                self._lose(holder, removed=False)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _lose(self, holder: dict[str, Any] | None, *, removed: bool) -> None:
        """Record (and report) that the lock is no longer ours."""
        if removed:
            now = "its lock file was removed"
        else:
            now = f"it is now held by {_describe(holder)}"
            if holder:
                now += f" since {_fmt_time(holder.get('time'))}"
        self._lost = (
            f"lost the lock on run directory {self.directory}: {now}. This job was probably "
            f"stopped or cut off for more than {self.stale_after:g} s and judged dead; it "
            "must stop writing there"
        )
        if self._say is not None:
            self._say(self._lost)
