# shellcheck shell=bash
# Shared body of the sbatch templates in slurm/ (sourced, never run on its own).
#
# A template sets MPINEWTON_JOB (its default job file) and MPINEWTON_ROOT (the
# repository), sources this file and calls `mpinewton_main "$@"`. What happens:
#
#  1. Environment: the virtualenv, one TensorFlow thread per rank (or
#     --cpus-per-task threads), HDF5 file locking off.
#  2. The trainer starts under the launcher (srun --mpi=pmix, or mpirun), always
#     with --resume: a first run starts afresh, a requeued run continues from the
#     run directory's latest valid checkpoint.
#  3. SIGUSR1 (from `#SBATCH --signal=B:USR1@margin` before the time limit, or
#     `scancel -s USR1 -b JOBID`) and SIGTERM reach this batch shell only; the
#     trap forwards SIGUSR1 to the launcher, which forwards it to every rank. The
#     ranks agree at the next iteration boundary, rank 0 writes a checkpoint and
#     the job exits with code 75 ("checkpointed, not finished").
#  4. On exit code 75 the job requeues itself (`scontrol requeue`) while
#     SLURM_RESTART_COUNT < MPINEWTON_MAX_RESTARTS; the requeued job runs this
#     script again, which resumes. Exit codes: 0 finished, 2 bad input (never
#     requeued), 3 diverged (never requeued: the job needs a lower learning rate or
#     more damping), 75 checkpointed (requeued unless the cap is reached), others failure.
#  5. Before the launch, a warning when the job's mini-batch (optimizer.batch_size in
#     the job file, or a --set optimizer.batch_size=N argument) is smaller than the
#     number of ranks: the ranks beyond the batch get no samples (the trainer warns too).
#
# Environment variables (all optional; docs/cluster.md):
#   MPINEWTON_ROOT          repository root (default: the directory sbatch ran in)
#   MPINEWTON_VENV          virtualenv to activate (default $MPINEWTON_ROOT/.venv;
#                           set it empty to use the environment as it is)
#   MPINEWTON_JOB           job file (default: the template's)
#   MPINEWTON_RUN_DIR       run directory (default runs/<job name>-<SLURM_JOB_ID>;
#                           point a new submission at an old run directory to continue it)
#   MPINEWTON_EXTRA_ARGS    more trainer arguments, split at blanks (e.g.
#                           "--set optimizer.iters=5"); arguments after the script
#                           name on the sbatch command line are added too
#   MPINEWTON_LAUNCHER      srun (default: srun --mpi=pmix) or mpirun
#   MPINEWTON_LAUNCHER_ARGS more launcher arguments, split at blanks
#                           (e.g. "--cpu-bind=cores", or "--mpi=pmi2" for MPICH)
#   MPINEWTON_MAX_RESTARTS  requeue cap (default 10)
#   MPINEWTON_INTRA_OP_THREADS  threads per rank (default --cpus-per-task, else 1)

mpinewton_log() {
    printf '[mpinewton-slurm %s] %s\n' "$(date '+%F %T')" "$*"
}

mpinewton_die() {
    mpinewton_log "error: $*" >&2
    exit 2
}

