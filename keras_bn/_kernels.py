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
* No overflow for any finite input: `(x - k)^2` overflows float32 beyond
  about 1.8e19. When the sums come out non-finite, the moments are recomputed
  (`ops.cond`: only that batch pays) on `(x - k) / s` with the per-channel
  magnitude `s = max|x - k|`, and `1 / sqrt(var + eps)` is formed as
  `rsqrt(var / s^2 + eps / s^2) / s`. The variance itself is then returned as
  inf where it exceeds float32 (the layer keeps its moving statistics). Under
  synchronization (cross-replica sums cannot sit inside a `cond`) there is no
  recompute. The backward pass works with `xhat = (x - mean) / std`, never with
  `std^-2`, so it stays finite too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from keras import ops

# An import cycle (backend/<name>.py imports this module), resolved at call
# time: `backend.reduce_sum` is looked up when a sum runs, not at import.
from keras_bn import backend

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


def canonical_view(shape, axis: int):
    """The shape `(pre, C)` or `(pre, C, post)` that `x` is reshaped to.

    Collapsing the reduction axes on each side of the channel axis is free (a
    bitcast) and measured faster under XLA on CPU: the 2-D `(N*H*W, C)`
    column reduction beat the 4-D reduction over `(0, 1, 2)` by about 2x for
    (32, 56, 56, 64) float32. Returns None when the shape is already canonical
    or a collapsed size is unknown when tracing.
    """
    rank = len(shape)
    before, after = shape[:axis], shape[axis + 1 :]
    if rank <= 2 or (rank == 3 and axis == 1):
        return None
    if any(d is None for d in after) or sum(d is None for d in before) > 1:
        return None
    pre = -1 if any(d is None for d in before) else math.prod(before)
    post = math.prod(after)
    return (pre, shape[axis]) if post == 1 else (pre, shape[axis], post)


def pilot_shift(x, axes: Sequence[int], weights=None):
    """Per-channel mean of the first slice along the first reduction axis.

    Only unmasked values count (all of them where the slice is fully masked:
    any value near the data keeps the shifted sums exact), and the mean is
    summed from `x / n`, so it never overflows.
    """
    index = [slice(None)] * len(x.shape)
    index[axes[0]] = slice(0, 1)
    x0 = x[tuple(index)]
    n = 1
    for i in axes:
        n *= x0.shape[i] if x0.shape[i] is not None else ops.shape(x0)[i]
    n = ops.cast(n, "float32")
    if weights is None:
        return _sum(x0 / n, axes, None)
    # A fully masked first slice: any finite value (a NaN there is padding).
    plain = _sum(ops.where(ops.isfinite(x0), x0, 0.0) / n, axes, None)
    w = ops.cast(weights, "float32")
    w0 = w[tuple(index)] if w.shape[axes[0]] != 1 else w
    w0 = ops.broadcast_to(w0, ops.shape(x0))
    part = _sum(ops.where(w0 > 0, x0, 0.0) / n, axes, None)
    seen = _sum(w0, axes, None)
    return ops.where(seen > 0.0, part * (n / ops.maximum(seen, 1.0)), plain)


def _sum(v, axes, all_reduce: AllReduce):
    # The backend's sum: the same value, in the form its compiler runs fastest.
    s = backend.reduce_sum(v, axes)
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
    k = ops.stop_gradient(pilot_shift(xf, axes, weights))
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
        xs_w = ops.where(w > 0, xs, 0.0)  # A masked NaN must not leak in.
        wxs = w * xs_w
        s1 = _sum(wxs, axes, all_reduce)
        s2 = _sum(wxs * xs_w, axes, all_reduce)
    if all_reduce is None:
        finite = ops.all(ops.logical_and(ops.isfinite(s1), ops.isfinite(s2)))
        delta, var, inv_std = ops.cond(
            finite,
            lambda: _moments(s1, s2, count, epsilon),
            # Captures the input, not `xs`: a captured `xs` would have to be
            # written to memory even when this branch does not run.
            lambda: _rescaled_moments(x, k, weights, axes, count, epsilon),
        )
    else:
        delta, var, inv_std = _moments(s1, s2, count, epsilon)
    scale = ops.reshape(scale, ops.shape(k))
    offset = ops.reshape(offset, ops.shape(k))
    a = scale * inv_std
    y = (xs - delta) * a + offset
    mean = ops.reshape(k + delta, (-1,))
    res = Residuals(x, weights, k, delta, inv_std, a, count)
    return ops.cast(y, x.dtype), mean, ops.reshape(var, (-1,)), res


