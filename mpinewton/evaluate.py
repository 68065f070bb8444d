"""``python -m mpinewton.evaluate RUN_DIR|CHECKPOINT|WEIGHTS.h5 [options]``: loss and accuracy.

Evaluates trained weights on splits of a dataset, under ``mpirun`` like
training: each rank reads its own rows of a split and the loss and accuracy
(or MAE for a regression loss) are the trainer's distributed, batch-additive
sums (``DistributedObjective``), so the numbers do not depend on the number of
ranks and equal the ones in a run's ``summary.json``.

The job is the run directory's ``config.toml``, the job a checkpoint stores,
or the ``config.toml`` beside a run's ``weights.h5``; ``--job`` replaces it and
``--set`` overrides keys as in training. The weights are a run directory's
final ``weights.h5`` (else its newest valid checkpoint), a checkpoint file, or
a weights file (mpinewton ``weights.h5`` or Keras ``.weights.h5``).

Default splits: the job's ``data.eval_splits``, then its training splits
joined (``train`` or ``train+validation``), each on as many samples as the
training summary used (``data.eval_limit``, ``data.limit``); ``--limit N``
takes the first N samples of every split (0: all). Rank 0 prints one row per
split and, with ``--json``, writes the results atomically. Exit codes: 0 done,
2 bad input (reported by every rank).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpinewton.comm import Comm, DistributedError, install_abort_handler, world
from mpinewton.config import ConfigError, JobConfig
from mpinewton.weights_source import Loaded, open_job, open_model

EXIT_BAD_INPUT = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m mpinewton.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p)
    p.add_argument("--split", dest="splits", action="append", default=[], metavar="NAME",
                   help="a split to evaluate, or several joined by '+' (repeatable; default: "
                        "the job's eval splits and its training splits)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="first N samples of every split (0: all; default: the job's limits)")
    p.add_argument("--json", help="write the results to this JSON file")
    return p.parse_args(argv)


def add_source_arguments(p: argparse.ArgumentParser, *, data_required: bool = False) -> None:
    """The arguments ``evaluate`` and ``predict`` share: weights, job, overrides, data."""
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT|WEIGHTS.h5",
                   help="a run directory, a checkpoint file or a weights file")
    p.add_argument("--job", help="job TOML (default: the one the run or checkpoint stores)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one job key (repeatable)")
    p.add_argument("--data", required=data_required, metavar="FILE.h5",
                   help="the dataset" + ("" if data_required else " (default: the job's "
                                                                   "data.path)"))


def evaluate_objective(objective: Any, w: Any) -> dict[str, float]:
    """``{"loss": ..., "accuracy" or "mae": ...}`` of a DistributedObjective at ``w``."""
    return {key: float(value) for key, value in objective.evaluate(w).items()}


def default_splits(job: JobConfig) -> list[tuple[str, int | None]]:
    """The job's eval splits and its training splits joined, each with the summary's limit."""
    data, opt = job.data, job.optimizer
    train = "+".join(data.train_splits)
    limits = [n for n in (data.limit, data.eval_limit if opt.batch_size else 0) if n]
    out = [(name, data.eval_limit or None) for name in data.eval_splits if name != train]
    return [*dict.fromkeys(out), (train, min(limits) if limits else None)]


def check_splits(path: str, splits: Sequence[str]) -> None:
    """Every split (``a`` or ``a+b``) exists in the dataset, or a ConfigError naming them."""
    from mpinewton.data import inspect_dataset

    info = inspect_dataset(path)
    for spec in splits:
        for name in spec.split("+"):
            if name not in info.splits:
                raise ConfigError(f"{path}: unknown split {name!r}; the file has "
                                  f"{', '.join(info.splits) or 'no splits'}")


def read_split(loaded: Loaded, split: str, limit: int | None) -> Any:
    """Read this rank's rows of ``split`` (``a+b`` joins splits), checked as in training."""
    from mpinewton.data import read_shard
    from mpinewton.weights_source import data_checks

    comm, job = loaded.comm, loaded.job
    checks = data_checks(job, loaded.model)
    shard = comm.run_agreed(lambda: read_shard(job.data.path, split, comm.rank, comm.size,
                                               limit=limit, **checks),
                            f"reading split {split!r}")
    if shard.total == 0:
        raise ConfigError(f"{job.data.path}: split {split!r} holds no samples")
    return shard


def evaluate_split(loaded: Loaded, split: str, limit: int | None) -> dict[str, Any]:
    """Samples, loss and accuracy (or MAE) of one split, the same on every rank."""
    shard = read_split(loaded, split, limit)
    objective = loaded.session.objective(shard.x, shard.y, shard.total)
    result = loaded.comm.run_agreed(lambda: evaluate_objective(objective, loaded.w),
                                    f"evaluating split {split!r}")
    return {"samples": int(shard.total), **result}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per split: samples, loss, then the metric(s)."""
    metrics = list(dict.fromkeys(k for r in results.values() for k in r
                                 if k not in ("samples", "loss")))
    width = max([len("split"), *map(len, results)])
    lines = [f"{'split':<{width}}  {'samples':>9}  {'loss':>13}"
             + "".join(f"  {m:>10}" for m in metrics)]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {r['samples']:>9,d}  {r['loss']:>13.6e}"
                     + "".join(f"  {r[m]:>10.4f}" if m in r else f"  {'-':>10}"
                               for m in metrics))
    return "\n".join(lines)


def run(args: argparse.Namespace, comm: Comm) -> dict[str, Any]:
    """Evaluate; returns the results (every rank), rank 0 prints and writes them."""
    from mpinewton.durable import atomic_write_text

    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit {args.limit} must be >= 0 (0: every sample)")
    source, job, job_from = open_job(comm, args.source, job=args.job,
                                     overrides=args.overrides, data=args.data)
    if args.splits:
        limit = args.limit or None
        splits = [(name, limit) for name in dict.fromkeys(args.splits)]
    else:
        splits = [(name, limit if args.limit is None else args.limit or None)
                  for name, limit in default_splits(job)]
    comm.run_agreed(lambda: check_splits(job.data.path, [s for s, _ in splits]),
                    "checking the splits")
    loaded = open_model(comm, source, job, job_from)
    loaded.say(f"mpinewton.evaluate: {loaded.model.name} ({loaded.layout.size:,} weights) on "
               f"{comm.size} rank(s); weights from {loaded.weights_from}; job from "
               f"{loaded.job_from}; data {loaded.job.data.path}")
    start = time.perf_counter()
    results = {name: evaluate_split(loaded, name, limit) for name, limit in splits}
    out = {**loaded.about(), "splits": results, "seconds": time.perf_counter() - start}
    loaded.say(format_table(results))
    if args.json:
        def write() -> None:
            if comm.is_root:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")

        comm.run_agreed(write, f"writing {args.json}")
        loaded.say(f"results in {args.json}")
    return out


def run_command(command: Callable[[argparse.Namespace, Comm], Any],
                args: argparse.Namespace) -> int:
    """Run a distributed command on every rank; bad input is exit code 2 on every rank.

    Shared by ``evaluate`` and ``predict``: rank 0 prints the error that every
    rank raised (``comm.run_agreed``); anything else aborts the job.
    """
    comm = world()
    install_abort_handler(comm)
    try:
        command(args, comm)
    except (ConfigError, DistributedError) as exc:
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
