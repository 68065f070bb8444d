"""Race optimisers from the same weights: loss against wall time and passes over the data.

``mpirun -n 2 python -m mpinewton.compare [JOB.toml] [--set key=value ...]
[--variant LABEL=METHOD,key=value,...] [--time-limit S] [--max-iters K] --out FILE.json``

The job's data, model and objective are set up once, as the trainer does
(:func:`mpinewton.train.session.open_session`); the job's gradient-descent
pre-training runs once; then every variant starts from those same weights,
in turn, in the same processes, each until ``--time-limit`` seconds or
``--max-iters`` iterations. Every compiled product is warmed up before the
first variant, so no variant pays for compilation. The trace of a variant is
one point per iterate ``w_k``: the seconds and data passes spent to reach it,
and ``c(w_k)``, which the next step computes anyway (the last point costs one
extra loss evaluation, not counted). Each step's record (``steps``) carries
what the method reported and the step's clocked ``seconds``.

A *data pass* is one evaluation of the loss, gradient or one curvature
product over the whole training set; products on a sub-sample or a
mini-batch count their share.

With ``optimizer.batch_size > 0`` every variant draws mini-batches as the
trainer does (thesis 8.2), each variant the same sequence of batches (the
sampler's position after pre-training, copied). The loss on each
iteration's own batch is not comparable from one method to another, so the
trace is the loss on the first ``--eval-samples`` training samples, taken
every ``--eval-seconds`` of race time with the clock stopped.

Variants (``--variant``, repeatable) name a method of
:data:`mpinewton.solvers.METHODS` and any ``[optimizer]`` key of that method
(or ``curvature_fraction``); values are TOML (``damping=1e-3``,
``curvature="gauss_newton"``; bare words are taken as strings); ``iters=K``
caps that variant's iterations below ``--max-iters``. In a mini-batch race
``batch_size=B`` gives one variant batches of ``B`` instead of the job's,
cut from the same sequence of samples (the same epoch permutations from the
same position), e.g. Newton-CG on larger batches than the first-order
methods; ``batch_growth=norm_test`` (with ``batch_theta``, ``batch_max``) or
``batch_growth=geometric`` (with ``batch_every``, ``batch_factor``,
``batch_max``) lets one variant's batches grow from that size as the
trainer's do, and
``average=D`` makes the variant's model the exponential average of its
iterates (``optimizer.average``): its trace is the average's loss, the
iterate's beside it (``iterate_loss``). ``--average D1,D2,...`` traces, for
every variant, the loss at such averages with each decay as well (the
``averaged`` losses of each trace point, and a table), with the clock stopped.
Without ``--variant``, :data:`DEFAULT_VARIANTS` are run.

``--interleave`` runs the variants in turns, one step each, each on its own
clock (:func:`race_interleaved`), instead of one after another: a slow spell
of the machine then falls on every variant alike, not on one. The steps are
the same either way; only their seconds can differ. Every variant's weights
and state are held at once.

``--report FILE.json`` prints a finished race's tables from its traces: the
target and the seconds to each loss of a ladder, every method's loss at
:data:`LOSS_AT_SECONDS` and at :data:`LOSS_AT_PASSES`, and, for each pair,
the last second at which one method reached a loss the other had not
(:func:`first_until`; the summary keeps it as ``first_until``), and each
method's mean step loss over the steps every method took, with its median
step (:func:`per_step`: on the same batches, whatever the machine's speed),
and, in a mini-batch race, how fast the machine ran in each method's turn
(:func:`speed_gauge`, from the wall time of the trace's evaluations).
``--report A.json B.json ... [--versus LABEL]`` puts several races of the
same variants (one per seed) in one table (:func:`markdown_races`).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.comm import DistributedError, install_abort_handler, world
from mpinewton.config import ConfigError, JobConfig, OptimizerConfig, load_job
from mpinewton.durable import atomic_write_bytes, atomic_write_text

#: What ``python -m mpinewton.compare`` runs without ``--variant``.
DEFAULT_VARIANTS = (
    "newton=newton",
    "gd=gd,learning_rate=2.0",
    "lbfgs=lbfgs",
    "adam=adam,learning_rate=0.01",
)


@dataclass(frozen=True)
class Variant:
    """One contestant: a label and the ``[optimizer]`` configuration it runs."""

    label: str
    optimizer: OptimizerConfig
    spec: str
    iters: int | None = None  # its own iteration cap (``iters=`` in the spec)


def parse_variant(spec: str, job: JobConfig) -> Variant:
    """``LABEL=METHOD,key=value,...`` as a validated :class:`Variant` (job keys as defaults).

    Only the method's own keys come from the job when the job runs the same
    method; other methods start from their defaults.
    """
    from mpinewton.config import _build_optimizer, without_trial_gradient_on_batches

    label, sep, rest = spec.partition("=")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not sep or not label.strip() or not parts:
        raise ConfigError(f"--variant {spec!r}: expected LABEL=METHOD[,key=value...], "
                          "e.g. newton-gn=newton,curvature=gauss_newton")
    table: dict[str, Any] = {"method": parts[0]}
    if parts[0] == job.optimizer.method:
        table.update({k: v for k, v in job.optimizer.table().items()
                      if k not in ("pretrain_iters", "pretrain_lr", "iters", "batch_size")})
    for part in parts[1:]:
        key, eq, text = part.partition("=")
        if not eq:
            raise ConfigError(f"--variant {spec!r}: {part!r} is not key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        table[key.strip()] = value
    if table.get("batch_growth", "none") != "none" and "batch_size" not in table \
            and job.optimizer.batch_size:  # progressive batches start from the job's size
        table["batch_size"] = job.optimizer.batch_size
    notes: list[str] = []
    optimizer = _build_optimizer(table, f"--variant {label.strip()}", notes)
    optimizer = without_trial_gradient_on_batches(
        optimizer, notes, optimizer.batch_size or job.optimizer.batch_size)
    return Variant(label.strip(), optimizer, spec,
                   optimizer.iters if "iters" in table else None)


class Baton:
    """Turns in a fixed rotation for the variants of an interleaved race, one step each.

    Every variant runs in its own thread; only the holder of the baton runs,
    so the shared objective, the products' counters and MPI are used by one
    thread at a time (MPI_THREAD_SERIALIZED suffices), and every rank's threads
    take the same turns in the same order (design: lockstep). A variant that
    ends leaves the rotation; an error in one thread ends the wait of all the
    others (:class:`Abandoned`), so none is left waiting for a turn.
    """

    def __init__(self, n: int) -> None:
        import threading

        if n < 1:
            raise ValueError(f"Baton: at least one turn-taker, got {n}")
        self._cond = threading.Condition()
        self._active = list(range(n))  # those still in the rotation, in order
        self._turn = 0
        self._failed = False

    @property
    def turn(self) -> int | None:
        """Whose turn it is (None once every taker has left)."""
        with self._cond:
            return self._turn

    def wait(self, i: int) -> None:
        """Block until it is ``i``'s turn; :class:`Abandoned` if another thread failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._failed or self._turn == i)
            if self._failed:
                raise Abandoned(f"turn {i}: another variant failed")

    def pass_on(self, i: int) -> None:
        """``i`` hands the baton to the next taker in the rotation (itself if alone)."""
        with self._cond:
            self._check_holder(i)
            at = self._active.index(i)
            self._turn = self._active[(at + 1) % len(self._active)]
            self._cond.notify_all()

    def leave(self, i: int) -> None:
        """``i`` is done: out of the rotation, the baton to the next taker."""
        with self._cond:
            self._check_holder(i)
            at = self._active.index(i)
            self._active.pop(at)
            self._turn = self._active[at % len(self._active)] if self._active else None
            self._cond.notify_all()

    def fail(self) -> None:
        """End every wait: a thread failed, and no turn will come."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def _check_holder(self, i: int) -> None:
        if self._turn != i:
            raise RuntimeError(f"Baton: taker {i} acted in taker {self._turn}'s turn")


class Abandoned(RuntimeError):
    """A variant's thread stopped waiting for its turn: another variant failed."""


