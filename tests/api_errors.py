"""Under mpirun (tests/test_api_mpi.py): bad input to mpinewton.fit, one case after another.

Each case must raise on every rank; the messages go to OUT.<rank>.json. The last
case is not caught, so the launch's exit status shows what a user's script gets.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np

import mpinewton
from mpinewton.comm import DistributedError, world
from mpinewton.config import ConfigError


def model(outputs=10):
    inputs = keras.Input(shape=(6,))
    return keras.Model(inputs, keras.layers.Dense(outputs)(keras.layers.Dense(4)(inputs)))


def main():
    out = Path(sys.argv[1])
    comm = world()
    keras.config.set_floatx("float64")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.integers(0, 10, 40)
    logits = {"loss": "sparse_categorical_crossentropy", "from_logits": True}
    nan = x.copy()
    nan[17, 3] = np.nan
    cases = {
        "factory": lambda: mpinewton.fit(None, (x, y), objective=logits,
                                         model={"factory": "no_such_pkg.models:build"}),
        "labels": lambda: mpinewton.fit(model(3), (x, y), objective=logits),
        "nan": lambda: mpinewton.fit(model(), (nan, y), objective=logits),
        "regression_targets": lambda: mpinewton.fit(model(), (x, y.astype(np.float64)),
                                                    objective=logits),
        "lengths": lambda: mpinewton.fit(model(), (x, y[:-1]), objective=logits),
    }
    results = {}
    for name, call in cases.items():
        try:
            call()
            results[name] = None
        except (ConfigError, DistributedError) as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    Path(f"{out}.{comm.rank}.json").write_text(json.dumps(results))
    mpinewton.fit(model(), (x, y[:-1]), objective=logits, run_dir=str(out) + ".last")


if __name__ == "__main__":
    main()
