"""HDF5 checkpoints: atomic writes on rank 0, validation on load, resume.

A checkpoint is one HDF5 file ``ckpt-{iteration:08d}.h5`` in a checkpoint
folder (the driver uses ``RUN_DIR/checkpoints``), next to a text file
``latest`` that names the newest committed one.  Layout (format_version 1,
see ``docs/checkpoints.md``)::

    /                      attrs: format="mpinewton-checkpoint", format_version=1,
                                  iteration, world_size, mpinewton_version,
                                  config_sha256, model_fingerprint, attrs_sha256
    /config_toml           (n,) uint8   the resolved job, UTF-8 TOML text
    /model_variables       (n,) uint8   UTF-8 JSON [[name, shape, dtype], ...] in model order
    /weights/<enc(name)>   one dataset per variable, its own shape and dtype
    /state/...             the optimiser state: one group per dict, one dataset per leaf

``enc`` escapes ``%`` as ``%25``, ``/`` as ``%2F`` and a leading ``.`` as
``%2E``, so Keras paths like ``sequential/dense/kernel`` stay one flat
dataset name.  Every dataset is contiguous and uncompressed and carries a
``sha256`` attribute over its dtype, shape and raw bytes; the root attributes
carry ``attrs_sha256``.  All of it is checked on load, with weights also
checked for NaN/Inf and against the expected :class:`ModelSpec`.

Nothing lost (design invariant 5): the file is built in memory, written
under a temporary name ``.<name>.<random>.tmp`` in the same folder, fsynced,
renamed with ``os.replace`` and the folder fsynced; ``latest`` is replaced
the same way; old checkpoints are deleted only after that.  A crash or an
I/O error at any point leaves ``latest`` naming a complete, valid checkpoint
(the previous one until the new one is committed).  NaN/Inf weights are
never written.  This module imports neither MPI nor TensorFlow: rank 0
calls it, the driver does the rest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import mpinewton
from mpinewton.durable import atomic_open, fsync_path, is_temp_name, write_all
from mpinewton.params import ParamLayout

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST",
    "Checkpoint",
    "CheckpointError",
    "ModelSpec",
    "checkpoint_path",
    "cleanup_temporaries",
    "find_latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "write_checkpoint",
]

FORMAT = "mpinewton-checkpoint"
FORMAT_VERSION = 1
#: Name of the pointer file (its text: the newest committed checkpoint's file name).
LATEST = "latest"

_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.h5$")
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_INT64 = np.iinfo(np.int64)
#: Array dtype kinds a checkpoint stores: bool, signed/unsigned int, float, complex.
_NUMERIC_KINDS = "biufc"

PathLike = str | os.PathLike[str]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or is not valid; the message names the file and problem."""

    def __init__(self, message: str, *, path: PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


# --------------------------------------------------------------------------- model spec


#: The variables a checkpoint holds and a model must match: the one layout class
#: (:class:`mpinewton.params.ParamLayout`), under the name checkpoints use.
ModelSpec = ParamLayout


# --------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded, fully validated checkpoint.

    ``weights`` is ordered like the model's variables (``spec.names``);
    ``state`` is the optimiser state exactly as it was written.
    """

    path: Path
    iteration: int
    weights: dict[str, np.ndarray]
    state: dict[str, Any]
    config_toml: str
    config_sha256: str
    world_size: int
    version: str
    spec: ModelSpec
    format_version: int = FORMAT_VERSION


def checkpoint_path(folder: PathLike, iteration: int) -> Path:
    """``folder/ckpt-{iteration:08d}.h5``."""
    return Path(folder) / f"ckpt-{iteration:08d}.h5"


def _iteration_of(path: Path) -> int:
    m = _NAME_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(folder: PathLike) -> list[Path]:
    """The ``ckpt-*.h5`` files of ``folder`` (regular files), oldest iteration first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------- encoding


def _encode_name(name: str) -> str:
    """Escape a variable name or state key into one HDF5 link name (reversible)."""
    out = name.replace("%", "%25").replace("/", "%2F")
    return "%2E" + out[1:] if out.startswith(".") else out


def _is_name(name: Any) -> bool:
    """A non-empty str that UTF-8 can encode (HDF5 link names are UTF-8)."""
    if not isinstance(name, str) or not name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_name(link: str) -> str:
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), link)


