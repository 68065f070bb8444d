"""``python -m mpinewton.predict RUN_DIR|CHECKPOINT|WEIGHTS.h5 --data FILE.h5 --out PRED.h5``.

The model outputs of trained weights on one split of a dataset, under
``mpirun`` like training: each rank computes the outputs of its own contiguous
rows (in micro-batches of ``objective.micro_batch``, preprocessed as in
training), rank 0 gathers them in row order and writes ``PRED.h5`` atomically:

``outputs``     (N, k) the model's outputs (probabilities for a softmax model)
``predicted``   (N,) the predicted class (classification losses only)
``y``           (N,) the labels of the file
attributes      ``weights_from``, ``job``, ``job_from``, ``job_toml``, ``split``,
                ``data``, ``model``, ``world_size``, ``samples``, and the loss
                and accuracy (or MAE) on the split

The job and the weights are found as by ``python -m mpinewton.evaluate``.
``--split`` defaults to the job's first eval split when the file has it, else
to the file's only split. Exit codes: 0 done, 2 bad input (reported by every
rank; nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.comm import Comm
from mpinewton.config import ConfigError, JobConfig
from mpinewton.evaluate import (
    add_source_arguments,
    check_splits,
    evaluate_objective,
    read_split,
    run_command,
)
from mpinewton.weights_source import open_job, open_model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m mpinewton.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p, data_required=True)
    p.add_argument("--split", help="the split to predict (default: the job's first eval "
                                   "split, else the file's only split)")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="first N samples of the split (default 0: all)")
    p.add_argument("--out", required=True, help="the HDF5 file to write")
    return p.parse_args(argv)


def choose_split(job: JobConfig, split: str | None) -> str:
    """``--split``, else the job's first eval split if the file has it, else its only split."""
    from mpinewton.data import inspect_dataset

    path = job.data.path
    if split is not None:
        check_splits(path, [split])
        return split
    names = list(inspect_dataset(path).splits)
    evals = [name for name in job.data.eval_splits if name in names]
    if evals:
        return evals[0]
    if len(names) == 1:
        return names[0]
    raise ConfigError(f"{path} has the splits {', '.join(names)}; choose one with --split")


def check_out(args: argparse.Namespace, job: JobConfig) -> Path:
    """The output file, refused where it would replace an input."""
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as pred.h5")
    inputs = {"the dataset": Path(job.data.path), "the weights": Path(args.source)}
    for what, path in inputs.items():
        if path.exists() and out.exists() and out.resolve() == path.resolve():
            raise ConfigError(f"--out {out} is {what}; choose another file")
    return out


def local_outputs(local: Any, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The model outputs of this rank's rows as (rows, k), in micro-batches (``outputs``)."""
    out = np.asarray(local.outputs(w, x))
    return out.reshape(len(x), int(np.prod(out.shape[1:], dtype=np.int64)))


def predicted_classes(outputs: np.ndarray, *, threshold: float | None) -> np.ndarray:
    """Class indices by arg-max; with a ``threshold`` (binary outputs), 0/1 per output.

    One binary output gives (N,) class indices; several (multi-label) give (N, k).
    """
    if threshold is not None:
        hits = (outputs > threshold).astype(np.int64)
        return hits[:, 0] if outputs.shape[1] == 1 else hits
    return np.argmax(outputs, axis=1).astype(np.int64)


def write_predictions(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Rank 0: the HDF5 file, written atomically."""
    import h5py

    from mpinewton.durable import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
        for key, value in attrs.items():
            f.attrs[key] = value


def run(args: argparse.Namespace, comm: Comm) -> dict[str, Any]:
    """Predict; returns the metrics (every rank); rank 0 writes the file."""
    from mpinewton import __version__

    if args.limit < 0:
        raise ConfigError(f"--limit {args.limit} must be >= 0 (0: every sample)")
    source, job, job_from = open_job(comm, args.source, job=args.job,
                                     overrides=args.overrides, data=args.data)
    split = comm.run_agreed(lambda: choose_split(job, args.split), "choosing the split")
    out = comm.run_agreed(lambda: check_out(args, job), "checking --out")
    loaded = open_model(comm, source, job, job_from)
    shard = read_split(loaded, split, args.limit or None)
    loaded.say(f"mpinewton.predict: {loaded.model.name} ({loaded.layout.size:,} weights) on "
               f"{comm.size} rank(s); weights from {loaded.weights_from}; {shard.total:,} "
               f"samples of {loaded.job.data.path} [{split}]")
    objective = loaded.session.objective(shard.x, shard.y, shard.total)
    outputs = comm.run_agreed(lambda: local_outputs(objective.local, loaded.w, shard.x),
                              "computing the outputs")
    everything = comm.run_agreed(lambda: comm.gather_rows(outputs), "gathering the outputs")
    labels = comm.run_agreed(lambda: comm.gather_rows(shard.y), "gathering the labels")
    metrics = comm.run_agreed(lambda: evaluate_objective(objective, loaded.w),
                              "evaluating the split")
    classification = objective.metric_name == "accuracy"
    binary = job.objective.loss == "binary_crossentropy" or (
        everything is not None and everything.shape[1] == 1)
    threshold = (0.0 if job.objective.from_logits else 0.5) if binary else None

    def write() -> None:
        if not comm.is_root:
            return
        arrays = {"outputs": everything}
        if classification:
            arrays["predicted"] = predicted_classes(everything, threshold=threshold)
        arrays["y"] = labels
        attrs = {**loaded.about(), "split": split,
                 "samples": int(shard.total), "job_toml": job.to_toml(),
                 "mpinewton_version": __version__, **metrics}
        write_predictions(out, arrays, attrs)

    comm.run_agreed(write, f"writing {out}")
    scores = "; ".join(f"{k} {v:.6g}" for k, v in metrics.items())
    loaded.say(f"wrote {shard.total:,} predictions to {out}" + (f"; {scores}" if scores else ""))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
