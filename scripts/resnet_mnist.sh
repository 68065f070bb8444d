#!/usr/bin/env bash
# ResNet-50 on the MNIST digits resized to 32x32 RGB with OpenCV (jobs/resnet_mnist.toml):
# stochastic Newton-CG against gradient descent with fixed learning rates, from the same
# start and drawing the same mini-batches (same seed), and against gradient descent with
# the best rate given the Newton run's wall time. Writes runs/resnet_mnist/*,
# runs/resnet_mnist/table.md and docs/resnet_mnist.png, and prints the table.
# Usage: scripts/resnet_mnist.sh [RANKS] (default 2); ITERS=15 RATES="0.1 1" to change.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
ranks=${1:-2}
iters=${ITERS:-15}
rates=${RATES:-"0.1 1"}
out=runs/resnet_mnist
[ -f data/mnist_rgb32.h5 ] || python -m mpinewton.data resize data/mnist.h5 --out data/mnist_rgb32.h5 --size 32 32
run() {
    echo "[resnet_mnist] $*" >&2
    bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.train jobs/resnet_mnist.toml \
        --overwrite --set "optimizer.iters=$iters" "$@" >/dev/null
}
run --run-dir "$out/newton"
for lr in $rates; do
    run --set optimizer.method='"gd"' --set "optimizer.learning_rate=$lr" --run-dir "$out/gd_lr$lr"
done
# The best rate, and as many gradient-descent iterations as fit in Newton's time.
read -r best long_iters < <(python - "$out" "$iters" $rates <<'PY'
import json, math, sys
from pathlib import Path
out, iters, rates = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def seconds(name):
    return sum(m["iter_seconds"] for m in map(json.loads, (out / name / "metrics.jsonl")
               .read_text().splitlines()) if m["phase"] != "pretrain")
best = min(rates, key=lambda r: json.loads((out / f"gd_lr{r}" / "summary.json")
                                           .read_text())["final_loss"])
print(best, math.ceil(iters * seconds("newton") / seconds(f"gd_lr{best}")))
PY
)
bash scripts/mpirun.sh -n "$ranks" python -m mpinewton.train jobs/resnet_mnist.toml --overwrite \
    --set optimizer.method='"gd"' --set "optimizer.learning_rate=$best" \
    --set "optimizer.iters=$long_iters" --run-dir "$out/gd_long" >/dev/null

python - "$out" "$best" $rates <<'PY'
import json, sys
from pathlib import Path
from mpinewton.plots import plot
out, best, rates = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
names = ["newton"] + [f"gd_lr{r}" for r in rates] + ["gd_long"]
lines = ["| run | iterations after pre-training | training loss (first 5,000 images) | training accuracy "
         "| validation accuracy | time of those iterations [s] | mean CG iterations |",
         "|---|---:|---:|---:|---:|---:|---:|"]
for name in names:
    s = json.loads((out / name / "summary.json").read_text())
    kept = [m for m in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines())
            if m["phase"] != "pretrain"]
    label = {"newton": "Newton-CG (Armijo)",
             "gd_long": f"gradient descent, lr {best}, time-matched"}.get(
                 name, f"gradient descent, lr {name[5:]}")
    cg = f"{s['mean_cg_iters']:.1f}" if s["mean_cg_iters"] is not None else "-"
    lines.append(f"| {label} | {len(kept)} | {s['final_loss']:.4f} | {s['train_accuracy']:.4f} | "
                 f"{s['validation_accuracy']:.4f} | {sum(m['iter_seconds'] for m in kept):.1f} | {cg} |")
table = "\n".join(lines)
(out / "table.md").write_text(table + "\n")
print(table)
plot([str(out / n) for n in names], "docs/resnet_mnist.png",
     labels=["Newton-CG (Armijo)"] + [f"gradient descent, lr {r}" for r in rates]
     + [f"gradient descent, lr {best}, same wall time"],
     title="ResNet-50 on MNIST 32x32 RGB, mini-batches of 256 (loss on each iteration's batch)")
print(f"wrote {out / 'table.md'} and docs/resnet_mnist.png")
PY
