"""The Python API: train your own Keras model on your own data, under mpirun.

::

    import mpinewton
    result = mpinewton.fit(model, {"train": (x, y), "validation": (xv, yv)},
                           optimizer={"iters": 50}, run_dir="runs/mine")

:func:`fit` runs exactly what ``python -m mpinewton.train`` runs (the same
job keys, run directory, checkpoints, resume and signals), with the model and
the data given as Python objects; :class:`Objective` gives the distributed
loss, gradient and curvature products to people who write their own loops.
Every rank calls them with the same arguments (design invariant 2).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.comm import Comm, world
from mpinewton.config import (
    RECOMMENDED_OPTIMIZER,
    ConfigError,
    JobConfig,
    ObjectiveConfig,
    build_job,
    parse_override,
)
from mpinewton.objective import DistributedObjective

__all__ = ["FitResult", "Objective", "configure_threads", "fit"]

#: What ``data`` may be: a dataset file, ``(x, y)`` (the training split), or split -> (x, y).
Data = str | PathLike | tuple[np.ndarray, np.ndarray] | Mapping[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class FitResult:
    """What :func:`fit` returns on every rank."""

    weights: np.ndarray  # the final flat weights (also set in the model), the same on every rank
    summary: dict[str, Any] | None  # summary.json; None when a signal stopped the run
    run_dir: Path  # where the metrics, checkpoints, summary and weights are
    job: JobConfig  # the resolved job (also DIR/config.toml)
    rank: int = 0  # this process's rank: print on rank 0 only

    @property
    def stopped(self) -> bool:
        """True when SIGTERM/SIGUSR1 stopped the run after a checkpoint (resume to go on)."""
        return self.summary is None


def configure_threads(intra_op: int = 0, inter_op: int = 1) -> tuple[int, int]:
    """Give this rank its share of the node's cores; call it before building a model.

    TensorFlow fixes its thread pools when it starts; a script that builds its
    model first leaves every rank with all the node's cores (oversubscribed
    under ``mpirun``). ``intra_op = 0``: cores on the node / ranks on it.
    Returns the pools in effect.
    """
    from mpinewton.train.session import threads_for

    return threads_for(intra_op, inter_op)


def _arrays(data: Data) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """``data`` as split -> (x, y), or None for a dataset file."""
    if isinstance(data, (str, PathLike)):
        return None
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ConfigError(f"mpinewton.fit: data as a tuple must be (x, y), got {len(data)} "
                              "items")
        return {"train": (np.asarray(data[0]), np.asarray(data[1]))}
    if isinstance(data, Mapping):
        out = {}
        for name, pair in data.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ConfigError(f"mpinewton.fit: data[{name!r}] must be (x, y)")
            out[str(name)] = (np.asarray(pair[0]), np.asarray(pair[1]))
        if not out:
            raise ConfigError("mpinewton.fit: data holds no split")
        return out
    raise ConfigError("mpinewton.fit: data must be a dataset file, (x, y), or a dict of "
                      f"split -> (x, y); got {type(data).__name__}")


def _base_tables(job: str | PathLike | JobConfig | None) -> tuple[dict[str, Any], str]:
    """The job's tables before the call's own options, and its name for messages."""
    if job is None:
        return {"run": {"name": "fit"}, "optimizer": dict(RECOMMENDED_OPTIMIZER)}, "mpinewton.fit"
    if isinstance(job, JobConfig):
        return job.to_dict(), "mpinewton.fit(job=JobConfig)"
    path = Path(job)
    try:
        return tomllib.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise ConfigError(f"mpinewton.fit: job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _merge(tables: dict[str, Any], section: str, values: Any, where: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: {section}= must be a dict of that table's keys, e.g. "
                          f"optimizer={{'iters': 10}}; got {values!r}")
    table = tables.setdefault(section, {})
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **value}  # [model.args]
        else:
            table[key] = list(value) if isinstance(value, tuple) else value


def resolve_job(job: str | PathLike | JobConfig | None, sections: Mapping[str, Any],
                overrides: Sequence[str], arrays: dict[str, Any] | None, data: Any,
                model: Any) -> JobConfig:
    """The job :func:`fit` runs, from its parts in this order.

    The job file (or the recommended settings), the call's tables
    (``optimizer={...}``), ``overrides`` (``"section.key=value"``), then what
    the data and the model fix (``data.path``, the evaluation splits,
    ``model.dtype``).
    """
    tables, where = _base_tables(job)
    for section, values in sections.items():
        _merge(tables, section, values, where)
    for item in overrides:
        section, key, value = parse_override(item)
        _merge(tables, section, _nested(key, value), where)
    data_table = tables.setdefault("data", {})
    if arrays is None:
        data_table["path"] = str(data)
    elif "eval_splits" not in data_table:
        train = data_table.get("train_splits", ["train"])
        data_table["eval_splits"] = [name for name in arrays if name not in train]
    if model is not None:
        dtypes = sorted({str(v.dtype) for v in getattr(model, "trainable_variables", [])})
        if len(dtypes) == 1:
            given = tables.setdefault("model", {}).get("dtype")
            if given is not None and given != dtypes[0]:
                raise ConfigError(f"{where}: model.dtype = {given!r}, but the model's weights "
                                  f"are {dtypes[0]}")
            tables["model"]["dtype"] = dtypes[0]
    return build_job(tables, where=where)


def _nested(key: str, value: Any) -> dict[str, Any]:
    head, *rest = key.split(".")
    return {head: {".".join(rest): value}} if rest else {head: value}


def fit(model: Any, data: Data, /, *, job: str | PathLike | JobConfig | None = None,
        run_dir: str | PathLike | None = None, resume: str | None = None,
        overwrite: bool = False, overrides: Sequence[str] = (), comm: Comm | None = None,
        check_sync: bool = False, **sections: Mapping[str, Any]) -> FitResult:
    """Train ``model`` on ``data`` with mpinewton's driver; call it on every rank alike.

    - ``model``: a built Keras model (Sequential, functional, or subclassed and
      called once), or None for the job's ``[model]`` table (``model.factory``).
      Its weights' dtype sets ``model.dtype``; dropout is off inside the
      objective (``training=False``), batch-norm layers use their moving
      statistics.
    - ``data``: a dataset file (``python -m mpinewton.data import``), ``(x, y)``
      for the training split, or ``{"train": (x, y), "validation": (xv, yv), ...}``.
      x: uint8 images (divided by ``data.pixel_scale``) or float features;
      y: integer classes or float targets. With full batches each rank keeps
      a copy of its own rows only.
    - ``job``: a job file or :class:`JobConfig`; None: the recommended
      Newton-CG (``config.RECOMMENDED_OPTIMIZER``), no pre-training.
    - ``**sections``: job tables by name, e.g. ``optimizer={"iters": 50}``,
      ``objective={"loss": "mean_squared_error"}``, ``eval={"every": 5}``,
      ``model={"factory": "pkg.mod:build"}`` (``model`` and ``data`` are
      positional, so their tables can be given by name);
      ``overrides``: ``"section.key=value"`` strings as ``--set`` takes them.
    - ``run_dir``: default ``runs/<run.name>``; ``resume``: None, "auto",
      "required" or a checkpoint path, as ``--resume``; ``overwrite`` as
      ``--overwrite``.

    Raises :class:`ConfigError` (or ``DistributedError``) on every rank for bad
    input. Returns a :class:`FitResult`; the final weights are also set in the
    model. ``result.stopped`` is True when a signal stopped the run after a
    checkpoint: call again with ``resume="auto"`` to go on.
    """
    from mpinewton.train.loop import train
    from mpinewton.train.session import UserInputs

    comm = comm or world()
    arrays = _arrays(data)
    resolved = comm.run_agreed(lambda: resolve_job(job, sections, overrides, arrays, data, model),
                               "reading the job")
    folder = Path(run_dir) if run_dir is not None else Path(
        resolved.run.run_dir or f"runs/{resolved.run.name}")
    summary = train(resolved, comm, folder, overwrite=overwrite, check_sync=check_sync,
                    resume=resume, inputs=UserInputs(model=model, arrays=arrays))
    w = comm.run_agreed(lambda: _final_weights(folder, summary, model) if comm.is_root else None,
                        "reading the final weights")
    w = comm.bcast(w)
    if model is not None and w is not None:
        from mpinewton.params import set_flat

        set_flat(model, w)
    return FitResult(weights=w, summary=summary, run_dir=folder, job=resolved,
                     rank=comm.rank)


def _final_weights(folder: Path, summary: dict[str, Any] | None,
                   model: Any) -> np.ndarray | None:
    """Rank 0: the weights the run ended with (weights.h5, or the newest checkpoint's)."""
    import h5py

    if summary is not None:
        with h5py.File(folder / "weights.h5", "r") as f:
            return np.asarray(f["w"])
    from mpinewton.checkpoint import find_latest_valid
    from mpinewton.params import ParamLayout

    found, _ = find_latest_valid(folder / "checkpoints")
    if found is None or model is None:
        return None
    return ParamLayout.of(model).flatten(found.weights)


class Objective(DistributedObjective):
    """The distributed objective of ``model`` on ``data``, for one's own loops.

    ``value(w)``, ``value_and_grad(w)``, ``hvp(w, v)``, ``gnvp(w, v)``,
    ``grad_squares(w)``, ``evaluate(w)`` and :meth:`curvature` give the same
    numbers on any number of ranks (every rank sums over its own rows, one
    Allreduce per call); call them on every rank alike. ``data`` as for
    :func:`fit` (its ``split``; a file's or the arrays'); ``w0`` is the model's
    current flat weights.
    """

    def __init__(self, model: Any, data: Data, *, comm: Comm | None = None,
                 split: str = "train", loss: str = "categorical_crossentropy",
                 from_logits: bool = False,
                 micro_batch: int = ObjectiveConfig.micro_batch, jit: bool = True,
                 hvp: str = "reverse_over_reverse", pixel_scale: float = 255.0,
                 limit: int | None = None) -> None:
        from mpinewton.local import LocalObjective
        from mpinewton.params import get_flat
        from mpinewton.train.session import model_checks

        comm = comm or world()
        ObjectiveConfig(loss=loss, from_logits=from_logits, micro_batch=micro_batch,
                        hvp=hvp)  # the job's checks of these keys
        arrays = _arrays(data)
        checks = model_checks(loss, model)

        def read() -> Any:
            if arrays is None:
                from mpinewton.data import read_shard

                return read_shard(str(data), split, comm.rank, comm.size, limit=limit, **checks)
            from mpinewton.data.arrays import array_shard

            if split not in arrays:
                raise ConfigError(f"mpinewton.Objective: no split {split!r} in the arrays "
                                  f"(splits: {', '.join(arrays)})")
            x, y = arrays[split]
            return array_shard(x, y, comm.rank, comm.size, limit=limit, split=split, **checks)

        shard = comm.run_agreed(read, "reading the data")
        local = comm.run_agreed(lambda: LocalObjective(
            model, shard.x, shard.y, loss=loss, from_logits=from_logits, micro_batch=micro_batch,
            jit=jit, hvp=hvp, pixel_scale=pixel_scale), "building the objective")
        super().__init__(local, comm, shard.total)
        self.model = model
        self.w0 = comm.bcast_array(get_flat(model))

    def curvature(self, w: np.ndarray, kind: str = "hessian") -> Any:
        """The curvature at ``w`` as a linear operator: "hessian" or "gauss_newton"."""
        from mpinewton.solvers.operators import curvature_operator

        return curvature_operator(self, w, kind)
