"""Where a command's job and weights come from: a run directory, a checkpoint, a weights file.

Shared by ``python -m mpinewton.evaluate``, ``predict`` and ``analyze``:

- :func:`classify` tells a run directory, a checkpoint and a weights file apart;
- :func:`load_source_job` reads the job a source was trained with (the run
  directory's ``config.toml``, the checkpoint's stored TOML, the
  ``config.toml`` beside a run's ``weights.h5``), or ``--job``, with ``--set``
  overrides;
- :func:`read_weights` (rank 0) loads the weights into the job's model and
  checks that they fit it; :func:`agreed_weights` runs it under
  ``comm.run_agreed`` and gives every rank the same weights;
- :func:`objective_session` is the trainer's ``Session`` for these weights, so
  losses and metrics are computed exactly as training computes them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.comm import Comm
from mpinewton.config import ConfigError, JobConfig, load_job

#: The files of a run directory (:mod:`mpinewton.train.rundir`) read here.
CONFIG = "config.toml"
WEIGHTS = "weights.h5"
CHECKPOINTS = "checkpoints"

KINDS = ("run_dir", "checkpoint", "weights")


@dataclass(frozen=True)
class WeightsSource:
    """A run directory, a checkpoint file or a weights file.

    ``prefer`` decides for a run directory: ``"final"`` takes ``weights.h5``
    and falls back to the newest valid checkpoint; ``"checkpoint"`` the other
    way round. ``label`` (an option such as ``--checkpoint``) prefixes errors.
    """

    kind: str
    path: Path
    prefer: str = "final"
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown weights source kind {self.kind!r}; known: {KINDS}")
        if self.prefer not in ("final", "checkpoint"):
            raise ValueError(f"prefer must be 'final' or 'checkpoint', got {self.prefer!r}")

    def error(self, message: str) -> ConfigError:
        """A ConfigError naming the option that gave this source."""
        return ConfigError(f"{self.label} {self.path}: {message}" if self.label else message)


def is_checkpoint(path: Path) -> bool:
    """True if ``path`` is an HDF5 file that says it is an mpinewton checkpoint."""
    import h5py

    from mpinewton.checkpoint import FORMAT

    try:
        with h5py.File(path, "r", locking=False) as f:
            value = f.attrs.get("format")
    except OSError:
        return False
    return (value.decode() if isinstance(value, bytes) else value) == FORMAT


def classify(path: str | Path, *, prefer: str = "final", label: str = "") -> WeightsSource:
    """The kind of ``path``; a missing path is a ConfigError saying what was expected."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p} does not exist; give a run directory, a checkpoint file or a "
                          "weights file")
    if p.is_dir():
        return WeightsSource("run_dir", p, prefer, label)
    if not p.is_file():
        raise ConfigError(f"{p} is neither a directory nor a regular file")
    return WeightsSource("checkpoint" if is_checkpoint(p) else "weights", p, prefer, label)


def _stored_job(source: WeightsSource) -> tuple[str, Path | None, str] | None:
    """The job text a source carries: (TOML, its file or None, where in words)."""
    if source.kind == "run_dir":
        path = source.path / CONFIG
        return (path.read_text(), path, str(path)) if path.is_file() else None
    if source.kind == "checkpoint":  # only the job here; rank 0 validates the whole file
        import h5py

        try:
            with h5py.File(source.path, "r", locking=False) as f:
                stored = f.get("config_toml")
                text = (np.asarray(stored).tobytes().decode("utf-8")
                        if isinstance(stored, h5py.Dataset) else "")
        except (OSError, UnicodeDecodeError) as exc:
            raise source.error(f"checkpoint {source.path}: cannot read its job: {exc}") from None
        if not text.strip():
            return None
        return text, None, f"checkpoint {source.path} (its stored job)"
    path = source.path.parent / CONFIG  # a run directory's final weights.h5
    return (path.read_text(), path, str(path)) if path.is_file() else None


def load_source_job(source: WeightsSource, job: str | None,
                    overrides: Sequence[str] = ()) -> tuple[JobConfig, str]:
    """The job (``job`` if given, else the one the source stores) and where it came from."""
    if job is not None:
        return load_job(job, list(overrides)), job
    stored = _stored_job(source)
    if stored is None:
        what = {"run_dir": f"run directory {source.path} has no {CONFIG}",
                "checkpoint": f"checkpoint {source.path} stores no job",
                "weights": f"weights file {source.path} has no {CONFIG} beside it"}[source.kind]
        raise ConfigError(f"{what}; pass the job with --job JOB.toml")
    text, path, where = stored
    if path is not None:
        return load_job(path, list(overrides)), where
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / CONFIG
        file.write_text(text)
        try:
            return load_job(file, list(overrides)), where
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(file), where)) from None


