"""The mpinewton dataset format: one HDF5 file, one group per split.

Layout (format_version 2)::

    /                 attrs: format="mpinewton-dataset", format_version=2,
                             task="classification" | "regression",
                             num_classes (classification only), class_names (optional),
                             source, pixel_max=255 (only where x is uint8)
    /<split>/x        (N, *sample_shape)  uint8 | float32 | float64   samples (any rank >= 1)
    /<split>/y        (N,)  int64                  class labels in [0, num_classes)
                      (N,) or (N, k) float32 | float64   regression targets
    /stats            optional: x_mean, x_std (float64, sample shape): x was
                      standardised at import as (x_raw - x_mean) / x_std

Files of format_version 1 (uint8 images (N, H, W, C), int64 labels, no
``task``) are read unchanged, as classification data.

Every MPI rank reads only its own contiguous rows ``[lo, hi)`` of a split
(:func:`shard_bounds`, :func:`read_shard`), so memory per rank shrinks with the
number of ranks.  Files are written atomically (:mod:`mpinewton.durable`:
temp file in the same directory, fsync, ``os.replace``), so a file under the
target name is always complete.  Float data are checked for NaN and Inf on
writing and on every read (one vectorised ``np.isfinite`` per read).  This
module knows neither MPI nor TensorFlow: rank and size are ints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpinewton.durable import commit, temp_path

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PIXEL_MAX",
    "READ_VERSIONS",
    "STATS_GROUP",
    "TASKS",
    "DataError",
    "DatasetInfo",
    "DatasetWriter",
    "Shard",
    "Standardization",
    "inspect_dataset",
    "read_rows",
    "read_shard",
    "read_splits_concat",
    "read_standardization",
    "shard_bounds",
    "write_dataset",
]

FORMAT = "mpinewton-dataset"
#: The version this module writes.
FORMAT_VERSION = 2
#: The versions this module reads (1: uint8 images and class labels only).
READ_VERSIONS = (1, 2)
PIXEL_MAX = 255
#: What a dataset's ``y`` holds: class labels or float targets.
TASKS = ("classification", "regression")
#: Root group of the standardisation statistics (a reserved name, not a split).
STATS_GROUP = "stats"

#: Sample dtypes a file may hold.
_X_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))
#: Target dtypes of regression files.
_Y_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: Target size of one HDF5 chunk; a rank's read touches few chunks beyond its rows.
_CHUNK_BYTES = 1 << 20

PathLike = str | os.PathLike[str]


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message says how to fix it."""


def _create_hint(path: PathLike) -> str:
    """The commands that make a dataset file, one for each kind of data.

    A shipped job's comments say which one makes the file it reads.
    """
    return (f"create it with `python -m mpinewton.data mnist --out {path}` (the MNIST "
            f"digits), `python -m mpinewton.data resize data/mnist.h5 --out {path} --size 32 32` "
            f"(the digits as 32 x 32 RGB images, the ResNet jobs' data), `python -m "
            f"mpinewton.data import YOUR.npz --out {path}` (your own arrays) or `python -m "
            f"mpinewton.data imagenet` (a folder of images per class)")


def _check_same_layout(first: tuple[str, _Layout] | None, layout: _Layout, where: str,
                       fix: str) -> None:
    """Every split of a file holds one kind of data: ``layout`` against the first split's.

    ``first`` is (name, layout) of the first split (None: this is the first);
    the sample shape is named on its own, the most common mismatch.
    """
    if first is None:
        return
    name, seen = first
    if layout.sample_shape != seen.sample_shape:
        raise DataError(f"{where}: sample shape {layout.sample_shape} differs from split "
                        f"{name!r}, whose samples have shape {seen.sample_shape}")
    if layout != seen:
        raise DataError(f"{where}: {layout.describe()} differs from split {name!r}, which "
                        f"holds {seen.describe()}; {fix}")


