"""The run directory: every file a training job writes, in one place.

Only rank 0 touches it; every write is atomic (:mod:`mpinewton.durable`).

``DIR/.lock``
    who runs in this directory now (:mod:`mpinewton.train.lock`): a second job
    is refused, a dead job's lock is taken over.
``DIR/config.toml``
    the resolved job (every key, defaults included).
``DIR/metrics.jsonl``
    one JSON object per iteration: ``iter``, ``phase`` (``pretrain``, or the
    method: ``newton``, ``gd``...), ``loss`` (at the start of the iteration),
    ``new_loss``, ``grad_norm``, ``cg_iters``, ``cg_reason``, ``step_size``,
    ``fallback``, ``linesearch_trials``, ``damping``, ``hvps``, ``iter_seconds``,
    ``wall_time`` (seconds since training started); with mini-batches
    (``optimizer.batch_size``, thesis 8.2) also ``batch_size`` and ``epoch``,
    and ``loss`` is the loss on that iteration's batch.  With ``eval.every =
    k > 0`` also one record per evaluation (every k iterations and after the
    last one), after that iteration's record: ``iter``, ``phase`` = ``"eval"``,
    ``split``, ``val_loss`` and ``val_accuracy`` (``val_mae`` for a regression
    loss), ``best_val_loss`` and ``best_iteration`` so far, ``eval_seconds``,
    ``wall_time``.  Readers of the iterations skip ``phase == "eval"``.
``DIR/summary.json``
    at the end: final loss, accuracies, ``world_size``, time, CG statistics,
    ``stopped`` (why the run ended: ``completed``, ``converged``, ``stalled``,
    ``early_stopped``), ``best_iteration`` and ``best_val_loss`` (None without
    evaluations).
``DIR/weights.h5``
    the final weights: dataset ``w`` (flat) and one dataset per variable.
``DIR/best/weights.h5``, ``DIR/best/best.json``
    with ``eval.keep_best`` (and ``eval.every > 0``): the weights of the lowest
    validation loss so far, in the format of ``weights.h5`` (its attributes
    also name the iteration and loss), and ``{"iteration", "split",
    "val_loss", "val_<metric>"}``; each file written atomically, the weights
    first.
``DIR/tensorboard/``
    with ``run.tensorboard``: TensorBoard event files
    (:mod:`mpinewton.train.tensorboard`).
``DIR/checkpoints/``
    HDF5 checkpoints and the ``latest`` pointer (docs/checkpoints.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from mpinewton import __version__
from mpinewton.config import ConfigError, JobConfig
from mpinewton.durable import atomic_path, atomic_write_text
from mpinewton.train.lock import RunDirLock

if TYPE_CHECKING:
    from mpinewton.train.tensorboard import TensorBoardLog

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WEIGHTS = "weights.h5"
CHECKPOINTS = "checkpoints"
BEST = "best"
BEST_INFO = "best.json"
TENSORBOARD = "tensorboard"


class RunDirectory:
    """The run directory contract (module docstring); methods do nothing off rank 0."""

    def __init__(self, path: Path, *, is_root: bool,
                 say: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.is_root = is_root
        self.say = say
        self._metrics: IO[str] | None = None
        self._lock: RunDirLock | None = None
        self.tensorboard: TensorBoardLog | None = None

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
            for folder in (self.checkpoints, self.path / BEST, self.path / TENSORBOARD):
                self._empty(folder)
        atomic_write_text(self.path / CONFIG, job.to_toml())

    @staticmethod
    def _empty(folder: Path) -> None:
        """Delete the files of ``folder`` (a previous run's), keeping the folder."""
        if folder.is_dir():
            for old in folder.iterdir():
                if old.is_file():
                    old.unlink()

    def start_afresh(self) -> None:
        """``--resume`` found no checkpoint: drop the best weights and events of an earlier try."""
        if self.is_root:
            for folder in (self.path / BEST, self.path / TENSORBOARD):
                self._empty(folder)

    def open_tensorboard(self, enabled: bool) -> None:
        """Start the TensorBoard event file in ``DIR/tensorboard`` (rank 0, ``run.tensorboard``)."""
        from mpinewton.train.tensorboard import TensorBoardLog

        self.tensorboard = TensorBoardLog(self.path / TENSORBOARD
                                          if self.is_root and enabled else None)

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
        _write_weights(self.path / WEIGHTS, weights, {})
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")

    def best_info(self) -> dict[str, Any] | None:
        """``DIR/best/best.json`` as written (None if absent or unreadable; rank 0)."""
        try:
            return json.loads((self.path / BEST / BEST_INFO).read_text())
        except (OSError, ValueError):
            return None

    def write_best(self, weights: dict[str, np.ndarray], info: dict[str, Any]) -> Path | None:
        """Write ``DIR/best/weights.h5`` then ``best.json``, each atomically (rank 0).

        The weights file's attributes repeat ``info``, so it describes itself
        even if a crash came between the two writes.
        """
        if not self.is_root:
            return None
        folder = self.path / BEST
        folder.mkdir(parents=True, exist_ok=True)
        _write_weights(folder / WEIGHTS, weights, info)
        atomic_write_text(folder / BEST_INFO, json.dumps(info, indent=2) + "\n")
        return folder

    def close(self) -> None:
        """Close metrics.jsonl and the event file, release the lock (also after an error)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _write_weights(path: Path, weights: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """One weights file (datasets by name, the version and ``attrs`` as attributes), atomically."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, value in weights.items():
            f.create_dataset(name, data=value)
        f.attrs["mpinewton_version"] = __version__
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
