"""JAX: custom VJP of the kernel, trace detection, the probe's state reading.

Everything JAX runs is compiled by XLA, so there is no fused-op path:
`fused_train` returns None and the kernel of `keras_bn._kernels` is used.
The custom VJP is defined once, here, with the non-array arguments static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from keras_bn import _kernels


def _train_fwd(x, scale, offset, weights, axis, epsilon, all_reduce, count_epsilon):
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
    return (y, mean, var), res


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _train(x, scale, offset, weights, axis, epsilon, all_reduce, count_epsilon):
    args = (axis, epsilon, all_reduce, count_epsilon)
    return _train_fwd(x, scale, offset, weights, *args)[0]


def _train_bwd(axis, epsilon, all_reduce, count_epsilon, res, cotangents):
    dy, dmean, dvar = cotangents
    dx, dscale, doffset = _kernels.backward(
        res, dy, dmean, dvar, axis=axis, all_reduce=all_reduce
    )
    # The mask is an input, not a parameter: a zero cotangent.
    dw = None if res.weights is None else jnp.zeros_like(res.weights)
    return dx, dscale, doffset, dw


_train.defvjp(_train_fwd, _train_bwd)


def kernel_train(
    x, scale, offset, weights, *, axis, epsilon, all_reduce, count_epsilon
):
    return _train(
        x,
        scale,
        offset,
        weights,
        axis,
        float(epsilon),
        all_reduce,
        float(count_epsilon),
    )


def fused_train(x, scale, offset, *, axis, epsilon):
    return None


def reduce_sum(v, axes):
    # JAX 0.10.2's XLA needs no help on the CPU, unlike TensorFlow 2.21's:
    # `sum(x * x)` over the last axis of (32, 64, 3136) took 0.25-0.35 ms as
    # it is, against 3.5-4.0 ms in TensorFlow's XLA (bench/xla_row_sums.py).
    return jnp.sum(v, axis=tuple(axes), keepdims=True)


def warn_if(flag, warn) -> None:
    """Calls `warn()` (Python) when the boolean array `flag` is true, at run time."""
    if not isinstance(flag, jax.core.Tracer):
        if bool(flag):
            warn()
        return
    jax.lax.cond(flag, lambda: jax.debug.callback(warn), lambda: None)


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def cross_replica_sum():
    # Under keras.distribution.DataParallel the batch is one sharded array
    # and XLA reduces over all of it: statistics are global without this.
    return None


def assert_divisible(x, k: int):
    # Shapes are static under jax.jit: the layer checks them when tracing.
    return x


def compile_function(fn, jit: bool):
    return jax.jit(fn) if jit else fn


def convert_inputs(x):
    return x


def variable_index(model) -> dict:
    """Maps `id(variable)` to (state key, index) for the model's variables."""
    index = {}
    for key in ("trainable_variables", "non_trainable_variables"):
        for i, v in enumerate(getattr(model, key)):
            index[id(v)] = (key, i)
    return index


def current_value(model, variable, index):
    """The current value of one of the model's variables.

    During `fit` the current values live in the trainer's state
    (`model._jax_state`), newer than the variables: read from there when it
    has the expected layout; otherwise copy it into the variables first with
    `model.jax_state_sync()`.
    """
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        key, i = index.get(id(variable), (None, None))
        if key is not None and len(state.get(key) or ()) == len(getattr(model, key)):
            return state[key][i]
        model.jax_state_sync()
    return variable.value
