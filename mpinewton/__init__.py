"""mpinewton: distributed Hessian-free Newton-CG training for Keras models over MPI.

The package follows the layering described in ``docs/design.md``: the solver
mathematics (:mod:`mpinewton.solvers`) knows neither MPI nor TensorFlow, the MPI
layer (:mod:`mpinewton.comm`) knows no TensorFlow, and only the training driver
(:mod:`mpinewton.train`) sees the whole flow.
"""

__version__ = "0.2.0"
