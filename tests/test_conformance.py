"""The conformance pipeline (tests/zoo) on tiny models, one per failure class.

Each model goes through replace -> fit (jit) -> save/load -> fold -> export
-> CLI, as in `make zoo` on keras.applications, in seconds. Then the
exporter-friendly inference graph: keras_bn's inference graph is the one
Keras's BatchNormalization emits, so the TFLite converter folds it alike.

On torch, `fit(jit_compile=True)` compiles the step with Inductor (over a
minute per model on 2 cores), so there the failure classes train eagerly,
Keras's own default on torch, unless KERAS_BN_TORCH_INDUCTOR=1; one of them
also trains under `jit_compile=True`'s Dynamo and AOTAutograd trace without
Inductor's code generation (`test_traced_fit_step_conforms`).
"""

import collections
import functools

import keras
import pytest

import keras_bn
from converters.export import relative_error
from tests.zoo.checks import assert_conforms
from tests.zoo.models import SYNTHETIC
from tests.zoo.pipeline import RTOL, fit_jit_compile, run

L = keras.layers

# The fit stage's `jit_compile` (module docstring).
FIT_JIT = fit_jit_compile()


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_failure_class_conforms(name):
    build, shape = SYNTHETIC[name]
    assert_conforms(run(build, shape))


@pytest.mark.skipif(
    FIT_JIT, reason="the failure classes above train under jit_compile=True"
)
def test_traced_fit_step_conforms(monkeypatch):
    """torch: the pipeline with `fit(jit_compile=True)`, whose `torch.compile`
    traces the step (Dynamo and AOTAutograd) and runs the graphs without
    Inductor, as `harness.torch_compile` does (about 30 s on 2 cores)."""
    import torch

    aot_eager = functools.partial(torch.compile, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.utils.counters.clear()
    build, shape = SYNTHETIC["bn_before_dense"]
    assert_conforms(run(build, shape, jit_compile=True))
    # The step ran as traced graphs (not eagerly).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


# -- Exporter-friendly inference: the graph Keras's BN emits ------------------

TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TensorFlow graphs and the TFLite converter: TensorFlow backend only",
)


def _conv_bn_relu():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3),
            keras_bn.BatchNormalization(),
            L.ReLU(),
        ]
    )


def _dense_bn():
    return keras.Sequential(
        [keras.Input((6,)), L.Dense(5), keras_bn.BatchNormalization(), L.ReLU()]
    )


PAIRS = {"conv_bn_relu": _conv_bn_relu, "dense_bn": _dense_bn}


def _pair(name, rng):
    """(keras_bn model, the same weights with Keras's BN, a batch of inputs)."""
    from keras_bn.replace import to_keras_batchnorm
    from tests.zoo.pipeline import randomize_bn

    ours = PAIRS[name]()
    randomize_bn(ours, rng)
    theirs = to_keras_batchnorm(ours)
    assert type(theirs.layers[1]) is L.BatchNormalization
    x = rng.normal(size=(3, *ours.inputs[0].shape[1:])).astype("float32")
    return ours, theirs, x


def _tflite(model, route, tmp_path, x):
    """(op name -> count, outputs on `x`) of the TFLite conversion of `model`."""
    import warnings

    import tensorflow as tf

    if route == "saved_model":  # Keras's export, then the SavedModel converter
        model(x)
        path = str(tmp_path / model.name)
        model.export(path, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(path)
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_content=converter.convert())
    ops = collections.Counter(op["op_name"] for op in interpreter._get_ops_details())
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return ops, interpreter.get_tensor(out["index"])


@TF_ONLY
@pytest.mark.parametrize("route", ["saved_model", "keras_model"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_tflite_folds_keras_bn_as_it_folds_keras(rng, tmp_path, name, route):
    ours, theirs, x = _pair(name, rng)
    ops, got = _tflite(ours, route, tmp_path, x)
    keras_ops, keras_got = _tflite(theirs, route, tmp_path, x)
    assert ops == keras_ops
    # The converter folded the BN (and the ReLU) into the one linear op.
    assert sum(ops.values()) == 1, ops
    ref = keras.ops.convert_to_numpy(theirs(x, training=False))
    assert relative_error(got, ref) <= RTOL
    assert relative_error(got, keras_got) <= RTOL


@TF_ONLY
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_inference_graph_is_keras_bn_graph(rng, name):
    """The traced inference graph (variables unfrozen) has Keras's ops."""
    import tensorflow as tf

    ours, theirs, x = _pair(name, rng)
    counts = []
    for model in (ours, theirs):
        spec = tf.TensorSpec((None, *x.shape[1:]), "float32")
        fn = tf.function(lambda t, m=model: m(t, training=False))
        graph = fn.get_concrete_function(spec).graph.as_graph_def()
        counts.append(collections.Counter(n.op for n in graph.node))
    assert counts[0] == counts[1]
