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
"""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from mpijobs import MPIRUN, ROOT, mpi_env

from mpinewton.data import write_dataset

pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")

SHAPE = ["--set", "model.input_shape=[8, 8, 1]", "--set", "objective.jit=false",
         "--set", "objective.micro_batch=32"]


def analyze(ranks, *args, timeout=240):
    cmd = [MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable, "-m",
           "mpinewton.analyze", *args]
    return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True,
                          timeout=timeout)


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
def reference(small):
    """The one-process explicit Hessian (the thesis' tape.jacobian) at the start weights."""
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


@pytest.fixture(scope="module")
def outputs(small, tmp_path_factory):
    args, _ = small
    runs = {}
    for ranks in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"analysis{ranks}")
        for command in ("hessian", "eigen", "trace"):
            extra = ["-k", "3", "--tol", "1e-9"] if command == "eigen" else []
            proc = analyze(ranks, command, *args, "--out", str(out), *extra)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[ranks] = out
    return runs


def _json(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_explicit_hessian_is_the_same_on_1_2_3_ranks(outputs, reference):
    for ranks, out in outputs.items():
        with h5py.File(out / "hessian.h5") as f:
            h = f["H"][...]
            assert f.attrs["symmetry_error"] < 1e-12
        scale = np.abs(reference).max()
        assert np.abs(h - reference).max() <= 1e-10 * scale, ranks


def test_eigenvalues_of_both_methods_match_eigh(outputs, reference):
    exact = np.linalg.eigvalsh(0.5 * (reference + reference.T))
    top = exact[np.argsort(-np.abs(exact))][:3]
    for out in outputs.values():
        result = _json(out, "eigen")
        for method in ("lanczos", "power"):
            np.testing.assert_allclose(result[method]["values"], top, rtol=1e-6)
            assert result[method]["products"] > 0


def test_trace_within_three_standard_errors(outputs, reference):
    for out in outputs.values():
        result = _json(out, "trace")
        assert abs(result["trace"] - np.trace(reference)) <= 3 * result["stderr"]
        assert result["stderr"] > 0


@pytest.mark.parametrize("ranks", [1, 3])
def test_taylor_slopes_of_a_smooth_model(small, tmp_path, ranks):
    args, _ = small
    proc = analyze(ranks, "taylor", *args, "--set", "model.name='mlp'",
                   "--set", "model.hidden=[6]", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _json(tmp_path, "taylor")
    for direction in ("random", "eigenvector"):
        assert abs(result[direction]["slope0"] - 1) <= 0.2, result[direction]
        assert abs(result[direction]["slope1"] - 2) <= 0.2, result[direction]
        assert abs(result[direction]["slope2"] - 3) <= 0.2, result[direction]
    assert (tmp_path / "taylor.png").stat().st_size > 0


def test_spectrum_and_surface_write_data_and_plots(small, tmp_path):
    args, _ = small
    for command, extra in (("spectrum", ["--runs", "2", "--steps", "20"]),
                           ("surface", ["--points", "5", "--directions", "random"])):
        proc = analyze(2, command, *args, "--out", str(tmp_path), *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (tmp_path / f"{command}.png").stat().st_size > 0
    with h5py.File(tmp_path / "surface.h5") as f:
        plane = f["plane"][...]
        assert plane.shape == (5, 5) and np.all(np.isfinite(plane))
        assert plane[2, 2] == pytest.approx(_json(tmp_path, "surface")["loss_at_w"])
    assert _json(tmp_path, "spectrum")["products"] > 0


@pytest.mark.parametrize(("extra", "message"), [
    (["eigen", "-k", "400"], "-k 400: ask for 1 to 312 eigenpairs"),
    (["surface", "--points", "0"], "--points 0: the grid needs at least one point"),
    (["trace", "--samples", "1"], "--samples 1: a standard error needs at least 2 probes"),
])
def test_bad_input_is_refused_on_every_rank(small, tmp_path, extra, message):
    args, _ = small
    proc = analyze(2, extra[0], *args, "--out", str(tmp_path), *extra[1:], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "failed on rank 0, 1" in proc.stderr and message in proc.stderr, proc.stderr


def test_hessian_of_a_model_too_large_is_refused(small, tmp_path):
    args, _ = small
    proc = analyze(1, "hessian", *args, "--set", "model.name='mlp'",
                   "--set", "model.hidden=[4096, 4096]", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("the explicit Hessian of 17,088,522 weights needs 2,175,700.5 GiB, more than the"
            in proc.stderr), proc.stderr


def test_checkpoint_of_another_model_is_refused(small, tmp_path):
    from mpinewton.checkpoint import write_checkpoint

    args, _ = small
    path = write_checkpoint(tmp_path / "ckpts", iteration=1, weights={"dense/kernel": np.ones(3)},
                            state={}, config_toml="", config_sha256="0" * 64, world_size=1)
    proc = analyze(2, "eigen", *args, "--checkpoint", str(path), "--out", str(tmp_path),
                   timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"loading the weights failed on rank 0: ConfigError: --checkpoint {path}" \
        in proc.stderr, proc.stderr
    assert "variable 0" in proc.stderr and "in the checkpoint" in proc.stderr, proc.stderr