# The job's mini-batch size: the last optimizer.batch_size of the job file's
# [optimizer] table, or of a `optimizer.batch_size=N` trainer argument (later
# ones win, as in the trainer); 0 (the whole training set) when none is given.
mpinewton_batch_size() {
    local job=$1 arg batch
    shift
    batch=$(awk '
        /^[[:space:]]*\[/ { section = $0; gsub(/[[:space:]]|#.*/, "", section); next }
        section == "[optimizer]" && /^[[:space:]]*batch_size[[:space:]]*=/ {
            value = $0; sub(/^[^=]*=[[:space:]]*/, "", value); sub(/[[:space:]#].*/, "", value)
            print value
        }' "$job" 2>/dev/null | tail -n 1)
    for arg in "$@"; do
        if [[ $arg =~ optimizer\.batch_size[[:space:]]*=[[:space:]]*([0-9]+) ]]; then
            batch=${BASH_REMATCH[1]}
        fi
    done
    echo "${batch:-0}"
}

# Warn when a mini-batch of b samples on n > b ranks leaves n - b ranks idle:
# mpinewton_check_batch NTASKS JOB TRAINER_ARGS...
mpinewton_check_batch() {
    local ntasks=$1 job=$2 batch
    shift 2
    batch=$(mpinewton_batch_size "$job" "$@")
    if [[ $batch =~ ^[0-9]+$ ]] && [[ $ntasks =~ ^[0-9]+$ ]] && [ "$batch" -gt 0 ] &&
            [ "$batch" -lt "$ntasks" ]; then
        mpinewton_log "warning: optimizer.batch_size = $batch (from $job and the trainer \
arguments) on $ntasks ranks leaves $((ntasks - batch)) of the $ntasks ranks without samples in \
every iteration (they only wait); raise it to at least $ntasks (--set \
optimizer.batch_size=$ntasks after the script name, or in MPINEWTON_EXTRA_ARGS) or ask for at \
most $batch tasks"
    fi
}

# Set by the trap (the signal's name) and by mpinewton_wait (the launcher's exit code).
_mpinewton_caught=""
status=0
_mpinewton_launcher_pid=""

_mpinewton_forward() {
    _mpinewton_caught=$1
    mpinewton_log "received SIG$1; asking the ranks to checkpoint and stop (SIGUSR1 to the launcher)"
    # Both launchers pass SIGUSR1 on to every rank and keep running (srun forwards
    # it as a step signal, mpirun forwards it by default), whereas SIGTERM would make
    # mpirun tear the job down. The trainer treats SIGUSR1 and SIGTERM alike.
    if [ -n "$_mpinewton_launcher_pid" ]; then
        kill -s USR1 "$_mpinewton_launcher_pid" 2>/dev/null || true
    fi
}

# Wait for the launcher and set `status` to its exit code. A trapped signal
# interrupts `wait`, which then returns 128+n while the launcher still runs: wait
# again. If the trap fired just as the launcher ended, the 128+n is the trap's:
# bash keeps a finished child's status, so one more `wait` returns the real one
# (or 127 where this bash has forgotten it, and then the first answer was right).
mpinewton_wait() {
    local pid=$1 again
    while :; do
        status=0
        wait "$pid" || status=$?
        if [ "$status" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        if [ "$status" -gt 128 ]; then
            again=0
            wait "$pid" || again=$?
            if [ "$again" -ne 127 ]; then
                status=$again
            fi
        fi
        return 0
    done
}

mpinewton_main() {
    local root=${MPINEWTON_ROOT:?MPINEWTON_ROOT is not set}
    cd "$root" || mpinewton_die "cannot enter the repository root $root"
    if [ ! -d mpinewton ] || [ ! -d jobs ]; then
        mpinewton_die "$root is not the mpinewton repository: submit from the repository \
root (sbatch slurm/<template>.sh) or set MPINEWTON_ROOT"
    fi

    local venv=${MPINEWTON_VENV-$root/.venv}
    if [ -n "$venv" ]; then
        [ -f "$venv/bin/activate" ] || mpinewton_die "no virtualenv at $venv (run \
scripts/setup.sh on the cluster first, or set MPINEWTON_VENV; empty = use the current environment)"
        # shellcheck disable=SC1091
        . "$venv/bin/activate"
    fi

    local job=${MPINEWTON_JOB:?MPINEWTON_JOB is not set}
    [ -f "$job" ] || mpinewton_die "job file $job not found (in $root); set MPINEWTON_JOB to \
an existing job file, e.g. MPINEWTON_JOB=jobs/mnist_cnn.toml"

    local name
    name=$(basename "$job" .toml)
    local run_dir=${MPINEWTON_RUN_DIR:-runs/$name-${SLURM_JOB_ID:-local}}

    # One rank per core, each with its own share of threads: --cpus-per-task
    # threads per rank (1 in the templates: 28 ranks x 1 thread per Haswell node).
    local threads=${MPINEWTON_INTRA_OP_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export MPINEWTON_INTRA_OP_THREADS=$threads OMP_NUM_THREADS=$threads
    # Many ranks read one HDF5 file, often on a network file system.
    export HDF5_USE_FILE_LOCKING=FALSE
    export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
    export PYTHONUNBUFFERED=1

    local ntasks=${SLURM_NTASKS:-1} cpus=${SLURM_CPUS_PER_TASK:-1}
    local -a launcher launcher_extra trainer_extra
    read -r -a launcher_extra <<< "${MPINEWTON_LAUNCHER_ARGS:-}"
    read -r -a trainer_extra <<< "${MPINEWTON_EXTRA_ARGS:-}"
    case ${MPINEWTON_LAUNCHER:-srun} in
        # srun does not take --cpus-per-task from sbatch (SLURM >= 22.05): repeat it.
        srun) launcher=(srun --mpi=pmix --ntasks="$ntasks" --cpus-per-task="$cpus") ;;
        mpirun) launcher=(mpirun -n "$ntasks") ;;
        *) mpinewton_die "MPINEWTON_LAUNCHER=${MPINEWTON_LAUNCHER} (expected srun or mpirun)" ;;
    esac

    # --resume first: anything after it on the command line cannot be taken for its
    # optional PATH. A later --resume PATH or --resume required (extra arguments) wins.
    local -a cmd=("${launcher[@]}" "${launcher_extra[@]}" python -m mpinewton.train "$job"
                  --resume --run-dir "$run_dir" "${trainer_extra[@]}" "$@")
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MPINEWTON_MAX_RESTARTS:-10}
    mpinewton_log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) restart $restarts of at most \
$max; nodes ${SLURM_JOB_NODELIST:-$(hostname -s)}; $ntasks ranks x $threads thread(s)"
    mpinewton_log "run directory $run_dir"
    mpinewton_check_batch "$ntasks" "$job" "${trainer_extra[@]}" "$@"
    mpinewton_log "running: ${cmd[*]}"

    trap '_mpinewton_forward USR1' USR1
    trap '_mpinewton_forward TERM' TERM
    "${cmd[@]}" &
    _mpinewton_launcher_pid=$!
    mpinewton_wait "$_mpinewton_launcher_pid"
    # A killed Open MPI launcher leaves its session files in $TMPDIR/ompi.<pid>, which
    # stop a later launcher that draws the same pid (scripts/mpirun.sh): it is gone now.
    if [ "${MPINEWTON_LAUNCHER:-srun}" = mpirun ] &&
            [ -d "${TMPDIR:-/tmp}/ompi.$_mpinewton_launcher_pid" ]; then
        rm -rf -- "${TMPDIR:-/tmp}/ompi.$_mpinewton_launcher_pid"
    fi
    _mpinewton_launcher_pid=""
    mpinewton_log "trainer exited with code $status"

    local requeue=""
    if [ "$status" -eq 75 ]; then
        requeue="checkpointed, not finished"
    elif [ -n "$_mpinewton_caught" ] && [ "$status" -ne 0 ] && [ "$status" -ne 2 ] &&
            [ "$status" -ne 3 ]; then
        # The signal came before the trainer could handle it (e.g. while TensorFlow
        # was loading): the latest checkpoint on disk is still valid, so resume from it.
        requeue="stopped by SIG$_mpinewton_caught before a checkpoint"
    fi
    if [ -n "$requeue" ]; then
        if [ -z "${SLURM_JOB_ID:-}" ]; then
            mpinewton_log "$requeue; not under SLURM: run again to resume"
        elif [ "$restarts" -ge "$max" ]; then
            mpinewton_log "$requeue; requeue cap reached ($restarts restarts, \
MPINEWTON_MAX_RESTARTS=$max): resubmit with MPINEWTON_RUN_DIR=$run_dir to continue"
        else
            mpinewton_log "$requeue; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of \
at most $max); it will resume from $run_dir/checkpoints"
            scontrol requeue "$SLURM_JOB_ID" || mpinewton_log "scontrol requeue failed (job \
cancelled?); resubmit with MPINEWTON_RUN_DIR=$run_dir to continue"
        fi
    fi
    exit "$status"
}
