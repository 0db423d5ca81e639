"""Ghost batch normalization (Hoffer et al., 2017) on top of the fused kernel.

The kernel normalizes over every axis but one channel axis. A batch of `B`
examples split into `G = B / k` ghost batches of `k` examples is normalized per
(ghost batch, channel) pair by folding the ghost-batch index into the channel
axis: `(B, ..., C) -> (k, G, ..., C) -> (k, ..., G * C)`, with `gamma` and
`beta` tiled `G` times (their gradients sum over the ghost batches through the
tiling). The split is tf_keras's: a reshape to `(k, G, ...)`, so ghost batch `g`
holds the examples `g, g + G, g + 2G, ...` (strided, not contiguous; with
shuffled data the two are equivalent). As in tf_keras, the moving statistics are
updated with the average over ghost batches of their means and variances.
"""

from __future__ import annotations

from keras import ops


def fold(x, axis: int, k: int):
    """`(B, ..., C, ...)` -> `(k, ..., G*C, ...)`; returns it and the new axis."""
    rank = len(x.shape)
    shape = ops.shape(x)
    xr = ops.reshape(x, (k, -1, *shape[1:]))
    # The channel sits at axis + 1 in `xr`; move the ghost axis 1 just before it.
    perm = [0, *range(2, axis + 1), 1, *range(axis + 1, rank + 1)]
    xt = ops.transpose(xr, perm)
    tshape = ops.shape(xt)
    merged = (*tshape[:axis], -1, *tshape[axis + 2 :])
    return ops.reshape(xt, merged), axis


def unfold(y, like, axis: int, k: int):
    """Inverse of `fold` for an output `y` shaped like `fold(like)`."""
    rank = len(like.shape)
    shape = ops.shape(like)
    channels = like.shape[axis]
    yshape = ops.shape(y)
    yr = ops.reshape(y, (*yshape[:axis], -1, channels, *yshape[axis + 1 :]))
    perm = [0, *range(2, axis + 1), 1, *range(axis + 1, rank + 1)]
    inverse = [perm.index(i) for i in range(rank + 1)]
    return ops.reshape(ops.transpose(yr, inverse), shape)


def tile(v, groups):
    """Per-channel vector `(C,)` -> per-(group, channel) vector `(G*C,)`."""
    return ops.reshape(ops.expand_dims(v, 0) * ops.ones((groups, 1), v.dtype), (-1,))


def group_average(v, channels: int):
    """Per-(group, channel) vector `(G*C,)` -> average over groups, `(C,)`."""
    return ops.mean(ops.reshape(v, (-1, channels)), axis=0)
