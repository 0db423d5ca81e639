"""Per-channel sums of a product under XLA on the CPU: the forms `reduce_sum` chose.

Times `sum(x * x)` over the reduction axes of a channels-first view
`(N, C, L)` (axes 0 and 2: the last axis is summed, "rows") and of a
channels-last view `(M, C)` (axis 0: "columns"), compiled by XLA, in three
forms: plain; one optimization barrier between the product and the sum; and
rows first, then the row sums, each behind a barrier (what
`keras_bn.backend.tensorflow.reduce_sum` does for rows). Reports the median
time over `--repeats` runs of `--inner` calls after warm-up, and each form's
largest relative error against a float64 sum. With `KERAS_BACKEND=jax` it
times the plain form with `jax.jit` (JAX's backend sums plainly).

    KERAS_BACKEND=tensorflow python bench/xla_row_sums.py
    KERAS_BACKEND=jax python bench/xla_row_sums.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

CASES = [
    ("rows", (32, 64, 3136), (0, 2)),
    ("rows", (16, 4, 100352), (0, 2)),
    ("columns", (256, 1024), (0,)),
    ("columns", (100352, 64), (0,)),
]


def _tf_forms(axes):
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    def bar(v):
        return xla.optimization_barrier(v)[0]

    def plain(x):
        return tf.reduce_sum(x * x, axes)

    def one_barrier(x):
        return tf.reduce_sum(bar(x * x), axes)

    def two_level(x):
        rows = tf.reduce_sum(bar(x * x), -1, keepdims=True)
        return tf.reduce_sum(bar(rows), axes)

    forms = {"plain": plain, "one barrier": one_barrier}
    if len(axes) > 1:  # rows: the last axis and others
        forms["rows, then row sums"] = two_level
    run = {
        k: tf.function(f, jit_compile=True, autograph=False) for k, f in forms.items()
    }
    return run, lambda out: out.numpy()


def _jax_forms(axes):
    import jax
    import jax.numpy as jnp

    return {"plain": jax.jit(lambda x: jnp.sum(x * x, axes))}, np.asarray


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    args = parser.parse_args(argv)
    import keras

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise SystemExit(
            f"xla_row_sums.py times XLA: set KERAS_BACKEND to 'tensorflow' or "
            f"'jax' (Keras runs on {backend!r})."
        )
    print(f"backend={backend} keras={keras.__version__} cpus={os.cpu_count()}")
    print("| kind | shape | form | median ms | max rel. error vs float64 |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for kind, shape, axes in CASES:
        x = (rng.standard_normal(shape) + 0.5).astype("float32")
        want = np.sum(np.square(x.astype("float64")), axis=axes)
        if backend == "tensorflow":
            import tensorflow as tf

            forms, fetch = _tf_forms(list(axes))
            xs = tf.constant(x)
        else:  # jax, checked above
            import jax

            forms, fetch = _jax_forms(axes)
            xs = jax.device_put(x)
        for name, f in forms.items():
            got = fetch(f(xs)).reshape(want.shape)
            error = float(np.max(np.abs(got - want) / want))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    out = f(xs)
                fetch(out)
                times.append((time.perf_counter() - t0) / args.inner)
            print(
                f"| {kind} | {shape} | {name} | {statistics.median(times) * 1e3:.3f} "
                f"| {error:.1e} |"
            )


if __name__ == "__main__":
    main()
