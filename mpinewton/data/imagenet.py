"""Convert an ImageNet-style class-per-folder tree to the mpinewton HDF5 format with OpenCV.

Thesis section 10.2 trained on ImageNet images resized to 224 x 224 RGB with
``cv2.resize``; this module makes that dataset file::

    python -m mpinewton.data imagenet --src ILSVRC/Data/CLS-LOC --out data/imagenet224.h5
    mpirun -n 28 python -m mpinewton.data imagenet --src ... --out ...   # ranks share the work

The source tree is scanned once (on rank 0) into a deterministic list of
files: the splits in order (``train``, then ``validation``), within a split
the classes in class-list order and the files sorted by name (a validation
split from a labels file: all files sorted by name).  Rank ``r`` of ``N``
decodes the contiguous block :func:`~mpinewton.data.hdf5.shard_bounds` of that
list into a temporary ``.npy`` part next to the output; rank 0 then streams
the readable images, in list order, through
:class:`~mpinewton.data.hdf5.DatasetWriter` in blocks whose size depends only
on the data, so the file holds the same arrays and attributes whatever ``N``.

A file that cannot be read is skipped and listed (path relative to the tree
root, and the reason) in ``<out>.manifest.json`` and in the root dataset
``/skipped`` of the output; too many of them (``max_bad_fraction``), a class
folder without a readable image or an inconsistent tree or labels file is a
:class:`~mpinewton.data.hdf5.DataError`, and then nothing is written under
the output name.  See ``docs/data.md`` for the rules.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from mpinewton.comm import Comm, DistributedError
from mpinewton.data.hdf5 import _CHUNK_BYTES, DataError, DatasetWriter, shard_bounds
from mpinewton.durable import atomic_open
from mpinewton.progress import Progress

__all__ = [
    "COMPRESSIONS",
    "RESIZE_MODES",
    "ConversionReport",
    "ImageReadError",
    "ImageTree",
    "convert_imagenet",
    "decode_image",
    "manifest_path",
    "read_manifest",
    "scan_image_tree",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``stretch``: the whole image to size x size (aspect not kept, the thesis' cv2.resize);
#: ``shorter``: the shorter side to size (aspect kept), then the centre size x size crop.
RESIZE_MODES = ("stretch", "shorter")
CROP_MODES = ("center",)
#: HDF5 filter of the pixels: gzip (the format's default) or none, which makes rank 0's
#: write many times faster at a cost in disk space (decoded photos compress little).
COMPRESSIONS = ("gzip", "none")
MANIFEST_FORMAT = "mpinewton-imagenet-manifest"
MANIFEST_VERSION = 1
#: Folder names of the validation split in the ILSVRC layout (the first one present is used).
VAL_FOLDERS = ("val", "validation")

#: Image formats recognised by their first bytes (for the JPEG end check and the manifest).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_EXTENSIONS = {
    ".jpeg": "JPEG", ".jpg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".gif": "GIF",
    ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
}  # fmt: skip
#: Bytes read from a JPEG's end to look for the end-of-image marker FF D9.
_TAIL_BYTES = 64 << 10
#: Bytes of images rank 0 copies from the parts into the output at once.
_BLOCK_BYTES = 64 << 20
#: Seconds between progress lines on rank 0.
_PROGRESS_SECONDS = 10.0

PathLike = str | os.PathLike[str]


class ImageReadError(ValueError):
    """One image file cannot be used; ``reason`` says why (it goes into the manifest)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- decoding


def _cv2() -> Any:
    """OpenCV, imported on first use (``import mpinewton.data`` must not load it)."""
    import cv2

    return cv2


