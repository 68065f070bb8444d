"""The training loop: the solvers' loop with the driver's hooks around each step.

:func:`mpinewton.solvers.run` runs the phases (pre-training, then the method)
and decides when to stop; :class:`TrainingHooks` adds what only the driver
knows: this iteration's mini-batch, the broadcast of rank 0's weights (design
section 2), ``--check-sync``, the metrics line, SIGTERM/SIGUSR1 and
checkpoints.  :func:`train` wires a session, the run directory and the loop,
and writes the summary.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton import __version__
from mpinewton.comm import Comm
from mpinewton.config import JobConfig
from mpinewton.solvers import (
    METHODS,
    GDConfig,
    GradientDescent,
    LoopHooks,
    LoopReason,
    LoopResult,
    Phase,
    SolverState,
    StepRecord,
    run,
)
from mpinewton.train.rundir import RunDirectory
from mpinewton.train.session import Session, open_session

#: Counters carried across a resume (checkpoint state "progress").
PROGRESS_KEYS = ("wall_time", "cg_iters", "method_iters", "hvps", "gradients", "loss_evaluations")


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
            + (f"  batch -> {rec['next_batch_size']}" if rec.get("next_batch_size") else ""))


class TrainingHooks(LoopHooks):
    """The driver's side of each step (module docstring)."""

    def __init__(self, session: Session, out: RunDirectory, phases: list[Phase], *,
                 check_sync: bool, say: Callable[..., None]) -> None:
        self.session, self.comm, self.out = session, session.comm, out
        self.phases, self.sync, self.say = phases, check_sync, say
        self.stop = StopRequest()
        self.total = sum(p.iters for p in phases)
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
        if opt.curvature_fraction < 1:  # curvature products on part of each batch
            from mpinewton.sampling import curvature_count
            from mpinewton.train.subsample import SplitProblem

            batch = session.sampler.batch_size if session.sampler else session.shard.total
            self.curvature = session.objective(session.shard.x[:0], session.shard.y[:0],
                                               curvature_count(batch, opt.curvature_fraction))
            self.problem = SplitProblem(self.objective, self.curvature)
        stats = self.objective.stats
        stats.hvps, stats.grads = self.progress["hvps"], self.progress["gradients"]
        stats.values = self.progress["loss_evaluations"]
        self.start = time.perf_counter() - self.progress["wall_time"]
        self.record: dict[str, Any] = {}

    def before_step(self, k: int, phase: Phase) -> None:
        self.t0, self.hvps0 = time.perf_counter(), self.objective.stats.hvps
        _test_hooks(self.comm, k)
        self.record = {"iter": k, "phase": phase.name}
        sampler = self.session.sampler
        if sampler is None:
            self._set_curvature_rows(k, phase, self.session.shard.x, self.session.shard.y,
                                     self.session.shard.lo, self.session.shard.hi,
                                     self.session.shard.total)
            return
        from mpinewton.data import shard_bounds
        from mpinewton.data.hdf5 import read_rows

        job, comm = self.session.job, self.comm
        batch = sampler.next()  # this iteration's batch; this rank reads its part
        lo, hi = shard_bounds(batch.size, comm.rank, comm.size)
        x_part, y_part = read_rows(job.data.path, list(job.data.train_splits), batch[lo:hi],
                                   limit=job.data.limit or None, **self.session.data_checks)
        self.objective.local.set_samples(x_part, y_part, pad_to=-(-batch.size // comm.size))
        self.objective.total_samples = batch.size  # batches may grow (optimizer.batch_growth)
        self._set_curvature_rows(k, phase, x_part, y_part, lo, hi, batch.size)
        if job.optimizer.batch_growth != "none" and phase.name != "pretrain":
            # mean_i |g_i|^2 on this batch at the step's weights, for the norm test
            self.mean_squares = float(np.sum(self.objective.grad_squares(self.w)))
        self.record.update(batch_size=batch.size, epoch=sampler.epoch)
        if self.sync:  # the parts the ranks read, together: the batch (same on any size)
            rows = np.concatenate(comm.allgather(batch[lo:hi]))
            self.record["batch_sha256"] = hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()

    def _set_curvature_rows(self, k: int, phase: Phase, x: np.ndarray, y: np.ndarray,
                            lo: int, hi: int, batch: int) -> None:
        """Give the curvature objective this rank's rows of iteration k's subset.

        ``x, y`` are the rows ``[lo, hi)`` of the batch this rank holds. Every
        micro-batch has ``min(micro_batch, ceil(1.25 m / size))`` rows (m the
        subset's size), so the compiled products keep one shape from one
        iteration to the next although each rank's share varies.
        """
        if self.curvature is None or phase.name == "pretrain":
            return
        from mpinewton.train.subsample import local_curvature_rows

        opt, comm = self.session.job.optimizer, self.comm
        rows, m = local_curvature_rows(batch, opt.curvature_fraction, self.session.job.run.seed,
                                       k, lo, hi)
        self.curvature.local.set_samples(x[rows], y[rows],
                                         pad_to=max(1, -(-5 * m // (4 * comm.size))))
        self.curvature.total_samples = m  # batches may grow (optimizer.batch_growth)
        self.record["curvature_samples"] = m

    def after_step(self, k: int, phase: Phase, w: np.ndarray, state: SolverState,
                   info: StepRecord) -> tuple[np.ndarray, bool]:
        # Rank 0's step is authoritative (design section 2): broadcast its weights.
        w = self.comm.bcast_array(np.asarray(w, dtype=self.session.layout.dtype))
        w = _test_diverge(self.comm, w, k)
        self.w, self.states[phase.name] = w, state
        record = {**self.record, **info.record()}
        if self.sync:
            record["weights_sha256"] = check_sync(self.comm, w, k)
        record.update(hvps=self.objective.stats.hvps - self.hvps0,
                      iter_seconds=time.perf_counter() - self.t0,
                      wall_time=time.perf_counter() - self.start)
        if phase.name != "pretrain":
            self.progress["cg_iters"] += record["cg_iters"] or 0
            self.progress["method_iters"] += 1
            self._grow_batch(record, info)
        self.out.log(record)
        self.out.check_lock()
        self.say(format_line(record), flush=True)
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

    def _grow_batch(self, record: dict[str, Any], info: StepRecord) -> None:
        """Progressive batches: the norm test on this step's batch sets the next size.

        ``info.grad_norm`` is |g| on the batch at the step's weights, where
        :meth:`before_step` took ``mean_i |g_i|^2``; both are reduced over all
        ranks, so every rank decides alike.
        """
        opt, sampler = self.session.job.optimizer, self.session.sampler
        if sampler is None or opt.batch_growth == "none":
            return
        from mpinewton.sampling import norm_test

        wanted = norm_test(sampler.batch_size, self.mean_squares, info.grad_norm ** 2,
                           opt.batch_theta)
        cap = opt.batch_max or sampler.num_samples
        if wanted is not None and sampler.batch_size < cap:
            record["next_batch_size"] = sampler.grow(min(wanted, cap))

    def save(self, iteration: int) -> None:
        """Write a checkpoint of the weights and every state at ``iteration`` (rank 0)."""
        from mpinewton.checkpoint import write_checkpoint

        stats, session, job = self.objective.stats, self.session, self.session.job
        self.progress.update(wall_time=time.perf_counter() - self.start, hvps=stats.hvps,
                             gradients=stats.grads, loss_evaluations=stats.values)
        state = {"optimizer": {name: s.to_dict() for name, s in self.states.items()},
                 "progress": dict(self.progress),
                 "schedule": self.schedule_state(iteration)}
        saved = self.comm.run_agreed(lambda: write_checkpoint(
            self.out.checkpoints, iteration=iteration,
            weights=session.layout.as_dict(self.w), state=state,
            config_toml=job.to_toml(), config_sha256=job.digest(), world_size=self.comm.size,
            keep=job.checkpoint.keep) if self.comm.is_root else None, "writing a checkpoint")
        if saved is not None:
            self.say(f"checkpoint {saved}", flush=True)

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
        return {"iteration": iteration, "total_iterations": len(names),
                "phase": names[iteration - 1] if 0 < iteration <= len(names) else "start",
                "next_phase": names[iteration] if iteration < len(names) else "done",
                "method": job.optimizer.method, "sampling": sampling}


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
    w, progress, opt = result.w, hooks.progress, job.optimizer
    method_iters = progress["method_iters"]
    summary: dict[str, Any] = {
        "job": job.run.name, "mpinewton_version": __version__, "world_size": comm.size,
        "threads_per_rank": session.threads[0], "weights": session.layout.size,
        "train_samples": session.shard.total, "train_eval_samples": shard.total,
        "iterations": result.iteration, "pretrain_iters": opt.pretrain_iters,
        "method": opt.method, "final_loss": objective.value(w),
        "final_grad_norm": float(np.linalg.norm(objective.value_and_grad(w)[1])),
        "train_accuracy": objective.accuracy(w), "wall_time": train_seconds,
        "method_iters": method_iters,
        "mean_cg_iters": progress["cg_iters"] / method_iters if method_iters else None,
        "hvps": progress["hvps"], "gradients": progress["gradients"],
        "loss_evaluations": progress["loss_evaluations"],
        "batch_size": session.sampler.batch_size if session.sampler else shard.total,
        "allreduce_seconds": comm.stats.allreduce_seconds, "config_sha256": job.digest(),
        "resumed_from": session.resume.path if session.resume is not None else None,
        "stopped": result.reason.value,
    }
    for split, eval_shard in zip(job.data.eval_splits, session.eval_shards, strict=True):
        if eval_shard.total:
            evaluator = session.objective(eval_shard.x, eval_shard.y, eval_shard.total)
            summary[f"{split}_accuracy"] = evaluator.accuracy(w)
            summary[f"{split}_loss"] = evaluator.value(w)
    # Batch-norm statistics too (never trained here, but part of the model), so
    # that model.weights = "DIR/weights.h5" restarts exactly this network.
    weights = {"w": w, **{f"variables/{name}": value
                          for name, value in session.layout.as_dict(w).items()},
               **{f"variables/{v.path}": np.asarray(v.numpy())
                  for v in session.model.non_trainable_variables}}
    return summary, weights


def _banner(session: Session, run_dir: Path) -> str:
    job, comm, sampler = session.job, session.comm, session.sampler
    intra, inter = session.threads
    return (f"mpinewton {__version__}: job {job.run.name!r}, {comm.size} rank(s) x {intra} "
            f"thread(s) (inter-op {inter}); model {job.model.name} ({session.layout.size} "
            f"weights, {job.model.dtype}); {session.shard.total} training samples from "
            f"{job.data.path} [{'+'.join(job.data.train_splits)}]"
            f"{f', batches of {sampler.batch_size}' if sampler else ', full batch'}, "
            f"micro-batch {job.objective.micro_batch}; run dir {run_dir}")


def train(job: JobConfig, comm: Comm, run_dir: Path, *, overwrite: bool = False,
          check_sync: bool = False, resume: str | None = None) -> dict[str, Any] | None:
    """Run one job on this rank; returns the summary, or None if stopped by a signal."""
    say = print if comm.is_root else (lambda *a, **k: None)
    for note in job.notes:
        say(f"note: {note}")
    out = RunDirectory(run_dir, is_root=comm.is_root, say=say)
    try:
        comm.run_agreed(lambda: out.prepare(job, overwrite=overwrite,
                                            resuming=resume is not None),
                        "preparing the run directory")
        session = open_session(job, comm, out.checkpoints, resume, say)
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
    phases = phases_of(job)
    hooks = TrainingHooks(session, out, phases, check_sync=check_sync, say=say)
    say(_banner(session, run_dir), flush=True)
    if session.sampler is not None and session.sampler.batch_size < comm.size:
        say(f"warning: batches of {session.sampler.batch_size} leave "
            f"{comm.size - session.sampler.batch_size} of {comm.size} ranks without samples "
            "in every iteration; raise optimizer.batch_size with the number of ranks")
    states = resume.phase_states(job.optimizer.method) if resume is not None else {}
    hooks.states.update(states)
    hooks.w = session.w0
    result = run(hooks.problem, session.w0, phases, states=states, start=done,
                 gtol=job.optimizer.gtol or None, fresh_batches=session.sampler is not None,
                 hooks=hooks)
    if result.reason is LoopReason.STOPPED:
        return None
    hooks.states.update(result.states)
    if result.reason in (LoopReason.STALLED, LoopReason.CONVERGED):
        say(f"stopping early after iteration {result.iteration}: {result.message}", flush=True)
    if result.iteration > done or hooks.total == 0:
        hooks.save(result.iteration)
    summary, weights = _summary(hooks, result)
    out.finish(summary, weights)
    accs = "  ".join(f"{k.removesuffix('_accuracy')} accuracy {v:.4f}"
                     for k, v in summary.items() if k.endswith("_accuracy"))
    mean_cg = f", mean CG iterations {summary['mean_cg_iters']:.1f}" \
        if summary["method_iters"] and summary["mean_cg_iters"] else ""
    say(f"done: {result.iteration} iterations in {summary['wall_time']:.1f}s{mean_cg}; final "
        f"loss {summary['final_loss']:.6e}; {accs}; results in {run_dir}", flush=True)
    return summary
