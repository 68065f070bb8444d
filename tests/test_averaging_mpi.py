"""``optimizer.average`` under mpirun: the model is the average of the method's iterates.

The average is checked against its closed form over the iterates the
checkpoints hold (every iteration checkpointed), on 1 and 3 ranks, and a run
resumed from a checkpoint mid-way ends with the same average.
"""

import json

import h5py
import numpy as np
import pytest
from mpijobs import read_metrics, requires_mpirun, run_job, small_job

from mpinewton.checkpoint import load_checkpoint

pytestmark = requires_mpirun
DECAY = 0.6


def _args(dataset, *extra):
    return small_job(dataset, "--set", "optimizer.batch_size=23",
                     "--set", "objective.micro_batch=5", "--set", f"optimizer.average={DECAY}",
                     "--set", "eval.every=2", *extra)


def _variables(path):
    """The datasets under ``variables/`` of a weights file, by variable name."""
    out = {}
    with h5py.File(path) as f:
        f["variables"].visititems(lambda name, obj: out.__setitem__(name, obj[...])
                                  if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    out = {}
    for ranks in (1, 3):
        run_dir = tmp_path_factory.mktemp(f"avg{ranks}")
        proc = run_job(ranks, *_args(dataset, "--set", "checkpoint.every=1",
                                     "--set", "checkpoint.keep=10"), "--run-dir", str(run_dir))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[ranks] = run_dir
    return out


def test_the_weights_are_the_average_of_the_method_iterates(runs):
    run_dir = runs[3]
    summary = json.loads((run_dir / "summary.json").read_text())
    pre, iters = summary["pretrain_iters"], summary["method_iters"]
    assert summary["average"] == DECAY and iters == 4 and pre == 3
    # the method's iterates w_4 .. w_7 (pre-training is not averaged), from the checkpoints
    ckpts = [load_checkpoint(run_dir / "checkpoints" / f"ckpt-{k:08d}.h5")
             for k in range(pre + 1, pre + iters + 1)]
    coefficients = [DECAY ** (iters - j) * (1 - DECAY) / (1 - DECAY ** iters)
                    for j in range(1, iters + 1)]
    final = _variables(run_dir / "weights.h5")
    trained = ckpts[-1].weights
    assert trained.keys() <= final.keys()
    for name, iterate in trained.items():
        expected = sum(c * ck.weights[name] for c, ck in zip(coefficients, ckpts, strict=True))
        np.testing.assert_allclose(final[name], expected, rtol=1e-12, atol=1e-14)
        assert not np.allclose(final[name], iterate)  # the model is not the last iterate
    # the checkpoint holds the iterate (the method resumes from it) and the average
    state = ckpts[-1].state["average"]
    assert state["decay"] == DECAY and state["total"] == pytest.approx(1 - DECAY ** iters)
    # the summary's loss is the average's; the iterate's is reported beside it
    assert summary["final_loss"] != summary["final_iterate_loss"]
    evals = [m for m in read_metrics(run_dir) if m.get("phase") == "eval"]
    assert [m["iter"] for m in evals] == [2, 4, 6, 7]


def test_the_average_does_not_depend_on_the_number_of_ranks(runs):
    one, three = _variables(runs[1] / "weights.h5"), _variables(runs[3] / "weights.h5")
    assert one.keys() == three.keys()
    for name in one:
        np.testing.assert_allclose(three[name], one[name], rtol=1e-10, atol=1e-13)


def test_a_resumed_run_ends_with_the_same_average(dataset, runs, tmp_path):
    ckpt = runs[3] / "checkpoints" / "ckpt-00000005.h5"  # two method steps in
    proc = run_job(2, *_args(dataset), "--run-dir", str(tmp_path / "run"), "--resume", str(ckpt))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed, straight = _variables(tmp_path / "run" / "weights.h5"), \
        _variables(runs[3] / "weights.h5")
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], rtol=1e-10, atol=1e-13)
