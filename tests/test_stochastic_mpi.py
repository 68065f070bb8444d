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



@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    out = {}
    for ranks in (1, 2, 3):
        run_dir = tmp_path_factory.mktemp(f"sto{ranks}")
        proc = run_job(ranks, *_args(dataset, "--set", "checkpoint.every=1",
                                     "--set", "checkpoint.keep=10"), "--run-dir", str(run_dir))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[ranks] = run_dir
    return out


def test_same_batches_and_losses_on_1_2_3_ranks(runs):
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


def test_resume_mid_epoch_draws_the_same_batches(dataset, runs, tmp_path):
    straight = runs[2]
    ckpt = straight / "checkpoints" / "ckpt-00000004.h5"
    proc = run_job(2, *_args(dataset), "--run-dir", str(tmp_path / "run"), "--resume", str(ckpt))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "after iteration 4" in proc.stdout
    np.testing.assert_array_equal(read_weights(tmp_path / "run"), read_weights(straight))
    resumed = read_metrics(tmp_path / "run")
    assert [r["batch_sha256"] for r in resumed] == \
        [r["batch_sha256"] for r in read_metrics(straight)][4:]


def test_geometric_batches_double_every_k_method_steps_and_resume(dataset, tmp_path):
    """``batch_growth = "geometric"``: the batch doubles after every 2nd step of the method.

    Pre-training keeps the first size; the steps count from the method's first,
    and a run resumed between two growths grows where the uninterrupted one did.
    """
    args = small_job(dataset, "--set", "optimizer.batch_size=10", "--set",
                     "objective.micro_batch=5", "--set", "optimizer.batch_growth='geometric'",
                     "--set", "optimizer.batch_every=2", "--set", "optimizer.batch_max=35",
                     "--set", "optimizer.iters=6")
    straight = tmp_path / "straight"
    proc = run_job(2, *args, "--set", "checkpoint.every=1", "--set", "checkpoint.keep=10",
                   "--run-dir", str(straight))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(straight)
    assert [r["batch_size"] for r in records] == [10] * 3 + [10, 10, 20, 20, 35, 35]
    assert [r.get("next_batch_size") for r in records][3:] == [None, 20, None, 35, None, None]
    # iteration 6 is the method's 3rd step: its checkpoint holds batches of 20
    resumed = tmp_path / "resumed"
    proc = run_job(2, *args, "--run-dir", str(resumed),
                   "--resume", str(straight / "checkpoints" / "ckpt-00000006.h5"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = read_metrics(resumed)
    assert [r["batch_size"] for r in again] == [20, 35, 35]
    assert [r["batch_sha256"] for r in again] == [r["batch_sha256"] for r in records][6:]
    np.testing.assert_array_equal(read_weights(resumed), read_weights(straight))


def test_batch_larger_than_the_data_set_is_an_error(dataset, tmp_path):
    proc = run_job(2, *small_job(dataset, "--set", "optimizer.batch_size=100000"),
                   "--run-dir", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2
    assert "optimizer.batch_size = 100000 exceeds the" in proc.stderr
