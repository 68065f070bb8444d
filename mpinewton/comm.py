"""The MPI layer: rank, size, buffer-based sums, broadcasts, abort on error.

This module knows no TensorFlow. Data travel as contiguous numpy buffers through
the uppercase mpi4py methods (``Allreduce``, ``Bcast``); small Python objects
through the lowercase ones (``bcast``, ``scatter``, ``allgather``). Started
without ``mpirun`` the same code runs as one process (MPI singleton, or no MPI
at all with ``MPINEWTON_NO_MPI=1``, or :func:`launched_world`).

Lockstep (design invariant 2): every rank must call the same collectives in the
same order; every branch is decided from reduced values or a broadcast.
No hangs (invariant 3): :func:`install_abort_handler` turns an uncaught
exception on any rank into ``MPI_Abort`` of the whole job.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class DistributedError(RuntimeError):
    """An error that one or more ranks met, now known to every rank."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


@dataclass
class CommStats:
    """Counters of collective traffic: calls, values moved and seconds spent."""

    allreduce_calls: int = 0
    allreduce_values: int = 0
    allreduce_seconds: float = 0.0
    bcast_calls: int = 0
    bcast_seconds: float = 0.0

    def snapshot(self) -> dict[str, float]:
        """The counters as a plain dict (for metrics and benchmarks)."""
        return dict(self.__dict__)


