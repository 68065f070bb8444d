"""The training loop: the solvers' loop with the driver's hooks around each step.

:func:`mpinewton.solvers.run` runs the phases (pre-training, then the method)
and decides when to stop; :class:`TrainingHooks` adds what only the driver
knows: this iteration's mini-batch, the broadcast of rank 0's weights (design
section 2), ``--check-sync``, the metrics line, SIGTERM/SIGUSR1 and
checkpoints.  :func:`train` wires a session, the run directory and the loop,
and writes the summary.

Around the steps the driver also

- evaluates the validation split every ``eval.every`` iterations and after
  the last (:class:`Validation`): a ``phase = "eval"`` record in
  ``metrics.jsonl``, the best weights in ``DIR/best`` (``eval.keep_best``)
  and early stopping after ``eval.patience`` evaluations without an
  improvement by more than ``eval.min_delta`` (``LoopReason.EARLY_STOPPED``:
  a finished run);
- stops a run whose loss becomes NaN/Inf or exceeds ``run.max_loss_ratio``
  times the loss of the run's first iteration (:class:`RunDiverged`, exit
  code 3), and checks the training loss at any weights before they are
  saved, so that no checkpoint or weights file holds diverged weights;
- writes TensorBoard events (``run.tensorboard``, :mod:`.tensorboard`);
- with ``optimizer.average``, keeps the exponential average of the method's
  iterates (:class:`~mpinewton.solvers.averaging.IterateAverage`): the
  validation, the best weights, the summary and ``weights.h5`` are the
  average's, the checkpoint holds both (the method resumes from its iterate).

Every decision that changes the control flow (divergence, early stopping,
a signal) is taken from globally reduced values or agreed by a collective,
so every rank takes it in the same iteration (design section 2).
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton import __version__
from mpinewton.comm import Comm
from mpinewton.config import ConfigError, JobConfig
from mpinewton.solvers import (
    METHODS,
    GDConfig,
    GradientDescent,
    IterateAverage,
    LoopHooks,
    LoopReason,
    LoopResult,
    Phase,
    SolverState,
    StepRecord,
    run,
)
from mpinewton.train.rundir import RunDirectory
from mpinewton.train.session import Session, UserInputs, open_session

#: Counters carried across a resume (checkpoint state "progress", beside ``start_loss``).
PROGRESS_KEYS = ("wall_time", "cg_iters", "method_iters", "hvps", "gradients", "loss_evaluations")


class RunDiverged(RuntimeError):
    """The loss became NaN/Inf or grew past ``run.max_loss_ratio`` times its start.

    Raised on every rank alike (it is decided from reduced values, the same on
    every rank) before any checkpoint or weights file could hold the weights;
    the trainer exits with code 3 (``EXIT_DIVERGED``).
    """


def divergence_hint(job: JobConfig, phase: str) -> str:
    """What to change when ``phase`` diverged: its learning-rate, damping or radius key."""
    opt = job.optimizer
    if phase == "pretrain":
        return f"lower optimizer.pretrain_lr (now {opt.pretrain_lr:g})"
    params, hints = opt.params, []
    if getattr(params, "step_rule", "fixed") == "fixed" and hasattr(params, "learning_rate"):
        hints.append(f"lower optimizer.learning_rate (now {params.learning_rate:g})")
    for key in ("damping", "initial_step", "max_radius"):
        if hasattr(params, key):
            verb = "raise" if key == "damping" else "lower"
            hints.append(f"{verb} optimizer.{key} (now {getattr(params, key):g})")
    return " or ".join(hints) or f"check the data and the model (method {opt.method!r})"


def weights_file(session: Session, w: np.ndarray) -> dict[str, np.ndarray]:
    """The datasets of a weights file (``DIR/weights.h5``, ``DIR/best/weights.h5``).

    ``w`` flat, one dataset per trainable variable, and the batch-norm
    statistics too (never trained here, but part of the model), so that
    ``model.weights = "DIR/weights.h5"`` restarts exactly this network.
    """
    return {"w": w, **{f"variables/{name}": value
                       for name, value in session.layout.as_dict(w).items()},
            **{f"variables/{v.path}": np.asarray(v.numpy())
               for v in session.model.non_trainable_variables}}


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the ranks agree on it at iteration boundaries.

    The handler only records the signal, so a second signal while a checkpoint
    is being written interrupts nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def agreed(self, comm: Comm) -> bool:
        """True on every rank when any rank received a signal (one tiny Allreduce)."""
        flag = np.array([0.0 if self.signum is None else 1.0])
        return bool(comm.allreduce_sum(flag)[0] > 0)

    def name(self) -> str:
        """The signal received here, or that another rank received one."""
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"


def phases_of(job: JobConfig) -> list[Phase]:
    """Thesis Algorithm 4's schedule: fixed-rate pre-training, then the job's method."""
    opt = job.optimizer
    return [Phase("pretrain", GradientDescent(GDConfig(learning_rate=opt.pretrain_lr)),
                  opt.pretrain_iters),
            Phase(opt.method, METHODS[opt.method](opt.params), opt.iters)]


def _test_hooks(comm: Comm, k: int) -> None:
    """Test-only failures, from the environment (tests/test_train_mpi.py, test_resume_mpi.py).

    ``MPINEWTON_FAIL_RANK=r`` (and ``MPINEWTON_FAIL_ITER=k``) raise on rank r;
    ``MPINEWTON_TEST_ITER_SLEEP=s`` sleeps s seconds per iteration, so that
    tests can signal a run in the middle.
    """
    if "MPINEWTON_TEST_ITER_SLEEP" in os.environ:
        time.sleep(float(os.environ["MPINEWTON_TEST_ITER_SLEEP"]))
    rank = os.environ.get("MPINEWTON_FAIL_RANK")
    if rank is not None and int(rank) == comm.rank and \
            k >= int(os.environ.get("MPINEWTON_FAIL_ITER", "1")):
        raise RuntimeError(f"test failure injected on rank {comm.rank} at iteration {k}")


def _test_diverge(comm: Comm, w: np.ndarray, k: int) -> np.ndarray:
    """Test-only: ``MPINEWTON_TEST_DIVERGE_RANK=r`` nudges rank r's weights after step k >= 2."""
    rank = os.environ.get("MPINEWTON_TEST_DIVERGE_RANK")
    if rank is not None and int(rank) == comm.rank and k >= 2:
        w = w.copy()
        w[0] = np.nextafter(w[0], np.inf)
    return w


