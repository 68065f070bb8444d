#!/usr/bin/env bash
# The curvature of the thesis CNN (thesis chapters 13-15 redone with mpinewton):
# train the default job with a checkpoint after pre-training (iteration 60) and
# at the end (80), then, at the start weights, after pre-training and after the
# Newton iterations: top eigenvalues (Lanczos and power iteration), Hutchinson
# trace, SLQ spectrum and the Taylor test; and the Taylor test of thesis figure
# 14.1 (b = 100 after 150 gradient-descent iterations). Results (JSON, PNG) are
# copied to docs/curvature/<stage>/; docs/results.md quotes them.
#
#   bash scripts/curvature.sh [RANKS]        # default 2 ranks; about 15 minutes here
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
ranks=${1:-2}
run=runs/curvature
mpi() { bash scripts/mpirun.sh -n "$ranks" "$@"; }

if [ ! -f "$run/checkpoints/ckpt-00000080.h5" ]; then
    mpi python -m mpinewton.train jobs/mnist_cnn_thesis.toml --run-dir "$run" --overwrite \
        --set checkpoint.every=60
fi
declare -A weights=([start]="" [pretrained]="--checkpoint $run/checkpoints/ckpt-00000060.h5"
                    [newton]="--checkpoint $run/checkpoints/ckpt-00000080.h5")
for stage in start pretrained newton; do
    out=$run/analysis/$stage
    # shellcheck disable=SC2086
    {
        mpi python -m mpinewton.analyze eigen ${weights[$stage]} --out "$out" --batch 10000 \
            -k 3 --tol 1e-6
        mpi python -m mpinewton.analyze trace ${weights[$stage]} --out "$out" --batch 10000 \
            --samples 100
        mpi python -m mpinewton.analyze spectrum ${weights[$stage]} --out "$out" --batch 10000 \
            --runs 10 --steps 80
        # thesis figure 14.1: b = 100 (its own top eigenvector, by Lanczos)
        mpi python -m mpinewton.analyze taylor ${weights[$stage]} --out "$out/b100" --batch 100
    }
    mkdir -p "docs/curvature/$stage"
    cp "$out"/*.json "$out"/*.png "$out"/b100/taylor.* "docs/curvature/$stage/"
done
# Thesis figure 14.1: b = 100 after 150 gradient-descent iterations on those 100 images.
fig=runs/curvature_fig14_1
mpi python -m mpinewton.train jobs/mnist_cnn_gd.toml --run-dir "$fig" --overwrite \
    --set data.limit=100 --set optimizer.pretrain_iters=0 --set optimizer.iters=150
mpi python -m mpinewton.analyze taylor --run-dir "$fig" --batch 100 --out "$fig/analysis"
mkdir -p docs/curvature/fig14_1
cp "$fig"/analysis/taylor.* docs/curvature/fig14_1/
echo "results in docs/curvature/"
