"""Stochastic Newton (thesis 8.2) under mpirun: the same batches and losses on 1, 2, 3 ranks.

The batch of iteration k is a set of global sample indices drawn from a seeded
permutation; each rank reads a balanced part of it. ``--check-sync`` records a
hash of the rows all ranks read together (``batch_sha256``).
"""

import hashlib
import json

import numpy as np
import pytest
from mpijobs import read_metrics, read_weights, requires_mpirun, run_job, small_job

from mpinewton.sampling import MiniBatchSampler

pytestmark = requires_mpirun
BATCH = 23  # not a multiple of 2 or 3: the ranks' parts differ in size


def _args(dataset, *extra):
    # Progressive batches (norm test, capped at 60 samples) grow the batch of 23 on the way.
    return small_job(dataset, "--set", f"optimizer.batch_size={BATCH}",
                     "--set", "objective.micro_batch=5", "--set", "optimizer.batch_growth="
                     "'norm_test'", "--set", "optimizer.batch_theta=0.5",
                     "--set", "optimizer.batch_max=60", *extra)



#: Geometric growth: the batch doubles after every 2nd step of the method, to 35 at most.
GEOMETRIC = ["--set", "optimizer.batch_size=10", "--set", "objective.micro_batch=5",
             "--set", "optimizer.batch_growth='geometric'", "--set", "optimizer.batch_every=2",
             "--set", "optimizer.batch_max=35", "--set", "optimizer.iters=6"]
KEEP = ["--set", "checkpoint.every=1", "--set", "checkpoint.keep=10"]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """The norm-test job on 1, 2 and 3 ranks, and, after the 2-rank one in its launch
    (``mpijobs.start_many``: a launch costs each rank TensorFlow's start), the other
    2-rank jobs of this module: its resume from iteration 4, the geometric job and its
    resume from iteration 6, and a refused batch size (through the real entry point).

    Returns the run directories by name (1, 2, 3 for the norm-test runs), and the
    2-rank launch's records and finished mpirun."""
    from mpijobs import start_many

    base = tmp_path_factory.mktemp("stochastic")
    dirs = {ranks: base / f"sto{ranks}" for ranks in (1, 2, 3)}
    dirs.update({name: base / name for name in ("mid_epoch", "straight", "resumed", "refused")})
    geometric = small_job(dataset, *GEOMETRIC)
    commands = [
        [*_args(dataset, *KEEP), "--run-dir", str(dirs[2])],
        [*_args(dataset), "--run-dir", str(dirs["mid_epoch"]),
         "--resume", str(dirs[2] / "checkpoints" / "ckpt-00000004.h5")],
        [*geometric, *KEEP, "--run-dir", str(dirs["straight"])],
        # iteration 6 is the method's 3rd step: its checkpoint holds batches of 20
        [*geometric, "--run-dir", str(dirs["resumed"]),
         "--resume", str(dirs["straight"] / "checkpoints" / "ckpt-00000006.h5")],
        [*small_job(dataset, "--set", "optimizer.batch_size=100000"),
         "--run-dir", str(dirs["refused"])],
    ]
    launch = start_many("mpinewton.train", 2, commands, base / "launch")
    try:
        for ranks in (1, 3):
            proc = run_job(ranks, *_args(dataset, *KEEP), "--run-dir", str(dirs[ranks]))
            assert proc.returncode == 0, proc.stdout + proc.stderr
        done, records = launch.result(timeout=400)
    finally:
        launch.kill()
    assert len(records) == len(commands) - 1, (done.stdout[-3000:], done.stderr[-3000:])
    for record in records:
        assert all(r["rc"] == 0 for r in record.values()), record[0]
    return dirs, records, done


def test_same_batches_and_losses_on_1_2_3_ranks(runs):
    runs, _, _ = runs
    ref = read_metrics(runs[1])
    total = json.loads((runs[1] / "summary.json").read_text())["train_samples"]
    sampler = MiniBatchSampler(total, BATCH, seed=0)
    expected = []
    for r in ref:  # the batches, replayed with the sizes the norm test chose
        batch = sampler.next()
        assert r["batch_size"] == batch.size
        expected.append(hashlib.sha256(batch.astype("<i8").tobytes()).hexdigest())
        if r.get("next_batch_size"):
            sampler.grow(r["next_batch_size"])
    assert [r["batch_sha256"] for r in ref] == expected
    sizes = [r["batch_size"] for r in ref]
    assert sizes[0] == BATCH and BATCH < max(sizes) <= 60, sizes  # it grew, within the cap
    assert all(r["batch_size"] == BATCH for r in ref if r["phase"] == "pretrain")
    for ranks in (2, 3):
        records = read_metrics(runs[ranks])
        assert [r["batch_sha256"] for r in records] == expected
        for a, b in zip(records, ref, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9)
        w, w_ref = read_weights(runs[ranks]), read_weights(runs[1])
        assert np.linalg.norm(w - w_ref) <= 1e-10 * np.linalg.norm(w_ref)


def test_resume_mid_epoch_draws_the_same_batches(runs):
    runs, records, _ = runs
    straight, run = runs[2], runs["mid_epoch"]
    assert "after iteration 4" in records[1][0]["stdout"]
    np.testing.assert_array_equal(read_weights(run), read_weights(straight))
    resumed = read_metrics(run)
    assert [r["batch_sha256"] for r in resumed] == \
        [r["batch_sha256"] for r in read_metrics(straight)][4:]


def test_geometric_batches_double_every_k_method_steps_and_resume(runs):
    """``batch_growth = "geometric"``: the batch doubles after every 2nd step of the method.

    Pre-training keeps the first size; the steps count from the method's first,
    and a run resumed between two growths grows where the uninterrupted one did.
    """
    runs, _, _ = runs
    records = read_metrics(runs["straight"])
    assert [r["batch_size"] for r in records] == [10] * 3 + [10, 10, 20, 20, 35, 35]
    assert [r.get("next_batch_size") for r in records][3:] == [None, 20, None, 35, None, None]
    again = read_metrics(runs["resumed"])  # from iteration 6
    assert [r["batch_size"] for r in again] == [20, 35, 35]
    assert [r["batch_sha256"] for r in again] == [r["batch_sha256"] for r in records][6:]
    np.testing.assert_array_equal(read_weights(runs["resumed"]), read_weights(runs["straight"]))


def test_batch_larger_than_the_data_set_is_an_error(runs):
    _, _, done = runs  # the launch's last command, through the real entry point
    assert done.returncode == 2
    assert "optimizer.batch_size = 100000 exceeds the" in done.stderr
