#!/usr/bin/env bash
# The speed target's 10-minute window (thesis CNN, full batch of the 50,000 MNIST training
# images, float64, 2 ranks): the default Newton-CG, L-BFGS and Adam, each for TIME seconds from
# the same pre-trained weights (seed 0), and the fixed-step gradient-descent
# references (lr 1, 2, 4; 200 iterations each) that define the target loss. Adam's rate
# was chosen on seed 1 (scripts/compare-tune.sh). Writes docs/compare/cnn-window.json, .png.
# Usage: scripts/compare-window.sh [RANKS] [TIME]   (default 2 ranks, 600 s per method)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
ranks=${1:-2}
limit=${2:-600}
bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.compare --time-limit "$limit" \
    --reference gd-lr1,gd-lr2,gd-lr4 --reference-iters 200 \
    --variant "newton=newton" \
    --variant "lbfgs=lbfgs" \
    --variant "adam-lr0.03=adam,learning_rate=0.03" \
    --variant "gd-lr1=gd,learning_rate=1.0,iters=200" \
    --variant "gd-lr2=gd,learning_rate=2.0,iters=200" \
    --variant "gd-lr4=gd,learning_rate=4.0,iters=200" \
    --out docs/compare/cnn-window.json
