"""Shared test set-up: quiet TensorFlow, MPI-free by default in the serial suite."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Open MPI's shared-memory transport names its backing files in /dev/shm after the
# job id. Two jobs started at the same moment from the two test workers can draw the
# same id and then attach to each other's segments: both crashed with SIGSEGV in
# mca_btl_sm_poll_handle_frag in one CI run (open-mpi/ompi#7642, #4767). Every test
# process (each xdist worker) gives the jobs it starts a directory of their own, and
# removes it, with what killed jobs left in it, when it exits. Not inside an MPI job
# (tests/mpi under mpirun): its ranks must share their launcher's directory.
_SM_DIR = "OMPI_MCA_btl_sm_backing_directory"  # MCA names are case-sensitive
if _SM_DIR not in os.environ and "PMIX_RANK" not in os.environ \
        and "OMPI_COMM_WORLD_RANK" not in os.environ:
    _sm_dir = tempfile.mkdtemp(prefix="mpinewton-tests-sm-",
                               dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.environ[_SM_DIR] = _sm_dir
    atexit.register(shutil.rmtree, _sm_dir, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small MNIST-shaped HDF5 dataset for whole-job tests (tests/mpijobs.py)."""
    from mpijobs import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "small.h5")
