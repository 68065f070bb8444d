#!/usr/bin/env bash
# Every method on ResNet-50 on the MNIST digits (32 x 32 RGB, float32), mini-batches
# drawn afresh each step, every method the same batches from the same weights
# (python -m mpinewton.compare; the loss traced is on the first EVAL_SAMPLES training
# images every EVAL_SECONDS of race time, the clock stopped):
#   random      jobs/resnet_mnist.toml: Keras' random start, 10 gradient-descent
#               steps of lr 0.1, then batches of 256
#   perturbed   jobs/resnet_mnist_perturbed.toml: the given weights of
#               scripts/resnet_perturbed.sh perturbed by p ~ N(1, 0.01), batches of 16
# No L-BFGS: its 10 pairs of 23.6 M float64 numbers (3.8 GB a rank) beside ResNet-50
# ran this 24 GB machine out of memory with 2 ranks. Each first on seed 1 (TUNE: learning-rate grids, Newton-CG settings; TUNE_TIME s
# each), then on seed 0 (RACE: the best of each; TIME s each). Writes
# docs/compare/tuning/resnet-<start>.json and docs/compare/resnet-<start>.json.
# K-FAC (random start): STAGE kfac, kfac2, ..., kfac10 tune it on seed 1
# (docs/compare/tuning/resnet-random-kfac.json, resnet-random-kfac2.json, ..., -kfac10.json),
# race-kfac races it on seed 0 against the first-order winners of the race above
# (KFAC_OUT, default docs/compare/resnet-random-kfac.json); race-kfac-dim races round 7's
# max_factor_dim against the race's (docs/compare/resnet-random-kfac-dim.json; SEED=S:
# resnet-random-kfac-dim-seedS.json); race-kfac-dim2 races round 8's (256) against 512
# (docs/compare/resnet-random-kfac-dim2.json, with SEED=S -seedS.json); step-costs runs the
# first 25 steps of Adam, K-FAC 512 and 256 and gradient descent in turn, three times over
# (docs/compare/resnet-random-step-costs.json): each method's step cost, measured in
# alternation, beside the others, so that a drift of the machine's speed falls on all;
# race-turns races K-FAC 512, Adam and gradient descent in turns, one step each
# (--interleave; docs/compare/resnet-random-turns.json, with SEED=S -seedS.json);
# kfac11 tunes K-FAC 512's inverse warm-up on seed 1, in turns
# (docs/compare/tuning/resnet-random-kfac11.json); race-warmup races its winner (WARMUP)
# against race-turns' K-FAC and Adam, in turns (docs/compare/resnet-random-warmup.json,
# with SEED=S -seedS.json);
# step-setup times the first steps of Adam and gradient descent alone and in turns, with
# and without a memory arena per thread, and with Eigen's kernels
# (docs/compare/step-setup/).
# K-FAC (perturbed start): tune-kfac, tune-kfac2 and tune-kfac3 tune every method again on
# seed 1 from given weights trained on this machine
# (docs/compare/tuning/resnet-perturbed-kfac.json, -kfac2.json, -kfac3.json); race-kfac races
# the winners on seed 0 (KFAC_OUT, default docs/compare/resnet-perturbed-kfac.json).
# Usage: scripts/compare-resnet.sh START STAGE   (START random|perturbed, STAGE
#        tune|tune2|tune3|race|kfac|kfac2|...|kfac11|race-kfac-dim|race-kfac-dim2|step-costs|race-turns|race-warmup|step-setup|tune-kfac|...|tune-kfac3|race-kfac; tune2,
#        tune3, tune-kfac*: the perturbed start's; kfac*: the random start's; race-kfac: both)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
start=${1:?random or perturbed}
stage=${2:?tune or race}
given=runs/resnet_perturbed/given/weights.h5
# Gauss-Newton, Levenberg-Marquardt damping, CG capped at 10 (no Fisher preconditioner:
# its per-sample squared gradients of 23.6 M weights cost more than they save here).
GN="newton,curvature=gauss_newton,damping_rule=levenberg_marquardt,preconditioner=none,cg_rtol=0.1,cg_max_iter=10,cg_reorthogonalize=false"
case $start in
    random)
        job=(jobs/resnet_mnist.toml)
        eval_samples=${EVAL_SAMPLES:-1024} ;;
    perturbed)
        [ -f "$given" ] || { echo "no $given: run scripts/resnet_perturbed.sh first" >&2; exit 1; }
        job=(jobs/resnet_mnist_perturbed.toml --set "model.weights=\"$given\"")
        eval_samples=${EVAL_SAMPLES:-2048} ;;
    *) echo "START must be random or perturbed" >&2; exit 2 ;;
