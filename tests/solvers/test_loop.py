import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.optimize as so

from mpinewton import solvers
from mpinewton.solvers import (
    CGReason,
    GDConfig,
    GDInfo,
    GDState,
    GradientDescent,
    LineSearchResult,
    LoopHooks,
    LoopReason,
    NewtonCG,
    NewtonConfig,
    NewtonState,
    Phase,
    StepInfo,
    gd_step,
    minimize,
    newton_step,
    run,
)

from .problems import Quadratic, Rosenbrock, Spy, spd_matrix

RECORD_KEYS = {"loss", "new_loss", "grad_norm", "cg_iters", "cg_reason", "step_size",
               "fallback", "linesearch_trials", "damping"}

W0 = np.array([-1.2, 1.0, -1.2, 1.0])
LR = 1e-3


def schedule(m: int, k: int, cfg: NewtonConfig | None = None) -> list[Phase]:
    return [Phase("pretrain", GradientDescent(GDConfig(learning_rate=LR)), m),
            Phase("newton", NewtonCG(cfg), k)]


def by_hand(problem, w0, m, k, cfg=None, state=None):
    cfg = NewtonConfig() if cfg is None else cfg
    w = np.array(w0, dtype=float)
    for _ in range(m):
        w, _, _ = gd_step(problem, w, LR)
    state = NewtonState() if state is None else state
    for _ in range(k):
        w, state, _ = newton_step(problem, w, state, cfg)
    return w, state


class Recorder(LoopHooks):
    """Records every hook call; stops after ``stop_at``; may replace weights."""

    def __init__(self, stop_at: int | None = None, replace=None) -> None:
        self.stop_at = stop_at
        self.replace = replace or {}
        self.calls: list[tuple[str, int, str]] = []
        self.infos: list = []
        self.seen_w: list[np.ndarray] = []
        self.states: list = []

    def before_step(self, k, phase):
        self.calls.append(("before", k, phase.name))

    def after_step(self, k, phase, w, state, info):
        self.calls.append(("after", k, phase.name))
        self.infos.append(info)
        self.seen_w.append(np.array(w, copy=True))
        self.states.append(state)
        if k in self.replace:
            w = self.replace[k](w)
        return w, self.stop_at is not None and k >= self.stop_at


class Cliff:
    """Finite value and gradient at every w, but +inf at every trial point: Armijo fails."""

    def __init__(self) -> None:
        self.value_calls = 0

    def value(self, w):
        self.value_calls += 1
        return math.inf

    def value_and_grad(self, w):
        return float(0.5 * w @ w), np.array(w, copy=True)

    def hvp(self, w, v):
        return np.array(v, copy=True)


class NaNMethod:
    """A method stub whose step returns non-finite weights."""

    name = "nan"
    config_class = GDConfig
    state_class = GDState

    def __init__(self, bad: float) -> None:
        self.bad = bad

    def init(self, w):
        return GDState()

    def step(self, problem, w, state, *, value_and_grad=None):
        out = np.array(w, copy=True)
        out[-1] = self.bad
        info = GDInfo(loss=0.0, grad_norm=0.0,
                      step=LineSearchResult(step=1.0, value=math.nan, trials=0, success=True))
        return out, state.replace(iteration=state.iteration + 1), info


# ---------------------------------------------------------------- phases


@pytest.mark.parametrize(("m", "k"), [(3, 4), (0, 5), (4, 0)])
def test_run_equals_hand_written_steps_bitwise(m, k):
    prob = Rosenbrock()
    res = run(prob, W0, schedule(m, k))
    w, state = by_hand(prob, W0, m, k)
    assert res.reason is LoopReason.COMPLETED and res.iteration == m + k
    assert res.w.tobytes() == w.tobytes()
    assert set(res.states) == {"pretrain", "newton"}
    assert isinstance(res.states["pretrain"], GDState)
    assert res.states["pretrain"] == GDState(iteration=m)
    assert res.states["newton"] == state
    if k:
        assert state.cg_warm is not None  # the comparison covers the warm start
    assert res.grad_norm is None and res.loss is None  # only computed for gtol


def test_run_does_not_touch_w0_and_promotes_integers():
    w0 = W0.copy()
    res = run(Rosenbrock(), w0, schedule(2, 2))
    np.testing.assert_array_equal(w0, W0)
    assert res.w is not w0
    res = run(Quadratic(np.eye(2), np.ones(2)), np.array([1, 2]), schedule(1, 0))
    assert res.w.dtype == np.float64
    np.testing.assert_array_equal(res.w, np.array([1.0, 2.0]) - LR * np.array([0.0, 1.0]))