def _array_sha256(arr: np.ndarray) -> str:
    """SHA-256 of JSON ``{"dtype": arr.dtype.str, "shape": [...]}`` then the raw C-order bytes."""
    h = hashlib.sha256()
    header = {"dtype": arr.dtype.str, "shape": [int(d) for d in arr.shape]}
    h.update(json.dumps(header, sort_keys=True).encode("ascii"))
    h.update(arr.tobytes(order="C"))
    return h.hexdigest()


def _put(group: h5py.Group, name: str, arr: np.ndarray, **attrs: Any) -> None:
    """Write ``arr`` as a contiguous, uncompressed dataset with its checksum."""
    arr = np.asarray(arr, order="C")  # keeps 0-d (ascontiguousarray would not)
    ds = group.create_dataset(name, data=arr)
    ds.attrs["sha256"] = _array_sha256(arr)
    for key, value in attrs.items():
        ds.attrs[key] = value


def _text(data: str, *, errors: str = "strict") -> np.ndarray:
    return np.frombuffer(data.encode("utf-8", errors), dtype=np.uint8).copy()


def _attrs_sha256(attrs: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(attrs), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- state values


def _check_state(value: Any, where: str) -> None:
    """Raise CheckpointError naming the key path of the first value a checkpoint cannot hold."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not _is_name(key):
                raise CheckpointError(
                    f"cannot checkpoint {where}: keys must be non-empty UTF-8 strings, got {key!r}"
                )
            _check_state(item, f"{where}[{key!r}]")
        return
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise CheckpointError(
                f"cannot checkpoint {where}: numpy dtype {value.dtype} is not supported "
                "(use bool, int, uint, float or complex)"
            )
        return
    raise CheckpointError(
        f"cannot checkpoint {where}: type {type(value).__name__} is not supported; "
        "use dict, None, bool, int, float, str, numpy arrays or numpy scalars"
    )


def _write_state(group: h5py.Group, state: Mapping[str, Any]) -> None:
    """Write a nested dict: dicts become groups (creation order kept), leaves datasets."""
    group.attrs["kind"] = "dict"
    for key, value in state.items():
        name = _encode_name(key)
        if isinstance(value, Mapping):
            _write_state(group.create_group(name, track_order=True), value)
        elif value is None:
            _put(group, name, np.zeros(0, np.uint8), kind="none")
        elif isinstance(value, bool):
            _put(group, name, np.array(int(value), np.uint8), kind="bool")
        elif isinstance(value, int):
            if _INT64.min <= value <= _INT64.max:
                _put(group, name, np.array(value, np.int64), kind="int")
            else:
                _put(group, name, _text(str(value)), kind="bigint")
        elif isinstance(value, float):
            _put(group, name, np.array(value, np.float64), kind="float")
        elif isinstance(value, str):
            _put(group, name, _text(value, errors="surrogatepass"), kind="str")
        elif isinstance(value, np.ndarray):
            _put(group, name, value, kind="ndarray")
        else:  # np.generic, checked by _check_state
            _put(group, name, np.asarray(value), kind="npscalar")


def _read_array(ds: h5py.Dataset, where: str) -> np.ndarray:
    """Read a dataset and verify its checksum."""
    arr = np.asarray(ds[()])
    if arr.shape != ds.shape:
        arr = arr.reshape(ds.shape)
    stored = ds.attrs.get("sha256")
    if isinstance(stored, bytes):
        stored = stored.decode()
    if stored is None:
        raise CheckpointError(f"{where}: dataset {ds.name} has no sha256 checksum")
    if _array_sha256(arr) != stored:
        raise CheckpointError(
            f"{where}: checksum mismatch in dataset {ds.name} (data corrupted on disk)"
        )
    return arr


def _str_attr(obj: h5py.HLObject, key: str) -> str | None:
    value = obj.attrs.get(key)
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))


def _read_state(group: h5py.Group, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for link, item in group.items():
        key = _decode_name(link)
        kind = _str_attr(item, "kind")
        if isinstance(item, h5py.Group):
            if kind != "dict":
                raise CheckpointError(f"{where}: state group {item.name} has kind {kind!r}")
            out[key] = _read_state(item, where)
            continue
        arr = _read_array(item, where)
        if kind == "none":
            out[key] = None
        elif kind == "bool":
            out[key] = bool(arr[()])
        elif kind == "int":
            out[key] = int(arr[()])
        elif kind == "bigint":
            out[key] = int(arr.tobytes().decode("ascii"))
        elif kind == "float":
            out[key] = float(arr[()])
        elif kind == "str":
            out[key] = arr.tobytes().decode("utf-8", "surrogatepass")
        elif kind == "ndarray":
            out[key] = arr
        elif kind == "npscalar":
            out[key] = arr[()]
        else:
            raise CheckpointError(f"{where}: state dataset {item.name} has unknown kind {kind!r}")
    return out


# --------------------------------------------------------------------------- durability


#: Writes a checkpoint's bytes (a module-level seam for tests that simulate a full disk).
_write_all = write_all


def _os_problem(e: OSError) -> str:
    """The reason of an OSError in words, with a hint for the common ones."""
    code = e.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    text = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "the disk is full; free space or choose another run directory",
        errno.EDQUOT: "the disk quota is exceeded; free space or choose another run directory",
        errno.EACCES: "no write permission; fix the permissions or choose another run directory",
        errno.EPERM: "operation not permitted; fix the permissions or choose another run directory",
        errno.EROFS: "the file system is read-only; choose another run directory",
    }.get(code if code is not None else -1)
    reason = f"{text} [{name}]" if name else text
    return f"{reason}: {hint}" if hint else reason


def _ensure_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} exists and is not a directory; "
            "remove it or choose another run directory",
            path=folder,
        )
    try:
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot create checkpoint folder {folder}: {_os_problem(e)}"
            + (
                " (a parent path is a file)"
                if isinstance(e, (NotADirectoryError, FileExistsError))
                else ""
            ),
            path=folder,
        ) from e
    if created:
        fsync_path(folder.parent, directory=True)


def _commit_bytes(folder: Path, name: str, data: bytes) -> None:
    """Atomically make ``folder/name`` hold ``data`` (:func:`mpinewton.durable.atomic_open`).

    Temp file ``.<name>.<random>.tmp`` in the same folder, write, fsync,
    ``os.replace``, fsync of the folder.  On any error the temp file is
    removed and ``folder/name`` is untouched.
    """
    with atomic_open(folder / name, "wb", buffering=0) as f:
        _write_all(f.fileno(), data)


def _read_latest(folder: Path) -> str | None:
    """The file name in ``latest`` (None if there is no pointer); CheckpointError if garbage."""
    pointer = folder / LATEST
    try:
        text = pointer.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"pointer {pointer} cannot be read: {e}", path=pointer) from e
    name = text.strip()
    if not _NAME_RE.match(name):
        raise CheckpointError(
            f"pointer {pointer} does not hold a checkpoint file name (got {name[:80]!r})",
            path=pointer,
        )
    return name


def _rotate(folder: Path, keep: int, iteration: int) -> None:
    """Delete all but the newest ``keep`` checkpoints with iteration <= ``iteration``.

    Checkpoints with a higher iteration (left by a run resumed from an older
    checkpoint) are not touched.  A failed delete is a warning, not an error:
    the new checkpoint is already committed.
    """
    older = [p for p in list_checkpoints(folder) if _iteration_of(p) <= iteration]
    for p in older[: max(0, len(older) - keep)]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {p}: {_os_problem(e)}", stacklevel=3)


# --------------------------------------------------------------------------- writing


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _nonfinite(arr: np.ndarray) -> str:
    """'' for a finite (or non-float) array, else "N NaN/Inf value(s) (first at index I)"."""
    if arr.dtype.kind not in "fc":
        return ""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return ""
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{int(bad.sum())} NaN/Inf value(s) (first at index {first})"


def _prepare_weights(weights: Mapping[str, Any], target: Path) -> dict[str, np.ndarray]:
    """Contiguous copies-or-views of the weights; refuses NaN/Inf and unsupported dtypes."""
    out: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        if not _is_name(name):
            raise CheckpointError(
                f"cannot write {target}: variable names must be non-empty UTF-8 strings, "
                f"got {name!r}",
                path=target,
            )
        arr = np.asarray(value, order="C")
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise CheckpointError(
                f"cannot write {target}: variable {name!r} has unsupported dtype {arr.dtype}",
                path=target,
            )
        nonfinite = _nonfinite(arr)
        if nonfinite:
            raise CheckpointError(
                f"refusing to write {target}: variable {name!r} holds {nonfinite}; NaN/Inf "
                "weights are never saved",
                path=target,
            )
        out[name] = arr
    return out


def write_checkpoint(
    folder: PathLike,
    *,
    iteration: int,
    weights: Mapping[str, Any],
    state: Mapping[str, Any],
    config_toml: str,
    config_sha256: str,
    world_size: int,
    keep: int = 3,
) -> Path:
    """Atomically write ``folder/ckpt-{iteration:08d}.h5``, point ``latest`` at it, rotate.

    ``weights`` is an ordered ``variable name -> array`` mapping (the model's
    order); ``state`` a nested dict of dict/None/bool/int/float/str/numpy
    arrays and scalars, returned exactly by :func:`load_checkpoint`.
    ``config_sha256`` is the caller's hash of the resolved job (64 hex
    digits).  Afterwards only the newest ``keep`` checkpoints up to this
    iteration remain.  Raises :class:`CheckpointError` on bad input (NaN/Inf
    weights included) or an I/O failure; then no temporary file is left,
    and the previous checkpoint and ``latest`` are untouched.
    """
    folder = Path(folder)
    if not (_is_int(iteration) and iteration >= 0):
        raise CheckpointError(f"checkpoint iteration must be an integer >= 0, got {iteration!r}")
    if not (_is_int(world_size) and world_size >= 1):
        raise CheckpointError(f"checkpoint world_size must be an integer >= 1, got {world_size!r}")
    if not (_is_int(keep) and keep >= 1):
        raise CheckpointError(f"checkpoint keep must be an integer >= 1, got {keep!r}")
    if not (isinstance(config_toml, str) and _is_name(config_toml or "-")):
        raise CheckpointError(f"config_toml must be UTF-8 text, got {type(config_toml).__name__}")
    if not (isinstance(config_sha256, str) and _SHA256_RE.match(config_sha256)):
        raise CheckpointError(
            f"config_sha256 must be 64 lowercase hex digits, got {config_sha256!r}"
        )
    target = checkpoint_path(folder, int(iteration))
    arrays = _prepare_weights(weights, target)
    spec = ModelSpec.of_arrays(arrays)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"cannot write {target}: state must be a dict, got {type(state)}")
    _check_state(state, "state")
    _ensure_folder(folder)

    attrs: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "world_size": int(world_size),
        "mpinewton_version": mpinewton.__version__,
        "config_sha256": config_sha256,
        "model_fingerprint": spec.fingerprint(),
    }
    image = _file_image(target.name, attrs, config_toml, spec, arrays, state)
    try:
        _commit_bytes(folder, target.name, image)
        del image
        previous = _latest_or_none(folder)
        if previous != target.name:
            try:
                _commit_bytes(folder, LATEST, (target.name + "\n").encode("ascii"))
            except BaseException:
                # Nothing points at it: withdraw the new file so the folder is as before.
                with suppress(OSError):
                    target.unlink()
                raise
    except OSError as e:
        current = _latest_or_none(folder)
        after = (
            f"`latest` still names {folder / current}" if current else "no checkpoint was written"
        )
        raise CheckpointError(
            f"cannot write checkpoint {target}: {_os_problem(e)}; {after}", path=target
        ) from e
    _rotate(folder, int(keep), int(iteration))
    return target


def _file_image(
    name: str,
    attrs: Mapping[str, Any],
    config_toml: str,
    spec: ModelSpec,
    arrays: Mapping[str, np.ndarray],
    state: Mapping[str, Any],
) -> bytes:
    """The whole checkpoint as HDF5 file bytes, built in memory.

    Building in memory (HDF5 core driver) keeps every disk write in
    :func:`_commit_bytes`: an I/O error there leaves no half-closed HDF5 file
    behind (HDF5 cannot close a file whose flush failed, and crashes at exit).
    """
    with h5py.File(f"{name}.{id(arrays)}", "w", driver="core", backing_store=False) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["attrs_sha256"] = _attrs_sha256(attrs)
        _put(f, "config_toml", _text(config_toml))
        _put(f, "model_variables", _text(json.dumps(spec.entries())))
        group = f.create_group("weights", track_order=True)
        for var, arr in arrays.items():
            _put(group, _encode_name(var), arr)
        _write_state(f.create_group("state", track_order=True), state)
        f.flush()
        return bytes(f.id.get_file_image())


def _latest_or_none(folder: Path) -> str | None:
    try:
        return _read_latest(folder)
    except CheckpointError:
        return None


# --------------------------------------------------------------------------- reading


def _int_attr(f: h5py.File, key: str, where: str) -> int:
    value = f.attrs.get(key)
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))):
        raise CheckpointError(f"{where}: root attribute {key!r} is missing or not an integer")
    return int(value)


def load_checkpoint(path: PathLike, *, expected: ModelSpec | None = None) -> Checkpoint:
    """Load and validate one checkpoint; raises :class:`CheckpointError` naming file and problem.

    Checks, in order: the file opens as HDF5 (else truncated/corrupt), it is
    an mpinewton checkpoint of a format version this code reads, the root
    attributes and every dataset match their checksums, the stored variable
    list matches its fingerprint and ``expected`` (first mismatching variable
    named), and no weight is NaN/Inf.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.exists():
        raise CheckpointError(f"{where} does not exist", path=path)
    if not path.is_file():
        raise CheckpointError(f"{where} is not a regular file", path=path)
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise CheckpointError(
            f"{where} cannot be opened as HDF5 (truncated or corrupt): {e}", path=path
        ) from e
    try:
        with f:
            return _load(f, path, where, expected)
    except CheckpointError as e:
        if e.path is None:
            e.path = path
        raise
    except (OSError, KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"{where} is unreadable (truncated or corrupt): {type(e).__name__}: {e}", path=path
        ) from e


