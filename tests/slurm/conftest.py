"""A real single-node SLURM cluster for the tests of slurm/*.sh (docs/cluster.md).

The session fixture ``slurm`` writes a ``slurm.conf`` into a temporary folder
(no authentication, Linux process tracking, no task plugin, consumable cores),
starts ``slurmctld`` and ``slurmd`` in the foreground as child processes, waits
until the node is idle, and at the end cancels what is left and stops the two
daemons by their process ids. Client commands and the daemons find the
configuration through ``SLURM_CONF``; nothing outside the temporary folder is
touched. Debian's ``slurm-wlm`` and ``libpmix-dev`` provide the binaries and the
PMIx library that ``srun --mpi=pmix`` loads (``scripts/slurm-setup.sh``).

Where SLURM is missing or the daemons do not start (not root, no binaries) the
tests are skipped with the reason; ``MPINEWTON_REQUIRE_SLURM=1`` turns that into
a failure, for CI machines where SLURM must work.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mpijobs import pythonpath

ROOT = Path(__file__).resolve().parents[2]
SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
DAEMON_START_TIMEOUT = 30


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


def _which(name):
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, lines=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """One controller and one compute node on this machine, in ``folder``."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.procs = {}
        self.bin = {}
        self.host = socket.gethostname().split(".")[0]

    # -- set-up -------------------------------------------------------------------------
    def write_conf(self):
        for sub in ("state", "spool", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        f = self.folder
        self.conf.write_text(f"""\
ClusterName=mpinewtontest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
ReturnToService=2
MinJobAge=3600
KillWait=10
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd.log
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def env(self, **extra):
        """This process's environment without SLURM_* variables, plus SLURM_CONF and extra."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_",
                                                                          "SRUN_", "SALLOC_"))}
        env.update(SLURM_CONF=str(self.conf), TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=pythonpath(),
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self):
        if sys.platform != "linux":
            raise SlurmUnavailable("the test cluster needs Linux")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs slurmd as root (not root here)")
        binaries = {name: _which(name) for name in ("slurmctld", "slurmd", "sbatch", "srun",
                                                     "scontrol", "sinfo", "squeue", "scancel")}
        missing = [name for name, path in binaries.items() if path is None]
        if missing:
            raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} not found); "
                                   "run scripts/slurm-setup.sh")
        self.bin = binaries
        self.write_conf()
        env = self.env()
        for name, args in (("slurmctld", ["-D", "-c", "-f", str(self.conf)]),
                           ("slurmd", ["-D", "-f", str(self.conf)])):
            out = open(self.folder / "log" / f"{name}.out", "w")  # noqa: SIM115
            self.procs[name] = subprocess.Popen([binaries[name], *args], env=env, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            out.close()
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited with code {proc.returncode} at start:\n"
                        + _tail(self.folder / "log" / f"{name}.out") + "\n"
                        + _tail(self.folder / "log" / f"{name}.log"))
            res = subprocess.run([binaries["sinfo"], "-h", "-N", "-o", "%T"], env=env,
                                 capture_output=True, text=True, timeout=30)
            state = res.stdout.strip() or res.stderr.strip()
            if res.returncode == 0 and state.startswith("idle"):
                break
            time.sleep(0.5)
        else:
            raise SlurmUnavailable(
                f"the node did not become idle within {DAEMON_START_TIMEOUT} s (sinfo: {state!r}):"
                "\n" + _tail(self.folder / "log" / "slurmctld.log") + "\n"
                + _tail(self.folder / "log" / "slurmd.log"))
        if "can not load PMIx library" in _tail(self.folder / "log" / "slurmd.log", 200):
            raise SlurmUnavailable("slurmd cannot load the PMIx library that srun --mpi=pmix "
                                   "needs; install libpmix-dev (scripts/slurm-setup.sh)")

    def stop(self):
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run([self.bin["scancel"], "--user", "root"], env=self.env(),
                           capture_output=True, timeout=30)
            self._wait_idle(30)
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def _wait_idle(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.run("squeue", "-h", "-o", "%i", check=False)
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.5)

    # -- use ----------------------------------------------------------------------------
    def run(self, command, *args, env=None, check=True, timeout=60, cwd=ROOT):
        """Run a SLURM client command (or any command) against this cluster."""
        exe = self.bin.get(command, command)
        res = subprocess.run([exe, *map(str, args)], env=env or self.env(), cwd=cwd,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{command} {' '.join(map(str, args))} failed "
                                 f"({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def sbatch(self, script, *args, env=None, script_args=()):
        """Submit ``script`` (from the repository root); returns the job id."""
        res = self.run("sbatch", "--parsable", *args, script, *script_args, env=env)
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id):
        """``scontrol show job`` as a dict of its KEY=VALUE fields."""
        res = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout))

    def wait_for(self, job_id, predicate, timeout, what):
        """Poll the job until ``predicate(fields)``; returns the fields."""
        deadline = time.monotonic() + timeout
        fields = {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if predicate(fields):
                return fields
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: {what} not reached within {timeout} s; last "
                             f"state {fields.get('JobState')} ({fields.get('Reason')}), "
                             f"exit {fields.get('ExitCode')}, restarts {fields.get('Restarts')}")

    def wait_done(self, job_id, timeout):
        """Wait until the job has ended for good; returns its fields."""
        return self.wait_for(job_id, lambda f: f.get("JobState") in (
            "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"), timeout, "the end")

    def release_requeued(self, job_id, restarts, timeout=60):
        """Wait until the job is requeued ``restarts`` times and end its begin-time wait.

        A requeued job is held back for about two minutes (its begin time);
        ``scontrol update StartTime=now`` lets it start at once. Not too soon:
        slurmd revokes the old run's credential at the requeue, with a time
        stamp in whole seconds, and refuses (the job FAILS: "Job credential
        revoked") a launch within that second; so wait until the node is idle
        again and two more seconds.
        """
        fields = self.wait_for(
            job_id, lambda f: int(f.get("Restarts", 0)) >= restarts and
            f.get("JobState") in ("PENDING", "RUNNING", "COMPLETED", "FAILED"),
            timeout, f"requeue number {restarts}")
        if fields.get("JobState") != "PENDING":
            return fields
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if nodes and all(state == "idle" for state in nodes):
                break
            time.sleep(0.5)
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        return fields


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The running test cluster (skips the SLURM tests where it cannot start)."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        message = f"no SLURM test cluster: {exc}"
        if os.environ.get("MPINEWTON_REQUIRE_SLURM") == "1":
            pytest.fail(message + " (MPINEWTON_REQUIRE_SLURM=1)", pytrace=False)
        pytest.skip(message)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_dataset(tmp_path_factory):
    """A small MNIST-shaped dataset (600 training, 100 validation images)."""
    from mpinewton.data import write_dataset

    rng = np.random.default_rng(1)

    def images(count):
        y = rng.integers(0, 10, count)
        x = rng.integers(0, 60, (count, 28, 28, 1), dtype=np.uint8)
        for i, label in enumerate(y):  # a class-dependent bright block: learnable
            x[i, 2 * label:2 * label + 6, 4:20, 0] = 250
        return x, y

    path = tmp_path_factory.mktemp("slurm-data") / "small.h5"
    write_dataset(path, {"train": images(600), "validation": images(100)}, num_classes=10,
                  source="test")
    return path