def _check_task_name(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be None, 'classification' or 'regression', got {task!r}")


# --------------------------------------------------------------------------- sharding


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous, balanced rows ``[lo, hi)`` of ``n`` rows owned by ``rank`` of ``size``.

    The first ``n % size`` ranks get one extra row; with ``size > n`` the last
    ranks get empty shards (``lo == hi``), which is legal: they contribute zero
    to every sum and the global count.
    """
    if n < 0:
        raise ValueError(f"shard_bounds: n must be >= 0, got {n}")
    if size < 1:
        raise ValueError(f"shard_bounds: size must be >= 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"shard_bounds: rank must be in [0, {size}), got {rank}")
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)
    return lo, hi


# --------------------------------------------------------------------------- array checks


def _first_bad_row(a: np.ndarray) -> tuple[int, int] | None:
    """(first row, number of rows) of float ``a`` holding a NaN or Inf; None if all finite."""
    if a.dtype.kind != "f" or a.size == 0:
        return None
    finite = np.isfinite(a)
    if finite.all():
        return None
    bad = ~finite.reshape(len(a), -1).all(axis=1)
    return int(np.argmax(bad)), int(bad.sum())


def _check_finite(a: np.ndarray, what: str, where: str, offset: int = 0) -> None:
    """Raise naming the first row (``offset`` + local row) of ``a`` with a NaN or Inf."""
    found = _first_bad_row(a)
    if found is not None:
        i, k = found
        raise DataError(
            f"{where}: {what} at row {offset + i} contains NaN or Inf "
            f"({k} such row(s) in rows [{offset}, {offset + len(a)})); "
            "remove those rows or impute the values before writing the dataset"
        )


def _check_labels(y: np.ndarray, num_classes: int, *, where: str, offset: int = 0) -> None:
    """Raise naming the first label outside ``[0, num_classes)`` (index = offset + local index)."""
    if y.size == 0:
        return
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{where}: label at index {offset + i} is {int(y[i])}, outside [0, {num_classes}) "
            f"({int(bad.sum())} bad label(s) in rows [{offset}, {offset + y.size})); "
            "fix the labels or num_classes"
        )


def _task_of(y: np.ndarray, where: str) -> str:
    """The task ``y`` is for: integer labels -> classification, float targets -> regression."""
    if y.ndim not in (1, 2):
        raise DataError(
            f"{where}: y must have shape (N,) (class labels, or one target per sample) or (N, k) "
            f"(k targets per sample), got shape {y.shape}"
        )
    if np.issubdtype(y.dtype, np.integer):
        if y.ndim != 1:
            raise DataError(
                f"{where}: integer y (class labels) must have shape (N,), got {y.shape}; "
                "for one-hot labels use y.argmax(axis=1), for regression targets use float y"
            )
        return "classification"
    if y.dtype in _Y_FLOAT_DTYPES:
        if y.ndim == 2 and y.shape[1] < 1:
            raise DataError(f"{where}: y has shape {y.shape}: no targets per sample")
        return "regression"
    raise DataError(
        f"{where}: y has dtype {y.dtype}; use integer class labels (classification) or "
        "float32/float64 targets (regression), e.g. y.astype(np.int64) or y.astype(np.float32)"
    )


def _task_mismatch(where: str, y: np.ndarray, task: str) -> DataError:
    if task == "classification":
        return DataError(
            f"{where}: y holds float values ({y.dtype}), i.e. regression targets, but the file is "
            "for classification (num_classes given); give integer class labels "
            "(e.g. y.astype(np.int64)), or leave num_classes out to write regression data"
        )
    return DataError(
        f"{where}: y holds integer class labels ({y.dtype}) but the file is for regression "
        "(no num_classes); give num_classes for classification, or float targets "
        "(e.g. y.astype(np.float32)) for regression"
    )


def _validate_arrays(
    x: Any, y: Any, where: str, *, task: str | None = None, offset: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """Check one block of samples and targets; return them as arrays and their task.

    Checks dtypes (x uint8/float32/float64; y integer or float32/float64),
    shapes (x has a sample axis, y is (N,) or (N, k)), equal lengths, NaN/Inf
    (naming the first bad row, counted from ``offset``) and, if ``task`` is
    given, that ``y`` is for it.  Labels are checked by the caller.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype not in _X_DTYPES:
        raise DataError(
            f"{where}: x has dtype {x.dtype}; a dataset holds uint8 (pixels 0..{PIXEL_MAX}), "
            "float32 or float64 samples; convert it, e.g. x.astype(np.float32)"
        )
    if x.ndim < 2 or min(x.shape[1:]) < 1:
        raise DataError(
            f"{where}: x must have shape (N, *sample_shape) with at least one sample axis of "
            f"positive size, got shape {x.shape}; for one feature per sample use x[:, None]"
        )
    found = _task_of(y, where)
    if task is not None and found != task:
        raise _task_mismatch(where, y, task)
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} rows but y has {len(y)}")
    _check_finite(x, "x", where, offset)
    if found == "regression":
        _check_finite(y, "y", where, offset)
    return x, y, found


# --------------------------------------------------------------------------- standardisation