class _Race:
    """The solver loop's hooks for one variant: batches, the trace and the time limit.

    Full batch: the trace point of ``w_k`` is the loss the next step computes
    anyway. Mini-batches (``sampler``): every step gets the sampler's next
    batch, as in training, and the trace point is the loss on the fixed
    evaluation samples (``evaluator``), taken every ``eval_seconds`` of race
    time with the clock stopped. Passes count samples: an evaluation of the
    loss, gradient, Fisher diagonal or a curvature product on ``m`` of the
    ``n_train`` training samples counts ``m / n_train``. Each step's record
    carries its clocked ``seconds`` (from the batch's reading to the weights'
    broadcast; the clock-stopped work excluded).

    Progressive batches (``batch_growth``, the variant's optimizer config with
    ``batch_growth != "none"``) grow as the trainer's do
    (:func:`mpinewton.train.loop.grow_batch`): the norm test takes the mean
    squared per-sample gradient on each batch before the step (clocked, one
    pass of the batch) and decides after it; geometric growth needs no pass.
    A batch that grows gets its new shapes compiled with the clock stopped,
    as every variant's shapes are before its race.
    """

    def __init__(self, session: Any, problem: Any, objective: Any, curvature: Any,
                 fraction: float, limit: float, sampler: Any = None, evaluator: Any = None,
                 eval_seconds: float = 0.0, growth: Any = None,
                 batch_growth: OptimizerConfig | None = None, w: np.ndarray | None = None,
                 averages: Sequence[float] = (), average: float = 0.0,
                 baton: tuple[Baton, int] | None = None) -> None:
        self.session, self.comm = session, session.comm
        self.problem, self.objective, self.curvature = problem, objective, curvature
        self.fraction, self.limit, self.sampler = fraction, limit, sampler
        self.evaluator, self.eval_seconds = evaluator, eval_seconds
        self.n_train = session.shard.total
        self.batch, self.curvature_rows = self.n_train, self.n_train
        self.trace: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.paused = 0.0
        self.pass_total = 0.0
        self.t_before, self.p_before = 0.0, 0.0  # the running step's start (before_step)
        self.last_eval = -math.inf
        self.growth = growth  # optimizer.curvature_growth's rule, or None
        self.batch_growth = batch_growth if sampler is not None else None
        self.w = w  # the weights of the next step (the norm test's statistic is taken there)
        self.mean_squares = 0.0
        # Exponential averages of the iterates after w_0 (--average), one per decay.
        from mpinewton.solvers import IterateAverage

        self.averages = {float(d): IterateAverage(d, w) for d in averages} \
            if w is not None else {}
        # The variant's own optimizer.average: its trace is the average's loss, as the
        # trainer delivers the average (the iterate's loss beside it, "iterate_loss").
        self.average = IterateAverage(average, w) if average and w is not None else None
        # An interleaved race (--interleave): the baton and this variant's place in its
        # rotation; each step but the first hands the baton on, the clock stopped.
        self.baton = baton
        self.stepped = False

    def counts(self) -> tuple[int, int]:
        """Evaluations over the batch, and curvature products over the curvature rows.

        The Fisher diagonal (``grad_squares``) and K-FAC's factors are curvature:
        with a curvature sub-sample they are computed on the sub-sample
        (:class:`SplitProblem`). K-FAC's factors count as one pass (one forward
        pass, and a backward pass per model output, or one with a sampled Fisher).
        """
        stats = self.problem.stats
        return stats.values + stats.grads, \
            stats.hvps + stats.gnvps + stats.grad_squares + stats.kfac

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def evaluate(self, k: int, w: np.ndarray) -> None:
        """A trace point at ``w_k`` from the evaluation samples, the clock stopped."""
        t0 = time.perf_counter()
        seconds = self.elapsed()
        loss = float(self.evaluator.value(w))
        # The same forward pass on the same images at every point of every variant: its
        # wall time gauges the machine's speed during this variant (speed_gauge).
        point = {"iter": k, "seconds": seconds, "passes": self.pass_total, "loss": loss,
                 "probe_seconds": time.perf_counter() - t0}
        if self.average is not None:
            point["iterate_loss"] = point["loss"]
            point["loss"] = float(self.evaluator.value(self.average.weights))
        if self.averages:
            point["averaged"] = {f"{d:g}": float(self.evaluator.value(a.weights))
                                 for d, a in self.averages.items()}
        self.trace.append(point)
        self.last_eval = seconds
        self.paused += time.perf_counter() - t0

    def before_step(self, k: int, phase: Any) -> None:
        from mpinewton.train.subsample import load_batch, set_curvature_rows

        if self.baton is not None and self.stepped:  # the others' steps, not on this clock
            t0 = time.perf_counter()
            baton, i = self.baton
            baton.pass_on(i)
            baton.wait(i)
            self.paused += time.perf_counter() - t0
        self.stepped = True
        self.t_before, self.p_before = self.elapsed(), self.pass_total
        self.counts0 = self.counts()
        session = self.session
        if self.sampler is None:
            shard = session.shard
            x, y, lo, hi = shard.x, shard.y, shard.lo, shard.hi
        else:  # reading the batch is part of a step's cost, as in training
            batch = self.sampler.next()
            x, y, lo, hi = load_batch(session, self.objective, batch)
            self.batch = self.curvature_rows = batch.size
            if self.batch_growth is not None and self.batch_growth.batch_growth == "norm_test":
                # the norm test's mean_i |g_i|^2: one pass
                self.mean_squares = float(np.sum(self.objective.grad_squares(self.w)))
                self.counts0 = self.counts()
                self.pass_total += self.batch / self.n_train
        if self.curvature is not None:
            t0 = time.perf_counter()  # choosing the rows is bookkeeping, not optimisation
            fraction = self.fraction if self.growth is None else self.growth.current()
            self.curvature_rows = set_curvature_rows(
                self.curvature, self.comm.size, self.batch, fraction,
                session.job.run.seed, k, x, y, lo, hi)
            self.paused += time.perf_counter() - t0

    def after_step(self, k: int, phase: Any, w: np.ndarray, state: Any,
                   info: Any) -> tuple[np.ndarray, bool]:
        w = self.comm.bcast_array(np.asarray(w))
        evaluations, products = (now - before for now, before in
                                 zip(self.counts(), self.counts0, strict=True))
        self.pass_total += (evaluations * self.batch + products * self.curvature_rows) \
            / self.n_train
        if self.sampler is None:
            self.trace.append({"iter": k - 1, "seconds": self.t_before,
                               "passes": self.p_before, "loss": info.loss})
        self.records.append({"iter": k, **info.record(), "batch_size": self.batch,
                             "curvature_samples": self.curvature_rows})
        if self.growth is not None:
            self.growth.update(self.records[-1].get("damping"))
        self.w = w
        averages = list(self.averages.values())
        if self.average is not None:
            averages.append(self.average)
        for average in averages:  # clocked: a user averaging pays for it
            average.update(w)
        if self.batch_growth is not None:
            from mpinewton.train.loop import grow_batch

            grown = grow_batch(self.sampler, self.batch_growth, k, self.mean_squares,
                               info.grad_norm ** 2)
            if grown is not None:
                self.records[-1]["next_batch_size"] = grown
                self._compile_batch(grown, w)
        # Each rank reads its own clock; one Allreduce makes both decisions the same on
        # every rank (any rank past the limit stops all; any rank due evaluates), so the
        # evaluation's collectives are taken by every rank or by none (design: lockstep).
        elapsed = self.elapsed()
        self.records[-1]["seconds"] = elapsed - self.t_before  # the step's clocked time
        due = self.evaluator is not None and elapsed - self.last_eval >= self.eval_seconds
        over, evaluate = self.comm.allreduce_sum(
            np.array([float(elapsed > self.limit), float(due)])) > 0
        if self.sampler is not None and evaluate:
            self.evaluate(k, w)
        return w, bool(over)

    def _compile_batch(self, size: int, w: np.ndarray) -> None:
        """Compile the products at a grown batch's shapes, the clock stopped."""
        from mpinewton.train.subsample import load_batch

        t0 = time.perf_counter()
        load_batch(self.session, self.objective, np.arange(size))
        self.objective.value(w)
        self.objective.value_and_grad(w)
        used = products_used([self.batch_growth])
        if self.curvature is None:
            _compile_products(self.objective, w, used)
        else:
            _compile_products(self.objective, w, used & {"grad_squares"})
            levels = [self.fraction] if self.growth is None else self.growth.fractions()
            for fraction in levels:
                _warm_up_curvature(self.session, self.objective, self.curvature, w, fraction,
                                   size, used)
        self.paused += time.perf_counter() - t0


