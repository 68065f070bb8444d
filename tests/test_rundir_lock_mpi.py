"""One job per run directory, with whole jobs under mpirun (mpinewton.train.lock).

A second job on a directory in use is refused at once, naming the holder; a
job killed with SIGKILL leaves a lock that ``--resume`` takes over.
"""

import os
import signal
import socket
import time

from mpijobs import (
    mpi_env,
    rank_pids,
    read_metrics,
    requires_mpirun,
    run_job,
    small_job,
    start_job,
    wait_for_records,
)

pytestmark = requires_mpirun


def _start(run_dir, dataset, **env):
    return start_job(2, [*small_job(dataset), "--run-dir", str(run_dir)], mpi_env(**env))


def _holder_pid(run_dir):
    import json

    return json.loads((run_dir / ".lock").read_text())["pid"]


def test_second_job_on_a_directory_in_use_is_refused(dataset, tmp_path):
    run_dir = tmp_path / "run"
    first = _start(run_dir, dataset, MPINEWTON_TEST_ITER_SLEEP="0.5")
    try:
        wait_for_records(run_dir, 1, first)
        holder = _holder_pid(run_dir)
        started = time.monotonic()
        second = run_job(2, *small_job(dataset), "--run-dir", str(run_dir), "--resume",
                         timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert (f"is in use by another job: host {socket.gethostname()}, pid {holder}"
                in second.stderr), second.stderr
        assert time.monotonic() - started < 60
        stdout, stderr = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stdout + stderr
    iters = [r["iter"] for r in read_metrics(run_dir)]
    assert iters == list(range(1, len(iters) + 1))  # one writer, no interleaved records
    assert not (run_dir / ".lock").exists()  # released at the end


def test_lock_of_a_killed_job_does_not_block_resume(dataset, tmp_path):
    run_dir = tmp_path / "run"
    first = _start(run_dir, dataset, MPINEWTON_TEST_ITER_SLEEP="0.5")
    wait_for_records(run_dir, 2, first)
    holder = _holder_pid(run_dir)
    for pid in rank_pids(run_dir):
        os.kill(pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert (run_dir / ".lock").exists()  # left behind by the killed job
    proc = run_job(2, *small_job(dataset), "--run-dir", str(run_dir), "--resume", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pid {holder}" in proc.stdout and "is stale" in proc.stdout, proc.stdout
    assert [r["iter"] for r in read_metrics(run_dir)] == list(range(1, 8))
