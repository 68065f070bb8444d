"""Exact resume of each method's state, as whole training jobs under mpirun.

Split from tests/test_resume_mpi.py (signals, rank counts, corrupt checkpoints) so
that the two files run on two test workers side by side.
"""


import json

import numpy as np
import pytest
from mpijobs import (
    TIMING,
    read_metrics,
    read_weights,
    requires_mpirun,
    small_job,
    start_many,
)

pytestmark = requires_mpirun

#: Newton-CG with every piece of state it carries across iterations: Gauss-Newton
#: products, Levenberg-Marquardt damping, the Fisher preconditioner, Eisenstat-Walker
#: forcing, CG's warm start, and a curvature sample that grows whenever the damping
#: stays above 1.001 x its initial value (damping_min = 10 x damping: at every step).
NEWTON_STATE = [
    "optimizer.curvature='gauss_newton'", "optimizer.damping_rule='levenberg_marquardt'",
    "optimizer.preconditioner='fisher'", "optimizer.forcing='eisenstat_walker'",
    "optimizer.warm_start='previous'", "optimizer.curvature_fraction=0.2",
    "optimizer.curvature_growth='damping'", "optimizer.curvature_growth_threshold=1.001",
    "optimizer.curvature_fraction_max=1.0", "optimizer.damping=1e-2",
    "optimizer.damping_min=0.1"]



# the factors' running averages, the inverses of the last refresh (every 3 steps, so the
# resumed step 3 uses step 1's and step 4 inverts with the damping adapted since), the
# velocity, the adapted damping and the sampled Fisher's draws
KFAC_STATE = ["optimizer.method='kfac'", "optimizer.curvature_fraction=0.5",
              "optimizer.inverse_every=3", "optimizer.stats_every=2",
              "optimizer.learning_rate=0.05", "optimizer.fisher='sampled'",
              "optimizer.damping_rule='levenberg_marquardt'", "optimizer.damping_every=1"]


METHODS = {"lbfgs": ["optimizer.method='lbfgs'"], "newton-gauss-newton-lm-growth": NEWTON_STATE,
           "kfac": KFAC_STATE}


def _jobs(dataset, base, name):
    """The uninterrupted job, the job stopped after 2 of its 4 iterations, its resume."""
    sets = [arg for item in METHODS[name] for arg in ("--set", item)]
    args = [*small_job(dataset), *sets]
    straight, resumed = str(base / name / "straight"), str(base / name / "resumed")
    return [[*args, "--run-dir", straight],
            [*args, "--set", "optimizer.iters=2", "--run-dir", resumed],
            [*args, "--run-dir", resumed, "--resume"]]


@pytest.fixture(scope="module")
def method_runs(dataset, tmp_path_factory):
    """Each method's three 2-rank jobs (:func:`_jobs`), all in ONE mpirun launch
    (``mpijobs.start_many``; a launch costs each rank TensorFlow's start). A job's
    numbers do not depend on the jobs run before it in the process
    (``tests/test_threads.py``): K-FAC's first job once inverted on other threads.

    Returns the base folder and, per method, each job's exit status and output.
    """
    base = tmp_path_factory.mktemp("methods")
    commands = [job for name in METHODS for job in _jobs(dataset, base, name)]
    launch = start_many("mpinewton.train", 2, commands, base / "launch")
    try:
        records = launch.outcomes(timeout=400)
    finally:
        launch.kill()
    shared = [(rec[0]["rc"], rec[0]["stdout"] + rec[0]["stderr"]) for rec in records]
    assert shared[-1][0] == 0, shared[-1][1][-3000:]  # the launch's exit status
    return base, {name: shared[3 * i:3 * i + 3] for i, name in enumerate(METHODS)}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_method_state_resumes_exactly(method_runs, method):
    """The L-BFGS memory and gradient cache, the LM damping, forcing and warm-start
    state, the curvature sample's growth and K-FAC's factors, inverses and damping resume
    exactly: a job stopped after 2 of its 4 iterations and resumed ends bitwise where
    the uninterrupted job does, with the same records."""
    base, outputs = method_runs
    for rc, output in outputs[method]:
        assert rc == 0, output[-3000:]
    assert "resuming from" in outputs[method][2][1]
    straight, run_dir = base / method / "straight", base / method / "resumed"
    method = METHODS[method]
    np.testing.assert_array_equal(read_weights(run_dir), read_weights(straight))
    drop = TIMING | {"weights_sha256"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run_dir)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(straight)]
    if method is NEWTON_STATE:
        # The sample doubled after every step (21, 41, 81 of the 101 samples, then all),
        # also across the checkpoint after iteration 2: a fresh rule would have started
        # over at a fifth. (The records are the same as the uninterrupted run's, above.)
        sizes = [r["curvature_samples"] for r in read_metrics(run_dir) if "curvature_samples" in r]
        assert sizes == [21, 41, 81, 101], sizes
    if method is KFAC_STATE:  # the damping moved, so its resume was checked above
        dampings = [r["damping"] for r in read_metrics(run_dir) if r.get("phase") == "kfac"]
        assert len(dampings) == 4 and len(set(dampings)) > 1, dampings
        # one Gauss-Newton product a step (damping_every = 1), on the curvature sample,
        # which shares the batch's counters: counted once, per step and in the summary
        products = [r["hvps"] for r in read_metrics(run_dir) if r.get("phase") == "kfac"]
        assert products == [1, 1, 1, 1], products
        for folder in (run_dir, straight):
            summary = json.loads((folder / "summary.json").read_text())
            assert summary["hvps"] == 4, summary["hvps"]
