"""The mpinewton dataset format: one HDF5 file, one group per split.

Layout (format_version 1)::

    /                 attrs: format="mpinewton-dataset", format_version=1,
                             num_classes, class_names (optional), source, pixel_max=255
    /<split>/x        (N, H, W, C) uint8  images, raw pixel bytes 0..255
    /<split>/y        (N,)         int64  labels in [0, num_classes)

Every MPI rank reads only its own contiguous rows ``[lo, hi)`` of a split
(:func:`shard_bounds`, :func:`read_shard`), so memory per rank shrinks with the
number of ranks.  Files are written atomically (:mod:`mpinewton.durable`:
temp file in the same directory, fsync, ``os.replace``), so a file under the
target name is always complete.  This module knows neither MPI nor TensorFlow:
rank and size are ints.
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
    "DataError",
    "DatasetInfo",
    "DatasetWriter",
    "Shard",
    "inspect_dataset",
    "read_shard",
    "read_splits_concat",
    "shard_bounds",
    "write_dataset",
]

FORMAT = "mpinewton-dataset"
FORMAT_VERSION = 1
PIXEL_MAX = 255

#: Target size of one HDF5 chunk; a rank's read touches few chunks beyond its rows.
_CHUNK_BYTES = 1 << 20

PathLike = str | os.PathLike[str]


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message says how to fix it."""


def _create_hint(path: PathLike) -> str:
    return f"run `python -m mpinewton.data mnist --out {path}` to create it"


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


# --------------------------------------------------------------------------- writing


