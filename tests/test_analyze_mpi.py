"""``python -m mpinewton.analyze`` under mpirun: the same curvature on 1, 2 and 3 ranks.

A small thesis CNN (8 x 8 images, 312 weights, float64) on 60 samples: the
explicit Hessian the command assembles from column blocks computed on
different ranks equals the one-process ``tape.jacobian`` Hessian (itself
checked against second differences of the gradient); the
eigenvalues of power iteration and Lanczos match ``numpy.linalg.eigh`` of it;
the trace estimate lies within three standard errors of the exact trace. The
Taylor slopes 2 and 3 are checked on a small MLP: its tanh makes the loss
smooth, while the CNN's ReLU puts kinks within the tested distances
(docs/results.md).

Starting a rank (Python, TensorFlow) costs more than most commands here, so
the module makes one mpirun launch per rank count, the three at once
(``mpijobs.start_analyze_many``): each rank runs the commands one after
another in-process, and the last command of each launch goes through the real
``python -m mpinewton.analyze`` entry point, so its exit status is the
launch's.
"""

import json

import h5py
import numpy as np
import pytest
from mpijobs import requires_mpirun, start_analyze_many

from mpinewton.data import write_dataset

pytestmark = requires_mpirun

SHAPE = ["--set", "model.input_shape=[8, 8, 1]", "--set", "objective.jit=false",
         "--set", "objective.micro_batch=32"]
MLP = ["--set", "model.name='mlp'", "--set", "model.hidden=[6]"]
BAD_INPUT = [
    (["eigen", "-k", "400"], "-k 400: ask for 1 to 312 eigenpairs"),
    (["surface", "--points", "0"], "--points 0: the grid needs at least one point"),
    (["trace", "--samples", "1"], "--samples 1: a standard error needs at least 2 probes"),
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 10, 60)
    x = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    write_dataset(path, {"train": (x, y), "validation": (x[:10], y[:10])}, num_classes=10,
                  source="test")
    return ["--set", f"data.path={json.dumps(str(path))}", *SHAPE], (x, y)


@pytest.fixture(scope="module")
def reference(small, launched):
    """The one-process explicit Hessian (the thesis' tape.jacobian) at the start weights.

    (``launched``: the mpirun launches start first and run while this is computed.)
    """
    from mpinewton.local import LocalObjective
    from mpinewton.models import thesis_cnn
    from mpinewton.params import get_flat

    _, (x, y) = small
    model = thesis_cnn(input_shape=(8, 8, 1))
    local = LocalObjective(model, x, y, jit=False, micro_batch=32)
    w = get_flat(model)
    h = local.hessian_sum(w) / len(y)
    # Numerical second differences: central differences of the gradient, O(eps^2),
    # along weights of the dense layers (a conv weight's step can cross a ReLU kink).
    eps = 1e-5
    for j in (17, 150, 300):
        e = np.zeros_like(w)
        e[j] = eps
        diff = (local.loss_grad_sum(w + e)[1] - local.loss_grad_sum(w - e)[1]) / (2 * eps * len(y))
        assert np.abs(diff - h[:, j]).max() <= 1e-6 * np.abs(h).max(), j
    return h


class Outcome:
    """One analyze command's return code(s), rank 0's stderr, and its output folder."""

    def __init__(self, out, codes, stderr, log):
        self.out, self.codes, self.stderr, self.log = out, codes, stderr, log

    def check(self, code):
        """Every rank returned ``code`` (the launch's exit status for a launch's last command)."""
        assert self.codes and all(c == code for c in self.codes), (self.codes, self.log)


