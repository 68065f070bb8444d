"""mpinewton.Objective and the job that mpinewton.fit resolves (one process)."""

import keras
import numpy as np
import pytest

import mpinewton
from mpinewton.api import resolve_job
from mpinewton.comm import Comm, DistributedError
from mpinewton.config import RECOMMENDED_OPTIMIZER, ConfigError


@pytest.fixture(scope="module")
def regression():
    # explicit dtypes: other tests in this process may have set Keras' global dtype policy
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 2))
    model = keras.Sequential([keras.Input((4,), dtype="float64"),
                              keras.layers.Dense(3, activation="tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    assert {v.dtype for v in model.trainable_variables} == {"float64"}
    return model, x, y


def test_objective_products_against_finite_differences(regression):
    model, x, y = regression
    obj = mpinewton.Objective(model, (x, y), loss="mean_squared_error", comm=Comm(None),
                              jit=False)
    w = obj.w0
    loss, g = obj.value_and_grad(w)
    out = model(x).numpy()
    assert loss == pytest.approx(np.mean(np.mean((out - y) ** 2, axis=1)), rel=1e-12)
    rng = np.random.default_rng(1)
    v = rng.normal(size=w.size)
    eps = 1e-6
    fd = (obj.value_and_grad(w + eps * v)[1] - obj.value_and_grad(w - eps * v)[1]) / (2 * eps)
    hv = obj.curvature(w, "hessian").matvec(v)
    assert np.linalg.norm(hv - fd) <= 1e-7 * np.linalg.norm(fd)
    gauss_newton = obj.curvature(w, "gauss_newton")
    assert float(v @ gauss_newton.matvec(v)) >= 0.0
    values = obj.evaluate(w)
    assert values["loss"] == pytest.approx(loss, rel=1e-12)
    assert values["mae"] == pytest.approx(np.mean(np.abs(out - y)), rel=1e-12)


def test_objective_refuses_samples_of_the_wrong_shape(regression):
    model, _, y = regression
    with pytest.raises(DistributedError, match=r"samples have shape \(5,\).*expects \(4,\)"):
        mpinewton.Objective(model, (np.zeros((50, 5)), y), loss="mean_squared_error",
                            comm=Comm(None))


def test_fit_resolves_tables_overrides_data_and_dtype(regression):
    model, x, y = regression
    arrays = {"train": (x, y), "validation": (x[:5], y[:5])}
    job = resolve_job(None, {"optimizer": {"iters": 7}, "objective": {"loss": "mean_squared_error"},
                             "model": {"args": {"units": 3}}},
                      ["eval.every=2", "model.args.depth=2"], arrays, arrays, model)
    assert job.optimizer.iters == 7 and job.optimizer.pretrain_iters == 0
    assert job.optimizer.params.curvature == RECOMMENDED_OPTIMIZER["curvature"]
    assert job.eval.every == 2 and job.model.args == {"units": 3, "depth": 2}
    assert job.data.eval_splits == ("validation",)
    assert job.model.dtype == "float64"  # from the model's weights
    file_job = resolve_job(None, {}, [], None, "data/some.h5", None)
    assert file_job.data.path == "data/some.h5"


@pytest.mark.parametrize("sections, overrides, message", [
    ({"optimzer": {"iters": 2}}, [], "unknown section"),
    ({"optimizer": {"iterz": 2}}, [], "did you mean optimizer.iters"),
    ({"optimizer": 5}, [], "must be a dict"),
    ({"model": {"dtype": "float32"}}, [], "model's weights are float64"),
    ({}, ["optimizer.iters=-1"], "optimizer.iters"),
])
def test_fit_refuses_bad_options(regression, sections, overrides, message):
    model, x, y = regression
    with pytest.raises(ConfigError, match=message):
        resolve_job(None, sections, overrides, {"train": (x, y)}, None, model)


def test_fit_refuses_bad_data_shapes():
    with pytest.raises(ConfigError, match=r"must be \(x, y\)"):
        mpinewton.fit(None, (np.zeros(3),), comm=Comm(None))
    with pytest.raises(ConfigError, match="dataset file"):
        mpinewton.fit(None, 42, comm=Comm(None))