def race(variant: Variant, session: Any, objective: Any, w0: np.ndarray, *,
         limit: float, max_iters: int, say: Any, sampler: Any = None, evaluator: Any = None,
         eval_seconds: float = 0.0, averages: Sequence[float] = (),
         baton: tuple[Baton, int] | None = None) -> dict[str, Any]:
    """Run one variant from ``w0``; its trace, its step records and where it ended.

    With ``sampler`` (a copy per variant, so every variant sees the same
    batches) the race draws mini-batches and traces ``evaluator``'s loss.
    With ``baton`` (the rotation and this variant's place in it) the variant
    runs in turns with the others (:func:`race_interleaved`); it holds the
    baton when called, and still holds it when it returns.
    """
    from mpinewton.solvers import METHODS, Phase, run
    from mpinewton.train.loop import curvature_growth
    from mpinewton.train.subsample import SplitProblem, splits_curvature

    comm, opt = session.comm, variant.optimizer
    problem, curvature = objective, None
    growth = curvature_growth(opt)
    if splits_curvature(opt):
        from mpinewton.sampling import curvature_count

        batch = session.shard.total if sampler is None else sampler.batch_size
        curvature = session.objective(session.shard.x[:0], session.shard.y[:0],
                                      curvature_count(batch, opt.curvature_fraction))
        problem = SplitProblem(objective, curvature)
        # every fraction the rule can reach compiles here, unclocked
        for fraction in [opt.curvature_fraction] if growth is None else growth.fractions():
            _warm_up_curvature(session, objective, curvature, w0, fraction, batch,
                               products_used([opt]))
    method = METHODS[opt.method](opt.params)
    if sampler is not None and sampler.batch_size != session.sampler.batch_size:
        # its own batch's shapes compile here, before its clock starts
        from mpinewton.train.subsample import load_batch

        load_batch(session, objective, np.arange(sampler.batch_size))
        _warm_up(objective, w0, _hutchinson_blocks([opt]), products_used([opt]))
    comm.barrier()
    hooks = _Race(session, problem, objective, curvature, opt.curvature_fraction, limit,
                  sampler, evaluator, eval_seconds, growth,
                  opt if opt.batch_growth != "none" else None, w0,
                  averages if sampler is not None else (), opt.average, baton)
    first_batch = None if sampler is None else sampler.batch_size
    if sampler is not None:
        hooks.evaluate(0, w0)
    iters = max_iters if variant.iters is None else min(max_iters, variant.iters)
    result = run(problem, w0, [Phase(opt.method, method, iters)], hooks=hooks,
                 fresh_batches=sampler is not None)
    seconds, passes = hooks.elapsed(), hooks.pass_total
    if sampler is None:
        hooks.trace.append({"iter": result.iteration, "seconds": seconds, "passes": passes,
                            "loss": objective.value(result.w)})
    elif hooks.trace[-1]["iter"] != result.iteration:
        hooks.evaluate(result.iteration, result.w)
    final = hooks.trace[-1]
    say(f"{variant.label:<24} {result.iteration:5d} iterations  {seconds:7.1f}s  "
        f"{passes:8.1f} passes  loss {final['loss']:.6f}  ({result.reason.value})", flush=True)
    return {"label": variant.label, "spec": variant.spec, "method": opt.method,
            "batch_size": first_batch,
            # the last step's batch (progressive batches: the size they had grown to)
            "final_batch_size": None if sampler is None else
            hooks.records[-1]["batch_size"] if hooks.records else first_batch,
            "optimizer": opt.table(), "ended": result.reason.value, "trace": hooks.trace,
            "steps": hooks.records}


