"""``python -m mpinewton.plots RUN_DIR [RUN_DIR ...] --out FILE.png``.

Loss against iterations and against wall time, one curve per run directory,
read from each run's ``metrics.jsonl`` (the loss after each iteration, so the
curves start at the first iterate and end at the final weights).  Runs given
the same label share a colour and one legend entry (repeated runs of one
method with different seeds, as in thesis figure 15.3).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mpinewton.durable import atomic_path


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The iteration records of a run's ``metrics.jsonl`` (validation records left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r.get("phase") != "eval"]


def curve(records: list[dict[str, Any]], *, skip_pretrain: bool,
          final_loss: float | None = None) -> tuple[list, list, list]:
    """(iterations, wall times, losses): loss before the first kept step, then after each.

    The loss after step k is the loss recorded at the start of step k + 1 (for
    stochastic runs: on that iteration's fresh mini-batch).  The loss after the
    last step is ``final_loss`` from the run's summary (the final weights on
    the evaluation samples) when given, so that Newton and gradient-descent runs
    end on the same measure; otherwise the last record's ``new_loss``.
    """
    kept = [r for r in records if not (skip_pretrain and r["phase"] == "pretrain")]
    if not kept:
        return [], [], []
    first = kept[0]
    t0 = first["wall_time"] - first["iter_seconds"]
    iters, times, losses = [0], [0.0], [first["loss"]]
    for i, (rec, nxt) in enumerate(zip(kept, kept[1:] + [None], strict=True), start=1):
        if nxt is not None:
            after = nxt["loss"]
        else:
            after = final_loss if final_loss is not None else rec.get("new_loss")
        if after is None:
            break
        iters.append(i)
        times.append(rec["wall_time"] - t0)
        losses.append(after)
    return iters, times, losses


def plot(run_dirs: list[str], out: str, *, labels: list[str] | None = None,
         skip_pretrain: bool = True, title: str | None = None) -> None:
    """Draw loss against iterations and against wall time for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours: dict[str, Any] = {}
    pretrained = False  # whether any run had pre-training iterations (left out or drawn)
    for i, run_dir in enumerate(run_dirs):
        summary = Path(run_dir) / "summary.json"
        final = json.loads(summary.read_text())["final_loss"] if summary.exists() else None
        records = read_metrics(run_dir)
        pretrained = pretrained or any(r["phase"] == "pretrain" for r in records)
        iters, times, losses = curve(records, skip_pretrain=skip_pretrain, final_loss=final)
        label = labels[i] if labels else Path(run_dir).name
        marker = "." if len(iters) <= 60 else None
        style: dict[str, Any] = {"marker": marker}
        if label in colours:  # a repeat of an earlier run: same colour, no second legend entry
            style["color"] = colours[label]
        else:
            style["label"] = label
        line, = ax_it.plot(iters, losses, **style)
        colours.setdefault(label, line.get_color())
        ax_t.plot(times, losses, **{**style, "color": colours[label]})
    it_label = "iteration (after pre-training)" if skip_pretrain and pretrained else "iteration"
    for ax, xlabel in ((ax_it, it_label), (ax_t, "wall time [s]")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # the format comes from the target's suffix, not tmp's
        fig.savefig(tmp, dpi=110, format=Path(out).suffix.lstrip(".") or "png")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m mpinewton.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per run")
    parser.add_argument("--with-pretrain", action="store_true",
                        help="include the pre-training iterations")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"{len(args.labels)} labels for {len(args.runs)} runs")
    plot(args.runs, args.out, labels=args.labels, skip_pretrain=not args.with_pretrain,
         title=args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
