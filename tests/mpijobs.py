"""Helpers for tests that launch whole training jobs under mpirun (hard timeouts)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mpinewton.data import write_dataset

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")
#: The thesis' Newton-CG job (the default job before 0.2).
THESIS_JOB = str(ROOT / "jobs" / "mnist_cnn_thesis.toml")


def mpi_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def run_job(ranks, *args, timeout=240, env=None):
    cmd = [MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable, "-m", "mpinewton.train",
           *args]
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


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




def start_job(ranks, args, env):
    """Start a training job in its own session (so a test can signal or kill it)."""
    cmd = [MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable, "-m", "mpinewton.train",
           *args]
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
