"""``python -m mpinewton.train [JOB.toml] [--set key=value ...] [--run-dir DIR]``.

The one module that sees the whole flow (design section 2): the HDF5 shard of
this rank, the TensorFlow local sums, the MPI reduction, the numpy solvers, and
the run directory that rank 0 writes:

``DIR/config.toml``
    the resolved job (every key, defaults included).
``DIR/metrics.jsonl``
    one JSON object per iteration: ``iter``, ``phase`` (``pretrain``,
    ``newton`` or ``gd``), ``loss`` (at the start of the iteration),
    ``new_loss``, ``grad_norm``, ``cg_iters``, ``cg_reason``, ``step_size``,
    ``fallback``, ``linesearch_trials``, ``damping``, ``hvps``, ``iter_seconds``,
    ``wall_time`` (seconds since training started); with mini-batches
    (``optimizer.batch_size``, thesis 8.2) also ``batch_size`` and ``epoch``,
    and ``loss`` is the loss on that iteration's batch.
``DIR/summary.json``
    at the end: final loss, accuracies, ``world_size``, time, CG statistics.
``DIR/weights.h5``
    the final weights: dataset ``w`` (flat) and one dataset per variable.
``DIR/checkpoints/``
    HDF5 checkpoints and the ``latest`` pointer (docs/checkpoints.md).

Exit codes: 0 finished; 2 bad input (job, data, model, checkpoint, run
directory), reported by every rank; 75 checkpointed, not finished (SIGTERM or
SIGUSR1 received: rerun with ``--resume``); anything else a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton import __version__
from mpinewton.comm import Comm, DistributedError, install_abort_handler, local_size, world
from mpinewton.config import ConfigError, JobConfig, load_job

#: Exit code of a job stopped by a bad input (config, data, model); see docs.
EXIT_BAD_INPUT = 2
#: Exit code of a job that stopped on SIGTERM/SIGUSR1 after writing a checkpoint.
EXIT_CHECKPOINTED = 75


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the trainer."""
    parser = argparse.ArgumentParser(
        prog="python -m mpinewton.train",
        description="Train a Keras model with globalised Newton-CG (thesis Algorithm 4), "
                    "data-parallel over MPI ranks. Without JOB, runs jobs/mnist_cnn.toml.")
    parser.add_argument("job", nargs="?", default=None, help="TOML job file (default: %(default)s "
                        "= jobs/mnist_cnn.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one job key (repeatable)")
    parser.add_argument("--run-dir", default=None, help="run directory (default runs/<run.name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run directory that already holds a run "
                             "(its metrics and checkpoints are deleted)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        metavar="PATH|required",
                        help="continue from the run directory's latest valid checkpoint (a "
                             "fresh start when there is none), from the checkpoint PATH, or, "
                             "with 'required', fail when no valid checkpoint exists")
    parser.add_argument("--check-sync", action="store_true",
                        help="after every step, verify that all ranks hold bitwise identical "
                             "weights (one extra allgather of a hash per iteration); with "
                             "mini-batches also record a hash of the rows all ranks read")
    return parser.parse_args(argv)


