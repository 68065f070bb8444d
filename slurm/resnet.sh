#!/usr/bin/env bash
# ResNet-50 on ImageNet (jobs/resnet50_imagenet.toml) on four 28-core Haswell
# nodes: 112 MPI ranks of one thread each. Submit from the repository root:
#
#   sbatch slurm/resnet.sh
#   sbatch --nodes=8 --time=24:00:00 slurm/resnet.sh         # sbatch options override #SBATCH lines
#   MPINEWTON_RUN_DIR=runs/resnet50-1234 sbatch slurm/resnet.sh   # continue an earlier run
#
# The ImageNet HDF5 file named by the job (docs/data.md), the virtualenv and the
# run directory must be on a file system that every node sees. Results go to
# runs/resnet50_imagenet-<job id>/ (MPINEWTON_RUN_DIR to choose), the log to
# slurm-resnet50-<job id>.out in the submission directory, appended to across
# requeues. The job always runs with --resume: before the time limit (the
# --signal margin) or on `scancel -s USR1 -b <job id>` it checkpoints, exits
# with code 75 and requeues itself (at most MPINEWTON_MAX_RESTARTS times); the
# requeued job continues from the checkpoint. All variables and exit codes:
# slurm/common.sh, docs/cluster.md.
#
# The job's mini-batch (optimizer.batch_size = 16) is smaller than the 112 ranks:
# 96 ranks get no samples and only wait, and the log says so before the launch.
# Raise it with the ranks: sbatch slurm/resnet.sh --set optimizer.batch_size=112
#
# ntasks-per-node x cpus-per-task = 28 cores; --hint=nomultithread: one rank per
# physical core; --exclusive: whole nodes. --signal=B:USR1@900: SIGUSR1 to this
# batch shell 900 s before the time limit. The ranks stop only at an iteration
# boundary, so the margin must exceed the longest Newton iteration (up to
# cg_max_iter Hessian-vector products; see iter_seconds in metrics.jsonl) plus a
# checkpoint write; SLURM may also send it up to a minute early. --requeue and
# --open-mode=append: see slurm/mnist_cnn.sh.
#SBATCH --job-name=resnet50
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=28
#SBATCH --cpus-per-task=1
#SBATCH --hint=nomultithread
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# SLURM runs a copy of this script from its spool directory: find the
# repository from the submission directory (or MPINEWTON_ROOT), not from $0.
export MPINEWTON_ROOT=${MPINEWTON_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
export MPINEWTON_JOB=${MPINEWTON_JOB:-jobs/resnet50_imagenet.toml}
if [ ! -f "$MPINEWTON_ROOT/slurm/common.sh" ]; then
    echo "error: $MPINEWTON_ROOT/slurm/common.sh not found: submit from the mpinewton" \
         "repository root or set MPINEWTON_ROOT" >&2
    exit 2
fi
if [ ! -f "$MPINEWTON_ROOT/$MPINEWTON_JOB" ] && [ ! -f "$MPINEWTON_JOB" ]; then
    echo "error: the ResNet-50 job file $MPINEWTON_JOB is not in $MPINEWTON_ROOT: submit" \
         "from the repository root, or set MPINEWTON_JOB to a job file" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
. "$MPINEWTON_ROOT/slurm/common.sh"
mpinewton_main "$@"
