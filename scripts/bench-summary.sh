#!/usr/bin/env bash
# Seconds a training job spends on its summary after the last iteration: the loss,
# gradient and accuracy at the final weights on the training set and the loss and
# accuracy on each evaluation split (2 ranks, 2 iterations a job, no checkpoints).
# Timed from the last iteration's line to the line "done:" (the final weights' save
# between them is a second or two). The jobs:
# the default job (the thesis CNN, 50,000 + 2 x 10,000 images), jobs/resnet_mnist.toml
# with Adam and jobs/resnet_mnist_perturbed.toml from random weights (5,000 + 5,000).
#   bash scripts/bench-summary.sh [OUT]   (default docs/benchmarks-summary.json)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
out=${1:-docs/benchmarks-summary.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -f data/mnist_rgb32.h5 ] || python -m mpinewton.data resize data/mnist.h5 --out data/mnist_rgb32.h5 --size 32 32
declare -A job=(
    [mnist_cnn]="jobs/mnist_cnn.toml --set optimizer.pretrain_iters=2"
    [resnet_mnist_adam]="jobs/resnet_mnist.toml --set optimizer.method=\"adam\" --set optimizer.learning_rate=3e-4 --set optimizer.pretrain_iters=0"
    [resnet_mnist_perturbed]="jobs/resnet_mnist_perturbed.toml --set model.weights=\"\""
)
for name in mnist_cnn resnet_mnist_adam resnet_mnist_perturbed; do
    echo "== $name"
    # shellcheck disable=SC2086
    bash scripts/mpirun.sh -n 2 python -m mpinewton.train ${job[$name]} --set optimizer.iters=2 \
        --set checkpoint.every=0 --run-dir "$work/$name" \
        | python -c 'import sys, time
for line in sys.stdin:
    print(f"{time.time():.3f} {line}", end="", flush=True)' > "$work/$name.log"
    grep -a " t= \|evaluating the final weights\|^[0-9.]* done:" "$work/$name.log" | tail -3 \
        | cut -d" " -f2-
done
python - "$work" "$out" <<'PY'
import json, os, platform, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "what": "seconds from the last iteration's line to 'done:', 2 ranks"}
for name in ("mnist_cnn", "resnet_mnist_adam", "resnet_mnist_perturbed"):
    stamps = {}
    for line in (work / f"{name}.log").read_text().splitlines():
        stamp, _, text = line.partition(" ")
        if " t=" in text:  # an iteration's line
            stamps["start"] = float(stamp)
        elif text.startswith("done:"):
            stamps["end"] = float(stamp)
    results[name] = {"summary_s": round(stamps["end"] - stamps["start"], 2)}
    print(f"{name:24} summary {results[name]['summary_s']:6.1f} s")
out.write_text(json.dumps(results, indent=1) + "\n")
print(f"wrote {out}")
PY
