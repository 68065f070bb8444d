"""Benchmarks: ``python -m mpinewton.bench [products|table|ranks|memory|all] --out FILE``.

Prints figures and writes them as JSON (``--out``), for ``docs/benchmarks.md``.
Speed and memory targets are checked here, never by timed unit tests.

``products``  HVP time / gradient time, thesis CNN, float64, b = 10,000 and 50,000, and
              one Gauss-Newton product against one HVP (GN/HVP).
``table``     one HVP at b = 1 ... 10,000 beside the thesis' table 14.2.
``ranks``     one Newton iteration on 2 ranks x 1 thread against 1 rank x 2 threads
              (launches mpirun itself), and the share of time inside Allreduce.
``micro-batches``  the gradient, Gauss-Newton product, HVP, and the products on a 5 %
              curvature sample on 2 ranks x 1 thread at micro-batches of 250, 500,
              1,000 and 2,000 (``--sizes``): the speed that ``objective.micro_batch`` sets.
``memory``    peak RSS of one rank computing a full-shard HVP, shard 25,000 and 50,000
              (one fresh process each).

``hessian``   the explicit Hessian of the thesis CNN (n = 3,192) at b = 1, 10, 100, 1000
              beside the thesis' table 14.1: assembled from batched products
              (``HessianOperator.matmat`` on blocks of ``--block`` identity columns), from
              a loop of single products at the largest b (``--loop-b``), and by the
              thesis' method, ``tape.jacobian`` of the gradient (``hessian_sum``), in a
              fresh process per b under a memory guard, up to ``--jacobian-max-b``
              (2-2.5 minutes on 2 cores; the jacobian at b = 100 needs 9-11 GiB).

Not part of ``all`` (thesis section 15: ResNet-50, float32, 224 x 224 x 3, 1000
classes, random uint8 images and labels, 'caffe' preprocessing):

``resnet``         gradient and HVP time at b = 16, HVP / gradient, every HVP mode
                   with and without XLA, beside the thesis' 20.6 s for one HVP.
``resnet-memory``  peak RSS of one fresh process computing a full HVP at global
                   batch 16 and 256 on one rank (micro-batches of ``--micro-batch``,
                   default 8: as fast as 16 per sample, half the memory).
``resnet-small``   compile time, one gradient and one HVP of resnet_mini and
                   ResNet-50 at 64 x 64 x 3, 5 classes, b = 16 (the test-suite workload).

Data: MNIST from ``--data`` (default data/mnist.h5), or random images of the same
shape with ``--synthetic`` (the timings do not depend on pixel values).

``--sizes 10,20`` replaces the batch sizes of ``products``, ``table`` and ``hessian``
(for a quick check of the benchmark itself, as tests/test_bench.py does); ``table``
and ``hessian`` then give the thesis figure only for the sizes that its table has.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.durable import atomic_write_text

THESIS_TABLE_14_2 = {1: 0.030, 10: 0.064, 100: 0.204, 1000: 1.173, 10000: 11.580}
#: Batch sizes of ``products`` (the first also without XLA) unless ``--sizes`` is given.
PRODUCTS_SIZES = (10_000, 50_000)
#: Thesis section 15.2: one ResNet-50 HVP at b = 16 took 20.577 s on 28 Haswell cores.
THESIS_RESNET_HVP_S = 20.577
#: Thesis table 14.1: seconds for the explicit Hessian of the thesis CNN (TensorFlow 1,
#: ``jacobian`` of the gradient, 2.7 GHz Core i7 laptop with 4 GB).
THESIS_TABLE_14_1 = {1: 6.529, 10: 15.722, 100: 145.366, 1000: 1256.274}
#: Columns per batched product in ``hessian``: 32 -> 64 gains 10-15% a column, more gains nothing.
HESSIAN_BLOCK = 64
#: Largest b for the thesis' method: tape.jacobian of the gradient holds the backward
#: passes of all n = 3,192 rows at once (9-11 GiB at b = 100 here; it crashed at b = 500).
JACOBIAN_MAX_B = 100
#: Micro-batch of ``hessian``'s loop of single products: one compiled call a product up
#: to b = 2000 (as fast as micro-batches of 250 or faster).
LOOP_MICRO_BATCH = 2000


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


def _interleaved(fns: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Times of ``repeats`` rounds in which every function runs once, in turn.

    The machine's speed drifts between minutes (10-30 % on a shared virtual
    machine); timing one product's repeats and then the other's puts that
    drift into their ratio. Within a round the products run seconds apart, so
    the ratio of two times of one round is nearly free of it; the order turns
    every round, so neither product always runs first. Each is called once to
    compile before the first round.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _round_ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """The median and range of the per-round ratios ``num / den``."""
    ratios = np.array(num) / np.array(den)
    return {"median": float(np.median(ratios)), "min": float(ratios.min()),
            "max": float(ratios.max())}


def bench_products(args: argparse.Namespace) -> dict[str, Any]:
    """HVP / gradient time ratio at b = 10,000 and 50,000 or ``--sizes`` (both HVP modes).

    The products of one case run interleaved (:func:`_interleaved`); each
    case reports the best time of each product, the ratio of the bests, and
    the median and range of the per-round ratios (the figure least moved by
    the machine's drift).
    """
    out: dict[str, Any] = {}
    sizes = args.sizes or PRODUCTS_SIZES
    cases = [(b, mode, True) for b in sizes
             for mode in ("reverse_over_reverse", "forward_over_reverse")]
    cases.append((sizes[0], "reverse_over_reverse", False))
    for b, mode, jit in cases:
        local, w = _objective(b, args.data, args.micro_batch, hvp=mode, jit=jit)
        v = np.random.default_rng(1).standard_normal(w.size)
        fns = {"grad": lambda local=local, w=w: local.loss_grad_sum(w),
               "hvp": lambda local=local, w=w, v=v: local.hvp_sum(w, v)}
        gn = mode == "reverse_over_reverse"  # the Gauss-Newton product has one mode
        if gn:
            fns["gnvp"] = lambda local=local, w=w, v=v: local.gnvp_sum(w, v)
        times = _interleaved(fns, args.repeats)
        grad_s, hvp_s = min(times["grad"]), min(times["hvp"])
        rounds = _round_ratios(times["hvp"], times["grad"])
        key = f"b={b} {mode}{'' if jit else ' (no XLA)'}"
        out[key] = {"grad_s": grad_s, "hvp_s": hvp_s, "ratio": hvp_s / grad_s,
                    "ratio_median": rounds["median"], "ratio_min": rounds["min"],
                    "ratio_max": rounds["max"], "rounds": args.repeats}
        line = (f"{key:<46} gradient {grad_s:7.3f}s  HVP {hvp_s:7.3f}s  "
                f"HVP/gradient {hvp_s / grad_s:5.2f} (rounds: median {rounds['median']:5.2f}, "
                f"{rounds['min']:.2f}-{rounds['max']:.2f})")
        if gn:
            gn_s = min(times["gnvp"])
            out[key].update(gnvp_s=gn_s, gnvp_over_hvp=gn_s / hvp_s, gnvp_over_grad=gn_s / grad_s,
                            gnvp_over_hvp_median=_round_ratios(times["gnvp"],
                                                               times["hvp"])["median"])
            line += f"  GN {gn_s:7.3f}s  GN/HVP {gn_s / hvp_s:5.2f}"
        print(line, flush=True)
    return out


def bench_table(args: argparse.Namespace) -> dict[str, Any]:
    """One HVP at b = 1 ... 10,000 (or ``--sizes``) beside thesis table 14.2."""
    out: dict[str, Any] = {}
    for b in args.sizes or THESIS_TABLE_14_2:
        local, w = _objective(b, args.data, args.micro_batch)
        v = np.random.default_rng(1).standard_normal(w.size)
        hvp_s = _best_of(lambda local=local, w=w, v=v: local.hvp_sum(w, v), args.repeats)
        thesis = THESIS_TABLE_14_2.get(b)
        if thesis is None:  # a size of --sizes that the thesis' table does not have
            out[str(b)] = {"hvp_s": hvp_s, "thesis_s": None, "speedup": None}
            print(f"b={b:<6} HVP {hvp_s * 1e3:9.2f} ms   (not in the thesis' table)", flush=True)
            continue
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


#: Removes what a launcher killed with SIGKILL left under the pid that mpirun, exec'd from
#: this shell, takes: Open MPI 5 then stops with "The PMIx server's listener thread failed
#: to start" (scripts/mpirun.sh, which the scripts use, does the same).
_CLEAR_STALE_SESSION = ('d="${TMPDIR:-/tmp}/ompi.$$"; if [ -O "$d" ]; then rm -rf -- "$d"; fi; '
                        'exec "$@"')


def _mpirun() -> list[str]:
    """The start of an mpirun command line (more ranks than cores allowed)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("mpirun not found: run scripts/setup.sh")
    return ["bash", "-c", _CLEAR_STALE_SESSION, "mpirun", mpirun, "--oversubscribe"]


def bench_ranks(args: argparse.Namespace) -> dict[str, Any]:
    """2 ranks x 1 thread against 1 rank x 2 threads on the same global batch."""
    out: dict[str, Any] = {}
    for ranks, threads in ((1, 2), (2, 1)):
        cmd = [*_mpirun(), "-n", str(ranks), sys.executable, "-m",
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


#: Micro-batches of ``micro-batches`` unless ``--sizes`` is given.
MICRO_BATCHES = (250, 500, 1000, 2000)
#: The curvature sample of ``micro-batches``: the default job's first fraction.
MICRO_BATCH_CURVATURE_FRACTION = 0.05


def micro_batch_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time one rank's share of a training step's products at each micro-batch size.

    For every size of ``--sizes``: the gradient, a Gauss-Newton product and an
    HVP on this rank's shard of ``--samples``, and a Gauss-Newton product and
    the Fisher diagonal on its part of a 5 % curvature sample, padded as the
    trainer pads it (:func:`mpinewton.train.subsample.set_curvature_rows`).
    Each call includes its Allreduce; all run interleaved (:func:`_interleaved`).
    """
    from mpinewton.comm import world
    from mpinewton.data import shard_bounds
    from mpinewton.objective import DistributedObjective
    from mpinewton.sampling import curvature_count

    comm = world()
    sizes = args.sizes or MICRO_BATCHES
    lo, hi = shard_bounds(args.samples, comm.rank, comm.size)
    m = curvature_count(args.samples, MICRO_BATCH_CURVATURE_FRACTION)
    part = -(-m // comm.size)
    x, y = _images(args.samples, args.data)
    fns: dict[str, Any] = {}
    for mb in sizes:
        local, w = _objective(args.samples, args.data, mb, lo=lo, hi=hi)
        full = DistributedObjective(local, comm, args.samples)
        sub_local, _ = _objective(args.samples, args.data, mb, lo=lo, hi=hi)
        sub_local.set_samples(x[lo:lo + part], y[lo:lo + part],
                              pad_to=max(1, -(-5 * m // (4 * comm.size))))
        sub = DistributedObjective(sub_local, comm, m)
        v = np.random.default_rng(1).standard_normal(w.size)
        fns[f"{mb} gradient"] = lambda full=full, w=w: full.value_and_grad(w)
        fns[f"{mb} gauss-newton"] = lambda full=full, w=w, v=v: full.gnvp(w, v)
        fns[f"{mb} hvp"] = lambda full=full, w=w, v=v: full.hvp(w, v)
        fns[f"{mb} gauss-newton on 5 %"] = lambda sub=sub, w=w, v=v: sub.gnvp(w, v)
        fns[f"{mb} fisher diagonal on 5 %"] = lambda sub=sub, w=w: sub.grad_squares(w)
    times = _interleaved(fns, args.repeats)
    out: dict[str, Any] = {"ranks": comm.size, "samples": args.samples,
                           "curvature_samples": m}
    for key, t in times.items():
        mb, product = key.split(" ", 1)
        out.setdefault(mb, {})[product] = {"median_s": float(np.median(t)), "best_s": min(t)}
    return out


def bench_micro_batches(args: argparse.Namespace) -> dict[str, Any]:
    """A step's products on 2 ranks x 1 thread at micro-batches of 250 ... 2,000 (``--sizes``).

    The micro-batch (``objective.micro_batch``) is how many samples one
    compiled call takes; it sets how much of the activations stays in the
    caches. Launches mpirun itself, as ``ranks`` does.
    """
    sizes = ",".join(str(s) for s in (args.sizes or MICRO_BATCHES))
    cmd = [*_mpirun(), "-n", "2", sys.executable, "-m", "mpinewton.bench",
           "_micro_batch_worker", "--threads", "1", "--samples", str(args.samples),
           "--repeats", str(args.repeats), "--sizes", sizes]
    if args.data:
        cmd += ["--data", args.data]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    products = list(next(v for k, v in out.items() if k.isdigit()))
    print(f"{'micro-batch':>11}  " + "  ".join(f"{p:>24}" for p in products)
          + "   (median seconds of the rounds, rank 0)", flush=True)
    for mb in (k for k in out if k.isdigit()):
        print(f"{mb:>11}  " + "  ".join(f"{out[mb][p]['median_s']:24.4f}" for p in products),
              flush=True)
    return out


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_during(work: Any) -> tuple[float, float, Any]:
    """(RSS before, peak RSS during, result) of ``work()``, sampled every 2 ms by a thread."""
    import threading

    before = _current_rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return before, peak[0], result


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak resident memory of this process while it computes full-shard HVPs.

    A sampler thread reads the current RSS every 2 ms during two HVPs (the
    first compiles); ``ru_maxrss`` would report the process' all-time peak,
    which TensorFlow's start-up can dominate.
    """
    local, w = _objective(args.samples, args.data, args.micro_batch)
    before, peak, _ = _peak_rss_during(lambda: [local.hvp_sum(w, np.ones_like(w))
                                                for _ in range(2)])
    return {"samples": args.samples, "peak_rss_mib": peak, "rss_before_hvp_mib": before,
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


def _resnet_case(model: Any, b: int, size: int, classes: int, micro_batch: int, *,
                 hvp: str, jit: bool) -> tuple[Any, np.ndarray, np.ndarray]:
    """A ResNet objective on ``b`` random uint8 images ('caffe' preprocessing), w and v."""
    from mpinewton.local import LocalObjective
    from mpinewton.params import get_flat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, b)
    local = LocalObjective(model, x, y, num_classes=classes, micro_batch=micro_batch, jit=jit,
                           hvp=hvp, preprocess="caffe")
    w = get_flat(model)
    return local, w, rng.standard_normal(w.size).astype(w.dtype)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _first_and_best(fn: Any, repeats: int) -> tuple[float, float]:
    """The first call (which compiles) and the best of ``repeats`` further calls."""
    first = _timed(fn)
    return first, min(_timed(fn) for _ in range(repeats))


def bench_resnet(args: argparse.Namespace) -> dict[str, Any]:
    """ResNet-50 at b = 16: gradient and HVP time, every HVP mode, with and without XLA."""
    from mpinewton.local import HVP_MODES
    from mpinewton.models import resnet50

    b, size, classes = 16, 224, 1000
    model = resnet50(dtype="float32", input_shape=(size, size, 3), num_classes=classes)
    out: dict[str, Any] = {"batch": b, "image": [size, size, 3], "classes": classes,
                           "thesis_hvp_s": THESIS_RESNET_HVP_S}
    for jit in (True, False):
        grad_s = None
        for mode in HVP_MODES:
            local, w, v = _resnet_case(model, b, size, classes, args.micro_batch, hvp=mode,
                                       jit=jit)
            if grad_s is None:
                grad_first_s, grad_s = _first_and_best(
                    lambda local=local, w=w: local.loss_grad_sum(w), args.repeats)
                key = f"gradient{'' if jit else ' (no XLA)'}"
                out[key] = {"grad_s": grad_s, "first_call_s": grad_first_s}
                print(f"{key:<40} {grad_s:7.3f}s  (first call {grad_first_s:.1f}s)", flush=True)
            first_s, hvp_s = _first_and_best(
                lambda local=local, w=w, v=v: local.hvp_sum(w, v), args.repeats)
            key = f"{mode}{'' if jit else ' (no XLA)'}"
            out[key] = {"grad_s": grad_s, "hvp_s": hvp_s, "ratio": hvp_s / grad_s,
                        "first_call_s": first_s, "thesis_over_hvp": THESIS_RESNET_HVP_S / hvp_s}
            print(f"{key:<40} HVP {hvp_s:7.3f}s  HVP/gradient {hvp_s / grad_s:5.2f}  "
                  f"(first call {first_s:.1f}s; thesis {THESIS_RESNET_HVP_S:.1f}s on 28 cores, "
                  f"{THESIS_RESNET_HVP_S / hvp_s:.1f}x)", flush=True)
    return out


def resnet_memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of this process while it computes a full ResNet-50 HVP over ``samples``.

    Sampled every 2 ms as :func:`memory_worker` does; the first micro-batch of
    the first HVP compiles, so compilation memory is included.
    """
    from mpinewton.models import resnet50

    model = resnet50(dtype="float32", input_shape=(224, 224, 3), num_classes=1000)
    local, w, v = _resnet_case(model, args.samples, 224, 1000, args.micro_batch, hvp=args.hvp,
                               jit=not args.no_jit)
    before, peak, seconds = _peak_rss_during(
        lambda: [_timed(lambda: local.hvp_sum(w, v)) for _ in range(args.hvps)])
    return {"samples": args.samples, "micro_batch": args.micro_batch, "hvp": args.hvp,
            "jit": not args.no_jit, "peak_rss_mib": peak, "rss_before_hvp_mib": before,
            "hvp_seconds": seconds,
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_resnet_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of a full ResNet-50 HVP at global batch 16 and 256 on one rank."""
    out: dict[str, Any] = {}
    for samples, hvps in ((16, 2), (256, 1)):
        cmd = [sys.executable, "-m", "mpinewton.bench", "_resnet_memory_worker", "--samples",
               str(samples), "--micro-batch", str(args.micro_batch), "--threads",
               str(args.threads), "--hvp", args.hvp, "--hvps", str(hvps)]
        if args.no_jit:
            cmd.append("--no-jit")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if proc.returncode != 0:
            raise SystemExit(f"worker failed:\n{proc.stdout}\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out[str(samples)] = result
        print(f"batch {samples:>4}: peak RSS during the HVP {result['peak_rss_mib'] / 1024:6.2f} "
              f"GiB (before {result['rss_before_hvp_mib'] / 1024:.2f} GiB; micro-batch "
              f"{args.micro_batch}, {args.hvp}{'' if not args.no_jit else ', no XLA'}; HVP "
              f"{', '.join(f'{s:.1f}s' for s in result['hvp_seconds'])})", flush=True)
    return out


def bench_resnet_small(args: argparse.Namespace) -> dict[str, Any]:
    """Test-suite workload: resnet_mini and ResNet-50 at 64 x 64 x 3, 5 classes, b = 16."""
    from mpinewton.models import build_model

    out: dict[str, Any] = {}
    size, classes, b = 64, 5, 16
    for name in ("resnet_mini", "resnet50"):
        start = time.perf_counter()
        model = build_model(name, dtype="float32", seed=0, input_shape=(size, size, 3),
                            num_classes=classes, hidden=(8, 16, 32))
        build_s = time.perf_counter() - start
        local, w, v = _resnet_case(model, b, size, classes, b, hvp=args.hvp, jit=not args.no_jit)
        grad_first, grad_s = _first_and_best(lambda local=local, w=w: local.loss_grad_sum(w),
                                             args.repeats)
        hvp_first, hvp_s = _first_and_best(lambda local=local, w=w, v=v: local.hvp_sum(w, v),
                                           args.repeats)
        out[name] = {"weights": int(w.size), "build_s": build_s,
                     "grad_first_call_s": grad_first, "hvp_first_call_s": hvp_first,
                     "grad_s": grad_s, "hvp_s": hvp_s}
        print(f"{name:<12} {w.size:>10,d} weights: build {build_s:5.1f}s, first gradient "
              f"{grad_first:5.1f}s, first HVP {hvp_first:5.1f}s (compile), then gradient "
              f"{grad_s:6.3f}s, HVP {hvp_s:6.3f}s", flush=True)
    return out


def _rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _available_mib() -> float:
    """MemAvailable of this machine in MiB (from /proc/meminfo; 8 GiB where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 8192.0


def _run_guarded(cmd: list[str], limit_mib: float,
                 timeout_s: float) -> tuple[int | None, str, str, str | None]:
    """Run ``cmd``, killing it when its RSS passes ``limit_mib`` or it runs past ``timeout_s``.

    Returns (exit code, stdout, stderr, why it was killed or None).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    start, killed = time.monotonic(), None
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            rss = _rss_mib(proc.pid)
            if killed is None and rss > limit_mib:
                killed = (f"killed at {rss / 1024:.1f} GiB resident, above the guard of "
                          f"{limit_mib / 1024:.1f} GiB")
            elif killed is None and time.monotonic() - start > timeout_s:
                killed = f"killed after {timeout_s:.0f} s"
            if killed is not None:
                proc.kill()
    return proc.returncode, stdout, stderr, killed


def hessian_jacobian_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The thesis' explicit Hessian (``hessian_sum``: tape.jacobian of the gradient) at b.

    Saves the matrix to ``--npy`` for the parent to compare; the time is one call
    (eager ``tape.jacobian`` builds its vectorised graph on every call).
    """
    local, w = _objective(args.samples, args.data, args.micro_batch)
    start = time.perf_counter()
    before, peak, hessian = _peak_rss_during(lambda: local.hessian_sum(w))
    seconds = time.perf_counter() - start
    np.save(args.npy, hessian)
    return {"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before}


def _batched_hessian(op: Any, block: int) -> np.ndarray:
    """H from ``op.matmat`` on blocks of ``block`` identity columns.

    The last block is padded with zero columns, so that every call has the same
    k and uses one compiled graph.
    """
    n = op.shape[0]
    hessian = np.empty((n, n))
    for lo in range(0, n, block):
        cols = min(block, n - lo)
        unit = np.zeros((n, block))
        unit[lo + np.arange(cols), np.arange(cols)] = 1.0
        hessian[:, lo:lo + cols] = op.matmat(unit)[:, :cols]
    return hessian


def _looped_hessian(op: Any) -> np.ndarray:
    """H from one ``op.matvec`` (one HVP) per identity column."""
    n = op.shape[0]
    hessian = np.empty((n, n))
    unit = np.zeros(n)
    for j in range(n):
        unit[j] = 1.0
        hessian[:, j] = op.matvec(unit)
        unit[j] = 0.0
    return hessian


def _rel_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, that divided by max |b|)."""
    diff = float(np.abs(a - b).max())
    return diff, diff / float(np.abs(b).max())


def _cell(value: float | None, spec: str, width: int) -> str:
    """``value`` formatted with ``spec`` and right-aligned in ``width``, "-" for None."""
    return format(format(value, spec) if value is not None else "-", f">{width}")


def bench_hessian(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit Hessian of the thesis CNN at b = 1 ... 1000 (or ``--sizes``), thesis table 14.1.

    Per b: the batched assembly (one timed run after a first call that compiles),
    at ``--loop-b`` a loop of single products, and the thesis' ``tape.jacobian``
    in a fresh process under a memory guard (up to ``--jacobian-max-b``), compared
    entry by entry with the batched matrix.
    """
    from mpinewton.comm import Comm
    from mpinewton.objective import DistributedObjective
    from mpinewton.solvers import HessianOperator

    sizes = args.sizes or tuple(THESIS_TABLE_14_1)
    loop_b = max(sizes) if args.loop_b is None else args.loop_b
    guard_mib = (args.jacobian_max_gib * 1024 if args.jacobian_max_gib
                 else 0.8 * _available_mib())
    out: dict[str, Any] = {"block": args.block, "hvp": args.hvp, "loop_b": loop_b,
                           "jacobian_max_b": args.jacobian_max_b,
                           "jacobian_guard_mib": guard_mib, "sizes": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpinewton-hessian-") as tmp:
        for b in sizes:
            local, w = _objective(b, args.data, args.micro_batch, hvp=args.hvp)
            op = HessianOperator(DistributedObjective(local, Comm(None), b), w)
            compile_s = _timed(lambda op=op: op.matmat(np.eye(op.shape[0], args.block)))
            start = time.perf_counter()
            _, peak, hessian = _peak_rss_during(lambda op=op: _batched_hessian(op, args.block))
            batched_s = time.perf_counter() - start
            thesis = THESIS_TABLE_14_1.get(b)
            entry: dict[str, Any] = {
                "batched_s": batched_s, "batched_first_block_s": compile_s,
                "batched_peak_rss_mib": peak,
                "symmetry_rel": _rel_diff(hessian, hessian.T)[1],
                "thesis_s": thesis, "speedup_vs_thesis": thesis / batched_s if thesis else None}
            print(f"b={b:<5} batched products ({args.block} a call): {batched_s:8.2f}s  "
                  f"(first call {compile_s:.1f}s, peak RSS {peak / 1024:.2f} GiB)"
                  + (f"  thesis {thesis:8.1f}s: {thesis / batched_s:6.1f}x faster" if thesis
                     else ""), flush=True)
            if b == loop_b:  # single products are fastest as one call for the whole batch
                single, _ = _objective(b, args.data, LOOP_MICRO_BATCH, hvp=args.hvp)
                single_op = HessianOperator(DistributedObjective(single, Comm(None), b), w)
                single_op.matvec(np.ones(w.size))  # compile
                start = time.perf_counter()
                looped = _looped_hessian(single_op)
                loop_s = time.perf_counter() - start
                entry.update(loop_s=loop_s, loop_micro_batch=LOOP_MICRO_BATCH,
                             batching_gain=loop_s / batched_s,
                             loop_max_abs_diff=_rel_diff(hessian, looped)[0])
                print(f"b={b:<5} loop of {w.size} single products:  {loop_s:8.2f}s  "
                      f"(batching {loop_s / batched_s:.2f}x faster)", flush=True)
            if b > args.jacobian_max_b:
                entry["jacobian"] = {"skipped": (
                    f"b > --jacobian-max-b = {args.jacobian_max_b}: tape.jacobian of the "
                    "gradient holds all n backward passes at once (9-11 GiB at b = 100, "
                    "growing with b; it crashed at b = 500)")}
                print(f"b={b:<5} tape.jacobian: skipped (b > --jacobian-max-b = "
                      f"{args.jacobian_max_b})", flush=True)
            else:
                entry["jacobian"] = _jacobian_case(args, b, hessian, guard_mib, tmp)
            out["sizes"][str(b)] = entry
            rows.append((b, entry))
            del op, local, hessian
    print(f"{'b':>6} {'batched [s]':>12} {'HVP loop [s]':>13} {'jacobian [s]':>13} "
          f"{'thesis [s]':>11} {'vs thesis':>10} {'max|Hb-Hj|/max|Hj|':>19}")
    for b, entry in rows:
        jac = entry["jacobian"]
        print(f"{b:>6} {_cell(entry['batched_s'], '.2f', 12)} "
              f"{_cell(entry.get('loop_s'), '.2f', 13)} {_cell(jac.get('seconds'), '.2f', 13)} "
              f"{_cell(entry['thesis_s'], '.1f', 11)} "
              f"{_cell(entry['speedup_vs_thesis'], '.1f', 9)}{'x' if entry['thesis_s'] else ' '} "
              f"{_cell(jac.get('max_rel_diff'), '.1e', 19)}", flush=True)
    return out


def _jacobian_case(args: argparse.Namespace, b: int, hessian: np.ndarray, guard_mib: float,
                   tmp: str) -> dict[str, Any]:
    """The thesis' method at b in a fresh process under the memory guard, compared to H."""
    npy = os.path.join(tmp, f"jacobian-{b}.npy")
    cmd = [sys.executable, "-m", "mpinewton.bench", "_hessian_jacobian_worker", "--samples",
           str(b), "--micro-batch", str(args.micro_batch), "--threads", str(args.threads),
           "--npy", npy]
    cmd += ["--data", args.data] if args.data else ["--synthetic"]
    code, stdout, stderr, killed = _run_guarded(cmd, guard_mib, args.jacobian_timeout)
    if killed or code != 0:
        why = killed or f"failed with exit code {code}: {stderr.strip()[-300:]}"
        print(f"b={b:<5} tape.jacobian: {why}", flush=True)
        return {"failed": why}
    result = json.loads(stdout.strip().splitlines()[-1])
    jacobian = np.load(npy) / b  # hessian_sum is the Hessian of the sum, H of the mean
    os.unlink(npy)
    result["max_abs_diff"], result["max_rel_diff"] = _rel_diff(hessian, jacobian)
    seconds = result["seconds"]
    print(f"b={b:<5} tape.jacobian (thesis' method): {seconds:8.2f}s  (peak RSS "
          f"{result['peak_rss_mib'] / 1024:.2f} GiB; max |H_batched - H_jacobian| = "
          f"{result['max_abs_diff']:.2e}, {result['max_rel_diff']:.2e} of max |H|)", flush=True)
    return result


def _sizes(text: str) -> tuple[int, ...]:
    """``--sizes``: comma-separated positive batch sizes, e.g. ``10,20``."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 10,20, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks, print them, and write JSON to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m mpinewton.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="all",
                        choices=["all", "products", "table", "ranks", "memory", "hessian",
                                 "resnet", "resnet-memory", "resnet-small", "_newton_worker",
                                 "_memory_worker", "_resnet_memory_worker",
                                 "_hessian_jacobian_worker", "micro-batches",
                                 "_micro_batch_worker"])
    parser.add_argument("--data", default="data/mnist.h5", help="HDF5 dataset (MNIST)")
    parser.add_argument("--synthetic", action="store_true", help="random images instead")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="samples per compiled call (default 500; hessian: 250; "
                        "resnet: 16, resnet-memory: 8)")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="batch sizes of products, table and hessian, e.g. 10,20 "
                        "(default: 10000,50000; the thesis' 1,10,100,1000,10000; 1,10,100,1000)"
                        "; the micro-batches of micro-batches (default 250,500,1000,2000)")
    parser.add_argument("--cg", type=int, default=10, help="HVPs per Newton iteration (ranks)")
    parser.add_argument("--hvp", default="reverse_over_reverse",
                        help="HVP mode of hessian, resnet-memory and resnet-small")
    parser.add_argument("--block", type=int, default=HESSIAN_BLOCK,
                        help=f"hessian: columns per batched product (default {HESSIAN_BLOCK})")
    parser.add_argument("--loop-b", type=int, default=None,
                        help="hessian: the b at which to time a loop of single products "
                        "(default: the largest size; 0: none)")
    parser.add_argument("--jacobian-max-b", type=int, default=JACOBIAN_MAX_B,
                        help="hessian: largest b for the thesis' tape.jacobian (default "
                        f"{JACOBIAN_MAX_B})")
    parser.add_argument("--jacobian-max-gib", type=float, default=None,
                        help="hessian: kill tape.jacobian above this resident memory "
                        "(default: 80%% of the memory available at the start)")
    parser.add_argument("--jacobian-timeout", type=float, default=1800,
                        help="hessian: kill tape.jacobian after this many seconds")
    parser.add_argument("--npy", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-jit", action="store_true", help="resnet-memory/-small without XLA")
    parser.add_argument("--hvps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.micro_batch is None:
        args.micro_batch = {"resnet": 16, "resnet-small": 16, "resnet-memory": 8,
                            "_resnet_memory_worker": 8, "hessian": 250}.get(args.which, 500)
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
    if args.which == "_resnet_memory_worker":
        print(json.dumps(resnet_memory_worker(args)))
        return 0
    if args.which == "_micro_batch_worker":
        result = micro_batch_worker(args)
        from mpinewton.comm import world

        if world().is_root:
            print(json.dumps(result))
        return 0
    if args.which == "_hessian_jacobian_worker":
        print(json.dumps(hessian_jacobian_worker(args)))
        return 0
    from mpinewton.machine import describe

    results: dict[str, Any] = {
        "machine": describe(), "data": args.data or "synthetic", "threads": args.threads,
        "micro_batch": args.micro_batch,
    }
    steps = {"products": bench_products, "table": bench_table, "ranks": bench_ranks,
             "micro-batches": bench_micro_batches,
             "memory": bench_memory, "hessian": bench_hessian, "resnet": bench_resnet,
             "resnet-memory": bench_resnet_memory, "resnet-small": bench_resnet_small}
    for name, fn in steps.items():
        if args.which == name or (args.which == "all" and not name.startswith("resnet")):
            print(f"== {name}", flush=True)
            results[name] = fn(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