def check_sync(comm: Comm, w: np.ndarray, iteration: int) -> str:
    """SHA-256 of ``w``, the same on every rank; raises on every rank if they differ."""
    digest = hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()
    digests = comm.allgather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"--check-sync: weights differ between ranks after iteration "
                           f"{iteration}: " + ", ".join(f"rank {r}: {d[:12]}"
                                                       for r, d in enumerate(digests)))
    return digest


def format_line(rec: dict[str, Any]) -> str:
    """Rank 0's progress line for one iteration."""
    cg = f"{rec['cg_iters']:3d} {rec['cg_reason'] or '-':<18}" if rec["cg_reason"] else \
        f"{'-':>3} {'-':<18}"
    return (f"{rec['phase']:<8} {rec['iter']:4d}  loss {rec['loss']:.6e}  "
            f"|g| {rec['grad_norm']:.3e}"
            f"  cg {cg}  step {rec['step_size']:.3g}{' FALLBACK' if rec['fallback'] else ''}"
            f"  {rec['iter_seconds']:6.2f}s  t={rec['wall_time']:7.1f}s"
            + (f"  batch -> {rec['next_batch_size']}" if rec.get("next_batch_size") else "")
            + (f"  curvature -> {rec['next_curvature_fraction']:.3g}" if rec.get("curvature_grew")
               else ""))


def curvature_growth(opt: Any) -> Any:
    """The job's :class:`mpinewton.sampling.CurvatureGrowth`, or None.

    None without growth, without room to grow (``curvature_fraction >=
    curvature_fraction_max``, which 1 always is), or for a method whose damping
    does not adapt (the rule reads Levenberg-Marquardt damping).
    """
    if opt.curvature_growth == "none" or opt.curvature_fraction >= opt.curvature_fraction_max or \
            getattr(opt.params, "damping_rule", None) != "levenberg_marquardt":
        return None
    from mpinewton.sampling import CurvatureGrowth

    return CurvatureGrowth(opt.curvature_fraction, opt.params.damping,
                           opt.curvature_growth_threshold, opt.curvature_fraction_max)


def grow_batch(sampler: Any, opt: Any, step: int, mean_squares: float,
               grad_norm_sq: float) -> int | None:
    """Progressive batches after method step ``step``: the new batch size, or None.

    ``optimizer.batch_growth`` picks the rule: ``"norm_test"`` reads
    ``mean_squares`` (mean_i |g_i|^2 on the step's batch at the step's weights)
    and ``grad_norm_sq`` (|g|^2 there), both reduced over all ranks;
    ``"geometric"`` reads only ``step``. So every rank grows alike. The
    trainer and ``mpinewton.compare`` both grow with this.
    """
    from mpinewton.sampling import grow_by_norm_test, grow_geometric

    if sampler is None or opt.batch_growth == "none":
        return None
    if opt.batch_growth == "geometric":
        return grow_geometric(sampler, step, opt.batch_every, opt.batch_factor, opt.batch_max)
    return grow_by_norm_test(sampler, mean_squares, grad_norm_sq, opt.batch_theta,
                             opt.batch_max)


