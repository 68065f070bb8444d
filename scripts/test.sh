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

echo "== serial tests (three workers, a test file per worker)"
# Most of these tests wait on subprocesses (whole jobs under mpirun), some of which sleep
# between iterations or wait for a signal, so three workers keep two cores busier than
# two do (the serial tests in 9 min 44 s against 10 min 23 s on a 2-core host,
# docs/benchmarks.md); the SLURM tests run afterwards, beside the lighter MPI tests,
# since a loaded machine delays the single-node SLURM's job starts. Files go to the
# workers in the order tests/conftest.py gives them (the slowest first), not xdist's own.
python -m pytest -q -p no:cacheprovider --ignore=tests/mpi --ignore=tests/slurm \
    -n 3 --dist loadfile --no-loadscope-reorder "$@"

# The SLURM tests run in the background beside the MPI tests: they mostly wait on the
# single-node SLURM's daemons (a third of a core on average), while the 1-rank MPI tests
# leave a core idle. Their output is printed after the MPI tests', in one piece.
echo "== SLURM tests (in the background; their report follows the MPI tests')"
slurm_log=$(mktemp)
python -m pytest -q -p no:cacheprovider tests/slurm "$@" >"$slurm_log" 2>&1 &
slurm_pid=$!
trap 'kill "$slurm_pid" 2>/dev/null || true; rm -f "$slurm_log"' EXIT

mpi_rc=0
for n in 1 2 3; do
    echo "== MPI tests on $n rank(s)"
    timeout --kill-after=10 600 bash scripts/mpirun.sh -n "$n" \
        python -m pytest -q -p no:cacheprovider --color=no --with-mpi --timeout=240 tests/mpi \
        || { mpi_rc=$?; echo "== MPI tests on $n rank(s) failed (exit $mpi_rc)"; }
done

slurm_rc=0
wait "$slurm_pid" || slurm_rc=$?
echo "== SLURM tests"
cat "$slurm_log"
[ "$slurm_rc" -eq 5 ] && slurm_rc=0   # 5: arguments selected none of them
if [ "$mpi_rc" -ne 0 ] || [ "$slurm_rc" -ne 0 ]; then
    echo "== failed: MPI tests exit $mpi_rc, SLURM tests exit $slurm_rc"
    exit 1
fi