@dataclass(frozen=True, eq=False)
class Standardization:
    """Per-feature statistics of a standardisation ``(x - mean) / std`` (float64, sample shape).

    Stored in a dataset file (``/stats``) so that new data (for prediction)
    can be standardised exactly like the training data.  ``std`` is positive:
    features constant on the data it was computed on get ``std = 1``.
    """

    mean: np.ndarray
    std: np.ndarray
    computed_on: str = "train"

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64)
        std = np.array(self.std, dtype=np.float64)
        if mean.shape != std.shape or mean.ndim < 1:
            raise DataError(
                f"standardisation statistics: mean has shape {mean.shape} but std {std.shape}; "
                "both must have the sample shape"
            )
        if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std <= 0).any():
            raise DataError("standardisation statistics: mean and std must be finite, std > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def compute(cls, x: np.ndarray, computed_on: str = "train") -> Standardization:
        """Mean and std (ddof 0) of ``x`` (N, *sample_shape) over the rows, in float64."""
        x = np.asarray(x)
        if len(x) == 0:
            raise DataError(f"cannot standardise: the {computed_on} data have no rows")
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        return cls(mean=mean, std=np.where(std > 0, std, 1.0), computed_on=computed_on)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def apply(self, x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """``(x - mean) / std`` in float64, returned as ``dtype``; x must have the sample shape."""
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self.shape:
            raise DataError(
                f"cannot standardise samples of shape {tuple(x.shape[1:])} with statistics of "
                f"shape {self.shape}"
            )
        return ((x - self.mean) / self.std).astype(dtype, copy=False)


# --------------------------------------------------------------------------- writing


def _check_split_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "+" in name or name.startswith("."):
        raise DataError(
            f"invalid split name {name!r}: use a non-empty name without '/', '+' or a leading '.'"
            " (e.g. 'train', 'validation', 'test')"
        )
    if name == STATS_GROUP:
        raise DataError(
            f"invalid split name {name!r}: it is reserved for the standardisation statistics"
        )


_ORDER = h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED


def _create_untimed_file(path: Path) -> h5py.File:
    """A new HDF5 file (creation order kept) whose root group holds no timestamps.

    HDF5 stamps every object with its creation time by default; without the
    stamps the same content gives the same bytes, so a conversion on 1 and on N
    ranks yields identical files.
    """
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_link_creation_order(_ORDER)
    fcpl.set_attr_creation_order(_ORDER)
    fcpl.set_obj_track_times(False)
    return h5py.File(h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_EXCL, fcpl=fcpl))


def _create_untimed_group(parent: h5py.Group, name: str) -> h5py.Group:
    """A new group (creation order kept) without timestamps (see ``_create_untimed_file``)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_link_creation_order(_ORDER)
    gcpl.set_attr_creation_order(_ORDER)
    gcpl.set_obj_track_times(False)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


@dataclass(frozen=True)
class _Layout:
    """What every split of a file holds: sample shape and dtype, target shape and dtype."""

    sample_shape: tuple[int, ...]
    x_dtype: np.dtype
    target_shape: tuple[int, ...]
    y_dtype: np.dtype

    def describe(self) -> str:
        return (f"samples {self.sample_shape} {self.x_dtype}, "
                f"y {('N', *self.target_shape)} {self.y_dtype}")


class DatasetWriter:
    """Incremental, atomic writer of a dataset file (for data that does not fit in memory).

    Use as a context manager: ``add_split`` declares a split's size, sample
    shape and dtypes, ``write_rows`` fills rows block by block, and a clean
    exit commits (every declared row must have been written).  On any error
    the temporary file is removed and the target path is left untouched.

    The task is ``classification`` when ``num_classes`` is given (``y``: int64
    labels), ``regression`` otherwise (``y``: float targets); ``task`` may say
    so explicitly.  ``stats`` stores how ``x`` was standardised (``/stats``).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        num_classes: int | None = None,
        source: str,
        class_names: Sequence[str] | None = None,
        compression: str | None = "gzip",
        task: str | None = None,
        stats: Standardization | None = None,
    ) -> None:
        self.path = Path(path)
        _check_task_name(task)
        self.task = task or ("classification" if num_classes is not None else "regression")
        if self.task == "classification":
            if (
                isinstance(num_classes, bool)
                or not isinstance(num_classes, (int, np.integer))
                or num_classes < 1
            ):
                raise DataError(
                    f"writing {self.path}: num_classes must be a positive int for classification, "
                    f"got {num_classes!r}"
                )
            self.num_classes: int | None = int(num_classes)
        else:
            if num_classes is not None:
                raise DataError(
                    f"writing {self.path}: num_classes={num_classes!r} given for regression data; "
                    "leave it out (None), or write integer class labels for classification"
                )
            if class_names is not None:
                raise DataError(f"writing {self.path}: class_names given for regression data")
            self.num_classes = None
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != self.num_classes:
                raise DataError(
                    f"writing {self.path}: {len(class_names)} class_names given "
                    f"for num_classes={self.num_classes}"
                )
        self.class_names = class_names
        self.source = str(source)
        self.compression = compression
        self.stats = stats
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._rows: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._layout: _Layout | None = None

    def __enter__(self) -> DatasetWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        try:
            self._file = _create_untimed_file(self._tmp)
            attrs = self._file.attrs
            attrs["format"] = FORMAT
            attrs["format_version"] = FORMAT_VERSION
            attrs["task"] = self.task
            if self.num_classes is not None:
                attrs["num_classes"] = self.num_classes
            attrs["source"] = self.source
            if self.class_names is not None:
                attrs.create("class_names", np.array(self.class_names, dtype=h5py.string_dtype()))
            if self.stats is not None:
                group = _create_untimed_group(self._file, STATS_GROUP)
                group.create_dataset("x_mean", data=self.stats.mean, track_times=False)
                group.create_dataset("x_std", data=self.stats.std, track_times=False)
                group.attrs["computed_on"] = self.stats.computed_on
                group.attrs["formula"] = "x = (x_raw - x_mean) / x_std"
        except BaseException:
            self._abort()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._commit()
        except BaseException:
            self._abort()
            raise

    def add_split(
        self,
        name: str,
        n: int,
        sample_shape: Sequence[int],
        *,
        x_dtype: Any = np.uint8,
        y_dtype: Any = None,
        target_shape: Sequence[int] = (),
    ) -> None:
        """Declare split ``name``: ``n`` samples of ``sample_shape`` and ``x_dtype``.

        ``y_dtype`` and ``target_shape`` matter for regression only (default:
        ``x_dtype`` if it is a float type, else float32; ``()`` for (N,)
        targets, ``(k,)`` for (N, k)); class labels are always int64 (N,).
        Every split of a file has the same shapes and dtypes.
        """
        if self._file is None:
            raise RuntimeError("DatasetWriter.add_split called outside its `with` block")
        _check_split_name(name)
        if name in self._sizes:
            raise DataError(f"writing {self.path}: split {name!r} declared twice")
        where = f"writing {self.path}, split {name!r}"
        layout = self._declared_layout(where, sample_shape, x_dtype, y_dtype, target_shape)
        if self._layout is not None and layout != self._layout:
            raise DataError(
                f"{where}: {layout.describe()} differs from the other splits' "
                f"{self._layout.describe()}; every split must hold the same kind of data"
            )
        if self.stats is not None and self.stats.shape != layout.sample_shape:
            raise DataError(
                f"{where}: samples have shape {layout.sample_shape} but the standardisation "
                f"statistics have shape {self.stats.shape}"
            )
        n = int(n)
        if n < 0:
            raise DataError(f"{where}: n must be >= 0, got {n}")
        if self._layout is None and layout.x_dtype == np.uint8:
            self._file.attrs["pixel_max"] = PIXEL_MAX
        self._layout = layout
        group = _create_untimed_group(self._file, name)
        shape, tshape = layout.sample_shape, layout.target_shape
        sample_bytes = int(np.prod(shape)) * layout.x_dtype.itemsize
        target_bytes = int(np.prod(tshape)) * layout.y_dtype.itemsize
        opts: dict[str, Any] = {}
        yopts: dict[str, Any] = {}
        if n > 0:
            rows = max(1, min(n, _CHUNK_BYTES // sample_bytes))
            opts = {"chunks": (rows, *shape), "compression": self.compression}
            yrows = max(1, min(n, 1 << 16, _CHUNK_BYTES // target_bytes))
            yopts = {"chunks": (yrows, *tshape), "compression": self.compression}
        group.create_dataset("x", shape=(n, *shape), dtype=layout.x_dtype, track_times=False,
                             **opts)
        group.create_dataset("y", shape=(n, *tshape), dtype=layout.y_dtype, track_times=False,
                             **yopts)
        self._sizes[name] = n
        self._rows[name] = 0

    def _declared_layout(
        self, where: str, sample_shape: Sequence[int], x_dtype: Any, y_dtype: Any,
        target_shape: Sequence[int],
    ) -> _Layout:
        shape = tuple(int(s) for s in sample_shape)
        if len(shape) < 1 or min(shape) < 1:
            raise DataError(
                f"{where}: sample shape must have at least one axis, all sizes positive, got "
                f"{shape}; e.g. (H, W, C) for images or (features,) for vectors"
            )
        xd = np.dtype(x_dtype)
        if xd not in _X_DTYPES:
            raise DataError(f"{where}: x dtype must be uint8, float32 or float64, got {xd}")
        tshape = tuple(int(s) for s in target_shape)
        if self.task == "classification":
            if tshape:
                raise DataError(f"{where}: class labels are (N,), got target shape {tshape}")
            if y_dtype is not None and not np.issubdtype(np.dtype(y_dtype), np.integer):
                raise _task_mismatch(where, np.empty(0, y_dtype), self.task)
            yd = np.dtype(np.int64)
        else:
            if len(tshape) > 1 or (tshape and tshape[0] < 1):
                raise DataError(
                    f"{where}: regression targets are (N,) or (N, k), got target shape {tshape}"
                )
            yd = np.dtype(y_dtype if y_dtype is not None
                          else xd if xd.kind == "f" else np.float32)
            if yd not in _Y_FLOAT_DTYPES:
                if np.issubdtype(yd, np.integer):
                    raise _task_mismatch(where, np.empty(0, yd), self.task)
                raise DataError(f"{where}: regression targets must be float32 or float64, got {yd}")
        return _Layout(shape, xd, tshape, yd)

    def write_rows(self, name: str, lo: int, x: np.ndarray, y: np.ndarray) -> None:
        """Write samples ``x`` and targets ``y`` into rows ``[lo, lo + len(x))`` of ``name``.

        ``x`` must have the split's dtype; float regression targets are stored
        in the split's target dtype.
        """
        if self._file is None:
            raise RuntimeError("DatasetWriter.write_rows called outside its `with` block")
        if name not in self._sizes:
            raise DataError(f"writing {self.path}: split {name!r} was not declared with add_split")
        assert self._layout is not None
        where = f"writing {self.path}, split {name!r}"
        x = np.asarray(x)
        layout = self._layout
        if x.dtype != layout.x_dtype:
            if layout.x_dtype == np.uint8:
                raise DataError(
                    f"{where}: x must be uint8 pixels 0..{PIXEL_MAX}, got dtype {x.dtype}"
                )
            raise DataError(f"{where}: x has dtype {x.dtype}, the split holds {layout.x_dtype}")
        if x.shape[1:] != layout.sample_shape:
            raise DataError(
                f"{where}: samples have shape {x.shape[1:]}, the split expects "
                f"{layout.sample_shape}"
            )
        x, y, _ = _validate_arrays(x, y, where, task=self.task, offset=lo)
        if y.shape[1:] != layout.target_shape:
            raise DataError(
                f"{where}: targets have shape {y.shape[1:]}, the split expects "
                f"{layout.target_shape} (y of shape {('N', *layout.target_shape)})"
            )
        hi = lo + len(x)
        if lo < 0 or hi > self._sizes[name]:
            raise DataError(
                f"{where}: rows [{lo}, {hi}) outside the declared [0, {self._sizes[name]})"
            )
        if self.num_classes is not None:
            _check_labels(y, self.num_classes, where=where, offset=lo)
        with np.errstate(over="ignore"):  # an overflow is reported just below, by row
            y = y.astype(layout.y_dtype, copy=False)
        if self.task == "regression":
            _check_finite(y, "y", where, lo)  # float64 -> float32 may overflow
        if len(x):
            _write_split_rows(self._file[name], lo, x, y)
        self._rows[name] += len(x)

    def _commit(self) -> None:
        assert self._file is not None and self._tmp is not None
        if not self._sizes:
            raise DataError(
                f"writing {self.path}: no splits given; give at least one (e.g. 'train')"
            )
        missing = {k: (self._rows[k], n) for k, n in self._sizes.items() if self._rows[k] != n}
        if missing:
            detail = ", ".join(f"{k!r}: {w} of {n} rows written" for k, (w, n) in missing.items())
            raise DataError(f"writing {self.path}: incomplete splits ({detail})")
        self._file.flush()
        self._file.close()
        self._file = None
        # HDF5 created the file with mode 0666 & ~umask, like any file the user
        # creates: a dataset is for every user of the cluster account's group.
        commit(self._tmp, self.path)
        self._tmp = None

    def _abort(self) -> None:
        if self._file is not None:
            with suppress(Exception):  # cleanup must not mask the original error
                self._file.close()
            self._file = None
        if self._tmp is not None:
            with suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None


def _write_split_rows(group: h5py.Group, lo: int, x: np.ndarray, y: np.ndarray) -> None:
    """Low-level block write (a seam for tests that simulate a failure mid-write)."""
    hi = lo + len(x)
    group["x"][lo:hi] = x
    group["y"][lo:hi] = y


def write_dataset(
    path: PathLike,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int | None = None,
    source: str,
    class_names: list[str] | None = None,
    stats: Standardization | None = None,
    compression: str | None = "gzip",
) -> None:
    """Write ``splits`` (name -> (x, y)) atomically to ``path``.

    ``x``: (N, *sample_shape) uint8, float32 or float64. ``y``: integer class
    labels (N,) -> a classification file, ``num_classes`` required; float32 or
    float64 targets (N,) or (N, k) -> a regression file, ``num_classes`` must
    be None.  Everything is validated (shapes, dtypes, labels in
    ``[0, num_classes)``, no NaN/Inf) before the first byte is written; on any
    error no file (and no temp file) is left under the target name, and an
    existing file there is untouched.
    """
    if not splits:
        raise DataError(f"writing {path}: no splits given; give at least one (e.g. 'train')")
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    task: str | None = None
    writer: DatasetWriter | None = None
    first: tuple[str, _Layout] | None = None
    for name, (x, y) in splits.items():
        _check_split_name(name)
        where = f"writing {path}, split {name!r}"
        x, y, found = _validate_arrays(x, y, where)
        if task is None:
            task = found
            if task == "classification" and num_classes is None:
                raise DataError(
                    f"{where}: y holds integer class labels (classification) but num_classes is "
                    "not given; pass num_classes=K, or float targets (y.astype(np.float32)) for "
                    "regression"
                )
            if task == "regression" and num_classes is not None:
                raise DataError(
                    f"{where}: y holds float targets (regression) but num_classes={num_classes!r} "
                    "was given; leave num_classes out for regression, or give integer class "
                    "labels (y.astype(np.int64)) for classification"
                )
            writer = DatasetWriter(path, num_classes=num_classes, source=source,
                                   class_names=class_names, compression=compression, task=task,
                                   stats=stats)
        elif found != task:
            raise _task_mismatch(where, y, task)
        assert writer is not None
        layout = _Layout(tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]),
                         np.dtype(np.int64) if task == "classification" else y.dtype)
        _check_same_layout(first, layout, where, "every split must hold the same kind of data")
        first = first or (name, layout)
        if writer.num_classes is not None:
            _check_labels(y, writer.num_classes, where=where)
        arrays[name] = (x, y)
    assert writer is not None
    with writer as w:
        for name, (x, y) in arrays.items():
            w.add_split(name, len(x), x.shape[1:], x_dtype=x.dtype,
                        y_dtype=y.dtype, target_shape=y.shape[1:])
            w.write_rows(name, 0, x, y)


# --------------------------------------------------------------------------- reading


@contextmanager
def _open(path: PathLike) -> Iterator[h5py.File]:
    """Open a dataset read-only, turning missing / non-HDF5 / wrong-format files into DataError."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset file {p} does not exist; {_create_hint(p)}")
    if p.is_dir():
        raise DataError(f"dataset path {p} is a directory, not an HDF5 file; give the .h5 file")
    try:
        # locking=False: many ranks read one file, often on NFS/Lustre where HDF5 locks fail;
        # writers never modify a file in place (atomic replace), so readers need no lock.
        f = h5py.File(p, "r", locking=False)
    except OSError as e:
        raise DataError(
            f"dataset file {p} is not a readable HDF5 file (truncated or corrupt?): {e}; "
            f"recreate it, e.g. `python -m mpinewton.data mnist --out {p} --force`"
        ) from e
    try:
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            raise DataError(
                f"{p} is an HDF5 file but not an mpinewton dataset "
                f"(attribute format={fmt!r}, expected {FORMAT!r}); "
                f"{_create_hint(p)}"
            )
        version = int(f.attrs.get("format_version", -1))
        if version not in READ_VERSIONS:
            raise DataError(
                f"{p} has dataset format_version {version}, "
                f"this mpinewton reads versions {', '.join(map(str, READ_VERSIONS))}; "
                "recreate the file with this version or upgrade mpinewton"
            )
        yield f
    finally:
        f.close()


def _version(f: h5py.File) -> int:
    return int(f.attrs["format_version"])


def _file_task(f: h5py.File, path: PathLike) -> str:
    """The file's task: version 1 files hold class labels; version 2 files say."""
    if _version(f) == 1:
        return "classification"
    task = _str_attr(f.attrs.get("task", ""))
    if task not in TASKS:
        raise DataError(
            f"{path}: attribute task={task!r}, expected 'classification' or 'regression'; "
            "recreate the file"
        )
    return task


def _file_classes(f: h5py.File, path: PathLike, task: str) -> int | None:
    if task != "classification":
        return None
    if "num_classes" not in f.attrs:
        raise DataError(f"{path}: classification dataset without num_classes; recreate the file")
    return int(f.attrs["num_classes"])


def _available(f: h5py.File) -> list[str]:
    return [k for k, v in f.items()
            if isinstance(v, h5py.Group) and not (k == STATS_GROUP and _version(f) >= 2)]


def _split(
    f: h5py.File, path: PathLike, name: str, task: str
) -> tuple[h5py.Dataset, h5py.Dataset]:
    """Return the (x, y) datasets of split ``name`` after structural checks."""
    g = f.get(name) if not (name == STATS_GROUP and _version(f) >= 2) else None
    if not isinstance(g, h5py.Group):
        raise DataError(
            f"{path}: split {name!r} not found; "
            f"available splits: {', '.join(_available(f)) or '(none)'}"
        )
    where = f"{path}, split {name!r}"
    for key in ("x", "y"):
        if not isinstance(g.get(key), h5py.Dataset):
            raise DataError(f"{where}: dataset {key!r} is missing; recreate the file")
    x, y = g["x"], g["y"]
    if x.ndim < 2 or x.dtype not in _X_DTYPES:
        raise DataError(
            f"{where}: x must be (N, *sample_shape) uint8, float32 or float64, "
            f"found shape {x.shape} dtype {x.dtype}"
        )
    if task == "classification":
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{where}: y must be (N,) integer class labels, found shape {y.shape} "
                f"dtype {y.dtype}"
            )
    elif y.ndim not in (1, 2) or y.dtype not in _Y_FLOAT_DTYPES:
        raise DataError(
            f"{where}: y must be (N,) or (N, k) float32/float64 regression targets, "
            f"found shape {y.shape} dtype {y.dtype}"
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]}; recreate the file"
        )
    return x, y


