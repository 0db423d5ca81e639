"""One jax2onnx conversion of a Keras model on the JAX backend.

This is the route Keras's own `model.export(format="onnx")` takes on JAX:
`model(inputs, training=False)` is traced by JAX, with the variables'
current values as constants, and jax2onnx writes the traced program as ONNX
(a free dimension becomes a named `dim_param`). jax2onnx leaves layout
operations (Transpose) around convolutions; `export_onnx` runs `fold_onnx`
on the result. Its channels-last max pooling, a MaxPool over all the input's
axes that ONNX Runtime cannot run, becomes a channels-first MaxPool
(`channels_first_pools`).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn import _keras_graph

from ._deps import require
from ._onnx_pool import channels_first_pools


def dim_names(specs, batch_name: str = "batch") -> list[list]:
    """Each spec's shape with free dimensions named (`batch`, `dim_<i>_<k>`)."""
    shapes = []
    for i, spec in enumerate(specs):
        shape = []
        for k, d in enumerate(spec.shape):
            if d is None:
                d = batch_name if k == 0 else f"dim_{i}_{k}"
            shape.append(d)
        shapes.append(shape)
    return shapes


def to_onnx(model, specs: list, opset: int):
    """`model(inputs, training=False)` as `(ModelProto, exporter)`, via jax2onnx.

    Args:
        model: A Keras model on the JAX backend.
        specs: `Spec`s (name, shape with `None` for free dimensions, dtype),
            one per model input, in the model's flat input order.
        opset: ONNX opset.
    """
    jax = require("jax")
    jax2onnx = require("jax2onnx")
    inputs = [
        jax.ShapeDtypeStruct(tuple(shape), np.dtype(spec.dtype))
        for spec, shape in zip(specs, dim_names(specs), strict=True)
    ]

    def call(*args):
        packed = _keras_graph.pack_inputs(model, list(args))
        return tuple(keras.tree.flatten(model(packed, training=False)))

    try:
        proto = jax2onnx.to_onnx(
            call,
            inputs=inputs,
            opset=opset,
            input_names=[spec.name for spec in specs],
            return_mode="proto",
        )
    except Exception as e:
        if type(e).__name__ != "InconclusiveDimensionOperation":
            raise
        # A layer needs a concrete size where JAX traces a free (symbolic)
        # one: jax2onnx's resize, for one, on a free batch dimension.
        where = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"jax2onnx cannot trace {model.name!r} with free dimensions "
            f"{dim_names(specs)}: a layer needs a concrete size there ({where} "
            "JAX: a symbolic dimension used where a constant is required). "
            "Export with a fixed batch size: `batch_size=N` (CLI: "
            "`--batch-size N`), or an `input_signature` without free dimensions."
        ) from e
    proto, _ = channels_first_pools(proto)
    return constant_folded(proto)


def inference_call(model):
    """`arrays -> outputs`: `model(inputs, training=False)` compiled once.

    The variables are arguments of the compiled function (through
    `stateless_call`), not constants in it, so the weights are not copied
    into the executable. One compilation per input shape.
    """
    jax = require("jax")
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def run(trainable, non_trainable, *args):
        packed = _keras_graph.pack_inputs(model, list(args))
        outputs, _ = model.stateless_call(
            trainable, non_trainable, packed, training=False
        )
        return keras.tree.flatten(outputs)

    def call(arrays):
        return [np.asarray(o) for o in run(trainable, non_trainable, *arrays)]

    return call


def constant_folded(proto):
    """`(proto, exporter)`: `proto` after onnxscript's optimizer when it is
    installed.

    jax2onnx writes every operation of the traced program, including those
    on constants only: an unfolded batch normalization's `rsqrt(var + eps)`
    comes out as Add, Sqrt, Div of initializers, which `fold_onnx` cannot
    fold. onnxscript's optimizer evaluates them (and drops the Reshapes
    around broadcast constants), leaving one scale and one shift.
    """
    try:
        import onnxscript.optimizer
    except ModuleNotFoundError:
        return proto, "jax2onnx (not constant-folded: pip install onnxscript)"
    return onnxscript.optimizer.optimize(proto), "jax2onnx, onnxscript optimizer"