class TrainingHooks(LoopHooks):
    """The driver's side of each step (module docstring)."""

    def __init__(self, session: Session, out: RunDirectory, phases: list[Phase], *,
                 check_sync: bool, say: Callable[..., None]) -> None:
        self.session, self.comm, self.out = session, session.comm, out
        self.phases, self.sync, self.say = phases, check_sync, say
        for phase in phases:  # methods with an inner CG report its progress (output only)
            if hasattr(phase.method, "progress"):
                phase.method.progress = self._cg_progress
        self.stop = StopRequest()
        self.total = sum(p.iters for p in phases)
        self.mean_squares = 0.0  # the norm test's mean_i |g_i|^2 (before_step)
        self.states: dict[str, SolverState] = {}
        self.progress: dict[str, Any] = dict.fromkeys(PROGRESS_KEYS, 0)
        self.progress["wall_time"] = 0.0
        if session.resume is not None:
            saved = dict(session.resume.state["progress"])
            if "newton_iters" in saved:  # checkpoints written before 0.2
                saved["method_iters"] = saved.pop("newton_iters")
            self.progress.update(saved)
        if session.sampler is None:
            self.objective = session.objective(session.shard.x, session.shard.y,
                                               session.shard.total)
        else:  # thesis 8.2: each iteration sets its own batch (before_step)
            self.objective = session.objective(session.shard.x[:0], session.shard.y[:0],
                                               session.sampler.batch_size)
        self.problem, self.curvature = self.objective, None
        opt = session.job.optimizer
        from mpinewton.train.subsample import SplitProblem, splits_curvature

        if splits_curvature(opt):  # curvature products on part of each batch, Fisher draws
            from mpinewton.sampling import curvature_count

            batch = session.sampler.batch_size if session.sampler else session.shard.total
            self.curvature = session.objective(session.shard.x[:0], session.shard.y[:0],
                                               curvature_count(batch, opt.curvature_fraction))
            self.problem = SplitProblem(self.objective, self.curvature)
        self.growth = curvature_growth(opt)
        if self.growth is not None and session.resume is not None:
            saved_growth = session.resume.state.get("schedule", {}).get("curvature_growth")
            if saved_growth is not None:
                self.growth.restore(saved_growth)
        stats = self.objective.stats
        self.products_before = self.progress["hvps"]  # curvature products of earlier runs
        stats.grads = self.progress["gradients"]
        stats.values = self.progress["loss_evaluations"]
        self.start = time.perf_counter() - self.progress["wall_time"]
        self.record: dict[str, Any] = {}
        # run.max_loss_ratio's reference: the loss of the run's first iteration
        # (carried across a resume, so both runs stop alike).
        self.start_loss: float | None = self.progress.pop("start_loss", None)
        self.w = session.w0
        self.w_loss: float | None = None  # the loss at self.w, where known
        # optimizer.average: the model is the average of the method's iterates (the method
        # steps from its own); it travels in the checkpoint, so a resume continues it exactly
        self.average: IterateAverage | None = None
        if opt.average > 0:
            saved_average = session.resume.state.get("average") \
                if session.resume is not None else None
            self.average = IterateAverage.from_dict(saved_average) if saved_average \
                else IterateAverage(opt.average, session.w0)
        self.first_line = True  # the first iteration of this process compiles
        self._evaluators: dict[int, Any] = {}
        self.validation = Validation(self)

    def model_weights(self) -> np.ndarray:
        """The weights the run delivers (validation, best, summary, ``weights.h5``).

        With ``optimizer.average``, the iterates' average once the method has
        stepped; else the current iterate.
        """
        if self.average is not None and self.average.total > 0:
            return self.average.weights
        return self.w

    def eval_objective(self, index: int) -> Any:
        """The objective of ``data.eval_splits[index]``, built (and compiled) once."""
        if index not in self._evaluators:
            shard = self.session.eval_shards[index]
            self._evaluators[index] = self.session.objective(shard.x, shard.y, shard.total)
        return self._evaluators[index]

    def check_loss(self, k: int, phase: str, loss: float | None, what: str) -> None:
        """Raise :class:`RunDiverged` if ``loss`` is NaN/Inf or above the ratio's limit.

        ``loss`` is a reduced value, the same on every rank, so every rank raises.
        """
        ratio, start = self.session.job.run.max_loss_ratio, self.start_loss
        if loss is None:
            return
        if math.isfinite(loss) and not (ratio and start is not None and start > 0
                                        and loss > ratio * start):
            return
        problem = f"{what} {loss:.4g} is not finite" if not math.isfinite(loss) else (
            f"{what} {loss:.4g} is more than {ratio:g} x the loss at the start of the run "
            f"({start:.4g}; run.max_loss_ratio)")
        raise RunDiverged(f"diverged at iteration {k} ({phase}): {problem}; "
                          f"{divergence_hint(self.session.job, phase)}. No checkpoint or "
                          "weights file holds these weights")

    def verified_loss(self, k: int) -> float:
        """The training loss at the weights about to be saved, checked (:meth:`check_loss`).

        The step's own value where it computed one; otherwise one evaluation
        (only on iterations that save weights), left out of the run's counts so
        that an interrupted run counts what an uninterrupted one does.
        """
        if self.w_loss is None:
            self.w_loss = self._uncounted_loss(self.w)
        self.check_loss(k, self.record.get("phase", "start"), self.w_loss,
                        "the loss at the weights to be saved")
        return self.w_loss

    def _uncounted_loss(self, w: np.ndarray) -> float:
        """The training loss at ``w``, left out of the run's evaluation count."""
        stats = self.objective.stats
        values = stats.values
        loss = float(self.objective.value(w))
        stats.values = values
        return loss

    def write_best(self, k: int, info: dict[str, Any]) -> None:
        """Rank 0 writes the model's weights to ``DIR/best`` (after checking their loss)."""
        w = self.model_weights()
        if w is self.w:
            loss = self.verified_loss(k)
        else:  # the average's loss on this iteration's data, left out of the counts
            loss = self._uncounted_loss(w)
            self.check_loss(k, self.record.get("phase", "start"), loss,
                            "the loss at the averaged weights")
        info = {**info, "train_loss": loss}
        self.comm.run_agreed(lambda: self.out.write_best(weights_file(self.session, w),
                                                         info) if self.comm.is_root else None,
                             "writing the best weights")

    def curvature_products(self) -> int:
        """Hessian and Gauss-Newton products so far, on every sample or a subset, resumes included.

        (``hvps`` in metrics.jsonl, the checkpoint's progress and summary.json.)
        """
        stats = self.problem.stats  # a split problem's curvature shares these (SplitProblem)
        return self.products_before + stats.hvps + stats.gnvps

    def _cg_progress(self, iteration: int, cap: int, ratio: float) -> None:
        """Rank 0's CG progress line, once an iteration has run ``run.progress_seconds``.

        Output only (no collective, no decision): at most one line per
        ``progress_seconds``, so a long Newton iteration (ResNet-50) is not silent.
        """
        every = self.session.job.run.progress_seconds
        now = time.perf_counter()
        if every <= 0 or now - self.t0 < every or now - self.last_progress < every:
            return
        self.last_progress = now
        self.say(f"  {self.record.get('phase', '')} {self.record.get('iter', '')}: CG iteration "
                 f"{iteration} of at most {cap}, |r|/|g| {ratio:.3e}, {now - self.t0:.1f}s into "
                 "the iteration", flush=True)

    def before_step(self, k: int, phase: Phase) -> None:
        self.t0, self.hvps0 = time.perf_counter(), self.curvature_products()
        self.last_progress = self.t0
        _test_hooks(self.comm, k)
        self.record = {"iter": k, "phase": phase.name}
        sampler = self.session.sampler
        if sampler is None:
            self._set_curvature_rows(k, phase, self.session.shard.x, self.session.shard.y,
                                     self.session.shard.lo, self.session.shard.hi,
                                     self.session.shard.total)
            return
        from mpinewton.train.subsample import load_batch

        job, comm = self.session.job, self.comm
        batch = sampler.next()  # this iteration's batch; this rank reads its part
        x_part, y_part, lo, hi = load_batch(self.session, self.objective, batch)
        self._set_curvature_rows(k, phase, x_part, y_part, lo, hi, batch.size)
        if job.optimizer.batch_growth == "norm_test" and phase.name != "pretrain":
            # mean_i |g_i|^2 on this batch at the step's weights, for the norm test
            self.mean_squares = float(np.sum(self.objective.grad_squares(self.w)))
        self.record.update(batch_size=batch.size, epoch=sampler.epoch)
        if self.sync:  # the parts the ranks read, together: the batch (same on any size)
            rows = np.concatenate(comm.allgather(batch[lo:hi]))
            self.record["batch_sha256"] = hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()

    def _set_curvature_rows(self, k: int, phase: Phase, x: np.ndarray, y: np.ndarray,
                            lo: int, hi: int, batch: int) -> None:
        """Give the curvature objective this rank's rows of iteration k's subset.

        ``x, y`` are the rows ``[lo, hi)`` of the batch this rank holds
        (:func:`mpinewton.train.subsample.set_curvature_rows`).
        """
        if self.curvature is None or phase.name == "pretrain":
            return
        from mpinewton.train.subsample import set_curvature_rows

        job = self.session.job
        fraction = job.optimizer.curvature_fraction if self.growth is None \
            else self.growth.current()
        self.record["curvature_samples"] = set_curvature_rows(
            self.curvature, self.comm.size, batch, fraction, job.run.seed, k, x, y, lo, hi)

    def after_step(self, k: int, phase: Phase, w: np.ndarray, state: SolverState,
                   info: StepRecord) -> tuple[np.ndarray, bool | LoopReason]:
        # Rank 0's step is authoritative (design section 2): broadcast its weights.
        w = self.comm.bcast_array(np.asarray(w, dtype=self.session.layout.dtype))
        kept = np.array_equal(w, self.w)
        w = _test_diverge(self.comm, w, k)
        self.w, self.states[phase.name] = w, state
        record = {**self.record, **info.record()}
        # The loss at the new weights: the step's start loss if it kept them,
        # else its new_loss where it computed one (a rejected trial's is not).
        self.w_loss = float(info.loss) if kept else record.get("new_loss")
        if self.start_loss is None:
            self.start_loss = float(info.loss)
        if self.sync:
            record["weights_sha256"] = check_sync(self.comm, w, k)
        record.update(hvps=self.curvature_products() - self.hvps0,
                      iter_seconds=time.perf_counter() - self.t0,
                      wall_time=time.perf_counter() - self.start)
        if phase.name != "pretrain":
            self.progress["cg_iters"] += record["cg_iters"] or 0
            self.progress["method_iters"] += 1
            if self.average is not None:  # the same w on every rank, so the same average
                self.average.update(w)
            grown = grow_batch(self.session.sampler, self.session.job.optimizer,
                               k - self.session.job.optimizer.pretrain_iters,
                               self.mean_squares, info.grad_norm ** 2)
            if grown is not None:
                record["next_batch_size"] = grown
            if self.growth is not None:
                before = self.growth.current()
                record["next_curvature_fraction"] = self.growth.update(record.get("damping"))
                record["curvature_grew"] = record["next_curvature_fraction"] > before
        self.out.log(record)
        if self.out.tensorboard is not None:
            self.out.tensorboard.iteration(record)
        self.out.check_lock()
        self.say(format_line(record) + ("  (includes compiling)" if self.first_line else ""),
                 flush=True)
        self.first_line = False
        self.check_loss(k, phase.name, float(info.loss), "loss")
        self.check_loss(k, phase.name, self.w_loss, "the loss after the step")
        if self.validation.due(k) and self.validation.evaluate(k):
            return w, LoopReason.EARLY_STOPPED  # a finished run: _run saves and summarises
        if self.stop.agreed(self.comm):
            self.save(k)
            self.comm.barrier()  # no rank exits before rank 0 has committed the checkpoint
            self.say(f"stopped by {self.stop.name()} after iteration {k}: checkpointed, not "
                     "finished; continue with --resume", flush=True)
            return w, True
        every = self.session.job.checkpoint.every
        if every and k % every == 0 and k < self.total:
            self.save(k)
        return w, False

    def save(self, iteration: int) -> None:
        """Write a checkpoint of the weights and every state at ``iteration`` (rank 0)."""
        from mpinewton.checkpoint import write_checkpoint

        self.verified_loss(iteration)  # never a checkpoint of diverged weights
        stats, session, job = self.objective.stats, self.session, self.session.job
        self.progress.update(wall_time=time.perf_counter() - self.start,
                             hvps=self.curvature_products(),
                             gradients=stats.grads, loss_evaluations=stats.values)
        state = {"optimizer": {name: s.to_dict() for name, s in self.states.items()},
                 "progress": {**self.progress, "start_loss": self.start_loss},
                 "schedule": self.schedule_state(iteration),
                 "validation": dict(self.validation.state)}
        if self.average is not None:
            state["average"] = self.average.to_dict()
        saved = self.comm.run_agreed(lambda: write_checkpoint(
            self.out.checkpoints, iteration=iteration,
            weights=session.layout.as_dict(self.w), state=state,
            config_toml=job.to_toml(), config_sha256=job.digest(), world_size=self.comm.size,
            keep=job.checkpoint.keep) if self.comm.is_root else None, "writing a checkpoint")
        if saved is not None:
            self.say(f"checkpoint {saved}", flush=True)
        if self.out.tensorboard is not None:
            self.out.tensorboard.flush()

    def schedule_state(self, iteration: int) -> dict[str, Any]:
        """Where the run stands, for a checkpoint: phase, method, data position, seed.

        Full batch: every iteration uses the whole training set (one epoch,
        position 0). Mini-batches: the sampler's seed, epoch and position
        (thesis 8.2, mpinewton.sampling). The driver draws no other random
        numbers after the initial weights (which the checkpoint replaces), so
        this is all the RNG state there is.
        """
        names = [p.name for p in self.phases for _ in range(p.iters)]
        sampler, job = self.session.sampler, self.session.job
        sampling = sampler.state() if sampler is not None else {
            "mode": "full_batch", "epoch": iteration, "position": 0, "seed": job.run.seed}
        state = {"iteration": iteration, "total_iterations": len(names),
                 "phase": names[iteration - 1] if 0 < iteration <= len(names) else "start",
                 "next_phase": names[iteration] if iteration < len(names) else "done",
                 "method": job.optimizer.method, "sampling": sampling}
        if self.growth is not None:  # the curvature fraction's rule (optimizer.curvature_growth)
            state["curvature_growth"] = self.growth.state()
        return state


