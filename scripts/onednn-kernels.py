"""Time ResNet-50's forward pass and gradient with TensorFlow's Eigen and oneDNN kernels.

TensorFlow's CPU packages use oneDNN's kernels by default only on CPUs with
AVX512_VNNI, AVX512_BF16 or AMX; mpinewton turns them on everywhere
(``TF_ENABLE_ONEDNN_OPTS=1``, set in ``mpinewton/__init__.py``). This measures
what that choice is worth on this machine: each setting in a fresh process
(TensorFlow reads the variable when it loads), the same float32 ResNet-50
(32 x 32 x 3 inputs, 10 classes, Keras' random weights), the same batch, one
thread, the median of ``--repeats`` calls after a warm-up call.

Usage: python scripts/onednn-kernels.py [--batch 64] [--repeats 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(batch: int, repeats: int) -> dict[str, float]:
    """In a process whose TF_ENABLE_ONEDNN_OPTS is set: median seconds of each call."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    x = tf.random.uniform((batch, 32, 32, 3), seed=1)
    y = tf.one_hot(tf.range(batch) % 10, 10)

    @tf.function
    def forward() -> tf.Tensor:
        return model(x, training=False)

    @tf.function
    def gradient() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(keras.losses.categorical_crossentropy(
                y, model(x, training=False)))
        return tape.gradient(loss, model.trainable_variables)

    out = {}
    for name, fn in (("forward", forward), ("gradient", gradient)):
        fn()  # trace, and let oneDNN build its primitives
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    return out


def main(argv: list[str] | None = None) -> int:
    """Time both settings, each in its own process; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    if args.worker is not None:
        print(json.dumps(worker(args.batch, args.repeats)))
        return 0
    sys.path.insert(0, str(ROOT))
    from mpinewton.machine import cpu_model

    model, flags = cpu_model()
    results = {"cpu": model, "cpu_flags": flags, "batch": args.batch,
               "repeats": args.repeats, "threads": 1, "kernels": {}}
    for setting, name in (("0", "eigen"), ("1", "onednn")):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, __file__, "--worker", setting,
                               "--batch", str(args.batch), "--repeats", str(args.repeats)],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results["kernels"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    eigen, onednn = results["kernels"]["eigen"], results["kernels"]["onednn"]
    print(f"ResNet-50, {args.batch} images of 32 x 32 x 3, float32, 1 thread; CPU "
          f"{model or '?'} (AVX-512/AMX flags: {', '.join(flags) or 'none'})")
    print("| call | Eigen (TF_ENABLE_ONEDNN_OPTS=0) | oneDNN (=1) | Eigen / oneDNN |")
    print("|---|---:|---:|---:|")
    for call in ("forward", "gradient"):
        print(f"| {call} | {eigen[call]:.3f} s | {onednn[call]:.3f} s | "
              f"{eigen[call] / onednn[call]:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
