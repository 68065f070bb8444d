"""Checkpoints, signals and exact resume of whole training jobs under mpirun."""

import json
import os
import signal

import numpy as np
import pytest
from mpijobs import (
    THESIS_JOB,
    TIMING,
    mpi_env,
    rank_pids,
    read_metrics,
    read_weights,
    requires_mpirun,
    run_job,
    small_job,
    start_job,
    wait_for_records,
)

from mpinewton.checkpoint import load_checkpoint

pytestmark = requires_mpirun
EXIT_CHECKPOINTED = 75



def _interrupted_run(ranks, args, run_dir, how):
    """Start a slowed-down job, signal it after 3 iterations.

    Returns the exit code, stdout, stderr and the number of iterations recorded
    when the signal had been sent.
    """
    proc = start_job(ranks, [*args, "--run-dir", str(run_dir)],
                  mpi_env(MPINEWTON_TEST_ITER_SLEEP="0.3"))
    wait_for_records(run_dir, 3, proc)
    if how == "SIGUSR1 to mpirun":
        proc.send_signal(signal.SIGUSR1)
    else:  # SIGTERM straight to the ranks, as SLURM does at the time limit
        for pid in rank_pids(run_dir):
            if pid != proc.pid:
                os.kill(pid, signal.SIGTERM)
    at_signal = len(read_metrics(run_dir))
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr, at_signal


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run_job(2, *small_job(dataset), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize("how", ["SIGTERM to the ranks", "SIGUSR1 to mpirun"])
def test_signal_checkpoints_and_resume_is_exact(dataset, straight, tmp_path, how):
    run_dir = tmp_path / "run"
    args = small_job(dataset)
    code, stdout, stderr, at_signal = _interrupted_run(2, args, run_dir, how)
    assert code == EXIT_CHECKPOINTED, stdout + stderr
    assert "checkpointed, not finished" in stdout
    stopped_at = len(read_metrics(run_dir))
    total = len(read_metrics(straight))
    # Stopped at the end of the iteration in progress when the signal came.
    assert at_signal <= stopped_at <= at_signal + 1 < total + 1, (at_signal, stopped_at)
    assert stopped_at < total
    assert f"checkpoints/ckpt-{stopped_at:08d}.h5" in stdout
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"ckpt-{stopped_at:08d}.h5")
    schedule = ckpt.state["schedule"]
    assert ckpt.iteration == schedule["iteration"] == stopped_at
    assert schedule["phase"] == read_metrics(run_dir)[-1]["phase"]
    assert schedule["next_phase"] == read_metrics(straight)[stopped_at]["phase"]
    assert ckpt.state["progress"]["wall_time"] > 0
    assert (run_dir / "checkpoints" / "latest").exists()
    assert not (run_dir / "summary.json").exists()

    proc = run_job(2, *args, "--run-dir", str(run_dir), "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"after iteration {stopped_at}" in proc.stdout
    np.testing.assert_array_equal(read_weights(run_dir), read_weights(straight))
    for a, b in zip(read_metrics(run_dir), read_metrics(straight), strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == \
            {k: v for k, v in b.items() if k not in TIMING}


def test_resume_on_another_number_of_ranks(dataset, tmp_path):
    # The thesis' Newton-CG, whose steps agree across rank counts to 1e-10 (the default
    # job's Fisher preconditioner amplifies rounding differences; docs/algorithms.md).
    args = [THESIS_JOB, *small_job(dataset)]
    straight = tmp_path / "straight"
    proc = run_job(2, *args, "--run-dir", str(straight))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "run"
    code, stdout, stderr, _ = _interrupted_run(2, args, run_dir, "SIGTERM to the ranks")
    assert code == EXIT_CHECKPOINTED, stdout + stderr
    proc = run_job(3, *args, "--run-dir", str(run_dir), "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    w, ref = read_weights(run_dir), read_weights(straight)
    assert np.linalg.norm(w - ref) <= 1e-10 * np.linalg.norm(ref)


def test_resume_without_checkpoint_starts_afresh_and_required_fails(dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = small_job(dataset)
    proc = run_job(1, *args, "--run-dir", str(run_dir), "--resume", "required", timeout=120)
    assert proc.returncode == 2
    assert "no valid checkpoint" in proc.stderr
    proc = run_job(1, *args, "--run-dir", str(run_dir), "--resume", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "starting afresh" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is None


def test_corrupt_latest_falls_back_to_older_checkpoint(dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = small_job(dataset, "--set", "checkpoint.every=2",
                      "--set", "checkpoint.keep=5")
    proc = run_job(1, *args, "--run-dir", str(run_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.h5"))
    assert len(checkpoints) >= 2
    newest = checkpoints[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncate
    proc = run_job(1, *args, "--run-dir", str(run_dir), "--resume", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert newest.name in proc.stdout and "skipped checkpoint" in proc.stdout
    assert f"resuming from {checkpoints[-2]}" in proc.stdout
