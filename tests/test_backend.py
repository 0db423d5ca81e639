"""Tests for `keras_bn.backend` (one module per Keras backend, chosen once)."""

from __future__ import annotations

import importlib.util
import pathlib

import keras
import numpy as np
import pytest

from keras_bn import backend

TF = keras.backend.backend() == "tensorflow"


def test_module_of_the_running_backend():
    assert backend.NAME == keras.backend.backend() in backend.SUPPORTED
    module = importlib.import_module(f"keras_bn.backend.{backend.NAME}")
    for name in backend.API:
        assert getattr(backend, name) is getattr(module, name), name


@pytest.mark.parametrize("other", ["torch", "numpy", "openvino"])
def test_unsupported_backend_raises_on_use(monkeypatch, other):
    """No silent TensorFlow default: every entry point names the backend."""
    monkeypatch.setattr(keras.backend, "backend", lambda: other)
    path = pathlib.Path(backend.__file__)
    spec = importlib.util.spec_from_file_location(f"_kbn_backend_{other}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NAME == other
    for name in module.API:
        with pytest.raises(
            NotImplementedError,
            match=rf"keras_bn supports the Keras backends \['tensorflow', 'jax'\]; "
            rf"Keras runs on '{other}'\. Set .*KERAS_BACKEND",
        ):
            getattr(module, name)(None)


def test_is_traced():
    x = np.ones((2, 3), "float32")
    if TF:
        import tensorflow as tf

        assert backend.is_traced(tf.constant(x)) is False
        assert bool(tf.function(lambda t: backend.is_traced(t))(x)) is True
    else:
        import jax

        assert backend.is_traced(jax.numpy.asarray(x)) is False
        assert bool(jax.jit(lambda t: backend.is_traced(t))(x)) is True


def test_in_xla_context_tensorflow():
    if not TF:
        pytest.skip("TensorFlow's XLA detection")
    import tensorflow as tf

    from keras_bn.backend import tensorflow as tfb

    def probe():
        return tf.constant(tfb.in_xla_context())

    xla = tf.function(probe, jit_compile=True)
    assert tfb.in_xla_context() is False
    assert not bool(tf.function(probe)())
    assert bool(xla())
    assert bool(tf.function(lambda: xla())())  # nested in a plain tf.function
    assert bool(tf.function(lambda: tf.function(probe)(), jit_compile=True)())


@pytest.mark.parametrize(
    "shape,axis,expected",
    [
        ((8, 5), 1, ((-1, 1, 1, 5), "NHWC")),
        ((8, 4, 5), 2, ((-1, 1, 1, 5), "NHWC")),
        ((8, 5, 4), 1, ((-1, 5, 4, 1), "NCHW")),
        ((None, 4, 4, 5), 3, (None, "NHWC")),
        ((None, 5, 4, 4), 1, (None, "NCHW")),
        ((8, 5, 4, 3, 2), 1, ((-1, 5, 24, 1), "NCHW")),
        ((8, 4, 5, 3, 2), 2, ((-1, 5, 6, 1), "NCHW")),
        ((5, 8), 0, ((1, 5, 8, 1), "NCHW")),
        ((8, None, 5), 2, None),
        ((8,), 0, None),
    ],
)
def test_fused_view(shape, axis, expected):
    if not TF:
        pytest.skip("TensorFlow's fused op")
    from keras_bn.backend import tensorflow as tfb

    assert tfb.fused_view(shape, axis) == expected


def test_fused_op_not_used_where_it_does_not_apply(rng, monkeypatch):
    """XLA, float64, an epsilon cuDNN would clamp: None (use the kernel)."""
    if not TF:
        pytest.skip("TensorFlow's fused op")
    import tensorflow as tf

    from keras_bn.backend import tensorflow as tfb

    monkeypatch.setattr(tfb, "FUSED_MIN_SIZE", 0)  # the op even for (6, 3)

    x = tf.constant(rng.normal(size=(6, 3)).astype("float32"))
    one, zero = tf.ones(3), tf.zeros(3)

    def fused(x, epsilon=1e-3):
        out = tfb.fused_train(x, one, zero, axis=1, epsilon=epsilon)
        return tf.constant(out is not None)

    assert bool(fused(x))
    assert bool(tf.function(fused)(x))
    assert not bool(tf.function(fused, jit_compile=True)(x))
    assert not bool(fused(x, epsilon=1e-6))
    assert not bool(fused(tf.cast(x, "float64")))


def test_jax_custom_vjp_is_defined_once():
    if TF:
        pytest.skip("JAX's custom_vjp")
    import jax

    from keras_bn.backend import jax as jb

    assert isinstance(jb._train, jax.custom_vjp)
    assert backend.fused_train(None, None, None, axis=0, epsilon=1e-3) is None


def test_cross_replica_sum_without_strategy_is_none():
    assert backend.cross_replica_sum() is None
