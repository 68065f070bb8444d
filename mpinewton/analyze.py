"""``python -m mpinewton.analyze COMMAND [JOB.toml] [options]``: the curvature of any run.

Thesis chapters 13-15 study the Hessian before trusting it; these commands do
the same for any model a job builds, at any weights, under ``mpirun`` like
training. Every product is the trainer's distributed, batch-additive one
(``DistributedObjective``) on the job's training data (or its first
``--batch N`` samples); the numerics are :mod:`mpinewton.analysis`.

Commands:

``hessian``   the explicit Hessian (small models): columns split across ranks,
              each rank computing its block with batched products over the
              whole batch; rank 0 saves it with its symmetry error and spectrum.
``eigen``     top-k eigenpairs by power iteration with deflation (thesis
              Algorithm 5) and by Lanczos, with residuals and product counts.
``trace``     Hutchinson's trace estimate with its standard error.
``spectrum``  a stochastic Lanczos quadrature density (Ghorbani et al. 2019).
``taylor``    the Taylor test (thesis 13, figure 14.1, table 15.1) along the
              thesis' uniform direction, a random one and the top eigenvector:
              remainders, fitted slopes, plot.
``surface``   the loss on a line and a plane along the top two eigenvectors
              (thesis figures 15.1, 15.2) or filter-normalised random directions.

Weights: ``--run-dir DIR`` (its newest valid checkpoint, else ``DIR/weights.h5``),
``--checkpoint PATH``, ``--weights PATH`` (an mpinewton or Keras weights file),
or the job's start weights. Results go to ``--out`` (default
``DIR/analysis`` or ``analysis/<run.name>``) as HDF5/JSON and PNG. Exit codes as
for training: 0 done, 2 bad input (reported by every rank).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpinewton.comm import Comm, DistributedError, install_abort_handler, world
from mpinewton.config import ConfigError, JobConfig, load_job
from mpinewton.durable import atomic_path, atomic_write_text
from mpinewton.weights_source import (
    WeightsSource,
    agreed_weights,
    objective_session,
    read_weights,
)

EXIT_BAD_INPUT = 2
COMMANDS = ("hessian", "eigen", "trace", "spectrum", "taylor", "surface")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m mpinewton.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("job", nargs="?", default=None, help="TOML job (default jobs/mnist_cnn.toml)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run-dir", help="a training run: its newest valid checkpoint")
    src.add_argument("--checkpoint", help="one checkpoint file")
    src.add_argument("--weights", help="a weights file (mpinewton weights.h5 or Keras)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one job key (repeatable)")
    p.add_argument("--batch", type=int, default=0,
                   help="use the first N training samples (default: data.limit, else all)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of random directions and probes")
    p.add_argument("-k", type=int, default=2, help="eigen: number of eigenpairs")
    p.add_argument("--which", default="LM", choices=("LM", "LA", "SA"),
                   help="eigen: largest magnitude, largest or smallest algebraic")
    p.add_argument("--tol", type=float, default=1e-6, help="eigen: relative residual tolerance")
    p.add_argument("--max-iter", type=int, default=0,
                   help="eigen: iteration cap (default: power 1000 per pair, Lanczos min(n, 300))")
    p.add_argument("--method", default="both", choices=("both", "lanczos", "power"),
                   help="eigen: Lanczos, power iteration with deflation, or both (default)")
    p.add_argument("--low-memory", action="store_true",
                   help="eigen: Lanczos keeps no basis (a few vectors instead of one per "
                   "step, twice the products), for models whose basis would not fit")
    p.add_argument("--samples", type=int, default=100, help="trace: Hutchinson probes")
    p.add_argument("--runs", type=int, default=10, help="spectrum: SLQ runs")
    p.add_argument("--steps", type=int, default=80, help="spectrum: Lanczos steps per run")
    p.add_argument("--block", type=int, default=64, help="hessian: columns per batched call")
    p.add_argument("--directions", default="eigen", choices=("eigen", "random"),
                   help="surface: top-2 eigenvectors or filter-normalised random directions")
    p.add_argument("--points", type=int, default=21, help="surface: grid points per axis")
    p.add_argument("--span", type=float, default=1.0,
                   help="surface: the grid covers [-span, span] along each direction")
    return p.parse_args(argv)


@dataclass
class Setup:
    """What every command works on: job, model layout, weights, the objective."""

    job: JobConfig
    comm: Comm
    layout: Any
    w: np.ndarray
    source: str
    batch: int
    out: Path
    objective: Any  # DistributedObjective over this rank's part of the batch
    session: Any  # train.session.Session-like: model and objective factory

    def say(self, *args: Any) -> None:
        """Print on rank 0 only."""
        if self.comm.is_root:
            print(*args, flush=True)


def _source(args: argparse.Namespace) -> WeightsSource | None:
    """The weights the options name (None: the job's start weights)."""
    if args.checkpoint:
        return WeightsSource("checkpoint", Path(args.checkpoint), label="--checkpoint")
    if args.run_dir:  # its newest valid checkpoint, else its final weights.h5
        return WeightsSource("run_dir", Path(args.run_dir), prefer="checkpoint",
                             label="--run-dir")
    if args.weights:
        return WeightsSource("weights", Path(args.weights), label="--weights")
    return None


def setup(args: argparse.Namespace, comm: Comm) -> Setup:
    """Job, model, weights and the distributed objective, every phase agreed by all ranks."""
    from mpinewton.train.session import configure_threads

    job = comm.run_agreed(lambda: load_job(args.job, args.overrides), "reading the job")
    if args.batch < 0:
        raise ConfigError(f"--batch {args.batch} must be >= 0")
    configure_threads(job)
    from mpinewton.data import read_shard
    from mpinewton.models import build_model
    from mpinewton.params import ParamLayout, get_flat

    model = comm.run_agreed(lambda: build_model(
        job.model.name, dtype=job.model.dtype, seed=job.run.seed,
        input_shape=tuple(job.model.input_shape), num_classes=job.model.num_classes,
        hidden=job.model.hidden), "building the model")
    layout = ParamLayout.of(model)
    src = _source(args)
    w, source = agreed_weights(comm, model, layout, lambda: (
        read_weights(src, model, layout, job=job) if src is not None
        else (get_flat(model), "the job's start weights")))
    limit = args.batch or job.data.limit or None
    checks = {"num_classes": job.model.num_classes,
              "expected_sample_shape": tuple(job.model.input_shape)}
    shard = comm.run_agreed(lambda: read_shard(job.data.path, list(job.data.train_splits),
                                               comm.rank, comm.size, limit=limit, **checks),
                            "loading data")
    session = objective_session(job, comm, model, layout, w)
    out = Path(args.out) if args.out else (Path(args.run_dir) / "analysis" if args.run_dir
                                           else Path("analysis") / job.run.name)
    objective = session.objective(shard.x, shard.y, shard.total)
    return Setup(job=job, comm=comm, layout=layout, w=w, source=source, batch=shard.total,
                 out=out, objective=objective, session=session)


def _save_json(s: Setup, name: str, data: dict[str, Any]) -> Path:
    path = s.out / name
    if s.comm.is_root:
        s.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _save_h5(s: Setup, name: str, arrays: dict[str, Any], attrs: dict[str, Any]) -> Path:
    path = s.out / name
    if s.comm.is_root:
        import h5py

        s.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=np.asarray(value))
            for key, value in attrs.items():
                f.attrs[key] = value
    return path


