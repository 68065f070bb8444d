"""Job files: defaults, overrides, and errors that name the nearest valid key."""

import pytest

from mpinewton.config import DEFAULT_JOB, ConfigError, JobConfig, build_job, load_job
from mpinewton.solvers import NewtonConfig


def test_default_job_is_the_thesis_cnn_with_the_measured_best_newton():
    job = load_job(None)
    assert DEFAULT_JOB.name == "mnist_cnn.toml"
    assert job.model.name == "thesis_cnn" and job.model.dtype == "float64"
    assert job.optimizer.pretrain_iters == 60 and job.optimizer.method == "newton"
    params = job.optimizer.params
    assert (params.curvature, params.damping_rule, params.preconditioner) == (
        "gauss_newton", "levenberg_marquardt", "fisher")
    assert job.optimizer.curvature_fraction == 0.05 and params.step_rule == "armijo"
    assert job.data.train_splits == ("train",) and job.data.limit == 0


def test_thesis_job_is_the_thesis_experiment():
    job = load_job(DEFAULT_JOB.parent / "mnist_cnn_thesis.toml")
    assert job.model.name == "thesis_cnn" and job.model.dtype == "float64"
    assert job.optimizer.pretrain_iters == 60 and job.optimizer.iters == 20
    assert job.optimizer.curvature_fraction == 1.0
    assert job.optimizer.params == NewtonConfig(damping=1e-3, warm_start="weights",
                                                cg_scale_tol_sqrt_n=True)


def test_toml_round_trip(tmp_path):
    job = load_job(None, ["optimizer.iters=3", "data.train_splits=['train','validation']"])
    path = tmp_path / "job.toml"
    path.write_text(job.to_toml())
    again = load_job(path)
    assert again == job and again.digest() == job.digest()
    assert again.data.train_splits == ("train", "validation")


def test_override_types_are_checked():
    assert load_job(None, ["optimizer.damping=1e-3"]).optimizer.params.damping == 1e-3
    assert load_job(None, ["optimizer.damping=1"]).optimizer.params.damping == 1.0
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
    ("optimizer.armijo_beta=1.5", r"optimizer.armijo_beta = 1.5 must be a number in \(0, 1\)"),
    ("objective.micro_batch=0", "objective.micro_batch = 0 must be an integer >= 1"),
    ("optimizer.iters=-1", "optimizer.iters = -1 must be an integer >= 0"),
    ("model.dtype='float16'", "model.dtype = 'float16' must be one of float32, float64"),
    ("optimizer.descent_threshold=0.5", "optimizer.descent_threshold = 0.5 must be a number <= 0"),
    ("optimizer.method='trust-region'", "must be one of newton, .*; did you mean 'trust_region'"),
    ("optimizer.average=1.0", r"optimizer.average = 1.0 must be a decay in \[0, 1\)"),
    ("optimizer.average=-0.1", "optimizer.average = -0.1 must be a finite number >= 0"),
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


def test_every_solver_parameter_can_be_set_from_a_job():
    from dataclasses import fields

    from mpinewton.solvers import METHODS

    for name, method in METHODS.items():
        job = load_job(None, [f"optimizer.method={name!r}"])
        table = job.to_dict()["optimizer"]
        for f in fields(method.config_class):
            assert f.name in table, (name, f.name)
    assert load_job(None, ["optimizer.cg_atol=1e-7"]).optimizer.params.cg_atol == 1e-7
    assert load_job(None, ["optimizer.gtol=1e-6"]).optimizer.gtol == 1e-6


def test_optimizer_section_is_the_solvers_dataclass():
    from mpinewton.solvers import GDConfig, NewtonConfig

    job = load_job(None, ["optimizer.method='gd'", "optimizer.learning_rate=2.0"])
    assert job.optimizer.params == GDConfig(learning_rate=2.0)
    assert load_job(None).optimizer.params == NewtonConfig(
        curvature="gauss_newton", damping_rule="levenberg_marquardt", damping=1e-2,
        preconditioner="fisher", warm_start="previous", cg_rtol=0.1, cg_reorthogonalize=True,
        trial_gradient=True)


def test_a_parameter_of_another_method_is_left_out_with_a_note():
    job = load_job(None, ["optimizer.method='gd'"])  # the default job sets damping
    assert job.notes == ("optimizer.curvature, damping_rule, damping, preconditioner, "
                         "warm_start, cg_rtol, cg_max_iter, cg_reorthogonalize, trial_gradient, "
                         "step_rule belong to another method than 'gd' (optimizer.method) and "
                         "are ignored",)
    assert "damping" not in job.to_dict()["optimizer"]
    with pytest.raises(ConfigError, match="wrong type"):  # still checked
        load_job(None, ["optimizer.method='gd'", "optimizer.damping='big'"])
    with pytest.raises(ConfigError, match=r"must be a finite number >= 0"):
        load_job(None, ["optimizer.damping=-1"])


