"""PyTorch: the kernel as an autograd Function, torch's native op, replicas.

Eagerly (Keras's default on torch) a training step picks one of two routes
per layout (`fused_train`):

* channels-first inputs (the channel axis followed by other axes, e.g.
  `(N, C, H, W)` with `axis=1`) train with torch's native batch norm
  (`torch.nn.functional.batch_norm` and its registered backward), which
  reads such data in one pass per channel; per batch, it falls back to the
  kernel where its float32 output would lose accuracy (a mean far from zero
  in units of the standard deviation) or its statistics are not finite;
* channels-last inputs (and 2-D `(N, C)`) train with the kernel of
  `keras_bn._kernels` and its analytic backward (`kernel_train`, a
  `torch.autograd.Function`). Without a mask or replicas it runs in the
  few-pass form of `_eager_forward` / `_eager_backward` (the same shifted
  statistics and guard, with torch's fused `addcmul`), and in the general
  form otherwise or where the guard asks for the recompute. The native op is
  faster on such data, but its CPU kernel sums channels-last data in plain
  float32: measured on (100352, 64) float32, its output's error against
  float64 is 5e-6 of max|y| at mean 0 and 2.4e-5 at a mean of 16 standard
  deviations, against about 2e-7 for the kernel.

Under `torch.compile` every step uses the kernel (`is_traced`): the forward
half, whose rare rescaled recompute branches on the data, runs as one opaque
custom op (`keras_bn::kernel_forward`), so that Dynamo traces the step
without a graph break; the backward half is traced and compiled with it.

`cross_replica_sum` sums over the processes of the default
`torch.distributed` process group, so that `synchronized=True` gives global
batch statistics under DDP-style data parallelism.
"""

from __future__ import annotations

import math

import keras
import torch
import torch.nn.functional as F

from keras_bn import _kernels

# The native op's input dtypes (its statistics are float32 for all of them).
NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The native op forms `y = x * (gamma / std) + (beta - mean * gamma / std)`
# in float32: for |mean| = r standard deviations (of the batch, without
# epsilon) the two terms cancel to a result with an absolute error of up to
# about 2 * r * 2**-24 in units of `gamma * max|x - mean| / sqrt(var + eps)`,
# the output's own spread, whatever epsilon is. Where r exceeds this bound
# (or the variance is 0 and the mean is not) the batch is recomputed with the
# shifted kernel instead. Measured on torch 2.13's CPU op, float32, means of
# r standard deviations and scales from 1e-3 to 1e3, largest error relative to
# max|y| against float64 over 64 channels x 20 draws: 4.8e-7 at r = 4 (2 to
# 1024 values per channel), 9.5e-7 at r = 8, 1.8e-6 at r = 16, 7.5e-6 at
# r = 64; at 4 it stays within the 1e-6 * max|y| asked of the kernel.
NATIVE_MAX_MEAN_STD = 4.0
# Which layouts take the native op (`native_view`): channels-first inputs,
# where its CPU kernel is both fast and accurate (about 1e-7 of max|y| on
# (32, 64, 3136) at the bound above). Channels-last and 2-D inputs take the
# kernel: the op's channels-last CPU kernel accumulates in plain float32 (see
# the module's docstring), too coarse for the tests' 1e-6.


class KernelTrain(torch.autograd.Function):
    """`_kernels.forward` with `_kernels.backward` as its gradient."""

    @staticmethod
    def forward(ctx, x, scale, offset, weights, axis, epsilon, all_reduce, ce):
        if all_reduce is None and torch.compiler.is_compiling():
            # Opaque to Dynamo: the forward's run-time branch (`ops.cond`) would
            # otherwise break the graph.
            y, mean, var, *per_channel = torch.ops.keras_bn.kernel_forward(
                x, scale, offset, weights, axis, epsilon, ce
            )
        else:
            out = None
            if weights is None and all_reduce is None:
                out = _eager_forward(x, scale, offset, axis, epsilon)
            if out is not None:
                y, mean, var, saved = out
                ctx.save_for_backward(*saved)
                ctx.axis, ctx.eager, ctx.dtype = axis, True, x.dtype
                ctx.set_materialize_grads(False)
                return y, mean, var
            y, mean, var, res = _kernels.forward(
                x,
                scale,
                offset,
                weights,
                axis=axis,
                epsilon=epsilon,
                all_reduce=all_reduce,
                count_epsilon=ce,
            )
            per_channel = res[2:]
        ctx.save_for_backward(x, weights, *per_channel)
        ctx.axis, ctx.all_reduce, ctx.eager = axis, all_reduce, False
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, dmean, dvar):
        if ctx.eager:
            dx, dscale, doffset = _eager_backward(
                ctx.saved_tensors, dy, dmean, dvar, ctx.axis, ctx.dtype
            )
            return dx, dscale, doffset, None, None, None, None, None
        x, weights, *per_channel = ctx.saved_tensors
        res = _kernels.Residuals(x, weights, *per_channel)
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dscale, doffset = _kernels.backward(
            res, dy, dmean, dvar, axis=ctx.axis, all_reduce=ctx.all_reduce
        )
        # The mask is an input, not a parameter: no gradient.
        return dx, dscale, doffset, None, None, None, None, None


