"""Training data straight from numpy arrays in memory: the checks and the shard of a rank.

For a user who has ``x`` and ``y`` as arrays (no dataset file): every rank
holds the arrays (or maps them from disk), :func:`array_shard` copies its
contiguous rows ``shard_bounds(N, rank, size)`` and the arrays can then be
freed.  The checks are those of reading a dataset file
(:func:`mpinewton.data.hdf5.read_shard`).  numpy only: no MPI, no TensorFlow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpinewton.data.hdf5 import (
    DataError,
    Shard,
    _check_labels,
    _check_request,
    _check_task_name,
    _Layout,
    _validate_arrays,
    shard_bounds,
)

__all__ = ["array_shard", "check_arrays"]


def check_arrays(x: Any, y: Any, *, where: str = "arrays") -> str:
    """Check samples ``x`` and targets ``y``; return the task they are for.

    ``x``: (N, *sample_shape) uint8, float32 or float64. ``y``: integer class
    labels (N,) -> ``"classification"``; float32/float64 targets (N,) or
    (N, k) -> ``"regression"``.  A DataError (its message starts with
    ``where``) for empty arrays, different lengths, unsupported dtypes or
    shapes, and NaN or Inf (naming the first bad row).  Labels must be >= 0.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim >= 1 and y.ndim >= 1 and len(x) == 0 and len(y) == 0:
        raise DataError(f"{where}: x and y are empty (0 rows); give at least one sample")
    x, y, task = _validate_arrays(x, y, where)
    if task == "classification" and y.size and y.min() < 0:
        i = int(np.argmax(y < 0))
        raise DataError(f"{where}: label at row {i} is {int(y[i])}; class labels must be >= 0")
    return task


def array_shard(
    x: Any,
    y: Any,
    rank: int,
    size: int,
    *,
    limit: int | None = None,
    num_classes: int | None = None,
    expected_sample_shape: tuple[int, ...] | None = None,
    task: str | None = None,
    split: str = "arrays",
) -> Shard:
    """The contiguous rows of ``rank`` of in-memory arrays, checked like :func:`read_shard`.

    ``limit`` keeps the first ``limit`` rows before sharding (``total =
    min(limit, N)``).  Only the rank's rows are copied (so the caller may
    free ``x`` and ``y``); labels become int64.  Every rank checks all rows
    (labels against ``num_classes`` for classification, NaN/Inf), so an
    error is the same on every rank. ``task`` is what the caller needs: data
    of the other task are a DataError.  ``split`` names the data in messages
    and in ``Shard.split``.
    """
    _check_task_name(task)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    where = str(split)
    x = np.asarray(x)
    y = np.asarray(y)
    found = check_arrays(x, y, where=where)
    if found == "classification" and num_classes is not None:
        _check_labels(y, int(num_classes), where=where)
    y_dtype = np.dtype(np.int64) if found == "classification" else y.dtype
    layout = _Layout(tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y_dtype)
    _check_request(where, found, layout, num_classes, want_task=task,
                   expected_sample_shape=expected_sample_shape)
    total = len(x) if limit is None else min(int(limit), len(x))
    lo, hi = shard_bounds(total, rank, size)
    return Shard(x=np.array(x[lo:hi], copy=True), y=np.array(y[lo:hi], dtype=y_dtype, copy=True),
                 lo=lo, hi=hi, total=total, split=where, path="<in-memory arrays>", task=found)
