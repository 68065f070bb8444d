"""Tables and figure of scripts/resnet_perturbed.sh (thesis 15.3 on MNIST 32x32 RGB).

Usage: python scripts/resnet_perturbed_report.py OUT DAMPING LR SEED [SEED ...]
Reads OUT/given, OUT/sweep/*, OUT/start_seed*/ (the perturbed weights evaluated
without an iteration), OUT/newton_seed*/ and OUT/gd_seed*/, and OUT/fixed/*_seed*/
(one fixed batch of 16 images) when there; writes OUT/table.md,
docs/resnet_perturbed.png and docs/resnet_perturbed_fixed.png and prints the tables.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from mpinewton.plots import plot, read_metrics


def summary(run: Path) -> dict:
    """A run's summary.json."""
    return json.loads((run / "summary.json").read_text())


def row(run: Path) -> dict:
    """The figures of one run: final evaluation, batch losses, time, CG iterations."""
    s, m = summary(run), read_metrics(run)
    after = [r["new_loss"] for r in m if r.get("new_loss") is not None]
    return {
        "loss": s["final_loss"], "val_loss": s["validation_loss"],
        "acc": s["train_accuracy"], "val_acc": s["validation_accuracy"],
        "before": statistics.mean(r["loss"] for r in m),
        "after": statistics.mean(after) if after else None,
        "seconds": sum(r["iter_seconds"] for r in m), "iters": len(m),
        # the first iteration also traces the compiled graphs (about 20 s for the HVP)
        "per_iter": statistics.mean(r["iter_seconds"] for r in m[1:]) if len(m) > 1 else None,
        "cg": s["mean_cg_iters"],
    }


def spread(values: list[float], fmt: str) -> str:
    """'mean (min-max)'."""
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def methods(damping: str, lr: str) -> tuple[tuple[str, str], ...]:
    """(run-name prefix, label) of the two methods compared."""
    return (("newton", f"Newton-CG, damping {damping}"), ("gd", f"gradient descent, lr {lr}"))


def method_cells(rs: list[dict], loss_fmt: str) -> str:
    """Training loss, validation loss and accuracy, seconds per iteration, CG iterations."""
    cg = spread([r["cg"] for r in rs], ".1f") if rs[0]["cg"] is not None else "-"
    return (f"{spread([r['loss'] for r in rs], loss_fmt)} | "
            f"{spread([r['val_loss'] for r in rs], '.4f')} | "
            f"{spread([r['val_acc'] for r in rs], '.4f')} | "
            f"{spread([r['per_iter'] for r in rs], '.2f')} | {cg} |")


def figure(runs: Path, seeds: list[str], damping: str, lr: str, png: str, title: str) -> None:
    """Both methods' runs of all seeds in one figure, one colour per method."""
    pairs = [(str(runs / f"{m}_seed{s}"), label) for m, label in methods(damping, lr)
             for s in seeds]
    plot([run for run, _ in pairs], png, labels=[label for _, label in pairs], title=title)
    print(f"wrote {png}")


def main(out: Path, damping: str, lr: str, seeds: list[str]) -> None:
    """Write OUT/table.md and the figures (the fixed-batch one when its runs are there)."""
    g = summary(out / "given")
    lines = [f"Given weights (unperturbed): training loss {g['final_loss']:.4f}, validation loss "
             f"{g['validation_loss']:.4f}, training / validation accuracy "
             f"{g['train_accuracy']:.4f} / {g['validation_accuracy']:.4f} (first 5,000 images).",
             "", "Sweep, seed 0:", "",
             "| run | training loss | validation loss | validation accuracy | mean loss on the "
             "iteration's fresh batch | mean loss on that batch after the step | time [s] "
             "| mean CG iterations |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def order(run: Path) -> tuple[bool, float]:  # Newton first, then by damping / rate
        value = run.name.removeprefix("newton_damping").removeprefix("gd_lr")
        return not run.name.startswith("newton"), float(value)

    for run in sorted((r for r in (out / "sweep").iterdir() if r.is_dir()), key=order):
        r = row(run)
        name = (f"Newton-CG, damping {run.name.removeprefix('newton_damping')}"
                if run.name.startswith("newton") else
                f"gradient descent, lr {run.name.removeprefix('gd_lr')}")
        after = f"{r['after']:.4f}" if r["after"] is not None else "-"
        cg = f"{r['cg']:.1f}" if r["cg"] is not None else "-"
        lines.append(f"| {name} | {r['loss']:.4f} | {r['val_loss']:.4f} | {r['val_acc']:.4f} | "
                     f"{r['before']:.4f} | {after} | {r['seconds']:.1f} | {cg} |")
    rows = {method: [row(out / f"{method}_seed{s}") for s in seeds] for method in ("newton", "gd")}
    wins = sum(n["loss"] < d["loss"] for n, d in zip(rows["newton"], rows["gd"], strict=True))
    lines += ["", f"Seeds {', '.join(seeds)}, {rows['newton'][0]['iters']} iterations each, "
              "mean (min-max) over the seeds:", "",
              "| method | training loss | validation loss | validation accuracy | seconds per "
              "iteration after the first | mean CG iterations |", "|---|---:|---:|---:|---:|---:|"]
    starts = [summary(out / f"start_seed{s}") for s in seeds]
    lines.append(f"| perturbed start (no iteration) | "
                 f"{spread([s['final_loss'] for s in starts], '.4f')} | "
                 f"{spread([s['validation_loss'] for s in starts], '.4f')} | "
                 f"{spread([s['validation_accuracy'] for s in starts], '.4f')} | - | - |")
    for method, label in methods(damping, lr):
        lines.append(f"| {label} | {method_cells(rows[method], '.4f')}")
    lines += ["", f"Newton-CG ends with the lower training loss in {wins} of {len(seeds)} seeds "
              "(same perturbation and mini-batches per seed)."]
    fixed = out / "fixed"
    fixed_seeds = sorted((r.name.removeprefix("newton_seed") for r in fixed.glob("newton_seed*")
                          if (r / "summary.json").exists()), key=int)
    if fixed_seeds:
        lines += fixed_table(fixed, damping, lr, fixed_seeds)
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'table.md'}")
    figure(out, seeds, damping, lr, "docs/resnet_perturbed.png",
           "ResNet-50 on MNIST 32x32 RGB from perturbed trained weights, b = 16, "
           f"{len(seeds)} seeds (loss on each iteration's fresh batch)")
    if fixed_seeds:
        figure(fixed, fixed_seeds, damping, lr, "docs/resnet_perturbed_fixed.png",
               "ResNet-50 on MNIST 32x32 RGB from perturbed trained weights, one fixed "
               f"batch of 16 images, {len(fixed_seeds)} seeds")

def fixed_table(fixed: Path, damping: str, lr: str, seeds: list[str]) -> list[str]:
    """The fixed-batch runs: loss on the 16 images before and after, validation figures."""
    lines = ["", f"One fixed batch (the first 16 training images, data.limit = 16), seeds "
             f"{', '.join(seeds)}, mean (min-max) over the seeds:", "",
             "| method | iterations | loss on the 16 images at the start | loss on the 16 "
             "images at the end | validation loss | validation accuracy | seconds per "
             "iteration after the first | mean CG iterations |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, label in methods(damping, lr):
        rs = [row(fixed / f"{method}_seed{s}") for s in seeds]
        starts = [read_metrics(fixed / f"{method}_seed{s}")[0]["loss"] for s in seeds]
        lines.append(f"| {label} | {rs[0]['iters']} | {spread(starts, '.4g')} | "
                     f"{method_cells(rs, '.4g')}")
    return lines


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
