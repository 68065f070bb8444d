#!/usr/bin/env bash
# Seconds a step of ResNet-50 on the MNIST digits (jobs/resnet_mnist.toml, batches of
# 256, 2 ranks) with Adam and with the race's K-FAC, with freed memory kept for reuse
# (run.reuse_memory = true, the default) and without (glibc's own settings). ITERS
# (16) steps each from the random start, no pre-training; the mean and median of
# steps 3 on (the first compiles, the second warms up) from each run's metrics.jsonl.
# K-FAC's mean includes its inverse refreshes (steps 1 and 11).
#   bash scripts/bench-step-time.sh [OUT]   (default docs/benchmarks-step-time.json)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2
out=${1:-docs/benchmarks-step-time.json}
iters=${ITERS:-16}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
declare -A method=(
    [adam]="--set optimizer.method=\"adam\" --set optimizer.learning_rate=3e-4"
    [kfac]="--set optimizer.method=\"kfac\" --set optimizer.curvature_fraction=0.0625 --set optimizer.kl_clip=3e-4 --set optimizer.fisher=\"sampled\" --set optimizer.learning_rate=0.1 --set optimizer.damping=1e-3"
)
for m in adam kfac; do
    for reuse in true false; do
        echo "== $m, run.reuse_memory = $reuse"
        # shellcheck disable=SC2086
        bash scripts/mpirun.sh -n 2 python -m mpinewton.train jobs/resnet_mnist.toml \
            ${method[$m]} --set optimizer.pretrain_iters=0 --set "optimizer.iters=$iters" \
            --set checkpoint.every=0 --set "run.reuse_memory=$reuse" \
            --run-dir "$work/$m-$reuse" | grep -a "^$m \|^done"
    done
done
python - "$work" "$out" <<'PY'
import json, platform, statistics, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {"machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
           "job": "jobs/resnet_mnist.toml, 2 ranks, batches of 256, steps 3 on"}
print(f"{'method':6} {'reuse_memory':>12} {'mean s':>7} {'median s':>8} {'steps':>5}")
for run in sorted(work.iterdir()):
    m, reuse = run.name.split("-")
    seconds = [r["iter_seconds"] for r in map(json.loads, (run / "metrics.jsonl").open())
               if r.get("phase") == m][2:]
    figures = {"mean_s": statistics.mean(seconds), "median_s": statistics.median(seconds),
               "steps": len(seconds), "seconds": seconds}
    results.setdefault(m, {})[f"reuse_memory={reuse}"] = figures
    print(f"{m:6} {reuse:>12} {figures['mean_s']:7.2f} {figures['median_s']:8.2f} "
          f"{len(seconds):5d}")
for m in ("adam", "kfac"):
    r = results[m]
    r["speedup"] = r["reuse_memory=false"]["mean_s"] / r["reuse_memory=true"]["mean_s"]
    print(f"{m}: {r['speedup']:.2f}x faster with freed memory kept")
out.write_text(json.dumps(results, indent=1) + "\n")
print(f"wrote {out}")
PY
