"""`unbiased_variance=True`: the paper's Algorithm 2 population variance.

The moving variance is updated with `m / (m - 1)` times the batch variance,
`m` the number of values per channel (the mask weight count with a mask).
Tolerance: float32 vs the float64 reference, `rtol=1e-5` with an absolute floor
`1e-6 * max|ref|` (harness.assert_close).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from harness import assert_close, ref_forward, ref_moments, run_layer, to_numpy

import keras_bn

MOMENTUM = 0.75


@pytest.mark.parametrize(
    "shape, axis", [((16, 5), -1), ((4, 3, 2, 6), -1), ((4, 6, 3), 1)]
)
@pytest.mark.parametrize("jit", [False, True])
def test_moving_variance_is_unbiased(rng, shape, axis, jit):
    x = rng.normal(1.0, 3.0, shape).astype("float32")
    layer = keras_bn.BatchNormalization(
        axis=axis, momentum=MOMENTUM, unbiased_variance=True
    )
    layer.build(shape)
    out = run_layer(layer, x, jit=jit)
    m = x.size // shape[axis]
    y, mean, var = ref_forward(
        x, np.ones(shape[axis]), np.zeros(shape[axis]), axis, 1e-3
    )
    # The output is normalized with the biased batch variance, as in the paper.
    assert_close(out["y"], y, what="y")
    assert_close(layer.moving_mean, (1 - MOMENTUM) * mean, what="mean")
    expected = MOMENTUM * 1.0 + (1 - MOMENTUM) * var * m / (m - 1)
    assert_close(layer.moving_variance, expected, what="var")


def test_default_stays_biased(rng):
    x = rng.normal(size=(8, 3)).astype("float32")
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    assert_close(layer.moving_variance, x.astype(np.float64).var(0))


def test_mask_count(rng):
    x = rng.normal(2.0, 1.5, (6, 7, 4)).astype("float32")
    mask = rng.random((6, 7)) > 0.4
    layer = keras_bn.BatchNormalization(momentum=0.0, unbiased_variance=True)
    layer.build(x.shape)
    run_layer(layer, x, mask=mask)
    _, var = ref_moments(x, -1, mask)
    m = mask.sum()
    assert_close(layer.moving_variance, var * m / (m - 1))


def test_single_unmasked_value_keeps_statistics(rng):
    """m = 1: the unbiased variance is undefined; the channel is not updated."""
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    mask = np.zeros((2, 3), bool)
    mask[0, 0] = True
    layer = keras_bn.BatchNormalization(momentum=0.0, unbiased_variance=True)
    layer.build(x.shape)
    run_layer(layer, x, mask=mask)
    assert_close(layer.moving_mean, np.zeros(4))
    assert_close(layer.moving_variance, np.ones(4))


def test_with_ghost_batches(rng):
    x = rng.normal(size=(8, 5, 3)).astype("float32")
    layer = keras_bn.BatchNormalization(
        momentum=0.0, unbiased_variance=True, virtual_batch_size=4
    )
    layer(x, training=True)
    groups = [x[g::2].astype(np.float64) for g in range(2)]
    expected = np.mean([g.var(axis=(0, 1), ddof=1) for g in groups], axis=0)
    assert_close(layer.moving_variance, expected)


def test_fit_uses_unbiased(rng):
    x = rng.normal(0.0, 2.0, (32, 4)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras_bn.BatchNormalization(momentum=0.0, unbiased_variance=True),
        ]
    )
    model.compile("sgd", "mse")
    model.fit(x, np.zeros_like(x), batch_size=32, epochs=1, verbose=0, shuffle=False)
    # One full batch of 32: gamma/beta moved, but the statistics are of x itself.
    assert_close(model.layers[0].moving_variance, x.astype(np.float64).var(0, ddof=1))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(unbiased_variance=1), TypeError, "unbiased_variance=1"),
        (dict(unbiased_variance="yes"), TypeError, "unbiased_variance='yes'"),
        (dict(unbiased_variance=True, renorm=True), ValueError, "renorm=True"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_bn.BatchNormalization(**kwargs)


@pytest.mark.parametrize("value", [False, True])
def test_config_round_trip(value):
    layer = keras_bn.BatchNormalization(unbiased_variance=value)
    config = layer.get_config()
    assert config["unbiased_variance"] is value
    assert keras_bn.BatchNormalization.from_config(config).unbiased_variance is value
    x = np.ones((2, 2), "float32")
    assert to_numpy(layer(x)).shape == (2, 2)
