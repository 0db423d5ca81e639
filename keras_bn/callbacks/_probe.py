"""The probe: one compiled forward pass that returns chosen layers' tensors."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from keras_bn import backend


def check_probe(probe_data, argument: str = "probe_data"):
    """Returns the model inputs of `probe_data` as NumPy arrays.

    A `tuple` is read as `(x, y[, sample_weight])`, as `fit` reads it, and only
    `x` is kept; an array, a list or a dict is the model input itself.
    """
    if probe_data is None:
        raise ValueError(
            f"Argument `{argument}` is required: pass a fixed batch of model "
            f"inputs (e.g. x_test[:1000]). Received: {argument}=None"
        )
    x = probe_data[0] if isinstance(probe_data, tuple) else probe_data
    try:
        x = keras.tree.map_structure(np.asarray, x)
    except Exception as e:  # noqa: BLE001 - any conversion failure is bad input
        raise TypeError(
            f"Argument `{argument}` must be array-like (or a tuple (x, y)). "
            f"Received: {argument} of type {type(probe_data).__name__}"
        ) from e
    for a in keras.tree.flatten(x):
        if a.ndim == 0 or a.shape[0] == 0:
            raise ValueError(
                f"Argument `{argument}` must hold at least one example (a "
                f"non-empty batch). Received an array of shape {a.shape}."
            )
    return x


def resolve_layers(model, layers, argument: str = "layers") -> list:
    """Maps names or layer objects to the model's top-level layers."""
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(
            f"Argument `{argument}` must be a non-empty list of layer names or "
            f"layer objects. Received: {argument}={layers!r}"
        )
    by_name = {layer.name: layer for layer in model.layers}
    resolved = []
    for item in layers:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(
                    f"Unknown layer name {item!r} in `{argument}`: model "
                    f"{model.name!r} has the layers {sorted(by_name)}."
                )
            resolved.append(by_name[item])
        elif isinstance(item, keras.layers.Layer):
            if not any(item is layer for layer in model.layers):
                raise ValueError(
                    f"Layer {item.name!r} in `{argument}` is not a top-level "
                    f"layer of model {model.name!r} (layers: {sorted(by_name)})."
                )
            resolved.append(item)
        else:
            raise TypeError(
                f"Each entry of `{argument}` must be a layer name (str) or a "
                f"keras.layers.Layer. Received: {item!r}"
            )
    return resolved


def layer_tensor(layer, which: str):
    """Returns the symbolic input or output tensor of `layer`."""
    try:
        tensor = layer.input if which == "input" else layer.output
    except (AttributeError, ValueError) as e:
        raise ValueError(
            f"Cannot read the {which} of layer {layer.name!r}: statistics "
            f"callbacks need a Functional or Sequential model whose layers are "
            f"each called once. ({e})"
        ) from e
    if isinstance(tensor, (list, tuple, dict)):
        raise ValueError(
            f"Layer {layer.name!r} has several {which}s; the statistics callbacks "
            f"record single-tensor inputs/outputs. Pick another layer."
        )
    return tensor


class Probe:
    """Runs `model` up to `tensors` on a fixed batch with one compiled call.

    The sub-model `keras.Model(model.inputs, tensors)` shares the model's
    variables and is called with `stateless_call` on their current values, so
    a probe in training mode (`training=True`: BN layers normalize with the
    probe's own batch statistics) leaves the moving statistics untouched. On
    TensorFlow the call is one `tf.function` (XLA-compiled when the model is),
    on JAX one `jax.jit`. During `fit` on JAX the current values live in the
    trainer's state (`model._jax_state`), not in the variables: the probe then
    reads them from that state (mapping each variable to its index in the
    model's variable lists), and falls back to `model.jax_state_sync()` when
    the state is not there or not in the expected layout.

    Args:
        model: A built Functional or Sequential model.
        tensors: Symbolic tensors of that model.
        x: The probe inputs (NumPy), as returned by `check_probe`.
        training: Run the layers in training mode (default: inference mode).
        reduce: Optional function applied to the list of output tensors
            inside the compiled call (with `keras.ops`), so that only its
            (small) results cross to the host; `run` returns them as NumPy,
            in the same structure.
    """

    def __init__(self, model, tensors: list, x, training: bool = False, reduce=None):
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError(
                f"Model {model.name!r} has no symbolic inputs: statistics "
                f"callbacks need a built Functional or Sequential model."
            )
        if len(inputs) == 1 and not isinstance(x, (list, tuple, dict)):
            inputs = inputs[0]  # match the structure of a single-array probe
        self._model = model
        self._sub = keras.Model(inputs, list(tensors), name=f"{model.name}_probe")
        jit = bool(getattr(model, "jit_compile", True))
        training = bool(training)

        def stateless(trainable, non_trainable, x):
            outs = self._sub.stateless_call(
                trainable, non_trainable, x, training=training
            )[0]
            if reduce is None:
                return outs
            return reduce(list(outs) if isinstance(outs, (list, tuple)) else [outs])

        self._x = backend.convert_inputs(x)
        self._variables = None
        self._index = backend.variable_index(model)
        self._fn = backend.compile_function(stateless, jit)

    def value(self, variable):
        """The current value of one of the model's variables.

        On JAX during `fit`, from the trainer's state when it is newer than the
        variables; if the state does not have the expected layout, it is first
        copied into the variables with `model.jax_state_sync()`.
        """
        return backend.current_value(self._model, variable, self._index)

    def refresh(self) -> None:
        """Re-reads which variables are trainable (call when training starts)."""
        self._variables = None

    def run(self):
        """Returns the tensors' current values on the probe batch (or what
        `reduce` makes of them), as NumPy."""
        if self._variables is None:
            sub = self._sub  # walking the layers is slow: once per `fit`
            self._variables = (sub.trainable_variables, sub.non_trainable_variables)
        trainable, non_trainable = self._variables
        outs = self._fn(
            [self.value(v) for v in trainable],
            [self.value(v) for v in non_trainable],
            self._x,
        )
        if not isinstance(outs, (list, tuple)):  # a one-output model unwraps
            outs = [outs]
        return keras.tree.map_structure(keras.ops.convert_to_numpy, list(outs))
