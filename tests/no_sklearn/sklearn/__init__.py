"""A ``sklearn`` that refuses to import, first on the tests' jobs' ``PYTHONPATH``.

Keras imports scikit-learn whenever it is installed, for its scikit-learn
wrappers: 0.9 s of every process's start on the 2-core test machine, paid by
every rank of the hundred-odd jobs the suite launches. mpinewton never uses
scikit-learn; the tests install it only for ``docs/examples``, whose jobs start
without this directory (``tests/mpijobs.py``, ``pythonpath``). Keras treats the
ImportError as "not installed".
"""

raise ImportError("scikit-learn is hidden from this test job (tests/no_sklearn)")
