"""Shared test set-up: quiet TensorFlow, MPI-free by default in the serial suite."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# scikit-learn hidden from this process, as from the jobs it launches (tests/mpijobs.py,
# pythonpath): Keras would import it, and mpinewton never uses it (tests/no_sklearn).
sys.path.insert(0, str(Path(__file__).resolve().parent / "no_sklearn"))

# Open MPI's shared-memory transport names its backing files in /dev/shm after the
# job id. Two jobs started at the same moment from two test workers can draw the
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


# Open MPI's libfabric transport (btl ofi) probes for network providers when MPI starts:
# 1.0 s of every rank's MPI_Init on this kind of machine, against 0.07 s without it. The
# tests run on one node, where shared memory carries all messages, and launch over a
# hundred jobs; scripts/test.sh sets the same for the tests run under mpirun.
os.environ.setdefault("OMPI_MCA_btl", "^ofi")

# XLA's CPU backend compiles at LLVM optimisation level 0 in the tests: the three XLA
# tests of tests/test_resnet.py take a fifth less CPU time (30.3 against 38.6 user
# CPU-s, docs/benchmarks.md), and the suite and the jobs it launches compile dozens of
# times on two cores. What the tests check of XLA is above LLVM and unchanged: the
# graphs, gradients and batching rules it compiles, and results that agree with eager
# ones and explicit Hessians to the same tolerances. Users' jobs keep XLA's default.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import pytest  # noqa: E402

#: Test files that launch the most whole jobs, the slowest first (their share of the
#: serial suite, measured with ``--durations``). scripts/test.sh runs the suite with
#: ``--dist loadfile --no-loadscope-reorder``: xdist then hands files to its workers in
#: collection order, so these start first and the quick files fill in around them,
#: instead of a long file starting last and running alone.
HEAVY_FIRST = ("test_resume_mpi.py", "test_resume_methods_mpi.py", "test_examples_mpi.py",
               "test_compare_mpi.py", "test_bench.py", "test_train_mpi.py",
               "test_stochastic_mpi.py", "test_resnet.py", "test_validation_mpi.py",
               "test_local.py", "test_analyze_mpi.py", "test_rundir_lock_mpi.py",
               "test_averaging_mpi.py", "test_evaluate_mpi.py", "test_resnet_mpi.py")


def pytest_collection_modifyitems(config, items):
    """Put the files of HEAVY_FIRST first, in its order; the rest keep theirs (stable)."""
    place = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: place.get(item.path.name, len(HEAVY_FIRST)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small MNIST-shaped HDF5 dataset for whole-job tests (tests/mpijobs.py)."""
    from mpijobs import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "small.h5")
