"""How fast a training step of BN on (256, 1024) can be without XLA (TensorFlow).

Issue 9 asks keras_bn's step without XLA to be no slower than Keras 3's BN
*with* XLA. On (256, 1024) it is not; this script measures why. Candidates,
each one training step as in `bench/bench_layer.py` (`y` and all gradients
returned), timed interleaved, single steps, median over `--repeats`:

* Keras 3 BN (XLA) and keras_bn (XLA): the whole step compiled by XLA;
* keras_bn (no XLA): the layer as shipped (TensorFlow's fused op here);
* keras_bn (no XLA, compiled kernel): the layer with its kernel compiled by
  XLA as nested functions (the path it takes for smaller inputs);
* the floor of such a nested path: a stripped prototype, not the layer, with
  the moving-average update folded into the compiled forward, no overflow
  branch, no layer code around it; and the same with the overflow branch
  (`tf.cond` on the sums' finiteness) that keras_bn's kernel has.

    KERAS_BACKEND=tensorflow python bench/dense_floor.py
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

SHAPE = (256, 1024)
EPS, MOMENTUM = 1e-3, 0.99


def _prototype(x, with_branch: bool):
    """The floor: a step of two nested XLA functions, plus two assignments."""
    import tensorflow as tf

    n, channels = float(SHAPE[0]), SHAPE[1]
    gamma, beta = tf.Variable(tf.ones(channels)), tf.Variable(tf.zeros(channels))
    moving_mean = tf.Variable(tf.zeros(channels))
    moving_var = tf.Variable(tf.ones(channels))

    def moments(s1, s2):
        d = s1 / n
        var = tf.maximum(s2 / n - d * d, 0.0)
        return d, var, tf.math.rsqrt(var + EPS)

    @tf.function(jit_compile=True, autograph=False)
    def forward(x, g, b, mm, mv):
        k = x[0:1]
        xs = x - k
        s1 = tf.reduce_sum(xs, 0, keepdims=True)
        s2 = tf.reduce_sum(xs * xs, 0, keepdims=True)
        if with_branch:
            finite = tf.reduce_all(tf.math.is_finite(s1) & tf.math.is_finite(s2))
            big = tf.reduce_max(tf.abs(xs), 0, keepdims=True)  # stands for the
            d, var, inv = tf.cond(  # rescaled recompute, never taken here
                finite, lambda: moments(s1, s2), lambda: (big, big, big)
            )
        else:
            d, var, inv = moments(s1, s2)
        a = g * inv
        y = (xs - d) * a + b
        mean, v = (k + d)[0], var[0]
        ok = tf.math.is_finite(mean) & tf.math.is_finite(v)
        mm = tf.where(ok, mm * MOMENTUM + mean * (1 - MOMENTUM), mm)
        mv = tf.where(ok, mv * MOMENTUM + v * (1 - MOMENTUM), mv)
        return y, mm, mv, k, d, inv, a

    @tf.function(jit_compile=True, autograph=False)
    def backward(x, dy, k, d, inv, a):
        xhat = ((x - k) - d) * inv
        g1 = tf.reduce_sum(dy, 0, keepdims=True)
        gs = tf.reduce_sum(dy * xhat, 0, keepdims=True)
        return a * (dy - g1 / n - xhat * gs / n), gs[0], g1[0]

    def layer(x):
        @tf.custom_gradient
        def op(x, g, b):
            y, mm, mv, *res = forward(x, g, b, moving_mean, moving_var)
            moving_mean.assign(mm)
            moving_var.assign(mv)

            def grad(dy, variables=None):
                args = [tf.identity(t) for t in (x, dy, *res)]
                return backward(*args), [None] * len(variables or [])

            return y, grad

        return op(x, gamma, beta)

    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return y, tape.gradient(y, [x, gamma, beta], output_gradients=dy)

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args(argv)

    import keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(
            "dense_floor.py measures TensorFlow's paths: run it with "
            f"KERAS_BACKEND=tensorflow (Keras runs on {keras.backend.backend()!r})."
        )
    import tensorflow as tf

    import keras_bn
    from keras_bn.backend import tensorflow as tfb

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from bench_layer import _tf_step_fn

    x = tf.random.normal(SHAPE, seed=1)
    dy = tf.random.normal(SHAPE, seed=2)

    def layer_step(cls, jit):
        layer = cls(axis=-1)
        layer.build(SHAPE)
        step = _tf_step_fn(layer, jit)
        step(x, dy)  # traced now, under the size rule in force
        return step

    cands = {
        "Keras 3 BN (XLA)": layer_step(keras.layers.BatchNormalization, True),
        "keras_bn (XLA)": layer_step(keras_bn.BatchNormalization, True),
        "keras_bn (no XLA)": layer_step(keras_bn.BatchNormalization, False),
    }
    rule = tfb.FUSED_MIN_SIZE
    tfb.FUSED_MIN_SIZE = 2**62  # the compiled kernel for this size too
    try:
        cands["keras_bn (no XLA, compiled kernel)"] = layer_step(
            keras_bn.BatchNormalization, False
        )
    finally:
        tfb.FUSED_MIN_SIZE = rule
    cands["floor: nested prototype"] = _prototype(x, with_branch=False)
    cands["floor: nested prototype + overflow branch"] = _prototype(x, True)

    def sync(out):
        for t in tf.nest.flatten(out):
            t.numpy()

    for step in cands.values():
        for _ in range(5):
            sync(step(x, dy))
    times = {name: [] for name in cands}
    for _ in range(args.repeats):
        for name, step in cands.items():
            t0 = time.perf_counter()
            sync(step(x, dy))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["Keras 3 BN (XLA)"])
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, shape {SHAPE}")
    print("| candidate | median ms | min ms | / Keras 3 BN (XLA) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        median = statistics.median(t)
        print(
            f"| {name} | {median * 1e3:.3f} | {min(t) * 1e3:.3f} "
            f"| {median / base:.2f} |"
        )


if __name__ == "__main__":
    main()
