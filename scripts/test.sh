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

echo "== ruff"
ruff check mpinewton tests

echo "== serial tests"
python -m pytest -q -p no:cacheprovider --ignore=tests/mpi "$@"

for n in 1 2 3; do
    echo "== MPI tests on $n rank(s)"
    timeout --kill-after=10 600 bash scripts/mpirun.sh -n "$n" \
        python -m pytest -q -p no:cacheprovider --color=no --with-mpi --timeout=240 tests/mpi
done
