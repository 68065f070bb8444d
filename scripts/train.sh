#!/usr/bin/env bash
# Set up if needed, then run the default job (the thesis' CNN on the 50,000 MNIST
# training images) on 2 MPI ranks of one thread each. Extra arguments go to the
# trainer, e.g. `scripts/train.sh --set optimizer.iters=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
ranks=${MPINEWTON_RANKS:-2}
exec bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.train --overwrite "$@"
