"""TensorFlow: custom gradient, TensorFlow's fused batch-norm op, replicas.

The fused op (`FusedBatchNormV3` and its registered gradient
`FusedBatchNormGradV3`: oneDNN/Eigen on the CPU, cuDNN on the GPU) is what
`tf_keras` trains with. keras_bn uses it when the step is *not* compiled by
XLA: eagerly, and in a plain `tf.function` such as `fit`'s train step with
`compile(jit_compile=False)` or Keras's default `"auto"` on CPU-only
machines and under `tf.distribute` strategies; except on a CPU for
channels-first inputs and for inputs of a known size below `FUSED_MIN_SIZE`
values, where the kernel of `keras_bn._kernels`, compiled by XLA as nested
functions, is faster (`fused_train`). Under XLA (`jit_compile=True`)
that kernel compiles into the step, so the op is not used there. Under XLA
on a CPU the kernel's sums over the last axis take a form XLA runs faster
(`reduce_sum`).
"""

from __future__ import annotations

import functools
import math

import keras
import tensorflow as tf

# Private TensorFlow API: XLA's optimization barrier (`reduce_sum`), and what
# `tf.function` itself (polymorphic_function's OptionalXlaContext) uses to
# know whether a graph is being compiled by XLA.
from tensorflow.compiler.tf2xla.python import xla as tf_xla
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from keras_bn import _kernels

# The fused op's input dtypes (its statistics are float32 for all of them).
FUSED_DTYPES = ("float16", "bfloat16", "float32")
# cuDNN clamps a smaller epsilon (tf.compat.v1.nn.fused_batch_norm does too).
FUSED_MIN_EPSILON = 1.001e-5
# The fused op sums in float32 without a shift, so its mean carries a rounding
# error that grows with |mean| / std (R) and with the number m of values per
# channel; `_fused_error_estimate`, `R * 2**-24 * sqrt(m)` standard
# deviations, bounds it: the output's error measured 0.1-0.6 of the estimate
# for R from 1 to 1e4 and m from 16 to 100352 (TensorFlow 2.21's CPU kernel,
# bench/results/fused_numerics.md). Where the estimate exceeds this bound in
# any channel, the batch is recomputed with the shifted kernel instead. So
# the op's output error stays below about 1e-5 relative (at 16 values per
# channel and mean 300 std; Keras's layer without XLA, which sums the same
# way, gives 2e-5 there), the kernel's below 3e-7.
FUSED_MAX_MEAN_ERROR = 1e-4
# On a CPU the op costs about 0.45 ms per training step whatever the size
# (TensorFlow 2.21, 2-core VM: 0.50 ms for (64, 128) as for (8, 12, 12, 16)),
# so smaller inputs with a known size train faster with the compiled kernel;
# the two tied at 2**18 values ((256, 1024)) and the op won above.
FUSED_MIN_SIZE = 2**18
_U = 2.0**-24

# AutoGraph has nothing to convert here (no Python control flow on tensors),
# and converting these functions inside a user's `tf.function` was seen to
# call the wrong cached conversion (`kernel_train` ran as a converted
# `in_xla_context`) after many traces in one process (TensorFlow 2.21).
_plain_python = tf.autograph.experimental.do_not_convert


@_plain_python
def in_xla_context() -> bool:
    """True while tracing a graph that XLA will compile (`jit_compile=True`).

    `tf.function(jit_compile=True)` traces inside an `XLAControlFlowContext`
    (tensorflow/python/eager/polymorphic_function/polymorphic_function.py),
    and a function traced inside it (Keras's train step, a nested
    `tf.function`) is compiled with it; `tf_keras`'s BatchNormalization asks
    the same question (`get_enclosing_xla_context`). False when eager.
    """
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def _capturable(t):
    """`t` through an Identity (no copy), for TensorFlow's `tf.cond` gradient.

    Inside the layer's run-time `tf.cond` (a batch size unknown when
    tracing, as in `fit` on a `tf.data` dataset), cond_v2's gradient cannot
    find a tensor that a custom gradient takes as input, or that its
    gradient passes straight to a nested function call, unless it is an
    op's output in the branch (TensorFlow 2.21: an AssertionError in
    `_resolve_grad_inputs`, or "Could not find external tensor capture").
    """
    return tf.identity(t)


