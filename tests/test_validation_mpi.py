"""Validation during training, best weights, early stopping, TensorBoard and divergence,
as whole jobs under mpirun (hard timeouts; tests/mpijobs.py).

The job: the thesis' Newton-CG (rank-invariant to 1e-10) on the small test
set, 3 pre-training + 8 Newton iterations, evaluating the validation split
every 2 iterations with a patience of 2; its validation loss (random labels)
rises after iteration 4, so the run stops early at iteration 8.
"""

import json
import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpijobs import (
    THESIS_JOB,
    mpi_env,
    rank_pids,
    read_metrics,
    requires_mpirun,
    run_job,
    small_job,
    start_job,
    wait_for_records,
)

from mpinewton.checkpoint import load_checkpoint

pytestmark = requires_mpirun
EXIT_DIVERGED = 3
EXIT_CHECKPOINTED = 75
TIMING = {"iter_seconds", "wall_time", "eval_seconds"}
EVAL = ["--set", "eval.every=2", "--set", "eval.patience=2", "--set", "optimizer.iters=8",
        "--set", "checkpoint.every=1", "--set", "checkpoint.keep=100"]


def _args(dataset):
    return [THESIS_JOB, *small_job(dataset, *EVAL)]


def _evals(run_dir):
    return [r for r in read_metrics(run_dir) if r["phase"] == "eval"]


def _steps(run_dir):
    return [r for r in read_metrics(run_dir) if r["phase"] != "eval"]


def _expected_stop(evals, patience=2, min_delta=0.0):
    """The iteration at which early stopping must end the run, from the eval records."""
    anchor, stale = None, 0
    for record in evals:
        if anchor is None or record["val_loss"] < anchor - min_delta:
            anchor, stale = record["val_loss"], 0
        else:
            stale += 1
        if stale >= patience:
            return record["iter"]
    return None


def _summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="module")
def launched(dataset, tmp_path_factory):
    """The job uninterrupted on 1 rank, and on 2 in ONE launch (``mpijobs.start_many``;
    a launch costs each rank TensorFlow's start) with two diverging jobs after it: a
    loss 1000 x its start, and a NaN loss.

    Returns the run directories by name (1 and 2 for the uninterrupted job), the
    1-rank job's stdout, and the 2-rank commands' records (``rank: {"rc", "stdout",
    "stderr"}``) by name."""
    from mpijobs import start_many

    base = tmp_path_factory.mktemp("validation")
    dirs = {name: base / str(name) for name in (1, 2, "ratio", "nan")}
    # Every iteration would be checkpointed (and evaluated, keeping the best weights):
    # the first iteration's weights already have a loss of ~6e10, checked before saving.
    ratio = small_job(dataset, "--set", "optimizer.pretrain_lr=1e12",
                      "--set", "checkpoint.every=1", "--set", "eval.every=1")
    nan = small_job(dataset, "--set", "optimizer.pretrain_lr=1e300",
                    "--set", "run.max_loss_ratio=0")
    named = {2: [*_args(dataset), "--run-dir", str(dirs[2])],
             "ratio": [*ratio, "--run-dir", str(dirs["ratio"])],
             "nan": [*nan, "--run-dir", str(dirs["nan"])]}
    launch = start_many("mpinewton.train", 2, list(named.values()), base / "launch",
                        cli_last=False)
    try:
        one = run_job(1, *_args(dataset), "--run-dir", str(dirs[1]), timeout=240)
        assert one.returncode == 0, one.stdout + one.stderr
        done, records = launch.result(timeout=400)
    finally:
        launch.kill()
    assert done.returncode == 0 and len(records) == len(named), (done.stdout, done.stderr)
    return dirs, one.stdout, dict(zip(named, records, strict=True))


