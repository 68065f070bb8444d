"""Whole training jobs under mpirun: rank invariance, lockstep, abort, bad input.

Each job is a subprocess under ``mpirun --oversubscribe`` with a hard timeout,
so a hang fails the test instead of stalling the suite.
"""

import hashlib
import json
import re
import time

import h5py
import numpy as np
import pytest
from mpijobs import mpi_env, read_metrics, requires_mpirun, run_job, small_job, start_many

from mpinewton.data import write_dataset

pytestmark = requires_mpirun

@pytest.fixture(scope="module")
def invariance_runs(dataset, tmp_path_factory, two_rank_jobs, three_rank_jobs):
    """The default job (Gauss-Newton, Levenberg-Marquardt, Fisher-preconditioned CG with
    orthogonal residuals, curvature on a subset: docs/algorithms.md) on 1, 2 and 3 ranks:
    run directory and rank 0's stdout. The 2- and 3-rank runs are the first commands of
    their rank count's launch."""
    run_dir = tmp_path_factory.mktemp("run1")
    proc = run_job(1, *small_job(dataset), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = {1: (run_dir, proc.stdout)}
    for ranks, (base, _, results) in ((2, two_rank_jobs), (3, three_rank_jobs)):
        code, stdout, stderr = results["invariance"]
        assert code == 0, stdout + stderr
        runs[ranks] = (base / "invariance", stdout)
    return runs


def test_run_directory_contract(invariance_runs):
    run_dir, stdout = invariance_runs[2]
    records = read_metrics(run_dir)
    assert [r["phase"] for r in records] == ["pretrain"] * 3 + ["newton"] * 4
    required = {"iter", "phase", "loss", "grad_norm", "cg_iters", "cg_reason", "step_size",
                "fallback", "wall_time"}
    assert all(required <= set(r) for r in records)
    newton = [r for r in records if r["phase"] == "newton"]
    assert all(r["cg_iters"] >= 1 and r["cg_reason"] for r in newton)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert 0.0 <= summary["train_accuracy"] <= 1.0 and "validation_accuracy" in summary
    assert "[run]" in (run_dir / "config.toml").read_text()
    # Rank 0 alone prints: one line per iteration, not one per rank.
    lines = stdout.splitlines()
    assert sum(line.startswith("newton ") for line in lines) == 4
    assert sum(line.startswith("done:") for line in lines) == 1
    # before the summary's passes, what they evaluate (101 training, 17 validation samples)
    assert lines.count("evaluating the final weights: loss, gradient and accuracy on the 101 "
                       "training samples; loss and accuracy on validation (17)") == 1
    # Newton iterations decrease the loss (Armijo accepts only decrease).
    assert all(r["new_loss"] <= r["loss"] for r in newton)


def test_same_losses_and_weights_on_1_2_3_ranks(invariance_runs):
    base = read_metrics(invariance_runs[1][0])
    with h5py.File(invariance_runs[1][0] / "weights.h5") as f:
        w1 = f["w"][...]
    for ranks in (2, 3):
        other = read_metrics(invariance_runs[ranks][0])
        assert len(other) == len(base)
        for a, b in zip(base, other, strict=True):
            assert a["phase"] == b["phase"] and a["cg_iters"] == b["cg_iters"]
            assert abs(a["loss"] - b["loss"]) <= 1e-10 * abs(a["loss"]), (ranks, a, b)
        with h5py.File(invariance_runs[ranks][0] / "weights.h5") as f:
            w = f["w"][...]
        assert np.linalg.norm(w - w1) <= 1e-10 * np.linalg.norm(w1)


def test_all_ranks_hold_identical_weights_after_every_step(invariance_runs):
    # --check-sync compares a SHA-256 of every rank's weights after each step and
    # stops on a mismatch (next test); the runs succeeded, so the hashes agreed,
    # and they agree with the weights the 1-rank run reached.
    final = {ranks: read_metrics(invariance_runs[ranks][0])[-1]["weights_sha256"]
             for ranks in (1, 2, 3)}
    with h5py.File(invariance_runs[2][0] / "weights.h5") as f:
        w2 = f["w"][...]
    assert final[2] == hashlib.sha256(np.ascontiguousarray(w2).tobytes()).hexdigest()


def test_check_sync_stops_a_job_whose_ranks_diverge(dataset, tmp_path):
    # One rank's weights are nudged by one ulp after iteration 2 (a test hook).
    start = time.monotonic()
    proc = run_job(2, *small_job(dataset), "--run-dir", str(tmp_path / "r"),
                   env=mpi_env(MPINEWTON_TEST_DIVERGE_RANK="1"), timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert re.search(r"--check-sync: weights differ between ranks after iteration 2: "
                     r"rank 0: [0-9a-f]{12}, rank 1: [0-9a-f]{12}", proc.stderr), proc.stderr
    assert len(read_metrics(tmp_path / "r")) == 1  # iteration 2 was never recorded
    assert time.monotonic() - start < 90


def test_exception_on_one_rank_ends_the_job_quickly(dataset, tmp_path):
    start = time.monotonic()
    proc = run_job(2, *small_job(dataset), "--run-dir", str(tmp_path / "r"),
                   env=mpi_env(MPINEWTON_FAIL_RANK="1", MPINEWTON_FAIL_ITER="2"), timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "test failure injected on rank 1" in proc.stderr
    assert elapsed < 30, elapsed


def _launch(ranks, base, jobs):
    """``jobs`` (name: trainer arguments) in ONE launch on ``ranks`` ranks
    (``mpijobs.start_many``; a launch costs each rank TensorFlow's start), each in its
    run directory ``base / name``, the last through ``python -m mpinewton.train``, whose
    exit status is the launch's. Per name: the exit status (the same on every rank, or
    the test fails), rank 0's stdout and stderr."""
    launch = start_many("mpinewton.train", ranks,
                        [[*args, "--run-dir", str(base / name)] for name, args in jobs.items()],
                        base / "launch")
    try:
        records = launch.outcomes(timeout=300)
    finally:
        launch.kill()
    results = {}
    for name, rec in zip(jobs, records, strict=True):
        assert len({r["rc"] for r in rec.values()}) == 1, rec  # the same verdict on every rank
        results[name] = (rec[0]["rc"], rec[0]["stdout"], rec[0]["stderr"])
    return results


@pytest.fixture(scope="module")
def two_rank_jobs(dataset, tmp_path_factory):
    """Five short 2-rank jobs in one launch (:func:`_launch`): the default job run
    through, three refused, and the gtol job."""
    base = tmp_path_factory.mktemp("two_rank_jobs")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 30)
    bad = base / "bad.h5"
    write_dataset(bad, {"train": (x, y), "validation": (x[:5], y[:5])}, num_classes=12,
                  source="test")
    y[21], y[25] = 10, 11  # global rows 21 and 25 lie on the last of 2 ranks
    with h5py.File(bad, "r+") as f:
        f["train/y"][...] = y
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    rgb = base / "rgb.h5"
    write_dataset(rgb, {"train": (x, rng.integers(0, 10, 20)),
                        "validation": (x[:4], rng.integers(0, 10, 4))}, num_classes=10,
                  source="test")
    jobs = {"invariance": small_job(dataset),
            "unknown": small_job(dataset, "--set", "optimizer.dampin=1"),
            "labels": small_job(bad), "shape": small_job(rgb),
            "gtol": small_job(dataset, "--set", "optimizer.gtol=1e9")}
    return base, {"bad": bad, "rgb": rgb}, _launch(2, base, jobs)


@pytest.fixture(scope="module")
def three_rank_jobs(dataset, tmp_path_factory):
    """The default job run through on 3 ranks, then one refused: a data set of 2
    samples for 3 ranks (:func:`_launch`)."""
    base = tmp_path_factory.mktemp("three_rank_jobs")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    two = base / "two.h5"
    write_dataset(two, {"train": (x, np.array([1, 2])), "validation": (x, np.array([1, 2]))},
                  num_classes=10, source="test")
    jobs = {"invariance": small_job(dataset), "too_few": small_job(two)}
    return base, {"two": two}, _launch(3, base, jobs)


def test_unknown_key_is_an_error_on_every_rank(two_rank_jobs):
    _, _, results = two_rank_jobs
    code, _, stderr = results["unknown"]
    assert code == 2
    assert "did you mean optimizer.damping" in stderr


def test_labels_out_of_range_name_first_bad_index(two_rank_jobs):
    _, paths, results = two_rank_jobs
    code, stdout, stderr = results["labels"]
    assert code == 2, stdout + stderr
    assert (f"error: loading data failed on rank 1: DataError: {paths['bad']}, split 'train': "
            "label at row 21 (global index 21 of 'train') is 10, outside [0, 10); fix the "
            "labels or num_classes\n") in stderr, stderr


def test_sample_shape_mismatch_names_both_shapes(two_rank_jobs):
    _, paths, results = two_rank_jobs
    code, _, stderr = results["shape"]
    assert code == 2
    assert "(32, 32, 3)" in stderr and "(28, 28, 1)" in stderr
    assert str(paths["rgb"]) in stderr


def test_more_ranks_than_samples_is_an_error_on_every_rank(three_rank_jobs):
    base, paths, results = three_rank_jobs
    code, stdout, stderr = results["too_few"]
    assert code == 2, stdout + stderr
    assert (f"loading data failed on rank 0, 1, 2: ConfigError: {paths['two']} [train] has 2 "
            "training sample(s) for 3 ranks: every rank needs at least one (run on at most 2 "
            "ranks" in stderr)
    assert not (base / "too_few" / "metrics.jsonl").exists()


def test_gtol_ends_a_run_whose_gradient_is_small_enough(two_rank_jobs):
    base, _, results = two_rank_jobs
    run_dir = base / "gtol"
    code, stdout, stderr = results["gtol"]
    assert code == 0, stdout + stderr
    assert "stopping early after iteration 0: |g| = " in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "converged" and summary["iterations"] == 0
    assert read_metrics(run_dir) == []