def test_gtol_check_reuses_the_gradient_and_changes_nothing():
    plain = Spy(Rosenbrock())
    checked = Spy(Rosenbrock())
    a = run(plain, W0, schedule(3, 4))
    b = run(checked, W0, schedule(3, 4), gtol=0.0)
    assert a.w.tobytes() == b.w.tobytes() and a.states == b.states
    assert b.reason is LoopReason.COMPLETED
    # one gradient per iteration either way: the loop's check hands it to the step
    assert len(plain.vg_calls) == len(checked.vg_calls) == 7


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("j", [2, 3, 5, 7])
def test_stop_and_resume_is_bitwise_identical(j):
    m, k = 3, 5
    prob = Rosenbrock()
    full = run(prob, W0, schedule(m, k))
    assert full.reason is LoopReason.COMPLETED and full.iteration == m + k

    stopper = Recorder(stop_at=j)
    first = run(prob, W0, schedule(m, k), hooks=stopper)
    assert first.reason is LoopReason.STOPPED and first.iteration == j
    assert first.message == f"stopped after iteration {j}"
    assert [c[1] for c in stopper.calls if c[0] == "after"] == list(range(1, j + 1))

    resumer = Recorder()
    second = run(prob, first.w, schedule(m, k), start=j, states=first.states, hooks=resumer)
    assert second.reason is LoopReason.COMPLETED and second.iteration == m + k
    assert second.w.tobytes() == full.w.tobytes()
    assert second.states == full.states
    assert full.states["newton"].cg_warm is not None
    # skipped iterations call no hook
    assert [c[1] for c in resumer.calls if c[0] == "before"] == list(range(j + 1, m + k + 1))

    if j > m:  # inside the Newton phase the state matters: dropping it changes the run
        cold = run(prob, first.w, schedule(m, k), start=j)
        assert cold.states["newton"] != full.states["newton"]


def test_resume_state_is_used_not_reinitialised():
    prob = Rosenbrock()
    warm = np.array([0.1, -0.2, 0.3, 0.05])
    st = NewtonState(iteration=9, cg_warm=warm, total_cg_iters=11)
    res = run(prob, W0, [Phase("newton", NewtonCG(), 1)], states={"newton": st})
    w, expected = by_hand(prob, W0, 0, 1, state=st)
    assert res.w.tobytes() == w.tobytes() and res.states["newton"] == expected
    assert expected.iteration == 10
    # and it differs from the cold start
    cold = run(prob, W0, [Phase("newton", NewtonCG(), 1)])
    assert cold.states["newton"].iteration == 1


# ---------------------------------------------------------------- hooks


def test_hooks_are_called_in_order_with_phase_names():
    rec = Recorder()
    run(Rosenbrock(), W0, schedule(2, 3), hooks=rec)
    names = ["pretrain"] * 2 + ["newton"] * 3
    expected = []
    for k, name in enumerate(names, start=1):
        expected += [("before", k, name), ("after", k, name)]
    assert rec.calls == expected
    assert [type(i) for i in rec.infos] == [GDInfo] * 2 + [StepInfo] * 3
    assert [type(s) for s in rec.states] == [GDState] * 2 + [NewtonState] * 3
    assert [s.iteration for s in rec.states] == [1, 2, 1, 2, 3]


def test_after_step_weights_replace_the_loops():
    a = spd_matrix(4, 10.0, 0)
    prob = Spy(Quadratic(a, np.ones(4)))
    delta = np.array([0.5, -0.25, 1.0, 2.0])
    rec = Recorder(replace={2: lambda w: w + delta})
    phases = [Phase("pretrain", GradientDescent(GDConfig(learning_rate=0.05)), 4)]
    res = run(prob, np.zeros(4), phases, hooks=rec)
    w = np.zeros(4)
    expected_seen = []
    for k in range(1, 5):
        w, _, _ = gd_step(prob.inner, w, 0.05)
        expected_seen.append(w.copy())
        if k == 2:
            w = w + delta
    for got, exp in zip(rec.seen_w, expected_seen, strict=True):
        assert got.tobytes() == exp.tobytes()
    # step 3 started from the hook's weights
    assert prob.vg_calls[2].tobytes() == (expected_seen[1] + delta).tobytes()
    assert res.w.tobytes() == w.tobytes()


