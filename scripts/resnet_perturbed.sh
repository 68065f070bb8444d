#!/usr/bin/env bash
# The thesis' ResNet-50 proof of concept (section 15.3, figure 15.3) on real images:
# given weights (ResNet-50 trained on MNIST 32x32 RGB by gradient descent), perturbed
# w <- w * p, p ~ N(1, 0.01), then stochastic Newton-CG against gradient descent with
# mini-batches of b = 16 (jobs/resnet_mnist_perturbed.toml).
#   1. the given weights: jobs/resnet_mnist.toml, gradient descent lr 0.1, 190 iterations
#      of b = 256 after its 10 pre-training iterations (skipped when already there);
#   2. sweep: damping and learning rates on seed 0, SWEEP_ITERS iterations each;
#   3. seeds: for each of SEEDS (perturbation and mini-batches) the perturbed weights
#      evaluated, then Newton-CG (damping DAMPING) and gradient descent (learning rate
#      LR), the best of each sweep, ITERS iterations each, as the thesis' six runs;
#   4. fixed: the same on one fixed batch, the first 16 training images (data.limit =
#      16), for FIXED_SEEDS - the thesis' "a mini-batch of size b = 16 was used".
# STAGES (default "sweep seeds fixed") picks stages 2-4; the given weights are trained
# only when missing. Writes runs/resnet_perturbed/*, runs/resnet_perturbed/table.md,
# docs/resnet_perturbed.png and docs/resnet_perturbed_fixed.png, and prints the tables.
# Usage: scripts/resnet_perturbed.sh [RANKS] (default 2); about 2 hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
ranks=${1:-2}
iters=${ITERS:-30}
sweep_iters=${SWEEP_ITERS:-10}
dampings=${DAMPINGS:-"1 10 30 100"}
rates=${RATES:-"0.1 0.03 0.01"}
damping=${DAMPING:-100}
lr=${LR:-0.01}
seeds=${SEEDS:-"0 1 2 3 4 5"}
fixed_seeds=${FIXED_SEEDS:-"0 1"}
stages=" ${STAGES:-sweep seeds fixed} "
out=runs/resnet_perturbed
mkdir -p "$out"
[ -f data/mnist_rgb32.h5 ] || python -m mpinewton.data resize data/mnist.h5 --out data/mnist_rgb32.h5 --size 32 32
train() {  # train RUN_DIR JOB [--set ...]: one job, its console output in RUN_DIR.log
    local dir=$1 job=$2
    shift 2
    echo "[resnet_perturbed] $dir $*" >&2
    mkdir -p "$(dirname "$dir")"
    bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.train "$job" --overwrite \
        --run-dir "$dir" "$@" >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
}
given=$out/given
if [ ! -f "$given/weights.h5" ]; then
    train "$given" jobs/resnet_mnist.toml --set optimizer.method='"gd"' \
        --set optimizer.learning_rate=0.1 --set optimizer.iters=190
fi
job=(jobs/resnet_mnist_perturbed.toml --set "model.weights=\"$given/weights.h5\"")
if [[ $stages == *" sweep "* ]]; then
    for a in $dampings; do
        train "$out/sweep/newton_damping$a" "${job[@]}" --set "optimizer.damping=$a" \
            --set "optimizer.iters=$sweep_iters"
    done
    for r in $rates; do
        train "$out/sweep/gd_lr$r" "${job[@]}" --set optimizer.method='"gd"' \
            --set "optimizer.learning_rate=$r" --set "optimizer.iters=$sweep_iters"
    done
fi
compare() {  # compare DIR SEED [--set ...]: Newton-CG and gradient descent from one start
    local dir=$1 s=$2
    shift 2
    train "$dir/newton_seed$s" "${job[@]}" --set "run.seed=$s" "$@" \
        --set "optimizer.damping=$damping" --set "optimizer.iters=$iters"
    train "$dir/gd_seed$s" "${job[@]}" --set "run.seed=$s" "$@" --set optimizer.method='"gd"' \
        --set "optimizer.learning_rate=$lr" --set "optimizer.iters=$iters"
}
if [[ $stages == *" seeds "* ]]; then
    for s in $seeds; do
        train "$out/start_seed$s" "${job[@]}" --set "run.seed=$s" --set optimizer.iters=0
        compare "$out" "$s"
    done
fi
if [[ $stages == *" fixed "* ]]; then
    for s in $fixed_seeds; do
        compare "$out/fixed" "$s" --set data.limit=16
    done
fi
python scripts/resnet_perturbed_report.py "$out" "$damping" "$lr" $seeds
