"""What a training job starts from: threads, data, model, weights, checkpoint, objective.

:func:`open_session` does the set-up of design section 2 on every rank, each
phase through ``comm.run_agreed`` so that an error on one rank (a bad label in
its shard, a missing file) is reported by every rank and the job ends with
exit code 2 instead of hanging.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.comm import Comm, local_size
from mpinewton.config import ConfigError, JobConfig
from mpinewton.solvers import METHODS, GDState, SolverState


def configure_threads(job: JobConfig) -> tuple[int, int]:
    """Choose TensorFlow's (and numpy's BLAS) thread pools before TensorFlow starts.

    Where TensorFlow already runs (a script that built its model before
    ``mpinewton.fit``), its pools cannot change any more: they stay as they are
    and the numbers returned are TensorFlow's (0 = its default, all cores);
    ``mpinewton.configure_threads()`` at the top of the script avoids that.
    """
    return threads_for(job.threads.intra_op, job.threads.inter_op)


def configure_memory(job: JobConfig) -> bool:
    """``run.reuse_memory``: keep freed memory for reuse (:mod:`mpinewton.memory`).

    True where the allocator now keeps it; called before the model and data
    take their memory.
    """
    if not job.run.reuse_memory:
        return False
    from mpinewton.memory import reuse_freed_memory

    return reuse_freed_memory()


def threads_for(intra: int = 0, inter: int = 1) -> tuple[int, int]:
    """Set TensorFlow's intra-/inter-op pools; ``intra = 0``: the cores on the node / ranks on it.

    numpy's BLAS (OpenBLAS starts one thread per core in every rank) gets
    ``intra`` threads too: ranks that each start a thread per core oversubscribe
    the node, and K-FAC's factor inversions ran 8x slower that way (2 ranks on
    2 cores, a 784 x 784 Cholesky factorisation: 49 ms against 6 ms).

    scipy's LAPACK and BLAS (K-FAC's factor inversions, the in-place vector
    updates of K-FAC and Adam) are their own OpenBLAS, and a library loaded
    after the limit keeps a thread per core: scipy is loaded here first. Before,
    where no other package had loaded it (Keras loads scikit-learn, and with it
    scipy, only where scikit-learn is installed), the first job of a process
    inverted K-FAC's factors on 2 threads a rank, 2x slower with 2 ranks on 2
    cores (``scripts/bench-blas-threads.sh``), and in other roundings than the
    process's later jobs.

    Returns the pools in effect (TensorFlow's own where it had started already).
    """
    if intra == 0:
        for var in ("MPINEWTON_INTRA_OP_THREADS", "OMP_NUM_THREADS"):
            if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
                intra = int(os.environ[var])
                break
        else:
            intra = max(1, (os.cpu_count() or 1) // local_size())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, for the limit below)
    import tensorflow as tf
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=intra, user_api="blas")

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TensorFlow has started: its pools are fixed
        return (tf.config.threading.get_intra_op_parallelism_threads(),
                tf.config.threading.get_inter_op_parallelism_threads())
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


#: Losses whose labels are class indices (float targets are refused with them).
CLASSIFICATION_LOSSES = ("categorical_crossentropy", "sparse_categorical_crossentropy")


@dataclass
class UserInputs:
    """What the Python API (:func:`mpinewton.fit`) brings instead of the job's files.

    ``model``: a built Keras model (None: the job's ``[model]`` table builds
    one). ``arrays``: in-memory data, split name -> ``(x, y)``, the same on
    every rank (None: the job's ``data.path``); with full batches each rank
    keeps a copy of its own rows only.
    """

    model: Any = None
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def model_checks(loss: str, model: Any) -> dict[str, Any]:
    """What every read of the job's data checks, from the model and the loss.

    The sample shape is the model's input shape (where the model knows it);
    class labels must be below the output width (2 for binary cross-entropy
    on one output); a cross-entropy loss asks for class labels.
    """
    shape: tuple[int, ...] | None = None
    width: int | None = None
    try:
        dims = tuple(model.input_shape[1:])
        shape = dims if all(isinstance(d, int) for d in dims) else None
    except (AttributeError, ValueError, TypeError):
        pass
    try:
        width = int(model.output_shape[-1])
    except (AttributeError, ValueError, TypeError):
        width = None
    num_classes = 2 if loss == "binary_crossentropy" and width == 1 else width
    task = "classification" if loss in CLASSIFICATION_LOSSES else None
    return {"num_classes": num_classes, "expected_sample_shape": shape, "task": task}


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
    checks: dict[str, Any]  # model_checks: what every read of the data checks
    inputs: UserInputs
    # Mini-batches from a small file: its training rows, read once (read_rows).
    _rows: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _rows_too_large: bool = field(default=False, repr=False)  # decided at the first batch

    def objective(self, x: np.ndarray, y: np.ndarray, total: int) -> Any:
        """The distributed objective of this model over samples ``x, y`` (``total`` in all).

        Collective: every rank calls it alike. A model, loss and labels that do
        not fit (``ObjectiveError``, possibly on one rank's rows only) are
        reported by every rank (``comm.run_agreed``).
        """
        from mpinewton.local import LocalObjective
        from mpinewton.objective import DistributedObjective

        job = self.job
        builtin = self.inputs.model is None and not job.model.factory
        local = self.comm.run_agreed(lambda: LocalObjective(
            self.model, x, y, loss=job.objective.loss, from_logits=job.objective.from_logits,
            num_classes=job.model.num_classes if builtin else None,
            micro_batch=job.objective.micro_batch, jit=job.objective.jit, hvp=job.objective.hvp,
            pixel_scale=job.data.pixel_scale, preprocess=job.data.preprocess),
            "building the objective")
        return DistributedObjective(local, self.comm, total)

    @property
    def data_checks(self) -> dict[str, Any]:
        """What every read of the job's data checks (labels, sample shape, task)."""
        return dict(self.checks)

    def read_training_set(self, limit: int | None) -> Any:
        """Read this rank's shard of the training splits (first ``limit`` samples)."""
        return _read_shard(self.job, self.inputs, list(self.job.data.train_splits),
                           self.comm, limit, self.checks)

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``rows`` (global positions) of the training splits, for a mini-batch.

        A training set of at most :func:`cache_bytes` is read whole at the
        first batch and kept: the rows of a batch are spread over the whole
        file, so each read would otherwise decompress most of its chunks
        (0.2-0.3 s per batch for MNIST, more than the CNN's step). A larger
        one is read batch by batch, so memory does not grow with the data.
        """
        job = self.job
        if self.inputs.arrays is None:
            from mpinewton.data.hdf5 import read_rows

            if self._rows is None and not self._rows_too_large:  # decided once, not per batch
                self._rows_too_large = self.training_bytes() > cache_bytes()
                if not self._rows_too_large:
                    self._rows = read_rows(job.data.path, list(job.data.train_splits),
                                           np.arange(self.shard.total),
                                           limit=job.data.limit or None, **self.checks)
            if self._rows is not None:
                return self._rows[0][rows], self._rows[1][rows]
            return read_rows(job.data.path, list(job.data.train_splits), rows,
                             limit=job.data.limit or None, **self.checks)
        x, y = _train_arrays(job, self.inputs.arrays)
        return x[rows], y[rows]


    def training_bytes(self) -> int:
        """Bytes of the training rows (samples and targets) in memory."""
        from mpinewton.data import inspect_dataset

        info = inspect_dataset(self.job.data.path)
        per_row = int(np.prod(info.sample_shape)) * np.dtype(info.x_dtype).itemsize + \
            int(np.prod(info.target_shape)) * np.dtype(info.y_dtype).itemsize
        return per_row * self.shard.total


def cache_bytes() -> int:
    """How much training data a rank keeps in memory for mini-batches.

    An eighth of the machine's memory shared by the ranks on it, at most 1 GiB:
    MNIST (39 MB) and its 32 x 32 RGB copy (154 MB) stay in memory on a
    28-core node, ImageNet is read batch by batch.
    """
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0
    return min(2 ** 30, physical // (8 * max(1, local_size())))


def _where(job: JobConfig, inputs: UserInputs) -> str:
    """The data's name in messages: the file, or the in-memory arrays."""
    return "the arrays given to mpinewton.fit" if inputs.arrays is not None else job.data.path


def _split_arrays(arrays: dict[str, tuple[np.ndarray, np.ndarray]],
                  name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in arrays:
        raise ConfigError(f"split {name!r} is not among the arrays given to mpinewton.fit "
                          f"(splits: {', '.join(arrays) or 'none'})")
    return arrays[name]


def _joined_arrays(arrays: dict[str, tuple[np.ndarray, np.ndarray]],
                   names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The splits ``names`` of the user's arrays, concatenated (no copy for one split)."""
    parts = [_split_arrays(arrays, name) for name in names]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _train_arrays(job: JobConfig, arrays: dict[str, tuple[np.ndarray, np.ndarray]],
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The training splits' arrays, joined, cut at data.limit."""
    x, y = _joined_arrays(arrays, job.data.train_splits)
    return (x[:job.data.limit], y[:job.data.limit]) if job.data.limit else (x, y)


def _read_shard(job: JobConfig, inputs: UserInputs, splits: list[str], comm: Comm,
                limit: int | None, checks: dict[str, Any]) -> Any:
    """Rows of ``splits`` that this rank holds, from the job's file or the user's arrays."""
    if inputs.arrays is None:
        from mpinewton.data import read_shard

        return read_shard(job.data.path, splits, comm.rank, comm.size, limit=limit, **checks)
    from mpinewton.data.arrays import array_shard

    if splits == list(job.data.train_splits):
        x, y = _train_arrays(job, inputs.arrays)
    else:
        x, y = _joined_arrays(inputs.arrays, splits)
    return array_shard(x, y, comm.rank, comm.size, limit=limit, split="+".join(splits),
                       **checks)


def _load_data(job: JobConfig, comm: Comm, inputs: UserInputs,
               checks: dict[str, Any]) -> tuple[Any, list[Any]]:
    """Read this rank's training shard (empty with mini-batches) and evaluation shards."""
    from mpinewton.data import Shard

    splits = list(job.data.train_splits)
    where = _where(job, inputs)
    if job.optimizer.batch_size:  # rows are read batch by batch (thesis 8.2)
        if inputs.arrays is None:
            from mpinewton.data import inspect_dataset
            from mpinewton.data.hdf5 import read_rows

            x0, y0 = read_rows(job.data.path, splits, np.empty(0, np.int64), **checks)
            counts = inspect_dataset(job.data.path).splits
            total = sum(counts[name] for name in splits)
        else:
            x_all, y_all = _train_arrays(job, inputs.arrays)
            first = _read_shard(job, inputs, splits, comm, min(len(x_all), 1), checks)
            x0, y0, total = first.x[:0], first.y[:0], len(x_all)
        total = min(total, job.data.limit) if job.data.limit else total
        shard = Shard(x=x0, y=y0, lo=0, hi=0, total=total, split="+".join(splits), path=where)
    else:
        shard = _read_shard(job, inputs, splits, comm, job.data.limit or None, checks)
        if shard.total < comm.size:
            raise ConfigError(
                f"{where} [{'+'.join(splits)}] has {shard.total} training sample(s) "
                f"for {comm.size} ranks: every rank needs at least one (run on at most "
                f"{shard.total} ranks, or raise data.limit)")
    evals = [_read_shard(job, inputs, [split], comm, job.data.eval_limit or None, checks)
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
                 say: Callable[..., None], inputs: UserInputs | None = None) -> Session:
    """Set up a job on this rank: threads, model, data, weights, checkpoint to resume from.

    ``inputs`` carries the Python API's model and arrays (:class:`UserInputs`).
    """
    configure_memory(job)
    threads = configure_threads(job)
    from mpinewton.models import model_from_job
    from mpinewton.params import ParamLayout

    inputs = inputs or UserInputs()
    model = inputs.model if inputs.model is not None else comm.run_agreed(
        lambda: model_from_job(job.model, job.run.seed), "building the model")
    checks = model_checks(job.objective.loss, model)
    shard, eval_shards = comm.run_agreed(lambda: _load_data(job, comm, inputs, checks),
                                         "loading data")
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
                   resume=found, checks=checks, inputs=inputs)
