"""Measures the rounding error of TensorFlow's fused batch-norm op vs the mean.

`FusedBatchNormV3` sums the input in float32 without a shift, so the error of
its batch mean grows with |mean| (in units of the standard deviation, R) and
with the number m of values per channel. For inputs `N(R, 1)` this prints the
output's error against a float64 reference, `max|y - ref| / max|ref|`, and
that error over `R * 2**-24 * sqrt(m) / max|ref|` (the model keras_bn's
fallback rule uses; a ratio below 1 means the model over-estimates), for the
op alone and for keras_bn's layer in a `tf.function` (which falls back to its
shifted kernel where the model predicts an error above 1e-4 standard
deviations).

    KERAS_BACKEND=tensorflow python bench/fused_numerics.py
"""

from __future__ import annotations

import numpy as np


def main() -> None:
    import tensorflow as tf

    import keras_bn

    rng = np.random.default_rng(0)

    @tf.function
    def fused(x):
        c = x.shape[-1]
        return tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=tf.ones(c),
            offset=tf.zeros(c),
            mean=tf.zeros(0),
            variance=tf.zeros(0),
            epsilon=1e-3,
            data_format="NHWC",
            is_training=True,
        )[0]

    print(f"tensorflow={tf.__version__}")
    print("| shape | m | R | op alone: error | error / model | keras_bn layer: error |")
    print("|---|---|---|---|---|---|")
    for shape in [(4096, 1, 1, 64), (32, 56, 56, 16), (256, 28, 28, 8)]:
        z = rng.normal(0.0, 1.0, shape)
        layer = keras_bn.BatchNormalization(epsilon=1e-3)
        layer.build(shape)
        call = tf.function(lambda x, layer=layer: layer(x, training=True))
        m = int(np.prod(shape[:-1]))
        for r in (1, 4, 16, 64, 1e4):
            x = (z + r).astype("float32")
            x64 = x.astype(np.float64)
            mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
            ref = (x64 - mean) / np.sqrt(var + 1e-3)
            scale = np.abs(ref).max()
            err = np.abs(fused(tf.constant(x)).numpy() - ref).max() / scale
            model = r * 2.0**-24 * np.sqrt(m) / scale
            err_layer = np.abs(call(tf.constant(x)).numpy() - ref).max() / scale
            print(
                f"| {shape} | {m} | {r:g} | {err:.1e} | {err / model:.2f} | "
                f"{err_layer:.1e} |"
            )


if __name__ == "__main__":
    main()
