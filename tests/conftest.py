"""Shared test set-up: quiet TensorFlow, MPI-free by default in the serial suite."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
