#!/usr/bin/env bash
# The thesis' CNN on MNIST (jobs/mnist_cnn.toml) on one 28-core Haswell node:
# 28 MPI ranks of one thread each. Submit from the repository root:
#
#   sbatch slurm/mnist_cnn.sh                                # the default job
#   sbatch slurm/mnist_cnn.sh --set optimizer.iters=40       # trainer arguments after the script
#   sbatch --nodes=2 --time=00:20:00 slurm/mnist_cnn.sh      # sbatch options override #SBATCH lines
#   MPINEWTON_LAUNCHER=mpirun sbatch slurm/mnist_cnn.sh      # mpirun instead of srun --mpi=pmix
#
# Results go to runs/mnist_cnn-<job id>/ (MPINEWTON_RUN_DIR to choose), the log to
# slurm-mnist_cnn-<job id>.out in the submission directory, appended to across
# requeues. The job always runs with --resume: before the time limit (the
# --signal margin) or on `scancel -s USR1 -b <job id>` it checkpoints, exits
# with code 75 and requeues itself; the requeued job continues from the
# checkpoint. All variables and exit codes: slurm/common.sh, docs/cluster.md.
#
# ntasks-per-node x cpus-per-task = 28 cores; --hint=nomultithread: one rank per
# physical core, not per hyperthread; --exclusive: no other job shares the node.
# --signal=B:USR1@300: SIGUSR1 to this batch shell (B:) 300 s before the time
# limit; keep the margin above the longest iteration plus a checkpoint write
# (iter_seconds in metrics.jsonl). --requeue: SLURM may requeue the job (node
# failure, preemption) and so may the job itself. --open-mode=append: a requeued
# run adds to the log instead of truncating it.
#SBATCH --job-name=mnist_cnn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=28
#SBATCH --cpus-per-task=1
#SBATCH --hint=nomultithread
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# SLURM runs a copy of this script from its spool directory: find the
# repository from the submission directory (or MPINEWTON_ROOT), not from $0.
export MPINEWTON_ROOT=${MPINEWTON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
export MPINEWTON_JOB=${MPINEWTON_JOB:-jobs/mnist_cnn.toml}
if [ ! -f "$MPINEWTON_ROOT/slurm/common.sh" ]; then
    echo "error: $MPINEWTON_ROOT/slurm/common.sh not found: submit from the mpinewton" \
         "repository root or set MPINEWTON_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
. "$MPINEWTON_ROOT/slurm/common.sh"
mpinewton_main "$@"