esac
race() { bash scripts/mpirun.sh -n 2 python -m mpinewton.compare "${job[@]}" \
             --eval-samples "$eval_samples" --eval-seconds "${EVAL_SECONDS:-15}" "$@"; }
if [[ $stage == tune ]]; then
    if [[ $start == random ]]; then
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "gn-lm-f0.25=$GN,damping=1e-2,curvature_fraction=0.25" \
            --variant "gn-lm-f1=$GN,damping=1e-2,curvature_fraction=1.0" \
            --variant "gd-lr0.03=gd,learning_rate=0.03" --variant "gd-lr0.1=gd,learning_rate=0.1" \
            --variant "gd-lr0.3=gd,learning_rate=0.3" \
            --variant "momentum-lr0.01=momentum,learning_rate=0.01" \
            --variant "momentum-lr0.03=momentum,learning_rate=0.03" \
            --variant "momentum-lr0.1=momentum,learning_rate=0.1" \
            --variant "adam-lr0.0003=adam,learning_rate=0.0003" \
            --variant "adam-lr0.001=adam,learning_rate=0.001" \
            --variant "adam-lr0.003=adam,learning_rate=0.003" \
            --out docs/compare/tuning/resnet-random.json
        # Adam's best rate was at the grid's low edge: one more below it.
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "adam-lr0.0001=adam,learning_rate=0.0001" \
            --out docs/compare/tuning/resnet-random2.json
    else
        race --set run.seed=1 --time-limit "${TUNE_TIME:-60}" \
            --variant "newton-job=newton" \
            --variant "gn-lm-d1=$GN,damping=1.0,curvature_fraction=1.0" \
            --variant "gn-lm-d100=$GN,damping=100.0,curvature_fraction=1.0" \
            --variant "gd-lr0.003=gd,learning_rate=0.003" --variant "gd-lr0.01=gd,learning_rate=0.01" \
            --variant "gd-lr0.03=gd,learning_rate=0.03" \
            --variant "momentum-lr0.001=momentum,learning_rate=0.001" \
            --variant "momentum-lr0.003=momentum,learning_rate=0.003" \
            --variant "momentum-lr0.01=momentum,learning_rate=0.01" \
            --variant "adam-lr0.0001=adam,learning_rate=0.0001" \
            --variant "adam-lr0.0003=adam,learning_rate=0.0003" \
            --variant "adam-lr0.001=adam,learning_rate=0.001" \
            --out docs/compare/tuning/resnet-perturbed.json
    fi
elif [[ $stage == tune2 ]]; then
    [[ $start == perturbed ]] || { echo "tune2 is the perturbed start's second round" >&2; exit 2; }
    # The best rates of gradient descent, momentum and Adam were at the low edges of
    # their grids: one below each; and the job's Newton-CG on batches of 64.
    race --set run.seed=1 --time-limit "${TUNE_TIME:-60}" \
        --variant "newton-job-b64=newton,batch_size=64" \
        --variant "gd-lr0.001=gd,learning_rate=0.001" \
        --variant "momentum-lr0.0003=momentum,learning_rate=0.0003" \
        --variant "adam-lr3e-05=adam,learning_rate=3e-5" \
        --out docs/compare/tuning/resnet-perturbed2.json
elif [[ $stage == tune3 ]]; then
    [[ $start == perturbed ]] || { echo "tune3 is the perturbed start's third round" >&2; exit 2; }
    # Adam's best rate (3e-5) was again at the low edge: one below it.
    race --set run.seed=1 --time-limit "${TUNE_TIME:-60}" \
        --variant "adam-lr1e-05=adam,learning_rate=1e-5" \
        --out docs/compare/tuning/resnet-perturbed3.json