def _describe(model: Any, layout: Any) -> str:
    return f"model {model.name!r} ({layout.size:,} weights)"


def _load_checkpoint(source: WeightsSource, path: Path, model: Any, layout: Any) -> Any:
    """A checkpoint that fits the model, or an error naming both sizes and the first difference."""
    from mpinewton import checkpoint

    try:
        ckpt = checkpoint.load_checkpoint(path)
    except checkpoint.CheckpointError as exc:
        raise source.error(str(exc)) from None
    problem = layout.mismatch(ckpt.spec)
    if problem is not None:
        raise source.error(
            f"checkpoint {path} does not fit the job's {_describe(model, layout)}: it holds "
            f"{ckpt.spec.size:,} weights in {len(ckpt.spec.names)} variable(s), the model "
            f"{layout.size:,} in {len(layout.names)}; {problem}")
    return ckpt


def _load_weights_file(source: WeightsSource, path: Path, model: Any, layout: Any) -> None:
    """Load a weights file into ``model`` or raise an error naming both sizes."""
    import h5py

    from mpinewton.models import load_initial_weights

    try:
        load_initial_weights(model, path)
    except ValueError as exc:
        detail = str(exc).removeprefix(f"start weights {path}: ")
        held = ""
        try:
            with h5py.File(path, "r", locking=False) as f:
                if isinstance(f.get("w"), h5py.Dataset):
                    held = f"; the file holds {int(np.prod(f['w'].shape)):,} weights"
        except OSError:
            pass
        raise source.error(f"weights file {path} does not fit the job's "
                           f"{_describe(model, layout)}{held}: {detail}") from None


def _start_statistics(job: JobConfig | None, model: Any) -> None:
    """Batch-norm statistics as training had them: from ``model.weights`` (if still there).

    Checkpoints hold the trainable weights only; training took the other
    variables from the job's start weights.
    """
    if job is None or not job.model.weights or not model.non_trainable_variables:
        return
    if Path(job.model.weights).is_file():
        from mpinewton.models import load_initial_weights

        load_initial_weights(model, job.model.weights)


def read_weights(source: WeightsSource, model: Any, layout: Any, *,
                 job: JobConfig | None = None) -> tuple[np.ndarray, str]:
    """Rank 0: load ``source`` into ``model``; return the flat weights and where they came from.

    Errors (ConfigError) name the file, and for a file that does not fit the
    model, both sizes and the first mismatching variable.
    """
    from mpinewton import checkpoint
    from mpinewton.params import get_flat, set_flat

    def from_checkpoint(ckpt: Any) -> tuple[np.ndarray, str]:
        _start_statistics(job, model)
        w = layout.flatten(ckpt.weights)
        set_flat(model, w)
        return w, f"{ckpt.path} (iteration {ckpt.iteration})"

    if source.kind == "checkpoint":
        return from_checkpoint(_load_checkpoint(source, source.path, model, layout))
    if source.kind == "weights":
        _load_weights_file(source, source.path, model, layout)
        return get_flat(model), str(source.path)
    final = source.path / WEIGHTS
    if source.prefer == "final" and final.is_file():
        _load_weights_file(source, final, model, layout)
        return get_flat(model), str(final)
    folder = source.path / CHECKPOINTS
    try:
        found, skipped = checkpoint.find_latest_valid(folder, expected=layout)
    except checkpoint.CheckpointError as exc:
        raise source.error(str(exc)) from None
    if found is not None:
        return from_checkpoint(found)
    if final.is_file():
        _load_weights_file(source, final, model, layout)
        return get_flat(model), str(final)
    why = ("; skipped: " + "; ".join(skipped)) if skipped else ""
    raise source.error(f"run directory {source.path} holds no weights: no {WEIGHTS} and no "
                       f"valid checkpoint in {folder}{why}")


