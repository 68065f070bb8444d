"""What a training job starts from: threads, data, model, weights, checkpoint, objective.

:func:`open_session` does the set-up of design section 2 on every rank, each
phase through ``comm.run_agreed`` so that an error on one rank (a bad label in
its shard, a missing file) is reported by every rank and the job ends with
exit code 2 instead of hanging.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.comm import Comm, local_size
from mpinewton.config import ConfigError, JobConfig
from mpinewton.solvers import METHODS, GDState, SolverState


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


@dataclass
class Resume:
    """The checkpoint a run continues from, as every rank knows it (rank 0 read it)."""

    path: str
    iteration: int
    state: dict[str, Any]
    config_sha256: str

    def phase_states(self, method: str) -> dict[str, SolverState]:
        """Each phase's solver state, by phase name (``pretrain`` and the method)."""
        saved = self.state.get("optimizer")
        if saved is None and "newton" in self.state:  # checkpoints written before 0.2
            saved = {"newton": self.state["newton"]}
        classes: dict[str, type[SolverState]] = {"pretrain": GDState,
                                                 method: METHODS[method].state_class}
        return {name: classes[name].from_dict(value) for name, value in (saved or {}).items()
                if name in classes}


@dataclass
class Session:
    """Everything a training loop needs, the same on every rank but the data shard."""

    job: JobConfig
    comm: Comm
    threads: tuple[int, int]
    model: Any
    layout: Any  # mpinewton.params.ParamLayout
    shard: Any  # mpinewton.data.Shard (empty with mini-batches)
    eval_shards: list[Any]
    sampler: Any  # mpinewton.sampling.MiniBatchSampler, or None for the full batch
    w0: np.ndarray
    resume: Resume | None

    def objective(self, x: np.ndarray, y: np.ndarray, total: int) -> Any:
        """The distributed objective of this model over samples ``x, y`` (``total`` in all)."""
        from mpinewton.local import LocalObjective
        from mpinewton.objective import DistributedObjective

        job = self.job
        local = LocalObjective(self.model, x, y, loss=job.objective.loss,
                               num_classes=job.model.num_classes,
                               micro_batch=job.objective.micro_batch, jit=job.objective.jit,
                               hvp=job.objective.hvp, pixel_scale=job.data.pixel_scale,
                               preprocess=job.data.preprocess)
        return DistributedObjective(local, self.comm, total)

    @property
    def data_checks(self) -> dict[str, Any]:
        """What every read of the job's data checks (labels, sample shape)."""
        return {"num_classes": self.job.model.num_classes,
                "expected_sample_shape": tuple(self.job.model.input_shape)}

    def read_training_set(self, limit: int | None) -> Any:
        """Read this rank's shard of the training splits (first ``limit`` samples)."""
        from mpinewton.data import read_shard

        return read_shard(self.job.data.path, list(self.job.data.train_splits), self.comm.rank,
                          self.comm.size, limit=limit, **self.data_checks)


def _load_data(job: JobConfig, comm: Comm) -> tuple[Any, list[Any]]:
    """Read this rank's training shard (empty with mini-batches) and evaluation shards."""
    from mpinewton.data import Shard, inspect_dataset, read_shard
    from mpinewton.data.hdf5 import read_rows

    checks = {"num_classes": job.model.num_classes,
              "expected_sample_shape": tuple(job.model.input_shape)}
    splits = list(job.data.train_splits)
    if job.optimizer.batch_size:  # rows are read batch by batch (thesis 8.2)
        read_rows(job.data.path, splits, np.empty(0, np.int64), **checks)
        counts = inspect_dataset(job.data.path).splits
        total = sum(counts[name] for name in splits)
        total = min(total, job.data.limit) if job.data.limit else total
        shard = Shard(x=np.empty((0, *job.model.input_shape), np.uint8),
                      y=np.empty(0, np.int64), lo=0, hi=0, total=total,
                      split="+".join(splits), path=job.data.path)
    else:
        shard = read_shard(job.data.path, splits, comm.rank, comm.size,
                           limit=job.data.limit or None, **checks)
        if shard.total < comm.size:
            raise ConfigError(
                f"{job.data.path} [{'+'.join(splits)}] has {shard.total} training sample(s) "
                f"for {comm.size} ranks: every rank needs at least one (run on at most "
                f"{shard.total} ranks, or raise data.limit)")
    evals = [read_shard(job.data.path, split, comm.rank, comm.size,
                        limit=job.data.eval_limit or None, **checks)
             for split in job.data.eval_splits]
    return shard, evals


