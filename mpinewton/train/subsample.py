"""Sub-sampled curvature: the gradient on the batch, curvature products on part of it.

Byrd, Chin, Neveitt & Nocedal (2011) and Martens (2010, sec. 4.3) compute the
Hessian or Gauss-Newton products of CG on a fraction of the samples the
gradient uses: a CG iteration then costs that fraction of a pass, while the
step still follows the full gradient.  :class:`SplitProblem` is the
:class:`~mpinewton.solvers.Problem` the solvers see; the driver picks each
iteration's subset with :func:`mpinewton.sampling.curvature_rows` (global
positions, the same on any number of ranks) and hands each rank the rows it
already holds, so no data is read twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpinewton.sampling import curvature_rows, fisher_draws


class SplitProblem:
    """Values and gradients from ``full``; curvature from ``curvature``.

    Curvature means the Hessian and Gauss-Newton products, the Fisher
    diagonal of a preconditioner and K-FAC's factors.
    """

    def __init__(self, full: Any, curvature: Any) -> None:
        self.full, self.curvature = full, curvature
        curvature.stats = full.stats  # one set of counters for the run

    @property
    def stats(self) -> Any:
        """The shared product counters."""
        return self.full.stats

    @property
    def local(self) -> Any:
        """The per-rank sums of the gradient's samples (the driver sets batches on it)."""
        return self.full.local

    def value(self, w: np.ndarray) -> float:
        return self.full.value(w)

    def value_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        return self.full.value_and_grad(w)

    def grad_squares(self, w: np.ndarray) -> np.ndarray:
        """The Fisher diagonal is curvature: it comes from the sub-sample too (Martens 2010)."""
        return self.curvature.grad_squares(w)

    def kfac_blocks(self) -> tuple:
        return self.full.kfac_blocks()

    def kfac_factors(self, w: np.ndarray, max_dim: int | None = None, *,
                     sampled: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """K-FAC's factors are curvature: from the sub-sample too (and its draws)."""
        return self.curvature.kfac_factors(w, max_dim, sampled=sampled)

    def work_share(self) -> Any:
        """The ranks' share of a method's work: the gradient's, which spans them all."""
        return self.full.work_share()

    def accuracy(self, w: np.ndarray) -> float:
        return self.full.accuracy(w)

    @property
    def metric_name(self) -> str | None:
        return self.full.metric_name

    def metric(self, w: np.ndarray) -> float:
        return self.full.metric(w)

    def evaluate(self, w: np.ndarray) -> dict[str, float]:
        return self.full.evaluate(w)

    def hvp(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.curvature.hvp(w, v)

    def hvp_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.curvature.hvp_many(w, v)

    def gnvp(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.curvature.gnvp(w, v)

    def gnvp_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.curvature.gnvp_many(w, v)


def splits_curvature(optimizer: Any) -> bool:
    """Whether a run's curvature needs an objective of its own (a :class:`SplitProblem`).

    It does when the products run on part of each batch (``curvature_fraction
    < 1``) and when K-FAC samples its Fisher: the draws come with the curvature
    rows (:func:`set_curvature_rows`), whatever the fraction.
    """
    return optimizer.curvature_fraction < 1 or \
        getattr(optimizer.params, "fisher", "exact") == "sampled"


def local_curvature_rows(batch_size: int, fraction: float, seed: int, iteration: int,
                         lo: int, hi: int) -> tuple[np.ndarray, int, int]:
    """The rank's rows of an iteration's curvature subset, its size, and their place in it.

    The rank holds positions ``[lo, hi)`` of the batch; the returned rows are
    offsets into them (``rows - lo``). The subset is sorted, so the rank's rows are
    its entries ``first, first + 1, ...``.
    """
    rows = curvature_rows(batch_size, fraction, seed, iteration)
    first, last = (int(i) for i in np.searchsorted(rows, [lo, hi]))
    return rows[first:last] - lo, rows.size, first


def set_curvature_rows(curvature: Any, size: int, batch_size: int, fraction: float, seed: int,
                       iteration: int, x: np.ndarray, y: np.ndarray, lo: int,
                       hi: int) -> int:
    """Give ``curvature`` this rank's rows of iteration ``iteration``'s subset; its size.

    ``x, y`` are the rows ``[lo, hi)`` of the batch this rank holds (of
    ``size`` ranks). Every micro-batch has ``min(micro_batch, ceil(1.25 m /
    size))`` rows (m the subset's size), so the compiled products keep one
    shape from one iteration to the next although each rank's share varies.
    """
    rows, m, first = local_curvature_rows(batch_size, fraction, seed, iteration, lo, hi)
    local = curvature.local
    local.set_samples(x[rows], y[rows], pad_to=max(1, -(-5 * m // (4 * size))))
    # a sampled Fisher's draws, by place in the subset: the same on any number of ranks
    local.set_draws(fisher_draws(seed, iteration, m, local.output_width)[first:first + len(rows)])
    curvature.total_samples = m  # batches may grow (optimizer.batch_growth)
    return m


def load_batch(session: Any, objective: Any,
               batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Read this rank's part of a mini-batch and set it on ``objective`` (thesis 8.2).

    ``batch`` holds the batch's global sample positions (the same on every
    rank); this rank reads its slice ``[lo, hi)`` only. Returns the rows read
    and ``lo, hi``, for the curvature subset.
    """
    from mpinewton.data import shard_bounds

    comm = session.comm
    lo, hi = shard_bounds(batch.size, comm.rank, comm.size)
    x_part, y_part = session.read_rows(batch[lo:hi])
    objective.local.set_samples(x_part, y_part, pad_to=-(-batch.size // comm.size))
    objective.total_samples = batch.size  # batches may grow (optimizer.batch_growth)
    return x_part, y_part, lo, hi