class Validation:
    """``[eval]``: validation loss and metric every ``eval.every`` iterations (module docstring).

    Every rank evaluates (the objective is distributed) and decides alike from
    the reduced values; rank 0 writes the record, the line and the best
    weights.  :attr:`state` -- the best loss and its iteration, and the
    evaluations since the last improvement by more than ``eval.min_delta`` --
    travels in the checkpoint (``validation``), so that a resumed run stops
    where an uninterrupted one stops.  The best weights are those of the
    lowest validation loss (any improvement); patience counts improvements by
    more than ``min_delta`` only (as Keras' ``EarlyStopping``).
    """

    def __init__(self, hooks: TrainingHooks) -> None:
        job, session = hooks.session.job, hooks.session
        cfg, splits = job.eval, list(job.data.eval_splits)
        self.hooks, self.cfg = hooks, cfg
        self.split = cfg.split or (splits[0] if splits else "")
        self.index: int | None = None
        self.message = ""
        if cfg.every > 0:
            if not splits and not cfg.split:
                raise ConfigError(f"eval.every = {cfg.every} needs a validation split, but "
                                  "data.eval_splits is empty; set data.eval_splits = "
                                  "[\"validation\"] (a split of the data) or eval.every = 0")
            if self.split not in splits:
                raise ConfigError(f"eval.split = {self.split!r} is not one of data.eval_splits "
                                  f"= {splits}; add it to data.eval_splits or choose one of "
                                  "them")
            self.index = splits.index(self.split)
            if not session.eval_shards[self.index].total:
                raise ConfigError(f"the validation split {self.split!r} of {job.data.path} "
                                  "holds no samples; choose another eval.split or set "
                                  "eval.every = 0")
        elif cfg.patience:
            hooks.say("note: eval.patience has no effect without eval.every > 0")
        self.state: dict[str, Any] = {
            "evaluations": 0, "last_iteration": 0, "best_iteration": None, "best_loss": None,
            "best": {}, "anchor_loss": None, "stale": 0}
        if session.resume is not None:
            self.state.update(session.resume.state.get("validation", {}))
            best = hooks.out.best_info() if hooks.comm.is_root and cfg.keep_best else None
            if best is not None and best.get("iteration") != self.state["best_iteration"]:
                hooks.say(f"note: {hooks.out.path}/best holds iteration {best.get('iteration')}"
                          f", the checkpoint's best is iteration {self.state['best_iteration']}; "
                          "it is replaced at the next improvement")

    def due(self, k: int) -> bool:
        """True when iteration ``k`` ends with an evaluation (every ``eval.every``)."""
        return self.index is not None and k % self.cfg.every == 0

    def evaluate(self, k: int) -> bool:
        """Evaluate at the weights after iteration ``k``; True when patience has run out."""
        hooks, cfg, st = self.hooks, self.cfg, self.state
        t0 = time.perf_counter()
        compiling = self.index not in hooks._evaluators  # the first evaluation compiles
        objective = hooks.eval_objective(self.index)  # type: ignore[arg-type]
        # loss and accuracy (or MAE) of the model (the average, with optimizer.average)
        values = objective.evaluate(hooks.model_weights())
        loss = float(values["loss"])
        metrics = {f"val_{name}": float(value) for name, value in values.items()}
        finite = math.isfinite(loss)
        improved = finite and (st["best_loss"] is None or loss < st["best_loss"])
        if finite and (st["anchor_loss"] is None or loss < st["anchor_loss"] - cfg.min_delta):
            st["anchor_loss"], st["stale"] = loss, 0
        else:
            st["stale"] += 1
        st["evaluations"] += 1
        st["last_iteration"] = k
        if improved:
            st.update(best_loss=loss, best_iteration=k, best=dict(metrics))
        record = {"iter": k, "phase": "eval", "split": self.split, **metrics,
                  "best_val_loss": st["best_loss"], "best_iteration": st["best_iteration"],
                  "eval_seconds": time.perf_counter() - t0,
                  "wall_time": time.perf_counter() - hooks.start}
        hooks.out.log(record)
        if hooks.out.tensorboard is not None:
            hooks.out.tensorboard.evaluation(record)
        shown = "  ".join(f"{name.removeprefix('val_')} {value:.6g}"
                          for name, value in metrics.items() if name != "val_loss")
        best = f"{st['best_loss']:.6e} at {st['best_iteration']}" \
            if st["best_loss"] is not None else "-"
        hooks.say(f"{'eval':<8} {k:4d}  {self.split} loss {loss:.6e}  {shown}  best {best}"
                  f"{'  (new best)' if improved else ''}  {record['eval_seconds']:.2f}s"
                  f"{'  (includes compiling)' if compiling else ''}", flush=True)
        if improved and cfg.keep_best:
            hooks.write_best(k, {"iteration": k, "split": self.split, **metrics})
        if cfg.patience and st["stale"] >= cfg.patience:
            best = f"{st['best_loss']:.6e} at iteration {st['best_iteration']}" \
                if st["best_loss"] is not None else "none finite"
            self.message = (f"validation loss has not improved for {st['stale']} evaluations "
                            f"(best {best})")
            return True
        return False