def _check_split_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "+" in name or name.startswith("."):
        raise DataError(
            f"invalid split name {name!r}: use a non-empty name without '/', '+' or a leading '.'"
            " (e.g. 'train', 'validation', 'test')"
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


class DatasetWriter:
    """Incremental, atomic writer of a dataset file (for data that does not fit in memory).

    Use as a context manager: ``add_split`` declares a split's size and sample
    shape, ``write_rows`` fills rows block by block, and a clean exit commits
    (every declared row must have been written).  On any error the temporary
    file is removed and the target path is left untouched.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        num_classes: int,
        source: str,
        class_names: Sequence[str] | None = None,
        compression: str | None = "gzip",
    ) -> None:
        self.path = Path(path)
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, (int, np.integer))
            or num_classes < 1
        ):
            raise DataError(
                f"writing {self.path}: num_classes must be a positive int, got {num_classes!r}"
            )
        self.num_classes = int(num_classes)
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
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._rows: dict[str, int] = {}
        self._sizes: dict[str, int] = {}

    def __enter__(self) -> DatasetWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        try:
            self._file = _create_untimed_file(self._tmp)
            attrs = self._file.attrs
            attrs["format"] = FORMAT
            attrs["format_version"] = FORMAT_VERSION
            attrs["num_classes"] = self.num_classes
            attrs["source"] = self.source
            attrs["pixel_max"] = PIXEL_MAX
            if self.class_names is not None:
                attrs.create("class_names", np.array(self.class_names, dtype=h5py.string_dtype()))
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

    def add_split(self, name: str, n: int, sample_shape: Sequence[int]) -> None:
        """Declare split ``name`` with ``n`` samples of shape ``sample_shape`` (H, W, C)."""
        if self._file is None:
            raise RuntimeError("DatasetWriter.add_split called outside its `with` block")
        _check_split_name(name)
        if name in self._sizes:
            raise DataError(f"writing {self.path}: split {name!r} declared twice")
        shape = tuple(int(s) for s in sample_shape)
        if len(shape) != 3 or min(shape, default=0) < 1:
            raise DataError(
                f"writing {self.path}, split {name!r}: sample shape must be (H, W, C) "
                "with positive sizes, "
                f"got {shape}; add a channel axis for grey images, e.g. x[..., None]"
            )
        n = int(n)
        if n < 0:
            raise DataError(f"writing {self.path}, split {name!r}: n must be >= 0, got {n}")
        group = _create_untimed_group(self._file, name)
        sample_bytes = int(np.prod(shape))
        opts: dict[str, Any] = {}
        if n > 0:
            rows = max(1, min(n, _CHUNK_BYTES // sample_bytes))
            opts = {"chunks": (rows, *shape), "compression": self.compression}
            yopts = {"chunks": (min(n, 1 << 16),), "compression": self.compression}
        else:
            yopts = {}
        group.create_dataset("x", shape=(n, *shape), dtype=np.uint8, track_times=False, **opts)
        group.create_dataset("y", shape=(n,), dtype=np.int64, track_times=False, **yopts)
        self._sizes[name] = n
        self._rows[name] = 0

    def write_rows(self, name: str, lo: int, x: np.ndarray, y: np.ndarray) -> None:
        """Write ``x`` (uint8) and labels ``y`` into rows ``[lo, lo + len(x))`` of ``name``."""
        if self._file is None:
            raise RuntimeError("DatasetWriter.write_rows called outside its `with` block")
        if name not in self._sizes:
            raise DataError(f"writing {self.path}: split {name!r} was not declared with add_split")
        x = np.asarray(x)
        y = np.asarray(y)
        where = f"writing {self.path}, split {name!r}"
        ds_x = self._file[name]["x"]
        if x.dtype != np.uint8:
            raise DataError(f"{where}: x must be uint8 pixels 0..{PIXEL_MAX}, got dtype {x.dtype}")
        if x.shape[1:] != ds_x.shape[1:]:
            raise DataError(
                f"{where}: samples have shape {x.shape[1:]}, the split expects {ds_x.shape[1:]}"
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{where}: y must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}"
            )
        if len(x) != len(y):
            raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)} labels")
        hi = lo + len(x)
        if lo < 0 or hi > self._sizes[name]:
            raise DataError(
                f"{where}: rows [{lo}, {hi}) outside the declared [0, {self._sizes[name]})"
            )
        _check_labels(y, self.num_classes, where=where, offset=lo)
        if len(x):
            _write_split_rows(self._file[name], lo, x, y.astype(np.int64, copy=False))
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
    num_classes: int,
    source: str,
    class_names: list[str] | None = None,
) -> None:
    """Write ``splits`` (name -> (x uint8 (N,H,W,C), y int (N,))) atomically to ``path``.

    Everything is validated (shapes, dtypes, labels in ``[0, num_classes)``)
    before the first byte is written; on any error no file (and no temp file)
    is left under the target name, and an existing file there is untouched.
    """
    writer = DatasetWriter(path, num_classes=num_classes, source=source, class_names=class_names)
    if not splits:
        raise DataError(f"writing {path}: no splits given; give at least one (e.g. 'train')")
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shape0: tuple[int, ...] | None = None
    for name, (x, y) in splits.items():
        _check_split_name(name)
        x = np.asarray(x)
        y = np.asarray(y)
        where = f"writing {path}, split {name!r}"
        if x.dtype != np.uint8:
            raise DataError(f"{where}: x must be uint8 pixels 0..{PIXEL_MAX}, got dtype {x.dtype}")
        if x.ndim != 4:
            raise DataError(
                f"{where}: x must have shape (N, H, W, C), got {x.shape}; "
                "add a channel axis for grey images, e.g. x[..., None]"
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{where}: y must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}"
            )
        if len(x) != len(y):
            raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)} labels")
        if shape0 is not None and x.shape[1:] != shape0:
            raise DataError(
                f"{where}: sample shape {x.shape[1:]} differs from the other splits' {shape0}"
            )
        shape0 = x.shape[1:]
        _check_labels(y, writer.num_classes, where=where)
        arrays[name] = (x, y)
    with writer as w:
        for name, (x, y) in arrays.items():
            w.add_split(name, len(x), x.shape[1:])
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
        if version != FORMAT_VERSION:
            raise DataError(
                f"{p} has dataset format_version {version}, "
                f"this mpinewton reads version {FORMAT_VERSION}; "
                "recreate the file with this version or upgrade mpinewton"
            )
        yield f
    finally:
        f.close()


def _available(f: h5py.File) -> list[str]:
    return [k for k, v in f.items() if isinstance(v, h5py.Group)]


def _split(f: h5py.File, path: PathLike, name: str) -> tuple[h5py.Dataset, h5py.Dataset]:
    """Return the (x, y) datasets of split ``name`` after structural checks."""
    g = f.get(name)
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
    if x.ndim < 2 or x.dtype != np.uint8:
        raise DataError(
            f"{where}: x must be (N, H, W, C) uint8, found shape {x.shape} dtype {x.dtype}"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y must be (N,) integers, found shape {y.shape} dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{where}: x has {x.shape[0]} samples but y has {y.shape[0]} labels; recreate the file"
        )
    return x, y


def _str_attr(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset file holds (cheap: metadata only, no pixels read)."""

    path: str
    splits: dict[str, int]
    sample_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None
    dtype: str
    source: str = ""
    format_version: int = FORMAT_VERSION

    def __str__(self) -> str:
        lines = [f"dataset {self.path} (format {FORMAT} v{self.format_version})"]
        for name, n in self.splits.items():
            lines.append(f"  {name:<12} {n:>9,d} samples")
        lines.append(f"  sample shape {self.sample_shape} {self.dtype}, {self.num_classes} classes")
        if self.class_names is not None:
            lines.append(f"  class names  {', '.join(self.class_names)}")
        lines.append(f"  source       {self.source}")
        return "\n".join(lines)


def inspect_dataset(path: PathLike) -> DatasetInfo:
    """Validate a dataset file's structure and describe it; raises DataError naming the problem."""
    with _open(path) as f:
        names = _available(f)
        if not names:
            raise DataError(f"{path}: the dataset has no splits; recreate it")
        splits: dict[str, int] = {}
        shape: tuple[int, ...] | None = None
        dtype = ""
        for name in names:
            x, _ = _split(f, path, name)
            if shape is not None and x.shape[1:] != shape:
                raise DataError(
                    f"{path}: split {name!r} has sample shape {x.shape[1:]}, "
                    f"other splits have {shape}"
                )
            shape, dtype = x.shape[1:], str(x.dtype)
            splits[name] = int(x.shape[0])
        raw_names = f.attrs.get("class_names")
        class_names = None if raw_names is None else tuple(_str_attr(c) for c in raw_names)
        return DatasetInfo(
            path=str(path),
            splits=splits,
            sample_shape=tuple(int(s) for s in shape or ()),
            num_classes=int(f.attrs["num_classes"]),
            class_names=class_names,
            dtype=dtype,
            source=_str_attr(f.attrs.get("source", "")),
            format_version=int(f.attrs["format_version"]),
        )


@dataclass(frozen=True, eq=False)
class Shard:
    """One rank's rows ``[lo, hi)`` of a split (or of several splits concatenated)."""

    x: np.ndarray
    y: np.ndarray
    lo: int
    hi: int
    total: int
    split: str
    path: str

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


def read_shard(
    path: PathLike,
    split: str | Sequence[str],
    rank: int,
    size: int,
    *,
    limit: int | None = None,
    expected_sample_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> Shard:
    """Read only this rank's rows of ``split`` from the dataset at ``path``.

    ``split`` is a name, or several names (a list or ``"train+validation"``)
    concatenated logically in that order.  ``limit`` keeps only the first
    ``limit`` rows of the (concatenated) split before sharding, so
    ``total = min(limit, N)``.  Labels of the rank's rows are checked against
    ``num_classes`` (default: the file's ``num_classes``).
    """
    names = _split_names(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    label = "+".join(names)
    with _open(path) as f:
        parts, sample_shape, ncls, total = _checked_parts(
            f, path, names, expected_sample_shape, num_classes, limit)
        lo, hi = shard_bounds(total, rank, size)
        x = np.empty((hi - lo, *sample_shape), dtype=np.uint8)
        y = np.empty((hi - lo,), dtype=np.int64)
        offset = 0
        for name, x_ds, y_ds in parts:
            n = int(x_ds.shape[0])
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                x[a - lo : b - lo], y[a - lo : b - lo] = _read_checked(
                    path, name, label, ncls, x_ds, y_ds, slice(a - offset, b - offset),
                    f"rows [{a - offset}, {b - offset})",
                    lambda i, a=a, o=offset: (a - o + i, a + i))
            offset += n
    return Shard(x=x, y=y, lo=lo, hi=hi, total=total, split=label, path=str(path))


def _checked_parts(
    f: h5py.File, path: PathLike, names: list[str], expected_sample_shape: tuple[int, ...] | None,
    num_classes: int | None, limit: int | None,
) -> tuple[list[tuple[str, h5py.Dataset, h5py.Dataset]], tuple[int, ...], int, int]:
    """The splits to concatenate: their (name, x, y) datasets, and more.

    Also their common sample shape, the number of classes labels are checked
    against, and the number of rows used (``limit``).
    """
    parts = [(name, *_split(f, path, name)) for name in names]
    sample_shape = tuple(int(s) for s in parts[0][1].shape[1:])
    for name, x_ds, _ in parts[1:]:
        if tuple(x_ds.shape[1:]) != sample_shape:
            raise DataError(
                f"{path}: cannot concatenate split {name!r} "
                f"with sample shape {tuple(x_ds.shape[1:])} "
                f"to split {parts[0][0]!r} with sample shape {sample_shape}"
            )
    if expected_sample_shape is not None and tuple(expected_sample_shape) != sample_shape:
        raise DataError(
            f"{path}, split {'+'.join(names)!r}: samples have shape {sample_shape} but the model "
            f"expects {tuple(expected_sample_shape)}; use a dataset whose images match the model "
            "input"
        )
    ncls = int(f.attrs["num_classes"]) if num_classes is None else int(num_classes)
    n_all = sum(int(x_ds.shape[0]) for _, x_ds, _ in parts)
    return parts, sample_shape, ncls, n_all if limit is None else min(int(limit), n_all)


def _read_checked(
    path: PathLike, name: str, label: str, ncls: int, x_ds: h5py.Dataset, y_ds: h5py.Dataset,
    selection: Any, what: str, where: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``selection`` of one split and check its labels.

    ``what`` describes the rows for an I/O error; ``where(i)`` gives the row in
    the split and the global index of the i-th row read, for a bad label.
    """
    try:
        x, y = x_ds[selection], y_ds[selection]
    except OSError as e:
        raise DataError(f"{path}, split {name!r}: reading {what} failed (corrupt file?): {e}; "
                        "recreate the file") from e
    bad = (y < 0) | (y >= ncls)
    if bad.any():
        i = int(np.argmax(bad))
        row, index = where(i)
        raise DataError(
            f"{path}, split {name!r}: label at row {row} (global index {index} of {label!r}) "
            f"is {int(y[i])}, outside [0, {ncls}); fix the labels or num_classes"
        )
    return x, y


def read_rows(
    path: PathLike,
    split: str | Sequence[str],
    indices: np.ndarray,
    *,
    limit: int | None = None,
    expected_sample_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read the rows ``indices`` (global, sorted, distinct) of ``split`` concatenated.

    For mini-batches (thesis 8.2): a rank reads just its part of each batch,
    so its memory does not grow with the data set. Labels are checked like
    :func:`read_shard`'s.
    """
    names = _split_names(split)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (idx.size > 1 and not np.all(np.diff(idx) > 0)):
        raise ValueError("indices must be a sorted 1-d array of distinct row numbers")
    label = "+".join(names)
    with _open(path) as f:
        parts, sample_shape, ncls, total = _checked_parts(
            f, path, names, expected_sample_shape, num_classes, limit)
        if idx.size and (idx[0] < 0 or idx[-1] >= total):
            raise DataError(f"{path}, split {label!r}: row {int(idx[-1])} requested, but there "
                            f"are {total} rows")
        x = np.empty((idx.size, *sample_shape), dtype=np.uint8)
        y = np.empty((idx.size,), dtype=np.int64)
        offset = 0
        for name, x_ds, y_ds in parts:
            n = int(x_ds.shape[0])
            a, b = np.searchsorted(idx, [offset, offset + n])
            if a < b:
                rows = idx[a:b] - offset
                x[a:b], y[a:b] = _read_checked(
                    path, name, label, ncls, x_ds, y_ds, rows, f"{b - a} rows",
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
