#!/usr/bin/env bash
# The thesis' figure 14.2 experiment on the 50,000 MNIST training images: after the
# same 60 gradient-descent pre-training iterations, 20 Newton-CG iterations of the
# thesis (jobs/mnist_cnn_thesis.toml) against 20 gradient-descent iterations for each rate of a
# small sweep, and against gradient descent with the best rate given as much wall
# time as the 20 Newton-CG iterations took. Writes runs/fig14_2/*,
# runs/fig14_2/table.md and docs/fig14_2.png, and prints the table.
# Usage: scripts/fig14_2.sh [RANKS] (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
ranks=${1:-2}
out=runs/fig14_2
rates="0.5 1 2 4 8"
run() {
    echo "[fig14_2] $*" >&2
    bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.train --overwrite "$@" >/dev/null
}

run jobs/mnist_cnn_thesis.toml --run-dir "$out/newton"
for lr in $rates; do
    run jobs/mnist_cnn_gd.toml --set "optimizer.learning_rate=$lr" --run-dir "$out/gd_lr$lr"
done
# The best rate, and as many gradient-descent iterations as fit in Newton's time.
read -r best long_iters < <(python - "$out" $rates <<'PY'
import json, math, sys
from pathlib import Path
out, rates = Path(sys.argv[1]), sys.argv[2:]
def seconds(name):
    return sum(m["iter_seconds"] for m in map(json.loads, (out / name / "metrics.jsonl")
               .read_text().splitlines()) if m["phase"] != "pretrain")
best = min(rates, key=lambda r: json.loads((out / f"gd_lr{r}" / "summary.json")
                                           .read_text())["final_loss"])
print(best, math.ceil(20 * seconds("newton") / seconds(f"gd_lr{best}")))
PY
)
run jobs/mnist_cnn_gd.toml --set "optimizer.learning_rate=$best" \
    --set "optimizer.iters=$long_iters" --run-dir "$out/gd_long"

python - "$out" "$best" $rates <<'PY'
import json, sys
from pathlib import Path
from mpinewton.plots import plot
out, best, rates = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = []
for name in ["newton"] + [f"gd_lr{r}" for r in rates] + ["gd_long"]:
    s = json.loads((out / name / "summary.json").read_text())
    metrics = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    kept = [m for m in metrics if m["phase"] != "pretrain"]
    rows.append((name, len(kept), s["final_loss"], s["train_accuracy"],
                 s["validation_accuracy"], sum(m["iter_seconds"] for m in kept),
                 s["mean_cg_iters"]))
lines = ["| run | iterations after pre-training | final training loss | training accuracy "
         "| validation accuracy | time of those iterations [s] | mean CG iterations |",
         "|---|---:|---:|---:|---:|---:|---:|"]
for name, n, loss, tr, va, t, cg in rows:
    label = {"newton": "Newton-CG (Armijo)", "gd_long": f"gradient descent, lr {best}, time-matched"
             }.get(name, f"gradient descent, lr {name.removeprefix('gd_lr')}")
    lines.append(f"| {label} | {n} | {loss:.6f} | {tr:.4f} | {va:.4f} | {t:.1f} | "
                 f"{f'{cg:.2f}' if cg is not None else '-'} |")
table = "\n".join(lines)
(out / "table.md").write_text(table + "\n")
print(table)
print(f"best 20-iteration gradient descent: lr {best}")
plot([str(out / "newton"), str(out / f"gd_lr{best}"), str(out / "gd_long")], "docs/fig14_2.png",
     labels=["Newton-CG (Armijo), 20 iterations", f"gradient descent, lr {best}, 20 iterations",
             f"gradient descent, lr {best}, same wall time"],
     title="Thesis CNN on MNIST (b = 50,000), after 60 pre-training iterations")
print(f"wrote {out / 'table.md'} and docs/fig14_2.png")
PY
