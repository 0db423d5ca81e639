"""Measures the rounding error of TensorFlow's fused batch-norm op vs the mean.

`FusedBatchNormV3` sums the input in float32 without a shift, so the error of
its batch mean grows with |mean| in units of the standard deviation (R) and
with the number m of values per channel. For inputs `N(R, 1)` (8 channels,
m values each, as `(m, 1, 1, 8)`) this prints the output's error against a
float64 reference, `max|y - ref| / max|ref|` (the worst of `--trials`
draws), for:

* the op alone;
* `model`: keras_bn's estimate of the op's error, `_fused_error_estimate`
  (in the same units), which decides the fallback;
* keras_bn's no-XLA step forced onto the op (`FUSED_MIN_SIZE = 0`), which
  falls back to its shifted kernel where the estimate exceeds
  `FUSED_MAX_MEAN_ERROR` (`path`: which one ran, for the worst draw);
* keras_bn's kernel alone (the fallback), and Keras's layer without XLA.

    KERAS_BACKEND=tensorflow python bench/fused_numerics.py
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--sizes", default="16,64,256,4096,100352")
    parser.add_argument("--means", default="0,1,4,30,100,300,10000")
    args = parser.parse_args(argv)

    import keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("run with KERAS_BACKEND=tensorflow")
    import tensorflow as tf

    from keras_bn import _train
    from keras_bn.backend import tensorflow as tfb

    tfb.FUSED_MIN_SIZE = 0  # channels-last inputs of any size take the op
    eps = 1e-3
    c = 8
    ones, zeros = tf.ones(c), tf.zeros(c)

    @tf.function(autograph=False)
    def op(x):
        return tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=ones,
            offset=zeros,
            mean=tf.zeros(0),
            variance=tf.zeros(0),
            epsilon=eps,
            data_format="NHWC",
            is_training=True,
        )[0]

    @tf.function(autograph=False)
    def ours(x):
        return _train.batch_norm_train(x, ones, zeros, axis=3, epsilon=eps)[0]

    @tf.function(autograph=False)
    def kernel(x):
        return _train.batch_norm_train(
            x, ones, zeros, axis=3, epsilon=eps, fused=False
        )[0]

    @tf.function(autograph=False)
    def path(x):
        _, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=ones,
            offset=zeros,
            mean=tf.zeros(0),
            variance=tf.zeros(0),
            epsilon=eps,
            data_format="NHWC",
            is_training=True,
        )
        n = float(x.shape.num_elements() // c)
        return tfb._good(mean, var * (n - 1) / n, n, eps)

    layer = keras.layers.BatchNormalization(epsilon=eps)
    keras_step = tf.function(lambda x: layer(x, training=True), autograph=False)

    load = os.getloadavg()
    print(
        f"tensorflow={tf.__version__} trials={args.trials} "
        f"FUSED_MAX_MEAN_ERROR={tfb.FUSED_MAX_MEAN_ERROR:g} "
        f"load average={load[0]:.2f}"
    )
    print("| m | R | op alone | model | keras_bn no XLA | path | kernel | Keras |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for m in (int(v) for v in args.sizes.split(",")):
        for r in (float(v) for v in args.means.split(",")):
            worst = np.zeros(4)
            model, fused = 0.0, True
            for _ in range(args.trials):
                x = (rng.normal(0.0, 1.0, (m, 1, 1, c)) + r).astype("float32")
                x64 = x.astype(np.float64)
                mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
                ref = (x64 - mean) / np.sqrt(var + eps)
                scale = np.abs(ref).max()
                xt = tf.constant(x)
                errs = [
                    np.abs(f(xt).numpy() - ref).max() / scale
                    for f in (op, ours, kernel, keras_step)
                ]
                if errs[1] >= worst[1]:
                    fused = bool(path(xt).numpy())
                worst = np.maximum(worst, errs)
                est = tfb._fused_error_estimate(
                    tf.constant(mean, tf.float32),
                    tf.constant(var, tf.float32),
                    float(m),
                    eps,
                )
                model = max(model, float(tf.reduce_max(est)) / scale)
            print(
                f"| {m} | {r:g} | {worst[0]:.1e} | {model:.1e} | {worst[1]:.1e} | "
                f"{'op' if fused else 'kernel'} | {worst[2]:.1e} | {worst[3]:.1e} |"
            )


if __name__ == "__main__":
    main()