@pytest.fixture(scope="module")
def launched(small, tmp_path_factory):
    """Every command of this module planned and started: one mpirun launch per rank count."""
    from mpinewton.checkpoint import write_checkpoint

    args, _ = small
    base = tmp_path_factory.mktemp("analysis")
    other = write_checkpoint(base / "ckpts", iteration=1, weights={"dense/kernel": np.ones(3)},
                             state={}, config_toml="", config_sha256="0" * 64, world_size=1)
    plans = {ranks: [] for ranks in (1, 2, 3)}

    def plan(ranks, name, command, *extra):
        plans[ranks].append((name, base / name, [command, *args, "--out", str(base / name),
                                                 *extra]))

    for ranks in (1, 2, 3):  # the same quantities on every rank count
        for command in ("hessian", "eigen", "trace"):
            extra = ["-k", "3", "--tol", "1e-9"] if command == "eigen" else []
            plan(ranks, f"outputs{ranks}", command, *extra)
    plan(1, "taylor1", "taylor", *MLP)
    plan(2, "plots", "spectrum", "--runs", "2", "--steps", "20")
    plan(2, "plots", "surface", "--points", "5", "--directions", "random")
    plan(2, "lanczos_only", "eigen", "-k", "2", "--tol", "1e-9", "--method", "lanczos")
    plan(3, "low_memory", "eigen", "-k", "2", "--tol", "1e-9", "--method", "lanczos",
         "--low-memory")
    # Refusals last, after every command that must succeed.
    plan(2, "checkpoint", "eigen", "--checkpoint", str(other))
    for i, (extra, _) in enumerate(BAD_INPUT):
        plan(2, f"bad{i}", *extra)
    plan(1, "too_large", "hessian", "--set", "model.name='mlp'",
         "--set", "model.hidden=[4096, 4096]")
    plan(3, "taylor3", "taylor", *MLP)  # through the CLI's entry point: exit status 0

    # The three launches overlap: a 1-rank launch leaves a core idle, and a rank spends
    # much of its life starting Python and TensorFlow.
    started = {ranks: start_analyze_many(ranks, [argv for _, _, argv in items],
                                         base / f"launch{ranks}")
               for ranks, items in plans.items()}
    try:
        yield plans, started, other
    finally:
        for launch in started.values():
            launch.kill()


@pytest.fixture(scope="module")
def launches(launched):
    """Each command's outcome, by (folder name, command), once its launch has ended."""
    plans, started, other = launched
    outcomes = {("checkpoint", "path"): other}
    for ranks, items in plans.items():
        proc, records = started[ranks].result(timeout=400)
        log = f"mpirun -n {ranks}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        for i, (name, out, argv) in enumerate(items):
            if i == len(items) - 1:  # through the CLI: the launch's exit status
                outcome = Outcome(out, [proc.returncode], proc.stderr, log)
            elif i < len(records) and len(records[i]) == ranks:
                rec = records[i]
                outcome = Outcome(out, [rec[r]["rc"] for r in range(ranks)],
                                  rec[0]["stderr"], f"{rec[0]}\n{log}")
            else:  # the launch failed before every rank reported this command
                outcome = Outcome(out, [], "", f"no result\n{log}")
            outcomes[(name, argv[0])] = outcome
    return outcomes


@pytest.fixture(scope="module")
def outputs(launches):
    runs = {}
    for ranks in (1, 2, 3):
        for command in ("hessian", "eigen", "trace"):
            outcome = launches[(f"outputs{ranks}", command)]
            outcome.check(0)
        runs[ranks] = outcome.out
    return runs