def test_stop_from_hook_returns_hook_weights():
    marker = np.full(4, 7.0)
    rec = Recorder(stop_at=1, replace={1: lambda w: marker})
    res = run(Rosenbrock(), W0, schedule(2, 2), hooks=rec)
    assert res.reason is LoopReason.STOPPED and res.iteration == 1
    np.testing.assert_array_equal(res.w, marker)


# ---------------------------------------------------------------- gtol


def quadratic_problem(n=6, seed=0):
    a = spd_matrix(n, 1e2, seed)
    b = np.random.default_rng(seed).standard_normal(n)
    return Quadratic(a, b), a, b


NEWTON_EXACT = NewtonConfig(cg_rtol=1e-14, cg_max_iter=100, warm_start="zero",
                            step_rule="fixed", learning_rate=1.0)


def test_gtol_converged_after_one_newton_step():
    prob, a, b = quadratic_problem()
    spy = Spy(prob)
    res = run(spy, np.zeros(6), [Phase("newton", NewtonCG(NEWTON_EXACT), 10)], gtol=1e-8)
    assert res.reason is LoopReason.CONVERGED
    assert res.iteration == 1
    np.testing.assert_allclose(res.w, np.linalg.solve(a, b), rtol=1e-10)
    g = a @ res.w - b
    assert res.grad_norm == pytest.approx(float(np.linalg.norm(g)), rel=0, abs=0)
    assert res.grad_norm <= 1e-8
    assert res.loss == prob.value(res.w)
    assert "gtol" in res.message
    assert len(spy.vg_calls) == 2  # k=1 check + step, k=2 check
    assert res.states["newton"].iteration == 1


def test_gtol_none_runs_all_iterations():
    prob, _, _ = quadratic_problem()
    spy = Spy(prob)
    res = run(spy, np.zeros(6), [Phase("newton", NewtonCG(NEWTON_EXACT), 10)])
    assert res.reason is LoopReason.COMPLETED and res.iteration == 10
    assert res.states["newton"].iteration == 10
    assert res.grad_norm is None and len(spy.vg_calls) == 10


def test_gtol_at_an_exact_minimiser_stops_before_the_first_step():
    prob = Quadratic(np.eye(3), np.zeros(3))
    rec = Recorder()
    res = run(prob, np.zeros(3), schedule(2, 2), gtol=0.0, hooks=rec)
    assert res.reason is LoopReason.CONVERGED and res.iteration == 0 and res.grad_norm == 0.0
    assert rec.calls == [("before", 1, "pretrain")]


@pytest.mark.parametrize("gtol", [-1.0, math.nan, "1e-8", True])
def test_gtol_validation(gtol):
    with pytest.raises(ValueError, match="gtol"):
        run(Rosenbrock(), W0, schedule(1, 1), gtol=gtol)


# ---------------------------------------------------------------- NaN guard


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_from_a_step_raise_naming_iteration_and_phase(bad):
    rec = Recorder()
    phases = [Phase("pretrain", GradientDescent(GDConfig(learning_rate=LR)), 2),
              Phase("bad", NaNMethod(bad), 3)]
    with pytest.raises(FloatingPointError, match=r"iteration 3 \(bad\)"):
        run(Rosenbrock(), W0, phases, hooks=rec)
    # the bad weights never reached the hook
    assert [c for c in rec.calls if c[0] == "after"] == [("after", 1, "pretrain"),
                                                         ("after", 2, "pretrain")]


def test_diverging_gd_step_raises_its_own_error():
    prob = Quadratic(np.eye(2), np.array([-10.0, 0.0]))
    phases = [Phase("pretrain", GradientDescent(GDConfig(learning_rate=1e308)), 3)]
    with pytest.raises(FloatingPointError, match="learning_rate"):
        run(prob, np.zeros(2), phases)


# ---------------------------------------------------------------- stall rule

W_CLIFF = np.array([1.0, -2.0, 0.5])
CLIFF_CFG = dict(armijo_max_trials=3)


@pytest.mark.parametrize("warm_start", ["zero", "weights", "previous"])
def test_newton_stalls_after_first_failed_step_without_warm_start(warm_start):
    rec = Recorder()
    cfg = NewtonConfig(warm_start=warm_start, **CLIFF_CFG)
    res = run(Cliff(), W_CLIFF, [Phase("newton", NewtonCG(cfg), 5)], hooks=rec)
    assert res.reason is LoopReason.STALLED and res.iteration == 1
    assert "iteration 1 (newton)" in res.message
    np.testing.assert_array_equal(res.w, W_CLIFF)
    assert [i.stalled for i in rec.infos] == [True]
    assert res.states["newton"].failed_linesearches == 1


