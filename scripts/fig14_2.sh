#!/usr/bin/env bash
# The thesis' figure 14.2 experiment on the 50,000 MNIST training images: after the
# same 60 gradient-descent pre-training iterations, 20 Newton-CG iterations (the
# default job) against 20 gradient-descent iterations for each learning rate of a
# small sweep. Writes runs/fig14_2/*, docs/fig14_2.png and prints a table.
# Usage: scripts/fig14_2.sh [RANKS] (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
ranks=${1:-2}
out=runs/fig14_2
run() { bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.train --overwrite "$@" >/dev/null; }

run jobs/mnist_cnn.toml --run-dir "$out/newton"
rates="0.5 1 2 4 8"
for lr in $rates; do
    run jobs/mnist_cnn_gd.toml --set "optimizer.learning_rate=$lr" --run-dir "$out/gd_lr$lr"
done
python - "$out" $rates <<'PY'
import json, sys
from pathlib import Path
from mpinewton.plots import plot
out, rates = Path(sys.argv[1]), sys.argv[2:]
rows = []
for name in ["newton"] + [f"gd_lr{r}" for r in rates]:
    s = json.loads((out / name / "summary.json").read_text())
    metrics = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    t = sum(m["iter_seconds"] for m in metrics if m["phase"] != "pretrain")
    rows.append((name, s["final_loss"], s["train_accuracy"], s["validation_accuracy"], t,
                 s["mean_cg_iters"]))
print(f"{'run':<10} {'final loss':>11} {'train acc':>9} {'val acc':>8} {'20 iters [s]':>12} {'mean CG':>8}")
for name, loss, tr, va, t, cg in rows:
    print(f"{name:<10} {loss:11.6f} {tr:9.4f} {va:8.4f} {t:12.1f} {cg if cg is not None else '-':>8}")
best = min(rows[1:], key=lambda r: r[1])
print(f"best gradient descent: {best[0]} (final loss {best[1]:.6f}); Newton-CG: {rows[0][1]:.6f}")
plot([str(out / "newton"), str(out / best[0])], "docs/fig14_2.png",
     labels=["Newton-CG (Armijo)", f"gradient descent, {best[0].replace('gd_', '')}"],
     title="Thesis CNN on MNIST (b = 50,000), after 60 pre-training iterations")
print("wrote docs/fig14_2.png")
PY
