"""A ``sklearn`` that refuses to import, first on the tests' jobs' ``PYTHONPATH``.

Keras imports scikit-learn whenever it is installed, for its scikit-learn
wrappers: 0.4-0.6 CPU-s of every rank of a small job on the 2-core test
machine, paid by the hundred-odd ranks the suite starts. mpinewton never uses
scikit-learn; the tests install it only for ``docs/examples``, whose jobs start
without this directory (``tests/mpijobs.py``, ``pythonpath``). Keras treats the
ImportError as "not installed".
"""

raise ImportError("scikit-learn is hidden from this test job (tests/no_sklearn)")
