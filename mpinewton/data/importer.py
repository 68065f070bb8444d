"""Import your own arrays into the dataset format: ``python -m mpinewton.data import``.

Sources (see docs/data.md for the rules):

* one ``.npz``: keys ``x``, ``y`` (one split, ``train``), or ``x_<split>``,
  ``y_<split>`` pairs (``x_train``, ``y_train``, ``x_test``, ...; ``val`` and
  ``valid`` mean ``validation``), optionally ``class_names``;
* two ``.npy`` files: samples, then targets (split ``train``);
* one CSV (or TSV) file: one sample per line, the target in one column
  (``--target``, default the last), a header line detected or given.

Targets decide the task unless ``--task`` says: integer labels (for a CSV:
integer-valued numbers, or text labels) give classification, float targets
regression.  ``--validation`` and ``--test`` split seeded random subsets off
``train``; ``--standardize`` standardises every feature with the mean and
std of ``train`` and stores them in the file, ``--standardize-like OTHER.h5``
applies the statistics stored in another file.  The file is written
atomically through :class:`~mpinewton.data.hdf5.DatasetWriter`.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mpinewton.data.hdf5 import (
    TASKS,
    DataError,
    DatasetInfo,
    DatasetWriter,
    Standardization,
    _check_finite,
    _check_split_name,
    inspect_dataset,
    read_standardization,
)
from mpinewton.progress import Progress

__all__ = ["FLOAT_DTYPES", "HEADER_MODES", "import_dataset", "load_csv", "load_source"]

#: Dtypes of float features and regression targets (``--dtype``).
FLOAT_DTYPES = ("float32", "float64")
#: ``--header`` values: detect the header line, or say whether there is one.
HEADER_MODES = ("auto", "yes", "no")
#: Split names of an npz that mean ``validation``.
_ALIASES = {"val": "validation", "valid": "validation"}
#: The usual order of splits in the file (others follow in source order).
_ORDER = ("train", "validation", "test")
#: Bytes of output samples written at once.
_BLOCK_BYTES = 64 << 20

PathLike = str | os.PathLike[str]


@dataclass
class Source:
    """What a source holds: splits of raw (x, y), class names, how the task was decided."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    description: str
    class_names: list[str] | None = None
    #: CSV: the targets are text numbers, so the task comes from their values, not a dtype.
    typeless_targets: bool = False
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- sources


def load_source(
    sources: Sequence[PathLike], *, target: str | int | None = None, delimiter: str | None = None,
    header: str = "auto",
) -> Source:
    """Load ``sources`` (one .npz, two .npy, or one CSV/TSV file) into memory."""
    paths = [Path(s) for s in sources]
    for p in paths:
        if not p.is_file():
            raise DataError(f"import: source {p} does not exist or is not a file")
    kinds = [p.suffix.lower() for p in paths]
    if target is not None and kinds not in ([".csv"], [".tsv"], [".txt"]):
        raise DataError("import: --target applies to CSV sources only")
    if len(paths) == 2 and kinds == [".npy", ".npy"]:
        x, y = (_load_npy(p) for p in paths)
        return Source({"train": (x, y)}, f"{paths[0].name} (x), {paths[1].name} (y)")
    if len(paths) == 1 and kinds[0] == ".npz":
        return _load_npz(paths[0])
    if len(paths) == 1 and kinds[0] in (".csv", ".tsv", ".txt"):
        sep = delimiter if delimiter is not None else "\t" if kinds[0] == ".tsv" else ","
        return load_csv(paths[0], target=target, delimiter=sep, header=header)
    raise DataError(
        f"import: cannot read {' '.join(str(p) for p in paths)}: give one .npz file, two .npy "
        "files (samples, then targets) or one .csv/.tsv file"
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"import: {path} is not a readable .npy array (object arrays are not "
                        f"supported): {e}") from e