elif [[ $stage == tune-kfac || $stage == tune-kfac2 || $stage == tune-kfac3 || ( $stage == race-kfac && $start == perturbed ) ]]; then
    [[ $start == perturbed ]] || { echo "$stage is the perturbed start's" >&2; exit 2; }
    # Every method again, K-FAC among them, from given weights trained anew on this
    # machine (its kernels round differently from the machine of the races above): the
    # first-order rates around their earlier winners, the job's Newton-CG, and K-FAC with
    # the sampled Fisher of the whole batch of 16 (one backward pass), its KL clip (the
    # step's length while it binds) and damping.
    k="kfac,fisher=\"sampled\""
    if [[ $stage == tune-kfac ]]; then
        race --set run.seed=1 --time-limit "${TUNE_TIME:-60}" \
            --variant "newton-job=newton" \
            --variant "kfac-kl1e-5=$k,kl_clip=1e-5" \
            --variant "kfac-kl1e-4=$k,kl_clip=1e-4" \
            --variant "kfac-kl1e-3=$k,kl_clip=1e-3" \
            --variant "kfac-kl1e-4-d1e-2=$k,kl_clip=1e-4,damping=1e-2" \
            --variant "gd-lr0.001=gd,learning_rate=0.001" \
            --variant "gd-lr0.003=gd,learning_rate=0.003" --variant "gd-lr0.01=gd,learning_rate=0.01" \
            --variant "momentum-lr0.0003=momentum,learning_rate=0.0003" \
            --variant "momentum-lr0.001=momentum,learning_rate=0.001" \
            --variant "momentum-lr0.003=momentum,learning_rate=0.003" \
            --variant "adam-lr1e-05=adam,learning_rate=1e-5" \
            --variant "adam-lr3e-05=adam,learning_rate=3e-5" \
            --variant "adam-lr0.0001=adam,learning_rate=0.0001" \
            --out docs/compare/tuning/resnet-perturbed-kfac.json
    elif [[ $stage == tune-kfac2 ]]; then
        # Gradient descent's and momentum's best rates were at their grids' high edges:
        # one above each. K-FAC raised the loss at every clip, less the shorter the
        # clip and the larger the damping: shorter clips, larger dampings.
        race --set run.seed=1 --time-limit "${TUNE_TIME:-60}" \
            --variant "kfac-kl1e-6=$k,kl_clip=1e-6" \
            --variant "kfac-kl1e-7=$k,kl_clip=1e-7" \
            --variant "kfac-kl1e-5-d0.1=$k,kl_clip=1e-5,damping=0.1" \
            --variant "kfac-kl1e-5-d1=$k,kl_clip=1e-5,damping=1.0" \
            --variant "gd-lr0.03=gd,learning_rate=0.03" \
            --variant "momentum-lr0.01=momentum,learning_rate=0.01" \
            --out docs/compare/tuning/resnet-perturbed-kfac2.json
    elif [[ $stage == tune-kfac3 ]]; then
        # K-FAC's best clip (1e-7) was at the grid's low edge, and damping 0.1 and 1 both
        # helped at the clip 1e-5: one clip below, and larger dampings with longer clips.
        race --set run.seed=1 --time-limit "${TUNE_TIME:-60}" \
            --variant "kfac-kl1e-8=$k,kl_clip=1e-8" \
            --variant "kfac-kl1e-7-d0.1=$k,kl_clip=1e-7,damping=0.1" \
            --variant "kfac-kl1e-6-d1=$k,kl_clip=1e-6,damping=1.0" \
            --variant "kfac-kl1e-5-d10=$k,kl_clip=1e-5,damping=10.0" \
            --out docs/compare/tuning/resnet-perturbed-kfac3.json
    else
        : "${KFAC:?KFAC=spec of the K-FAC variant}" "${GD_LR:?}" "${MOMENTUM_LR:?}" "${ADAM_LR:?}"
        race --set run.seed=0 --time-limit "${TIME:-120}" \
            --reference "gd-lr$GD_LR" --reference-iters "${REFERENCE_ITERS:-100}" \
            --variant "kfac=$KFAC" --variant "newton-job=newton" \
            --variant "adam-lr$ADAM_LR=adam,learning_rate=$ADAM_LR" \
            --variant "momentum-lr$MOMENTUM_LR=momentum,learning_rate=$MOMENTUM_LR" \
            --variant "gd-lr$GD_LR=gd,learning_rate=$GD_LR" \
            --out "${KFAC_OUT:-docs/compare/resnet-perturbed-kfac.json}"
    fi