def _initial_weights(job: JobConfig, model: Any) -> np.ndarray:
    """The start weights: built, loaded from ``model.weights``, perturbed (thesis 15.3)."""
    from mpinewton.models import load_initial_weights, perturb_weights
    from mpinewton.params import get_flat

    if job.model.weights:
        load_initial_weights(model, job.model.weights)
    w0 = get_flat(model)
    if job.model.perturb_std > 0:  # thesis 15.3: w <- w * p, p ~ N(1, std)
        w0 = perturb_weights(w0, job.model.perturb_std, job.run.seed)
    return w0


def _find_checkpoint(resume: str | None, folder: Path, spec: Any,
                     say: Callable[..., None]) -> Any:
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


def _make_sampler(job: JobConfig, total: int, resume: Resume | None) -> Any:
    """The mini-batch sampler of a stochastic run (None: full batch), restored on resume."""
    from mpinewton.sampling import MiniBatchSampler

    b = job.optimizer.batch_size
    if b == 0:
        return None
    if b > total:
        raise ConfigError(f"optimizer.batch_size = {b} exceeds the {total} training samples "
                          f"of {job.data.path}")
    saved = (resume.state if resume else {}).get("schedule", {}).get("sampling")
    if saved is not None and saved.get("mode") == "mini_batch":
        try:
            return MiniBatchSampler.from_state(
                saved, num_samples=total, batch_size=b,
                growing=job.optimizer.batch_growth != "none")
        except ValueError as exc:
            raise ConfigError(f"--resume {resume.path}: {exc}") from None  # type: ignore[union-attr]
    if resume is not None and resume.iteration > 0:
        raise ConfigError(f"--resume {resume.path}: the checkpoint holds no mini-batch "
                          "position, but this job draws mini-batches (optimizer.batch_size)")
    return MiniBatchSampler(total, b, seed=job.run.seed)


def open_session(job: JobConfig, comm: Comm, checkpoints: Path, resume: str | None,
                 say: Callable[..., None]) -> Session:
    """Set up a job on this rank: threads, data, model, weights, checkpoint to resume from."""
    threads = configure_threads(job)
    from mpinewton.models import build_model
    from mpinewton.params import ParamLayout

    shard, eval_shards = comm.run_agreed(lambda: _load_data(job, comm), "loading data")
    model = comm.run_agreed(lambda: build_model(
        job.model.name, dtype=job.model.dtype, seed=job.run.seed,
        input_shape=tuple(job.model.input_shape), num_classes=job.model.num_classes,
        hidden=job.model.hidden), "building the model")
    layout = ParamLayout.of(model)
    # The optimiser's weights live in the model's precision, so a resumed run
    # continues from exactly the numbers an uninterrupted run holds.
    w0 = comm.bcast_array(comm.run_agreed(lambda: _initial_weights(job, model),
                                          "loading the initial weights").astype(layout.dtype))
    ckpt = comm.run_agreed(
        lambda: _find_checkpoint(resume, checkpoints, layout, say)
        if comm.is_root else None,
        "finding a checkpoint to resume from")  # loaded and validated on rank 0 only
    found = comm.bcast(None if ckpt is None else Resume(
        str(ckpt.path), int(ckpt.iteration), ckpt.state, ckpt.config_sha256))
    if found is not None:
        ckpt_w = layout.flatten(ckpt.weights) if comm.is_root else np.empty_like(w0)
        w0 = comm.bcast_array(ckpt_w.astype(layout.dtype))
    sampler = comm.run_agreed(lambda: _make_sampler(job, shard.total, found),
                              "setting up mini-batches")
    return Session(job=job, comm=comm, threads=threads, model=model, layout=layout,
                   shard=shard, eval_shards=eval_shards, sampler=sampler, w0=w0,
                   resume=found)