def _str_attr(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _layout_of(x: h5py.Dataset, y: h5py.Dataset) -> _Layout:
    return _Layout(tuple(int(s) for s in x.shape[1:]), np.dtype(x.dtype),
                   tuple(int(s) for s in y.shape[1:]), np.dtype(y.dtype))


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset file holds (cheap: metadata only, no samples read).

    ``num_classes`` and ``class_names`` are None for regression;
    ``target_shape`` is ``()`` for (N,) targets or labels, ``(k,)`` for (N, k).
    """

    path: str
    splits: dict[str, int]
    sample_shape: tuple[int, ...]
    num_classes: int | None
    class_names: tuple[str, ...] | None
    x_dtype: str
    source: str = ""
    format_version: int = FORMAT_VERSION
    task: str = "classification"
    target_shape: tuple[int, ...] = ()
    y_dtype: str = "int64"
    standardized: bool = False

    @property
    def dtype(self) -> str:
        """The samples' dtype (``x_dtype``; the name of format version 1)."""
        return self.x_dtype

    def __str__(self) -> str:
        lines = [f"dataset {self.path} (format {FORMAT} v{self.format_version})"]
        for name, n in self.splits.items():
            lines.append(f"  {name:<12} {n:>9,d} samples")
        lines.append(f"  x            sample shape {self.sample_shape} {self.x_dtype}")
        if self.task == "classification":
            lines.append(f"  task         classification, {self.num_classes} classes "
                         f"(y: int64 labels)")
        else:
            shape = "(N,)" if not self.target_shape else f"(N, {self.target_shape[0]})"
            lines.append(f"  task         regression, targets {shape} {self.y_dtype}")
        if self.class_names is not None:
            lines.append(f"  class names  {', '.join(self.class_names)}")
        if self.standardized:
            lines.append(f"  standardised x = (x_raw - x_mean) / x_std, statistics in "
                         f"/{STATS_GROUP}")
        lines.append(f"  source       {self.source}")
        return "\n".join(lines)


def inspect_dataset(path: PathLike) -> DatasetInfo:
    """Validate a dataset file's structure and describe it; raises DataError naming the problem."""
    with _open(path) as f:
        task = _file_task(f, path)
        names = _available(f)
        if not names:
            raise DataError(f"{path}: the dataset has no splits; recreate it")
        splits: dict[str, int] = {}
        first: tuple[str, _Layout] | None = None
        for name in names:
            x, y = _split(f, path, name, task)
            layout = _layout_of(x, y)
            _check_same_layout(first, layout, f"{path}: split {name!r}",
                               "recreate the file with one dtype for all splits")
            first = first or (name, layout)
            splits[name] = int(x.shape[0])
        assert first is not None
        raw_names = f.attrs.get("class_names")
        class_names = None if raw_names is None else tuple(_str_attr(c) for c in raw_names)
        layout = first[1]
        return DatasetInfo(
            path=str(path),
            splits=splits,
            sample_shape=layout.sample_shape,
            num_classes=_file_classes(f, path, task),
            class_names=class_names,
            x_dtype=str(layout.x_dtype),
            source=_str_attr(f.attrs.get("source", "")),
            format_version=_version(f),
            task=task,
            target_shape=layout.target_shape,
            y_dtype=str(np.dtype(np.int64) if task == "classification" else layout.y_dtype),
            standardized=_version(f) >= 2 and isinstance(f.get(STATS_GROUP), h5py.Group),
        )


def read_standardization(path: PathLike) -> Standardization | None:
    """The standardisation statistics stored in the dataset at ``path`` (None if it has none)."""
    with _open(path) as f:
        g = f.get(STATS_GROUP) if _version(f) >= 2 else None
        if g is None:
            return None
        if not isinstance(g, h5py.Group) or not all(
            isinstance(g.get(k), h5py.Dataset) for k in ("x_mean", "x_std")
        ):
            raise DataError(f"{path}: /{STATS_GROUP} must hold datasets x_mean and x_std; "
                            "recreate the file")
        try:
            return Standardization(mean=g["x_mean"][()], std=g["x_std"][()],
                                   computed_on=_str_attr(g.attrs.get("computed_on", "")))
        except DataError as e:
            raise DataError(f"{path}: /{STATS_GROUP}: {e}") from e


@dataclass(frozen=True, eq=False)
class Shard:
    """One rank's rows ``[lo, hi)`` of a split (or of several splits concatenated).

    ``x`` keeps the stored dtype (uint8 pixels, or float32/float64 features);
    ``y`` is int64 class labels (N,) or float targets (N,) / (N, k) (``task``).
    """

    x: np.ndarray
    y: np.ndarray
    lo: int
    hi: int
    total: int
    split: str
    path: str
    task: str = "classification"

    def __len__(self) -> int:
        return self.hi - self.lo


def _split_names(split: str | Sequence[str]) -> list[str]:
    names = split.split("+") if isinstance(split, str) else [str(s) for s in split]
    if not names or any(not s for s in names):
        raise ValueError(
            f"bad split specification {split!r}; use e.g. 'train' or 'train+validation'"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"split specification {split!r} names a split twice")
    return names


def _task_error(where: str, have: str, want: str, desc: str) -> DataError:
    """The error for data of task ``have`` asked for by a caller needing ``want``."""
    if have == "regression":
        return DataError(
            f"{where}: the dataset holds regression targets ({desc}), but classification "
            "(integer class labels, e.g. for a cross-entropy loss) was asked for; use a "
            "regression loss (e.g. mse) with this file, or a classification dataset"
        )
    return DataError(
        f"{where}: the dataset holds integer class labels ({desc}), but regression "
        "(float targets, e.g. for an mse loss) was asked for; use a classification loss "
        "(e.g. cross-entropy) with this file, or a regression dataset"
    )


def _check_request(
    where: str, task: str, layout: _Layout, ncls: int | None, *, want_task: str | None,
    expected_sample_shape: tuple[int, ...] | None,
) -> None:
    """Check what the caller needs (task, sample shape) against what the data hold."""
    _check_task_name(want_task)
    if want_task is not None and want_task != task:
        desc = ((f"{ncls} classes" if ncls is not None else "int64 labels")
                if task == "classification"
                else f"y {('N', *layout.target_shape)} {layout.y_dtype}")
        raise _task_error(where, task, want_task, desc)
    shape = layout.sample_shape
    if expected_sample_shape is not None and tuple(expected_sample_shape) != shape:
        want = tuple(expected_sample_shape)
        hint = ("; add a channel axis, e.g. x[..., None]" if want == (*shape, 1)
                else "; use a dataset whose samples match the model input")
        raise DataError(
            f"{where}: samples have shape {shape} but the model expects {want}{hint}"
        )


@dataclass(frozen=True)
class _Parts:
    """The splits to concatenate and what they hold."""

    splits: list[tuple[str, h5py.Dataset, h5py.Dataset]]
    layout: _Layout
    task: str
    num_classes: int | None  # labels are checked against this (classification only)
    total: int  # rows used (after ``limit``)


def _checked_parts(
    f: h5py.File, path: PathLike, names: list[str], expected_sample_shape: tuple[int, ...] | None,
    num_classes: int | None, limit: int | None, task: str | None,
) -> _Parts:
    """The splits to concatenate after every check that needs no sample read."""
    file_task = _file_task(f, path)
    parts = [(name, *_split(f, path, name, file_task)) for name in names]
    layout = _layout_of(parts[0][1], parts[0][2])
    for name, x_ds, y_ds in parts[1:]:
        other = _layout_of(x_ds, y_ds)
        if other.sample_shape != layout.sample_shape:
            raise DataError(
                f"{path}: cannot concatenate split {name!r} "
                f"with sample shape {other.sample_shape} "
                f"to split {parts[0][0]!r} with sample shape {layout.sample_shape}"
            )
        if other.x_dtype != layout.x_dtype or (
            file_task == "regression" and other != layout
        ):
            raise DataError(
                f"{path}: cannot concatenate split {name!r} ({other.describe()}) to split "
                f"{parts[0][0]!r} ({layout.describe()}): the splits hold different dtypes or "
                "target shapes; recreate the file with one dtype for all splits"
            )
    if file_task == "classification":
        layout = _Layout(layout.sample_shape, layout.x_dtype, (), np.dtype(np.int64))
    ncls = _file_classes(f, path, file_task)
    if file_task == "classification" and num_classes is not None:
        ncls = int(num_classes)
    _check_request(f"{path}, split {'+'.join(names)!r}", file_task, layout, ncls,
                   want_task=task, expected_sample_shape=expected_sample_shape)
    n_all = sum(int(x_ds.shape[0]) for _, x_ds, _ in parts)
    return _Parts(parts, layout, file_task, ncls,
                  n_all if limit is None else min(int(limit), n_all))


def _check_block(
    x: np.ndarray, y: np.ndarray, ncls: int | None, where: Any, describe: Any,
) -> None:
    """Check labels (against ``ncls``) or float values (NaN/Inf) of a block read.

    ``where(i)`` gives the row in the split and the global index of the i-th
    row; ``describe(row, index)`` the text that names them.
    """
    if ncls is not None:
        bad = (y < 0) | (y >= ncls)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{describe('label', *where(i))} is {int(y[i])}, outside [0, {ncls}); "
                "fix the labels or num_classes"
            )
    for what, a in (("x", x), ("y", y)):
        found = _first_bad_row(a)
        if found is not None:
            raise DataError(
                f"{describe(what, *where(found[0]))} contains NaN or Inf ({found[1]} such row(s) "
                "in this read); fix the data (re-import it, the writers refuse such values)"
            )