def _moments(s1, s2, count, epsilon):
    """`(E[x - k], var, 1 / sqrt(var + eps))` from the shifted sums."""
    delta = s1 / count
    var = ops.maximum(s2 / count - ops.square(delta), 0.0)
    return delta, var, ops.rsqrt(var + epsilon)


def _rescaled_moments(x, k, weights, axes, count, epsilon):
    """`_moments` for inputs whose squares overflow: sums of `(x - k) / s`."""
    xs = ops.cast(x, "float32") - k
    if weights is not None:
        xs = ops.where(ops.cast(weights, "float32") > 0, xs, 0.0)
    mag = ops.abs(xs)
    s = ops.max(mag, axis=axes, keepdims=True)
    s = ops.where(ops.logical_and(s > 0.0, ops.isfinite(s)), s, 1.0)
    xn = xs / s
    wxn = xn if weights is None else ops.cast(weights, "float32") * xn
    dn = ops.sum(wxn, axis=axes, keepdims=True) / count
    vn = ops.maximum(ops.sum(wxn * xn, axis=axes, keepdims=True) / count - dn**2, 0.0)
    inv_std = ops.rsqrt(vn + (epsilon / s) / s) / s
    return dn * s, vn * s * s, inv_std  # vn * s * s may be inf: not representable


def backward(res: Residuals, dy, dmean, dvar, *, axis: int, all_reduce=None):
    """Analytic backward pass (Ioffe & Szegedy 2015, section 3).

    With `xhat = (x - mean) * inv_std`, `y = scale * xhat + offset` and `w` the
    mask weights (1 without a mask), `W = sum(w)`:

        dx = a * (dy - w/W * sum(dy) - w/W * xhat * sum(dy * xhat))
             + w/W * dmean + 2 w/W * (x - mean) * dvar
        dscale = sum(dy * xhat),  doffset = sum(dy)

    `dmean`/`dvar` are the cotangents of the returned statistics (zero, or
    None, unless something differentiable consumes them). Everything is
    formed from `xhat` (bounded), so huge inputs do not overflow.
    """
    rank = len(res.x.shape)
    axes = reduction_axes(rank, axis)
    xhat = ((ops.cast(res.x, "float32") - res.shift) - res.delta) * res.inv_std
    g = ops.cast(dy, "float32")
    g1 = _sum(g, axes, all_reduce)  # sum(dy)
    dscale = _sum(g * xhat, axes, all_reduce)  # sum(dy * xhat)
    # `a` multiplies O(1) terms last: with huge inputs `a` is tiny, and
    # `a * sum(dy) / W` alone could fall below float32's normal range.
    c0 = -g1 / res.count
    c1 = -dscale / res.count
    # Masked positions (w = 0) may hold huge values: weigh xhat before use.
    w = 1.0 if res.weights is None else ops.cast(res.weights, "float32")
    wxhat = xhat if res.weights is None else w * xhat
    dx = res.a * (g + (c0 * w + c1 * wxhat))
    if dmean is not None or dvar is not None:
        e0 = 0.0 if dmean is None else ops.reshape(dmean, ops.shape(c0)) / res.count
        e1 = 0.0  # 2 dvar (x - mean) / W = 2 dvar std / W * xhat
        if dvar is not None:
            e1 = 2.0 * ops.reshape(dvar, ops.shape(c1)) / res.inv_std / res.count
        dx = dx + (e0 * w + e1 * wxhat)
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
