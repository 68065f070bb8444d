"""Regression with squared error, against scipy's L-BFGS on the same model and data.

    mpirun -n 2 python docs/examples/diabetes_regression.py [RUN_DIR] [--json OUT.json]

scikit-learn's diabetes data (442 patients, 10 standardised features, bundled
with it), the target (disease progression one year on) standardised, a small
MLP 10 -> 16 tanh -> 1. mpinewton.fit trains it with the recommended Newton-CG
on ``mean_squared_error``; then ``scipy.optimize.minimize(method="L-BFGS-B")``
minimises the same loss from the same start, driven by ``mpinewton.Objective``
(rank 0's values broadcast, so every rank's scipy takes the same steps).
Both use every sample; prints Newton-CG's final loss and time, L-BFGS-B's
loss after the same time, and how long L-BFGS-B takes to reach Newton-CG's loss.
"""

import argparse
import json
import sys
import time

import keras
import numpy as np
import scipy.optimize
from sklearn.datasets import load_diabetes

import mpinewton
from mpinewton.comm import world


def data() -> tuple[np.ndarray, np.ndarray]:
    """Features as scikit-learn ships them; the target standardised, float64."""
    x, y = load_diabetes(return_X_y=True)
    return x.astype(np.float64), ((y - y.mean()) / y.std()).astype(np.float64)


def build(seed: int = 0) -> keras.Model:
    """The user's model: 10 -> 16 tanh -> 1, with biases."""
    init = keras.initializers.GlorotNormal(seed=seed)
    inputs = keras.Input(shape=(10,))
    h = keras.layers.Dense(16, activation="tanh", kernel_initializer=init)(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, kernel_initializer=init)(h))


def main() -> None:
    """Run the example (arguments: see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/diabetes")
    parser.add_argument("--iters", type=int, default=800, help="Newton-CG iterations")
    parser.add_argument("--lbfgs-iters", type=int, default=2000, help="L-BFGS-B iterations")
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args()
    mpinewton.configure_threads()  # this rank's share of the cores, before TensorFlow starts
    keras.config.set_floatx("float64")
    comm = world()
    x, y = data()

    model = build()
    w0 = mpinewton.Objective(model, (x, y), loss="mean_squared_error", comm=comm).w0
    t0 = time.perf_counter()
    result = mpinewton.fit(model, (x, y), run_dir=args.run_dir, overwrite=True, comm=comm,
                           objective={"loss": "mean_squared_error"},
                           optimizer={"iters": args.iters, "curvature_fraction": 1.0})
    newton_seconds = time.perf_counter() - t0

    # scipy's L-BFGS on the same loss, from the same start; its loss after each iteration
    objective = mpinewton.Objective(model, (x, y), loss="mean_squared_error", comm=comm)
    grads, trace = 0, []

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal grads
        grads += 1
        return comm.bcast(objective.value_and_grad(w))  # rank 0's numbers drive every rank

    def record(intermediate_result: scipy.optimize.OptimizeResult) -> None:
        trace.append((time.perf_counter() - t0, float(intermediate_result.fun)))

    t0 = time.perf_counter()
    lbfgs = scipy.optimize.minimize(
        fun, w0, jac=True, method="L-BFGS-B", callback=record,
        options={"maxiter": args.lbfgs_iters, "gtol": 1e-12, "ftol": 1e-15})
    lbfgs_seconds = time.perf_counter() - t0
    s = result.summary
    same_time = min((f for t, f in trace if t <= newton_seconds), default=float(lbfgs.fun))
    reach = next((t for t, f in trace if f <= s["final_loss"]), None)
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "samples": len(x), "weights": int(w0.size), "ranks": comm.size,
           "newton": {"final_loss": s["final_loss"], "iterations": s["method_iters"],
                      "gradients": s["gradients"], "seconds": newton_seconds},
           "lbfgs": {"final_loss": float(lbfgs.fun), "iterations": int(lbfgs.nit),
                     "gradients": grads, "seconds": lbfgs_seconds,
                     "message": str(lbfgs.message),
                     "loss_at_newton_seconds": same_time,
                     "seconds_to_newton_loss": reach}}
    if result.rank == 0:
        print(f"Newton-CG: loss {s['final_loss']:.6f} after {s['method_iters']} iterations "
              f"({newton_seconds:.1f} s)")
        print(f"scipy L-BFGS-B: loss {same_time:.6f} after the same {newton_seconds:.1f} s; "
              + (f"reaches Newton-CG's loss after {reach:.1f} s; " if reach is not None else
                 "never reaches Newton-CG's loss; ")
              + f"loss {lbfgs.fun:.6f} after {lbfgs.nit} iterations ({lbfgs_seconds:.1f} s, "
              f"{lbfgs.message})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
