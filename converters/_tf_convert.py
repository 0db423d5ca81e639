"""One tf2onnx conversion of a Keras model, with its constants frozen.

`tf2onnx.convert.from_function` (what Keras's `model.export(format="onnx")`
calls) names every input of the concrete function a graph input, captured
constants included: a `Normalization(mean=..., variance=...)` layer's
constants become extra inputs the ONNX session demands. It also keeps calls
of functions marked `_noinline` (Keras's grouped convolution on TensorFlow is
a `jit_compile` function) as `StatefulPartitionedCall`, which ONNX has no op
for. Here the function is frozen first (variables and captured constants
become graph constants), those functions are made inlinable, and only the
model's own inputs are given to tf2onnx, which then emits a grouped ONNX
`Conv` and constant-folds the preprocessing.

tf2onnx 1.17 has no handler for TensorFlow's `Erfc`, which `tf.nn.gelu`
(exact GELU: Keras's "gelu" activation, ConvNeXt) emits; `_erfc` converts it
as ONNX `1 - Erf(x)`.

tf2onnx 1.17's optimizer loop stops at the first round in which no optimizer
*reports* a change, but its transpose optimizer (removing a useless
Transpose) and back-to-back optimizer can change the graph without reporting
it; and which graph a round leaves varies from run to run for the same input
graph (likely the order of Python sets of nodes). So the same model
sometimes came out with later rewrites missing: on keras.applications
MobileNet (32x32 input) 1 to 4 conversions in 60 kept the final `Reshape`'s
dynamic shape computation (Shape, Gather, Cast, Slice, Concat, Cast: 72
nodes instead of 66; ONNX Runtime ran that file 4.5% slower).
`_optimize_to_fixed_point` re-runs tf2onnx's optimizers on the converted
model until a pass no longer changes it.

By default tf2onnx deep-copies its whole graph (weights included) before
each optimizer, so that a failing optimizer can be skipped; the copies are
garbage in reference cycles and pile up until a full collection: converting
ResNet50 peaked at 7.4 GB, 5.3 GB of it in the optimizers. Here the
optimizers run without copies (`TF2ONNX_CATCH_ERRORS=FALSE`, tf2onnx's own
switch), and only if one of them fails is the conversion redone tf2onnx's
default way.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os

import keras

from keras_bn import _keras_graph

from ._deps import require

# Function attributes that stop TensorFlow's graph optimizer from inlining.
_NO_INLINE = ("_noinline", "_XlaMustCompile", "_XlaCompile")
# Re-optimization passes after tf2onnx's own (one is enough in every case seen).
_MAX_PASSES = 4


def signature_of(model, input_signature=None) -> list:
    """The `tf.TensorSpec`s to trace `model` with (free batch dimension)."""
    tf = require("tensorflow")
    if input_signature is not None:
        return list(input_signature)
    if not _keras_graph.is_graph_model(model):
        raise ValueError(
            f"{model.name!r} is a subclassed {type(model).__name__}: it has no "
            "declared inputs to export. Pass `input_signature=[tf.TensorSpec("
            "(None, ...), 'float32')]` (one spec per input) to trace its "
            "`call`, or rebuild it with the Functional API."
        )
    specs = []
    for i, x in enumerate(model.inputs):
        name = getattr(x, "name", None) or f"input_{i}"
        specs.append(tf.TensorSpec((None, *x.shape[1:]), x.dtype, name=name))
    return specs


def _erfc(ctx, node, name, args):
    """tf2onnx handler: TensorFlow `Erfc(x)` as ONNX `Sub(1, Erf(x))`."""
    import numpy as np
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    node.type = "Erf"
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype))
    sub = ctx.insert_new_node_on_output(
        "Sub", node.output[0], name=utils.make_name(f"{name}_sub")
    )
    ctx.replace_inputs(sub, [one.output[0], node.output[0]])
    return sub


def _fingerprint(proto) -> list:
    """The graph's structure without tf2onnx's generated names: op types,
    attributes and input arity of every node, in order."""
    return [
        (n.op_type, n.domain, len(n.input), len(n.output), str(list(n.attribute)))
        for n in proto.graph.node
    ]


def release_memory() -> None:
    """Collects garbage and hands freed heap memory back to the system.

    tf2onnx builds large temporary graphs (several GB for ResNet50); once
    they are garbage, glibc keeps the pages in its arenas, so the next stage
    would add its own peak on top. `malloc_trim(0)` returns them (glibc only;
    elsewhere this only collects garbage).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _optimizers_without_copies():
    """tf2onnx's optimizers without a copy of the graph per optimizer."""
    from tf2onnx import constants

    key = constants.ENV_TF2ONNX_CATCH_ERRORS
    old = os.environ.get(key)
    os.environ[key] = "FALSE"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _optimize_model_proto(proto):
    """tf2onnx's `optimize_model_proto`, first without graph copies; on an
    optimizer's failure, again the default way (which skips that optimizer)."""
    from tf2onnx.graph import GraphUtil

    try:
        return GraphUtil.optimize_model_proto(proto, catch_errors=False)
    except Exception:  # noqa: BLE001 - any optimizer failure: tf2onnx's default
        release_memory()
        return GraphUtil.optimize_model_proto(proto)


