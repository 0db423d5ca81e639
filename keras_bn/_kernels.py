"""Pure functions for the batch-normalization math (backend-neutral `keras.ops`).

The training kernel is split into a forward and a backward half so that
`keras_bn._fused` can attach the analytic backward pass of Ioffe & Szegedy
(2015) as a custom gradient on each backend. Nothing here touches layer state.

Numerics:

* Statistics are accumulated in float32 whatever the input dtype.
* Mean and variance come from one pass over the data, *shifted* by a pilot
  estimate `k` of the per-channel mean (the mean of the first example along the
  first reduction axis): `mean = k + E[x - k]`, `var = E[(x - k)^2] - E[x - k]^2`.
  With `k` within a few standard deviations of the mean the subtraction loses
  nothing (the naive `E[x^2] - E[x]^2` loses every digit when the mean is 1e4
  and the standard deviation 1 in float32).
* The centred input is formed as `(x - k) - d` with `d = E[x - k]`, never as
  `x - mean`: `x - k` is exact (Sterbenz) for data near `k`, and `d` is small,
  so the output keeps full float32 precision even when `|mean| >> std`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from keras import ops

AllReduce = Callable | None


class Residuals(NamedTuple):
    """What the forward pass keeps for the backward pass (per channel unless x)."""

    x: object  # the input, in its own dtype
    weights: object  # mask weights broadcastable to x, or None
    shift: object  # pilot shift k, broadcast shape
    delta: object  # E[x - k], broadcast shape
    inv_std: object  # 1 / sqrt(var + eps), broadcast shape
    a: object  # scale * inv_std, broadcast shape
    count: object  # number of values (or mask weight) per channel, broadcast shape


def broadcast_shape(rank: int, axis: int, channels) -> list:
    shape = [1] * rank
    shape[axis] = channels
    return shape


def reduction_axes(rank: int, axis: int) -> list[int]:
    return [i for i in range(rank) if i != axis]


def pilot_shift(x, axes: Sequence[int]):
    """Per-channel mean of the first slice along the first reduction axis."""
    index = [slice(None)] * len(x.shape)
    index[axes[0]] = slice(0, 1)
    return ops.mean(x[tuple(index)], axis=axes, keepdims=True)


def _sum(v, axes, all_reduce: AllReduce):
    s = ops.sum(v, axis=axes, keepdims=True)
    return s if all_reduce is None else all_reduce(s)


def forward(
    x,
    scale,
    offset,
    weights,
    *,
    axis: int,
    epsilon: float,
    all_reduce: AllReduce = None,
    count_epsilon: float = 0.0,
):
    """Training-mode forward: returns `(y, mean, variance, residuals)`.

    `scale` and `offset` are per-channel float32 vectors; `weights` is None or a
    0/1 mask broadcastable to `x` (masked values do not enter the statistics,
    every value is normalized). `all_reduce`, if given, sums per-channel partial
    sums over replicas (synchronized batch normalization).
    """
    rank = len(x.shape)
    axes = reduction_axes(rank, axis)
    xf = ops.cast(x, "float32")
    k = ops.stop_gradient(pilot_shift(xf, axes))
    if all_reduce is not None:
        # One shift for every replica, or the partial sums would not combine.
        # A replica with no examples (a last batch smaller than the number of
        # replicas) has a NaN pilot: it takes no part in the average.
        has = ops.ones_like(k) * ops.cast(ops.size(xf) > 0, "float32")
        k = ops.where(has > 0, k, 0.0)
        k = all_reduce(k * has) / ops.maximum(all_reduce(has), 1.0)
    xs = xf - k
    if weights is None:
        channels = x.shape[axis]
        count = ops.ones_like(k) * (ops.cast(ops.size(xf), "float32") / channels)
        if all_reduce is not None:
            count = all_reduce(count)
        s1 = _sum(xs, axes, all_reduce)
        s2 = _sum(ops.square(xs), axes, all_reduce)
    else:
        w = ops.cast(weights, "float32")
        count = _sum(ops.broadcast_to(w, ops.shape(xf)), axes, all_reduce)
        count = count + count_epsilon
        wxs = w * xs
        s1 = _sum(wxs, axes, all_reduce)
        s2 = _sum(wxs * xs, axes, all_reduce)
    delta = s1 / count
    var = ops.maximum(s2 / count - ops.square(delta), 0.0)
    inv_std = ops.rsqrt(var + epsilon)
    scale = ops.reshape(scale, ops.shape(k))
    offset = ops.reshape(offset, ops.shape(k))
    a = scale * inv_std
    y = (xs - delta) * a + offset
    mean = ops.reshape(k + delta, (-1,))
    res = Residuals(x, weights, k, delta, inv_std, a, count)
    return ops.cast(y, x.dtype), mean, ops.reshape(var, (-1,)), res


def backward(res: Residuals, dy, dmean, dvar, *, axis: int, all_reduce=None):
    """Analytic backward pass (Ioffe & Szegedy 2015, section 3).

    With `xhat = (x - mean) * inv_std`, `y = scale * xhat + offset` and `w` the
    mask weights (1 without a mask), `W = sum(w)`:

        dx = a * (dy - w/W * sum(dy) - w/W * xhat * sum(dy * xhat))
             + w/W * dmean + 2 w/W * (x - mean) * dvar
        dscale = sum(dy * xhat),  doffset = sum(dy)

    `dmean`/`dvar` are the cotangents of the returned statistics (zero, or
    None, unless something differentiable consumes them).
    """
    rank = len(res.x.shape)
    axes = reduction_axes(rank, axis)
    xc = (ops.cast(res.x, "float32") - res.shift) - res.delta
    g = ops.cast(dy, "float32")
    g1 = _sum(g, axes, all_reduce)  # sum(dy)
    g2 = _sum(g * xc, axes, all_reduce)  # sum(dy * (x - mean))
    dscale = g2 * res.inv_std
    c0 = -res.a * g1 / res.count
    c1 = -res.a * ops.square(res.inv_std) * g2 / res.count
    if dmean is not None:
        c0 = c0 + ops.reshape(dmean, ops.shape(c0)) / res.count
    if dvar is not None:
        c1 = c1 + 2.0 * ops.reshape(dvar, ops.shape(c1)) / res.count
    corr = c0 + c1 * xc
    if res.weights is not None:
        corr = ops.cast(res.weights, "float32") * corr
    dx = res.a * g + corr
    return (
        ops.cast(dx, res.x.dtype),
        ops.reshape(dscale, (-1,)),
        ops.reshape(g1, (-1,)),
    )


def inference(x, mean, variance, scale, offset, *, axis: int, epsilon: float):
    """Inference-mode normalization with given (population) statistics."""
    rank = len(x.shape)
    shape = broadcast_shape(rank, axis, -1)
    xf = ops.cast(x, "float32")
    inv = ops.rsqrt(ops.cast(variance, "float32") + epsilon)
    a = ops.reshape(inv * scale, shape)
    y = (xf - ops.reshape(ops.cast(mean, "float32"), shape)) * a + ops.reshape(
        offset, shape
    )
    return ops.cast(y, x.dtype)