def _json(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_explicit_hessian_is_the_same_on_1_2_3_ranks(reference, outputs):
    for ranks, out in outputs.items():
        with h5py.File(out / "hessian.h5") as f:
            h = f["H"][...]
            assert f.attrs["symmetry_error"] < 1e-12
        scale = np.abs(reference).max()
        assert np.abs(h - reference).max() <= 1e-10 * scale, ranks


def test_eigenvalues_of_both_methods_match_eigh(reference, outputs):
    exact = np.linalg.eigvalsh(0.5 * (reference + reference.T))
    top = exact[np.argsort(-np.abs(exact))][:3]
    for out in outputs.values():
        result = _json(out, "eigen")
        for method in ("lanczos", "power"):
            np.testing.assert_allclose(result[method]["values"], top, rtol=1e-6)
            assert result[method]["products"] > 0


def test_trace_within_three_standard_errors(reference, outputs):
    for out in outputs.values():
        result = _json(out, "trace")
        assert abs(result["trace"] - np.trace(reference)) <= 3 * result["stderr"]
        assert result["stderr"] > 0


@pytest.mark.parametrize("ranks", [1, 3])
def test_taylor_slopes_of_a_smooth_model(launches, ranks):
    outcome = launches[(f"taylor{ranks}", "taylor")]
    outcome.check(0)
    result = _json(outcome.out, "taylor")
    for direction in ("random", "eigenvector"):
        assert abs(result[direction]["slope0"] - 1) <= 0.2, result[direction]
        assert abs(result[direction]["slope1"] - 2) <= 0.2, result[direction]
        assert abs(result[direction]["slope2"] - 3) <= 0.2, result[direction]
    assert (outcome.out / "taylor.png").stat().st_size > 0


def test_spectrum_and_surface_write_data_and_plots(launches):
    for command in ("spectrum", "surface"):
        outcome = launches[("plots", command)]
        outcome.check(0)
        assert (outcome.out / f"{command}.png").stat().st_size > 0
    with h5py.File(outcome.out / "surface.h5") as f:
        plane = f["plane"][...]
        assert plane.shape == (5, 5) and np.all(np.isfinite(plane))
        assert plane[2, 2] == pytest.approx(_json(outcome.out, "surface")["loss_at_w"])
    assert _json(outcome.out, "spectrum")["products"] > 0


@pytest.mark.parametrize(("index", "extra", "message"),
                         [(i, extra, message) for i, (extra, message) in enumerate(BAD_INPUT)],
                         ids=[message for _, message in BAD_INPUT])
def test_bad_input_is_refused_on_every_rank(launches, index, extra, message):
    outcome = launches[(f"bad{index}", extra[0])]
    outcome.check(2)
    assert "failed on rank 0, 1" in outcome.stderr and message in outcome.stderr, outcome.log


def test_hessian_of_a_model_too_large_is_refused(launches):
    outcome = launches[("too_large", "hessian")]
    outcome.check(2)
    assert ("the explicit Hessian of 17,088,522 weights needs 2,175,700.5 GiB, more than the"
            in outcome.stderr), outcome.log


def test_checkpoint_of_another_model_is_refused(launches):
    outcome = launches[("checkpoint", "eigen")]
    outcome.check(2)
    path = launches[("checkpoint", "path")]
    assert f"loading the weights failed on rank 0: ConfigError: --checkpoint {path}" \
        in outcome.stderr, outcome.log
    assert "variable 0" in outcome.stderr and "in the checkpoint" in outcome.stderr, outcome.log


def test_eigen_method_lanczos_runs_lanczos_only(launches, outputs):
    """``--method lanczos`` (for models where power iteration costs too many products)."""
    outcome = launches[("lanczos_only", "eigen")]
    outcome.check(0)
    result = _json(outcome.out, "eigen")
    assert result["method"] == "lanczos" and "power" not in result
    both = _json(outputs[2], "eigen")
    assert result["lanczos"]["values"] == pytest.approx(both["lanczos"]["values"][:2], rel=1e-8)
    with h5py.File(outcome.out / "eigen.h5") as f:
        assert set(f) == {"lanczos"}


def test_eigen_low_memory_gives_the_same_pairs_on_3_ranks(launches, outputs):
    """``--low-memory``: Lanczos without a basis, twice the products, the same eigenvalues."""
    outcome = launches[("low_memory", "eigen")]
    outcome.check(0)
    result = _json(outcome.out, "eigen")
    assert result["low_memory"] is True
    both = _json(outputs[3], "eigen")
    assert result["lanczos"]["values"] == pytest.approx(both["lanczos"]["values"][:2], rel=1e-8)
    assert all(result["lanczos"]["converged"])
