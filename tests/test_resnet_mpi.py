"""A ResNet job on small RGB images under mpirun: 2 stochastic Newton iterations, 1 vs 2 ranks.

``resnet_mini`` has ResNet-50's building blocks (bottlenecks with batch norm on
moving statistics, projection shortcuts) at a size that runs in seconds; the
job is float32 with Keras' ResNet-50 ('caffe') preprocessing and mini-batches,
the path of jobs/resnet50_imagenet.toml.
"""

import json

import h5py
import numpy as np
import pytest
from mpijobs import MPIRUN, read_metrics, run_job

from mpinewton.data import write_dataset

pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")


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
            "--set", "optimizer.iters=2", "--set", "optimizer.cg_max_iter=5",
            "--set", "checkpoint.every=0", "--check-sync"]


@pytest.mark.timeout(300)
def test_resnet_job_same_losses_on_1_and_2_ranks(rgb_dataset, tmp_path):
    runs = {}
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
        assert any(name.endswith("moving_mean") for name in names), names
    one, two = runs[1], runs[2]
    assert [r["phase"] for r in one] == ["newton", "newton"]
    assert [r["batch_sha256"] for r in one] == [r["batch_sha256"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["cg_iters"] >= 1 and np.isfinite(a["new_loss"])
