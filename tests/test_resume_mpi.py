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
    start_many,
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


def _args(dataset):
    # The thesis' Newton-CG, whose steps agree across rank counts to 1e-10 (the default
    # job's Fisher preconditioner amplifies rounding differences; docs/algorithms.md).
    return [THESIS_JOB, *small_job(dataset)]


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """The job run through on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run_job(2, *_args(dataset), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize(("how", "ranks"), [("SIGTERM to the ranks", 2),
                                            ("SIGUSR1 to mpirun", 3)])
def test_signal_checkpoints_and_resume_is_exact(dataset, straight, tmp_path, how, ranks):
    """A signalled 2-rank job checkpoints; resumed on ``ranks``, it ends where the straight
    run does: bitwise on 2 ranks, to 1e-10 on 3 (another order of the sums)."""
    run_dir = tmp_path / "run"
    args = _args(dataset)
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

    proc = run_job(ranks, *args, "--run-dir", str(run_dir), "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"after iteration {stopped_at}" in proc.stdout
    w, ref = read_weights(run_dir), read_weights(straight)
    if ranks == 2:
        np.testing.assert_array_equal(w, ref)
        for a, b in zip(read_metrics(run_dir), read_metrics(straight), strict=True):
            assert {k: v for k, v in a.items() if k not in TIMING} == \
                {k: v for k, v in b.items() if k not in TIMING}
    else:
        assert np.linalg.norm(w - ref) <= 1e-10 * np.linalg.norm(ref)
        assert [r["iter"] for r in read_metrics(run_dir)] == \
            [r["iter"] for r in read_metrics(straight)]


def test_resume_without_checkpoint_and_from_a_corrupt_one(dataset, tmp_path):
    """``--resume required`` refuses a run directory without a checkpoint and ``--resume``
    starts afresh there; a truncated newest checkpoint is skipped for the one before."""
    run_dir = tmp_path / "run"
    args = small_job(dataset, "--set", "checkpoint.every=2",
                      "--set", "checkpoint.keep=5")
    # the refusal and the fresh start in one launch (a launch costs TensorFlow's start)
    launch = start_many("mpinewton.train", 1,
                        [[*args, "--run-dir", str(run_dir), "--resume", "required"],
                         [*args, "--run-dir", str(run_dir), "--resume"]], tmp_path / "launch")
    try:
        refused, fresh = (rec[0] for rec in launch.outcomes(timeout=180))
    finally:
        launch.kill()
    assert refused["rc"] == 2, refused
    assert "no valid checkpoint" in refused["stderr"]
    assert fresh["rc"] == 0, fresh["stderr"][-3000:]
    assert "starting afresh" in fresh["stdout"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is None
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.h5"))
    assert len(checkpoints) >= 2
    newest = checkpoints[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncate
    proc = run_job(1, *args, "--run-dir", str(run_dir), "--resume", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert newest.name in proc.stdout and "skipped checkpoint" in proc.stdout
    assert f"resuming from {checkpoints[-2]}" in proc.stdout