@pytest.mark.parametrize("path", sorted((DEFAULT_JOB.parent).glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_job_file_loads_and_switches_to_gradient_descent(path):
    job = load_job(path)
    assert job.notes == ()
    assert load_job(path, ["optimizer.method='gd'"]).optimizer.params.learning_rate > 0


def test_curvature_fraction_is_a_schedule_key_in_0_1():
    assert load_job(None, ["optimizer.curvature_fraction=0.25"]).optimizer.curvature_fraction \
        == 0.25
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="curvature_fraction"):
            load_job(None, [f"optimizer.curvature_fraction={bad}"])


def test_batch_growth_needs_mini_batches_and_sane_values():
    job = load_job(None, ["optimizer.batch_size=100", "optimizer.batch_growth='norm_test'"])
    assert job.optimizer.batch_growth == "norm_test" and job.optimizer.batch_theta == 0.9
    with pytest.raises(ConfigError, match="full-batch"):
        load_job(None, ["optimizer.batch_growth='norm_test'"])
    with pytest.raises(ConfigError, match="did you mean 'norm_test'"):
        load_job(None, ["optimizer.batch_size=100", "optimizer.batch_growth='norm'"])
    with pytest.raises(ConfigError, match="batch_theta"):
        load_job(None, ["optimizer.batch_size=100", "optimizer.batch_theta=0"])
    job = load_job(None, ["optimizer.batch_size=100", "optimizer.batch_growth='geometric'",
                          "optimizer.batch_every=20"])
    assert job.optimizer.batch_every == 20 and job.optimizer.batch_factor == 2.0
    with pytest.raises(ConfigError, match="batch_every"):  # geometric needs its period
        load_job(None, ["optimizer.batch_size=100", "optimizer.batch_growth='geometric'"])
    for bad in ("1", "0.5", "-2"):
        with pytest.raises(ConfigError, match="batch_factor"):
            load_job(None, ["optimizer.batch_size=100", "optimizer.batch_growth='geometric'",
                            "optimizer.batch_every=20", f"optimizer.batch_factor={bad}"])
    with pytest.raises(ConfigError, match="full-batch"):
        load_job(None, ["optimizer.batch_growth='geometric'", "optimizer.batch_every=20"])


def test_curvature_growth_settings_and_where_it_is_off():
    lm = ["optimizer.curvature='gauss_newton'", "optimizer.damping_rule='levenberg_marquardt'"]
    job = load_job(None, [*lm, "optimizer.curvature_fraction=0.05",
                          "optimizer.curvature_growth='damping'",
                          "optimizer.curvature_fraction_max=0.4"])
    opt = job.optimizer
    assert (opt.curvature_growth, opt.curvature_growth_threshold, opt.curvature_fraction_max) == \
        ("damping", 2.0, 0.4)
    # Where there is nothing to grow or no damping to read, the rule is off (as
    # curvature_fraction is for methods without curvature), so the default job's
    # growth does not stand in the way of --set optimizer.method=... or fraction 1.
    from mpinewton.train.loop import curvature_growth

    assert curvature_growth(opt) is not None
    for sets in (["optimizer.curvature_fraction=1.0"], ["optimizer.damping_rule='fixed'"],
                 ["optimizer.method='gd'"], ["optimizer.curvature_fraction=0.5"]):
        job = load_job(None, [*lm, "optimizer.curvature_growth='damping'", *sets])
        assert curvature_growth(job.optimizer) is None, sets
    with pytest.raises(ConfigError, match="did you mean 'damping'"):
        load_job(None, ["optimizer.curvature_growth='dampin'"])
    with pytest.raises(ConfigError, match=r"curvature_fraction_max = 1.5 must be a number in"):
        load_job(None, ["optimizer.curvature_fraction_max=1.5"])
    with pytest.raises(ConfigError, match="curvature_growth_threshold"):
        load_job(None, ["optimizer.curvature_growth_threshold=1"])


def test_recommended_optimizer_is_the_default_jobs():
    """mpinewton.fit's default Newton-CG is the default job's, but for pre-training and length."""
    from mpinewton.config import RECOMMENDED_OPTIMIZER

    table = load_job().optimizer.table()
    differ = {k: (v, table[k]) for k, v in RECOMMENDED_OPTIMIZER.items()
              if k not in ("pretrain_iters", "iters") and table[k] != v}
    assert differ == {}
    assert RECOMMENDED_OPTIMIZER["pretrain_iters"] == 0


def test_model_args_subtable_and_dotted_override(tmp_path):
    job = load_job(None, ["model.factory=pkg.mod:make", "model.args.units=64",
                          "model.args.name=x", "eval.every=5", "objective.loss=keras:huber"])
    assert job.model.args == {"units": 64, "name": "x"}
    assert job.objective.loss == "keras:huber"
    text = job.to_toml()
    assert "[model.args]" in text
    path = tmp_path / "job.toml"
    path.write_text(text)
    again = load_job(path)
    assert again == job and again.digest() == job.digest()


@pytest.mark.parametrize("override, message", [
    ("model.factory=nocolon", '"package.module:function"'),
    ("objective.loss=keras:", "objective.loss"),
    ("model.args=3", "model.args"),
    ("eval.every=-1", "eval.every"),
    ("run.max_loss_ratio=-2", "run.max_loss_ratio"),
])
def test_new_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace('"', '.')):
        load_job(None, [override])


def test_trial_gradient_is_off_on_mini_batches_with_a_note():
    """The default job keeps the trial's gradient; with mini-batches it would be wasted."""
    assert load_job().optimizer.params.trial_gradient is True
    job = load_job(None, ["optimizer.batch_size=1000"])
    assert job.optimizer.params.trial_gradient is False
    assert any("optimizer.trial_gradient is off" in note for note in job.notes)
    assert not any("trial_gradient" in note for note in load_job().notes)


def test_curvature_growth_on_mini_batches_is_kept_with_a_note():
    """The default job's curvature_growth reads a damping that batches' noise also raises."""
    assert not any("curvature_growth" in note for note in load_job().notes)
    job = load_job(None, ["optimizer.batch_size=1000"])
    assert job.optimizer.curvature_growth == "damping"  # kept: a method choice, not waste
    assert any("optimizer.curvature_growth with mini-batches" in note for note in job.notes)
    for off in ("optimizer.curvature_growth='none'", "optimizer.curvature_fraction=1.0"):
        job = load_job(None, ["optimizer.batch_size=1000", off])
        assert not any("curvature_growth" in note for note in job.notes), off
