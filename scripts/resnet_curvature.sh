#!/usr/bin/env bash
# The curvature of ResNet-50 on the MNIST digits (thesis chapter 15 on real images):
# at the given weights of scripts/resnet_perturbed.sh (ResNet-50 trained by gradient
# descent on MNIST 32 x 32 RGB, jobs/resnet_mnist.toml) and at Keras' random start,
# on the first 256 training images (b = 256, micro-batches of 64 as in training):
#   eigen     the top two eigenvalues by Lanczos (thesis 15.1 used power iteration;
#             --method both adds it), peak memory per rank by /usr/bin/time
#   taylor    thesis table 15.1 (float32, as the thesis): remainders along the top
#             eigenvector, a random and the uniform direction
#   spectrum  a stochastic Lanczos quadrature density
#   surface   the loss along the top two eigenvectors (thesis figures 15.1, 15.2)
#   float64   table 15.1 again with the same weights in float64 (--set model.dtype)
#   k1        the top eigenvalue alone (-k 1), for its peak memory
#   lowmem    the same without a Lanczos basis (--low-memory), within the trainer's memory
#   trainer   the peak memory of two Newton-CG iterations of the job, for comparison
# Results (JSON, PNG, /usr/bin/time reports) are copied to docs/curvature/resnet_<stage>/.
#   bash scripts/resnet_curvature.sh [RANKS]     # default 2; about 40 minutes here
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
ranks=${1:-2}
given=runs/resnet_perturbed/given/weights.h5
[ -f "$given" ] || { echo "no $given: run scripts/resnet_perturbed.sh first (its stage 1)" >&2; exit 1; }
job=jobs/resnet_mnist.toml
batch=${BATCH:-256}
analyze() {  # analyze STAGE COMMAND [options]: one command, peak memory in STAGE/COMMAND.time
    local stage=$1 command=$2 out=runs/resnet_curvature/$1
    shift 2
    mkdir -p "$out"
    /usr/bin/time -v -o "$out/$command.time" bash scripts/mpirun.sh -n "$ranks" \
        python -m mpinewton.analyze "$command" "$job" --batch "$batch" --out "$out" "$@"
    grep -E "Maximum resident|Elapsed" "$out/$command.time"
}
stages=" ${STAGES:-given start float64 k1 lowmem trainer} "
if [[ $stages == *" given "* ]]; then
    analyze given eigen --weights "$given" -k 2 --method lanczos --tol 1e-4 --max-iter 40
    analyze given taylor --weights "$given"
    analyze given spectrum --weights "$given" --runs 2 --steps 30
    # the grid reaches where the quadratic model along v1 rises by 2: span = sqrt(4 / lambda_1)
    span=$(python -c "import json; print(f\"{(4 / abs(json.load(open('runs/resnet_curvature/given/eigen.json'))['lanczos']['values'][0])) ** 0.5:.4g}\")")
    analyze given surface --weights "$given" --points 9 --span "$span"
fi
if [[ $stages == *" start "* ]]; then
    analyze start eigen -k 2 --method lanczos --tol 1e-4 --max-iter 40
    analyze start spectrum --runs 2 --steps 30
fi
if [[ $stages == *" float64 "* ]]; then  # along the same (float32) eigenvectors
    mkdir -p runs/resnet_curvature/float64
    cp runs/resnet_curvature/given/eigen.h5 runs/resnet_curvature/float64/
    analyze float64 taylor --weights "$given" --set 'model.dtype="float64"'
fi
if [[ $stages == *" k1 "* ]]; then
    analyze k1 eigen --weights "$given" -k 1 --method lanczos --tol 1e-4 --max-iter 40
fi
if [[ $stages == *" lowmem "* ]]; then
    analyze lowmem eigen --weights "$given" -k 1 --method lanczos --tol 1e-4 --max-iter 40 \
        --low-memory
fi
if [[ $stages == *" trainer "* ]]; then
    mkdir -p runs/resnet_curvature/trainer
    /usr/bin/time -v -o runs/resnet_curvature/trainer/train.time bash scripts/mpirun.sh \
        -n "$ranks" python -m mpinewton.train "$job" --overwrite \
        --run-dir runs/resnet_curvature/trainer/run --set optimizer.pretrain_iters=0 \
        --set optimizer.iters=2
    grep -E "Maximum resident|Elapsed" runs/resnet_curvature/trainer/train.time
fi
for stage in $stages; do
    mkdir -p "docs/curvature/resnet_$stage"
    cp runs/resnet_curvature/"$stage"/*.json runs/resnet_curvature/"$stage"/*.png \
        runs/resnet_curvature/"$stage"/*.time "docs/curvature/resnet_$stage/" 2>/dev/null || true
done
echo "results in docs/curvature/resnet_*/"