def _summary(hooks: TrainingHooks, result: LoopResult) -> tuple[dict[str, Any], Any]:
    """summary.json: final loss, gradient norm and accuracies at the final weights."""
    session, job, comm = hooks.session, hooks.session.job, hooks.comm
    train_seconds = time.perf_counter() - hooks.start
    objective, shard = hooks.objective, session.shard
    if session.sampler is not None:  # the summary reports the training set (data.eval_limit)
        limits = [n for n in (job.data.limit, job.data.eval_limit) if n]
        shard = comm.run_agreed(lambda: session.read_training_set(min(limits) if limits
                                                                  else None),
                                "reading the training set for the summary")
        objective = session.objective(shard.x, shard.y, shard.total)
    # the passes below take a while on large models: say first what they evaluate
    metric = objective.metric_name
    splits = [f"{split} ({eval_shard.total:,})" for split, eval_shard
              in zip(job.data.eval_splits, session.eval_shards, strict=True) if eval_shard.total]
    hooks.say("evaluating the final weights: loss, gradient"
              + (f" and {metric}" if metric else "")
              + (f" on the first {shard.total:,}" if shard.total < session.shard.total
                 else f" on the {shard.total:,}") + " training samples"
              + (f"; loss{f' and {metric}' if metric else ''} on {', '.join(splits)}"
                 if splits else ""), flush=True)
    progress, opt = hooks.progress, job.optimizer
    w = result.w if hooks.average is None else hooks.model_weights()
    final_loss, final_grad = objective.value_and_grad(w)  # one pass for both
    method_iters = progress["method_iters"]
    summary: dict[str, Any] = {
        "job": job.run.name, "mpinewton_version": __version__, "world_size": comm.size,
        "threads_per_rank": session.threads[0], "weights": session.layout.size,
        "train_samples": session.shard.total, "train_eval_samples": shard.total,
        "iterations": result.iteration, "pretrain_iters": opt.pretrain_iters,
        "method": opt.method, "final_loss": final_loss,
        "final_grad_norm": float(np.linalg.norm(final_grad)),
        "wall_time": train_seconds,
        "method_iters": method_iters,
        "mean_cg_iters": progress["cg_iters"] / method_iters if method_iters else None,
        "hvps": progress["hvps"], "gradients": progress["gradients"],
        "loss_evaluations": progress["loss_evaluations"],
        "batch_size": session.sampler.batch_size if session.sampler else shard.total,
        "allreduce_seconds": comm.stats.allreduce_seconds, "config_sha256": job.digest(),
        "resumed_from": session.resume.path if session.resume is not None else None,
        "stopped": result.reason.value,
        "best_iteration": hooks.validation.state["best_iteration"],
        "best_val_loss": hooks.validation.state["best_loss"],
    }
    if hooks.average is not None:  # final_loss and the accuracies are the average's
        summary["average"] = opt.average
        summary["final_iterate_loss"] = objective.value(result.w)
    if objective.metric_name is not None:  # accuracy, or MAE for regression
        summary[f"train_{objective.metric_name}"] = objective.metric(w)
    for index, (split, eval_shard) in enumerate(zip(job.data.eval_splits, session.eval_shards,
                                                    strict=True)):
        if eval_shard.total:
            evaluator = hooks.eval_objective(index)
            values = evaluator.evaluate(w)  # loss and accuracy (or MAE), one Allreduce
            summary.update({f"{split}_{name}": value for name, value in values.items()})
    return summary, weights_file(session, w)