def test_newton_retries_cold_once_after_dropping_warm_start():
    rec = Recorder()
    cliff = Cliff()
    cfg = NewtonConfig(warm_start="previous", **CLIFF_CFG)
    st = NewtonState(cg_warm=np.array([0.3, 0.1, -0.2]))
    res = run(cliff, W_CLIFF, [Phase("newton", NewtonCG(cfg), 5)], states={"newton": st},
              hooks=rec)
    assert res.reason is LoopReason.STALLED and res.iteration == 2
    assert [i.stalled for i in rec.infos] == [False, True]
    first, second = rec.infos
    assert first.cg.matvecs == first.cg.iterations + 1  # warm-start residual
    assert second.cg.matvecs == second.cg.iterations  # cold
    assert rec.states[0].cg_warm is None  # the warm start was dropped
    np.testing.assert_array_equal(rec.seen_w[0], W_CLIFF)
    np.testing.assert_array_equal(res.w, W_CLIFF)
    assert res.states["newton"].failed_linesearches == 2
    assert cliff.value_calls == 6


@pytest.mark.parametrize("make", [
    lambda: NewtonCG(NewtonConfig(warm_start="zero", **CLIFF_CFG)),
], ids=["newton"])
def test_fresh_batches_run_through_failed_steps(make):
    rec = Recorder()
    res = run(Cliff(), W_CLIFF, [Phase("p", make(), 4)], fresh_batches=True, hooks=rec)
    assert res.reason is LoopReason.COMPLETED and res.iteration == 4
    assert all(i.stalled for i in rec.infos) and len(rec.infos) == 4
    assert res.states["p"].failed_linesearches == 4
    np.testing.assert_array_equal(res.w, W_CLIFF)


def test_fixed_gd_never_stalls():
    rec = Recorder()
    cliff = Cliff()
    fixed = GradientDescent(GDConfig(learning_rate=0.5))
    res = run(cliff, W_CLIFF, [Phase("pretrain", fixed, 3)], hooks=rec)
    assert res.reason is LoopReason.COMPLETED and res.iteration == 3
    assert [i.stalled for i in rec.infos] == [False] * 3
    np.testing.assert_array_equal(res.w, W_CLIFF * 0.5**3)  # w - 0.5 w, exact
    assert cliff.value_calls == 0


# ---------------------------------------------------------------- records


def test_newton_and_gd_records_have_the_same_keys_and_values():
    prob = Rosenbrock()
    cfg = NewtonConfig(damping=0.25)
    new_w, _, info = newton_step(prob, W0, NewtonState(), cfg)
    rec = info.record()
    assert set(rec) == RECORD_KEYS
    assert rec["loss"] == so.rosen(W0) and rec["grad_norm"] == pytest.approx(
        np.linalg.norm(so.rosen_der(W0)), rel=1e-15)
    assert info.step.success and rec["new_loss"] == so.rosen(new_w)
    assert rec["cg_iters"] == info.cg.iterations > 0
    assert rec["cg_reason"] == info.cg.reason.value and type(rec["cg_reason"]) is str
    assert rec["cg_reason"] in {r.value for r in CGReason}
    assert rec["step_size"] == info.step.step and rec["fallback"] is info.fallback
    assert rec["linesearch_trials"] == info.step.trials >= 1
    assert rec["damping"] == 0.25
    json.dumps(rec)

    lr = 1e-3
    _, _, ginfo = GradientDescent(GDConfig(learning_rate=lr)).step(prob, W0, GDState())
    grec = ginfo.record()
    assert set(grec) == set(rec) == RECORD_KEYS
    assert grec == {"loss": so.rosen(W0), "new_loss": None,
                    "grad_norm": float(np.linalg.norm(so.rosen_der(W0))), "cg_iters": 0,
                    "cg_reason": None, "step_size": lr, "fallback": False,
                    "linesearch_trials": 0, "damping": None}
    assert ginfo.stalled is False
    json.dumps(grec)


def test_gd_state_round_trip():
    st = GDState(iteration=4)
    d = st.to_dict()
    assert d["iteration"] == 4 and set(d) == {f.name for f in dataclasses.fields(GDState)}
    assert GDState.from_dict(d) == st
    assert GDState.from_dict({}) == GDState()
    assert GDState.from_dict(json.loads(json.dumps(d))) == st
    assert st != GDState(iteration=5)
    with pytest.raises(ValueError, match="surprise"):
        GDState.from_dict({"iteration": 1, "surprise": 2})


