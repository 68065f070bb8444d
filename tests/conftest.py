"""Shared test set-up: quiet TensorFlow, MPI-free by default in the serial suite."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small MNIST-shaped HDF5 dataset for whole-job tests (tests/mpijobs.py)."""
    from mpijobs import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "small.h5")
