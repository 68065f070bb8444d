#!/usr/bin/env bash
# K-FAC's factor inversion (scipy's LAPACK, dpotrf + dpotri of a 2,304 x 2,304 factor,
# ResNet-50's largest below max_factor_dim) in RANKS (2) concurrent processes, as the
# ranks of one node run it, each with the thread limit of mpinewton's trainer
# (train.session.threads_for): scipy's BLAS loaded by the trainer before the limit
# (as now), and loaded after it, as where nothing had loaded scipy before (it then
# kept a thread per core). scikit-learn is hidden, as in a plain install, so that
# Keras does not load scipy first. Median seconds of REPEATS (7) inversions per process.
#   bash scripts/bench-blas-threads.sh [OUT]   (default docs/benchmarks-blas-threads.json)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${MPINEWTON_VENV:-.venv}/bin/activate"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD/tests/no_sklearn:$PWD"
out=${1:-docs/benchmarks-blas-threads.json}
ranks=${RANKS:-2}
repeats=${REPEATS:-7}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/probe.py" <<'PY'
import json, os, statistics, sys, time
import numpy as np
mode, ranks, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "after":  # the trainer before the fix: the limit reached only what was loaded
    import tensorflow  # noqa: F401
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=max(1, (os.cpu_count() or 1) // ranks), user_api="blas")
else:
    from mpinewton.train.session import threads_for
    threads_for(max(1, (os.cpu_count() or 1) // ranks), 1)
from mpinewton.solvers.kfac import _inverse
from threadpoolctl import threadpool_info
a = np.random.default_rng(0).standard_normal((2304, 2304))
m = a @ a.T / 2304
_inverse(m, 1e-3, "A")
seconds = []
for _ in range(repeats):
    t = time.perf_counter()
    _inverse(m, 1e-3, "A")
    seconds.append(time.perf_counter() - t)
scipy_threads = [i["num_threads"] for i in threadpool_info()
                 if i["user_api"] == "blas" and "scipy.libs" in i["filepath"]]
print(json.dumps({"median_s": statistics.median(seconds), "seconds": seconds,
                  "scipy_blas_threads": scipy_threads}))
PY
for mode in before after; do
    for ((r = 0; r < ranks; r++)); do
        python "$work/probe.py" "$mode" "$ranks" "$repeats" > "$work/$mode.$r.json" &
    done
    wait
done
python - "$work" "$out" "$ranks" <<'PY'
import json, os, platform, sys
from pathlib import Path

work, out, ranks = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "what": "dpotrf + dpotri of a 2,304 x 2,304 factor (mpinewton.solvers.kfac._inverse), "
                   f"{ranks} concurrent processes, median seconds per process"}
print(f"{'scipy loaded':14} {'scipy BLAS threads':>18} {'median s per process':>22}")
for mode in ("before", "after"):
    runs = [json.loads((work / f"{mode}.{r}.json").read_text()) for r in range(ranks)]
    results[f"scipy loaded {mode} the limit"] = runs
    print(f"{mode + ' limit':14} {str([t for r in runs for t in r['scipy_blas_threads']]):>18} "
          f"{' / '.join('%.3f' % r['median_s'] for r in runs):>22}")
out.write_text(json.dumps(results, indent=1) + "\n")
print(f"wrote {out}")
PY
