"""A ``matplotlib`` that refuses to import, on the ``PYTHONPATH`` of the tests' jobs that
draw no figure.

Keras imports ``matplotlib.pyplot`` whenever it is installed, for its image
gallery: 0.7-1.2 CPU-s of the 3-5 that every rank of a small job spends importing
TensorFlow on the 2-core test machine (measured with ``/usr/bin/time python -c
"import tensorflow"``, with and without this directory), paid by each of the
hundreds of ranks the suite starts. Only ``mpinewton.compare`` and
``mpinewton.analyze`` draw (their own ``matplotlib`` import, on rank 0); their
tests launch with ``mpi_env(matplotlib=True)`` (``tests/mpijobs.py``). Keras
treats the ImportError as "not installed".
"""

raise ImportError("matplotlib is hidden from this test job (tests/no_matplotlib)")
