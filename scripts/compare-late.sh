#!/usr/bin/env bash
# How the default job's growing curvature sample was chosen, on seed 1 (the reported races
# use seed 0), thesis CNN, full batch, 2 ranks. Stages (default: all):
#   weights  train the default job (then with a fixed 5 % curvature sample) for 200 Newton
#            iterations on seed 1: the late-phase start, runs/late-seed1/weights.h5 (~5 min)
#   late     from those weights, 150 s each: curvature fractions 5, 10, 20, 40, 100 %, a
#            tighter CG tolerance, more CG iterations, Adam (lr 0.01, 0.03)
#            -> docs/compare/tuning/late1.json, late2.json (~28 min)
#   growth   from the pre-trained weights: a first rule, the fraction doubling as |g| shrinks
#            (since removed; the fixed 5 % and that rule at power 0.25 for 240 s each, the
#            round stopped there: it grew too early and lost), then the rule kept,
#            curvature_growth = "damping", threshold 1.5, 2, 3, at most 20 %, 330 s each
#            -> docs/compare/tuning/growth-gradient.json, growth-damping.json (~17 min)
# Usage: scripts/compare-late.sh [weights|late|growth|all]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
stage=${1:-all}
out=docs/compare/tuning
fixed="--set optimizer.curvature_growth=\"none\""
race() { bash scripts/mpirun.sh -n 2 python -m mpinewton.compare --set run.seed=1 "$@"; }
if [[ $stage == weights || $stage == all ]]; then
    # shellcheck disable=SC2086
    bash scripts/mpirun.sh -n 2 python -m mpinewton.train --set run.seed=1 $fixed \
        --set optimizer.iters=200 --run-dir runs/late-seed1 --overwrite
fi
late=(--set optimizer.pretrain_iters=0 --set model.weights='"runs/late-seed1/weights.h5"'
      --time-limit 150)
if [[ $stage == late || $stage == all ]]; then
    # shellcheck disable=SC2086
    race "${late[@]}" $fixed \
        --variant "newton=newton" \
        --variant "cf10=newton,curvature_fraction=0.1" \
        --variant "cf20=newton,curvature_fraction=0.2" \
        --variant "rtol03=newton,cg_rtol=0.03" \
        --variant "cf10-rtol03=newton,curvature_fraction=0.1,cg_rtol=0.03" \
        --variant "adam-lr0.03=adam,learning_rate=0.03" \
        --variant "adam-lr0.01=adam,learning_rate=0.01" \
        --out "$out/late1.json"
    # shellcheck disable=SC2086
    race "${late[@]}" $fixed \
        --variant "cf40=newton,curvature_fraction=0.4" \
        --variant "cf100=newton,curvature_fraction=1.0" \
        --variant "cf20-cg100=newton,curvature_fraction=0.2,cg_max_iter=100" \
        --out "$out/late2.json"
fi
if [[ $stage == growth || $stage == all ]]; then
    # The first round's JSON was written by the removed rule (curvature_growth = "gradient",
    # curvature_growth_power = 0.25, curvature_fraction_max = 0.2); it cannot be rerun.
    grow="newton,curvature_fraction=0.05,curvature_growth=damping,curvature_fraction_max=0.2"
    race --time-limit 330 \
        --variant "grow-t1.5=$grow,curvature_growth_threshold=1.5" \
        --variant "grow-t2=$grow,curvature_growth_threshold=2.0" \
        --variant "grow-t3=$grow,curvature_growth_threshold=3.0" \
        --out "$out/growth-damping.json"
fi