def _eager_forward(x, scale, offset, axis, epsilon):
    """The kernel's forward without a mask or replicas, in few passes.

    The same numerics as `_kernels.forward` (pilot shift, shifted sums, the
    same guard), written with torch's fused ops so that an eager step reads
    and writes the tensor fewer times: `xs = x - k` is formed once and kept
    for the backward pass, and `y = xs * a + (offset - delta * a)` is one
    `addcmul`. Returns `(y, mean, var, saved)`, or None where the guard asks
    for the recompute (the caller then runs `_kernels.forward`).
    """
    dims = _kernels.reduction_axes(x.dim(), axis)
    xf = x.to(torch.float32)
    k = _kernels.pilot_shift(xf, dims).detach()
    xs = xf - k
    count = x.numel() / x.shape[axis]
    s1 = torch.sum(xs, dim=dims, keepdim=True)
    s2 = torch.sum(torch.square(xs), dim=dims, keepdim=True)
    delta = s1 / count
    var = torch.clamp_min(s2 / count - torch.square(delta), 0.0)
    finite = torch.isfinite(s1).all() & torch.isfinite(s2).all()
    near = ~torch.any(torch.square(delta) > _kernels.SHIFT_GUARD * var)
    if not bool(finite & near):
        return None
    inv_std = torch.rsqrt(var + epsilon)
    a = scale.reshape(k.shape) * inv_std
    y = torch.addcmul(offset.reshape(k.shape) - delta * a, xs, a)
    mean = (k + delta).reshape(-1)
    saved = (xs, delta, inv_std, a)
    return y.to(x.dtype), mean, var.reshape(-1), saved


def _eager_backward(saved, dy, dmean, dvar, axis, dtype):
    """`_kernels.backward` for `_eager_forward`'s residuals.

    With `xhat = (xs - delta) * inv_std` and `n` values per channel:
    `dscale = sum(dy * xhat) = inv_std * (sum(dy * xs) - delta * sum(dy))`,
    and `dx = a * (dy - sum(dy) / n - xhat * dscale / n)` (plus the terms of
    the statistics' cotangents), formed as `a * dy + cx * xs + c0` in two
    `addcmul`s.
    """
    xs, delta, inv_std, a = saved
    dims = _kernels.reduction_axes(xs.dim(), axis)
    n = xs.numel() / xs.shape[axis]
    if dy is None:
        dy = torch.zeros_like(xs)
    g = dy.to(torch.float32)
    g1 = torch.sum(g, dim=dims, keepdim=True)
    dot = torch.sum(g * xs, dim=dims, keepdim=True)
    dscale = inv_std * (dot - delta * g1)
    # dx = a * g + e1 * xhat + e0, per channel e1 and e0:
    e1 = -a * dscale / n
    e0 = -a * g1 / n
    if dmean is not None:
        e0 = e0 + dmean.reshape(e0.shape) / n
    if dvar is not None:  # 2 dvar (x - mean) / n = 2 dvar / (inv_std n) * xhat
        e1 = e1 + 2.0 * dvar.reshape(e1.shape) / inv_std / n
    cx = e1 * inv_std
    dx = torch.addcmul(e0 - cx * delta, xs, cx).addcmul_(g, a)
    return dx.to(dtype), dscale.reshape(-1), g1.reshape(-1)


@torch.library.custom_op("keras_bn::kernel_forward", mutates_args=())
def _kernel_forward_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    weights: torch.Tensor | None,
    axis: int,
    epsilon: float,
    count_epsilon: float,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """`_kernels.forward` as one op: `(y, mean, var, shift, delta, inv_std, a,
    count)` (the last five: the residuals of shape `broadcast_shape`)."""
    y, mean, var, res = _kernels.forward(
        x,
        scale,
        offset,
        weights,
        axis=axis,
        epsilon=epsilon,
        count_epsilon=count_epsilon,
    )
    # A custom op's outputs may not alias its inputs or each other.
    return (y, *(t.clone() for t in (mean, var, *res[2:])))