@pytest.fixture(scope="module")
def runs(launched):
    """The job uninterrupted on 1 and 2 ranks: run directory and (rank 0's) stdout."""
    dirs, stdout, records = launched
    assert all(r["rc"] == 0 for r in records[2].values()), records[2][0]
    return {1: (dirs[1], stdout), 2: (dirs[2], records[2][0]["stdout"])}


def test_evaluations_every_k_iterations_and_early_stopping(runs):
    run_dir, stdout = runs[2]
    evals, steps = _evals(run_dir), _steps(run_dir)
    stop = _expected_stop(evals)
    assert stop is not None and stop < 11, evals  # it does stop early
    assert [r["iter"] for r in evals] == list(range(2, stop + 1, 2))
    assert [r["iter"] for r in steps] == list(range(1, stop + 1))
    assert all(r["split"] == "validation" and np.isfinite(r["val_loss"])
               and 0 <= r["val_accuracy"] <= 1 for r in evals)
    # Each evaluation follows its iteration's record.
    records = read_metrics(run_dir)
    for i, record in enumerate(records):
        if record["phase"] == "eval":
            assert records[i - 1]["iter"] == record["iter"] and records[i - 1]["phase"] != "eval"
    best = min(evals, key=lambda r: r["val_loss"])
    summary = _summary(run_dir)
    assert summary["stopped"] == "early_stopped" and summary["iterations"] == stop
    assert summary["best_iteration"] == best["iter"]
    assert summary["best_val_loss"] == best["val_loss"]
    # The final validation loss is the last evaluation's (same weights, same objective).
    assert summary["validation_loss"] == evals[-1]["val_loss"]
    assert (f"stopping early after iteration {stop}: validation loss has not improved for 2 "
            f"evaluations (best {best['val_loss']:.6e} at iteration {best['iter']})") in stdout
    assert sum(line.startswith("eval ") for line in stdout.splitlines()) == len(evals)
    assert "the first iteration compiles the objective's functions" in stdout
    assert (run_dir / "weights.h5").exists()
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"ckpt-{stop:08d}.h5")
    assert ckpt.state["validation"]["stale"] == 2
    assert ckpt.state["validation"]["best_iteration"] == best["iter"]


def test_best_weights_are_the_weights_of_the_best_iteration(runs):
    run_dir, _ = runs[2]
    info = json.loads((run_dir / "best" / "best.json").read_text())
    best = min(_evals(run_dir), key=lambda r: r["val_loss"])
    assert info["iteration"] == best["iter"] and info["split"] == "validation"
    assert info["val_loss"] == best["val_loss"] and info["val_accuracy"] == best["val_accuracy"]
    assert np.isfinite(info["train_loss"])
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"ckpt-{best['iter']:08d}.h5")
    with h5py.File(run_dir / "best" / "weights.h5") as f, \
            h5py.File(run_dir / "weights.h5") as final:
        assert set(f.keys()) == set(final.keys())  # the format of DIR/weights.h5
        assert set(f["variables"].keys()) == set(final["variables"].keys())
        assert f.attrs["iteration"] == best["iter"]
        for name, value in ckpt.weights.items():
            np.testing.assert_array_equal(f[f"variables/{name}"][...], value)
        assert not np.array_equal(f["w"][...], final["w"][...])


