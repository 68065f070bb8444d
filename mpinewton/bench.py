"""Benchmarks: ``python -m mpinewton.bench [products|table|ranks|memory|all] --out FILE``.

Prints figures and writes them as JSON (``--out``), for ``docs/benchmarks.md``.
Speed and memory targets are checked here, never by timed unit tests.

``products``  HVP time / gradient time, thesis CNN, float64, b = 10,000 and 50,000.
``table``     one HVP at b = 1 ... 10,000 beside the thesis' table 14.2.
``ranks``     one Newton iteration on 2 ranks x 1 thread against 1 rank x 2 threads
              (launches mpirun itself), and the share of time inside Allreduce.
``memory``    peak RSS of one rank computing a full-shard HVP, shard 25,000 and 50,000
              (one fresh process each).

Data: MNIST from ``--data`` (default data/mnist.h5), or random images of the same
shape with ``--synthetic`` (the timings do not depend on pixel values).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

THESIS_TABLE_14_2 = {1: 0.030, 10: 0.064, 100: 0.204, 1000: 1.173, 10000: 11.580}


def _images(n: int, data: str | None) -> tuple[np.ndarray, np.ndarray]:
    if data:
        from mpinewton.data import read_shard

        shard = read_shard(data, ["train", "validation"], 0, 1, limit=n)
        if shard.total >= n:
            return shard.x[:n], shard.y[:n]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n)


def _objective(n: int, data: str | None, micro_batch: int, *, hvp: str = "reverse_over_reverse",
               jit: bool = True, lo: int = 0, hi: int | None = None) -> tuple[Any, np.ndarray]:
    from mpinewton.local import LocalObjective
    from mpinewton.models import thesis_cnn
    from mpinewton.params import get_flat

    x, y = _images(n, data)
    hi = n if hi is None else hi
    model = thesis_cnn(dtype="float64", seed=0)
    return LocalObjective(model, x[lo:hi], y[lo:hi], micro_batch=micro_batch, jit=jit,
                          hvp=hvp), get_flat(model)


def _best_of(fn: Any, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _set_threads(threads: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def bench_products(args: argparse.Namespace) -> dict[str, Any]:
    """HVP / gradient time ratio at b = 10,000 and 50,000 (both HVP modes)."""
    out: dict[str, Any] = {}
    cases = [(b, mode, True) for b in (10_000, 50_000)
             for mode in ("reverse_over_reverse", "forward_over_reverse")]
    cases.append((10_000, "reverse_over_reverse", False))
    for b, mode, jit in cases:
        local, w = _objective(b, args.data, args.micro_batch, hvp=mode, jit=jit)
        v = np.random.default_rng(1).standard_normal(w.size)
        grad_s = _best_of(lambda local=local, w=w: local.loss_grad_sum(w), args.repeats)
        hvp_s = _best_of(lambda local=local, w=w, v=v: local.hvp_sum(w, v), args.repeats)
        key = f"b={b} {mode}{'' if jit else ' (no XLA)'}"
        out[key] = {"grad_s": grad_s, "hvp_s": hvp_s, "ratio": hvp_s / grad_s}
        print(f"{key:<46} gradient {grad_s:7.3f}s  HVP {hvp_s:7.3f}s  "
              f"HVP/gradient {hvp_s / grad_s:5.2f}", flush=True)
    return out


def bench_table(args: argparse.Namespace) -> dict[str, Any]:
    """One HVP at b = 1 ... 10,000 beside thesis table 14.2."""
    out: dict[str, Any] = {}
    for b, thesis in THESIS_TABLE_14_2.items():
        local, w = _objective(b, args.data, args.micro_batch)
        v = np.random.default_rng(1).standard_normal(w.size)
        hvp_s = _best_of(lambda local=local, w=w, v=v: local.hvp_sum(w, v), args.repeats)
        out[str(b)] = {"hvp_s": hvp_s, "thesis_s": thesis, "speedup": thesis / hvp_s}
        print(f"b={b:<6} HVP {hvp_s * 1e3:9.2f} ms   thesis {thesis * 1e3:9.1f} ms   "
              f"{thesis / hvp_s:7.1f}x faster", flush=True)
    return out


def newton_iteration_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One Newton-iteration workload on this rank: gradient + ``cg`` HVPs + one loss."""
    from mpinewton.comm import world
    from mpinewton.data import shard_bounds
    from mpinewton.objective import DistributedObjective

    comm = world()
    lo, hi = shard_bounds(args.samples, comm.rank, comm.size)
    local, w = _objective(args.samples, args.data, args.micro_batch, lo=lo, hi=hi)
    objective = DistributedObjective(local, comm, args.samples)
    v = np.random.default_rng(1).standard_normal(w.size)

    def iteration() -> None:
        _, g = objective.value_and_grad(w)
        for _ in range(args.cg):
            objective.hvp(w, v)
        objective.value(w - 1e-3 * g)

    iteration()  # compile
    comm.barrier()
    best, reduce_share = float("inf"), 0.0
    for _ in range(args.repeats):
        reduce0 = comm.stats.allreduce_seconds
        comm.barrier()
        start = time.perf_counter()
        iteration()
        comm.barrier()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, reduce_share = elapsed, (comm.stats.allreduce_seconds - reduce0) / elapsed
    shares = comm.allgather(reduce_share)
    return {"seconds": best, "allreduce_share_max": max(shares), "ranks": comm.size}


