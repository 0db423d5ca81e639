"""Shared harness for the keras_bn layer and kernel tests.

It runs a layer (or any function of `x`, `gamma`, `beta`) in training mode and
returns the output with the gradients with respect to the input and the
trainable weights, using each backend's own mechanism (`tf.GradientTape` on
TensorFlow; `layer.stateless_call` under `jax.vjp` on JAX, writing the new
non-trainable values back to the layer afterwards; `torch.autograd.grad` on
torch), optionally compiled (`tf.function(jit_compile=True)` / `jax.jit` /
`torch.compile` of the forward pass, see `torch_compile`). It also holds a
float64 NumPy reference of batch normalization, forward and backward.

Tolerances (used by `assert_close` unless a test states otherwise):

* float32 kernels vs the float64 reference: `rtol=1e-5` with an absolute floor
  `atol=1e-6 * max|ref|` (elements near zero carry the rounding error of the
  tensor's scale, not of their own magnitude).
* float16 inputs (mixed precision): outputs are rounded to float16 (unit
  roundoff 2**-11 ~ 4.9e-4), so `rtol=atol_scale=2e-3`.
* bfloat16 inputs: unit roundoff 2**-8 ~ 3.9e-3, so `rtol=atol_scale=1.6e-2`.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
from keras import backend

TOL = {
    "float32": dict(rtol=1e-5, atol_scale=1e-6),
    "float16": dict(rtol=2e-3, atol_scale=2e-3),
    "bfloat16": dict(rtol=1.6e-2, atol_scale=1.6e-2),
}


def backend_name() -> str:
    return backend.backend()


def to_numpy(x) -> np.ndarray | None:
    """Any backend tensor/variable (or None) as a float64 NumPy array."""
    if x is None:
        return None
    if hasattr(x, "value") and not isinstance(x, np.ndarray):
        x = x.value
    from keras import ops

    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float64)


def assert_close(actual, ref, rtol=1e-5, atol_scale=1e-6, what=""):
    """`|actual - ref| <= atol_scale * max|ref| + rtol * |ref|` elementwise."""
    actual = to_numpy(actual) if not isinstance(actual, np.ndarray) else actual
    ref = np.asarray(ref, np.float64)
    actual = np.asarray(actual, np.float64)
    assert actual.shape == ref.shape, (what, actual.shape, ref.shape)
    atol = atol_scale * float(np.max(np.abs(ref))) if ref.size else 0.0
    np.testing.assert_allclose(actual, ref, rtol=rtol, atol=atol, err_msg=what)


# -- float64 NumPy reference ------------------------------------------------------


def _axes(rank: int, axis: int) -> tuple[int, ...]:
    axis = axis % rank
    return tuple(i for i in range(rank) if i != axis)


def _bshape(rank: int, axis: int) -> list[int]:
    shape = [1] * rank
    shape[axis % rank] = -1
    return shape


def _weights(x: np.ndarray, mask) -> np.ndarray:
    if mask is None:
        return np.ones_like(x)
    w = np.asarray(mask, np.float64)[..., None]
    return np.broadcast_to(w, x.shape)


def ref_moments(x, axis: int, mask=None):
    """Per-channel (biased) mean and variance in float64, masked positions out."""
    x = np.asarray(x, np.float64)
    w = _weights(x, mask)
    axes = _axes(x.ndim, axis)
    count = w.sum(axis=axes)
    mean = (w * x).sum(axis=axes) / count
    xc = x - mean.reshape(_bshape(x.ndim, axis))
    var = (w * xc * xc).sum(axis=axes) / count
    return mean, var


def ref_forward(x, gamma, beta, axis: int, epsilon: float, mask=None):
    """Training-mode BN in float64: returns `(y, mean, var)`."""
    x = np.asarray(x, np.float64)
    mean, var = ref_moments(x, axis, mask)
    shape = _bshape(x.ndim, axis)
    xhat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
    y = xhat * np.asarray(gamma, np.float64).reshape(shape) + np.asarray(
        beta, np.float64
    ).reshape(shape)
    return y, mean, var


def ref_backward(x, gamma, dy, axis: int, epsilon: float, mask=None):
    """Float64 gradients of `sum(dy * BN(x))`: returns `(dx, dgamma, dbeta)`.

    With `w` the mask weights and `W = sum(w)` per channel (Ioffe & Szegedy
    2015, section 3, extended to weights):
    `dx = gamma/sigma * (dy - w/W * sum(w*dy) - w/W * xhat * sum(w*dy*xhat))`.
    Masked-out positions are normalized but do not enter the statistics, so
    their `dy` only reaches `gamma`, `beta` and their own `dx`.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    w = _weights(x, mask)
    axes = _axes(x.ndim, axis)
    shape = _bshape(x.ndim, axis)
    mean, var = ref_moments(x, axis, mask)
    count = w.sum(axis=axes).reshape(shape)
    inv = 1.0 / np.sqrt(var.reshape(shape) + epsilon)
    xhat = (x - mean.reshape(shape)) * inv
    dgamma = (dy * xhat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    g = np.asarray(gamma, np.float64).reshape(shape)
    # Only the masked-in positions carry the statistics' dependence on x, but
    # every position's output depends on the statistics.
    s1 = dy.sum(axis=axes, keepdims=True)
    s2 = (dy * xhat).sum(axis=axes, keepdims=True)
    dx = g * inv * (dy - w * s1 / count - w * xhat * s2 / count)
    return dx, dgamma, dbeta


def ref_inference(x, mean, var, gamma, beta, axis: int, epsilon: float):
    x = np.asarray(x, np.float64)
    shape = _bshape(x.ndim, axis)

    def r(v):
        return np.asarray(v, np.float64).reshape(shape)

    return (x - r(mean)) / np.sqrt(r(var) + epsilon) * r(gamma) + r(beta)


# -- running layers and functions with gradients ---------------------------------


def inductor_opted_in() -> bool:
    """Whether `KERAS_BN_TORCH_INDUCTOR=1` asks for the Inductor runs."""
    import os

    return os.environ.get("KERAS_BN_TORCH_INDUCTOR") == "1"


def skip_inductor_fit(jit_compile) -> None:
    """Skips `fit(jit_compile=True)` on torch unless KERAS_BN_TORCH_INDUCTOR=1.

    Keras's torch trainer compiles the step with Inductor, about 5 minutes per
    test on a 2-core machine. The compiled layer is tested without it (the
    `jit=True` paths, `torch_compile`) and with it once, in `test_backend`.
    """
    import pytest

    if backend_name() == "torch" and jit_compile is True and not inductor_opted_in():
        pytest.skip(
            "fit(jit_compile=True) on torch compiles with Inductor (minutes per "
            "test on 2 cores); set KERAS_BN_TORCH_INDUCTOR=1 to run it"
        )


def torch_compile(fn):
    """`torch.compile` as the tests use it: Dynamo and AOTAutograd trace the
    forward and backward passes as `jit_compile=True` does, but the graphs run
    without Inductor's code generation (minutes of C++ compilation per test on
    a 2-core CI machine); `test_backend` compiles with Inductor once."""
    import torch

    # A fresh cache: the same code object compiled for many layers would reach
    # Dynamo's recompilation limit and silently run eagerly.
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager")


def _torch_grads(y, wrt, dy):
    import torch

    grads = torch.autograd.grad(
        y, wrt, grad_outputs=backend_cast(dy, y.dtype), allow_unused=True
    )
    return list(grads)


def torch_tuple_vjp(fn, args, cotangents, jit: bool = False):
    """`(fn(*args), grads of sum_i <cot_i, fn(*args)_i> wrt args)` on torch."""
    import torch
    from keras import ops

    args = [ops.convert_to_tensor(a).detach().requires_grad_() for a in args]
    call = torch_compile(fn) if jit else fn
    outs = call(*args)
    cot = [backend_cast(c, o.dtype) for c, o in zip(cotangents, outs, strict=True)]
    grads = torch.autograd.grad(outs, args, grad_outputs=cot, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def vjp(fn, args, dy, jit: bool = False):
    """`(fn(*args), grads of sum(dy * fn(*args)) wrt every arg)` per backend."""
    if backend_name() == "torch":
        from keras import ops

        args = [ops.convert_to_tensor(a).detach().requires_grad_() for a in args]
        call = torch_compile(fn) if jit else fn
        y = call(*args)
        return y.detach(), _torch_grads(y, args, dy)
    if backend_name() == "jax":
        import jax

        def call(*a):
            y, pullback = jax.vjp(fn, *a)
            return y, pullback(backend_cast(dy, y.dtype))

        if jit:
            call = jax.jit(call)
        y, grads = call(*args)
        return y, list(grads)
    import tensorflow as tf

    def call(*a):
        with tf.GradientTape() as tape:
            for t in a:
                tape.watch(t)
            y = fn(*a)
        return y, tape.gradient(y, list(a), output_gradients=tf.cast(dy, y.dtype))

    if jit:
        call = tf.function(call, jit_compile=True)
    args = [tf.convert_to_tensor(a) for a in args]
    y, grads = call(*args)
    return y, list(grads)


def dtype_of(x) -> str:
    """A tensor's dtype as Keras names it ("float16", ...), on every backend."""
    from keras import ops

    return backend.standardize_dtype(ops.convert_to_tensor(x).dtype)


def backend_cast(x, dtype):
    from keras import ops

    return ops.cast(ops.convert_to_tensor(x), dtype)


def run_layer(layer, x, dy=None, *, training=True, mask=None, jit=False, graph=False):
    """Runs `layer(x)` once, applying its state updates, with gradients.

    `graph=True` (TensorFlow only) runs the step in a plain `tf.function`
    without XLA, as `fit` does with `jit_compile=False`.

    Returns a dict with `y`, and if `dy` is given, `dx` and `dweights` (the
    gradients wrt `layer.trainable_variables`, in order). The layer must be
    built. On JAX the call goes through `layer.stateless_call` (under `jax.vjp`
    and, with `jit=True`, `jax.jit`), and the returned non-trainable values are
    assigned back, so both backends leave the layer in the same state.
    """
    from keras import ops

    x = ops.convert_to_tensor(x)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
    if backend_name() == "torch":
        if graph:
            raise ValueError("graph=True is TensorFlow's tf.function without XLA")

        def forward(x, mask):
            kwargs = {} if mask is None else {"mask": mask}
            return layer(x, training=training, **kwargs)

        if jit:
            forward = torch_compile(forward)
        x = x.detach().requires_grad_(dy is not None)
        y = forward(x, mask)
        out = {"y": y.detach()}
        if dy is not None:
            weights = [v.value for v in layer.trainable_variables]
            grads = _torch_grads(y, [x, *weights], dy)
            out["dx"], out["dweights"] = grads[0], grads[1:]
        return out
    if backend_name() == "jax":
        import jax

        if graph:
            raise ValueError("graph=True is TensorFlow's tf.function without XLA")
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def f(x, tv, ntv, mask):
            kwargs = {} if mask is None else {"mask": mask}
            return layer.stateless_call(tv, ntv, x, training=training, **kwargs)

        def step(x, tv, ntv, mask, dy):
            if dy is None:
                y, new = f(x, tv, ntv, mask)
                return y, new, None
            y, pullback, new = jax.vjp(
                lambda x, tv: f(x, tv, ntv, mask), x, tv, has_aux=True
            )
            return y, new, pullback(dy.astype(y.dtype))

        if jit:
            step = jax.jit(step)
        dyt = None if dy is None else ops.convert_to_tensor(dy)
        y, new, grads = step(x, tv, ntv, mask, dyt)
        for v, val in zip(layer.non_trainable_variables, new, strict=True):
            v.assign(val)
        out = {"y": y}
        if grads is not None:
            out["dx"], out["dweights"] = grads[0], list(grads[1])
        return out
    import tensorflow as tf

    def step(x, mask, dy):
        kwargs = {} if mask is None else {"mask": mask}
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, **kwargs)
        if dy is None:
            return y, None
        grads = tape.gradient(
            y,
            [x, *layer.trainable_variables],
            output_gradients=tf.cast(dy, y.dtype),
        )
        return y, grads

    if jit or graph:
        step = tf.function(step, jit_compile=bool(jit))
    y, grads = step(x, mask, None if dy is None else tf.convert_to_tensor(dy))
    out = {"y": y}
    if grads is not None:
        out["dx"], out["dweights"] = grads[0], list(grads[1:])
    return out


def random_affine(rng, channels: int):
    """Non-trivial gamma (away from 1 and 0, some negative) and beta."""
    gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.normal(0.0, 1.0, channels)
    return gamma.astype("float32"), beta.astype("float32")


def set_bn_weights(layer, rng, moving: bool = True) -> None:
    """Gives a built BN layer random gamma/beta (and moving statistics)."""
    channels = layer.moving_mean.shape[0]
    gamma, beta = random_affine(rng, channels)
    if layer.scale:
        layer.gamma.assign(gamma)
    if layer.center:
        layer.beta.assign(beta)
    if moving:
        layer.moving_mean.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))


def affine_of(layer):
    """The layer's `(gamma, beta)` as float64 arrays (ones/zeros if disabled)."""
    c = layer.moving_mean.shape[0]
    gamma = to_numpy(layer.gamma) if layer.scale else np.ones(c)
    beta = to_numpy(layer.beta) if layer.center else np.zeros(c)
    return gamma, beta


@contextlib.contextmanager
def skip_if_no_cpu_nchw_conv():
    """Skips the test where TensorFlow's CPU has no channels-first convolution.

    TensorFlow's CPU `Conv2D` kernel has an NCHW form only in builds whose
    oneDNN kernels are active on the processor; elsewhere an eager
    channels-first 1-D/2-D convolution or transposed convolution (Keras's own
    layers too: Keras compiles only 3-D and grouped convolutions with XLA)
    raises "only supports NHWC".
    Only that error skips; any other is raised.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is that error
        if not re.search(r"only supports (the )?N(D)?HWC", str(e)):
            raise
        import pytest

        pytest.skip(
            "this TensorFlow build's CPU convolutions have no channels-first kernel"
        )
