"""A small Inception-style convolutional network for 28x28 MNIST images.

The architecture scales the paper's Inception experiment down to MNIST: a stem
convolution, two Inception modules (parallel 1x1, 3x3, 5x5-as-two-3x3 and
pooling branches, concatenated) separated by max pooling, global average
pooling, optional dropout and a 10-way softmax. With `batch_norm=True`,
`keras_bn.BatchNormalization` follows every convolution and precedes its
nonlinearity, and those convolutions have no bias (BN's beta replaces it).
"""

from __future__ import annotations

import keras
from keras import layers

import keras_bn

ACTIVATIONS = ("relu", "sigmoid")


def _conv_unit(
    x,
    filters: int,
    kernel: int,
    *,
    batch_norm: bool,
    activation: str,
    l2: float,
    bn_momentum: float,
    name: str,
):
    """Conv -> (BN) -> nonlinearity, the building block of every branch."""
    x = layers.Conv2D(
        filters,
        kernel,
        padding="same",
        use_bias=not batch_norm,
        kernel_regularizer=keras.regularizers.L2(l2) if l2 > 0 else None,
        name=f"{name}_conv",
    )(x)
    if batch_norm:
        x = keras_bn.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return layers.Activation(activation, name=f"{name}_{activation}")(x)


def _inception_module(x, width: int, name: str, **unit):
    """Four parallel branches, concatenated along channels.

    Branch widths: 1x1 -> `width`; 1x1 (`width // 2`) -> 3x3 (`width`);
    1x1 (`width // 2`) -> 3x3 -> 3x3 (`width`, the paper's replacement of
    5x5); 3x3 average pooling -> 1x1 (`width // 2`). Output channels:
    `3 * width + width // 2`.
    """
    half = max(1, width // 2)
    b1 = _conv_unit(x, width, 1, name=f"{name}_b1", **unit)
    b3 = _conv_unit(x, half, 1, name=f"{name}_b3a", **unit)
    b3 = _conv_unit(b3, width, 3, name=f"{name}_b3b", **unit)
    b5 = _conv_unit(x, half, 1, name=f"{name}_b5a", **unit)
    b5 = _conv_unit(b5, width, 3, name=f"{name}_b5b", **unit)
    b5 = _conv_unit(b5, width, 3, name=f"{name}_b5c", **unit)
    bp = layers.AveragePooling2D(3, strides=1, padding="same", name=f"{name}_bp_avg")(x)
    bp = _conv_unit(bp, half, 1, name=f"{name}_bp", **unit)
    return layers.Concatenate(name=f"{name}_concat")([b1, b3, b5, bp])


def build_inception(
    width: int = 16,
    *,
    modules: int = 2,
    batch_norm: bool = True,
    activation: str = "relu",
    dropout: float = 0.0,
    l2: float = 0.0,
    bn_momentum: float = 0.9,
    name: str = "inception_mnist",
) -> keras.Model:
    """Builds the small Inception network for `(28, 28, 1)` inputs.

    Layout: stem 3x3 conv (`width` filters) -> 2x2 max pool (14x14) ->
    Inception module (`width` per branch) -> 2x2 max pool (7x7) -> Inception
    module (`2 * width` per branch) -> global average pooling -> dropout ->
    dense softmax over 10 classes.

    Args:
        width: Filters per branch of the first module (the second uses twice
            as many). A positive integer; 2 or more keeps every branch non-empty.
        modules: Number of Inception modules (default 2), separated by 2x2
            max pooling, module `i` (from 0) with `width * 2**i` filters per
            branch. Tests use 1 for a smaller, faster-compiling graph.
        batch_norm: Insert `keras_bn.BatchNormalization` after every
            convolution, before its nonlinearity, and drop the conv bias.
        activation: `"relu"` or `"sigmoid"`, used after every convolution.
        dropout: Dropout rate before the classifier, in `[0, 1)`.
        l2: L2 weight-decay factor on every conv and dense kernel (`>= 0`).
        bn_momentum: Moving-average momentum of the BN layers.
        name: Model name.

    Returns:
        An uncompiled `keras.Model` mapping `(batch, 28, 28, 1)` images to
        class probabilities `(batch, 10)`.

    Example:

    >>> model = build_inception(width=4, batch_norm=True)
    >>> model.output_shape
    (None, 10)
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(
            f"Argument `width` must be a positive integer (filters per branch). "
            f"Received: width={width!r}"
        )
    if isinstance(modules, bool) or not isinstance(modules, int) or modules < 1:
        raise ValueError(
            f"Argument `modules` must be a positive integer (Inception modules). "
            f"Received: modules={modules!r}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"Argument `activation` must be one of {ACTIVATIONS}. "
            f"Received: activation={activation!r}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"Argument `dropout` must be in [0, 1). Received: dropout={dropout!r}"
        )
    if l2 < 0:
        raise ValueError(f"Argument `l2` must be >= 0. Received: l2={l2!r}")
    unit = dict(
        batch_norm=batch_norm, activation=activation, l2=l2, bn_momentum=bn_momentum
    )
    inputs = keras.Input((28, 28, 1), name="image")
    x = _conv_unit(inputs, width, 3, name="stem", **unit)
    x = layers.MaxPooling2D(2, name="stem_maxpool")(x)
    for i in range(modules):
        if i > 0:
            x = layers.MaxPooling2D(2, name=f"mixed{i}_maxpool")(x)
        x = _inception_module(x, width * 2**i, f"mixed{i + 1}", **unit)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(
        10,
        activation="softmax",
        kernel_regularizer=keras.regularizers.L2(l2) if l2 > 0 else None,
        name="classifier",
    )(x)
    return keras.Model(inputs, outputs, name=name)