@_kernel_forward_op.register_fake
def _(x, scale, offset, weights, axis, epsilon, count_epsilon):
    channels = x.shape[axis]
    shape = _kernels.broadcast_shape(x.dim(), axis, channels)

    def f32(s):
        return x.new_empty(s, dtype=torch.float32)

    return (
        torch.empty_like(x),
        f32((channels,)),
        f32((channels,)),
        *(f32(shape) for _ in range(5)),
    )


def kernel_train(
    x, scale, offset, weights, *, axis, epsilon, all_reduce, count_epsilon
):
    return KernelTrain.apply(
        x,
        scale,
        offset,
        weights,
        axis,
        float(epsilon),
        all_reduce,
        float(count_epsilon),
    )


def native_view(shape, axis: int):
    """`(pre, C, post)`: how the native op takes a channels-first `x`, or None.

    None where the channel axis is the last one (or `post` is 1): the kernel
    trains those faster. The native op wants the channel at axis 1 of a
    contiguous tensor, so the axes before and after it are collapsed.
    """
    rank = len(shape)
    if rank < 3 or axis == rank - 1:
        return None
    post = math.prod(shape[axis + 1 :])
    if post == 1:
        return None
    return (math.prod(shape[:axis]), shape[axis], post)


def fused_train(x, scale, offset, *, axis, epsilon):
    """Eagerly, channels-first inputs: torch's native op, guarded per batch.

    Returns `(y, mean, biased variance)` with the native op's gradients, or
    None (channels-last, compiling, a dtype the op lacks, fewer than two
    values per channel, or a batch the op resolves too coarsely) so that the
    caller uses the kernel. The statistics have no gradient (renorm and
    synchronized training use the kernel). The guard reads the statistics on
    the host: one synchronization per call on a GPU.
    """
    if is_traced(x) or x.dtype not in NATIVE_DTYPES:
        return None
    shape = tuple(x.shape)
    view = native_view(shape, axis)
    if view is None or view[0] * view[2] < 2:
        return None
    channels, count = view[1], view[0] * view[2]
    running_mean = torch.zeros(channels, dtype=torch.float32, device=x.device)
    running_var = torch.zeros_like(running_mean)
    # momentum=1: the "running" statistics are the batch's own, the variance
    # with Bessel's correction (undone below: Keras uses the biased one).
    y = F.batch_norm(
        x.reshape(view),
        running_mean,
        running_var,
        scale,
        offset,
        training=True,
        momentum=1.0,
        eps=epsilon,
    )
    var = running_var * ((count - 1) / count)
    if not _good(running_mean, var):
        return None
    return y.reshape(shape), running_mean, var


def _good(mean, var) -> bool:
    """Finite statistics and `|mean| <= NATIVE_MAX_MEAN_STD * std` everywhere.

    `std` without epsilon: the output's error is relative to its spread.
    """
    bound = NATIVE_MAX_MEAN_STD**2 * var
    ok = torch.all(torch.square(mean) <= bound) & torch.all(var < math.inf)
    return bool(ok)


def reduce_sum(v, axes):
    return torch.sum(v, dim=tuple(axes), keepdim=True)


def warn_if(flag, warn) -> None:
    """Calls `warn()` (Python) when the boolean tensor `flag` is true.

    Eagerly (torch's default `fit`) the flag is read at once. Under
    `torch.compile` reading it would break the graph, so nothing is checked
    there: the batch is still handled correctly, only the warning is skipped.
    """
    if is_traced(flag):
        return
    if bool(flag):
        warn()


def is_traced(x) -> bool:
    """Inside `torch.compile` (Dynamo, as `jit_compile=True` uses) or
    `torch.export`, or a `torch.jit` trace."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


def cross_replica_sum():
    """The sum over the default process group, or None with one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() == 1:
        return None
    return _all_reduce_sum


def _all_reduce_sum(v):
    # Called on statistics and on the backward pass's sums inside the
    # kernel's autograd Function (and on counts): no gradient flows through.
    out = v.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def assert_divisible(x, k: int):
    if x.shape[0] % k:
        raise ValueError(
            f"keras_bn: the batch size {x.shape[0]} is not divisible by "
            f"virtual_batch_size={k}"
        )
    return x


def compile_function(fn, jit: bool):
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return torch.compile(run) if jit else run


def convert_inputs(x):
    return keras.tree.map_structure(keras.ops.convert_to_tensor, x)


def variable_index(model):
    return None


def current_value(model, variable, index):
    # The torch trainer updates the variables in place.
    return variable.value