def _model_name(session: Session) -> str:
    """The built-in model's name, or the user's model's (mpinewton.fit, model.factory)."""
    job = session.job
    if session.inputs.model is not None:
        return f"{session.model.name} (given to mpinewton.fit)"
    return f"{session.model.name} ({job.model.factory})" if job.model.factory else job.model.name


def _banner(session: Session, run_dir: Path) -> str:
    job, comm, sampler = session.job, session.comm, session.sampler
    intra, inter = session.threads
    return (f"mpinewton {__version__}: job {job.run.name!r}, {comm.size} rank(s) x {intra} "
            f"thread(s) (inter-op {inter}); model {_model_name(session)} ({session.layout.size} "
            f"weights, {job.model.dtype}); {session.shard.total} training samples from "
            f"{job.data.path} [{'+'.join(job.data.train_splits)}]"
            f"{f', batches of {sampler.batch_size}' if sampler else ', full batch'}, "
            f"micro-batch {job.objective.micro_batch}; run dir {run_dir}")


def train(job: JobConfig, comm: Comm, run_dir: Path, *, overwrite: bool = False,
          check_sync: bool = False, resume: str | None = None,
          inputs: UserInputs | None = None) -> dict[str, Any] | None:
    """Run one job on this rank; returns the summary, or None if stopped by a signal.

    ``inputs``: the Python API's own model and arrays (``mpinewton.fit``).
    """
    say = print if comm.is_root else (lambda *a, **k: None)
    for note in job.notes:
        say(f"note: {note}")
    out = RunDirectory(run_dir, is_root=comm.is_root, say=say)
    try:
        comm.run_agreed(lambda: out.prepare(job, overwrite=overwrite,
                                            resuming=resume is not None),
                        "preparing the run directory")
        session = open_session(job, comm, out.checkpoints, resume, say, inputs)
        return _run(session, out, run_dir, check_sync=check_sync, say=say)
    finally:
        out.close()