@_plain_python
def kernel_train(
    x, scale, offset, weights, *, axis, epsilon, all_reduce, count_epsilon
):
    x = _capturable(x)

    @tf.custom_gradient
    def train(x, scale, offset):
        y, mean, var, res = _kernels.forward(
            x,
            scale,
            offset,
            weights,
            axis=axis,
            epsilon=epsilon,
            all_reduce=all_reduce,
            count_epsilon=count_epsilon,
        )

        def grad(dy, dmean, dvar):
            return _kernels.backward(
                res, dy, dmean, dvar, axis=axis, all_reduce=all_reduce
            )

        return (y, mean, var), grad

    return train(x, scale, offset)


@_plain_python
def fused_view(shape, axis: int):
    """`(shape4, data_format)`: how the fused op takes `x`, or None if it can't.

    Channels-last inputs of any rank become `(-1, 1, 1, C)` (NHWC); any other
    channel axis becomes `(prod(before), C, prod(after), 1)` (NCHW). A rank-4
    input with axis 3 or 1 goes as it is (`shape4` None: no reshape). Only the
    batch dimension may be unknown.
    """
    rank = len(shape)
    if rank < 2 or any(d is None for d in shape[1:]):
        return None
    channels = shape[axis]
    if rank == 4 and axis in (1, 3):
        return None, ("NCHW" if axis == 1 else "NHWC")
    if axis == rank - 1:
        return (-1, 1, 1, channels), "NHWC"
    post = math.prod(shape[axis + 1 :])
    return (1 if axis == 0 else -1, channels, post, 1), "NCHW"


@_plain_python
def fused_train(x, scale, offset, *, axis, epsilon):
    """The training step where XLA does not compile it: a fused op per batch.

    Channels-last inputs train with `FusedBatchNormV3` and its gradient op
    (`_guarded_fused`). On a CPU, two kinds of input train with the kernel
    compiled by XLA as nested functions instead (`_compiled_kernel`):
    channels-first ones, as TensorFlow's CPU op transposes NCHW data to NHWC
    and back (on (32, 64, 56, 56) it took 18.1 ms against 8.6 ms for the same
    data in NHWC) and the compiled kernel measured faster than the op, with
    or without explicit transposes around it; and inputs of a known size
    below `FUSED_MIN_SIZE`, where the op's fixed cost dominates (an unknown
    batch size keeps the op). On a GPU (cuDNN) the op is used for all.

    Returns `(y, mean, variance)` with the biased batch variance, or None
    where neither applies (XLA, dtype, shape, or an epsilon below cuDNN's
    clamp for the op), so that the caller uses the kernel. The returned
    statistics have no gradient (nothing differentiates them on this path:
    renorm and synchronized training use the kernel).
    """
    if in_xla_context():
        return None
    if keras.backend.standardize_dtype(x.dtype) not in FUSED_DTYPES:
        return None
    view = fused_view(tuple(x.shape), axis)
    if view is None:
        return None
    shape4, data_format = view
    dims = tuple(x.shape)
    small = None not in dims and math.prod(dims) < FUSED_MIN_SIZE
    compiled = (data_format == "NCHW" or small) and not _gpu_visible()
    if not compiled and epsilon < FUSED_MIN_EPSILON:
        return None
    x = _capturable(tf.convert_to_tensor(x))
    x4 = x if shape4 is None else tf.reshape(x, shape4)
    if compiled:
        y4, mean, var = _compiled_kernel(x4, scale, offset, epsilon, data_format)
    else:
        y4, mean, var = _guarded_fused(x4, scale, offset, epsilon, data_format)
    y = y4 if shape4 is None else tf.reshape(y4, tf.shape(x))
    return y, tf.stop_gradient(mean), tf.stop_gradient(var)


