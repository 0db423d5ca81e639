"""`ChannelAffine`: the per-channel scale-and-shift a batch norm leaves behind."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_bn_converters")
class ChannelAffine(keras.layers.Layer):
    """Computes `x * scale + shift` with one `scale` and `shift` per channel.

    `fold_batchnorm` replaces a batch normalization it cannot fold into a
    neighbouring layer with this layer: one multiply and one add (a single
    `Mul` and `Add` in ONNX) instead of the normalization's subtract, divide,
    square root, multiply and add.

    Args:
        axis: Integer, the channel axis.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Example:

    >>> layer = ChannelAffine(axis=-1)
    >>> layer.build((None, 3))
    >>> tuple(layer.scale.shape)
    (3,)
    """

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"Argument `axis` must be an int. Received: axis={axis!r}")
        self.axis = axis
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        axis = self.axis % rank
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"The channel axis {self.axis} of the input must be known. "
                f"Received: input_shape={input_shape}"
            )
        self._broadcast = [1] * rank
        self._broadcast[axis] = channels
        self.scale = self.add_weight(
            shape=(channels,), initializer="ones", name="scale", trainable=False
        )
        self.shift = self.add_weight(
            shape=(channels,), initializer="zeros", name="shift", trainable=False
        )

    def call(self, inputs, training=None, mask=None):
        del training, mask  # the same map in training and inference
        scale = ops.reshape(ops.cast(self.scale, inputs.dtype), self._broadcast)
        shift = ops.reshape(ops.cast(self.shift, inputs.dtype), self._broadcast)
        return inputs * scale + shift

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}
