"""What starting a rank costs: CPU and wall seconds of a process importing what a job imports.

Every rank of every job, and every example and benchmark command, starts a Python
that imports TensorFlow and Keras before it computes anything; the test suite starts
about two hundred of them. This times ``python -c "import mpinewton.objective, tensorflow,
keras, mpi4py.MPI, ml_dtypes"`` (user + system CPU of the child, and wall time) ``--repeats`` times.

``--also DIR`` times a second variant with ``DIR`` first on ``PYTHONPATH`` (e.g. another
version of a dependency installed with ``pip install --target DIR``), alternating the two
so that a machine whose speed drifts affects both alike; the pairs (one start of each,
back to back) are then compared one by one. Prints a table and writes JSON:

    python scripts/bench-start.py --repeats 10 --also /tmp/other --out start.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mpinewton.machine import describe

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = "import mpinewton.objective, tensorflow, keras, mpi4py.MPI, ml_dtypes"
PRINT = "; print(ml_dtypes.__version__, tensorflow.__version__, keras.__version__)"


def one_start(path: str | None) -> dict:
    """Start one Python that imports what a rank imports; its CPU and wall seconds."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", IMPORTS + PRINT], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    out, err = proc.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: the import failed with PYTHONPATH={path!r}:\n{err}")
    versions = dict(zip(("ml_dtypes", "tensorflow", "keras"), out.split(), strict=True))
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, **versions}


def main(argv: list[str] | None = None) -> int:
    """Time the starts, alternating the variants; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="starts per variant (8)")
    parser.add_argument("--also", metavar="DIR", help="a second variant: DIR first on PYTHONPATH")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    variants = {"installed": None} | ({f"{args.also} first": args.also} if args.also else {})
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    one_start(None)  # warm the file cache: the first start reads every module from disk
    for _ in range(args.repeats):
        for name, path in variants.items():
            runs[name].append(one_start(path))
    summary = {}
    print(f"{'variant':32} {'ml_dtypes':>9} {'median CPU-s':>12} {'min CPU-s':>9} "
          f"{'median wall-s':>13}")
    for name, done in runs.items():
        cpu = [r["cpu_s"] for r in done]
        wall = [r["wall_s"] for r in done]
        summary[name] = {"median_cpu_s": statistics.median(cpu), "min_cpu_s": min(cpu),
                         "median_wall_s": statistics.median(wall),
                         "ml_dtypes": done[0]["ml_dtypes"], "tensorflow": done[0]["tensorflow"],
                         "keras": done[0]["keras"], "starts": done}
        print(f"{name:32} {done[0]['ml_dtypes']:>9} {statistics.median(cpu):12.2f} "
              f"{min(cpu):9.2f} {statistics.median(wall):13.2f}")
    paired = None
    if args.also:
        (_, base), (_, other) = runs.items()
        diffs = [b["cpu_s"] - a["cpu_s"] for a, b in zip(base, other, strict=True)]
        more, mean = sum(d > 0 for d in diffs), statistics.fmean(diffs)
        paired = {"variant_minus_installed_mean_cpu_s": mean,
                  "pairs_where_variant_cost_more": more, "pairs": len(diffs)}
        print(f"pair by pair: {args.also} first cost more in {more} of {len(diffs)} pairs, "
              f"by {mean:+.2f} CPU-s on average")
    if args.out:
        command = ["python", "scripts/bench-start.py", *(argv or sys.argv[1:])]
        record = {"command": " ".join(command),
                  "imports": IMPORTS, "machine": describe(),
                  "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                  "variants": summary, "paired": paired}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
