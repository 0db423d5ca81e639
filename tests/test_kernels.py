"""Tests for `keras_bn._kernels` (the math) and its custom gradient (`_train`)."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from keras_bn import _kernels, _train
from tests import harness as h

EPS = 1e-3
CASES = [
    ((6, 5), -1),
    ((4, 3, 5), -1),
    ((4, 5, 3), 1),
    ((3, 4, 5, 2), 2),
    ((2, 5, 3, 2, 2), 1),
    ((3, 2, 2, 2, 5), 4),
]


def _inputs(rng, shape, axis, masked=False, loc=0.7):
    c = shape[axis]
    x = rng.normal(loc, 2.0, shape).astype("float32")
    dy = rng.normal(0.0, 1.0, shape).astype("float32")
    gamma, beta = h.random_affine(rng, c)
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) > 0.4
        mask.flat[0] = True  # at least one value per channel
    return x, dy, gamma, beta, mask


def _weights(mask):
    return None if mask is None else ops.cast(ops.expand_dims(mask, -1), "float32")


def _stat_cotangents(rng, c):
    return (rng.normal(size=c).astype("float32"), rng.normal(size=c).astype("float32"))


def _ref_full_backward(x, gamma, dy, dmean, dvar, axis, mask):
    """Reference gradient of sum(dy*y) + dmean.mean + dvar.var wrt x."""
    dx, dg, db = h.ref_backward(x, gamma, dy, axis, EPS, mask)
    x64 = np.asarray(x, np.float64)
    w = (
        np.ones_like(x64)
        if mask is None
        else np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
    )
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    mean, _ = h.ref_moments(x64, axis, mask)
    count = w.sum(axis=axes).reshape(shape)
    dx = dx + w / count * np.reshape(dmean, shape)
    dx = dx + 2 * w / count * (x64 - mean.reshape(shape)) * np.reshape(dvar, shape)
    return dx, dg, db


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_matches_reference(rng, shape, axis, masked):
    x, _, gamma, beta, mask = _inputs(rng, shape, axis, masked)
    y, mean, var, res = _kernels.forward(
        ops.convert_to_tensor(x),
        gamma,
        beta,
        _weights(mask),
        axis=axis % len(shape),
        epsilon=EPS,
        count_epsilon=0.0,
    )
    y_ref, mean_ref, var_ref = h.ref_forward(x, gamma, beta, axis, EPS, mask)
    h.assert_close(y, y_ref, what="y")
    h.assert_close(mean, mean_ref, what="mean")
    h.assert_close(var, var_ref, what="var")
    assert tuple(mean.shape) == (shape[axis],) == tuple(var.shape)
    h.assert_close(ops.reshape(res.inv_std, (-1,)), 1 / np.sqrt(var_ref + EPS))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_matches_reference(rng, shape, axis, masked):
    x, dy, gamma, beta, mask = _inputs(rng, shape, axis, masked)
    dmean, dvar = _stat_cotangents(rng, shape[axis])
    ax = axis % len(shape)
    *_, res = _kernels.forward(
        ops.convert_to_tensor(x), gamma, beta, _weights(mask), axis=ax, epsilon=EPS
    )
    for dm, dv in ((None, None), (dmean, dvar)):
        dx, dg, db = _kernels.backward(res, ops.convert_to_tensor(dy), dm, dv, axis=ax)
        ref = _ref_full_backward(
            x, gamma, dy, 0 if dm is None else dm, 0 if dv is None else dv, axis, mask
        )
        h.assert_close(dx, ref[0], what=f"dx dmean={dm is not None}")
        h.assert_close(dg, ref[1], what="dgamma")
        h.assert_close(db, ref[2], what="dbeta")


def _tuple_vjp(fn, args, cot, jit=False):
    """`(fn(*args), grads of sum_i <cot_i, fn(*args)_i> wrt args)`, per backend."""
    if h.backend_name() == "jax":
        import jax

        def run(*a):
            out, pull = jax.vjp(fn, *a)
            return out, pull(tuple(ops.convert_to_tensor(c) for c in cot))

        return (jax.jit(run) if jit else run)(*args)
    if h.backend_name() == "torch":
        return h.torch_tuple_vjp(fn, args, cot, jit)
    import tensorflow as tf

    def run(*a):
        with tf.GradientTape() as tape:
            tape.watch(list(a))
            out = fn(*a)
        return out, tape.gradient(
            list(out), list(a), output_gradients=[tf.constant(c) for c in cot]
        )

    if jit:
        run = tf.function(run, jit_compile=True)
    return run(*(tf.convert_to_tensor(t) for t in args))


def _fused_vjp(x, gamma, beta, weights, cot, axis, jit):
    """Gradients of `<cot, batch_norm_train(...)>` wrt x, gamma, beta."""

    def fn(x, g, b):
        return _train.batch_norm_train(
            x, g, b, weights, axis=axis, epsilon=EPS, fused=False
        )

    return _tuple_vjp(fn, (x, gamma, beta), cot, jit)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,axis", CASES[:4])
def test_fused_gradient_matches_reference(rng, shape, axis, masked, jit):
    x, dy, gamma, beta, mask = _inputs(rng, shape, axis, masked)
    dmean, dvar = _stat_cotangents(rng, shape[axis])
    ax = axis % len(shape)
    (y, mean, var), (dx, dg, db) = _fused_vjp(
        x, gamma, beta, _weights(mask), (dy, dmean, dvar), ax, jit
    )
    y_ref, mean_ref, var_ref = h.ref_forward(x, gamma, beta, axis, EPS, mask)
    h.assert_close(y, y_ref, what="y")
    h.assert_close(mean, mean_ref, what="mean")
    h.assert_close(var, var_ref, what="var")
    ref = _ref_full_backward(x, gamma, dy, dmean, dvar, axis, mask)
    h.assert_close(dx, ref[0], what="dx")
    h.assert_close(dg, ref[1], what="dgamma")
    h.assert_close(db, ref[2], what="dbeta")


@pytest.mark.parametrize("shape,axis", CASES[:4])
def test_fused_gradient_matches_autodiff_of_composite(rng, shape, axis):
    """Analytic backward vs autodiff through plain float32 ops, both ways."""
    x, dy, gamma, beta, _ = _inputs(rng, shape, axis)
    dmean, dvar = _stat_cotangents(rng, shape[axis])
    ax = axis % len(shape)
    red = [i for i in range(len(shape)) if i != ax]
    bshape = [1] * len(shape)
    bshape[ax] = -1

    def composite(x, g, b):
        mean = ops.mean(x, axis=red, keepdims=True)
        var = ops.mean(ops.square(x - mean), axis=red, keepdims=True)
        xhat = (x - mean) * ops.rsqrt(var + EPS)
        y = xhat * ops.reshape(g, bshape) + ops.reshape(b, bshape)
        return y, ops.reshape(mean, (-1,)), ops.reshape(var, (-1,))

    _, auto = _tuple_vjp(composite, (x, gamma, beta), (dy, dmean, dvar))
    _, fused = _fused_vjp(x, gamma, beta, None, (dy, dmean, dvar), ax, False)
    for a, f, name in zip(auto, fused, ("dx", "dgamma", "dbeta"), strict=True):
        h.assert_close(f, h.to_numpy(a), what=name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs(rng, dtype):
    shape, axis = (8, 3, 6), -1
    x32, dy32, gamma, beta, _ = _inputs(rng, shape, axis)
    x = ops.cast(x32, dtype)
    y, mean, var, res = _kernels.forward(x, gamma, beta, None, axis=2, epsilon=EPS)
    assert h.dtype_of(y) == dtype
    assert h.dtype_of(mean) == h.dtype_of(var) == "float32"
    xr = h.to_numpy(x)
    y_ref, mean_ref, var_ref = h.ref_forward(xr, gamma, beta, axis, EPS)
    h.assert_close(y, y_ref, **h.TOL[dtype], what="y")
    # Statistics are float32 sums of exactly representable values.
    h.assert_close(mean, mean_ref, what="mean")
    h.assert_close(var, var_ref, what="var")
    dy = ops.cast(dy32, dtype)
    dx, dg, db = _kernels.backward(res, dy, None, None, axis=2)
    assert h.dtype_of(dx) == dtype
    dx_ref, dg_ref, db_ref = h.ref_backward(xr, gamma, h.to_numpy(dy), axis, EPS)
    h.assert_close(dx, dx_ref, **h.TOL[dtype], what="dx")
    h.assert_close(dg, dg_ref, what="dgamma")
    h.assert_close(db, db_ref, what="dbeta")


@pytest.mark.parametrize(
    "shape,axis", [((512, 8), 1), ((16, 4, 4, 3), 3), ((8, 3, 5, 5), 1)]
)
def test_large_mean_is_exact(rng, shape, axis):
    """Mean 1e4, std 1: the shifted one pass keeps float32 accuracy."""
    x = rng.normal(1e4, 1.0, shape).astype("float32")
    c = shape[axis]
    y, mean, var, _ = _kernels.forward(
        ops.convert_to_tensor(x),
        np.ones(c, "float32"),
        np.zeros(c, "float32"),
        None,
        axis=axis,
        epsilon=EPS,
    )
    y_ref, mean_ref, var_ref = h.ref_forward(x, np.ones(c), np.zeros(c), axis, EPS)
    err = np.max(np.abs(h.to_numpy(y) - y_ref)) / np.max(np.abs(y_ref))
    print(f"large-mean relative error: y {err:.1e}")
    assert err <= 1e-4  # the bound
    assert err <= 1e-5  # what the kernel actually reaches
    h.assert_close(mean, mean_ref, what="mean")
    h.assert_close(var, var_ref, rtol=1e-4, atol_scale=1e-4, what="var")


def test_constant_channel_has_zero_variance(rng):
    x = rng.normal(size=(6, 3)).astype("float32")
    x[:, 1] = 3.25
    gamma, beta = h.random_affine(rng, 3)
    y, mean, var, _ = _kernels.forward(
        ops.convert_to_tensor(x), gamma, beta, None, axis=1, epsilon=EPS
    )
    assert h.to_numpy(var)[1] == 0.0
    assert h.to_numpy(mean)[1] == 3.25
    np.testing.assert_array_equal(h.to_numpy(y)[:, 1], np.float32(beta[1]))


@pytest.mark.parametrize("shape,axis", CASES)
def test_inference_matches_reference(rng, shape, axis):
    x, _, gamma, beta, _ = _inputs(rng, shape, axis)
    c = shape[axis]
    mean = rng.normal(size=c).astype("float32")
    var = rng.uniform(0.3, 3.0, c).astype("float32")
    y = _kernels.inference(
        ops.convert_to_tensor(x),
        mean,
        var,
        gamma,
        beta,
        axis=axis % len(shape),
        epsilon=EPS,
    )
    h.assert_close(y, h.ref_inference(x, mean, var, gamma, beta, axis, EPS))


def test_helpers():
    assert _kernels.reduction_axes(4, 1) == [0, 2, 3]
    assert _kernels.broadcast_shape(4, 1, 7) == [1, 7, 1, 1]
    # Within the sample budget (64 values) the pilot is the mean of every value.
    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    k = h.to_numpy(_kernels.pilot_shift(ops.convert_to_tensor(x), [0, 1]))
    np.testing.assert_allclose(k, x.mean(axis=(0, 1), keepdims=True), rtol=1e-6)
    w = np.ones((2, 3, 1), "float32")
    w[0, 0] = 0.0  # the pilot skips masked values, unless all are masked
    k = _kernels.pilot_shift(ops.convert_to_tensor(x), [0, 1], w)
    keep = w[..., 0] > 0
    np.testing.assert_allclose(h.to_numpy(k)[0, 0], x[keep].mean(0), rtol=1e-6)
    k = _kernels.pilot_shift(ops.convert_to_tensor(x), [0, 1], 0 * w)
    np.testing.assert_allclose(h.to_numpy(k), x.mean((0, 1), keepdims=True))


@pytest.mark.parametrize(
    "shape,axes,samples,expected",
    [
        ((1000, 3), [0], 64, [64]),  # spread along the only reduction axis
        ((8, 3, 100), [0, 2], 64, [None, 8]),  # all 8 examples, 8 positions each
        ((100, 3, 50), [0, 2], 64, [63, 1]),  # two of 64 fell together
        ((4, 3), [0], 64, []),  # the whole batch
        ((0, 3), [0], 64, []),  # an empty batch (a replica without examples)
    ],
)
def test_sample_plan(shape, axes, samples, expected):
    x = ops.zeros(shape)
    plan = dict(_kernels.sample_plan(x, axes, samples))
    got = [len(h.to_numpy(plan[a])) if a in plan else None for a in axes]
    assert got == (expected or [None] * len(axes))
    for a, positions in plan.items():
        p = h.to_numpy(positions)
        assert (p >= 0).all() and (p < shape[a]).all()
        assert len(set(p)) == len(p)  # spread: no position twice


def test_pilot_of_a_spread_sample_resists_one_outlier(rng):
    """One value 1e4 standard deviations out moves the pilot by 1e4 / 64 at most.

    The earlier pilot, the first row, took the first value as it was.
    """
    x = rng.normal(0.0, 1.0, (4096, 2)).astype("float32")
    x[0] = 1e4
    k = h.to_numpy(_kernels.pilot_shift(ops.convert_to_tensor(x), [0]))
    assert (np.abs(k) < 1.0).all()  # the first value is not in the sample
    plan = dict(_kernels.sample_plan(ops.convert_to_tensor(x), [0]))
    x[h.to_numpy(plan[0]).astype(int)[0]] = 1e4
    k = h.to_numpy(_kernels.pilot_shift(ops.convert_to_tensor(x), [0]))
    np.testing.assert_allclose(k, 1e4 / 64, atol=1.0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "case", ["sampled_outliers", "masked_sample", "structured_batch"]
)
def test_guard_recomputes_around_the_mean(rng, case, jit):
    """Pilots far from the mean cost a second pass, not accuracy.

    Each case puts the pilot `sqrt(m / PILOT_SAMPLES)` = 32 or more standard
    deviations from the mean in one channel: outliers at exactly the sampled
    positions, a mask that hides every sampled value (the pilot falls back
    to the hidden values), and a batch whose sampled rows sit apart from the
    rest. With the guard off the same inputs lose 1e-5 of the variance or
    more (checked, so that the test can fail).
    """
    m = 2**16
    x = rng.normal(0.0, 1.0, (m, 3)).astype("float32")
    mask = None
    plan = dict(_kernels.sample_plan(ops.convert_to_tensor(x), [0]))
    sampled = h.to_numpy(plan[0]).astype(int)
    if case == "sampled_outliers":
        x[sampled, 1] = 1e3
    elif case == "masked_sample":
        x[sampled, 1] = 1e5
        mask = np.ones((m,), bool)
        mask[sampled] = False
    else:
        x[:, 2] += 1e3
        x[sampled, 2] = -1e4
    gamma, beta = np.ones(3, "float32"), np.zeros(3, "float32")
    y_ref, mean_ref, var_ref = h.ref_forward(x, gamma, beta, -1, EPS, mask)
    w = _weights(mask)

    def run(guard):
        def fn(x):
            return _kernels.forward(
                x, gamma, beta, w, axis=1, epsilon=EPS, guard=guard
            )[:3]

        if jit and h.backend_name() == "jax":
            import jax

            return jax.jit(fn)(x)
        if jit and h.backend_name() == "torch":
            return h.torch_compile(fn)(ops.convert_to_tensor(x))
        if jit:
            import tensorflow as tf

            return tf.function(fn, jit_compile=True)(tf.constant(x))
        return fn(ops.convert_to_tensor(x))

    y, mean, var = run(None)
    h.assert_close(y, y_ref, rtol=1e-6, atol_scale=1e-6, what="y")
    # The mean to 1e-6 of the channel's scale (test_shift_property's measure).
    scale = np.abs(mean_ref) + np.sqrt(var_ref)
    assert (np.abs(h.to_numpy(mean) - mean_ref) <= 1e-6 * scale).all()
    h.assert_close(var, var_ref, rtol=1e-6, atol_scale=0.0, what="var")
    _, _, var_off = run(float("inf"))
    assert (np.abs(h.to_numpy(var_off) - var_ref) / var_ref).max() > 1e-5


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "loc,scale",
    [(0, 1e18), (0, 1e19), (3e19, 1e19), (0, 1e30), (-2e30, 1e30), (0, 1e36)],
)
def test_extreme_magnitudes(rng, loc, scale, masked, jit):
    """Squares of these overflow float32: y and the gradients stay exact.

    Tolerances as elsewhere (float64 reference, `rtol=1e-5`, floor
    `1e-6 * max|ref|`, for dx at least float32's smallest normal number); the
    variance is inf where it exceeds float32's range.
    """
    shape, axis = (16, 3, 4), 2
    x = rng.normal(size=shape) * scale + loc
    x = x.astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    gamma, beta = h.random_affine(rng, 4)
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) > 0.3
        x[~mask] = np.float32(3e38)  # masked: must not matter
    w = _weights(mask)

    def fn(x, g, b):
        return _train.batch_norm_train(x, g, b, w, axis=axis, epsilon=EPS, fused=False)

    (y, mean, var), grads = _tuple_vjp(
        fn, (x, gamma, beta), (dy, np.zeros(4, "float32"), np.zeros(4, "float32")), jit
    )
    y_ref, mean_ref, var_ref = h.ref_forward(x, gamma, beta, axis, EPS, mask)
    h.assert_close(y, y_ref, what="y")
    h.assert_close(mean, mean_ref, what="mean")
    big = var_ref > np.finfo(np.float32).max
    v = h.to_numpy(var)
    assert np.isposinf(v[big]).all()
    if (~big).any():
        h.assert_close(v[~big], var_ref[~big], rtol=1e-4, atol_scale=0.0, what="var")
    dx_ref, dg_ref, db_ref = h.ref_backward(x, gamma, dy, axis, EPS, mask)
    # dx is about 1 / scale: at 1e36 some of it lies below float32's smallest
    # normal number, which TensorFlow and XLA flush to zero on the CPU. The
    # absolute floor is therefore at least that number (1.2e-38).
    tiny = float(np.finfo(np.float32).tiny)
    atol = max(1e-6 * float(np.abs(dx_ref).max()), tiny)
    np.testing.assert_allclose(h.to_numpy(grads[0]), dx_ref, rtol=1e-5, atol=atol)
    h.assert_close(grads[1], dg_ref, what="dgamma")
    h.assert_close(grads[2], db_ref, what="dbeta")
