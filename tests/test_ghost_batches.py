"""Ghost batch normalization (`virtual_batch_size`), against a NumPy reference.

Ghost batches follow tf_keras: the batch `(B, ...)` is reshaped to
`(k, B/k, ...)`, so ghost batch `g` holds the examples `g, g + B/k, ...`
(`x[g::B//k]`). Tolerances: float32 vs the float64 reference, `rtol=1e-5` with
an absolute floor `1e-6 * max|ref|` (harness.assert_close).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from harness import (
    assert_close,
    backend_name,
    ref_backward,
    ref_forward,
    run_layer,
    set_bn_weights,
    to_numpy,
)

import keras_bn

EPS = 1e-3
MOMENTUM = 0.9


def ghost_reference(x, gamma, beta, k, axis, dy, mask=None):
    """Per-ghost-batch float64 BN: output, gradients and the moving-average inputs."""
    groups = x.shape[0] // k
    y, dx = np.zeros(x.shape), np.zeros(x.shape)
    dgamma, dbeta, means, variances = 0.0, 0.0, [], []
    for g in range(groups):
        m = None if mask is None else mask[g::groups]
        yg, mean, var = ref_forward(x[g::groups], gamma, beta, axis, EPS, m)
        dxg, dga, dbe = ref_backward(x[g::groups], gamma, dy[g::groups], axis, EPS, m)
        y[g::groups], dx[g::groups] = yg, dxg
        dgamma, dbeta = dgamma + dga, dbeta + dbe
        means.append(mean)
        variances.append(var)
    return y, dx, dgamma, dbeta, np.mean(means, 0), np.mean(variances, 0)


@pytest.mark.parametrize(
    "shape, axis, k",
    [
        ((12, 5), -1, 4),
        ((12, 5), -1, 12),
        ((8, 3, 4, 2), -1, 2),
        ((8, 3, 4, 2), 1, 4),
        ((6, 4, 3), 2, 3),
        ((6, 2, 2, 2, 3), -1, 2),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_matches_numpy_reference(rng, shape, axis, k, jit):
    x = rng.normal(3.0, 2.0, shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    layer = keras_bn.BatchNormalization(
        axis=axis, momentum=MOMENTUM, epsilon=EPS, virtual_batch_size=k
    )
    layer.build(shape)
    set_bn_weights(layer, rng)
    gamma, beta = to_numpy(layer.gamma), to_numpy(layer.beta)
    old_mean, old_var = to_numpy(layer.moving_mean), to_numpy(layer.moving_variance)
    out = run_layer(layer, x, dy, jit=jit)
    y, dx, dgamma, dbeta, mean, var = ghost_reference(x, gamma, beta, k, axis, dy)
    assert_close(out["y"], y, what="y")
    assert_close(out["dx"], dx, what="dx")
    assert_close(out["dweights"][0], dgamma, what="dgamma")
    assert_close(out["dweights"][1], dbeta, what="dbeta")
    m = MOMENTUM
    assert_close(layer.moving_mean, m * old_mean + (1 - m) * mean, what="mean")
    assert_close(layer.moving_variance, m * old_var + (1 - m) * var, what="var")


def test_differs_from_full_batch(rng):
    """Sanity: ghost batches of 2 really are not the full-batch statistics."""
    x = rng.normal(size=(8, 3)).astype("float32")
    ghost = keras_bn.BatchNormalization(virtual_batch_size=2)
    full = keras_bn.BatchNormalization()
    assert not np.allclose(
        to_numpy(ghost(x, training=True)), to_numpy(full(x, training=True))
    )


def test_with_mask(rng):
    x = rng.normal(1.0, 2.0, (8, 5, 3)).astype("float32")
    mask = rng.random((8, 5)) > 0.3
    dy = rng.normal(size=x.shape).astype("float32")
    layer = keras_bn.BatchNormalization(momentum=MOMENTUM, virtual_batch_size=4)
    layer.build(x.shape)
    set_bn_weights(layer, rng)
    gamma, beta = to_numpy(layer.gamma), to_numpy(layer.beta)
    old_mean = to_numpy(layer.moving_mean)
    out = run_layer(layer, x, dy, mask=mask)
    y, dx, dgamma, _, mean, _ = ghost_reference(x, gamma, beta, 4, -1, dy, mask)
    assert_close(out["y"], y, what="y")
    assert_close(out["dx"], dx, what="dx")
    assert_close(out["dweights"][0], dgamma, what="dgamma")
    assert_close(layer.moving_mean, MOMENTUM * old_mean + (1 - MOMENTUM) * mean)


def test_matches_tf_keras(rng):
    if backend_name() != "tensorflow":
        pytest.skip("tf_keras runs on TensorFlow")
    tf_keras = pytest.importorskip("tf_keras")
    x = rng.normal(2.0, 3.0, (12, 4, 5)).astype("float32")
    ours = keras_bn.BatchNormalization(virtual_batch_size=3)
    theirs = tf_keras.layers.BatchNormalization(virtual_batch_size=3)
    y = to_numpy(ours(x, training=True))
    # tf_keras's moments are not shifted; 1e-5 relative to the output scale.
    assert_close(y, theirs(x, training=True).numpy(), rtol=1e-5, atol_scale=1e-5)
    assert_close(ours.moving_mean, theirs.moving_mean.numpy().ravel())
    assert_close(ours.moving_variance, theirs.moving_variance.numpy().ravel())


def test_inference_ignores_ghost_batches(rng):
    x = rng.normal(size=(6, 4)).astype("float32")
    ghost = keras_bn.BatchNormalization(virtual_batch_size=3)
    plain = keras_bn.BatchNormalization()
    for layer in (ghost, plain):
        layer.build(x.shape)
    plain.set_weights(ghost.get_weights())
    assert_close(ghost(x, training=False), to_numpy(plain(x, training=False)))


def test_fit_runs_and_updates(rng):
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            keras_bn.BatchNormalization(virtual_batch_size=8),
            keras.layers.Dense(1),
        ]
    )
    model.compile("sgd", "mse")
    before = to_numpy(model.layers[1].moving_mean)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(to_numpy(model.layers[1].moving_mean), before)


def test_unknown_batch_size_tensorflow(rng):
    if backend_name() != "tensorflow":
        pytest.skip("only TensorFlow traces with an unknown batch size")
    import tensorflow as tf

    x = rng.normal(size=(8, 3, 5)).astype("float32")
    dynamic = keras_bn.BatchNormalization(virtual_batch_size=4, momentum=0.5)
    static = keras_bn.BatchNormalization(virtual_batch_size=4, momentum=0.5)
    f = tf.function(
        lambda x: dynamic(x, training=True),
        input_signature=[tf.TensorSpec([None, 3, 5])],
    )
    assert_close(f(x), to_numpy(static(x, training=True)))
    assert_close(dynamic.moving_variance, to_numpy(static.moving_variance))
    with pytest.raises(tf.errors.InvalidArgumentError, match="virtual_batch_size=4"):
        f(x[:6])


def test_batch_not_divisible(rng):
    layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by "):
        layer(rng.normal(size=(6, 3)).astype("float32"), training=True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(virtual_batch_size=0), ValueError, "virtual_batch_size=0"),
        (dict(virtual_batch_size=-2), ValueError, "virtual_batch_size=-2"),
        (dict(virtual_batch_size=2.5), TypeError, "virtual_batch_size=2.5"),
        (dict(virtual_batch_size=True), TypeError, "virtual_batch_size=True"),
        (dict(virtual_batch_size=2, synchronized=True), ValueError, "synchronized"),
        (dict(virtual_batch_size=2, renorm=True), ValueError, "renorm=True"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_bn.BatchNormalization(**kwargs)


def test_axis_zero_refused():
    layer = keras_bn.BatchNormalization(axis=0, virtual_batch_size=2)
    with pytest.raises(ValueError, match="axis=0"):
        layer.build((4, 3))


def test_single_value_per_ghost_batch(rng):
    layer = keras_bn.BatchNormalization(virtual_batch_size=1)
    with pytest.raises(ValueError, match="virtual_batch_size=1"):
        layer(rng.normal(size=(4, 3)).astype("float32"), training=True)


@pytest.mark.parametrize("k", [None, 4])
def test_config_round_trip(k):
    layer = keras_bn.BatchNormalization(virtual_batch_size=k)
    config = layer.get_config()
    assert config["virtual_batch_size"] == k
    clone = keras_bn.BatchNormalization.from_config(config)
    assert clone.virtual_batch_size == k
    assert (
        keras.layers.BatchNormalization().get_config().get("virtual_batch_size") is None
    )
