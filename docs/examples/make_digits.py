"""Write scikit-learn's 8x8 digits to ``data/digits.npz`` for ``mpinewton.data import``.

    python docs/examples/make_digits.py
    python -m mpinewton.data import data/digits.npz --out data/digits.h5 --validation 300

The same split as ``fit_arrays.py`` (seeded): 1,497 images to train on, 300 to
validate, float64 features in [0, 1], integer labels.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_arrays import digits  # noqa: E402


def main() -> None:
    """Run the example (arguments: see the module docstring)."""
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "data/digits.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    splits = digits()
    np.savez(out, x_train=splits["train"][0], y_train=splits["train"][1],
             x_validation=splits["validation"][0], y_validation=splits["validation"][1])
    print(f"wrote {out}: " + ", ".join(f"{k} {len(v[0])}" for k, v in splits.items()))


if __name__ == "__main__":
    main()