def test_eval_losses_agree_on_1_and_2_ranks(runs):
    one, two = _evals(runs[1][0]), _evals(runs[2][0])
    assert [r["iter"] for r in one] == [r["iter"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-10 * abs(a["val_loss"]), (a, b)
        assert a["val_accuracy"] == b["val_accuracy"]
    assert _summary(runs[1][0])["iterations"] == _summary(runs[2][0])["iterations"]


def test_tensorboard_events_equal_the_metrics(runs):
    from mpinewton.train.tensorboard import ITERATION_SCALARS, read_scalars

    run_dir, _ = runs[2]
    scalars = read_scalars(run_dir / "tensorboard")
    assert set(ITERATION_SCALARS) | {"val_loss", "val_accuracy"} <= set(scalars)
    steps, evals = _steps(run_dir), _evals(run_dir)
    for tag in ITERATION_SCALARS:
        expected = [(r["iter"], np.float32(r[tag])) for r in steps if r.get(tag) is not None]
        assert scalars[tag] == expected, tag
    for tag in ("val_loss", "val_accuracy"):
        assert scalars[tag] == [(r["iter"], np.float32(r[tag])) for r in evals], tag


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(dataset, runs, tmp_path):
    straight, _ = runs[2]
    run_dir = tmp_path / "run"
    proc = start_job(2, [*_args(dataset), "--run-dir", str(run_dir)],
                     mpi_env(MPINEWTON_TEST_ITER_SLEEP="0.3"))
    wait_for_records(run_dir, 4, proc)  # iteration 3 or so, before the early stop
    for pid in rank_pids(run_dir):
        if pid != proc.pid:
            os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CHECKPOINTED, stdout + stderr
    stopped_at = _steps(run_dir)[-1]["iter"]
    assert stopped_at < _summary(straight)["iterations"]

    proc = run_job(2, *_args(dataset), "--run-dir", str(run_dir), "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"after iteration {stopped_at}" in proc.stdout
    drop = TIMING | {"weights_sha256"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run_dir)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(straight)]
    a, b = _summary(run_dir), _summary(straight)
    assert (a["iterations"], a["stopped"], a["best_iteration"], a["best_val_loss"]) == \
        (b["iterations"], b["stopped"], b["best_iteration"], b["best_val_loss"])
    for name in ("best/weights.h5", "weights.h5"):
        with h5py.File(run_dir / name) as f, h5py.File(straight / name) as g:
            np.testing.assert_array_equal(f["w"][...], g["w"][...])
    # Two processes wrote events; together they hold every iteration once.
    from mpinewton.train.tensorboard import read_scalars

    assert sorted(step for step, _ in read_scalars(run_dir / "tensorboard")["loss"]) == \
        [r["iter"] for r in _steps(straight)]


def _no_saved_weights(run_dir):
    run_dir = Path(run_dir)
    assert not (run_dir / "weights.h5").exists()
    assert not (run_dir / "summary.json").exists()
    assert not list(run_dir.glob("checkpoints/*.h5"))
    assert not (run_dir / "best").exists()


@pytest.fixture(scope="module")
def diverged(launched):
    """The two diverging jobs: run directory, and every rank's exit status, rank 0's
    stdout and stderr, and the other ranks' stderr."""
    dirs, _, records = launched
    return [(dirs[name], [r["rc"] for r in records[name].values()], records[name][0]["stdout"],
             records[name][0]["stderr"], "".join(r["stderr"] for rank, r in
                                                records[name].items() if rank != 0))
            for name in ("ratio", "nan")]


def test_a_diverging_run_stops_without_saving_its_weights(diverged):
    run_dir, codes, stdout, stderr, others = diverged[0]
    assert codes == [EXIT_DIVERGED] * 2, stdout + stderr  # on every rank
    assert "error: diverged at iteration 1 (pretrain): the loss at the weights to be saved " \
        in stderr, stderr
    assert "is more than 1000 x the loss at the start of the run" in stderr
    assert "lower optimizer.pretrain_lr (now 1e+12)" in stderr
    assert stderr.count("error: diverged") == 1 and "error" not in others  # rank 0 reports
    assert [r["iter"] for r in _steps(run_dir)] == [1]
    _no_saved_weights(run_dir)


def test_a_nan_loss_stops_the_run(diverged):
    run_dir, codes, stdout, stderr, _ = diverged[1]
    assert codes == [EXIT_DIVERGED] * 2, stdout + stderr  # on every rank
    assert "error: diverged at iteration 2 (pretrain): " in stderr, stderr
    assert "NaN or Inf" in stderr and "lower optimizer.pretrain_lr" in stderr
    _no_saved_weights(run_dir)