@_plain_python
def _gpu_visible() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


@functools.cache
def _compiled_pair(epsilon: float):
    """The kernel's halves as XLA-compiled functions of `(M, C)`/`(N, C, L)`.

    Called from a graph that XLA does not compile (or eagerly), each runs as
    one XLA launch; TensorFlow compiles them once per input shape.
    """

    @tf.function(jit_compile=True, autograph=False)
    def forward(x, scale, offset):
        y, mean, var, res = _kernels.forward(
            x, scale, offset, None, axis=1, epsilon=epsilon
        )
        return y, mean, var, res.shift, res.delta, res.inv_std, res.a, res.count

    @tf.function(jit_compile=True, autograph=False)
    def backward(x, dy, *residuals):
        res = _kernels.Residuals(x, None, *residuals)
        return _kernels.backward(res, dy, None, None, axis=1)

    return forward, backward


@_plain_python
def _compiled_kernel(x, scale, offset, epsilon, data_format):
    """The kernel on a 4-D `x`, forward and backward each one XLA launch.

    It runs on the kernel's canonical view of `x` (`_kernel_view`).
    """
    forward, backward = _compiled_pair(float(epsilon))
    xk = tf.reshape(x, _kernel_view(x.shape, data_format))

    @tf.custom_gradient
    def op(xk, scale, offset):
        y, mean, var, *residuals = forward(xk, scale, offset)

        def grad(dy, dmean, dvar):
            return backward(*(_capturable(t) for t in (xk, dy, *residuals)))

        return (y, mean, var), grad

    y, mean, var = op(xk, scale, offset)
    return tf.reshape(y, tf.shape(x)), mean, var


@_plain_python
def _guarded_fused(x, scale, offset, epsilon, data_format):
    """The fused op and its gradient op on a 4-D `x`, or the kernel where unfit.

    Which one runs is decided per batch by one `tf.cond` on the op's
    statistics in the forward pass and the same predicate in the backward
    pass, both inside one custom gradient: TensorFlow never differentiates
    through the `tf.cond` (its gradient would make the forward `If` export
    every intermediate of the kernel branch). The kernel runs on its
    canonical view of `x` (`_kernel_view`). Returns `(y, mean, biased
    variance)`.
    """
    nhwc = data_format == "NHWC"
    channels = x.shape[3 if nhwc else 1]
    kview = _kernel_view(x.shape, data_format)
    bshape = _kernels.broadcast_shape(len(kview), 1, channels)
    if x.shape.is_fully_defined():
        count = float(x.shape.num_elements() // channels)
        bessel = (count - 1.0) / max(count, 1.0)
    else:
        count = tf.cast(tf.size(x), tf.float32) / float(channels)
        bessel = (count - 1.0) / tf.maximum(count, 1.0)

    @tf.custom_gradient
    def op(x, scale, offset):
        y, mean, var, r1, r2, r3 = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=tf.zeros((0,), tf.float32),
            variance=tf.zeros((0,), tf.float32),
            epsilon=epsilon,
            exponential_avg_factor=1.0,
            data_format=data_format,
            is_training=True,
        )
        good = _good(mean, var, count, epsilon)
        xk = tf.reshape(x, kview)

        def fused():
            # Bessel's correction undone: the biased variance, as Keras uses;
            # the last four outputs stand for the kernel's residuals.
            return y, mean, var * bessel, mean, mean, mean, mean

        def kernel():
            yk, kmean, kvar, res = _kernels.forward(
                xk, scale, offset, None, axis=1, epsilon=epsilon
            )
            flat = (tf.reshape(v, (-1,)) for v in res[2:6])
            return (tf.reshape(yk, tf.shape(x)), kmean, kvar, *flat)

        y, mean, var, *residuals = tf.cond(good, fused, kernel)

        def grad(dy, dmean, dvar):
            def fused_grad():
                return tf.raw_ops.FusedBatchNormGradV3(
                    y_backprop=dy,
                    x=x,
                    scale=scale,
                    reserve_space_1=r1,
                    reserve_space_2=r2,
                    reserve_space_3=r3,
                    epsilon=epsilon,
                    data_format=data_format,
                    is_training=True,
                )[:3]

            def kernel_grad():
                k, delta, inv_std, a = (tf.reshape(v, bshape) for v in residuals)
                n = tf.ones_like(k) * count
                res = _kernels.Residuals(xk, None, k, delta, inv_std, a, n)
                dxk, dscale, doffset = _kernels.backward(
                    res, tf.reshape(dy, kview), None, None, axis=1
                )
                return tf.reshape(dxk, tf.shape(x)), dscale, doffset

            return tf.cond(good, fused_grad, kernel_grad)

        return (y, mean, var), grad

    return op(x, scale, offset)