def _load(f: h5py.File, path: Path, where: str, expected: ModelSpec | None) -> Checkpoint:
    if _str_attr(f, "format") != FORMAT:
        raise CheckpointError(
            f"{where} is not an mpinewton checkpoint (format={_str_attr(f, 'format')!r})"
        )
    version = _int_attr(f, "format_version", where)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version}, newer than the {FORMAT_VERSION} this "
            f"mpinewton {mpinewton.__version__} reads; upgrade mpinewton to resume from it"
        )
    if version < 1:
        raise CheckpointError(f"{where} has invalid format version {version}")
    attrs: dict[str, Any] = {
        "format": FORMAT,
        "format_version": version,
        "iteration": _int_attr(f, "iteration", where),
        "world_size": _int_attr(f, "world_size", where),
        "mpinewton_version": _str_attr(f, "mpinewton_version"),
        "config_sha256": _str_attr(f, "config_sha256"),
        "model_fingerprint": _str_attr(f, "model_fingerprint"),
    }
    if _attrs_sha256(attrs) != _str_attr(f, "attrs_sha256"):
        raise CheckpointError(f"{where}: checksum mismatch in the root attributes (corrupted)")

    for key in ("config_toml", "model_variables"):
        if not isinstance(f.get(key), h5py.Dataset):
            raise CheckpointError(f"{where}: dataset /{key} is missing")
    config_toml = _read_array(f["config_toml"], where).tobytes().decode("utf-8")
    entries = json.loads(_read_array(f["model_variables"], where).tobytes().decode("utf-8"))
    spec = ModelSpec(
        names=tuple(e[0] for e in entries),
        shapes=tuple(tuple(e[1]) for e in entries),
        dtypes=tuple(e[2] for e in entries),
    )
    if spec.fingerprint() != attrs["model_fingerprint"]:
        raise CheckpointError(f"{where}: the variable list does not match its model fingerprint")
    if expected is not None:
        problem = expected.mismatch(spec)
        if problem is not None:
            raise CheckpointError(f"{where} does not fit the model: {problem}")

    group = f.get("weights")
    if not isinstance(group, h5py.Group):
        raise CheckpointError(f"{where}: group /weights is missing")
    links = {_encode_name(n) for n in spec.names}
    extra = sorted(set(group) - links)
    if extra:
        raise CheckpointError(f"{where}: /weights holds datasets not in the variable list: {extra}")
    weights: dict[str, np.ndarray] = {}
    for name, shape, dtype in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
        ds = group.get(_encode_name(name))
        if not isinstance(ds, h5py.Dataset):
            raise CheckpointError(f"{where}: weight {name!r} is missing")
        arr = _read_array(ds, where)
        if arr.shape != shape or arr.dtype.name != dtype:
            raise CheckpointError(
                f"{where}: weight {name!r} is {arr.shape} {arr.dtype.name}, "
                f"its variable list entry says {shape} {dtype}"
            )
        nonfinite = _nonfinite(arr)
        if nonfinite:
            raise CheckpointError(f"{where}: weight {name!r} holds {nonfinite}")
        weights[name] = arr

    state_group = f.get("state")
    if not isinstance(state_group, h5py.Group):
        raise CheckpointError(f"{where}: group /state is missing")
    state = _read_state(state_group, where)
    return Checkpoint(
        path=path,
        iteration=attrs["iteration"],
        weights=weights,
        state=state,
        config_toml=config_toml,
        config_sha256=str(attrs["config_sha256"]),
        world_size=attrs["world_size"],
        version=str(attrs["mpinewton_version"]),
        spec=spec,
        format_version=version,
    )