def _run(session: Session, out: RunDirectory, run_dir: Path, *, check_sync: bool,
         say: Callable[..., None]) -> dict[str, Any] | None:
    """The loop of a set-up session, then the summary and final weights."""
    job, comm, resume = session.job, session.comm, session.resume
    done = resume.iteration if resume is not None else 0
    if resume is not None:
        say(f"resuming from {resume.path} after iteration {done}")
        if resume.config_sha256 != job.digest():
            say("note: the job differs from the checkpoint's; continuing with the job as given")
    out.open_metrics(done)
    comm.run_agreed(lambda: (out.start_afresh() if done == 0 else None,
                             out.open_tensorboard(job.run.tensorboard)),
                    "preparing best/ and tensorboard/ in the run directory")
    phases = phases_of(job)
    hooks = TrainingHooks(session, out, phases, check_sync=check_sync, say=say)
    say(_banner(session, run_dir), flush=True)
    if session.sampler is not None and session.sampler.batch_size < comm.size:
        b = session.sampler.batch_size
        say(f"warning: optimizer.batch_size = {b} on {comm.size} ranks leaves {comm.size - b} "
            f"of the {comm.size} ranks without samples in every iteration (they only wait); "
            f"raise optimizer.batch_size to at least {comm.size} or run on at most {b} ranks")
    states = resume.phase_states(job.optimizer.method) if resume is not None else {}
    hooks.states.update(states)
    hooks.w = session.w0
    if done < hooks.total:
        say("the first iteration compiles the objective's functions ("
            + ("XLA, objective.jit = true" if job.objective.jit else "tf.function")
            + "), so it may take a minute longer than the others", flush=True)
    try:
        result = run(hooks.problem, session.w0, phases, states=states, start=done,
                     gtol=job.optimizer.gtol or None, fresh_batches=session.sampler is not None,
                     hooks=hooks)
    except FloatingPointError as exc:  # raised alike on every rank: the same reduced values
        k, phase = hooks.record.get("iter", done + 1), hooks.record.get("phase", "start")
        raise RunDiverged(f"diverged at iteration {k} ({phase}): {exc}; "
                          f"{divergence_hint(job, phase)}. No checkpoint or weights file "
                          "holds these weights") from None
    if result.reason is LoopReason.STOPPED:
        return None
    hooks.states.update(result.states)
    if result.loss is not None:
        hooks.w_loss = result.loss
    if result.reason in (LoopReason.STALLED, LoopReason.CONVERGED):
        say(f"stopping early after iteration {result.iteration}: {result.message}", flush=True)
    elif result.reason is LoopReason.EARLY_STOPPED:
        say(f"stopping early after iteration {result.iteration}: {hooks.validation.message}",
            flush=True)
    validation = hooks.validation
    if validation.index is not None and result.iteration > 0 and \
            validation.state["last_iteration"] != result.iteration:
        validation.evaluate(result.iteration)  # the final weights are candidates for best
    if result.iteration > done or hooks.total == 0:
        hooks.save(result.iteration)
    summary, weights = _summary(hooks, result)
    out.finish(summary, weights)
    accs = "  ".join(f"{k.removesuffix(f'_{metric}')} {metric} {v:.4f}"
                     for k, v in summary.items() for metric in ("accuracy", "mae")
                     if k.endswith(f"_{metric}"))
    mean_cg = f", mean CG iterations {summary['mean_cg_iters']:.1f}" \
        if summary["method_iters"] and summary["mean_cg_iters"] else ""
    say(f"done: {result.iteration} iterations in {summary['wall_time']:.1f}s{mean_cg}; final "
        f"loss {summary['final_loss']:.6e}; {accs}; results in {run_dir}", flush=True)
    return summary