def _optimize_to_fixed_point(proto):
    """Re-runs tf2onnx's optimizers on `proto` until a pass changes nothing."""
    for _ in range(_MAX_PASSES):
        again = _optimize_model_proto(proto)
        release_memory()
        if _fingerprint(again) == _fingerprint(proto):
            return proto
        proto = again
    return proto


def to_onnx(model, signature: list, opset: int):
    """`model(inputs, training=False)` as an ONNX `ModelProto`.

    `signature` holds `tf.TensorSpec`s or `Spec`s (name, shape, dtype), one
    per model input. The frozen graph and the traced function are dropped
    before returning, so that only the ONNX model stays in memory.
    """
    tf = require("tensorflow")
    tf2onnx = require("tf2onnx")
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    def call(*args):
        inputs = _keras_graph.pack_inputs(model, list(args))
        return keras.tree.flatten(model(inputs, training=False))

    signature = [
        s
        if isinstance(s, tf.TensorSpec)
        else tf.TensorSpec(s.shape, s.dtype, name=s.name)
        for s in signature
    ]
    fn = tf.function(call, input_signature=signature)
    concrete = fn.get_concrete_function()
    # The model's own inputs come first; captured tensors follow.
    input_names = [t.name for t in concrete.inputs[: len(signature)]]
    output_names = [t.name for t in concrete.outputs]
    frozen = convert_variables_to_constants_v2(
        concrete, lower_control_flow=False, aggressive_inlining=True
    )
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    for function in graph_def.library.function:
        for key in _NO_INLINE:
            if key in function.attr:
                del function.attr[key]
    for node in graph_def.node:
        for key in _NO_INLINE:
            if key in node.attr:
                del node.attr[key]
    rename = tf2onnx.convert.tensor_names_from_structed(
        concrete, input_names, output_names
    )
    name = concrete.name
    # Only the GraphDef is needed now: drop the traced and frozen functions
    # before tf2onnx builds its own copies.
    del frozen, concrete, fn
    release_memory()
    kwargs = dict(
        name=name,
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        tensors_to_rename=rename,
        custom_op_handlers={"Erfc": (_erfc, [])},
    )
    with tf.device("/cpu:0"):
        try:
            with _optimizers_without_copies():
                proto, _ = tf2onnx.convert.from_graph_def(graph_def, **kwargs)
        except Exception:  # noqa: BLE001 - an optimizer failed: the default way
            release_memory()
            proto, _ = tf2onnx.convert.from_graph_def(graph_def, **kwargs)
    del graph_def
    release_memory()
    return _optimize_to_fixed_point(proto)