def find_latest_valid(
    folder: PathLike, *, expected: ModelSpec | None = None
) -> tuple[Checkpoint | None, list[str]]:
    """The checkpoint to resume from, and one message per checkpoint skipped as invalid.

    Tries the file named by ``latest`` first, then every ``ckpt-*.h5`` from
    the highest iteration down; returns the first that passes
    :func:`load_checkpoint`.  ``(None, messages)`` if none does, ``(None, [])``
    if the folder does not exist.
    """
    folder = Path(folder)
    if not folder.exists():
        return None, []
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} exists and is not a directory", path=folder
        )
    messages: list[str] = []
    tried: set[str] = set()
    try:
        name = _read_latest(folder)
    except CheckpointError as e:
        messages.append(str(e))
        name = None
    if name is not None:
        tried.add(name)
        if not (folder / name).exists():
            messages.append(f"pointer {folder / LATEST} names {name}, which does not exist")
        else:
            try:
                return load_checkpoint(folder / name, expected=expected), messages
            except CheckpointError as e:
                messages.append(str(e))
    for path in reversed(list_checkpoints(folder)):
        if path.name in tried:
            continue
        try:
            return load_checkpoint(path, expected=expected), messages
        except CheckpointError as e:
            messages.append(str(e))
    return None, messages


def cleanup_temporaries(folder: PathLike) -> list[Path]:
    """Remove leftover ``.*.tmp`` files of interrupted writes from ``folder``; return them.

    Call it once at start-up, before any checkpoint is written (a temporary
    file of a write in progress would be removed too).
    """
    folder = Path(folder)
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} exists and is not a directory", path=folder
        )
    removed = []
    for p in sorted(folder.iterdir()):
        if is_temp_name(p.name) and p.is_file():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CheckpointError(
                    f"cannot remove temporary file {p}: {_os_problem(e)}", path=p
                ) from e
            removed.append(p)
    if removed:
        fsync_path(folder, directory=True)
    return removed
