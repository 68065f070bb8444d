"""What K-FAC keeps whole of ResNet-50's Kronecker factors at each ``max_factor_dim``.

For each setting: how many of the factors are held whole (the others as their
diagonals), the flops of one step's direction (``2 a^2 g + 2 a g^2`` a block,
``a g`` per diagonal factor), of one refresh's inversions (``n^3`` per whole
factor) and the float64 bytes of the factors, for the model of
``jobs/resnet_mnist.toml`` (32 x 32 RGB inputs, 10 classes). docs/results.md,
"Fewer whole factors".

    python scripts/kfac-factor-costs.py [DIM ...]   (default 1 128 256 512 1025 2048)
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from mpinewton.local import LocalObjective  # noqa: E402
from mpinewton.models import build_model  # noqa: E402


def main(dims: list[int]) -> None:
    """Print the whole factors, flops and memory of each cap in ``dims``."""
    model = build_model("resnet50", dtype="float32", seed=0, input_shape=(32, 32, 3),
                        num_classes=10)
    blocks = LocalObjective(model, np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, int),
                            micro_batch=1, jit=False).kfac_blocks()
    for dim in dims:
        orders = [n for b in blocks for n in (b.a_dim, b.g_dim)]
        direction = sum((2 * b.a_dim**2 * b.g_dim if b.a_dim <= dim else b.a_dim * b.g_dim)
                        + (2 * b.a_dim * b.g_dim**2 if b.g_dim <= dim else b.a_dim * b.g_dim)
                        for b in blocks)
        inversions = sum(n**3 for n in orders if n <= dim)
        megabytes = 8 * sum(n * n if n <= dim else n for n in orders) / 1e6
        print(f"max_factor_dim {dim}: {sum(n <= dim for n in orders)} of {len(orders)} "
              f"factors whole, direction {direction / 1e9:.1f} GFLOP a step, inversions "
              f"{inversions / 1e9:.1f} GFLOP a refresh, factors {megabytes:.0f} MB (float64)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dims", nargs="*", type=int, metavar="DIM",
                        default=[1, 128, 256, 512, 1025, 2048],
                        help="max_factor_dim settings to count (default: %(default)s)")
    dims = parser.parse_args().dims
    if any(d < 1 for d in dims):
        parser.error(f"max_factor_dim must be >= 1, got {min(dims)}")
    main(dims)
