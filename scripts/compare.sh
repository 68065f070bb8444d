#!/usr/bin/env bash
# Newton-CG against the optimisers a user would pick instead, on the thesis CNN (full
# batch of the 50,000 MNIST training images, float64), from the same pre-trained weights
# (the default job's 60 gradient-descent iterations, seed 0), each for TIME seconds.
# The first-order learning rates and the Newton settings were chosen on seed 1
# (scripts/compare-tune.sh); this run is seed 0. Writes docs/compare/cnn.json and .png.
# Usage: scripts/compare.sh [RANKS] [TIME]   (default 2 ranks, 300 s per method)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
ranks=${1:-2}
limit=${2:-300}
bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.compare --time-limit "$limit" \
    --reference gd-lr1,gd-lr2,gd-lr4 --reference-iters 200 \
    --variant "newton=newton" \
    --variant "newton-thesis=newton,curvature=hessian,damping_rule=fixed,damping=1e-3,preconditioner=none,warm_start=weights,cg_rtol=1e-2,cg_scale_tol_sqrt_n=true,curvature_fraction=1.0" \
    --variant "trust-region=trust_region,curvature=gauss_newton,cg_rtol=0.1,curvature_fraction=0.05" \
    --variant "lbfgs=lbfgs" \
    --variant "adam-lr0.03=adam,learning_rate=0.03" \
    --variant "momentum-lr0.3=momentum,learning_rate=0.3" \
    --variant "gd-lr2=gd,learning_rate=2.0" \
    --variant "gd-lr1=gd,learning_rate=1.0,iters=200" \
    --variant "gd-lr4=gd,learning_rate=4.0,iters=200" \
    --out docs/compare/cnn.json
