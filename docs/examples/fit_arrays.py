"""Train your own Keras model on in-memory arrays with ``mpinewton.fit``.

    mpirun -n 2 python docs/examples/fit_arrays.py [RUN_DIR]

scikit-learn's 8x8 digits (1,797 images, bundled with it), 1,497 to train on
and 300 to validate, the functional model of ``digits_model.py``, the
recommended Newton-CG (Gauss-Newton, Levenberg-Marquardt damping, Fisher
preconditioner) for 30 iterations, validation every 10. Every rank runs this
same script; each keeps its own rows of the arrays.
"""

import sys
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import load_digits

import mpinewton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_model import build  # noqa: E402  (the user's own model code)


def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as float64 features in [0, 1] and integer labels, split 1,497 / 300."""
    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float64), data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, val = order[:-300], order[-300:]
    return {"train": (x[train], y[train]), "validation": (x[val], y[val])}


def main() -> None:
    """Run the example (arguments: see the module docstring)."""
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/fit_arrays"
    mpinewton.configure_threads()  # this rank's share of the cores, before TensorFlow starts
    keras.config.set_floatx("float64")  # float64 weights: results independent of the ranks
    model = build()
    result = mpinewton.fit(
        model, digits(), run_dir=run_dir, overwrite=True,
        objective={"loss": "sparse_categorical_crossentropy", "from_logits": True},
        optimizer={"iters": 30}, eval={"every": 5, "patience": 2})
    if result.summary is not None and result.rank == 0:
        s = result.summary
        print(f"final loss {s['final_loss']:.3e}, train accuracy {s['train_accuracy']:.4f}, "
              f"validation accuracy {s['validation_accuracy']:.4f}")


if __name__ == "__main__":
    main()