def _read_checked(
    path: PathLike, name: str, label: str, ncls: int | None, x_ds: h5py.Dataset,
    y_ds: h5py.Dataset, selection: Any, what: str, where: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``selection`` of one split and check its labels or float values.

    ``what`` describes the rows for an I/O error; ``where(i)`` gives the row in
    the split and the global index of the i-th row read, for a bad value.
    """
    try:
        x, y = x_ds[selection], y_ds[selection]
    except OSError as e:
        raise DataError(f"{path}, split {name!r}: reading {what} failed (corrupt file?): {e}; "
                        "recreate the file") from e

    def describe(kind: str, row: int, index: int) -> str:
        return f"{path}, split {name!r}: {kind} at row {row} (global index {index} of {label!r})"

    _check_block(x, y, ncls, where, describe)
    return x, y


def read_shard(
    path: PathLike,
    split: str | Sequence[str],
    rank: int,
    size: int,
    *,
    limit: int | None = None,
    expected_sample_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    task: str | None = None,
) -> Shard:
    """Read only this rank's rows of ``split`` from the dataset at ``path``.

    ``split`` is a name, or several names (a list or ``"train+validation"``)
    concatenated logically in that order.  ``limit`` keeps only the first
    ``limit`` rows of the (concatenated) split before sharding, so
    ``total = min(limit, N)``.  For classification files the labels of the
    rank's rows are checked against ``num_classes`` (default: the file's); it
    is ignored for regression files.  ``task`` ("classification" or
    "regression") is what the caller needs (its loss): data of the other task
    are a DataError.  Float values read are checked for NaN and Inf.
    """
    names = _split_names(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    label = "+".join(names)
    with _open(path) as f:
        p = _checked_parts(f, path, names, expected_sample_shape, num_classes, limit, task)
        lo, hi = shard_bounds(p.total, rank, size)
        x = np.empty((hi - lo, *p.layout.sample_shape), dtype=p.layout.x_dtype)
        y = np.empty((hi - lo, *p.layout.target_shape), dtype=p.layout.y_dtype)
        offset = 0
        for name, x_ds, y_ds in p.splits:
            n = int(x_ds.shape[0])
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                x[a - lo : b - lo], y[a - lo : b - lo] = _read_checked(
                    path, name, label, p.num_classes, x_ds, y_ds, slice(a - offset, b - offset),
                    f"rows [{a - offset}, {b - offset})",
                    lambda i, a=a, o=offset: (a - o + i, a + i))
            offset += n
    return Shard(x=x, y=y, lo=lo, hi=hi, total=p.total, split=label, path=str(path), task=p.task)


def read_rows(
    path: PathLike,
    split: str | Sequence[str],
    indices: np.ndarray,
    *,
    limit: int | None = None,
    expected_sample_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    task: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read the rows ``indices`` (global, sorted, distinct) of ``split`` concatenated.

    For mini-batches (thesis 8.2): a rank reads just its part of each batch,
    so its memory does not grow with the data set. Checks as
    :func:`read_shard`'s.
    """
    names = _split_names(split)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (idx.size > 1 and not np.all(np.diff(idx) > 0)):
        raise ValueError("indices must be a sorted 1-d array of distinct row numbers")
    label = "+".join(names)
    with _open(path) as f:
        p = _checked_parts(f, path, names, expected_sample_shape, num_classes, limit, task)
        if idx.size and (idx[0] < 0 or idx[-1] >= p.total):
            raise DataError(f"{path}, split {label!r}: row {int(idx[-1])} requested, but there "
                            f"are {p.total} rows")
        x = np.empty((idx.size, *p.layout.sample_shape), dtype=p.layout.x_dtype)
        y = np.empty((idx.size, *p.layout.target_shape), dtype=p.layout.y_dtype)
        offset = 0
        for name, x_ds, y_ds in p.splits:
            n = int(x_ds.shape[0])
            a, b = np.searchsorted(idx, [offset, offset + n])
            if a < b:
                rows = idx[a:b] - offset
                x[a:b], y[a:b] = _read_checked(
                    path, name, label, p.num_classes, x_ds, y_ds, rows, f"{b - a} rows",
                    lambda i, a=a, rows=rows: (int(rows[i]), int(idx[a + i])))
            offset += n
    return x, y


def read_splits_concat(
    path: PathLike,
    splits: Sequence[str],
    rank: int,
    size: int,
    **kwargs: Any,
) -> Shard:
    """Read this rank's rows of ``splits`` concatenated in order (e.g. train+validation)."""
    return read_shard(path, list(splits), rank, size, **kwargs)
