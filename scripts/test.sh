#!/usr/bin/env bash
# Set up if needed, then run the whole test suite: ruff, the serial tests (which
# also launch whole training jobs under mpirun), and the MPI tests under mpirun
# with 1, 2 and 3 ranks, each under a hard timeout so that a hang is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/slurm-setup.sh   # SLURM for tests/slurm (skipped where it cannot run)
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
# One node: no libfabric transport, which costs every rank 1 s of MPI_Init (tests/conftest.py)
export OMPI_MCA_btl="${OMPI_MCA_btl:-^ofi}"

echo "== ruff"
ruff check mpinewton tests

echo "== serial tests (two workers, a test file per worker)"
# Most of these tests wait on subprocesses (whole jobs under mpirun), so two workers
# shorten the suite on two cores; the SLURM tests run afterwards on their own, since
# a loaded machine delays the single-node SLURM's job starts. Files go to the workers in
# the order tests/conftest.py gives them (the slowest first), not xdist's own.
python -m pytest -q -p no:cacheprovider --ignore=tests/mpi --ignore=tests/slurm \
    -n 2 --dist loadfile --no-loadscope-reorder "$@"

echo "== SLURM tests"
rc=0
python -m pytest -q -p no:cacheprovider tests/slurm "$@" || rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || exit "$rc"   # 5: arguments selected none of them

for n in 1 2 3; do
    echo "== MPI tests on $n rank(s)"
    timeout --kill-after=10 600 bash scripts/mpirun.sh -n "$n" \
        python -m pytest -q -p no:cacheprovider --color=no --with-mpi --timeout=240 tests/mpi
done