def _sniff(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None if not recognised."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def _check_file(path: Path, accept_truncated: bool) -> str | None:
    """Read a file's head (and a JPEG's tail); return a note if the content differs from the name.

    Raises :class:`ImageReadError` for an unopenable or empty file, and for a
    JPEG whose last non-zero bytes are not the end-of-image marker ``FF D9``
    (truncated: OpenCV would decode it partially and fill the rest with grey)
    unless ``accept_truncated``.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            if not head:
                raise ImageReadError("empty file")
            kind = _sniff(head)
            if kind == "JPEG" and not accept_truncated:
                f.seek(max(0, size - _TAIL_BYTES))
                if not f.read().rstrip(b"\x00").endswith(b"\xff\xd9"):
                    raise ImageReadError(
                        "truncated JPEG: the file does not end with the end-of-image marker FF D9"
                    )
    except OSError as e:
        raise ImageReadError(f"cannot read the file: {e.strerror or e}") from e
    named = _EXTENSIONS.get(path.suffix.lower())
    if kind is not None and named is not None and kind != named:
        return f"{kind} content in a {path.suffix} file; decoded by content"
    return None


def _fit(image: np.ndarray, size: int, resize: str) -> np.ndarray:
    """Resize a BGR image to ``size`` x ``size`` (see :data:`RESIZE_MODES`) and make it RGB."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    if resize == "shorter":  # exact integer rounding: the shorter side becomes exactly `size`
        nh, nw = (size, (w * size + h // 2) // h) if h <= w else ((h * size + w // 2) // w, size)
        nh, nw = max(nh, size), max(nw, size)
    else:
        nh, nw = size, size
    if (nh, nw) != (h, w):
        shrink = nh <= h and nw <= w
        flag = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        image = cv2.resize(image, (nw, nh), interpolation=flag)  # dsize is (width, height)
    if resize == "shorter":
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[top : top + size, left : left + size]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_image(
    path: PathLike, size: int, *, resize: str = "stretch", accept_truncated: bool = False
) -> tuple[np.ndarray, str | None]:
    """Read one image with OpenCV as ``(size, size, 3)`` uint8 RGB; also return a note or None.

    ``cv2.imread(path, cv2.IMREAD_COLOR)`` decodes by content (a PNG named
    ``.JPEG`` works, and gets a note), makes grey images 3-channel, converts
    CMYK JPEGs and applies the EXIF orientation.  Raises
    :class:`ImageReadError` with the reason when the file is unusable.
    """
    path = Path(path)
    note = _check_file(path, accept_truncated)
    cv2 = _cv2()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageReadError("OpenCV cannot decode it (not an image, corrupt or unsupported)")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageReadError(f"OpenCV returned shape {image.shape} {image.dtype}, not BGR uint8")
    return _fit(image, size, resize), note


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's (and libjpeg's) warnings on stderr; the manifest records problems."""
    logging_ = _cv2().utils.logging
    old = logging_.getLogLevel()
    logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging_.setLogLevel(old)


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class ImageTree:
    """A scanned class-per-folder tree: the classes and, per split, its files in order."""

    root: Path
    layout: str  # "ilsvrc": root/train/<class>/ (+ root/val/); "classes": root/<class>/
    class_names: tuple[str, ...]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(path relative to root, label)]
    by_folder: frozenset[str]  # splits labelled by class folders (checked per folder)
    notes: tuple[str, ...] = ()  # what was ignored, for the log and the manifest

    @property
    def num_files(self) -> int:
        return sum(len(items) for items in self.splits.values())


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """Sorted names of the (non-hidden) sub-folders and files of ``folder``."""
    dirs: list[str] = []
    files: list[str] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    dirs.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
    except OSError as e:
        raise DataError(f"imagenet: cannot list folder {folder}: {e.strerror or e}") from e
    return sorted(dirs), sorted(files)


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Numbered, stripped, non-empty, non-comment lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"imagenet: cannot read the {what} {path}: {e}") from e
    lines = [(i, s.strip()) for i, s in enumerate(text.splitlines(), 1)]
    return [(i, s) for i, s in lines if s and not s.startswith("#")]


def _read_classes(path: Path, folders: list[str], train_dir: Path) -> list[str]:
    """The class order of a ``--classes`` file (first token per line; the rest is ignored)."""
    classes: list[str] = []
    seen: dict[str, int] = {}
    known = set(folders)
    for lineno, line in _read_lines(path, "class list"):
        synset = line.split()[0]
        if synset in seen:
            raise DataError(
                f"imagenet: {path}, line {lineno}: class {synset!r} repeats line {seen[synset]}"
            )
        if synset not in known:
            raise DataError(
                f"imagenet: {path}, line {lineno}: class {synset!r} has no folder "
                f"{train_dir / synset}"
            )
        seen[synset] = lineno
        classes.append(synset)
    if not classes:
        raise DataError(f"imagenet: the class list {path} names no class (one synset per line)")
    return classes


def _folder_split(
    split_dir: Path, root: Path, label_of: dict[str, int], known: set[str], what: str
) -> tuple[list[tuple[str, int]], list[str]]:
    """Items of a split given by class folders, in class order then file name order."""
    dirs, _ = _entries(split_dir)
    if not dirs:
        raise DataError(
            f"imagenet: {what} folder {split_dir} holds no class folders "
            f"(expected {split_dir}/<synset>/<image>)"
        )
    notes: list[str] = []
    by_label: list[tuple[int, str]] = []
    excluded = 0
    for name in dirs:
        if name not in known:
            raise DataError(
                f"imagenet: {what} folder {split_dir / name} is not a class "
                "(no folder of that name among the training classes)"
            )
        if name in label_of:
            by_label.append((label_of[name], name))
        else:
            excluded += 1
    if excluded:
        notes.append(f"{excluded} {what} class folder(s) in {split_dir} not in the class list")
    items: list[tuple[str, int]] = []
    for label, name in sorted(by_label):
        folder = split_dir / name
        _, files = _entries(folder)
        if not files:
            raise DataError(f"imagenet: class folder {folder} holds no files")
        rel = folder.relative_to(root).as_posix()
        items.extend((f"{rel}/{f}", label) for f in files)
    return items, notes


def _parse_labels(path: Path) -> list[tuple[int, str, str]]:
    """``(line, file name, synset)`` of a labels file: ``<file> <synset>`` lines or the CSV.

    The CSV form is ILSVRC's ``LOC_val_solution.csv``: a header
    ``ImageId,PredictionString`` and rows whose first prediction token is the
    synset (boxes follow and are ignored).
    """
    lines = _read_lines(path, "labels file")
    if not lines:
        raise DataError(f"imagenet: the labels file {path} is empty")
    csv = lines[0][1].replace(" ", "").lower().startswith("imageid,")
    entries: list[tuple[int, str, str]] = []
    for lineno, line in lines[1:] if csv else lines:
        if csv:
            name, _, prediction = line.partition(",")
            tokens = [name.strip(), *prediction.split()[:1]]
        else:
            tokens = line.split()
        if len(tokens) != 2 or not tokens[0] or (not csv and len(line.split()) != 2):
            form = "ImageId,<synset> ..." if csv else "<file name> <synset>"
            raise DataError(f"imagenet: {path}, line {lineno}: expected {form!r}, got {line!r}")
        entries.append((lineno, tokens[0], tokens[1]))
    return entries


def _labels_split(
    val_dir: Path, root: Path, labels: Path, label_of: dict[str, int], known: set[str],
    train_dir: Path,
) -> tuple[list[tuple[str, int]], list[str]]:  # fmt: skip
    """Items of a flat validation folder labelled by a labels file, sorted by file name."""
    dirs, files = _entries(val_dir)
    if not files:
        hint = "; it holds class folders: drop --val-labels" if dirs else ""
        raise DataError(f"imagenet: validation folder {val_dir} holds no image files{hint}")
    by_stem: dict[str, list[str]] = {}
    for name in files:
        by_stem.setdefault(Path(name).stem, []).append(name)
    present = set(files)
    chosen: dict[str, tuple[int, int]] = {}  # file name -> (label, line)
    excluded = 0
    for lineno, name, synset in _parse_labels(labels):
        if synset not in known:
            raise DataError(
                f"imagenet: {labels}, line {lineno}: unknown synset {synset!r} "
                f"(no class folder {train_dir / synset})"
            )
        if name not in present and len(by_stem.get(name, [])) > 1:
            raise DataError(
                f"imagenet: {labels}, line {lineno}: {name!r} matches several files in "
                f"{val_dir}: {', '.join(by_stem[name])}"
            )
        if name not in present and name in by_stem:
            name = by_stem[name][0]  # an ImageId without extension names <id>.<ext>
        if name in chosen:
            raise DataError(
                f"imagenet: {labels}, line {lineno}: {name!r} was already labelled on line "
                f"{chosen[name][1]}"
            )
        if synset not in label_of:
            excluded += 1
            chosen[name] = (-1, lineno)
            continue
        chosen[name] = (label_of[synset], lineno)
    notes = []
    if excluded:
        notes.append(f"{excluded} validation file(s) of classes not in the class list")
    unlabelled = len(present - set(chosen))
    if unlabelled:
        notes.append(f"{unlabelled} file(s) in {val_dir} not named in {labels} (ignored)")
    rel = val_dir.relative_to(root).as_posix()
    # A listed file that does not exist stays in the list: reading it fails and it is skipped.
    items = [(f"{rel}/{name}", lab) for name, (lab, _) in sorted(chosen.items()) if lab >= 0]
    return items, notes


def scan_image_tree(
    src: PathLike, *, classes_file: PathLike | None = None, val_labels: PathLike | None = None
) -> ImageTree:
    """Scan a class-per-folder tree (cheap: names only, no image is opened).

    ILSVRC layout when ``src/train`` exists: classes = its folders, the
    ``validation`` split from ``src/val`` (class folders, or a flat folder with
    ``val_labels``).  Otherwise ``src`` itself holds the class folders and
    there is only ``train``.  ``classes_file`` fixes the order and may select
    a subset; by default the classes are the sorted folder names.
    """
    root = Path(src)
    if not root.exists():
        raise DataError(
            f"imagenet: source folder {root} does not exist; give the tree root with --src"
        )
    if not root.is_dir():
        raise DataError(f"imagenet: source {root} is not a folder; give the tree root with --src")
    val_dirs = [root / v for v in VAL_FOLDERS if (root / v).is_dir()]
    if (root / "train").is_dir():
        layout, train_dir = "ilsvrc", root / "train"
    elif val_dirs:
        raise DataError(f"imagenet: {root} has {val_dirs[0].name}/ but no train/ folder")
    else:
        layout, train_dir = "classes", root
        if val_labels is not None:
            raise DataError(
                f"imagenet: --val-labels needs the layout {root}/train/<synset>/ with a flat "
                f"{root}/val/; {root}/train does not exist"
            )
    folders, _ = _entries(train_dir)
    if not folders:
        raise DataError(
            f"imagenet: {train_dir} holds no class folders "
            f"(expected {train_dir}/<synset>/<image>); is --src the tree root?"
        )
    known = set(folders)
    if classes_file is not None:
        classes = _read_classes(Path(classes_file), folders, train_dir)
    else:
        classes = folders
    label_of = {name: i for i, name in enumerate(classes)}
    notes: list[str] = []
    if len(classes) < len(folders):
        notes.append(f"{len(folders) - len(classes)} class folder(s) of {train_dir} not in "
                     f"the class list {classes_file}")
    splits: dict[str, list[tuple[str, int]]] = {}
    items: list[tuple[str, int]] = []
    for name in classes:
        folder = train_dir / name
        _, files = _entries(folder)
        if not files:
            raise DataError(f"imagenet: class folder {folder} holds no files")
        rel = folder.relative_to(root).as_posix()
        items.extend((f"{rel}/{f}", label_of[name]) for f in files)
    splits["train"] = items
    by_folder = {"train"}
    if len(val_dirs) > 1:
        raise DataError(f"imagenet: {root} has both val/ and validation/; keep one")
    if layout == "ilsvrc" and val_labels is not None:
        if not val_dirs:
            raise DataError(f"imagenet: --val-labels given but there is no folder {root / 'val'}")
        val, more = _labels_split(val_dirs[0], root, Path(val_labels), label_of, known, train_dir)
        notes.extend(more)
    elif val_dirs:
        val, more = _folder_split(val_dirs[0], root, label_of, known, "validation")
        notes.extend(more)
        by_folder.add("validation")
    else:
        val = []
    if val:
        splits["validation"] = val
    return ImageTree(root=root, layout=layout, class_names=tuple(classes), splits=splits,
                     by_folder=frozenset(by_folder), notes=tuple(notes))


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did: images per split, skipped files, time (the same on every rank)."""

    out: str
    manifest: str
    splits: dict[str, int]  # images written per split
    files: int  # files tried
    skipped: list[dict[str, str]] = field(default_factory=list)  # split, path, reason
    converted: list[dict[str, str]] = field(default_factory=list)  # split, path, note
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # scan, decode, write seconds
    ranks: int = 1

    @property
    def images_per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        counts = ", ".join(f"{name} {n:,d}" for name, n in self.splits.items())
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        return "\n".join([
            f"wrote {self.out}: {counts} images",
            f"  skipped {len(self.skipped):,d} unreadable file(s), {len(self.converted):,d} "
            f"decoded by content; list in {self.manifest}",
            f"  {self.seconds:.1f} s ({phases}), {self.images_per_second:,.0f} images/s "
            f"on {self.ranks} rank(s)",
        ])  # fmt: skip


def manifest_path(out: PathLike) -> Path:
    """Where the manifest of the dataset file ``out`` lives: ``<out>.manifest.json``."""
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")


def read_manifest(out: PathLike) -> dict[str, Any]:
    """Load the manifest written next to the dataset file ``out``."""
    path = manifest_path(out)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the manifest {path}: {e}") from e


def _write_json_atomic(path: Path, data: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------- MPI helpers


def _agreed(comm: Comm, step: Callable[[], T], what: str) -> T:
    """:meth:`Comm.run_agreed`, raising the rank's own error where it failed, else DataError."""
    own: list[Exception] = []

    def guarded() -> T:
        try:
            return step()
        except Exception as e:
            own.append(e)
            raise

    try:
        return comm.run_agreed(guarded, what)
    except DistributedError as e:
        if own:
            raise own[0] from None
        raise DataError(str(e)) from e


def _progress(what: str, total: int, enabled: bool) -> Progress:
    """Progress lines (images done / total, time, eta) on stderr, where logging shows INFO.

    So they appear under the CLI on rank 0, not with ``--quiet`` nor in library use.
    """
    return Progress(total, what, min_interval=_PROGRESS_SECONDS, unit="images",
                    enabled=enabled and log.isEnabledFor(logging.INFO))


# --------------------------------------------------------------------------- conversion


class _Writer(DatasetWriter):
    """A DatasetWriter that also stores string tables as root datasets (not splits)."""

    def add_table(self, name: str, rows: Sequence[Sequence[str]], columns: Sequence[str]) -> None:
        if self._file is None:
            raise RuntimeError("add_table called outside the writer's `with` block")
        data = np.array([list(r) for r in rows], dtype=object).reshape(len(rows), len(columns))
        ds = self._file.create_dataset(name, data=data.astype(h5py.string_dtype()),
                                       dtype=h5py.string_dtype())
        ds.attrs["columns"] = np.array(list(columns), dtype=h5py.string_dtype())


class _Blocks:
    """Rebatch rows into fixed-size ``write_rows`` calls (the same calls for any rank count)."""

    def __init__(self, writer: DatasetWriter, split: str, rows: int, shape: tuple[int, ...]):
        self.writer, self.split, self.rows = writer, split, rows
        self.x = np.empty((rows, *shape), dtype=np.uint8)
        self.y = np.empty((rows,), dtype=np.int64)
        self.fill = 0
        self.written = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        i = 0
        while i < len(x):
            k = min(len(x) - i, self.rows - self.fill)
            self.x[self.fill : self.fill + k] = x[i : i + k]
            self.y[self.fill : self.fill + k] = y[i : i + k]
            self.fill += k
            i += k
            if self.fill == self.rows:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            self.writer.write_rows(self.split, self.written, self.x[: self.fill],
                                   self.y[: self.fill])
            self.written += self.fill
            self.fill = 0


def _block_rows(n: int, sample_bytes: int) -> int:
    """Rows per write: a whole number of the writer's HDF5 chunks, about _BLOCK_BYTES."""
    chunk = max(1, min(n, _CHUNK_BYTES // sample_bytes))
    return chunk * max(1, _BLOCK_BYTES // (chunk * sample_bytes))


def _part_path(out: Path, token: str, rank: int) -> Path:
    return out.with_name(f".{out.name}.{token}.part{rank}.npy")


def _decode_block(
    root: Path, paths: list[str], part: Path, size: int, resize: str, accept_truncated: bool,
    progress: Progress,
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:  # fmt: skip
    """Decode this rank's files into the part ``part``; (local index, reason / note) lists."""
    bad: list[tuple[int, str]] = []
    notes: list[tuple[int, str]] = []
    if not paths:
        return bad, notes
    rows = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8,
                                     shape=(len(paths), size, size, 3))
    try:
        for i, rel in enumerate(paths):
            try:
                rows[i], note = decode_image(root / rel, size, resize=resize,
                                             accept_truncated=accept_truncated)
            except ImageReadError as e:
                bad.append((i, e.reason))
                progress.update(1)
                continue
            if note is not None:
                notes.append((i, note))
            progress.update(1)
        progress.close()
        rows.flush()
    finally:
        del rows
    return bad, notes


def _check_results(
    tree: ImageTree, items: list[tuple[str, str, int]], good: np.ndarray,
    reasons: dict[int, str], max_bad_fraction: float, out: Path,
) -> None:  # fmt: skip
    """Raise DataError for a class folder without a readable image or too many bad files."""
    empty: dict[str, list[int]] = {}
    ok: set[str] = set()
    for g, (split, rel, _) in enumerate(items):
        if split not in tree.by_folder:
            continue
        folder = rel.rsplit("/", 1)[0]
        if good[g]:
            ok.add(folder)
        else:
            empty.setdefault(folder, []).append(g)
    empty = {k: v for k, v in empty.items() if k not in ok}
    if empty:
        folder, idx = next(iter(empty.items()))
        more = f" (and {len(empty) - 1} more such folder(s))" if len(empty) > 1 else ""
        raise DataError(
            f"imagenet: class folder {tree.root / folder} has no readable image: all {len(idx)} "
            f"file(s) skipped, e.g. {items[idx[0]][1]}: {reasons[idx[0]]}{more}; "
            f"fix or remove it (nothing was written to {out})"
        )
    n_bad = len(reasons)
    if n_bad > max_bad_fraction * len(items):
        first = "; ".join(f"{tree.root / items[g][1]}: {r}" for g, r in sorted(reasons.items())[:5])
        raise DataError(
            f"imagenet: {n_bad:,d} of {len(items):,d} files ({100 * n_bad / len(items):.2f}%) "
            f"could not be read, more than max_bad_fraction={max_bad_fraction:g} "
            f"(--max-bad-fraction) allows; first: {first}; nothing was written to {out}. "
            "Fix or remove these files, or raise --max-bad-fraction to skip them"
        )


def _merge(
    out: Path, tree: ImageTree, items: list[tuple[str, str, int]], good: np.ndarray,
    bounds: list[tuple[int, int]], parts: list[Path], size: int, source: str,
    skipped: list[dict[str, str]], converted: list[dict[str, str]], compression: str,
) -> dict[str, int]:  # fmt: skip
    """Rank 0: stream the readable rows of every part, in list order, into ``out``."""
    for r, (lo, hi) in enumerate(bounds):
        if hi > lo and not parts[r].exists():
            raise DataError(
                f"imagenet: the part {parts[r]} of rank {r} is not visible on rank 0; the folder "
                f"of the output ({out.parent}) must be on a file system shared by all ranks"
            )
    labels = np.array([label for _, _, label in items], dtype=np.int64)
    shape = (size, size, 3)
    counts: dict[str, int] = {}
    progress = _progress("write", int(good.sum()), enabled=True)
    with _Writer(out, num_classes=len(tree.class_names), source=source,
                 class_names=list(tree.class_names),
                 compression=None if compression == "none" else compression) as writer:
        writer.add_table("skipped", [(s["split"], s["path"], s["reason"]) for s in skipped],
                         ("split", "path", "reason"))
        writer.add_table("converted", [(c["split"], c["path"], c["note"]) for c in converted],
                         ("split", "path", "note"))
        a = 0
        for split, split_items in tree.splits.items():
            b = a + len(split_items)
            n_good = int(good[a:b].sum())
            counts[split] = n_good
            writer.add_split(split, n_good, shape)
            rows = _block_rows(max(n_good, 1), int(np.prod(shape)))
            blocks = _Blocks(writer, split, rows, shape)
            for r, (lo, hi) in enumerate(bounds):
                s, e = max(a, lo), min(b, hi)
                if s >= e:
                    continue
                part = np.load(parts[r], mmap_mode="r")
                for start in range(s, e, rows):
                    stop = min(e, start + rows)
                    mask = good[start:stop]
                    blocks.add(part[start - lo : stop - lo][mask], labels[start:stop][mask])
                    progress.update(int(mask.sum()))
                del part
            blocks.flush()
            a = b
    progress.close()
    return counts


def _source(tree: ImageTree, size: int, resize: str, val_labels: PathLike | None) -> str:
    how = ("shorter side to {s}, centre {s}x{s} crop" if resize == "shorter"
           else "cv2.resize to {s}x{s}").format(s=size)
    labels = f", validation labels {Path(val_labels).name}" if val_labels is not None else ""
    return (f"mpinewton.data.imagenet: {tree.root.resolve()} ({tree.layout} layout{labels}); "
            f"cv2.imread BGR->RGB, {how} (INTER_AREA shrinking, INTER_CUBIC enlarging)")


def convert_imagenet(
    src: PathLike,
    out: PathLike,
    *,
    size: int = 224,
    resize: str = "stretch",
    crop: str | None = None,
    classes_file: PathLike | None = None,
    val_labels: PathLike | None = None,
    max_bad_fraction: float = 0.01,
    accept_truncated: bool = False,
    compression: str = "gzip",
    force: bool = False,
    comm: Comm | None = None,
) -> ConversionReport:
    """Convert the tree ``src`` (see :func:`scan_image_tree`) to the dataset file ``out``.

    Every rank of ``comm`` (default: one process) must call this with the same
    arguments; each decodes a contiguous block of the files, rank 0 writes
    ``out`` and its manifest.  The result does not depend on the number of
    ranks.  An error on any rank is raised on every rank, and then no file is
    left under ``out`` (an existing one, with ``force``, is untouched).
    """
    comm = comm if comm is not None else Comm(None)
    out = Path(out)
    start = time.perf_counter()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"imagenet: size must be a positive int, got {size!r}")
    if resize not in RESIZE_MODES:
        raise DataError(f"imagenet: resize must be one of {', '.join(RESIZE_MODES)}, "
                        f"got {resize!r}")
    if crop is not None and (crop not in CROP_MODES or resize != "shorter"):
        raise DataError(f"imagenet: crop {crop!r}: only 'center', with resize 'shorter' "
                        "(stretch already gives size x size)")
    if compression not in COMPRESSIONS:
        raise DataError(f"imagenet: compression must be one of {', '.join(COMPRESSIONS)}, "
                        f"got {compression!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise DataError(f"imagenet: max_bad_fraction must be in [0, 1], got {max_bad_fraction}")

    def scan() -> tuple[ImageTree, str] | None:
        if not comm.is_root:
            return None
        if out.is_dir():
            raise DataError(f"imagenet: --out {out} is a folder; give a file name")
        if out.exists() and not force:
            raise DataError(f"imagenet: {out} exists; pass --force to replace it")
        tree = scan_image_tree(src, classes_file=classes_file, val_labels=val_labels)
        out.parent.mkdir(parents=True, exist_ok=True)
        return tree, secrets.token_hex(4)

    scanned = _agreed(comm, scan, f"imagenet: scanning {src}")
    tree, token = scanned if scanned is not None else (None, "")
    root, token, total = comm.bcast(
        (tree.root, token, tree.num_files) if tree is not None else None
    )
    items = (
        [(split, rel, label) for split, its in tree.splits.items() for rel, label in its]
        if tree is not None else []
    )  # fmt: skip
    bounds = [shard_bounds(total, r, comm.size) for r in range(comm.size)]
    lo, hi = bounds[comm.rank]
    blocks: list[list[str]] | None = None
    if tree is not None:  # rank 0: say what comes, hand every rank its block of the list
        for note in tree.notes:
            log.info("imagenet: %s", note)
        counts = ", ".join(f"{k} {len(v):,d}" for k, v in tree.splits.items())
        log.info("imagenet: %d classes, %s files; decoding on %d rank(s)",
                 len(tree.class_names), counts, comm.size)
        blocks = [[rel for _, rel, _ in items[a:b]] for a, b in bounds]
    paths = comm.scatter(blocks)
    del blocks
    t_scan = time.perf_counter() - start
    part = _part_path(out, token, comm.rank)
    parts = [_part_path(out, token, r) for r in range(comm.size)]
    try:
        with _quiet_opencv():
            what = "decode" if comm.size == 1 else f"decode (rank 0 of {comm.size})"
            progress = _progress(what, hi - lo, comm.is_root)
            local = _agreed(
                comm,
                lambda: _decode_block(root, paths, part, size, resize, accept_truncated, progress),
                "imagenet: decoding",
            )
        t_decode = time.perf_counter() - start - t_scan
        found = comm.allgather(([(lo + i, r) for i, r in local[0]],
                                [(lo + i, n) for i, n in local[1]]))

        def finish() -> ConversionReport | None:
            if not comm.is_root:
                return None
            assert tree is not None
            reasons = {g: r for bad, _ in found for g, r in bad}
            notes = {g: n for _, conv in found for g, n in conv}
            good = np.ones(len(items), dtype=bool)
            good[list(reasons)] = False
            _check_results(tree, items, good, reasons, max_bad_fraction, out)
            skipped = [{"split": items[g][0], "path": items[g][1], "reason": r}
                       for g, r in sorted(reasons.items())]
            converted = [{"split": items[g][0], "path": items[g][1], "note": n}
                         for g, n in sorted(notes.items())]
            counts = _merge(out, tree, items, good, bounds, parts, size,
                            _source(tree, size, resize, val_labels), skipped, converted,
                            compression)
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "dataset": out.name,
                "source": str(tree.root.resolve()),
                "layout": tree.layout,
                "options": {"size": size, "resize": resize,
                            "crop": "center" if resize == "shorter" else None,
                            "classes_file": None if classes_file is None else str(classes_file),
                            "val_labels": None if val_labels is None else str(val_labels),
                            "max_bad_fraction": max_bad_fraction,
                            "accept_truncated": accept_truncated,
                            "compression": compression},
                "num_classes": len(tree.class_names),
                "splits": {s: {"files": len(tree.splits[s]), "images": counts[s],
                               "skipped": len(tree.splits[s]) - counts[s]} for s in counts},
                "skipped": skipped,
                "converted": converted,
                "notes": list(tree.notes),
            }
            _write_json_atomic(manifest_path(out), manifest)
            seconds = time.perf_counter() - start
            return ConversionReport(
                out=str(out), manifest=str(manifest_path(out)), splits=counts, files=len(items),
                skipped=skipped, converted=converted, seconds=seconds,
                phases={"scan": t_scan, "decode": t_decode,
                        "write": seconds - t_scan - t_decode},
                ranks=comm.size,
            )

        report = _agreed(comm, finish, "imagenet: writing " + str(out))
    finally:
        with suppress(FileNotFoundError):
            part.unlink()
        if comm.is_root:
            for p in parts:
                with suppress(FileNotFoundError):
                    p.unlink()
    return comm.bcast(report)