def _kernel_view(shape4, data_format):
    """The kernel's canonical view of a 4-D input: `(N*H*W, C)` or `(N, C, H*W)`."""
    return _kernels.canonical_view(shape4, 3 if data_format == "NHWC" else 1)


@_plain_python
def _fused_error_estimate(mean, var, count, epsilon):
    """Per channel, the op's estimated output error in standard deviations.

    `|mean| / sqrt(var + epsilon) * 2**-24 * sqrt(m)` for m values per
    channel, the typical error of an unshifted float32 sum of m values of
    that mean, over the standard deviation (see `FUSED_MAX_MEAN_ERROR`).
    """
    r = tf.abs(mean) * tf.math.rsqrt(var + epsilon)
    return r * (_U * tf.sqrt(tf.cast(count, tf.float32)))


@_plain_python
def _good(mean, var, count, epsilon):
    """Finite statistics, and a mean the op's float32 sums resolve well enough.

    `_fused_error_estimate <= FUSED_MAX_MEAN_ERROR` in every channel: false
    for a NaN mean or variance, and for an infinite mean unless the variance
    is infinite too, which the second test catches.
    """
    est = _fused_error_estimate(mean, var, count, epsilon)
    return tf.reduce_all(est <= FUSED_MAX_MEAN_ERROR) & (tf.reduce_max(var) < math.inf)


@_plain_python
def reduce_sum(v, axes):
    """`tf.reduce_sum(v, axes, keepdims=True)`, fast under XLA on a CPU.

    TensorFlow 2.21's XLA on a CPU splits a sum over the last (contiguous)
    axis of a product, such as `sum(x * x)` over (N, C, H*W), into three
    `reduce-window` passes over a materialized product: 3.5-4.0 ms for (32,
    64, 3136), against 0.43-0.51 ms when an optimization barrier keeps the
    product from being rewritten, so that it fuses into one loop with the
    sum. The rows are summed first, then the row sums (barred too, or XLA
    merges the two sums into one long running sum that loses 2.7e-5 relative
    on 1.6 million values per channel; as written: 2.3e-7). Measured by
    `bench/xla_row_sums.py` on the project's 2-core VM.
    Column sums (channels last) are faster as they are. With a GPU visible
    (the step runs there), without XLA, or where a dimension is unknown when
    tracing nothing changes: XLA cannot pass a dynamic dimension through a
    barrier (`fit(jit_compile=True)` on a `tf.data` dataset whose batch size
    is unknown compiles the batch dimension as dynamic).

    Without XLA, TensorFlow's CPU kernel sums a column (an axis other than
    the last) as one running sum per column, whose rounding error grows with
    the number of terms: on 100352 post-ReLU values per channel the variance
    came out 2.1e-4 off, against 1.0e-6 from XLA's sum. There each such
    axis is summed in blocks (`_blocked_sum`): 6.3e-7 on the same data.
    """
    rank = len(v.shape)
    if not in_xla_context():
        return _blocked_sum(v, axes)
    barred = rank >= 2 and rank - 1 in axes and None not in tuple(v.shape)
    if barred and not _gpu_visible():
        v = tf.reduce_sum(_barrier(v), axis=-1, keepdims=True)
        axes = [a for a in axes if a != rank - 1]
        if not axes:
            return v
        v = _barrier(v)
    return tf.reduce_sum(v, axis=axes, keepdims=True)