def _about(s: Setup) -> dict[str, Any]:
    return {"job": s.job.run.name, "model": s.job.model.name, "weights": s.layout.size,
            "dtype": s.job.model.dtype, "batch": s.batch, "weights_from": s.source,
            "world_size": s.comm.size}


def check_arguments(args: argparse.Namespace, s: Setup) -> None:
    """Refuse bad options before any product (the same verdict on every rank)."""
    n = s.layout.size
    rules = [
        (args.command == "eigen" and not 1 <= args.k <= n,
         f"-k {args.k}: ask for 1 to {n} eigenpairs (the model has {n} weights)"),
        (args.command == "eigen" and not args.tol > 0, f"--tol {args.tol} must be > 0"),
        (args.max_iter < 0, f"--max-iter {args.max_iter} must be >= 1"),
        (args.command == "trace" and args.samples < 2,
         f"--samples {args.samples}: a standard error needs at least 2 probes"),
        (args.command == "spectrum" and (args.runs < 1 or args.steps < 1),
         f"--runs {args.runs} and --steps {args.steps} must be >= 1"),
        (args.command == "surface" and args.points < 1,
         f"--points {args.points}: the grid needs at least one point"),
        (args.command == "surface" and not args.span > 0, f"--span {args.span} must be > 0"),
        (args.command == "hessian" and args.block < 1, f"--block {args.block} must be >= 1"),
    ]
    for bad, message in rules:
        if bad:
            raise ConfigError(message)
    if args.command == "hessian":
        from mpinewton.analysis import default_max_bytes, hessian_bytes

        need, limit = hessian_bytes(n), default_max_bytes()
        if need > limit:
            raise ConfigError(
                f"the explicit Hessian of {n:,} weights needs {need / 2**30:,.1f} GiB, more "
                f"than the {limit / 2**30:,.1f} GiB it may take here; use eigen, trace or "
                "spectrum, which need only Hessian-vector products")