def _load_npz(path: Path) -> Source:
    """Splits of an npz: ``x``/``y``, or ``x_<split>``/``y_<split>`` pairs; ``class_names``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise DataError(f"import: {path} is not a readable .npz archive (object arrays are not "
                        f"supported): {e}") from e
    class_names = arrays.pop("class_names", None)
    if "x" in arrays or "y" in arrays:
        rest = sorted(k for k in arrays if k not in ("x", "y"))
        if rest or not ("x" in arrays and "y" in arrays):
            raise DataError(
                f"import: {path} has keys {sorted(arrays)}: use either x and y (one split, "
                "train), or pairs x_<split>, y_<split> (e.g. x_train, y_train, x_test, y_test)"
            )
        splits = {"train": (arrays["x"], arrays["y"])}
    else:
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            kind, _, name = key.partition("_")
            if kind not in ("x", "y") or not name:
                raise DataError(
                    f"import: {path}: key {key!r} is not x, y, x_<split>, y_<split> or "
                    "class_names; rename or remove it"
                )
            name = _ALIASES.get(name, name)
            if kind in pairs.setdefault(name, {}):
                raise DataError(f"import: {path}: two keys for {kind} of split {name!r}")
            pairs[name][kind] = value
        if not pairs:
            raise DataError(f"import: {path} holds no arrays x, y or x_<split>, y_<split>")
        for name, pair in pairs.items():
            if set(pair) != {"x", "y"}:
                missing = "y" if "x" in pair else "x"
                raise DataError(f"import: {path}: split {name!r} has no {missing}_{name} array")
            try:
                _check_split_name(name)
            except DataError as e:
                raise DataError(f"import: {path}: {e}") from e
        splits = {name: (pair["x"], pair["y"]) for name, pair in pairs.items()}
    names = None
    if class_names is not None:
        if class_names.ndim != 1 or class_names.dtype.kind not in "US":
            raise DataError(f"import: {path}: class_names must be a 1-d array of strings")
        names = [str(c) for c in class_names]
    return Source(splits, path.name, class_names=names)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_csv(
    path: PathLike, *, target: str | int | None = None, delimiter: str = ",", header: str = "auto",
) -> Source:
    """A CSV file as split ``train``: numeric feature columns, the target column's values.

    The first line is a header when ``header="yes"``, or with ``"auto"`` when
    one of its fields is not a number while the line below has a number in
    that column (or when it is the only line and holds no number).  The
    target column is ``target`` (a header name, else an index, negative from
    the end; default the last column).  Numeric targets stay text-typed
    (``typeless_targets``): the caller decides the task from their values;
    other targets are class names.
    """
    path = Path(path)
    if header not in HEADER_MODES:
        raise ValueError(f"header must be one of {HEADER_MODES}, got {header!r}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(lineno, row) for lineno, row in enumerate(csv.reader(f, delimiter=delimiter), 1)
                if row and any(s.strip() for s in row)]
    if not rows:
        raise DataError(f"import: {path} holds no data lines")
    first = [s.strip() for s in rows[0][1]]
    if header == "auto":
        below = [s.strip() for s in rows[1][1]] if len(rows) > 1 else None
        has_header = (
            any(not _is_number(a) and _is_number(b) for a, b in zip(first, below, strict=False))
            if below is not None else not any(_is_number(a) for a in first)
        )
    else:
        has_header = header == "yes"
    columns = first if has_header else [str(i) for i in range(len(first))]
    data = rows[1:] if has_header else rows
    width = len(columns)
    if width < 2:
        raise DataError(
            f"import: {path} has {width} column(s) (delimiter {delimiter!r}); it needs at least "
            "one feature and the target (give --delimiter if the columns are not split)"
        )
    if not data:
        raise DataError(f"import: {path} has a header line but no data lines")
    for lineno, row in data:
        if len(row) != width:
            raise DataError(f"import: {path} line {lineno} has {len(row)} fields, the "
                            f"{'header' if has_header else 'first line'} has {width}")
    t = _target_column(path, columns, target, has_header)
    tname = repr(columns[t]) if has_header else str(t)
    feature_cols = [i for i in range(width) if i != t]
    lines = [lineno for lineno, _ in data]
    text = np.array([[s.strip() for s in row] for _, row in data], dtype=str)
    x = _parse_numbers(path, text[:, feature_cols], lines,
                       [columns[i] for i in feature_cols], has_header, "feature")
    finite = np.isfinite(x)
    if not finite.all():  # NaN/Inf: name the line and column, not only the row
        i = int(np.argmax(~finite.all(axis=1)))
        c = feature_cols[int(np.argmax(~finite[i]))]
        name = repr(columns[c]) if has_header else str(c)
        raise DataError(f"import: {path} line {lines[i]}, column {name}: {str(text[i, c])!r} "
                        "is not a finite number; remove the line or impute the value")
    raw = text[:, t]
    what = f"{path.name} (CSV, target column {tname})"
    empty = np.flatnonzero(raw == "")
    if empty.size:
        raise DataError(f"import: {path} line {lines[empty[0]]}, target column {tname}: empty "
                        "value; remove the line or fill it in")
    try:
        y = raw.astype(np.float64)
    except ValueError:
        y = None
    if y is not None:
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise DataError(f"import: {path} line {lines[bad[0]]}, target column {tname}: "
                            f"{str(raw[bad[0]])!r} is not a finite number; remove the line")
        return Source({"train": (x, y)}, what, typeless_targets=True)
    names = sorted(set(raw.tolist()))
    labels = np.searchsorted(np.array(names), raw).astype(np.int64)
    note = f"text targets: {len(names)} classes named by their sorted values"
    return Source({"train": (x, labels)}, what, class_names=names, notes=[note])


def _target_column(path: Path, columns: list[str], target: str | int | None,
                   has_header: bool) -> int:
    width = len(columns)
    if target is None:
        return width - 1
    if has_header and str(target) in columns:
        return columns.index(str(target))
    try:
        index = int(target)
    except ValueError:
        known = ", ".join(columns) if has_header else "(no header line: give an index)"
        raise DataError(f"import: {path} has no column {target!r}; columns: {known}") from None
    if not -width <= index < width:
        raise DataError(f"import: {path}: target column {index} out of range for {width} columns")
    return index % width


def _parse_numbers(path: Path, text: np.ndarray, lines: list[int], names: list[str],
                   has_header: bool, what: str) -> np.ndarray:
    """Text cells as float64; a bad cell is a DataError naming its line and column."""
    try:
        return text.astype(np.float64)
    except ValueError:
        pass
    for i, row in enumerate(text):
        for j, cell in enumerate(row):
            if not _is_number(cell):
                col = repr(names[j]) if has_header else names[j]
                problem = "empty value" if cell == "" else f"{str(cell)!r} is not a number"
                raise DataError(
                    f"import: {path} line {lines[i]}, column {col}: {problem}; every {what} "
                    "column must be numeric (encode categories as numbers, fill or drop missing "
                    "values)"
                )
    raise AssertionError("unreachable: a cell failed to parse")  # pragma: no cover


# --------------------------------------------------------------------------- conversion


def _decide_task(src: Source, task: str | None) -> str:
    if task is not None:
        return task
    ys = [y for _, y in src.splits.values()]
    if src.class_names is not None and not src.typeless_targets:
        return "classification"
    if src.typeless_targets:
        integral = all(np.array_equal(y, np.round(y)) for y in ys)
        return "classification" if integral else "regression"
    kinds = {y.dtype.kind for y in ys}
    if kinds <= {"i", "u", "b"}:
        return "classification"
    if kinds <= {"f"}:
        return "regression"
    raise DataError(
        f"import: {src.description}: targets of dtype {', '.join(str(y.dtype) for y in ys)}; "
        "give integer class labels or float targets (or --task)"
    )


def _labels(src: Source, name: str, y: np.ndarray) -> np.ndarray:
    """Class labels (int64) from integer, bool or integer-valued float targets."""
    where = f"import: {src.description}, split {name!r}"
    if y.ndim != 1:
        raise DataError(f"{where}: class labels must have shape (N,), got {y.shape}")
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind != "f":
        raise DataError(f"{where}: targets of dtype {y.dtype} cannot be class labels")
    _check_finite(y, "y", where)
    bad = np.flatnonzero(y != np.round(y))
    if bad.size:
        raise DataError(f"{where}: target at row {bad[0]} is {float(y[bad[0]])!r}, not an "
                        "integer class label; use --task regression for real-valued targets")
    return y.astype(np.int64)


def _targets(src: Source, name: str, y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    where = f"import: {src.description}, split {name!r}"
    if src.class_names is not None and not src.typeless_targets:
        raise DataError(f"{where}: the targets are class names (text); regression needs numbers")
    if y.dtype.kind not in "iubf":
        raise DataError(f"{where}: targets of dtype {y.dtype} are not numbers")
    if y.ndim not in (1, 2):
        raise DataError(f"{where}: targets must have shape (N,) or (N, k), got {y.shape}")
    _check_finite(y, "y", where)
    with np.errstate(over="ignore"):  # the writer names a row that overflowed
        return y.astype(dtype)


def _split_off(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], fractions: dict[str, float], seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Move seeded random subsets of ``train`` into new splits (rows keep their order)."""
    wanted = {k: f for k, f in fractions.items() if f}
    if not wanted:
        return splits
    for name, f in wanted.items():
        if not 0 < f < 1:
            raise DataError(f"import: --{name} must be a fraction in (0, 1), got {f}")
        if name in splits:
            raise DataError(f"import: the source already has a {name!r} split; "
                            f"leave out --{name}")
    if "train" not in splits:
        raise DataError(f"import: --{' and --'.join(wanted)} split rows off 'train', but the "
                        f"source has no 'train' split (splits: {', '.join(splits)})")
    x, y = splits["train"]
    n = len(x)
    counts = {k: int(round(f * n)) for k, f in wanted.items()}
    if sum(wanted.values()) >= 1 or sum(counts.values()) >= n or min(counts.values()) < 1:
        detail = ", ".join(f"{k} {c}" for k, c in counts.items())
        raise DataError(f"import: cannot split {n} training rows into {detail} and a non-empty "
                        "train split; change the fractions")
    perm = np.random.default_rng(seed).permutation(n)
    out = {k: v for k, v in splits.items() if k != "train"}
    start = 0
    taken: dict[str, np.ndarray] = {}
    for name in ("test", "validation"):
        if name in counts:
            taken[name] = np.sort(perm[start : start + counts[name]])
            start += counts[name]
    keep = np.sort(perm[start:])
    out["train"] = (x[keep], y[keep])
    for name, idx in taken.items():
        out[name] = (x[idx], y[idx])
    return out


