"""mpinewton: distributed Hessian-free Newton-CG training for Keras models over MPI.

The package follows the layering described in ``docs/design.md``: the solver
mathematics (:mod:`mpinewton.solvers`) knows neither MPI nor TensorFlow, the MPI
layer (:mod:`mpinewton.comm`) knows no TensorFlow, and only the training driver
(:mod:`mpinewton.train`) sees the whole flow.
"""

import os as _os

# TensorFlow's CPU packages run oneDNN's kernels by default only on CPUs with
# AVX512_VNNI, AVX512_BF16 or AMX; elsewhere (AVX2 only) they use Eigen's, whose
# convolution gradients are slow: ResNet-50's gradient of 64 images of 32 x 32 took
# 5.0 s with Eigen's and 0.95 s with oneDNN's on an AVX2 AMD EPYC, 1 thread
# (docs/benchmarks.md). Set before TensorFlow loads, so every mpinewton command gets
# the same kernels on every CPU; TF_ENABLE_ONEDNN_OPTS=0 keeps Eigen's.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.2.0"

__all__ = ["FitResult", "Objective", "__version__", "configure_threads", "fit"]


def __getattr__(name: str) -> object:
    """``fit``, ``Objective``, ``FitResult``, ``configure_threads``: imported on first use.

    The command-line tools import this package first; loading the API (and
    MPI) only when it is used keeps ``python -m mpinewton.data`` fast.
    """
    if name in ("fit", "Objective", "FitResult", "configure_threads"):
        from mpinewton import api

        return getattr(api, name)
    raise AttributeError(f"module 'mpinewton' has no attribute {name!r}")
