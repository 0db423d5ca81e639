"""Training in float64: the batch-normalization composite at full precision.

The fused kernel (`keras_bn._kernels`) and TensorFlow's fused op accumulate in
float32, which is what float32, float16 and bfloat16 layers need. A float64
layer is asked for float64 precision (finite differences with 1e-6 steps,
reference computations), so it trains with this plain composite instead:
two-pass statistics in float64 and the gradient from automatic
differentiation, as Keras's own layer computes it. Nothing here touches layer
state.
"""

from __future__ import annotations

from keras import ops

from keras_bn._kernels import broadcast_shape, reduction_axes

DTYPE = "float64"


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
    **unused,
):
    """`(y, mean, variance)` in float64, differentiable in every output.

    The same contract as `keras_bn._train.batch_norm_train`: `weights` is None
    or a 0/1 mask broadcastable to `x` (masked values, NaN included, do not
    enter the statistics; every value is normalized), `all_reduce` sums
    per-channel partial sums over replicas, and the variance is the biased one.
    """
    rank = len(x.shape)
    axes = reduction_axes(rank, axis)
    x = ops.cast(x, DTYPE)

    def total(v):
        s = ops.sum(v, axis=axes, keepdims=True)
        return s if all_reduce is None else all_reduce(s)

    if weights is None:
        count = ops.cast(ops.size(x), DTYPE) / x.shape[axis]
        count = ops.ones(broadcast_shape(rank, axis, x.shape[axis]), DTYPE) * count
        count = count if all_reduce is None else all_reduce(count)
        mean = total(x) / count
        var = total(ops.square(x - mean)) / count
    else:
        w = ops.broadcast_to(ops.cast(weights, DTYPE), ops.shape(x))
        count = total(w) + count_epsilon
        keep = w > 0
        mean = total(w * ops.where(keep, x, 0.0)) / count
        var = total(w * ops.square(ops.where(keep, x - mean, 0.0))) / count
    shape = ops.shape(mean)
    a = ops.reshape(ops.cast(scale, DTYPE), shape) * ops.rsqrt(var + epsilon)
    y = (x - mean) * a + ops.reshape(ops.cast(offset, DTYPE), shape)
    return y, ops.reshape(mean, (-1,)), ops.reshape(var, (-1,))