def bench_ranks(args: argparse.Namespace) -> dict[str, Any]:
    """2 ranks x 1 thread against 1 rank x 2 threads on the same global batch."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("mpirun not found: run scripts/setup.sh")
    out: dict[str, Any] = {}
    for ranks, threads in ((1, 2), (2, 1)):
        cmd = [mpirun, "--oversubscribe", "-n", str(ranks), sys.executable, "-m",
               "mpinewton.bench", "_newton_worker", "--threads", str(threads),
               "--samples", str(args.samples), "--cg", str(args.cg),
               "--repeats", str(args.repeats), "--micro-batch", str(args.micro_batch)]
        if args.data:
            cmd += ["--data", args.data]
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200,
                              check=False)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed:\n{proc.stdout}\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"{ranks}x{threads}"] = result
        print(f"{ranks} rank(s) x {threads} thread(s): Newton iteration ({args.cg} HVPs) "
              f"{result['seconds']:.3f}s, Allreduce {100 * result['allreduce_share_max']:.2f}% "
              "of it", flush=True)
    ratio = out["2x1"]["seconds"] / out["1x2"]["seconds"]
    out["ratio_2x1_over_1x2"] = ratio
    print(f"ratio (2x1)/(1x2) = {ratio:.3f}", flush=True)
    return out


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak resident memory of this process while it computes full-shard HVPs.

    A sampler thread reads the current RSS every 2 ms during two HVPs (the
    first compiles); ``ru_maxrss`` would report the process' all-time peak,
    which TensorFlow's start-up can dominate.
    """
    import threading

    local, w = _objective(args.samples, args.data, args.micro_batch)
    before = _current_rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    local.hvp_sum(w, np.ones_like(w))
    local.hvp_sum(w, np.ones_like(w))
    done.set()
    sampler.join()
    return {"samples": args.samples, "peak_rss_mib": peak[0], "rss_before_hvp_mib": before,
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory at shard 25,000 and 50,000, each in a fresh process."""
    out: dict[str, Any] = {}
    for samples in (args.samples // 2, args.samples):
        cmd = [sys.executable, "-m", "mpinewton.bench", "_memory_worker", "--samples",
               str(samples), "--micro-batch", str(args.micro_batch), "--threads",
               str(args.threads)]
        if args.data:
            cmd += ["--data", args.data]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if proc.returncode != 0:
            raise SystemExit(f"worker failed:\n{proc.stdout}\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out[str(samples)] = result
        print(f"shard {samples:>6}: peak RSS during HVPs {result['peak_rss_mib']:8.1f} MiB "
              f"(before {result['rss_before_hvp_mib']:.1f} MiB; micro-batch "
              f"{args.micro_batch})", flush=True)
    small, large = (out[str(s)]["peak_rss_mib"] for s in (args.samples // 2, args.samples))
    out["growth"] = large / small - 1
    print(f"growth when the shard doubles: {100 * out['growth']:.1f}%", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks, print them, and write JSON to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m mpinewton.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="all",
                        choices=["all", "products", "table", "ranks", "memory",
                                 "_newton_worker", "_memory_worker"])
    parser.add_argument("--data", default="data/mnist.h5", help="HDF5 dataset (MNIST)")
    parser.add_argument("--synthetic", action="store_true", help="random images instead")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--cg", type=int, default=10, help="HVPs per Newton iteration (ranks)")
    args = parser.parse_args(argv)
    if args.synthetic or not Path(args.data).exists():
        args.data = None
    _set_threads(args.threads)
    if args.which == "_newton_worker":
        result = newton_iteration_worker(args)
        from mpinewton.comm import world

        if world().is_root:
            print(json.dumps(result))
        return 0
    if args.which == "_memory_worker":
        print(json.dumps(memory_worker(args)))
        return 0
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": args.data or "synthetic", "threads": args.threads,
        "micro_batch": args.micro_batch,
    }
    import tensorflow as tf

    results["machine"]["tensorflow"] = tf.__version__
    steps = {"products": bench_products, "table": bench_table, "ranks": bench_ranks,
             "memory": bench_memory}
    for name, fn in steps.items():
        if args.which in (name, "all"):
            print(f"== {name}", flush=True)
            results[name] = fn(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