# Columns longer than this are summed in blocks without XLA (`reduce_sum`).
_BLOCKED_MIN = 64


@_plain_python
def _blocked_sum(v, axes):
    """`tf.reduce_sum(v, axes, keepdims=True)` with each long column in blocks.

    An axis of static size n > `_BLOCKED_MIN` other than the last is viewed
    as `(n / b, b)` with b the largest divisor of n up to sqrt(n); the blocks
    are summed first, then their sums, so the running sums are about
    sqrt(n) long instead of n. The last axis (a row sum, which TensorFlow
    sums in a tree) and axes of unknown size are summed as they are.
    """
    rank = len(v.shape)
    plain = [a for a in axes if a == rank - 1 or not _blockable(v.shape[a])]
    if plain:
        v = tf.reduce_sum(v, axis=plain, keepdims=True)
    for a in sorted(set(axes) - set(plain), reverse=True):
        n = v.shape[a]
        b = _block(n)
        shape = tf.concat([tf.shape(v)[:a], [n // b, b], tf.shape(v)[a + 1 :]], 0)
        blocks = tf.reduce_sum(tf.reshape(v, shape), axis=a + 1)
        v = tf.reduce_sum(blocks, axis=a, keepdims=True)
    return v


def _blockable(n) -> bool:
    return n is not None and n > _BLOCKED_MIN and _block(n) > 1


@functools.cache
def _block(n: int) -> int:
    b = math.isqrt(n)
    while n % b:
        b -= 1
    return b


@tf.custom_gradient
def _barrier(v):
    # The op has no registered gradient; TensorFlow asks for one when it
    # records a nested function's call, even under a custom gradient.
    out = tf_xla.optimization_barrier(v)[0]
    out.set_shape(v.shape)
    return out, lambda dv: dv


@_plain_python
def warn_if(flag, warn) -> None:
    """Calls `warn()` (Python) when the boolean tensor `flag` is true.

    Eagerly `flag` is a value; in a graph a `tf.py_function` runs `warn` at
    run time, so that the warning reports a batch that happened, not one that
    might. XLA cannot compile a call into Python, so under `jit_compile=True`
    nothing is reported.
    """
    if tf.executing_eagerly():
        if bool(flag):
            warn()
        return
    if in_xla_context():
        return

    def report():
        warn()
        return tf.constant(0)

    tf.cond(
        flag,
        lambda: tf.py_function(report, [], tf.int32),
        lambda: tf.constant(0),
    )


@_plain_python
def is_traced(x) -> bool:
    return not tf.executing_eagerly()


@_plain_python
def cross_replica_sum():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return lambda v: ctx.all_reduce(tf.distribute.ReduceOp.SUM, v)


@_plain_python
def assert_divisible(x, k: int):
    check = tf.debugging.assert_equal(
        tf.shape(x)[0] % k,
        0,
        message=f"keras_bn: the batch size is not divisible by virtual_batch_size={k}",
    )
    with tf.control_dependencies([check]):
        return tf.identity(x)


@_plain_python
def compile_function(fn, jit: bool):
    return tf.function(fn, jit_compile=jit)


@_plain_python
def convert_inputs(x):
    return keras.tree.map_structure(tf.convert_to_tensor, x)


@_plain_python
def variable_index(model):
    return None


@_plain_python
def current_value(model, variable, index):
    return variable.value
