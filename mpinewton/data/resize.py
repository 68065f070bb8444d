"""Resize every image of a dataset file with OpenCV (thesis section 10.2).

The thesis resized its ImageNet images to 224 x 224 RGB with ``cv2.resize``;
ResNet-50 needs at least 32 x 32 x 3, so MNIST becomes ``mnist_rgb32.h5``::

    python -m mpinewton.data resize data/mnist.h5 --out data/mnist_rgb32.h5 --size 32 32

The source is read in blocks of rows and the result written block by block
through :class:`~mpinewton.data.hdf5.DatasetWriter` (atomic: temp file, fsync,
``os.replace``), so memory stays bounded whatever the dataset size. Labels,
splits, ``num_classes`` and class names are copied unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.data.hdf5 import DataError, DatasetWriter, inspect_dataset, read_shard
from mpinewton.progress import Progress

#: OpenCV interpolation flags by name; "linear" is ``cv2.resize``'s default.  The values
#: of OpenCV's stable ``cv::InterpolationFlags`` (``cv2.INTER_NEAREST`` ... ``INTER_LANCZOS4``),
#: written out so that importing this module does not load OpenCV (tests check them).
INTERPOLATIONS = {
    "nearest": 0,
    "linear": 1,
    "cubic": 2,
    "area": 3,
    "lanczos4": 4,
}

#: Bytes of resized pixels held in memory at once (plus the source rows they come from).
_BLOCK_BYTES = 64 << 20

PathLike = str | os.PathLike[str]


def _cv2() -> Any:
    """OpenCV, imported on first use (``import mpinewton.data`` must not load it)."""
    import cv2

    return cv2


def resize_images(x: np.ndarray, size: tuple[int, int], *, channels: int | None = 3,
                  interpolation: str = "linear") -> np.ndarray:
    """Resize uint8 images (N, H, W, C) to (N, size[0], size[1], channels) with OpenCV.

    Grey images become RGB with ``cv2.COLOR_GRAY2RGB`` (``channels = 3``), RGB
    images grey with ``cv2.COLOR_RGB2GRAY`` (``channels = 1``); ``None`` keeps
    the channels.
    """
    cv2 = _cv2()
    h, w = (int(s) for s in size)
    flag = INTERPOLATIONS[interpolation]
    c_in = x.shape[-1]
    c_out = c_in if channels is None else channels
    convert = None if c_out == c_in else cv2.COLOR_GRAY2RGB if c_out == 3 else cv2.COLOR_RGB2GRAY
    out = np.empty((len(x), h, w, c_out), dtype=np.uint8)
    for i, image in enumerate(x):
        image = cv2.resize(image, (w, h), interpolation=flag)  # dsize is (width, height)
        if convert is not None:
            image = cv2.cvtColor(image, convert)
        out[i] = image.reshape(h, w, c_out)  # OpenCV drops a single channel axis
    return out


def resize_dataset(src: PathLike, out: PathLike, size: tuple[int, int] = (224, 224), *,
                   channels: int | None = 3, interpolation: str = "linear",
                   force: bool = False, progress: bool = False) -> None:
    """Write ``out``: the dataset ``src`` with every image resized to ``size`` (H, W).

    See :func:`resize_images` for ``channels``. The new file's ``source``
    attribute names ``src`` and the operation. ``out`` must differ from
    ``src``; an existing ``out`` is only replaced with ``force``.  Only uint8
    images (N, H, W, C) can be resized; targets are copied as they are.
    ``progress`` prints progress lines (images done) on stderr.
    """
    src, out = Path(src), Path(out)
    h, w = (int(s) for s in size)
    if min(h, w) < 1:
        raise DataError(f"resize: size must be positive (H, W), got {tuple(size)}")
    if channels not in (None, 1, 3):
        raise DataError(f"resize: channels must be 1 or 3 (or None to keep), got {channels}")
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"resize: unknown interpolation {interpolation!r}; known: "
                        f"{', '.join(INTERPOLATIONS)}")
    info = inspect_dataset(src)
    if info.x_dtype != "uint8" or len(info.sample_shape) != 3:
        raise DataError(f"resize: {src} holds samples of shape {info.sample_shape} "
                        f"{info.x_dtype}; only uint8 images (H, W, C) can be resized")
    c_in = info.sample_shape[-1]
    if c_in not in (1, 3) and channels not in (None, c_in):
        raise DataError(f"resize: {src} has {c_in} channels; only 1 <-> 3 can be converted")
    c_out = c_in if channels is None else channels
    if out.resolve() == src.resolve():
        raise DataError(f"resize: --out {out} is the source file; choose another name")
    if out.exists() and not force:
        raise DataError(f"resize: {out} exists; pass force (--force) to replace it")
    operation = (f"cv2.resize to {h}x{w} ({interpolation})"
                 + (f", {c_in} -> {c_out} channels" if c_out != c_in else ""))
    source = f"{src.name} ({info.source}) | mpinewton.data.resize: {operation}"
    rows = max(1, _BLOCK_BYTES // (h * w * c_out))
    with Progress(sum(info.splits.values()), "resize", unit="images", enabled=progress) as bar, \
            DatasetWriter(out, num_classes=info.num_classes, source=source,
                          class_names=info.class_names, task=info.task) as writer:
        for split, n in info.splits.items():
            writer.add_split(split, n, (h, w, c_out), y_dtype=info.y_dtype,
                             target_shape=info.target_shape)
            blocks = -(-n // rows)
            for block in range(blocks):
                shard = read_shard(src, split, block, blocks)  # contiguous rows of this block
                writer.write_rows(split, shard.lo, resize_images(
                    shard.x, (h, w), channels=c_out, interpolation=interpolation), shard.y)
                bar.update(len(shard))


def add_resize_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of the ``resize`` command (for ``python -m mpinewton.data resize``)."""
    parser.add_argument("src", type=Path, help="dataset file to read")
    parser.add_argument("--out", type=Path, required=True, help="dataset file to write")
    parser.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                        help="new image size (default 224 224, the thesis' ResNet input)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3,
                        help="channels of the result (3: grey -> RGB; default 3)")
    parser.add_argument("--interpolation", choices=list(INTERPOLATIONS), default="linear",
                        help="OpenCV interpolation (default linear, cv2.resize's default)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=cmd_resize)
    return parser


def cmd_resize(args: argparse.Namespace) -> int:
    """Run the ``resize`` command and print the new file's description."""
    start = time.perf_counter()
    resize_dataset(args.src, args.out, tuple(args.size), channels=args.channels,
                   interpolation=args.interpolation, force=args.force,
                   progress=not getattr(args, "quiet", False))
    print(inspect_dataset(args.out))
    print(f"  file size    {args.out.stat().st_size / 2**20:.1f} MiB, "
          f"written in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpinewton.data.resize``; a DataError is one line and exit code 1."""
    parser = add_resize_arguments(argparse.ArgumentParser(
        prog="python -m mpinewton.data.resize", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        return cmd_resize(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
