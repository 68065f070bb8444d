"""Steps each method of a race took to each loss, from its steps' own batch losses.

A mini-batch race's methods with the job's batch size step on the same
batches, so the steps each needed to bring its batch loss, averaged over
a window of ``--window`` steps, to a given level compare what a step does
whatever the machine's speed (docs/results.md, "The second race").

    python scripts/steps-to-loss.py RACE.json [...] [--window 10] [--levels 1.5 1.0 ...]
"""

import argparse
import sys

import numpy as np

from mpinewton.compare import read_report


def steps_to(losses: np.ndarray, level: float, window: int) -> int | None:
    """The first step at which the mean of the last ``window`` losses is <= ``level``."""
    if losses.size < window:
        return None
    smooth = np.convolve(losses, np.ones(window) / window, "valid")
    hit = np.flatnonzero(smooth <= level)
    return int(hit[0]) + window if hit.size else None


def main(argv: list[str] | None = None) -> int:
    """Print, for each race, a table of the steps each method took to each level."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("races", nargs="+", metavar="RACE.json")
    parser.add_argument("--window", type=int, default=10, help="steps averaged (default 10)")
    parser.add_argument("--levels", type=float, nargs="+",
                        default=[1.5, 1.0, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2])
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be >= 1")
    for path in args.races:
        try:
            results = read_report(path)["results"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        losses = {r["label"]: np.array([s["loss"] for s in r["steps"]]) for r in results}
        labels = list(losses)
        print(f"{path}: steps to each loss (mean of {args.window} batch losses; "
              "- : not reached)")
        print(f"| loss | {' | '.join(labels)} |")
        print("|---:|" + "---:|" * len(labels))
        for level in args.levels:
            cells = [steps_to(losses[k], level, args.window) for k in labels]
            print(f"| {level:g} | " + " | ".join("-" if c is None else str(c) for c in cells)
                  + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