def race_interleaved(variants: Sequence[Variant], samplers: Sequence[Any],
                     run_one: Any) -> list[dict[str, Any]]:
    """Race ``variants`` in turns, one step each, every one on its own clock.

    ``run_one(variant, sampler, baton)`` is :func:`race` for one variant.
    Each variant runs in a thread of its own; a :class:`Baton` lets one
    thread run at a time, in the variants' order, and a variant's clock is
    stopped while the others take their turns. Run one after another, the
    variants meet the machine in different spells: on this kind of machine a
    method's step took up to 45 % longer in one turn than in another, which
    can decide a race. In turns, a slow spell falls on every variant alike.
    Every variant's weights and state are held at once (memory: their sum,
    not their maximum). The threads' large arrays come from glibc's main arena
    (:func:`mpinewton.memory.single_arena`, set by :func:`main`), as they would
    in the main thread. Returns the results in the variants' order; the
    first error of any thread is raised once all have stopped.
    """
    import threading

    baton = Baton(len(variants))
    results: list[dict[str, Any] | None] = [None] * len(variants)
    errors: list[BaseException | None] = [None] * len(variants)

    def turn_taker(i: int) -> None:
        try:
            baton.wait(i)
            results[i] = run_one(variants[i], samplers[i], (baton, i))
            baton.leave(i)
        except Abandoned:
            pass
        except BaseException as exc:  # noqa: BLE001 -- raised again by the main thread
            errors[i] = exc
            baton.fail()

    threads = [threading.Thread(target=turn_taker, args=(i,), name=f"race-{v.label}",
                                daemon=True) for i, v in enumerate(variants)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return [r for r in results if r is not None]


def write_report(path: Path, data: dict[str, Any]) -> None:
    """The race's JSON, gzip-compressed when ``path`` ends in ``.gz``.

    A mini-batch race records every one of its tens of thousands of steps:
    tens of megabytes of JSON, a few as ``.json.gz``.
    """
    text = json.dumps(data, indent=1, default=float) + "\n"
    if path.suffix == ".gz":
        import gzip

        atomic_write_bytes(path, gzip.compress(text.encode(), mtime=0))
    else:
        atomic_write_text(path, text)


def read_report(path: str | Path) -> dict[str, Any]:
    """A race's JSON (``.json`` or ``.json.gz``)."""
    path = Path(path)
    if path.suffix == ".gz":
        import gzip

        return json.loads(gzip.decompress(path.read_bytes()))
    return json.loads(path.read_text())


def png_path(out: Path) -> Path:
    """The plot beside the JSON: ``x.json`` and ``x.json.gz`` give ``x.png``."""
    base = out.with_suffix("") if out.suffix == ".gz" else out
    return base.with_suffix(".png")


#: Race seconds at which ``--report`` gives every method's loss (those within the limit).
LOSS_AT_SECONDS = (5.0, 10.0, 20.0, 30.0, 60.0, 100.0, 150.0, 300.0, 600.0)
#: Passes over the data at which it gives them too (those below every method's last).
LOSS_AT_PASSES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def first_time_below(trace: Sequence[dict[str, Any]], loss: float) -> dict[str, Any] | None:
    """The first point of ``trace`` at or below ``loss`` (None if never)."""
    return next((p for p in trace if p["loss"] <= loss), None)


def first_until(leader: Sequence[dict[str, Any]],
                other: Sequence[dict[str, Any]]) -> float | None:
    """The last race second at which ``leader`` reached a loss that ``other`` had not.

    For each point of the leader's trace, ``other`` is first or level if its trace
    was at or below that loss by then (its first point, the common start, counts
    as second 0). None: ``other`` was first or level at every loss the leader
    reached, the issue's criterion "first at every loss".
    """
    # The first point at or below a loss is a new running minimum of ``other``: keep
    # those (strictly decreasing losses), then bisect, O(log n) a point; a full-batch
    # race traces thousands of iterates a variant.
    seconds, negated, low = [], [], math.inf
    for i, p in enumerate(other):
        if p["loss"] < low:
            low = p["loss"]
            seconds.append(0.0 if i == 0 else p["seconds"])
            negated.append(-low)
    last = None
    for point in leader:
        j = bisect.bisect_left(negated, -point["loss"])  # the first minimum <= the loss
        if j < len(negated) and seconds[j] <= point["seconds"]:
            continue
        last = point["seconds"]
    return last


def loss_at(trace: Sequence[dict[str, Any]], seconds: float,
            clock: str = "seconds") -> float | None:
    """The last traced loss at or before ``seconds`` of race time (None: none yet).

    ``clock="passes"``: at or before that many passes over the data instead, the
    work done, which a machine whose speed drifts does not move.
    """
    points = [p for p in trace if p[clock] <= seconds]
    return points[-1]["loss"] if points else None


def cut_cg_share(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Share of CG iterations spent on steps whose length was then cut below 1/4.

    A line search that cuts a step to ``sigma < 1/4`` (or rejects it) throws
    most of that CG run away; a trust-region step counts when rejected.
    """
    total = sum(s.get("cg_iters") or 0 for s in steps)
    cut = sum(s.get("cg_iters") or 0 for s in steps if (s.get("step_size") or 0.0) < 0.25)
    return {"cg_iters": total, "cut": cut, "share": cut / total if total else None}


def per_step(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each method's step losses over the first ``n`` steps, ``n`` the fewest any method took.

    A step's ``loss`` is the objective at its iterate on that step's own batch:
    in a mini-batch race the methods with the job's batch size draw the same
    batches, so their means over the same steps compare the work of a step
    on equal terms, paired batch by batch. Unlike the loss at given seconds
    it does not move with the machine's speed, which drifted by up to 45 %
    between runs of one race on the 2-core machine (docs/results.md). The
    median clocked step (``seconds``; None in races that predate it) says
    what a step costs, the mean its occasional dear steps (K-FAC's inverse
    refreshes) too. Returns ``{"steps": n, "methods": {label: {"steps",
    "mean_seconds", "median_seconds", "mean_loss", "quarters"}}}``, ``quarters`` the means
    over each quarter of the ``n`` steps; None when a method took no step.
    """
    losses = {r["label"]: [s["loss"] for s in r["steps"] if s.get("loss") is not None]
              for r in results}  # a record without a loss (a hand-made one) is skipped
    n = min((len(v) for v in losses.values()), default=0)
    if n == 0:
        return {"steps": 0, "methods": {}}
    methods = {}
    for r in results:
        seconds = [s["seconds"] for s in r["steps"] if s.get("seconds") is not None]
        first = np.asarray(losses[r["label"]][:n], dtype=float)
        methods[r["label"]] = {
            "steps": len(r["steps"]),
            "mean_seconds": float(np.mean(seconds)) if seconds else None,
            "median_seconds": float(np.median(seconds)) if seconds else None,
            "mean_loss": float(first.mean()),
            "quarters": [float(q.mean()) if q.size else None
                         for q in np.array_split(first, 4)]}
    return {"steps": n, "methods": methods}


def speed_gauge(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """How fast the machine ran in each variant's turn, from its trace's evaluations.

    The variants of a race run one after another, each on its own clock, so a
    machine whose speed drifts (up to 45 % between runs minutes apart on the
    2-core machine of docs/benchmarks.md) favours whichever ran in a fast
    spell. Every trace point of a mini-batch race evaluates the same images
    (the clock stopped); the median wall time of those evaluations
    (``probe_seconds``, from the second point on: the first may still warm
    caches) is the gauge. Returns ``{label: {"median", "relative"}}``,
    ``relative`` the variant's median over the median of all the variants'
    medians (above 1: a slower spell), or None without probes (a full-batch
    race, or one run before the probes were kept).
    """
    medians = {}
    for r in results:
        probes = [p["probe_seconds"] for p in r["trace"][1:] if "probe_seconds" in p]
        if not probes:
            return None
        medians[r["label"]] = float(np.median(probes))
    centre = float(np.median(list(medians.values())))
    return {label: {"median": m, "relative": m / centre} for label, m in medians.items()}


def summarise(results: list[dict[str, Any]], reference: str | None,
              reference_iters: int) -> dict[str, Any]:
    """Targets and who reaches them first.

    The target is the loss the reference variant reached after
    ``reference_iters`` iterations; for it, and for a ladder of lower losses
    down to the best any variant reached, each variant's seconds (and passes)
    to get there.
    """
    out: dict[str, Any] = {}
    # Several references (comma-separated): the target is the best of them.
    names = [] if reference is None else [n.strip() for n in reference.split(",")]
    candidates = []
    for r in results:
        if r["label"] in names:
            points = [p for p in r["trace"] if p["iter"] <= reference_iters]
            candidates.append((points[-1]["loss"], r["label"], points))
    if candidates:
        target, reference, points = min(candidates)
        out["target"] = {"loss": target, "reference": reference,
                         "reference_iters": points[-1]["iter"]}
        times = {}
        for r in results:
            hit = first_time_below(r["trace"], target)
            times[r["label"]] = None if hit is None else {"seconds": hit["seconds"],
                                                          "passes": hit["passes"],
                                                          "iter": hit["iter"]}
        out["to_target"] = times
        ref_s = times[reference]["seconds"] if times.get(reference) else None
        if ref_s:
            out["speedup_vs_reference"] = {k: (ref_s / v["seconds"] if v and v["seconds"] > 0
                                               else None) for k, v in times.items()}
    out["cut_cg_share"] = {r["label"]: cut_cg_share(r["steps"]) for r in results
                           if any(s.get("cg_iters") for s in r["steps"])}
    best = {r["label"]: min(p["loss"] for p in r["trace"]) for r in results}
    out["best_loss"] = best
    averaged = {r["label"]: {d: {"final": r["trace"][-1]["averaged"][d],
                                 "lowest": min(p["averaged"][d] for p in r["trace"])}
                             for d in r["trace"][-1]["averaged"]}
                for r in results if r["trace"] and "averaged" in r["trace"][-1]}
    if averaged:  # --average: the loss at each exponential average of the iterates
        out["averaged"] = averaged
    gauge = speed_gauge(results)
    if gauge:
        out["speed_gauge"] = gauge
    out["first_until"] = {a["label"]: {b["label"]: first_until(a["trace"], b["trace"])
                                       for b in results if b is not a} for a in results}
    # A ladder of 12 losses from the common start down to the best any variant reached.
    levels = np.geomspace(min(best.values()), max(r["trace"][0]["loss"] for r in results), 12)
    out["seconds_to_loss"] = {f"{lv:.6f}": {r["label"]: (hit["seconds"] if (
        hit := first_time_below(r["trace"], lv)) else None) for r in results} for lv in levels}
    return out


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss against seconds and against passes, one line per variant (rank 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        t = [p["seconds"] for p in r["trace"]]
        d = [p["passes"] for p in r["trace"]]
        loss = [p["loss"] for p in r["trace"]]
        axes[0].plot(t, loss, label=r["label"])
        axes[1].plot(d, loss, label=r["label"])
    for ax, xlabel in zip(axes, ("wall time (s)", "passes over the data"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    from mpinewton.durable import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _loss_table(results: list[dict[str, Any]], clock: str, points: Sequence[float],
                head: Sequence[str], title: str) -> list[str]:
    """Each method's loss at ``points`` of ``clock`` (seconds or passes), a row each.

    A ``head`` one longer than ``points`` adds the final loss as its last column.
    """
    lines = ["", title, "", "| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for r in results:
        cells = ["-" if v is None else f"{v:.4f}"
                 for v in (loss_at(r["trace"], q, clock) for q in points)]
        if len(head) > len(points):
            cells.append(f"{r['trace'][-1]['loss']:.4f}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``docs/results.md`` from a race's JSON (``--report FILE``)."""
    summary, results = report["summary"], report["results"]
    lines = []
    target = summary.get("target")
    if target:
        ref = summary["to_target"][target["reference"]]
        lines += [f"Target: loss {target['loss']:.6f}, reached by {target['reference']} "
                  f"after {target['reference_iters']} iterations.", "",
                  "| method | iterations in the time limit | final loss | seconds to target "
                  "| passes to target | x sooner than the reference | CG iterations cut "
                  "below 1/4 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            hit = summary["to_target"][r["label"]]
            cut = cut_cg_share(r["steps"]) if any(x.get("cg_iters") for x in r["steps"]) \
                else None
            share = "-" if not cut or cut["share"] is None else \
                f"{100 * cut['share']:.1f} % ({cut['cut']} of {cut['cg_iters']})"
            speed = "-" if hit is None or not ref else f"{ref['seconds'] / hit['seconds']:.1f}"
            lines.append(
                f"| {r['label']} | {r['trace'][-1]['iter']} | {r['trace'][-1]['loss']:.4f} | "
                + ("not reached | - | - " if hit is None else
                   f"{hit['seconds']:.1f} | {hit['passes']:.1f} | {speed} ")
                + f"| {share} |")
    levels = summary["seconds_to_loss"]
    labels = [r["label"] for r in results]
    lines += ["", "Seconds to reach each loss (first iterate at or below it; - = not within "
              "the time limit):", "",
              "| loss | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for level in sorted(levels, key=float):
        row = levels[level]
        lines.append(f"| {float(level):.4f} | " + " | ".join(
            "-" if row[k] is None else f"{row[k]:.1f}" for k in labels) + " |")
    times = [t for t in LOSS_AT_SECONDS if t <= report.get("time_limit", 600.0)]
    lines += _loss_table(results, "seconds", times, [f"{t:g} s" for t in times] + ["final"],
                         "Loss at given seconds of race time (the last traced loss by then):")
    common = min(r["trace"][-1]["passes"] for r in results)
    passes = [q for q in LOSS_AT_PASSES if q < common] + [common]
    lines += _loss_table(results, "passes", passes, [f"{q:.4g}" for q in passes],
                         "Loss at given passes over the data (the last traced loss by then; "
                         "the last column: the passes every method made):")
    if len(results) > 1:  # from the traces, so that races run before this table have it too
        lines += ["", "The last second at which the row's method reached a loss the column's had "
                  "not (- : never; the column's was first or level at every loss):", "",
                  "| first | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for a in results:
            cells = []
            for b in results:
                until = None if a is b else first_until(a["trace"], b["trace"])
                cells.append("" if a is b else "-" if until is None else f"{until:.1f}")
            lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    gauge = speed_gauge(results)
    if gauge:
        lines += ["", "The machine's speed in each method's turn: the median wall time of the "
                  "trace's evaluations (the same forward pass on the same images, the clock "
                  "stopped), and its ratio to the race's median (above 1: a slower spell; "
                  "a method's seconds divided by it are those at the race's median speed):",
                  "", "| method | evaluation (median) | relative |", "|---|---:|---:|"]
        for label, g in gauge.items():
            lines.append(f"| {label} | {g['median']:.3f} s | {g['relative']:.3f} |")
    steps = per_step(results)
    if steps["steps"] >= 4:
        lines += ["", f"Per step: the mean loss of each method's first {steps['steps']} steps "
                  "(each on its own batch: the same batches for every method with the job's "
                  "batch size) and of each quarter of them; the mean (median) clocked step:", "",
                  "| method | steps | mean (median) step | mean loss | quarters |",
                  "|---|---:|---:|---:|---|"]
        for label, m in steps["methods"].items():
            median = "-" if m["median_seconds"] is None else \
                f"{m['mean_seconds']:.2f} ({m['median_seconds']:.2f}) s"
            lines.append(f"| {label} | {m['steps']} | {median} | {m['mean_loss']:.4f} | "
                         + " / ".join(f"{q:.4f}" for q in m["quarters"]) + " |")
    averaged = summary.get("averaged")
    if averaged:
        decays = sorted({d for v in averaged.values() for d in v}, key=float)
        lines += ["", "Final (lowest) loss of the iterate and of its exponential averages:",
                  "", "| method | iterate | " + " | ".join(f"average {d}" for d in decays)
                  + " |", "|---|---:|" + "---:|" * len(decays)]
        for r in results:
            if r["label"] not in averaged:
                continue
            row = averaged[r["label"]]
            # a variant with its own average traces the average; its iterate is beside it
            iterate = [p.get("iterate_loss", p["loss"]) for p in r["trace"]]
            lines.append(f"| {r['label']} | {iterate[-1]:.4f} ({min(iterate):.4f}) | "
                         + " | ".join(
                             f"{row[d]['final']:.4f} ({row[d]['lowest']:.4f})" for d in decays)
                         + " |")
    return "\n".join(lines)


def markdown_races(reports: Sequence[tuple[str, dict[str, Any]]], versus: str | None) -> str:
    """One table over several races of the same variants (seeds): ``--report A B ...``.

    A row per race: each variant's final loss and, with ``versus``, each other
    variant's seconds to ``versus``'s final loss and the last second at which
    ``versus`` was first to a loss it had not reached (:func:`first_until`);
    then the mean of the final losses.
    """
    names = [name for name, _ in reports]
    labels = [r["label"] for r in reports[0][1]["results"]]
    for name, report in reports[1:]:
        if [r["label"] for r in report["results"]] != labels:
            raise ValueError(f"{name}: variants {[r['label'] for r in report['results']]}, "
                             f"but {names[0]} has {labels}: one table needs the same variants")
    if versus is not None and versus not in labels:
        raise ValueError(f"--versus {versus!r}: not a variant of these races ({labels})")
    others = [label for label in labels if label != versus] if versus else []
    head = [f"final: {label}" for label in labels]
    head += [f"{label}: to {versus}'s final" for label in others]
    head += [f"{versus} first until ({label})" for label in others]
    lines = ["| race | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    finals: dict[str, list[float]] = {label: [] for label in labels}
    for name, report in reports:
        traces = {r["label"]: r["trace"] for r in report["results"]}
        cells = []
        for label in labels:
            finals[label].append(traces[label][-1]["loss"])
            cells.append(f"{traces[label][-1]['loss']:.4f}")
        if versus:
            target = traces[versus][-1]["loss"]
            for label in others:
                hit = first_time_below(traces[label], target)
                cells.append("never" if hit is None else f"{hit['seconds']:.1f} s")
            for label in others:
                until = first_until(traces[versus], traces[label])
                cells.append("never" if until is None else f"{until:.1f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{float(np.mean(finals[label])):.4f}"
                                         for label in labels) + " |" + " |" * (2 * len(others)))
    return "\n".join(lines)


def products_used(optimizers: Sequence[OptimizerConfig]) -> set[str]:
    """The curvature products (``hvp``, ``gnvp``, ``grad_squares``, ``kfac:<dim>``) they take.

    ``kfac:<dim>`` is K-FAC's factors with its ``max_factor_dim``
    (``kfac:<dim>:sampled`` with ``fisher = "sampled"``). Only those
    are compiled before the race: ResNet-50's per-sample squared gradients
    (``grad_squares``, the Fisher preconditioner) alone would take gigabytes
    that a race without them never needs.
    """
    used: set[str] = set()
    for opt in optimizers:
        params = opt.params
        curvature = getattr(params, "curvature", None)
        if curvature is not None:
            used.add("gnvp" if curvature == "gauss_newton" else "hvp")
        if getattr(params, "preconditioner", "none") == "fisher" or \
                opt.batch_growth == "norm_test":
            used.add("grad_squares")
        if getattr(params, "preconditioner", "none") == "hutchinson":
            used.add("hvp")
        if opt.method == "kfac":  # one compiled graph for each largest whole factor
            used.add(f"kfac:{params.max_factor_dim}"
                     + (":sampled" if params.fisher == "sampled" else ""))
            if params.damping_rule != "fixed":  # the reduction ratio's model
                used.add("gnvp")
    return used


def _hutchinson_blocks(optimizers: Sequence[OptimizerConfig]) -> list[int]:
    """The block sizes of the Hutchinson preconditioners among ``optimizers``."""
    return sorted({getattr(o.params, "preconditioner_samples", 0) for o in optimizers
                   if getattr(o.params, "preconditioner", "none") == "hutchinson"} - {0})


def _warm_up(objective: Any, w: np.ndarray, block_sizes: Sequence[int],
             used: set[str]) -> None:
    """Compile every product a variant may use, so that no variant's time includes it."""
    objective.value(w)
    objective.value_and_grad(w)
    # a sampled Fisher is always taken on a curvature objective (_warm_up_curvature)
    _compile_products(objective, w, {u for u in used if not u.endswith(":sampled")})
    v = np.ones_like(w) / math.sqrt(w.size)
    for k in block_sizes:
        objective.hvp_many(w, np.repeat(v[:, None], k, axis=1))


def _compile_products(objective: Any, w: np.ndarray, used: set[str]) -> None:
    v = np.ones_like(w) / math.sqrt(w.size)
    if "hvp" in used:
        objective.hvp(w, v)
    if "gnvp" in used:
        objective.gnvp(w, v)
    if "grad_squares" in used:
        objective.grad_squares(w)
    for item in sorted(used):
        if item.startswith("kfac:"):
            _, dim, *how = item.split(":")
            objective.kfac_factors(w, int(dim), sampled=how == ["sampled"])


def _warm_up_curvature(session: Any, objective: Any, curvature: Any, w: np.ndarray,
                       fraction: float, batch: int, used: set[str]) -> None:
    """Compile a variant's sub-sample products before its clock starts.

    The rows are iteration 0's subset of the first ``batch`` samples (full
    batch: of the shard); the race sets each iteration's own.
    """
    from mpinewton.train.subsample import load_batch, set_curvature_rows

    shard = session.shard
    if session.sampler is None:
        x, y, lo, hi = shard.x, shard.y, shard.lo, shard.hi
    else:
        x, y, lo, hi = load_batch(session, objective, np.arange(batch))
    set_curvature_rows(curvature, session.comm.size, batch, fraction, session.job.run.seed, 0,
                       x, y, lo, hi)
    _compile_products(curvature, w, used)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m mpinewton.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", default=None, help="TOML job (default "
                        "jobs/mnist_cnn.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one job key (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD,k=v",
                        help="a contestant (repeatable; default: " +
                        "; ".join(DEFAULT_VARIANTS) + ")")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds per variant (default 600)")
    parser.add_argument("--max-iters", type=int, default=100_000,
                        help="iterations per variant (default: no limit but time)")
    parser.add_argument("--interleave", action="store_true",
                        help="the variants take turns, one step each, each on its own clock "
                        "(a slow spell of the machine falls on all alike; memory: every "
                        "variant's state at once)")
    parser.add_argument("--reference", default=None,
                        help="label(s), comma-separated, whose best loss after "
                        "--reference-iters iterations sets the target")
    parser.add_argument("--reference-iters", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=10_000,
                        help="mini-batches: the loss traced is on the first N training "
                        "samples (default 10000)")
    parser.add_argument("--eval-seconds", type=float, default=1.0,
                        help="mini-batches: race seconds between two traced losses (default 1)")
    parser.add_argument("--average", default="", metavar="DECAYS",
                        help="mini-batches: also trace the loss at exponential averages of "
                        "the iterates with these decays, comma-separated (e.g. 0.9,0.99)")
    parser.add_argument("--out", default=None, help="JSON results, gzip-compressed if it "
                        "ends in .gz (and a PNG beside it)")
    parser.add_argument("--report", default=None, nargs="+", metavar="FILE.json",
                        help="print the markdown tables of an earlier race and exit; with "
                        "several files (one race per seed, the same variants), one table "
                        "over them")
    parser.add_argument("--versus", default=None, metavar="LABEL",
                        help="with several --report files: the variant the others are "
                        "timed against (to its final loss; how long it led)")
    args = parser.parse_args(argv)
    if args.report is None and args.out is None:
        parser.error("--out is required (or --report FILE.json)")
    try:
        args.average = tuple(float(d) for d in args.average.split(",") if d.strip())
    except ValueError:
        parser.error(f"--average: comma-separated decays, got {args.average!r}")
    if any(not 0 < d < 1 for d in args.average):
        parser.error(f"--average: every decay in (0, 1), got {args.average}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    if args.report is not None:
        if len(args.report) > 1:
            try:
                print(markdown_races([(Path(f).name, read_report(f)) for f in args.report],
                                     args.versus))
            except (OSError, ValueError, KeyError) as exc:
                print(f"error: --report: {exc}", file=sys.stderr)
                return 2
            return 0
        report = read_report(args.report[0])
        if args.reference is not None:  # the summary again, with these references
            report["summary"] = summarise(report["results"], args.reference,
                                          args.reference_iters)
        print(markdown(report))
        return 0
    if args.interleave:  # the variants' threads allocate their arrays from the main arena
        from mpinewton.memory import single_arena

        single_arena()
    comm = world()
    install_abort_handler(comm)
    say = print if comm.is_root else (lambda *a, **k: None)
    try:
        job = comm.run_agreed(lambda: load_job(args.job, args.overrides), "reading the job")
        variants = comm.run_agreed(lambda: [parse_variant(s, job) for s in
                                            (args.variant or DEFAULT_VARIANTS)],
                                   "reading the variants")
        labels = [v.label for v in variants]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--variant: labels must differ, got {labels}")
        for v in variants:
            for key in ("batch_size", "average"):
                if getattr(v.optimizer, key) and not job.optimizer.batch_size:
                    raise ConfigError(f"--variant {v.spec!r}: {key} needs a mini-batch "
                                      "race; set optimizer.batch_size in the job (--set)")
        if args.average and not job.optimizer.batch_size:
            raise ConfigError("--average needs a mini-batch race; set optimizer.batch_size "
                              "in the job (--set)")
        from mpinewton.train.session import open_session

        # The race reports training loss only: the evaluation splits are not read.
        job = dataclasses.replace(job, data=dataclasses.replace(job.data, eval_splits=()))
        session = open_session(job, comm, Path("/nonexistent-checkpoints"), None, say)
        for v in variants:
            if v.optimizer.batch_size > session.shard.total:
                raise ConfigError(f"--variant {v.spec!r}: batch_size {v.optimizer.batch_size}"
                                  f" exceeds the {session.shard.total} training samples of "
                                  f"{job.data.path}")
    except (ConfigError, DistributedError) as exc:  # every rank has it (run_agreed)
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    from mpinewton.solvers import GDConfig, GradientDescent, Phase, run

    opt, sampler = job.optimizer, session.sampler
    if sampler is None:
        objective = session.objective(session.shard.x, session.shard.y, session.shard.total)
        evaluator = None
        where = f"the full batch of {session.shard.total} samples"
    else:  # thesis 8.2: every step its own batch; the trace from fixed evaluation samples
        objective = session.objective(session.shard.x[:0], session.shard.y[:0],
                                      sampler.batch_size)
        held = session.read_training_set(min(args.eval_samples, session.shard.total))
        evaluator = session.objective(held.x, held.y, held.total)
        where = (f"mini-batches of {sampler.batch_size} of {session.shard.total} samples, the "
                 f"loss on the first {held.total} every {args.eval_seconds:g} s")
    say(f"{len(variants)} variants on {where}, {comm.size} rank(s); pre-training: "
        f"{opt.pretrain_iters} gradient-descent steps, lr {opt.pretrain_lr}", flush=True)
    t0 = time.perf_counter()
    pre_hooks = None if sampler is None else _Race(session, objective, objective, None, 1.0,
                                                   math.inf, sampler)
    pre = run(objective, session.w0, [Phase("pretrain", GradientDescent(
        GDConfig(learning_rate=opt.pretrain_lr)), opt.pretrain_iters)], hooks=pre_hooks)
    w0 = comm.bcast_array(pre.w)
    blocks = _hutchinson_blocks([v.optimizer for v in variants])
    if sampler is not None:  # the warm-up's batch: the first samples (not a race batch)
        from mpinewton.train.subsample import load_batch

        load_batch(session, objective, np.arange(sampler.batch_size))
    _warm_up(objective, w0, blocks, products_used([v.optimizer for v in variants]))
    start = objective.value(w0) if evaluator is None else evaluator.value(w0)
    say(f"start: loss {start:.6f} after {time.perf_counter() - t0:.1f}s of "
        "pre-training and warm-up", flush=True)
    results: list[dict[str, Any]] = []
    out = Path(args.out)

    def report(complete: bool) -> dict[str, Any]:
        """Write the JSON so far (rank 0); ``complete`` once every variant has run.

        Written after every variant: a race that dies (out of memory, a time
        limit) keeps the variants it finished.
        """
        import mpinewton
        from mpinewton.machine import describe

        data = {
            "command": "mpirun -n {} python -m mpinewton.compare {}".format(
                comm.size, " ".join(sys.argv[1:] if argv is None else argv)),
            "machine": {**describe(), "ranks": comm.size, "mpinewton": mpinewton.__version__},
            "job": job.run.name, "samples": session.shard.total, "weights": session.layout.size,
            "batch_size": opt.batch_size,
            "eval_samples": None if evaluator is None else evaluator.total_samples,
            "eval_seconds": None if evaluator is None else args.eval_seconds,
            "start_loss": results[0]["trace"][0]["loss"] if results else None,
            "time_limit": args.time_limit, "complete": complete,
            "interleaved": args.interleave,
            "variants": [v.spec for v in variants], "results": results,
            "summary": summarise(results, args.reference, args.reference_iters),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        write_report(out, data)
        return data

    from mpinewton.sampling import MiniBatchSampler

    state = None if sampler is None else sampler.state()  # where pre-training left it
    samplers = []
    for variant in variants:
        batches = None if state is None else MiniBatchSampler.from_state(
            state, num_samples=sampler.num_samples, batch_size=sampler.batch_size)
        if batches is not None and variant.optimizer.batch_size:  # the same samples' order
            batches.batch_size = variant.optimizer.batch_size
        samplers.append(batches)

    def run_one(variant: Variant, batches: Any,
                baton: tuple[Baton, int] | None = None) -> dict[str, Any]:
        return race(variant, session, objective, w0, limit=args.time_limit,
                    max_iters=args.max_iters, say=say, sampler=batches, evaluator=evaluator,
                    eval_seconds=args.eval_seconds, averages=args.average, baton=baton)

    if args.interleave:
        if not comm.serialized_threads:  # the same answer on every rank: one library
            if comm.is_root:
                print("error: --interleave: this MPI library does not allow calls from "
                      "threads (MPI_THREAD_SERIALIZED); run without it", file=sys.stderr,
                      flush=True)
            return 2
        say("interleaved: the variants take turns, one step each, each on its own clock",
            flush=True)
        results.extend(race_interleaved(variants, samplers, run_one))
    else:
        for variant, batches in zip(variants, samplers, strict=True):
            results.append(run_one(variant, batches))
            if comm.is_root and len(results) < len(variants):
                report(complete=False)
    if comm.is_root:
        summary = report(complete=True)["summary"]
        drawn = "full batch" if sampler is None else \
            f"batches of {sampler.batch_size}, loss on {evaluator.total_samples} samples"
        plot(results, png_path(out), f"{job.run.name}: {comm.size} rank(s), "
             f"{session.shard.total} samples ({drawn}), from the same pre-trained weights")
        print(f"wrote {out} and {png_path(out)}", flush=True)
        if "to_target" in summary:
            print(f"target loss {summary['target']['loss']:.6f} ({args.reference} after "
                  f"{summary['target']['reference_iters']} iterations):")
            for label, hit in summary["to_target"].items():
                print(f"  {label:<24} " + ("not reached" if hit is None else
                                         f"{hit['seconds']:7.1f}s {hit['passes']:8.1f} passes"))
    comm.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
