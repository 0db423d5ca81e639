"""Tests for bench/bench_resnet.py on tiny models (the ResNet-50 run is the GPU's)."""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest

import keras_bn

_PATH = pathlib.Path(__file__).parent.parent / "bench" / "bench_resnet.py"
_spec = importlib.util.spec_from_file_location("bench_resnet", _PATH)
bench_resnet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_resnet)

JAX = keras.backend.backend() == "jax"


def _tiny(bn=keras.layers.BatchNormalization):
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    h = bn()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(h))


def test_without_bn_swaps_every_bn_for_an_identity(rng):
    model = _tiny()
    bare = bench_resnet.without_bn(model)
    assert not [
        layer
        for layer in bare.layers
        if "normalization" in type(layer).__name__.lower()
    ]
    assert len(bare.layers) == len(model.layers)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    assert bare(x).shape == model(x).shape == (2, 5)


def test_table_gives_bn_cost_against_the_no_bn_limit():
    results = dict(
        zip(
            bench_resnet.KINDS,
            [(0.030, 0.029), (0.026, 0.025), (0.020, 0.020)],
            strict=True,
        )
    )
    rows = bench_resnet.table(results)
    assert rows[2] == "| Keras BN | 30.00 | 29.00 | 10.00 | 1.00 |"
    assert rows[3] == "| keras_bn | 26.00 | 25.00 | 6.00 | 0.60 |"
    assert rows[4] == "| no BN (Identity) | 20.00 | 20.00 | 0.00 |  |"


def test_time_steps_trains_and_times_each_model(rng):
    if not JAX:
        pytest.skip(
            "bench_resnet.py is a JAX benchmark: it times a jax.jit-compiled "
            "stateless step, which this backend lacks"
        )
    models = {
        "Keras BN": _tiny(),
        "keras_bn": _tiny(keras_bn.BatchNormalization),
        "no BN (Identity)": bench_resnet.without_bn(_tiny()),
    }
    before = np.asarray(models["keras_bn"].layers[2].moving_mean)
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 5, 4)
    results = bench_resnet.time_steps(models, x, y, repeats=2, inner=1)
    assert set(results) == set(models)
    assert all(0 < low <= median for median, low in results.values())
    # The step donates copies of the state: the model's own are untouched.
    np.testing.assert_array_equal(
        np.asarray(models["keras_bn"].layers[2].moving_mean), before
    )
