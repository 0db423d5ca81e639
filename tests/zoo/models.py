"""The models of the conformance zoo: every keras.applications family, and
tiny synthetic models covering each failure class (for the default test run).

All use random weights (`weights=None`) and small inputs; the classifier
returns logits (`classifier_activation=None`) so parity is measured on a
linear output. EfficientNet keeps its default preprocessing (a
`Normalization` layer built from constants).
"""

from __future__ import annotations

import keras

A = keras.applications
L = keras.layers


def _app(fn, size, **kwargs):
    def build():
        return fn(
            weights=None,
            input_shape=(size, size, 3),
            classes=10,
            classifier_activation=None,
            **kwargs,
        )

    return build, (size, size, 3)


#: Families of the conformance list that this Keras does not ship.
MISSING = {"RegNet": "not in keras.applications of Keras 3.15 (only in tf.keras 2.x)"}

#: (backend, name) -> why that family cannot be built on that backend.
UNAVAILABLE = {
    ("torch", "NASNetMobile"): (
        "Keras 3.15's NASNet raises on torch ('not available with the torch "
        "backend at this time due to an outstanding bug')"
    ),
}

#: name -> (builder, input shape without batch)
APPLICATIONS = {
    "ResNet50": _app(A.ResNet50, 32),
    "ResNet50V2": _app(A.ResNet50V2, 32),
    "MobileNet": _app(A.MobileNet, 32, alpha=0.25),
    "MobileNetV2": _app(A.MobileNetV2, 32, alpha=0.35),
    "MobileNetV3Small": _app(A.MobileNetV3Small, 32, alpha=0.75),
    "EfficientNetB0": _app(A.EfficientNetB0, 32),
    "EfficientNetV2B0": _app(A.EfficientNetV2B0, 32),
    "DenseNet121": _app(A.DenseNet121, 32),
    "NASNetMobile": _app(A.NASNetMobile, 32),
    "Xception": _app(A.Xception, 71),
    "InceptionV3": _app(A.InceptionV3, 75),
    "InceptionResNetV2": _app(A.InceptionResNetV2, 75),
    "ConvNeXtTiny": _app(A.ConvNeXtTiny, 32),
    "VGG16": _app(A.VGG16, 32),
}


def _ops_nodes():
    """keras.ops nodes between layers (MobileNetV3's hard-swish, ConvNeXt)."""
    inp = keras.Input((8, 8, 3))
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inp))
    x = x * keras.ops.relu6(x + 3.0) / 6.0
    x = L.BatchNormalization()(L.Conv2D(4, 1)(x)) + x
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))


def _normalization_constants():
    """EfficientNet's preprocessing: a Normalization built from constants."""
    inp = keras.Input((8, 8, 3))
    x = L.Rescaling(1.0 / 255.0)(inp)
    x = L.Normalization(mean=[0.4, 0.5, 0.6], variance=[0.05, 0.06, 0.07])(x)
    x = L.BatchNormalization()(L.Conv2D(4, 3)(x))
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def _grouped_conv():
    """ConvNeXt's depthwise convolution is a grouped Conv2D."""
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(4, 3, groups=4, padding="same")(inp)
    x = L.BatchNormalization()(x)
    x = L.Conv2D(8, 1, groups=2)(x)
    return keras.Model(inp, L.BatchNormalization()(x))


def _depthwise_separable():
    inp = keras.Input((8, 8, 3))
    x = L.BatchNormalization()(L.DepthwiseConv2D(3, depth_multiplier=2)(inp))
    x = L.BatchNormalization()(L.SeparableConv2D(5, 3)(L.ReLU()(x)))
    return keras.Model(inp, x)


def _bn_before_dense():
    inp = keras.Input((6,))
    x = L.BatchNormalization()(L.ReLU()(L.Dense(8)(inp)))
    return keras.Model(inp, L.Dense(3)(x))


def _wrappers():
    inp = keras.Input((4, 6))
    x = L.TimeDistributed(L.BatchNormalization())(inp)
    inner = keras.Sequential([keras.Input((6,)), L.Dense(5), L.BatchNormalization()])
    x = L.TimeDistributed(inner)(x)
    return keras.Model(inp, L.Dense(2)(L.Flatten()(x)))


#: name -> (builder, input shape without batch)
SYNTHETIC = {
    "ops_nodes": (_ops_nodes, (8, 8, 3)),
    "normalization_constants": (_normalization_constants, (8, 8, 3)),
    "grouped_conv": (_grouped_conv, (8, 8, 4)),
    "depthwise_separable": (_depthwise_separable, (8, 8, 3)),
    "bn_before_dense": (_bn_before_dense, (6,)),
    "wrappers": (_wrappers, (4, 6)),
}
