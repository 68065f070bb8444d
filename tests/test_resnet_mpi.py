"""A ResNet job on small RGB images under mpirun: 4 stochastic Newton iterations, 1 vs 2 ranks.

``resnet_mini`` has ResNet-50's building blocks (bottlenecks with batch norm on
moving statistics, projection shortcuts) at a size that runs in seconds; the
job is float32 with Keras' ResNet-50 ('caffe') preprocessing and mini-batches,
the path of jobs/resnet50_imagenet.toml. Four iterations, so that three start
from weights that earlier Newton steps moved, each on a fresh batch.
"""

import json

import h5py
import numpy as np
import pytest
from mpijobs import read_metrics, requires_mpirun, run_job

from mpinewton.data import write_dataset

pytestmark = requires_mpirun

ITERS = 4  # 4 x 16 = 64 of the 70 training images: one epoch, a fresh batch each iteration

#: The runs differ only in float32 rounding, not in what they compute: the
#: reductions across ranks are float64, and with the same intra-op thread count
#: 1 and 2 ranks give bitwise identical metrics and weights (measured). But
#: ``threads.intra_op = 0`` gives 1 rank all cores and 2 ranks half each, which
#: changes the summation order inside the float32 convolutions, so losses
#: differ by about float32's epsilon (1.2e-7): measured <= 2e-7 relative over
#: 5 iterations, final weights within 4e-7 absolute (largest weight ~1.3),
#: without growth from step to step. 1e-5 is ~100 ulp of headroom, far below
#: what a real fault moves (a sample lost or counted twice in a batch of 16, a
#: wrong 1/N, another batch: percent-level changes of the loss).
RTOL = 1e-5


@pytest.fixture(scope="module")
def rgb_dataset(tmp_path_factory):
    """70 + 13 images of 64 x 64 x 3 in 5 classes, a class-coloured square in each."""
    rng = np.random.default_rng(3)
    def images(n):
        y = rng.integers(0, 5, n)
        x = rng.integers(0, 80, (n, 64, 64, 3), dtype=np.uint8)
        for i, label in enumerate(y):
            x[i, 8 * label:8 * label + 16, 10:40, label % 3] = 240
        return x, y
    path = tmp_path_factory.mktemp("rgb") / "rgb64.h5"
    write_dataset(path, {"train": images(70), "validation": images(13)}, num_classes=5,
                  source="test")
    return path


def _args(dataset):
    return ["jobs/resnet50_imagenet.toml", "--set", f"data.path={json.dumps(str(dataset))}",
            "--set", "model.name='resnet_mini'", "--set", "model.input_shape=[64, 64, 3]",
            "--set", "model.hidden=[8, 16, 32]", "--set", "model.num_classes=5",
            "--set", "model.perturb_std=0.0", "--set", "data.eval_limit=0",
            "--set", f"optimizer.iters={ITERS}", "--set", "optimizer.cg_max_iter=5",
            "--set", "checkpoint.every=0", "--check-sync"]


@pytest.mark.timeout(300)
def test_resnet_job_same_iterations_on_1_and_2_ranks(rgb_dataset, tmp_path):
    runs, weights = {}, {}
    for ranks in (1, 2):
        run_dir = tmp_path / f"r{ranks}"
        proc = run_job(ranks, *_args(rgb_dataset), "--run-dir", str(run_dir), timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[ranks] = read_metrics(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["world_size"] == ranks and summary["batch_size"] == 16
        names = []
        with h5py.File(run_dir / "weights.h5") as f:  # batch-norm statistics saved too
            f["variables"].visit(names.append)
            weights[ranks] = f["w"][()]
        assert any(name.endswith("moving_mean") for name in names), names
    one, two = runs[1], runs[2]
    assert [r["iter"] for r in one] == [r["iter"] for r in two] == list(range(1, ITERS + 1))
    assert [r["phase"] for r in one] == ["newton"] * ITERS
    assert [r["batch_sha256"] for r in one] == [r["batch_sha256"] for r in two]
    assert len({r["batch_sha256"] for r in one}) == ITERS  # a fresh batch every iteration
    for a, b in zip(one, two, strict=True):
        k = a["iter"]
        assert np.isfinite(a["loss"]) and np.isfinite(a["new_loss"]), a
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL), k
        assert a["new_loss"] == pytest.approx(b["new_loss"], rel=RTOL), k
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=RTOL), k
        # Discrete decisions must agree: the same CG stop after as many products,
        # the same step accepted after as many line-search trials.
        assert a["cg_iters"] >= 1, a
        for key in ("cg_iters", "cg_reason", "step_size", "linesearch_trials", "fallback",
                    "hvps", "epoch"):
            assert a[key] == b[key], (k, key, a[key], b[key])
    w1, w2 = weights[1], weights[2]
    assert w1.shape == w2.shape and np.all(np.isfinite(w1))
    assert not np.array_equal(w1, np.zeros_like(w1))
    np.testing.assert_allclose(w2, w1, rtol=0, atol=RTOL * np.max(np.abs(w1)))