def agreed_weights(comm: Comm, model: Any, layout: Any,
                   read: Callable[[], tuple[np.ndarray, str]]) -> tuple[np.ndarray, str]:
    """Run ``read`` on rank 0 (an error ends every rank); every rank gets its weights.

    The trainable weights travel as one broadcast array and are set into every
    rank's model, the other variables (batch-norm statistics) as rank 0
    loaded them.
    """
    from mpinewton.params import set_flat

    w, source = comm.run_agreed(lambda: read() if comm.is_root else (None, None),
                                "loading the weights")
    w = comm.bcast_array(np.asarray(w).astype(layout.dtype) if comm.is_root
                         else np.empty(layout.size, layout.dtype))
    source = comm.bcast(source)
    others = comm.bcast([np.asarray(v.numpy()) for v in model.non_trainable_variables]
                        if comm.is_root else None)
    if not comm.is_root:
        for var, value in zip(model.non_trainable_variables, others, strict=True):
            var.assign(value)
    set_flat(model, w)
    return w, source


def data_checks(job: JobConfig, model: Any) -> dict[str, Any]:
    """What every read of data for this model checks, as training checks it."""
    from mpinewton.train.session import model_checks

    return dict(model_checks(job.objective.loss, model))


def objective_session(job: JobConfig, comm: Comm, model: Any, layout: Any,
                      w: np.ndarray) -> Any:
    """The trainer's ``Session`` around ``model`` at ``w``: ``.objective(x, y, total)``.

    Data are read by the caller; the session only builds objectives exactly as
    training does (loss, preprocessing, micro-batches).
    """
    from mpinewton.train.session import Session, UserInputs

    return Session(job=job, comm=comm, threads=(0, 0), model=model, layout=layout,
                   shard=None, eval_shards=[], sampler=None, w0=w, resume=None,
                   checks=data_checks(job, model), inputs=UserInputs())


@dataclass
class Loaded:
    """A job's model at given weights, the same on every rank, ready for objectives."""

    job: JobConfig
    job_from: str
    comm: Comm
    model: Any
    layout: Any  # mpinewton.params.ParamLayout
    w: np.ndarray
    source: WeightsSource
    weights_from: str
    session: Any  # objective_session(): .objective(x, y, total)

    def say(self, *args: Any) -> None:
        """Print on rank 0 only."""
        if self.comm.is_root:
            print(*args, flush=True)

    def about(self) -> dict[str, Any]:
        """What was evaluated, for JSON and HDF5 attributes."""
        return {"job": self.job.run.name, "job_from": self.job_from,
                "model": str(self.model.name), "weights": self.layout.size,
                "dtype": self.layout.dtype, "weights_from": self.weights_from,
                "data": self.job.data.path, "world_size": self.comm.size}


def open_job(comm: Comm, path: str, *, job: str | None = None,
             overrides: Sequence[str] = (),
             data: str | None = None) -> tuple[WeightsSource, JobConfig, str]:
    """The source at ``path`` and its job, on every rank (no TensorFlow yet).

    ``data`` replaces the job's ``data.path``. Errors are raised on every rank
    (``comm.run_agreed``) as a DistributedError naming the phase.
    """
    import json

    source = comm.run_agreed(lambda: classify(path), "finding the weights")
    sets = [*overrides, *([f"data.path={json.dumps(data)}"] if data is not None else [])]
    loaded_job, job_from = comm.run_agreed(lambda: load_source_job(source, job, sets),
                                           "reading the job")
    return source, loaded_job, job_from


def open_model(comm: Comm, source: WeightsSource, job: JobConfig, job_from: str) -> Loaded:
    """The job's model at the source's weights on every rank (TensorFlow starts here)."""
    from mpinewton.train.session import configure_threads

    configure_threads(job)  # before TensorFlow starts
    from mpinewton.models import model_from_job
    from mpinewton.params import ParamLayout

    model = comm.run_agreed(lambda: model_from_job(job.model, job.run.seed),
                            "building the model")
    layout = ParamLayout.of(model)
    w, weights_from = agreed_weights(
        comm, model, layout, lambda: read_weights(source, model, layout, job=job))
    return Loaded(job=job, job_from=job_from, comm=comm, model=model, layout=layout,
                  w=w, source=source, weights_from=weights_from,
                  session=objective_session(job, comm, model, layout, w))


def open_source(comm: Comm, path: str, *, job: str | None = None,
                overrides: Sequence[str] = (), data: str | None = None) -> Loaded:
    """:func:`open_job` then :func:`open_model`: job, model and weights on every rank."""
    return open_model(comm, *open_job(comm, path, job=job, overrides=overrides, data=data))