class Comm:
    """A communicator wrapper: the few collectives mpinewton needs, timed.

    ``mpi_comm`` is an ``mpi4py.MPI.Comm``; ``None`` makes a one-process
    communicator that needs no MPI library.
    """

    def __init__(self, mpi_comm: Any | None = None) -> None:
        self._comm = mpi_comm
        self.rank: int = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size: int = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.stats = CommStats()

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that alone prints and writes."""
        return self.rank == 0

    @property
    def mpi(self) -> Any | None:
        """The underlying mpi4py communicator, or None in a one-process run."""
        return self._comm

    @property
    def serialized_threads(self) -> bool:
        """Whether threads may call MPI one at a time (``MPI_THREAD_SERIALIZED`` or more).

        mpi4py asks for ``MPI_THREAD_MULTIPLE``; a library may grant less.
        Always true without MPI.
        """
        if self._comm is None or self.size == 1:
            return True
        from mpi4py import MPI

        return MPI.Query_thread() >= MPI.THREAD_SERIALIZED

    def allreduce_sum(self, buffer: np.ndarray) -> np.ndarray:
        """Sum one contiguous float buffer over all ranks (``MPI_Allreduce``, SUM).

        Returns a new array; the input is left unchanged.
        """
        buffer = np.ascontiguousarray(buffer)
        self.stats.allreduce_calls += 1
        self.stats.allreduce_values += buffer.size
        if self._comm is None or self.size == 1:
            return buffer.copy()
        from mpi4py import MPI

        out = np.empty_like(buffer)
        start = time.perf_counter()
        self._comm.Allreduce(buffer, out, op=MPI.SUM)
        self.stats.allreduce_seconds += time.perf_counter() - start
        return out

    def bcast_array(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast a numpy array from ``root`` (``MPI_Bcast``); returns root's values."""
        array = np.ascontiguousarray(array)
        self.stats.bcast_calls += 1
        if self._comm is None or self.size == 1:
            return array
        start = time.perf_counter()
        out = array.copy() if self.rank == root else np.empty_like(array)
        self._comm.Bcast(out, root=root)
        self.stats.bcast_seconds += time.perf_counter() - start
        return out

    def bcast(self, obj: T, root: int = 0) -> T:
        """Broadcast a small picklable object from ``root``."""
        self.stats.bcast_calls += 1
        if self._comm is None or self.size == 1:
            return obj
        return self._comm.bcast(obj, root=root)

    def scatter(self, items: Sequence[T] | None, root: int = 0) -> T:
        """Hand item ``r`` of root's list to rank ``r`` (small picklable objects).

        Only ``root``'s ``items`` count (other ranks pass None); they must be
        one per rank.  A wrong list on root raises ValueError on *every* rank
        (the check travels with the one scatter, so no rank is left waiting).
        """
        if not 0 <= root < self.size:
            raise ValueError(f"scatter: root {root} is not a rank of this {self.size}-rank job")
        problem = None
        if self.rank == root:
            if items is None or not hasattr(items, "__len__"):
                problem = (
                    f"scatter: the root (rank {root}) must give a list of {self.size} item(s), "
                    f"one per rank, got {type(items).__name__}"
                )
            elif len(items) != self.size:
                problem = (
                    f"scatter: the root (rank {root}) gave {len(items)} item(s) for "
                    f"{self.size} rank(s); it must give exactly one per rank"
                )
        if self._comm is None or self.size == 1:
            if problem is not None:
                raise ValueError(problem)
            return items[0]  # type: ignore[index]
        payload: list[tuple[str | None, Any]] | None = None
        if self.rank == root:
            payload = (
                [(problem, None)] * self.size
                if problem is not None
                else [(None, item) for item in items]  # type: ignore[union-attr]
            )
        problem, item = self._comm.scatter(payload, root=root)
        if problem is not None:
            raise ValueError(problem)
        return item

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        """Gather one picklable object from every rank onto ``root`` (None elsewhere)."""
        if self._comm is None or self.size == 1:
            return [obj]
        return self._comm.gather(obj, root=root)

    def gather_rows(self, array: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Stack every rank's rows (axis 0) on ``root`` in rank order (``MPI_Gatherv``).

        Ranks may give different numbers of rows, zero included; the other
        dimensions and the dtype must agree. Returns the stacked array on
        ``root``, None elsewhere. Shapes are compared through one allgather
        first, so a mismatch raises ValueError on *every* rank.
        """
        array = np.asarray(array)
        metas = self.allgather((array.shape, array.dtype.str))
        problem = None
        if not 0 <= root < self.size:
            problem = f"gather_rows: root {root} is not a rank of this {self.size}-rank job"
        elif any(len(shape) == 0 for shape, _ in metas):
            bad = next(r for r, (shape, _) in enumerate(metas) if len(shape) == 0)
            problem = f"gather_rows: rank {bad} gave a scalar; every rank must give rows"
        elif len({(shape[1:], dtype) for shape, dtype in metas}) > 1:
            described = ", ".join(f"rank {r}: rows of {shape[1:]} {np.dtype(dtype).name}"
                                  for r, (shape, dtype) in enumerate(metas))
            problem = f"gather_rows: the ranks' rows differ ({described})"
        if problem is not None:
            raise ValueError(problem)
        if self._comm is None or self.size == 1:
            return array.copy()
        array = np.ascontiguousarray(array)
        counts = [int(np.prod(shape, dtype=np.int64)) for shape, _ in metas]
        out = None
        recv = None
        if self.rank == root:
            rows = sum(shape[0] for shape, _ in metas)
            out = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
            recv = [out.reshape(-1), counts]
        self._comm.Gatherv(array.reshape(-1), recv, root=root)
        return out

    def allgather(self, obj: T) -> list[T]:
        """Gather one small object from every rank onto every rank."""
        if self._comm is None or self.size == 1:
            return [obj]
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self._comm is not None and self.size > 1:
            self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End the whole job at once (``MPI_Abort``); in one process, exit."""
        if self._comm is not None and self.size > 1:
            self._comm.Abort(code)
        os._exit(code)

    def run_agreed(self, step: Callable[[], T], what: str) -> T:
        """Run ``step`` on every rank; if it raises on any rank, raise everywhere.

        Used for set-up phases (config, data, model) so that an error met by one
        rank — a bad label in its shard, say — is reported by every rank and
        the job ends cleanly instead of leaving the others in a collective.
        """
        result: T | None = None
        error: str | None = None
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - every error must reach every rank
            error = f"{type(exc).__name__}: {exc}"
        errors = self.allgather(error)
        failed = [rank for rank, err in enumerate(errors) if err is not None]
        if failed:
            first = errors[failed[0]]
            where = "rank " + ", ".join(str(r) for r in failed)
            raise DistributedError(f"{what} failed on {where}: {first}", failed)
        return result  # type: ignore[return-value]


def local_size() -> int:
    """Number of ranks on this node, from the launcher's environment (1 if unknown)."""
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE",
                "PMI_LOCAL_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


#: Environment variables set by MPI launchers (Open MPI; MPICH/Hydra and Slurm PMI; PMIx).
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def _launched() -> bool:
    """True when an MPI launcher (mpirun, srun) started this process."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def launched_world() -> Comm:
    """The world communicator when started by an MPI launcher, else a one-process Comm.

    The one-process Comm does not load MPI (no ``mpi4py`` import), so tools
    such as ``python -m mpinewton.data`` start fast and work where no MPI
    library is installed; under ``mpirun``/``srun`` it is :func:`world`.
    """
    return world() if _launched() else Comm(None)


def world() -> Comm:
    """The world communicator: MPI if available, else a one-process stand-in.

    ``MPINEWTON_NO_MPI=1`` skips MPI entirely (useful where no MPI library is
    installed); under ``mpirun`` that would be an error, which is reported.
    """
    if os.environ.get("MPINEWTON_NO_MPI") == "1":
        if _launched():
            raise RuntimeError("MPINEWTON_NO_MPI=1 is set, but the process was started by an "
                               "MPI launcher; unset it to run with MPI")
        return Comm(None)
    from mpi4py import MPI

    return Comm(MPI.COMM_WORLD)


def install_abort_handler(comm: Comm) -> None:
    """Make an uncaught exception on any rank abort the whole job (invariant 3).

    The hook prints the traceback prefixed with the rank, flushes, and calls
    ``MPI_Abort`` so that the other ranks, possibly waiting in a collective,
    end too instead of hanging.
    """
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException,
             tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write("".join(f"[rank {comm.rank}] {line}\n" for line in text.splitlines()))
        sys.stderr.flush()
        sys.stdout.flush()
        if comm.size > 1:
            comm.abort(1)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