elif [[ $stage =~ ^(kfac([2-9]|1[01])?|race-kfac|race-kfac-dim2?|step-costs|race-turns|race-warmup|step-setup)$ ]]; then
    [[ $start == random ]] || { echo "$stage is the random start's" >&2; exit 2; }
    # K-FAC with its factors from an eighth or a quarter of each batch of 256 (10
    # backward passes a sample for G), its KL clip (which sets the step's length while it
    # binds, whatever the learning rate) and damping; factors of order above 2048 as
    # diagonals (max_factor_dim: whole, they ran 2 ranks out of memory).
    k="kfac,curvature_fraction=0.125"
    # round 5's sampled Fisher on a sixteenth of each batch: rounds 6-7 and race-kfac-dim
    sampled="kfac,kl_clip=3e-4,fisher=\"sampled\",curvature_fraction=0.0625"
    # the same with factors above 256 as diagonals and no clip of its own: rounds 9-10's
    sampled256="kfac,fisher=\"sampled\",curvature_fraction=0.0625,max_factor_dim=256"
    # round 5's sampled Fisher with factors above 512 as diagonals: race-turns' K-FAC
    sampled512="$sampled,max_factor_dim=512"
    if [[ $stage == kfac ]]; then
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-f0.125=$k" \
            --variant "kfac-f0.25=kfac,curvature_fraction=0.25" \
            --variant "kfac-kl3e-4-f0.125=$k,kl_clip=3e-4" \
            --variant "kfac-kl3e-3-f0.125=$k,kl_clip=3e-3" \
            --variant "kfac-d1e-2-f0.125=$k,damping=1e-2" \
            --variant "kfac-d1e-4-f0.125=$k,damping=1e-4" \
            --out docs/compare/tuning/resnet-random-kfac.json
    elif [[ $stage == kfac2 ]]; then
        # The smallest KL clip (3e-4) was best, at the grid's edge, and damping 1e-2
        # second: one clip below, and the two together.
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-kl1e-4-f0.125=$k,kl_clip=1e-4" \
            --variant "kfac-kl3e-4-d1e-2-f0.125=$k,kl_clip=3e-4,damping=1e-2" \
            --variant "kfac-kl1e-4-d1e-2-f0.125=$k,kl_clip=1e-4,damping=1e-2" \
            --out docs/compare/tuning/resnet-random-kfac2.json
    elif [[ $stage == kfac3 ]]; then
        # A K-FAC step cost 3.3 Adam steps in the first race: new factors (10 backward
        # passes of 32 images) every 2 or 5 steps instead of every step.
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-kl3e-4-f0.125=$k,kl_clip=3e-4" \
            --variant "kfac-kl3e-4-f0.125-s2=$k,kl_clip=3e-4,stats_every=2" \
            --variant "kfac-kl3e-4-f0.125-s5=$k,kl_clip=3e-4,stats_every=5" \
            --out docs/compare/tuning/resnet-random-kfac3.json
    elif [[ $stage == kfac4 ]]; then
        # The factor sample's winner (an eighth) was at the edge of a grid of two: an
        # eighth, a sixteenth and a thirty-second, with new factors every 2 steps (after
        # the step stopped copying its state and computed its direction in float32).
        k="kfac,kl_clip=3e-4,stats_every=2"
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-kl3e-4-f0.125-s2=$k,curvature_fraction=0.125" \
            --variant "kfac-kl3e-4-f0.0625-s2=$k,curvature_fraction=0.0625" \
            --variant "kfac-kl3e-4-f0.03125-s2=$k,curvature_fraction=0.03125" \
            --out docs/compare/tuning/resnet-random-kfac4.json
    elif [[ $stage == kfac5 ]]; then
        # The sampled Fisher (one drawn label a sample: one backward pass for G, not 10):
        # factor samples around round 4's winner, and new factors every step.
        k="kfac,kl_clip=3e-4,fisher=\"sampled\""
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-sampled-f0.125-s2=$k,curvature_fraction=0.125,stats_every=2" \
            --variant "kfac-sampled-f0.0625-s2=$k,curvature_fraction=0.0625,stats_every=2" \
            --variant "kfac-sampled-f0.03125-s2=$k,curvature_fraction=0.03125,stats_every=2" \
            --variant "kfac-sampled-f0.0625-s1=$k,curvature_fraction=0.0625" \
            --out docs/compare/tuning/resnet-random-kfac5.json
    elif [[ $stage == kfac6 ]]; then
        # Round 5's winner with its damped inverses every 5, 10 (the default) or 20 steps.
        k=$sampled
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-sampled-f0.0625-s1-i5=$k,inverse_every=5" \
            --variant "kfac-sampled-f0.0625-s1-i10=$k" \
            --variant "kfac-sampled-f0.0625-s1-i20=$k,inverse_every=20" \
            --out docs/compare/tuning/resnet-random-kfac6.json
    elif [[ $stage == kfac7 ]]; then
        # Round 6's winner with its factors of order above 256, 512, 1025 or 2048 (the
        # default) kept as diagonals: 2048 was chosen for memory, never tuned. Every full
        # factor costs its products in each direction and its inversion at each refresh.
        k=$sampled
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-sampled-f0.0625-d256=$k,max_factor_dim=256" \
            --variant "kfac-sampled-f0.0625-d512=$k,max_factor_dim=512" \
            --variant "kfac-sampled-f0.0625-d1025=$k,max_factor_dim=1025" \
            --variant "kfac-sampled-f0.0625-d2048=$k" \
            --out docs/compare/tuning/resnet-random-kfac7.json
    elif [[ $stage == kfac8 ]]; then
        # Round 7's lowest mean loss over the trace was at its grid's low edge (256): below
        # it, down to every factor a diagonal (1), with 512 again beside them.
        k=$sampled
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-sampled-f0.0625-d1=$k,max_factor_dim=1" \
            --variant "kfac-sampled-f0.0625-d128=$k,max_factor_dim=128" \
            --variant "kfac-sampled-f0.0625-d256=$k,max_factor_dim=256" \
            --variant "kfac-sampled-f0.0625-d512=$k,max_factor_dim=512" \
            --out docs/compare/tuning/resnet-random-kfac8.json
    elif [[ $stage == kfac9 ]]; then
        # The KL clip binds at every step (its scale 0.003-0.04 in race-kfac-dim), so it
        # alone sets the step's length; 3e-4 was tuned with the exact Fisher on an eighth
        # and 2048 (rounds 1-2): round 8's winner (256) with clips around it.
        k=$sampled256
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-sampled-d256-kl1e-4=$k,kl_clip=1e-4" \
            --variant "kfac-sampled-d256-kl3e-4=$k,kl_clip=3e-4" \
            --variant "kfac-sampled-d256-kl1e-3=$k,kl_clip=1e-3" \
            --variant "kfac-sampled-d256-kl3e-3=$k,kl_clip=3e-3" \
            --out docs/compare/tuning/resnet-random-kfac9.json
    elif [[ $stage == kfac10 ]]; then
        # Round 9's lowest mean was at its grid's low edge (1e-4): one clip below, with
        # 1e-4 again beside it.
        k=$sampled256
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" \
            --variant "kfac-sampled-d256-kl3e-5=$k,kl_clip=3e-5" \
            --variant "kfac-sampled-d256-kl1e-4=$k,kl_clip=1e-4" \
            --out docs/compare/tuning/resnet-random-kfac10.json
    elif [[ $stage == race-kfac-dim ]]; then
        # Round 7's candidate (factors above 512 as diagonals: the lowest mean loss over
        # the trace) against the race's K-FAC (2048: the lowest final loss), Adam and
        # gradient descent (the reference) on seed SEED (0; not tuned on), TIME (200) s each.
        k=$sampled
        seed=${SEED:-0}
        race --set "run.seed=$seed" --time-limit "${TIME:-200}" \
            --reference gd-lr0.1 --reference-iters "${REFERENCE_ITERS:-100}" \
            --variant "kfac-d512=$k,max_factor_dim=512" \
            --variant "kfac-d2048=$k" \
            --variant "adam-lr0.0003=adam,learning_rate=0.0003" \
            --variant "gd-lr0.1=gd,learning_rate=0.1" \
            --out "docs/compare/resnet-random-kfac-dim$([[ $seed == 0 ]] || echo "-seed$seed").json"
    elif [[ $stage == race-kfac-dim2 ]]; then
        # Round 8's candidate (256: the lowest mean loss over the trace in rounds 7 and 8,
        # between 128 and 512) against 512, Adam and gradient descent, as race-kfac-dim.
        k=$sampled
        seed=${SEED:-0}
        race --set "run.seed=$seed" --time-limit "${TIME:-200}" \
            --reference gd-lr0.1 --reference-iters "${REFERENCE_ITERS:-100}" \
            --variant "kfac-d256=$k,max_factor_dim=256" \
            --variant "kfac-d512=$k,max_factor_dim=512" \
            --variant "adam-lr0.0003=adam,learning_rate=0.0003" \
            --variant "gd-lr0.1=gd,learning_rate=0.1" \
            --out "docs/compare/resnet-random-kfac-dim2$([[ $seed == 0 ]] || echo "-seed$seed").json"
    elif [[ $stage == race-turns ]]; then
        # The race of race-kfac-dim2's winner (512) against Adam and gradient descent,
        # in turns, one step each (--interleave): a drift of the machine's speed falls on
        # all three alike, where race-kfac-dim2's verdicts followed it. Seed SEED (0).
        k=$sampled
        seed=${SEED:-0}
        race --set "run.seed=$seed" --time-limit "${TIME:-200}" --interleave \
            --reference gd-lr0.1 --reference-iters "${REFERENCE_ITERS:-100}" \
            --variant "kfac-d512=$k,max_factor_dim=512" \
            --variant "adam-lr0.0003=adam,learning_rate=0.0003" \
            --variant "gd-lr0.1=gd,learning_rate=0.1" \
            --out "docs/compare/resnet-random-turns$([[ $seed == 0 ]] || echo "-seed$seed").json"
    elif [[ $stage == kfac11 ]]; then
        # K-FAC's first inverses come from the first step's 16 images and serve steps 1-10,
        # where race-turns' K-FAC spiked (steps 6-8: gradient norms 7-17): the inverses
        # also at every one of the first 5, 10 or 20 steps, beside none, in turns.
        k=$sampled512
        race --set run.seed=1 --time-limit "${TUNE_TIME:-90}" --interleave \
            --variant "kfac-d512=$k" \
            --variant "kfac-d512-iw5=$k,inverse_warmup=5" \
            --variant "kfac-d512-iw10=$k,inverse_warmup=10" \
            --variant "kfac-d512-iw20=$k,inverse_warmup=20" \
            --out docs/compare/tuning/resnet-random-kfac11.json
    elif [[ $stage == race-warmup ]]; then
        # kfac11's winner (WARMUP steps of inverses at every step) against race-turns'
        # K-FAC and Adam, in turns, on seed SEED (0; not tuned on), TIME (200) s each.
        : "${WARMUP:?WARMUP=inverse_warmup of the kfac11 winner}"
        k=$sampled512
        seed=${SEED:-0}
        race --set "run.seed=$seed" --time-limit "${TIME:-200}" --interleave \
            --variant "kfac-d512-iw$WARMUP=$k,inverse_warmup=$WARMUP" \
            --variant "kfac-d512=$k" \
            --variant "adam-lr0.0003=adam,learning_rate=0.0003" \
            --out "docs/compare/resnet-random-warmup$([[ $seed == 0 ]] || echo "-seed$seed").json"
    elif [[ $stage == step-setup ]]; then
        # 8 steps of Adam and gradient descent, no pre-training: alone; in turns with an
        # arena per thread (glibc's default; a MALLOC_ARENA_MAX set by the user is left
        # alone); in turns as --interleave runs them (one arena); and 4 steps alone with
        # TensorFlow's Eigen kernels instead of oneDNN's.
        a=(--set optimizer.pretrain_iters=0 --eval-seconds 1000
           --variant "adam-lr0.0003=adam,learning_rate=0.0003"
           --variant "gd-lr0.1=gd,learning_rate=0.1")
        out=docs/compare/step-setup
        race "${a[@]}" --max-iters 8 --out $out/alone.json
        MALLOC_ARENA_MAX=8 race "${a[@]}" --max-iters 8 --interleave \
            --out $out/turns-arena-per-thread.json
        race "${a[@]}" --max-iters 8 --interleave --out $out/turns.json
        TF_ENABLE_ONEDNN_OPTS=0 race "${a[@]}" --max-iters 4 --out $out/alone-eigen.json
    elif [[ $stage == step-costs ]]; then
        # The races' step times moved by up to 45 % between runs of the same steps (Adam:
        # 0.99 s and 1.45 s on seed 2): the same 25 steps of each method, in turn, 3 times.
        k=$sampled
        turns=()
        for turn in 1 2 3; do
            turns+=(--variant "adam-lr0.0003-$turn=adam,learning_rate=0.0003"
                    --variant "kfac-d512-$turn=$k,max_factor_dim=512"
                    --variant "kfac-d256-$turn=$k,max_factor_dim=256"
                    --variant "gd-lr0.1-$turn=gd,learning_rate=0.1")
        done
        race --set run.seed=0 --max-iters 25 --time-limit 600 "${turns[@]}" \
            --out docs/compare/resnet-random-step-costs.json
    else
        : "${KFAC:?KFAC=spec of the K-FAC variant}" "${GD_LR:?}" "${MOMENTUM_LR:?}" "${ADAM_LR:?}"
        # the same first-order rates as the race above (tuned on seed 1 there)
        race --set run.seed=0 --time-limit "${TIME:-200}" \
            --reference "gd-lr$GD_LR" --reference-iters "${REFERENCE_ITERS:-100}" \
            --variant "kfac=$KFAC" \
            --variant "adam-lr$ADAM_LR=adam,learning_rate=$ADAM_LR" \
            --variant "momentum-lr$MOMENTUM_LR=momentum,learning_rate=$MOMENTUM_LR" \
            --variant "gd-lr$GD_LR=gd,learning_rate=$GD_LR" \
            --out "${KFAC_OUT:-docs/compare/resnet-random-kfac.json}"
    fi
elif [[ $stage == race ]]; then
    # The winners of the tuning run, from the environment (docs/results.md says which).
    : "${NEWTON:?NEWTON=spec of the Newton-CG variant}" "${GD_LR:?}" "${MOMENTUM_LR:?}" "${ADAM_LR:?}"
    newton=(--variant "newton=$NEWTON")  # and the job's own, unless that is the winner
    [[ $NEWTON == newton ]] || newton+=(--variant "newton-job=newton")
    race --set run.seed=0 --time-limit "${TIME:-300}" \
        --reference "gd-lr$GD_LR" --reference-iters "${REFERENCE_ITERS:-100}" \
        "${newton[@]}" \
        --variant "adam-lr$ADAM_LR=adam,learning_rate=$ADAM_LR" \
        --variant "momentum-lr$MOMENTUM_LR=momentum,learning_rate=$MOMENTUM_LR" \
        --variant "gd-lr$GD_LR=gd,learning_rate=$GD_LR" \
        --out "docs/compare/resnet-$start.json"
else
    echo "unknown STAGE $stage (see the usage at the top of $0)" >&2
    exit 2
fi