def configure_threads(job: JobConfig) -> tuple[int, int]:
    """Choose TensorFlow's thread pools before TensorFlow starts (one rank, one share)."""
    intra = job.threads.intra_op
    if intra == 0:
        for var in ("MPINEWTON_INTRA_OP_THREADS", "OMP_NUM_THREADS"):
            if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
                intra = int(os.environ[var])
                break
        else:
            intra = max(1, (os.cpu_count() or 1) // local_size())
    inter = job.threads.inter_op
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    return intra, inter


class RunDirectory:
    """The run directory contract (module docstring); only rank 0 writes."""

    def __init__(self, path: Path, comm: Comm) -> None:
        self.path = path
        self.comm = comm
        self._metrics: Any = None

    @property
    def checkpoints(self) -> Path:
        """The folder of this run's checkpoints."""
        return self.path / "checkpoints"

    def prepare(self, job: JobConfig, *, overwrite: bool, resuming: bool) -> None:
        """Create the folder, refuse to clobber a previous run, write config.toml."""
        if not self.comm.is_root:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} exists and is not a directory")
        if (self.path / "metrics.jsonl").exists() and not (overwrite or resuming):
            raise ConfigError(f"run directory {self.path} already holds a run (metrics.jsonl); "
                              "continue it with --resume, choose another --run-dir, or pass "
                              "--overwrite to start afresh")
        self.path.mkdir(parents=True, exist_ok=True)
        if not resuming:
            for name in ("metrics.jsonl", "summary.json", "weights.h5"):
                (self.path / name).unlink(missing_ok=True)
            if self.checkpoints.is_dir():
                for old in self.checkpoints.iterdir():
                    if old.is_file():
                        old.unlink()
        _atomic_write_text(self.path / "config.toml", job.to_toml())

    def open_metrics(self, upto: int) -> None:
        """Open metrics.jsonl for appending, keeping only records with ``iter <= upto``.

        On resume from iteration ``upto`` the records of iterations the
        interrupted run made after its checkpoint are dropped, so the file ends
        as an uninterrupted run's would.
        """
        if not self.comm.is_root:
            return
        path = self.path / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["iter"] <= upto]
            _atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._metrics = open(path, "a", buffering=1)  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        """Append one iteration's metrics (rank 0)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        """Write summary.json and weights.h5 atomically (rank 0)."""
        if not self.comm.is_root:
            return
        if self._metrics is not None:
            self._metrics.close()
        import h5py

        tmp = self.path / ".weights.h5.tmp"
        with h5py.File(tmp, "w") as f:
            for name, value in weights.items():
                f.create_dataset(name, data=value)
            f.attrs["mpinewton_version"] = __version__
        os.replace(tmp, self.path / "weights.h5")
        _atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fail_hook(comm: Comm, iteration: int) -> None:
    """Test-only hooks.

    ``MPINEWTON_FAIL_RANK=r`` (and ``MPINEWTON_FAIL_ITER=k``) raise on rank r;
    ``MPINEWTON_TEST_ITER_SLEEP=s`` sleeps s seconds per iteration, so that
    tests can signal a run in the middle.
    """
    if "MPINEWTON_TEST_ITER_SLEEP" in os.environ:
        time.sleep(float(os.environ["MPINEWTON_TEST_ITER_SLEEP"]))
    rank = os.environ.get("MPINEWTON_FAIL_RANK")
    if rank is not None and int(rank) == comm.rank and \
            iteration >= int(os.environ.get("MPINEWTON_FAIL_ITER", "1")):
        raise RuntimeError(f"test failure injected on rank {comm.rank} at iteration {iteration}")


def _check_sync(comm: Comm, w: np.ndarray, iteration: int) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()
    digests = comm.allgather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"weights differ between ranks after iteration {iteration}: "
                           + ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests)))
    return digest


def _format_line(rec: dict[str, Any]) -> str:
    cg = f"{rec['cg_iters']:3d} {rec['cg_reason'] or '-':<18}" if rec["phase"] == "newton" else \
        f"{'-':>3} {'-':<18}"
    return (f"{rec['phase']:<8} {rec['iter']:4d}  loss {rec['loss']:.6e}  "
            f"|g| {rec['grad_norm']:.3e}"
            f"  cg {cg}  step {rec['step_size']:.3g}{' FALLBACK' if rec['fallback'] else ''}"
            f"  {rec['iter_seconds']:6.2f}s  t={rec['wall_time']:7.1f}s")


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


def _resume_point(resume: str | None, folder: Path, spec: Any,
                  say: Any) -> Any:
    """Rank 0: the checkpoint to resume from (None: fresh start), per ``--resume``."""
    from mpinewton import checkpoint

    if resume is None:
        return None
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"checkpoint folder {folder} exists and is not a directory")
    if folder.is_dir():
        for tmp in checkpoint.cleanup_temporaries(folder):
            say(f"removed unfinished checkpoint file {tmp}")
    if resume not in ("auto", "required"):
        try:
            return checkpoint.load_checkpoint(Path(resume), expected=spec)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"--resume {resume}: {exc}") from None
    found, messages = checkpoint.find_latest_valid(folder, expected=spec) if folder.is_dir() \
        else (None, [])
    for message in messages:
        say(f"skipped checkpoint: {message}")
    if found is None and resume == "required":
        raise ConfigError(f"--resume required: no valid checkpoint in {folder}"
                          + ("" if messages else " (none written yet)"))
    if found is None:
        say(f"--resume: no checkpoint in {folder} yet; starting afresh")
    return found


def train(job: JobConfig, comm: Comm, run_dir: Path, *, overwrite: bool = False,
          check_sync: bool = False, resume: str | None = None) -> dict[str, Any] | None:
    """Run one job on this rank; returns the summary, or None if stopped by a signal."""
    say = print if comm.is_root else (lambda *a, **k: None)
    stop = StopRequest()
    intra, inter = configure_threads(job)

    from mpinewton import solvers
    from mpinewton.checkpoint import ModelSpec, write_checkpoint
    from mpinewton.data import Shard, inspect_dataset, read_shard, shard_bounds
    from mpinewton.data.hdf5 import read_rows
    from mpinewton.local import LocalObjective
    from mpinewton.models import build_model
    from mpinewton.objective import DistributedObjective
    from mpinewton.params import ParamLayout, get_flat

    out = RunDirectory(run_dir, comm)
    comm.run_agreed(lambda: out.prepare(job, overwrite=overwrite, resuming=resume is not None),
                    "preparing the run directory")

    checks = {"num_classes": job.model.num_classes,
              "expected_sample_shape": tuple(job.model.input_shape)}
    train_splits = list(job.data.train_splits)

    def load_data() -> tuple[Any, list[Any]]:
        if job.optimizer.batch_size:  # rows are read batch by batch (thesis 8.2)
            read_rows(job.data.path, train_splits, np.empty(0, np.int64), **checks)
            counts = inspect_dataset(job.data.path).splits
            total = sum(counts[name] for name in train_splits)
            total = min(total, job.data.limit) if job.data.limit else total
            shard = Shard(x=np.empty((0, *job.model.input_shape), np.uint8),
                          y=np.empty(0, np.int64), lo=0, hi=0, total=total,
                          split="+".join(train_splits), path=job.data.path)
        else:
            shard = read_shard(job.data.path, train_splits, comm.rank, comm.size,
                               limit=job.data.limit or None, **checks)
        evals = [read_shard(job.data.path, split, comm.rank, comm.size,
                            limit=job.data.eval_limit or None, **checks)
                 for split in job.data.eval_splits]
        return shard, evals

    shard, eval_shards = comm.run_agreed(load_data, "loading data")

    def make_model() -> Any:
        return build_model(job.model.name, dtype=job.model.dtype, seed=job.run.seed,
                           input_shape=tuple(job.model.input_shape),
                           num_classes=job.model.num_classes, hidden=job.model.hidden)

    model = comm.run_agreed(make_model, "building the model")
    layout = ParamLayout.of(model)
    spec = ModelSpec(names=layout.names, shapes=layout.shapes,
                     dtypes=tuple(layout.dtype for _ in layout.names))

    def initial_weights() -> np.ndarray:
        if job.model.weights:
            from mpinewton.models import load_initial_weights

            load_initial_weights(model, job.model.weights)
        w0 = get_flat(model)
        if job.model.perturb_std > 0:  # thesis 15.3: w <- w * p, p ~ N(1, std)
            from mpinewton.models import perturb_weights

            w0 = perturb_weights(w0, job.model.perturb_std, job.run.seed)
        return w0

    # The optimiser's weights live in the model's precision, so a resumed run
    # continues from exactly the numbers an uninterrupted run holds.
    w = comm.bcast_array(comm.run_agreed(initial_weights, "loading the initial weights")
                         .astype(layout.dtype))

    ckpt = comm.run_agreed(
        lambda: _resume_point(resume, out.checkpoints, spec, say) if comm.is_root else None,
        "finding a checkpoint to resume from")  # loaded and validated on rank 0 only
    found = comm.bcast(None if ckpt is None else
                       {"path": str(ckpt.path), "iteration": ckpt.iteration,
                        "state": ckpt.state, "config_sha256": ckpt.config_sha256})
    done = 0
    progress: dict[str, Any] = {"wall_time": 0.0, "cg_iters": 0, "newton_iters": 0, "hvps": 0,
                                "gradients": 0, "loss_evaluations": 0}
    state = solvers.NewtonState()
    opt = job.optimizer
    sampler = comm.run_agreed(lambda: _make_sampler(job, shard.total, found),
                              "setting up mini-batches")
    if found is not None:
        ckpt_w = np.concatenate([a.reshape(-1) for a in ckpt.weights.values()]) \
            if comm.is_root else np.empty_like(w)
        w = comm.bcast_array(ckpt_w.astype(layout.dtype))
        done = int(found["iteration"])
        state = solvers.NewtonState.from_dict(found["state"]["newton"])
        progress.update(found["state"]["progress"])
        say(f"resuming from {found['path']} after iteration {done}")
        if found["config_sha256"] != job.digest():
            say("note: the job differs from the checkpoint's; continuing with the job as given")
    out.open_metrics(done)

    def objective_of(x: np.ndarray, y: np.ndarray, total: int) -> DistributedObjective:
        local = LocalObjective(model, x, y, loss=job.objective.loss,
                               num_classes=job.model.num_classes,
                               micro_batch=job.objective.micro_batch, jit=job.objective.jit,
                               hvp=job.objective.hvp, pixel_scale=job.data.pixel_scale,
                               preprocess=job.data.preprocess)
        return DistributedObjective(local, comm, total)

    if sampler is None:
        objective = objective_of(shard.x, shard.y, shard.total)
    else:  # thesis 8.2: each iteration sets its own batch (below)
        objective = objective_of(shard.x[:0], shard.y[:0], sampler.batch_size)
    say(f"mpinewton {__version__}: job {job.run.name!r}, {comm.size} rank(s) x {intra} thread(s)"
        f" (inter-op {inter}); model {job.model.name} ({layout.size} weights, {job.model.dtype});"
        f" {shard.total} training samples from {job.data.path} "
        f"[{'+'.join(job.data.train_splits)}]"
        f"{f', batches of {sampler.batch_size}' if sampler else ', full batch'}, "
        f"micro-batch {job.objective.micro_batch}; "
        f"run dir {run_dir}", flush=True)

    newton_config = solvers.NewtonConfig(
        damping=opt.damping, cg_rtol=opt.cg_rtol, cg_max_iter=opt.cg_max_iter,
        cg_scale_tol_sqrt_n=opt.cg_scale_tol_sqrt_n, warm_start=opt.warm_start,
        descent_threshold=opt.descent_threshold, step_rule=opt.step_rule,
        armijo_beta=opt.armijo_beta, armijo_gamma=opt.armijo_gamma,
        armijo_max_trials=opt.armijo_max_trials, learning_rate=opt.learning_rate)
    schedule = ["pretrain"] * opt.pretrain_iters + [opt.method] * opt.iters
    start = time.perf_counter() - progress["wall_time"]

    def save(iteration: int) -> None:
        progress.update(wall_time=time.perf_counter() - start, hvps=objective.stats.hvps,
                        gradients=objective.stats.grads,
                        loss_evaluations=objective.stats.values)
        saved = comm.run_agreed(lambda: write_checkpoint(
            out.checkpoints, iteration=iteration,
            weights=dict(zip(layout.names, layout.split(w), strict=True)),
            state={"newton": state.to_dict(), "progress": dict(progress),
                   "schedule": _schedule_state(schedule, iteration, job, sampler)},
            config_toml=job.to_toml(), config_sha256=job.digest(), world_size=comm.size,
            keep=job.checkpoint.keep) if comm.is_root else None, "writing a checkpoint")
        if saved is not None:
            say(f"checkpoint {saved}", flush=True)

    objective.stats.hvps, objective.stats.grads = progress["hvps"], progress["gradients"]
    objective.stats.values = progress["loss_evaluations"]
    for k, phase in enumerate(schedule, start=1):
        if k <= done:
            continue
        t0 = time.perf_counter()
        hvps0 = objective.stats.hvps
        _fail_hook(comm, k)
        record: dict[str, Any] = {"iter": k, "phase": phase, "cg_iters": 0, "cg_reason": None,
                                  "fallback": False, "linesearch_trials": 0,
                                  "damping": opt.damping if phase == "newton" else None}
        if sampler is not None:  # this iteration's batch; this rank reads its part
            batch = sampler.next()
            lo, hi = shard_bounds(batch.size, comm.rank, comm.size)
            x_part, y_part = read_rows(job.data.path, train_splits, batch[lo:hi],
                                       limit=job.data.limit or None, **checks)
            objective.local.set_samples(x_part, y_part, pad_to=-(-batch.size // comm.size))
            record.update(batch_size=batch.size, epoch=sampler.epoch)
            if check_sync:  # the parts the ranks read, together: the batch (same on any size)
                rows = np.concatenate(comm.allgather(batch[lo:hi]))
                record["batch_sha256"] = hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()
        if phase == "newton":
            w_new, state, step = solvers.newton_step(objective, w, state, newton_config)
            record.update(loss=step.loss, new_loss=step.new_loss, grad_norm=step.grad_norm,
                          step_size=step.step.step, fallback=step.fallback,
                          linesearch_trials=step.step.trials,
                          cg_iters=step.cg.iterations if step.cg is not None else 0,
                          cg_reason=step.cg.reason.value if step.cg is not None else None)
            progress["cg_iters"] += record["cg_iters"]
            progress["newton_iters"] += 1
        else:
            lr = opt.pretrain_lr if phase == "pretrain" else opt.learning_rate
            w_new, loss, grad_norm = solvers.gd_step(objective, w, lr)
            record.update(loss=loss, new_loss=None, grad_norm=grad_norm, step_size=lr)
        if not np.all(np.isfinite(w_new)):
            raise FloatingPointError(f"iteration {k} ({phase}) produced NaN/Inf weights; "
                                     "lower the learning rate or raise the damping")
        # Rank 0's step is authoritative (design section 2): broadcast its weights.
        w = comm.bcast_array(np.asarray(w_new, dtype=layout.dtype))
        if check_sync:
            record["weights_sha256"] = _check_sync(comm, w, k)
        record.update(hvps=objective.stats.hvps - hvps0,
                      iter_seconds=time.perf_counter() - t0,
                      wall_time=time.perf_counter() - start)
        out.log(record)
        say(_format_line(record), flush=True)
        if stop.agreed(comm):
            save(k)
            comm.barrier()  # no rank exits before rank 0 has committed the checkpoint
            name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
            say(f"stopped by {name} after iteration {k}: checkpointed, not finished; "
                "continue with --resume", flush=True)
            return None
        if job.checkpoint.every and k % job.checkpoint.every == 0 and k < len(schedule):
            save(k)

    if done < len(schedule) or not schedule:
        save(len(schedule))
    train_seconds = time.perf_counter() - start
    train_total = shard.total
    if sampler is not None:  # the summary reports the training set (data.eval_limit)
        limits = [n for n in (job.data.limit, job.data.eval_limit) if n]
        shard = comm.run_agreed(lambda: read_shard(
            job.data.path, train_splits, comm.rank, comm.size,
            limit=min(limits) if limits else None, **checks),
            "reading the training set for the summary")
        objective = objective_of(shard.x, shard.y, shard.total)
    final_loss = objective.value(w)
    final_grad = float(np.linalg.norm(objective.value_and_grad(w)[1]))
    newton_iters = progress["newton_iters"]
    summary: dict[str, Any] = {
        "job": job.run.name, "mpinewton_version": __version__, "world_size": comm.size,
        "threads_per_rank": intra, "weights": layout.size, "train_samples": train_total,
        "train_eval_samples": shard.total,
        "iterations": len(schedule), "pretrain_iters": opt.pretrain_iters,
        "method": opt.method, "final_loss": final_loss, "final_grad_norm": final_grad,
        "train_accuracy": objective.accuracy(w), "wall_time": train_seconds,
        "newton_iters": newton_iters,
        "mean_cg_iters": progress["cg_iters"] / newton_iters if newton_iters else None,
        "hvps": progress["hvps"], "gradients": progress["gradients"],
        "loss_evaluations": progress["loss_evaluations"],
        "batch_size": sampler.batch_size if sampler else shard.total,
        "allreduce_seconds": comm.stats.allreduce_seconds, "config_sha256": job.digest(),
        "resumed_from": found["path"] if found is not None else None,
    }
    for split, eval_shard in zip(job.data.eval_splits, eval_shards, strict=True):
        if eval_shard.total:
            evaluator = objective_of(eval_shard.x, eval_shard.y, eval_shard.total)
            summary[f"{split}_accuracy"] = evaluator.accuracy(w)
            summary[f"{split}_loss"] = evaluator.value(w)
    # Batch-norm statistics too (never trained here, but part of the model), so
    # that model.weights = "DIR/weights.h5" restarts exactly this network.
    weights = {"w": w, **{f"variables/{name}": value
                          for name, value in zip(layout.names, layout.split(w), strict=True)},
               **{f"variables/{v.path}": np.asarray(v.numpy())
                  for v in model.non_trainable_variables}}
    out.finish(summary, weights)
    accs = "  ".join(f"{k.removesuffix('_accuracy')} accuracy {v:.4f}"
                     for k, v in summary.items() if k.endswith("_accuracy"))
    mean_cg = f", mean CG iterations {summary['mean_cg_iters']:.1f}" if newton_iters else ""
    say(f"done: {len(schedule)} iterations in {train_seconds:.1f}s{mean_cg}; final loss "
        f"{final_loss:.6e}; {accs}; results in {run_dir}", flush=True)
    return summary


def _schedule_state(schedule: list[str], iteration: int, job: JobConfig,
                    sampler: Any) -> dict[str, Any]:
    """Where the run stands, for a checkpoint: phase, damping, data position, seed.

    Full batch: every iteration uses the whole training set (one epoch,
    position 0). Mini-batches: the sampler's seed, epoch and position (thesis
    8.2, mpinewton.sampling). The driver draws no other random numbers after
    the initial weights (which the checkpoint replaces), so this is all the RNG
    state there is.
    """
    sampling = sampler.state() if sampler is not None else {
        "mode": "full_batch", "epoch": iteration, "position": 0, "seed": job.run.seed}
    return {"iteration": iteration, "total_iterations": len(schedule),
            "phase": schedule[iteration - 1] if 0 < iteration <= len(schedule) else "start",
            "next_phase": schedule[iteration] if iteration < len(schedule) else "done",
            "damping": job.optimizer.damping, "step_rule": job.optimizer.step_rule,
            "sampling": sampling}


def _make_sampler(job: JobConfig, total: int, found: dict[str, Any] | None) -> Any:
    """The mini-batch sampler of a stochastic run (None: full batch), restored on resume."""
    from mpinewton.sampling import MiniBatchSampler

    b = job.optimizer.batch_size
    if b == 0:
        return None
    if b > total:
        raise ConfigError(f"optimizer.batch_size = {b} exceeds the {total} training samples "
                          f"of {job.data.path}")
    saved = (found or {}).get("state", {}).get("schedule", {}).get("sampling")
    if saved is not None and saved.get("mode") == "mini_batch":
        try:
            return MiniBatchSampler.from_state(saved, num_samples=total, batch_size=b)
        except ValueError as exc:
            raise ConfigError(f"--resume {found['path']}: {exc}") from None  # type: ignore[index]
    if found is not None and found["iteration"] > 0:
        raise ConfigError(f"--resume {found['path']}: the checkpoint holds no mini-batch "
                          "position, but this job draws mini-batches (optimizer.batch_size)")
    return MiniBatchSampler(total, b, seed=job.run.seed)


def check_slurm_world(comm: Comm) -> None:
    """Refuse a launch that started N one-rank jobs instead of one N-rank job.

    ``srun`` without a working PMI plugin (or an MPI library built without
    it) starts every task as its own one-rank world; each would then train on
    the whole data set and overwrite the others' files. Inside an ``srun``
    step (``SLURM_STEP_ID`` set) a one-rank world in a step of several tasks
    is that failure. Only a one-rank world is refused: ranks that Open MPI's
    ``mpirun`` starts through its per-node daemons see the daemons' step
    (one task per node), not theirs, and are fine.
    """
    if os.environ.get("SLURM_STEP_ID") is None or comm.size != 1:
        return
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
        ntasks = os.environ.get(var, "")
        if ntasks.isdigit():
            break
    else:
        return
    if int(ntasks) > 1:
        raise ConfigError(
            f"SLURM started {ntasks} tasks ({var}) but the MPI world has 1 rank: the launcher "
            "started independent processes. Use `srun --mpi=pmix` (see `srun --mpi=list`) "
            "or `mpirun` inside the allocation (docs/cluster.md)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    comm = world()
    install_abort_handler(comm)
    try:
        comm.run_agreed(lambda: check_slurm_world(comm), "checking the launch")
        job = comm.run_agreed(lambda: load_job(args.job, args.overrides), "reading the job")
        run_dir = Path(args.run_dir) if args.run_dir else Path(job.run.run_dir or
                                                                 f"runs/{job.run.name}")
        summary = train(job, comm, run_dir, overwrite=args.overwrite,
                        check_sync=args.check_sync, resume=args.resume)
    except (ConfigError, DistributedError) as exc:
        # Every rank raised this same error (run_agreed): each exits non-zero.
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0 if summary is not None else EXIT_CHECKPOINTED


if __name__ == "__main__":
    sys.exit(main())
