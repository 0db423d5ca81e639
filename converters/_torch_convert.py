"""One `torch.onnx` conversion of a Keras model on the torch backend.

Keras's own `model.export(format="onnx")` on torch uses the TorchScript
exporter whenever a dimension is free (the batch, usually), which leaves a
`Cast` per Keras operation and numbers its outputs (`"30"`). Here the
`torch.export`-based exporter (`dynamo=True`) is used with the free
dimensions declared as `torch.export.Dim`s, then its ONNX optimizer: on a
small convolutional model that is 8 nodes against Keras's 18, with the same
outputs. When `torch.export` cannot trace the model, the TorchScript exporter
(Keras's route) is used instead; `export_onnx` records which in its report.
"""

from __future__ import annotations

import io

import keras
import numpy as np

from keras_bn import _keras_graph

from ._deps import require


def _sample(spec, size: int):
    """A zero tensor of `spec`'s shape, `size` along each free dimension."""
    torch = require("torch")
    shape = [size if d is None else d for d in spec.shape]
    return torch.zeros(shape, dtype=getattr(torch, np.dtype(spec.dtype).name))


def _wrapper(model):
    torch = require("torch")

    class FlatCall(torch.nn.Module):
        """`model(inputs, training=False)` with flat positional inputs."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            packed = _keras_graph.pack_inputs(self.model, list(args))
            return tuple(keras.tree.flatten(self.model(packed, training=False)))

    return FlatCall()


def inference_call(call):
    """`call` (`arrays -> outputs` of a model) without autograd, as Keras's
    own `predict` runs on torch: nothing is kept for a backward pass."""
    torch = require("torch")

    def no_grad_call(arrays):
        with torch.no_grad():
            return call(arrays)

    return no_grad_call


def to_onnx(model, specs: list, opset: int):
    """`model(inputs, training=False)` as `(ModelProto, exporter)`.

    `exporter` is `"torch.export"` or `"TorchScript"` (the fallback).

    Args:
        model: A Keras model on the torch backend.
        specs: `Spec`s (name, shape with `None` for free dimensions, dtype),
            one per model input, in the model's flat input order.
        opset: ONNX opset.
    """
    torch = require("torch")
    require("onnxscript")  # torch.onnx's exporter is written with it
    wrapper = _wrapper(model)
    # Inference mode for the wrapper alone (`eval()` would also switch the
    # model's modules, which an export must not change); the model is called
    # with `training=False` anyway.
    wrapper.training = False
    names = [spec.name for spec in specs]
    # Size 2 along free dimensions: torch.export specializes sizes 0 and 1.
    args = tuple(_sample(spec, 2) for spec in specs)
    dims = tuple(
        {
            k: torch.export.Dim("batch" if k == 0 else f"dim_{i}_{k}")
            for k, d in enumerate(spec.shape)
            if d is None
        }
        or None
        for i, spec in enumerate(specs)
    )
    try:
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            dynamic_shapes=(dims,),
            verbose=False,
        )
        program.optimize()
        return program.model_proto, "torch.export"
    except Exception as e:  # noqa: BLE001 - any tracing failure: TorchScript
        first_error = e
    onnx = require("onnx")
    buffer = io.BytesIO()
    dynamic_axes = {
        name: {k: ("batch" if k == 0 else f"dim_{i}_{k}") for k in axes}
        for i, (name, axes) in enumerate(zip(names, dims, strict=True))
        if axes
    }
    try:
        torch.onnx.export(
            wrapper,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            dynamic_axes=dynamic_axes or None,
            do_constant_folding=True,
            verbose=False,
        )
    except Exception as e:
        raise RuntimeError(
            f"torch.onnx could not export the model: torch.export failed with "
            f"{type(first_error).__name__}: {first_error}; the TorchScript "
            f"exporter failed with {type(e).__name__}: {e}"
        ) from e
    return onnx.load_from_string(buffer.getvalue()), "TorchScript"