def test_newton_state_round_trip_and_bitwise_equality():
    warm = np.array([1.0, -2.5, 3e-300])
    st = NewtonState(iteration=3, cg_warm=warm, total_cg_iters=8, total_matvecs=9,
                     fallbacks=1, failed_linesearches=2)
    d = st.to_dict()
    assert set(d) == {"iteration", "cg_warm", "total_cg_iters", "total_matvecs",
                      "fallbacks", "failed_linesearches"}
    back = NewtonState.from_dict(d)
    assert back == st and back.cg_warm.tobytes() == warm.tobytes()
    assert NewtonState.from_dict({**d, "cg_warm": warm.tolist()}) == st
    nudged = warm.copy()
    nudged[2] = np.nextafter(nudged[2], 1.0)
    assert NewtonState.from_dict({**d, "cg_warm": nudged}) != st
    assert NewtonState.from_dict({**d, "cg_warm": None}) != st
    with pytest.raises(ValueError, match="cg_wram"):
        NewtonState.from_dict({**d, "cg_wram": warm})


@pytest.mark.parametrize(("field", "value"), [
    ("learning_rate", 0),
    ("learning_rate", -1.0),
    ("learning_rate", math.inf),
])
def test_gd_config_validation(field, value):
    with pytest.raises(solvers.ParameterError) as err:
        GDConfig(**{field: value})
    assert isinstance(err.value, ValueError)
    assert f"GDConfig.{field}" in str(err.value) and repr(value) in str(err.value)
    assert err.value.owner == "GDConfig" and err.value.name == field
    if field == "step_rule":
        assert set(err.value.choices) == {"fixed", "armijo"}


def test_phase_validation():
    with pytest.raises(ValueError, match=r"'p'.*-1"):
        Phase("p", GradientDescent(), -1)
    with pytest.raises(ValueError, match="iters"):
        Phase("p", GradientDescent(), 1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- minimize


def test_minimize_reports_pretrain_history_and_history():
    prob = Rosenbrock()
    res = minimize(prob, W0, pretrain_iters=3, pretrain_lr=LR, max_iter=4, gtol=0.0)
    assert res.message == "reached max_iter=4" and not res.converged
    w = W0.copy()
    expected = []
    for _ in range(3):
        w, loss, gnorm = gd_step(prob, w, LR)
        expected.append((loss, gnorm))
    assert res.pretrain_history == expected
    state = NewtonState()
    infos = []
    for _ in range(4):
        w, state, info = newton_step(prob, w, state, NewtonConfig())
        infos.append(info)
    assert res.iterations == len(res.history) == 4
    assert [h.loss for h in res.history] == [i.loss for i in infos]
    assert res.x.tobytes() == w.tobytes() and res.state == state
    assert res.fun == so.rosen(w)


def test_minimize_callback_stop():
    calls = []

    def cb(w, state, info):
        calls.append(state.iteration)
        return len(calls) == 2

    res = minimize(Rosenbrock(), W0, pretrain_iters=2, pretrain_lr=LR, max_iter=50, callback=cb)
    assert res.message == "stopped by callback"
    assert calls == [1, 2] and res.iterations == 2 and len(res.pretrain_history) == 2
    assert not res.converged and res.state.iteration == 2


def test_phase_names_must_differ_and_states_must_name_a_phase():
    gd = GradientDescent(GDConfig(learning_rate=1e-3))
    with pytest.raises(ValueError, match="phase names must differ"):
        run(Rosenbrock(), np.array([-1.2, 1.0]), [Phase("a", gd, 1), Phase("a", NewtonCG(), 1)])
    with pytest.raises(ValueError, match=r"states for unknown phases \['Newton'\]"):
        run(Rosenbrock(), np.array([-1.2, 1.0]), [Phase("newton", NewtonCG(), 1)],
            states={"Newton": NewtonState(iteration=5)})


def test_state_fields_are_checked_and_converted():
    st = NewtonState(cg_warm=[0.1, 0.2])
    assert isinstance(st.cg_warm, np.ndarray) and not st.cg_warm.flags.writeable
    w, _, _ = solvers.newton_step(Rosenbrock(), np.array([-1.2, 1.0]), st,
                                  NewtonConfig(warm_start="previous"))
    assert np.all(np.isfinite(w))
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=f"GDState.iteration = {bad!r}"):
            GDState(iteration=bad)
