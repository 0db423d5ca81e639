"""Swap Keras's built-in BatchNormalization layers for keras_bn's."""

from __future__ import annotations

import keras

from keras_bn.batch_normalization import BatchNormalization


def replace_batchnorm(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with every built-in BN replaced by ours.

    Works on Sequential and Functional models, nested ones included. Every
    layer of the copy is new; the weights (trainable and moving statistics) are
    copied over, so the copy computes the same function. `model` is untouched.

    Args:
        model: A built Sequential or Functional `keras.Model`.

    Returns:
        The new model.
    """
    if not isinstance(model, (keras.Sequential, keras.Model)) or not (
        isinstance(model, keras.Sequential) or _is_functional(model)
    ):
        raise TypeError(
            "Argument `model` must be a Sequential or Functional keras.Model "
            f"(a subclassed model has no graph to rewrite). Received: {model!r}"
        )
    if not model.built:
        raise ValueError(
            f"Argument `model` ({model.name!r}) is not built; call it on data or "
            "give it an Input first, so its weights exist to be copied."
        )
    pairs = []

    def clone(layer):
        if type(layer) is keras.layers.BatchNormalization:
            new = BatchNormalization.from_config(layer.get_config())
        else:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new in pairs:
        if old.weights:
            new.set_weights(old.get_weights())
    return copy


def _is_functional(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)
