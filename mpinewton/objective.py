"""The global objective c(w): local sums + Allreduce, divided by the global count.

``DistributedObjective`` is the ``Problem`` the solvers see: ``value``,
``value_and_grad``, ``hvp`` and ``hvp_many`` (k products at once, for
``HessianOperator.matmat``), ``gnvp`` and ``gnvp_many`` (generalised
Gauss-Newton products; Schraudolph 2002, Martens 2010), ``grad_squares``
(the empirical Fisher diagonal) and ``kfac_factors`` (K-FAC's Kronecker
factors) return the same numbers whatever the number of ranks (thesis
Corollary 9.2), because every rank contributes sums over its own samples and
the result is divided by the global sample count. Each call issues exactly one
``Allreduce`` of one contiguous float64 buffer, on every rank in the same
order (design invariant 2). ``metric`` and ``evaluate`` (loss and metric in
one buffer) report accuracy (classification) or the mean absolute error
(regression) the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mpinewton.comm import Comm
from mpinewton.solvers.base import WorkShare


class ObjectiveError(ValueError):
    """Data, model and loss that do not fit together; the message says what, where and why."""


class LocalSums(Protocol):
    """What a rank computes over its shard (implemented by ``mpinewton.local``)."""

    def loss_sum(self, w: np.ndarray) -> float: ...
    def loss_grad_sum(self, w: np.ndarray) -> tuple[float, np.ndarray]: ...
    def hvp_sum(self, w: np.ndarray, v: np.ndarray) -> np.ndarray: ...
    def hvp_sum_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray: ...
    def gnvp_sum(self, w: np.ndarray, v: np.ndarray) -> np.ndarray: ...
    def gnvp_sum_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray: ...
    def grad_squares_sum(self, w: np.ndarray) -> np.ndarray: ...
    def kfac_blocks(self) -> tuple: ...
    def kfac_factor_sums(self, w: np.ndarray, max_dim: int | None = None, *,
                         sampled: bool = False) -> list[tuple[np.ndarray, np.ndarray]]: ...
    def correct_count(self, w: np.ndarray) -> int: ...
    def metric_sum(self, w: np.ndarray) -> float: ...
    @property
    def metric_name(self) -> str | None: ...


@dataclass
class ObjectiveStats:
    """Calls and local compute seconds per kind of product (for progress and benchmarks)."""

    values: int = 0
    grads: int = 0
    hvps: int = 0
    gnvps: int = 0
    grad_squares: int = 0
    kfac: int = 0
    compute_seconds: float = 0.0


class DistributedObjective:
    """c(w) = (1/N) sum_i loss_i(w) over the N samples spread across all ranks."""

    def __init__(self, local: LocalSums, comm: Comm, total_samples: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"the objective needs at least one sample, got {total_samples}")
        self.local = local
        self.comm = comm
        self.total_samples = total_samples
        self.stats = ObjectiveStats()

    def _reduce(self, local: np.ndarray) -> np.ndarray:
        return self.comm.allreduce_sum(local) / self.total_samples

    def value(self, w: np.ndarray) -> float:
        """Global mean loss at ``w``."""
        start = time.perf_counter()
        local = np.array([self.local.loss_sum(w)], dtype=np.float64)
        self.stats.compute_seconds += time.perf_counter() - start
        self.stats.values += 1
        return float(self._reduce(local)[0])

    def value_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Global mean loss and gradient, reduced in one buffer ``[loss, g...]``."""
        start = time.perf_counter()
        loss, grad = self.local.loss_grad_sum(w)
        buffer = np.empty(grad.size + 1, dtype=np.float64)
        buffer[0] = loss
        buffer[1:] = grad
        self.stats.compute_seconds += time.perf_counter() - start
        self.stats.grads += 1
        reduced = self._reduce(buffer)
        return float(reduced[0]), reduced[1:]

    def hvp(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact global Hessian-vector product H(w) v."""
        start = time.perf_counter()
        local = self.local.hvp_sum(w, v)
        self.stats.compute_seconds += time.perf_counter() - start
        self.stats.hvps += 1
        return self._reduce(local)

    def hvp_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact global products H(w) v_j for the k columns of ``v`` (n, k) -> (n, k).

        The k local products are computed in one batch and reduced as one
        contiguous buffer of n * k values (one Allreduce, whatever k); column j
        equals ``hvp(w, v[:, j])`` to rounding. Counts k products.
        """
        return self._many("hvp_many", self.local.hvp_sum_many, w, v, "hvps")

    def gnvp(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact global generalised Gauss-Newton product G(w) v = (1/N) sum_i J_i^T H_L,i J_i v.

        Schraudolph 2002, Martens 2010 (sec. 4.2): positive semi-definite for
        cross-entropy on a softmax output (split at the logits) and for mean
        squared error. Counts one product in ``stats.gnvps``.
        """
        start = time.perf_counter()
        local = np.ascontiguousarray(self.local.gnvp_sum(w, v), dtype=np.float64)
        self.stats.compute_seconds += time.perf_counter() - start
        self.stats.gnvps += 1
        return self._reduce(local)

    def gnvp_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Global Gauss-Newton products G(w) v_j for the k columns of ``v`` (n, k) -> (n, k).

        One Allreduce of n * k values, as :meth:`hvp_many`; column j equals
        ``gnvp(w, v[:, j])`` to rounding. Counts k products.
        """
        return self._many("gnvp_many", self.local.gnvp_sum_many, w, v, "gnvps")

    def _many(self, name: str, local_many: Callable[[np.ndarray, np.ndarray], np.ndarray],
              w: np.ndarray, v: np.ndarray, counter: str) -> np.ndarray:
        """The local products of the k columns of ``v`` in one batch, one Allreduce of n * k values.

        Shapes are checked (errors prefixed ``name``); ``stats.<counter>`` grows by k.
        """
        v = np.asarray(v)
        if v.ndim != 2 or v.shape[0] != np.shape(w)[0]:
            raise ValueError(f"{name}: direction matrix has shape {v.shape}, expected "
                             f"({np.shape(w)[0]}, k)")
        start = time.perf_counter()
        local = np.ascontiguousarray(local_many(w, v), dtype=np.float64)
        if local.shape != v.shape:
            raise ValueError(f"{name}: local products have shape {local.shape}, "
                             f"expected {v.shape}")
        self.stats.compute_seconds += time.perf_counter() - start
        setattr(self.stats, counter, getattr(self.stats, counter) + v.shape[1])
        return self._reduce(local.reshape(-1)).reshape(v.shape)

    def grad_squares(self, w: np.ndarray) -> np.ndarray:
        """Mean over all samples of the squared per-sample gradients (empirical Fisher diagonal).

        Martens 2010 (sec. 4.7) builds its diagonal preconditioner from it.
        One Allreduce of n values; counts one call in ``stats.grad_squares``.
        """
        start = time.perf_counter()
        local = np.ascontiguousarray(self.local.grad_squares_sum(w), dtype=np.float64)
        self.stats.compute_seconds += time.perf_counter() - start
        self.stats.grad_squares += 1
        return self._reduce(local)

    def kfac_blocks(self) -> tuple:
        """The model's K-FAC blocks (the same on every rank: they come from the model)."""
        return self.local.kfac_blocks()

    def work_share(self) -> WorkShare:
        """The rank's part of a method's own work, added up by an ``Allreduce`` (SUM).

        K-FAC inverts and applies each layer's block on one rank only
        (:func:`mpinewton.solvers.kfac.share_blocks`) and the ranks add the results.
        """
        return WorkShare(self.comm.rank, self.comm.size, self.comm.allreduce_sum)

    def kfac_factors(self, w: np.ndarray, max_dim: int | None = None, *,
                     sampled: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """K-FAC's ``(A, G)`` of each block: means over all samples (Martens & Grosse 2015).

        A factor of order above ``max_dim`` comes as its diagonal (a vector;
        None: K-FAC's default); ``sampled``: ``G`` from one drawn label a sample
        (the draws set on the local sums). The ranks' sums travel in one
        Allreduce of one packed buffer, in their own precision (the model's);
        counts one call in ``stats.kfac``.
        """
        start = time.perf_counter()
        pairs = self.local.kfac_factor_sums(w, max_dim, sampled=sampled)
        local = np.concatenate([m.reshape(-1) for pair in pairs for m in pair]) if pairs \
            else np.zeros(0)
        self.stats.compute_seconds += time.perf_counter() - start
        self.stats.kfac += 1
        flat = self._reduce(np.ascontiguousarray(local))  # in the sums' own precision
        out, i = [], 0
        for a, g in pairs:
            out.append((flat[i:i + a.size].reshape(a.shape),
                        flat[i + a.size:i + a.size + g.size].reshape(g.shape)))
            i += a.size + g.size
        return out

    @property
    def metric_name(self) -> str | None:
        """The local sums' metric: "accuracy" (classification), "mae" (regression) or None."""
        return getattr(self.local, "metric_name", "accuracy")

    def metric(self, w: np.ndarray) -> float:
        """Global mean of the per-sample metric (:attr:`metric_name`); one Allreduce."""
        if self.metric_name is None:
            raise ObjectiveError("metric: no metric fits these targets and outputs")
        local = np.array([self.local.metric_sum(w)], dtype=np.float64)
        return float(self._reduce(local)[0])

    def evaluate(self, w: np.ndarray) -> dict[str, float]:
        """``{"loss": mean loss, <metric_name>: mean metric}`` from one Allreduce of both sums.

        Without a metric (:attr:`metric_name` None) only the loss.
        """
        name = self.metric_name
        start = time.perf_counter()
        fused = getattr(self.local, "loss_metric_sum", None)  # one forward pass for both
        if name is not None and callable(fused):
            local = np.array(fused(w), dtype=np.float64)
        else:
            local = np.array([self.local.loss_sum(w),
                              self.local.metric_sum(w) if name is not None else 0.0],
                             dtype=np.float64)
        self.stats.compute_seconds += time.perf_counter() - start
        self.stats.values += 1
        loss, metric = self._reduce(local)
        return {"loss": float(loss)} if name is None else {"loss": float(loss),
                                                             name: float(metric)}

    def accuracy(self, w: np.ndarray) -> float:
        """Fraction of all samples classified correctly (classification only).

        The accuracy of :meth:`metric` where the local sums offer a metric
        (arg-max for several outputs, thresholded binary outputs), else the
        count of ``correct_count``. One Allreduce.
        """
        name = self.metric_name
        if name != "accuracy":
            raise ObjectiveError(f"accuracy: the objective's metric is {name!r}, not accuracy "
                                 "(float targets: regression); use metric() or evaluate()")
        if hasattr(self.local, "metric_sum"):
            return self.metric(w)
        local = np.array([float(self.local.correct_count(w))], dtype=np.float64)
        return float(self._reduce(local)[0])
