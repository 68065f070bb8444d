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
# Results (JSON, PNG) are copied to docs/curvature/resnet_<stage>/.
#   bash scripts/resnet_curvature.sh [RANKS]     # default 2; about 25 minutes here
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
stages=" ${STAGES:-given start} "
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
for stage in $stages; do
    mkdir -p "docs/curvature/resnet_$stage"
    cp runs/resnet_curvature/"$stage"/*.json runs/resnet_curvature/"$stage"/*.png \
        runs/resnet_curvature/"$stage"/*.time "docs/curvature/resnet_$stage/" 2>/dev/null || true
done
echo "results in docs/curvature/resnet_*/"