# --------------------------------------------------------------------------- commands


def cmd_hessian(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    """The explicit Hessian: each rank computes a block of columns over the whole batch."""
    from mpinewton import analysis
    from mpinewton.data import read_shard, shard_bounds
    from mpinewton.solvers import HessianOperator

    n, comm, job = s.layout.size, s.comm, s.job
    full = comm.run_agreed(lambda: read_shard(
        job.data.path, list(job.data.train_splits), 0, 1, limit=s.batch,
        num_classes=job.model.num_classes, expected_sample_shape=tuple(job.model.input_shape)),
        "loading the whole batch on every rank")
    local = s.session.objective(full.x, full.y, full.total).local
    lo, hi = shard_bounds(n, comm.rank, comm.size)

    class _Local:  # the batch's mean Hessian, computed on this rank alone
        def hvp(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
            return local.hvp_sum(w, v) / full.total

        def hvp_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
            return local.hvp_sum_many(w, v) / full.total

    start = time.perf_counter()
    block = analysis.explicit_hessian(HessianOperator(_Local(), s.w), block=args.block,
                                      columns=range(lo, hi))
    seconds = time.perf_counter() - start
    blocks = comm.gather(block.matrix)
    result = {**_about(s), "seconds_rank0": seconds}
    if comm.is_root:
        matrix = np.concatenate(blocks, axis=1)
        summary = analysis.summarize(matrix)
        _save_h5(s, "hessian.h5", {"H": matrix, "eigenvalues": summary.eigenvalues},
                 {"symmetry_error": summary.symmetry_error, "batch": s.batch})
        ev = summary.eigenvalues
        result.update(symmetry_error=summary.symmetry_error, eigenvalue_max=float(ev[-1]),
                      eigenvalue_min=float(ev[0]), trace=float(np.trace(matrix)),
                      negative_eigenvalues=int(np.sum(ev < 0)))
    return result


def _operator(s: Setup) -> Any:
    from mpinewton.solvers import HessianOperator

    return HessianOperator(s.objective, s.w)


def cmd_eigen(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    """Top-k eigenpairs two ways; the vectors are saved for ``taylor`` and ``surface``."""
    from mpinewton import analysis

    out: dict[str, Any] = {**_about(s), "k": args.k, "which": args.which, "tol": args.tol,
                           "method": args.method, "low_memory": args.low_memory}
    arrays: dict[str, Any] = {}
    methods = (("lanczos", analysis.lanczos), ("power", analysis.power_iteration))
    for name, fn in (m for m in methods if args.method in ("both", m[0])):
        start = time.perf_counter()
        caps = {"max_iter": args.max_iter} if args.max_iter else {}
        if name == "lanczos" and args.low_memory:
            caps["low_memory"] = True
        res = fn(_operator(s), k=args.k, which=args.which, tol=args.tol, seed=args.seed, **caps)
        out[name] = {"values": res.values, "residuals": res.residuals,
                     "converged": res.converged, "products": res.products,
                     "seconds": time.perf_counter() - start}
        arrays[f"{name}/values"], arrays[f"{name}/vectors"] = res.values, res.vectors
        residuals = " ".join(f"{r:.2e}" for r in res.residuals)
        s.say(f"{name}: eigenvalues {np.array2string(res.values, precision=6)}, residuals "
              f"[{residuals}], {res.products} products")
    _save_h5(s, "eigen.h5", arrays, {"which": args.which, "tol": args.tol, "batch": s.batch,
                                     "weights_from": s.source})
    return out


def cmd_trace(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    """Hutchinson's estimate of tr(H)."""
    from mpinewton import analysis

    res = analysis.hutchinson(_operator(s), samples=args.samples, seed=args.seed)
    return {**_about(s), "trace": res.estimate, "stderr": res.stderr, "samples": res.samples,
            "products": res.products}


def cmd_spectrum(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    """Stochastic Lanczos quadrature: nodes, weights, a density plot."""
    from mpinewton import analysis

    res = analysis.slq(_operator(s), runs=args.runs, steps=min(args.steps, s.layout.size),
                       seed=args.seed)
    _save_h5(s, "spectrum.h5", {"nodes": res.nodes, "weights": res.weights}, {})
    lo, hi = float(res.nodes.min()), float(res.nodes.max())
    pad = 0.05 * max(hi - lo, 1e-12)
    grid = np.linspace(lo - pad, hi + pad, 2000)
    density = res.density(grid)
    if s.comm.is_root:
        _plot_spectrum(s.out / "spectrum.png", grid, density, s)
    return {**_about(s), "runs": args.runs, "steps": args.steps, "products": res.products,
            "trace_estimate": res.trace_estimate(s.layout.size), "min_node": lo,
            "max_node": hi}


def _saved_vectors(s: Setup, k: int) -> np.ndarray | None:
    """Rank 0: the top-k eigenvectors ``eigen`` saved for these weights and this batch."""
    path = s.out / "eigen.h5"
    if not path.is_file():
        return None
    import h5py

    with h5py.File(path, "r") as f:
        vectors = f["lanczos/vectors" if "lanczos" in f else "power/vectors"][...]
        same = (f.attrs.get("batch") == s.batch and f.attrs.get("weights_from") == s.source
                and f.attrs.get("which") == "LM")
    if same and vectors.shape[0] == s.layout.size and vectors.shape[1] >= k:
        s.say(f"using the eigenvectors of {path}")
        return vectors[:, :k]
    return None


def _top_vectors(s: Setup, k: int, seed: int) -> np.ndarray:
    """The top-k eigenvectors saved by ``eigen`` in the output folder, else computed now."""
    from mpinewton import analysis

    saved = s.comm.bcast(_saved_vectors(s, k) if s.comm.is_root else None)
    if saved is not None:
        return saved
    s.say(f"computing the top {k} eigenvectors by Lanczos (`eigen` with the same weights "
          "and batch saves them for reuse)")
    return analysis.lanczos(_operator(s), k=k, seed=seed).vectors


def cmd_taylor(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    """Taylor remainders along a random direction and the top eigenvector."""
    from mpinewton import analysis

    rng = np.random.default_rng(args.seed)
    n = s.layout.size
    directions = {"uniform": np.ones(n),  # the thesis' choice (figure 14.1): all entries equal
                  "random": rng.standard_normal(n),
                  "eigenvector": _top_vectors(s, 1, args.seed)[:, 0]}
    out: dict[str, Any] = _about(s)
    _, g = s.objective.value_and_grad(s.w)
    for name, d in directions.items():
        d = d / np.linalg.norm(d)
        res = analysis.taylor_test(s.objective.value, s.w, d, grad_dot=float(g @ d),
                                   hess_dot=float(d @ s.objective.hvp(s.w, d)))
        out[name] = {"distances": res.distances, "r0": res.r0, "r1": res.r1, "r2": res.r2,
                     "slope0": res.slope0, "slope1": res.slope1, "slope2": res.slope2}
        s.say(f"taylor along the {name} direction: slopes {res.slope0:.2f} (zeroth), "
              f"{res.slope1:.2f} (first, 2 expected), {res.slope2:.2f} (second, 3 expected)")
    if s.comm.is_root:
        _plot_taylor(s.out / "taylor.png", out, s)
    return out


def cmd_surface(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    """The loss on a line and a plane along two directions."""
    from mpinewton import analysis

    if args.directions == "eigen":
        d1, d2 = _top_vectors(s, 2, args.seed).T
    else:
        rng = np.random.default_rng(args.seed)
        d1, d2 = (analysis.filter_normalized_direction(s.w, s.layout.shapes, rng)
                  for _ in range(2))
    alphas = np.linspace(-args.span, args.span, args.points)
    line = analysis.line(s.objective.value, s.w, d1, alphas)
    plane = analysis.plane(s.objective.value, s.w, d1, d2, alphas, alphas)
    _save_h5(s, "surface.h5", {"alphas": alphas, "line": line, "plane": plane,
                               "d1": d1, "d2": d2}, {"directions": args.directions})
    if s.comm.is_root:
        _plot_surface(s.out / "surface.png", alphas, line, plane, s, args.directions)
    return {**_about(s), "directions": args.directions, "points": args.points,
            "span": args.span, "loss_at_w": float(line[len(line) // 2]),
            "min_line": float(line.min()), "min_plane": float(plane.min())}


# --------------------------------------------------------------------------- plots


def _figure(path: Path, draw: Callable[[Any], None], ncols: int = 1,
            projection: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(5.5 * ncols, 4.2))
    draw(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_spectrum(path: Path, grid: np.ndarray, density: np.ndarray, s: Setup) -> None:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ax.semilogy(grid, np.maximum(density, 1e-12))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.set_title(f"Hessian spectrum, {s.job.model.name}, b = {s.batch}")

    _figure(path, draw)


def _plot_taylor(path: Path, out: dict[str, Any], s: Setup) -> None:
    def draw(fig: Any) -> None:
        for i, name in enumerate(("uniform", "random", "eigenvector")):
            ax = fig.add_subplot(1, 3, i + 1)
            r = out[name]
            for key, label in (("r0", "zeroth order"), ("r1", "first order"),
                               ("r2", "second order")):
                # A remainder of exactly 0 (the loss did not change in its last bit)
                # has no place on a log axis: it is left out, not drawn at 1e-300.
                values = np.asarray(r[key], dtype=float)
                ax.loglog(r["distances"], np.where(values > 0, values, np.nan), "o-",
                          label=label)
            ax.set_xlabel("distance h")
            ax.set_ylabel("|remainder|")
            ax.set_title(f"along the {name} direction")
            ax.legend(fontsize="small")

    _figure(path, draw, ncols=3)


def _plot_surface(path: Path, alphas: np.ndarray, line: np.ndarray, plane: np.ndarray,
                  s: Setup, directions: str) -> None:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 3, 1)
        ax.plot(alphas, line)
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("loss")
        a, b = np.meshgrid(alphas, alphas, indexing="ij")
        ax3 = fig.add_subplot(1, 3, 2, projection="3d")
        ax3.plot_surface(a, b, plane, cmap="viridis")
        ax3.set_xlabel("alpha")
        ax3.set_ylabel("beta")
        axc = fig.add_subplot(1, 3, 3)
        cs = axc.contour(a, b, plane, levels=20)
        axc.clabel(cs, fontsize="x-small")
        axc.set_xlabel("alpha")
        axc.set_ylabel("beta")
        along = ("the top-2 eigenvectors" if directions == "eigen"
                 else "filter-normalised random directions")
        fig.suptitle(f"loss along {along}")

    _figure(path, draw, ncols=3)


COMMAND_FUNCTIONS: dict[str, Callable[[argparse.Namespace, Setup], dict[str, Any]]] = {
    "hessian": cmd_hessian, "eigen": cmd_eigen, "trace": cmd_trace,
    "spectrum": cmd_spectrum, "taylor": cmd_taylor, "surface": cmd_surface}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    comm = world()
    install_abort_handler(comm)
    try:
        s = setup(args, comm)
        s.say(f"mpinewton.analyze {args.command}: {s.job.model.name} ({s.layout.size} "
              f"weights), {s.batch} samples on {comm.size} rank(s), weights from {s.source}")
        comm.run_agreed(lambda: check_arguments(args, s), "checking the arguments")
        start = time.perf_counter()
        # Every rank runs the same numerics on the same reduced numbers: a ValueError
        # from them (a zero direction, say) is raised on every rank at the same point.
        try:
            result = COMMAND_FUNCTIONS[args.command](args, s)
        except ValueError as exc:
            raise ConfigError(f"{args.command}: {exc}") from None
        result["seconds"] = time.perf_counter() - start
        path = _save_json(s, f"{args.command}.json", result)
        s.say(f"{args.command} done in {result['seconds']:.1f}s; results in {path.parent}")
    except (ConfigError, DistributedError) as exc:
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
