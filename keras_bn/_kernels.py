"""Pure functions for the batch-normalization math (backend-neutral `keras.ops`).

The training kernel is split into a forward and a backward half so that
`keras_bn._fused` can attach the analytic backward pass of Ioffe & Szegedy
(2015) as a custom gradient on each backend. Nothing here touches layer state.

Numerics:

* Statistics are accumulated in float32 whatever the input dtype.
* Mean and variance come from one pass over the data, *shifted* by a pilot
  estimate `k` of the per-channel mean: `mean = k + E[x - k]`,
  `var = E[(x - k)^2] - E[x - k]^2`. The subtraction loses about
  `((k - mean) / std)^2 * 2^-24` of the variance, relative (the naive
  `E[x^2] - E[x]^2`, `k = 0`, loses every digit when the mean is 1e4 and the
  standard deviation 1 in float32).
* The pilot (`pilot_shift`) is the mean of a sample of `PILOT_SAMPLES` values
  per channel spread over the whole batch (a low-discrepancy sequence of
  positions along each reduction axis, so no stride of the data can align
  with it). Whatever the data, a mean of s of the m values lies within
  `sqrt(m / s)` standard deviations of the batch mean (Cauchy-Schwarz); on
  ordinary data it lies within a fraction of one.
* A guard catches the rest: when any channel has `|E[x - k]| > std` (or the
  sums are not finite) the moments are recomputed (`ops.cond`: only that
  batch pays) around the shifted mean `k + E[x - k]`, refined once more, so a
  pilot spoiled by outliers, by a mask that hides the sample, or by a
  structured batch costs a second pass, never accuracy. The shift therefore
  loses at most about `2^-24` of the variance on every batch.
* The centred input is formed as `(x - k) - d` with `d = E[x - k]`, never as
  `x - mean`: `x - k` is exact (Sterbenz) for data near `k`, and `d` is small,
  so the output keeps full float32 precision even when `|mean| >> std`.
* No overflow for any finite input: `(x - k)^2` overflows float32 beyond
  about 1.8e19. The recompute forms its sums on `(x - k) / s` with the
  per-channel magnitude `s = max|x - k|`, and `1 / sqrt(var + eps)` as
  `rsqrt(var / s^2 + eps / s^2) / s`. The variance itself is then returned as
  inf where it exceeds float32 (the layer keeps its moving statistics). Under
  synchronization (cross-replica sums cannot sit inside a `cond`) there is no
  recompute: the pilot, averaged over the replicas, is all there is. The
  backward pass works with `xhat = (x - mean) / std`, never with `std^-2`, so
  it stays finite too.
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

# Values per channel the pilot shift averages (fewer where the batch has
# fewer): enough that on ordinary data the pilot lies well within one
# standard deviation of the mean, so the guard below never fires, for the
# cost of a gather of this many rows (bench/shift_candidates.py).
PILOT_SAMPLES = 64
# The guard: moments are recomputed around the shifted mean where any
# channel has `E[x - k]^2 > SHIFT_GUARD * var`. At 1 the one-pass variance
# loses at most about 2 * 2^-24 to the shift.
SHIFT_GUARD = 1.0
# Weyl's sequence frac(j * (sqrt(5) - 1) / 2): well spread for any count,
# and aligned with no period of the data.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


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


def _sample_positions(n, count: int):
    """Up to `count` positions in `[0, n)` spread by Weyl's sequence (int32).

    For a static n, positions that fall together are kept once.
    """
    frac = [(j * _GOLDEN + 0.5 / count) % 1.0 for j in range(count)]
    if isinstance(n, int):
        return ops.convert_to_tensor(sorted({int(f * n) for f in frac}), "int32")
    pos = ops.floor(ops.convert_to_tensor(frac, "float32") * ops.cast(n, "float32"))
    return ops.clip(ops.cast(pos, "int32"), 0, ops.maximum(ops.cast(n, "int32") - 1, 0))


def sample_plan(
    x, axes: Sequence[int], samples: int | None = None, *, exact_slice: bool = False
) -> list:
    """Where `pilot_shift` samples `x`: a list of `(axis, positions)`.

    The budget of `samples` positions per channel goes to the reduction axes
    in order: an axis of static size n that fits in it is taken whole (and
    divides the budget), a longer one takes the remaining budget, spread by
    Weyl's sequence, and every later axis one position; an axis of unknown
    size (a batch dimension when tracing) takes the remaining budget, its
    positions repeating when it is shorter, or, with `exact_slice` (a replica
    may hold no example at all), its first positions, never out of range.
    Axes of size 1, and empty axes (a replica without examples), are left
    alone. Returns `(axis, positions)`, positions being an int32 tensor or a
    slice.
    """
    plan, budget = [], PILOT_SAMPLES if samples is None else samples
    for i in axes:
        n = x.shape[i]
        if n in (0, 1):
            continue
        if n is not None and n <= budget:
            budget //= n
            continue
        if n is None and exact_slice:
            plan.append((i, slice(0, max(budget, 1))))
        else:
            size = n if n is not None else ops.shape(x)[i]
            plan.append((i, _sample_positions(size, max(budget, 1))))
        budget = 1
    return plan


def _take(v, plan):
    for i, positions in plan:
        if v.shape[i] == 1:
            continue
        if isinstance(positions, slice):
            v = v[(slice(None),) * i + (positions,)]
        else:
            v = ops.take(v, positions, axis=i)
    return v


def pilot_shift(
    x,
    axes: Sequence[int],
    weights=None,
    samples: int | None = None,
    *,
    exact_slice: bool = False,
):
    """Per-channel mean of a sample of `x` spread over the batch (`sample_plan`).

    Only unmasked values count; where the sample holds none, the mean of
    the whole sample, or 0 where that is not finite (the guard in `forward`
    then recomputes around the true mean). Summed from `x / n`, so it never
    overflows. `samples` defaults to `PILOT_SAMPLES`; `exact_slice`: see
    `sample_plan`.
    """
    plan = sample_plan(x, axes, samples, exact_slice=exact_slice)
    xs = _take(x, plan)
    n = 1
    for i in axes:
        n *= xs.shape[i] if xs.shape[i] is not None else ops.shape(xs)[i]
    n = ops.cast(n, "float32")
    plain = ops.sum(xs / n, axis=axes, keepdims=True)
    plain = ops.where(ops.isfinite(plain), plain, 0.0)
    if weights is None:
        return plain
    ws = ops.broadcast_to(_take(ops.cast(weights, "float32"), plan), ops.shape(xs))
    ws = ws > 0.0
    part = ops.sum(ops.where(ws, xs, 0.0) / n, axis=axes, keepdims=True)
    seen = ops.sum(ops.cast(ws, "float32"), axis=axes, keepdims=True)
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
    samples: int | None = None,
    guard: float | None = None,
):
    """Training-mode forward: returns `(y, mean, variance, residuals)`.

    `scale` and `offset` are per-channel float32 vectors; `weights` is None or a
    0/1 mask broadcastable to `x` (masked values do not enter the statistics,
    every value is normalized). `all_reduce`, if given, sums per-channel partial
    sums over replicas (synchronized batch normalization). `samples` and
    `guard` default to `PILOT_SAMPLES` and `SHIFT_GUARD` (see the module's
    docstring).
    """
    rank = len(x.shape)
    axes = reduction_axes(rank, axis)
    xf = ops.cast(x, "float32")
    k = pilot_shift(xf, axes, weights, samples, exact_slice=all_reduce is not None)
    k = ops.stop_gradient(k)
    if all_reduce is not None:
        # One shift for every replica, or the partial sums would not combine.
        # A replica with no examples (a last batch smaller than the number of
        # replicas) has an empty sample: it takes no part in the average.
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
        delta, var, inv_std = _moments(s1, s2, count, epsilon)
        finite = ops.all(ops.logical_and(ops.isfinite(s1), ops.isfinite(s2)))
        guard = SHIFT_GUARD if guard is None else guard
        near = ops.logical_not(ops.any(ops.square(delta) > guard * var))
        k, delta, var, inv_std = ops.cond(
            ops.logical_and(finite, near),
            lambda: (k, delta, var, inv_std),
            # Captures the input, not `xs`: a captured `xs` would have to be
            # written to memory even when this branch does not run.
            lambda: _recentred_moments(x, k, delta, weights, axes, count, epsilon),
        )
        xs = xf - k
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


def _recentred_moments(x, k, delta, weights, axes, count, epsilon):
    """`(shift, E[x - shift], var, 1 / sqrt(var + eps))` around the mean itself.

    The shift `k + E[x - k]` is refined by one more pass (its error is about
    `2^-24 * |k - mean|` times a growth factor of the sums), then the moments
    come from `_rescaled_moments`, which neither overflows nor, with a shift
    this close, loses anything to the subtraction. Masked values are ignored
    with `where`, so whatever they hold (inf, NaN) stays out.
    """
    xf = ops.cast(x, "float32")
    k = ops.where(ops.isfinite(delta), k + delta, k)
    t = (xf - k) / count
    if weights is not None:
        t = ops.where(ops.cast(weights, "float32") > 0.0, t, 0.0)
    d = _sum(t, axes, None)
    k = ops.where(ops.isfinite(d), k + d, k)
    return (k, *_rescaled_moments(x, k, weights, axes, count, epsilon))


def _rescaled_moments(x, k, weights, axes, count, epsilon):
    """`_moments` for inputs whose squares overflow: sums of `(x - k) / s`."""
    xs = ops.cast(x, "float32") - k
    if weights is not None:
        xs = ops.where(ops.cast(weights, "float32") > 0.0, xs, 0.0)
    s = ops.max(ops.abs(xs), axis=axes, keepdims=True)
    s = ops.where(ops.logical_and(s > 0.0, ops.isfinite(s)), s, 1.0)
    xn = xs / s
    dn = _sum(xn, axes, None) / count
    vn = ops.maximum(_sum(xn * xn, axes, None) / count - dn**2, 0.0)
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
