"""The run directory: every file a training job writes, in one place.

Only rank 0 touches it; every write is atomic (:mod:`mpinewton.durable`).

``DIR/.lock``
    who runs in this directory now (:mod:`mpinewton.train.lock`): a second job
    is refused, a dead job's lock is taken over.
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
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from mpinewton import __version__
from mpinewton.config import ConfigError, JobConfig
from mpinewton.durable import atomic_path, atomic_write_text
from mpinewton.train.lock import RunDirLock

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WEIGHTS = "weights.h5"
CHECKPOINTS = "checkpoints"


class RunDirectory:
    """The run directory contract (module docstring); methods do nothing off rank 0."""

    def __init__(self, path: Path, *, is_root: bool,
                 say: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.is_root = is_root
        self.say = say
        self._metrics: IO[str] | None = None
        self._lock: RunDirLock | None = None

    @property
    def checkpoints(self) -> Path:
        """The folder of this run's checkpoints."""
        return self.path / CHECKPOINTS

    def prepare(self, job: JobConfig, *, overwrite: bool, resuming: bool) -> None:
        """Lock the folder, refuse to clobber a previous run, write config.toml.

        The lock comes first: nothing is read or deleted in a folder that
        another job is using.
        """
        if not self.is_root:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} exists and is not a directory")
        self._lock = RunDirLock(self.path, say=self.say)
        self._lock.acquire()
        if (self.path / METRICS).exists() and not (overwrite or resuming):
            raise ConfigError(f"run directory {self.path} already holds a run ({METRICS}); "
                              "continue it with --resume, choose another --run-dir, or pass "
                              "--overwrite to start afresh")
        if not resuming:
            for name in (METRICS, SUMMARY, WEIGHTS):
                (self.path / name).unlink(missing_ok=True)
            if self.checkpoints.is_dir():
                for old in self.checkpoints.iterdir():
                    if old.is_file():
                        old.unlink()
        atomic_write_text(self.path / CONFIG, job.to_toml())

    def check_lock(self) -> None:
        """Raise if another job has taken this folder over (see :meth:`RunDirLock.check`)."""
        if self._lock is not None:
            self._lock.check()

    def open_metrics(self, upto: int) -> None:
        """Open metrics.jsonl for appending, keeping only records with ``iter <= upto``.

        On resume from iteration ``upto`` the records of iterations the
        interrupted run made after its checkpoint are dropped, so the file ends
        as an uninterrupted run's would.
        """
        if not self.is_root:
            return
        path = self.path / METRICS
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["iter"] <= upto]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._metrics = open(path, "a", buffering=1)  # noqa: SIM115 - open for the whole run

    def log(self, record: dict[str, Any]) -> None:
        """Append one iteration's metrics (rank 0)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        """Write weights.h5 and summary.json atomically (rank 0)."""
        if not self.is_root:
            return
        import h5py

        with atomic_path(self.path / WEIGHTS) as tmp, h5py.File(tmp, "w") as f:
            for name, value in weights.items():
                f.create_dataset(name, data=value)
            f.attrs["mpinewton_version"] = __version__
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        """Close metrics.jsonl and release the lock (also after an error)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
