"""Job files: defaults, overrides, and errors that name the nearest valid key."""

import pytest

from mpinewton.config import DEFAULT_JOB, ConfigError, JobConfig, build_job, load_job


def test_default_job_is_the_thesis_experiment():
    job = load_job(None)
    assert DEFAULT_JOB.name == "mnist_cnn.toml"
    assert job.model.name == "thesis_cnn" and job.model.dtype == "float64"
    assert job.optimizer.pretrain_iters == 60 and job.optimizer.iters == 20
    assert job.optimizer.warm_start == "weights" and job.optimizer.step_rule == "armijo"
    assert job.data.train_splits == ("train",) and job.data.limit == 0


def test_toml_round_trip(tmp_path):
    job = load_job(None, ["optimizer.iters=3", "data.train_splits=['train','validation']"])
    path = tmp_path / "job.toml"
    path.write_text(job.to_toml())
    again = load_job(path)
    assert again == job and again.digest() == job.digest()
    assert again.data.train_splits == ("train", "validation")


def test_override_types_are_checked():
    assert load_job(None, ["optimizer.damping=1e-3"]).optimizer.damping == 1e-3
    assert load_job(None, ["optimizer.damping=1"]).optimizer.damping == 1.0
    with pytest.raises(ConfigError, match="optimizer.iters = 'many' has the wrong type"):
        load_job(None, ["optimizer.iters=many"])


@pytest.mark.parametrize("override, nearest", [
    ("optimizer.damp=0.1", "optimizer.damping"),
    ("optimiser.iters=1", "[optimizer]"),
    ("optimizer.cg_maxiter=5", "optimizer.cg_max_iter"),
    ("data.pth=x.h5", "data.path"),
])
def test_unknown_key_names_nearest(override, nearest):
    with pytest.raises(ConfigError, match=f"did you mean {nearest}".replace("[", r"\[")
                       .replace("]", r"\]")):
        load_job(None, [override])


@pytest.mark.parametrize("override, message", [
    ("optimizer.warm_start='prev'", "did you mean 'previous'"),
    ("optimizer.armijo_beta=1.5", "must lie in"),
    ("objective.micro_batch=0", "must be > 0"),
    ("optimizer.iters=-1", "must be >= 0"),
    ("model.dtype='float16'", "not one of float32, float64"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer\niters = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_job(None, ["iters=3"])


def test_empty_tables_give_defaults():
    assert build_job({}) == JobConfig()
