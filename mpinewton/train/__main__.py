"""``python -m mpinewton.train [JOB.toml] [--set key=value ...] [--run-dir DIR]``.

The command line: arguments, the launch check, exit codes.

Exit codes: 0 finished (also stopped early: converged, stalled, or no
validation improvement for ``eval.patience`` evaluations); 2 bad input (job,
data, model, checkpoint, run directory, a run directory in use by another
job), reported by every rank; 3 diverged (the loss became NaN/Inf or exceeded
``run.max_loss_ratio`` times its start: no checkpoint or weights file holds
the diverged weights; lower the learning rate or raise the damping, then
rerun, or ``--resume`` from the last checkpoint); 75 checkpointed, not
finished (SIGTERM or SIGUSR1 received: rerun with ``--resume``); anything
else a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mpinewton.comm import Comm, DistributedError, install_abort_handler, world
from mpinewton.config import ConfigError, load_job

#: Exit code of a job stopped by a bad input (config, data, model); see docs.
EXIT_BAD_INPUT = 2
#: Exit code of a job whose loss diverged (NaN/Inf, or above run.max_loss_ratio x the start).
EXIT_DIVERGED = 3
#: Exit code of a job that stopped on SIGTERM/SIGUSR1 after writing a checkpoint.
EXIT_CHECKPOINTED = 75


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the trainer."""
    parser = argparse.ArgumentParser(
        prog="python -m mpinewton.train",
        description="Train a Keras model with globalised Newton-CG (thesis Algorithm 4), "
                    "data-parallel over MPI ranks. Without JOB, runs jobs/mnist_cnn.toml.")
    parser.add_argument("job", nargs="?", default=None, help="TOML job file (default: "
                        "jobs/mnist_cnn.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one job key (repeatable)")
    parser.add_argument("--run-dir", default=None, help="run directory (default runs/<run.name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run directory that already holds a run "
                             "(its metrics and checkpoints are deleted)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        metavar="PATH|required",
                        help="continue from the run directory's latest valid checkpoint (a "
                             "fresh start when there is none), from the checkpoint PATH, or, "
                             "with 'required', fail when no valid checkpoint exists")
    parser.add_argument("--check-sync", action="store_true",
                        help="after every step, verify that all ranks hold bitwise identical "
                             "weights (one extra allgather of a hash per iteration); with "
                             "mini-batches also record a hash of the rows all ranks read")
    return parser.parse_args(argv)


def check_slurm_world(comm: Comm) -> None:
    """Refuse a launch that started N one-rank jobs instead of one N-rank job.

    ``srun`` without a working PMI plugin (or an MPI library built without
    it) starts every task as its own one-rank world; each would then train on
    the whole data set and overwrite the others' files. Inside an ``srun``
    step (``SLURM_STEP_ID`` set) a one-rank world in a step of several tasks
    is that failure. Only a one-rank world is refused: ranks that Open MPI's
    ``mpirun`` starts through its per-node daemons see the daemons' step
    (one task per node), not theirs, and are fine.
    """
    if os.environ.get("SLURM_STEP_ID") is None or comm.size != 1:
        return
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
        ntasks = os.environ.get(var, "")
        if ntasks.isdigit():
            break
    else:
        return
    if int(ntasks) > 1:
        raise ConfigError(
            f"SLURM started {ntasks} tasks ({var}) but the MPI world has 1 rank: the launcher "
            "started independent processes. Use `srun --mpi=pmix` (see `srun --mpi=list`) "
            "or `mpirun` inside the allocation (docs/cluster.md)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    comm = world()
    install_abort_handler(comm)
    from mpinewton.train.loop import RunDiverged

    try:
        comm.run_agreed(lambda: check_slurm_world(comm), "checking the launch")
        job = comm.run_agreed(lambda: load_job(args.job, args.overrides), "reading the job")
        run_dir = Path(args.run_dir) if args.run_dir else Path(job.run.run_dir or
                                                                 f"runs/{job.run.name}")
        from mpinewton.train.loop import train

        summary = train(job, comm, run_dir, overwrite=args.overwrite,
                        check_sync=args.check_sync, resume=args.resume)
    except (ConfigError, DistributedError) as exc:
        # Every rank raised this same error (run_agreed): each exits non-zero.
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except RunDiverged as exc:
        # Decided from reduced values: every rank raised it at the same iteration.
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    return 0 if summary is not None else EXIT_CHECKPOINTED


if __name__ == "__main__":
    sys.exit(main())
