"""Validation bookkeeping, early stopping, divergence hints and TensorBoard events, in-process.

The whole-job behaviour under mpirun is in tests/test_validation_mpi.py; here
the pieces run without MPI or a model: :class:`Validation` on a stand-in
objective whose validation loss follows a given sequence, its state through a
real checkpoint file, the loop's ``EARLY_STOPPED`` reason, and the event files.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from mpinewton.checkpoint import load_checkpoint, write_checkpoint
from mpinewton.config import ConfigError, build_job
from mpinewton.params import ParamLayout
from mpinewton.solvers import GDConfig, GradientDescent, LoopHooks, LoopReason, Phase, run
from mpinewton.train.loop import RunDiverged, TrainingHooks, Validation, divergence_hint
from mpinewton.train.tensorboard import ITERATION_SCALARS, TensorBoardLog, read_scalars


class SequenceObjective:
    """Validation loss ``losses[i]`` at the i-th evaluation; accuracy 1 - loss / 10."""

    def __init__(self, losses):
        self.losses = list(losses)
        self.calls = 0

    def evaluate(self, w):
        loss = self.losses[self.calls]
        self.calls += 1
        return {"loss": loss, "accuracy": 1 - loss / 10}


class FakeOut:
    def __init__(self, path):
        self.path, self.records, self.best, self.tensorboard = path, [], [], None

    def log(self, record):
        self.records.append(record)

    def best_info(self):
        return None


class FakeHooks:
    """What :class:`Validation` uses of :class:`TrainingHooks`."""

    def __init__(self, job, losses, tmp_path, resume=None, eval_total=17):
        self.session = SimpleNamespace(job=job, resume=resume,
                                       eval_shards=[SimpleNamespace(total=eval_total)])
        self.comm = SimpleNamespace(is_root=True)
        self.out = FakeOut(tmp_path)
        self.lines = []
        self.w = np.zeros(3)
        self.start = 0.0
        self._evaluators = {}
        self.objective = SequenceObjective(losses)

    def say(self, *args, **kwargs):
        self.lines.append(" ".join(map(str, args)))

    def model_weights(self):
        return self.w

    def eval_objective(self, index):
        self._evaluators[index] = self.objective
        return self.objective

    def write_best(self, k, info):
        self.out.best.append((k, info))


def _job(**eval_keys):
    return build_job({"eval": eval_keys, "data": {"eval_splits": ["validation"]}})


def _stop_iteration(validation, every, iters):
    for k in range(1, iters + 1):
        if validation.due(k) and validation.evaluate(k):
            return k
    return None


def test_patience_min_delta_and_best(tmp_path):
    # every 2 iterations; losses at iterations 2, 4, 6, 8, 10, 12
    losses = [3.0, 2.0, 1.95, 2.5, 1.9, 1.99]
    hooks = FakeHooks(_job(every=2, patience=3, min_delta=0.1), losses, tmp_path)
    validation = Validation(hooks)
    stop = _stop_iteration(validation, 2, 20)
    # 2.0 at 4 is the last improvement by more than 0.1; 6, 8, 10 do not -> stop at 10,
    # although 1.95 (at 6) and 1.9 (at 10) are new best losses (best weights follow them).
    assert stop == 10
    assert [k for k, _ in hooks.out.best] == [2, 4, 6, 10]
    assert validation.state["best_iteration"] == 10 and validation.state["best_loss"] == 1.9
    assert "has not improved for 3 evaluations (best 1.900000e+00 at iteration 10)" in \
        validation.message
    evals = hooks.out.records
    assert [r["iter"] for r in evals] == [2, 4, 6, 8, 10]
    assert all(r["phase"] == "eval" and r["split"] == "validation" for r in evals)
    assert evals[1]["val_loss"] == 2.0 and evals[1]["val_accuracy"] == pytest.approx(0.8)
    assert evals[3]["best_val_loss"] == 1.95 and evals[3]["best_iteration"] == 6


def test_nan_never_improves_and_no_patience_never_stops(tmp_path):
    hooks = FakeHooks(_job(every=1), [float("nan"), 2.0, float("nan"), 3.0], tmp_path)
    validation = Validation(hooks)
    assert _stop_iteration(validation, 1, 4) is None
    assert validation.state["best_iteration"] == 2 and validation.state["stale"] == 2
    assert [k for k, _ in hooks.out.best] == [2]


def test_state_survives_a_checkpoint_and_the_resumed_run_stops_alike(tmp_path):
    losses = [3.0, 2.0, 2.5, 2.2, 2.1, 2.05, 1.0]
    straight = Validation(FakeHooks(_job(every=1, patience=3), losses, tmp_path))
    assert _stop_iteration(straight, 1, 7) == 5

    first = Validation(FakeHooks(_job(every=1, patience=3), losses[:3], tmp_path))
    assert _stop_iteration(first, 1, 3) is None
    layout = ParamLayout.of_arrays({"w": np.zeros(3)})
    path = write_checkpoint(tmp_path / "ckpt", iteration=3, weights={"w": np.zeros(3)},
                            state={"validation": dict(first.state)}, config_toml="",
                            config_sha256="0" * 64, world_size=1)
    state = load_checkpoint(path, expected=layout).state
    assert state["validation"] == first.state
    resume = SimpleNamespace(state=state)
    hooks = FakeHooks(_job(every=1, patience=3), losses[3:], tmp_path, resume=resume)
    resumed = Validation(hooks)
    stop = next(k for k in range(4, 8) if resumed.due(k) and resumed.evaluate(k))
    assert stop == 5 and resumed.state == straight.state and resumed.message == straight.message


@pytest.mark.parametrize(("keys", "total", "message"), [
    ({"every": 1, "split": "test"}, 17, "eval.split = 'test' is not one of data.eval_splits"),
    ({"every": 1}, 0, "the validation split 'validation' of data/mnist.h5 holds no samples"),
])
def test_a_validation_split_that_cannot_be_used_is_a_config_error(tmp_path, keys, total, message):
    with pytest.raises(ConfigError, match=message):
        Validation(FakeHooks(_job(**keys), [], tmp_path, eval_total=total))


def test_no_eval_splits_is_a_config_error(tmp_path):
    job = build_job({"eval": {"every": 2}, "data": {"eval_splits": []}})
    with pytest.raises(ConfigError, match="data.eval_splits is empty"):
        Validation(FakeHooks(job, [], tmp_path))


def test_divergence_hints_name_the_phase_key():
    job = build_job({"optimizer": {"pretrain_lr": 1e12}})
    assert divergence_hint(job, "pretrain") == "lower optimizer.pretrain_lr (now 1e+12)"
    assert "raise optimizer.damping" in divergence_hint(job, job.optimizer.method)
    gd = build_job({"optimizer": {"method": "gd", "learning_rate": 3.0}})
    assert divergence_hint(gd, "gd") == "lower optimizer.learning_rate (now 3)"


@pytest.mark.parametrize("ratio", [1000.0, 0.0])
def test_a_loss_above_the_ratio_or_not_finite_is_divergence(ratio):
    job = build_job({"optimizer": {"pretrain_lr": 1e12}, "run": {"max_loss_ratio": ratio}})
    hooks = SimpleNamespace(session=SimpleNamespace(job=job), start_loss=2.3)
    check = TrainingHooks.check_loss
    check(hooks, 2, "pretrain", 2299.0, "loss")
    check(hooks, 2, "pretrain", None, "loss")  # not known: nothing to check
    if ratio:
        with pytest.raises(RunDiverged, match=(
                r"^diverged at iteration 2 \(pretrain\): loss 8.6e\+10 is more than 1000 x the "
                r"loss at the start of the run \(2.3; run.max_loss_ratio\); lower "
                r"optimizer.pretrain_lr \(now 1e\+12\). No checkpoint or weights file holds")):
            check(hooks, 2, "pretrain", 8.6e10, "loss")
    else:
        check(hooks, 2, "pretrain", 8.6e10, "loss")  # the ratio test is off
    with pytest.raises(RunDiverged, match="iteration 3 .newton.: the loss after the step nan is "
                                          "not finite; raise optimizer.damping"):
        check(hooks, 3, "newton", float("nan"), "the loss after the step")


class Quadratic:
    def value(self, w):
        return float(w @ w)

    def value_and_grad(self, w):
        return float(w @ w), 2 * w

    def hvp(self, w, v):
        return 2 * v


class StopAt(LoopHooks):
    def __init__(self, k, reason):
        self.k, self.reason = k, reason

    def after_step(self, k, phase, w, state, info):
        return w, (self.reason if k == self.k else False)


@pytest.mark.parametrize("reason", [True, LoopReason.EARLY_STOPPED])
def test_a_hook_ends_the_loop_with_its_reason(reason):
    phases = [Phase("gd", GradientDescent(GDConfig(learning_rate=0.1)), 10)]
    result = run(Quadratic(), np.ones(3), phases, hooks=StopAt(4, reason))
    assert result.iteration == 4
    assert result.reason is (LoopReason.STOPPED if reason is True else reason)


def test_tensorboard_events_hold_the_records(tmp_path):
    log = TensorBoardLog(tmp_path / "tb")
    records = [{"iter": 1, "phase": "pretrain", "loss": 2.5, "grad_norm": 0.1, "step_size": 0.5,
                "cg_iters": 0, "damping": None, "iter_seconds": 0.2, "hvps": 0},
               {"iter": 2, "phase": "newton", "loss": 2.25, "grad_norm": 0.05, "step_size": 1.0,
                "cg_iters": 7, "damping": 1e-3, "iter_seconds": 0.4, "hvps": 8}]
    for record in records:
        log.iteration(record)
    log.evaluation({"iter": 2, "phase": "eval", "split": "validation", "val_loss": 2.75,
                    "val_accuracy": 0.25, "best_iteration": 2})
    log.close()
    log.close()  # idempotent
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == set(ITERATION_SCALARS) | {"val_loss", "val_accuracy"}
    assert scalars["damping"] == [(2, np.float32(1e-3))]  # pre-training has none
    for tag in ("loss", "grad_norm", "cg_iters", "hvps"):
        assert scalars[tag] == [(r["iter"], np.float32(r[tag])) for r in records]
    assert scalars["val_loss"] == [(2, 2.75)]
    disabled = TensorBoardLog(None)
    disabled.iteration(records[0])
    assert not disabled.enabled
