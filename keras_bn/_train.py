"""The training step's normalization: the backend's fused op or the kernel.

`batch_norm_train` is the one entry point the layer trains through. It asks
the backend module (`keras_bn.backend`) for its fused step first (on
TensorFlow when the step is not XLA-compiled: `FusedBatchNormV3`, or on a CPU
for channels-first and small inputs the kernel compiled by XLA as nested
functions) and otherwise runs the kernel of `keras_bn._kernels` with its
analytic backward pass, on a reshaped canonical view of the input.
"""

from __future__ import annotations

from keras import ops

from keras_bn import backend
from keras_bn._kernels import canonical_view


def batch_norm_train(
    x,
    scale,
    offset,
    weights=None,
    *,
    axis: int,
    epsilon: float,
    all_reduce=None,
    count_epsilon: float = 0.0,
    fused: bool = True,
):
    """Normalizes `x` with its own batch statistics.

    Returns `(y, mean, variance)`; `mean` and the biased `variance` are float32
    vectors of length `x.shape[axis]`. Gradients flow to `x`, `scale` and
    `offset`; through `mean`/`variance` only on the kernel path (`fused=False`,
    a mask, or `all_reduce`), which the layer uses wherever they are
    differentiated (renorm, synchronized).
    """

    if fused and weights is None and all_reduce is None:
        out = backend.fused_train(x, scale, offset, axis=axis, epsilon=epsilon)
        if out is not None:
            return out
    return _kernel_train(
        x, scale, offset, weights, axis, epsilon, all_reduce, count_epsilon
    )


def _kernel_train(x, scale, offset, weights, axis, epsilon, all_reduce, count_epsilon):
    view = canonical_view(x.shape, axis) if weights is None else None
    shape = None
    if view is not None:
        shape = ops.shape(x)
        x = ops.reshape(x, view)
        axis = 1
    y, mean, var = backend.kernel_train(
        x,
        scale,
        offset,
        weights,
        axis=axis,
        epsilon=epsilon,
        all_reduce=all_reduce,
        count_epsilon=count_epsilon,
    )
    if shape is not None:
        y = ops.reshape(y, shape)
    return y, mean, var
