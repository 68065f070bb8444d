"""mpinewton: distributed Hessian-free Newton-CG training for Keras models over MPI.

The package follows the layering described in ``docs/design.md``: the solver
mathematics (:mod:`mpinewton.solvers`) knows neither MPI nor TensorFlow, the MPI
layer (:mod:`mpinewton.comm`) knows no TensorFlow, and only the training driver
(:mod:`mpinewton.train`) sees the whole flow.
"""

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
