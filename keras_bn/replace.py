"""Swap Keras's built-in BatchNormalization layers for keras_bn's."""

from __future__ import annotations

import inspect
import warnings

import keras

from keras_bn import _keras_graph
from keras_bn.batch_normalization import BatchNormalization

# Wrappers whose config holds the wrapped layer(s) under these keys.
_WRAPPED_KEYS = ("layer", "backward_layer")


def replace_batchnorm(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with every built-in BN replaced by ours.

    Works on Sequential and Functional models, with `keras.ops` nodes, nested
    models, shared layers, and BN wrapped in `TimeDistributed` or
    `Bidirectional` (or any `keras.layers.Wrapper`). Every layer of the copy is
    new; the weights (trainable and moving statistics) are copied over, so the
    copy computes the same function. `model` is untouched. A built-in BN held
    inside another custom layer cannot be reached from the outside: it stays
    Keras's, with a `UserWarning` naming it.

    Args:
        model: A built Sequential or Functional `keras.Model`.

    Returns:
        The new model.

    Example:

    >>> import keras
    >>> inp = keras.Input((8,))
    >>> x = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inp))
    >>> new = replace_batchnorm(keras.Model(inp, x + 3.0))
    >>> [type(layer).__module__.split(".")[0] for layer in new.layers[1:3]]
    ['keras', 'keras_bn']
    """
    return _swap(model, to_keras_bn=True)


def to_keras_batchnorm(model: keras.Model) -> keras.Model:
    """The inverse of `replace_batchnorm`: keras_bn's BNs become Keras's.

    Used to build the baseline a keras_bn model is compared against (the
    same architecture and weights with Keras's own layer). Options Keras's
    layer lacks (ghost batches, unbiased variance) only change training.
    """
    return _swap(model, to_keras_bn=False)


def _swap(model, to_keras_bn: bool):
    if not isinstance(model, keras.Model) or not _keras_graph.is_graph_model(model):
        raise TypeError(
            "Argument `model` must be a Sequential or Functional keras.Model "
            "(a subclassed model has no graph to rewrite: build it with "
            "keras_bn.BatchNormalization directly). "
            f"Received: {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Argument `model` ({model.name!r}) is not built; call it on data or "
            "give it an Input first, so its weights exist to be copied."
        )
    pairs = []

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless keras.ops operation: reuse it
        new = _clone_layer(layer, to_keras_bn)
        pairs.append((layer, new))
        return new

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new in pairs:
        if old.weights:
            new.set_weights(old.get_weights())
    return copy


def _is_keras_bn(layer) -> bool:
    return type(layer) is keras.layers.BatchNormalization


def _source(layer, to_keras_bn: bool) -> bool:
    """True for a layer the swap replaces."""
    if to_keras_bn:
        return _is_keras_bn(layer)
    return isinstance(layer, BatchNormalization)


def _keras_bn_config(config: dict) -> dict:
    params = inspect.signature(keras.layers.BatchNormalization.__init__).parameters
    base = ("name", "dtype", "trainable")
    return {k: v for k, v in config.items() if k in params or k in base}


def _clone_layer(layer, to_keras_bn: bool):
    if _source(layer, to_keras_bn):
        if to_keras_bn:
            return BatchNormalization.from_config(layer.get_config())
        config = _keras_bn_config(layer.get_config())
        return keras.layers.BatchNormalization.from_config(config)
    config = layer.get_config()
    if isinstance(layer, keras.layers.Wrapper):
        for key in _WRAPPED_KEYS:
            inner = getattr(layer, key, None)
            if isinstance(inner, keras.layers.Layer) and key in config:
                new_inner = _replaced(inner, to_keras_bn)
                config[key] = keras.saving.serialize_keras_object(new_inner)
        return layer.__class__.from_config(config)
    inner = _keras_graph.sublayers(layer)
    hidden = [s.name for s in inner if _source(s, to_keras_bn)]
    if hidden:
        warnings.warn(
            f"layer {layer.name!r} ({type(layer).__name__}) holds "
            f"BatchNormalization layer(s) {hidden} that cannot be replaced from "
            "the outside; they stay as they are. Build that layer with the "
            "BatchNormalization you want instead.",
            stacklevel=3,
        )
    return layer.__class__.from_config(config)


def _replaced(layer, to_keras_bn: bool):
    """An unbuilt copy of a wrapped layer with its BNs swapped."""
    if isinstance(layer, keras.Model) and _keras_graph.is_graph_model(layer):
        return _swap(layer, to_keras_bn)
    return _clone_layer(layer, to_keras_bn)