def _ordered(splits: dict[str, Any]) -> dict[str, Any]:
    known = [k for k in _ORDER if k in splits]
    return {k: splits[k] for k in known + [k for k in splits if k not in _ORDER]}


def import_dataset(
    sources: Sequence[PathLike],
    out: PathLike,
    *,
    target: str | int | None = None,
    task: str | None = None,
    validation: float | None = None,
    test: float | None = None,
    seed: int = 0,
    standardize: bool = False,
    standardize_like: PathLike | None = None,
    dtype: str = "float32",
    delimiter: str | None = None,
    header: str = "auto",
    num_classes: int | None = None,
    force: bool = False,
    compression: str | None = "gzip",
    progress: bool = True,
    stream: TextIO | None = None,
) -> DatasetInfo:
    """Import ``sources`` into the dataset file ``out``; return its description.

    See the module docstring and docs/data.md. ``progress`` prints progress
    lines on ``stream`` (default stderr).
    """
    out = Path(out)
    if task is not None and task not in TASKS:
        raise DataError(f"import: --task must be classification or regression, got {task!r}")
    if dtype not in FLOAT_DTYPES:
        raise DataError(f"import: --dtype must be float32 or float64, got {dtype!r}")
    if standardize and standardize_like is not None:
        raise DataError("import: give --standardize or --standardize-like, not both")
    if any(out.resolve() == Path(s).resolve() for s in sources):
        raise DataError(f"import: --out {out} is a source file; choose another name")
    if out.exists() and not force:
        raise DataError(f"import: {out} exists; pass --force to replace it")
    stream = sys.stderr if stream is None else stream
    src = load_source(sources, target=target, delimiter=delimiter, header=header)
    for note in src.notes:
        if progress:
            print(f"import: {note}", file=stream)
    auto = task is None
    task = _decide_task(src, task)
    if auto and src.typeless_targets and progress:
        print("import: integer-valued targets, so classification (--task regression for a "
              "numeric target)" if task == "classification" else
              "import: real-valued targets, so regression", file=stream)
    fdtype = np.dtype(dtype)
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (x, y) in src.splits.items():
        x, y = np.asarray(x), np.asarray(y)
        where = f"import: {src.description}, split {name!r}"
        if len(x) != len(y):
            raise DataError(f"{where}: x has {len(x)} rows but y has {len(y)}")
        if x.dtype.kind not in "iubf":
            raise DataError(f"{where}: samples of dtype {x.dtype} are not numbers")
        if x.ndim < 2:
            raise DataError(f"{where}: x must have shape (N, *sample_shape), got {x.shape}; "
                            "for one feature per sample use x[:, None]")
        if x.dtype.kind == "f":
            _check_finite(x, "x", where)
        if x.dtype != np.uint8:
            with np.errstate(over="ignore"):  # the writer names a row that overflowed
                x = x.astype(fdtype)
        y = _labels(src, name, y) if task == "classification" else _targets(src, name, y, fdtype)
        splits[name] = (x, y)
    splits = _ordered(_split_off(splits, {"validation": validation or 0.0, "test": test or 0.0},
                                 seed))
    stats: Standardization | None = None
    if standardize:
        if "train" not in splits:
            raise DataError(f"import: --standardize uses the 'train' split, but the source has "
                            f"none (splits: {', '.join(splits)})")
        stats = Standardization.compute(splits["train"][0], computed_on="train")
    elif standardize_like is not None:
        stats = read_standardization(standardize_like)
        if stats is None:
            raise DataError(f"import: {standardize_like} holds no standardisation statistics "
                            "(it was not imported with --standardize)")
        shape = next(iter(splits.values()))[0].shape[1:]
        if stats.shape != shape:
            raise DataError(f"import: {standardize_like} has statistics for samples of shape "
                            f"{stats.shape}, the source's samples have shape {shape}")
    classes = None
    class_names = src.class_names
    if task == "classification":
        top = max((int(y.max()) for _, y in splits.values() if y.size), default=-1)
        low = min((int(y.min()) for _, y in splits.values() if y.size), default=0)
        if low < 0:
            raise DataError(f"import: {src.description}: class label {low} is negative; labels "
                            "must be 0, 1, ..., num_classes - 1")
        classes = num_classes or (len(class_names) if class_names else top + 1)
        if class_names is not None and len(class_names) != classes:
            raise DataError(f"import: {src.description}: {len(class_names)} class names for "
                            f"{classes} classes")
    elif num_classes is not None:
        raise DataError("import: --num-classes applies to classification only")
    source = f"import of {src.description}: {task}" + (", standardised" if stats else "")
    _write(out, splits, classes, class_names, task, stats, fdtype, source, compression,
           Progress(sum(len(x) for x, _ in splits.values()), "import", stream=stream,
                    enabled=progress))
    return inspect_dataset(out)


def _write(
    out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int | None,
    class_names: list[str] | None, task: str, stats: Standardization | None, fdtype: np.dtype,
    source: str, compression: str | None, progress: Progress,
) -> None:
    """Write the splits block by block (standardising each block), with progress lines."""
    with progress, DatasetWriter(out, num_classes=num_classes, source=source,
                                 class_names=class_names, compression=compression, task=task,
                                 stats=stats) as writer:
        for name, (x, y) in splits.items():
            x_dtype = fdtype if stats is not None else x.dtype
            writer.add_split(name, len(x), x.shape[1:], x_dtype=x_dtype,
                             y_dtype=y.dtype, target_shape=y.shape[1:])
            rows = max(1, _BLOCK_BYTES // max(1, int(np.prod(x.shape[1:])) * 8))
            for lo in range(0, len(x), rows):
                xb = x[lo : lo + rows]
                if stats is not None:
                    xb = stats.apply(xb, fdtype)
                writer.write_rows(name, lo, xb, y[lo : lo + rows])
                progress.update(len(xb))
