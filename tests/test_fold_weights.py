"""Tests for converters.fold_math: pure NumPy folding math, float64 references."""

import numpy as np
import pytest

from converters.fold_math import bn_scale_shift, fold_weights

RTOL = 1e-5  # float32 folded weights vs a float64 NumPy reference


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _bn_params(rng, c, gamma=True, beta=True):
    return dict(
        mean=rng.normal(size=c),
        variance=rng.uniform(0.2, 3.0, size=c),
        epsilon=1e-3,
        gamma=rng.normal(size=c) if gamma else None,
        beta=rng.normal(size=c) if beta else None,
    )


def _bn(y, p, axis=-1):
    shape = [1] * y.ndim
    shape[axis] = -1
    g = np.ones(len(p["mean"])) if p["gamma"] is None else p["gamma"]
    b = np.zeros(len(p["mean"])) if p["beta"] is None else p["beta"]
    r = lambda v: np.reshape(v, shape)  # noqa: E731
    return r(g) * (y - r(p["mean"])) / np.sqrt(r(p["variance"]) + p["epsilon"]) + r(b)


# float64 NumPy references of the layers (1-D spatial, "valid", stride 1).
def _dense(x, k, b):
    return x @ k + (0 if b is None else b)


def _conv(x, k, b):  # x (T, in), k (K, in, out)
    n = x.shape[0] - k.shape[0] + 1
    y = sum(x[i : i + n] @ k[i] for i in range(k.shape[0]))
    return y + (0 if b is None else b)


def _conv_transpose(x, k, b):  # k (K, out, in)
    y = np.zeros((x.shape[0] + k.shape[0] - 1, k.shape[1]))
    for i in range(k.shape[0]):
        y[i : i + x.shape[0]] += x @ k[i].T
    return y + (0 if b is None else b)


def _depthwise(x, k, b):  # k (K, in, m): output channel c * m + j
    n = x.shape[0] - k.shape[0] + 1
    y = sum(x[i : i + n, :, None] * k[i] for i in range(k.shape[0]))
    y = y.reshape(n, -1)
    return y + (0 if b is None else b)


CASES = {
    "dense": (_dense, lambda r, ci, co: r.normal(size=(ci, co))),
    "conv": (_conv, lambda r, ci, co: r.normal(size=(3, ci, co))),
    "conv_transpose": (_conv_transpose, lambda r, ci, co: r.normal(size=(3, co, ci))),
    "depthwise": (_depthwise, lambda r, ci, co: r.normal(size=(3, ci, co // ci))),
}


@pytest.mark.parametrize("layout", list(CASES))
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("affine", [(True, True), (False, True), (True, False)])
def test_fold_after_matches_reference(rng, layout, use_bias, affine):
    apply, make_kernel = CASES[layout]
    ci, co = 4, 8
    kernel = make_kernel(rng, ci, co).astype("float32")
    bias = rng.normal(size=co).astype("float32") if use_bias else None
    p = _bn_params(rng, co, *affine)
    x = rng.normal(size=(7, ci))
    kernel_copy = kernel.copy()
    k, b = fold_weights(kernel, bias, **p, layout=layout)
    np.testing.assert_array_equal(kernel, kernel_copy)  # input not mutated
    assert k.dtype == np.float32 and b.dtype == np.float32 and b.shape == (co,)
    ref = _bn(apply(x, kernel.astype("float64"), bias), p)
    got = apply(x, k.astype("float64"), b.astype("float64"))
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["dense", "conv"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_before_matches_reference(rng, layout, use_bias):
    apply, make_kernel = CASES[layout]
    kernel = make_kernel(rng, 4, 6).astype("float32")
    bias = rng.normal(size=6).astype("float32") if use_bias else None
    p = _bn_params(rng, 4)
    x = rng.normal(size=(7, 4))
    k, b = fold_weights(kernel, bias, **p, layout=layout, position="before")
    ref = apply(_bn(x, p), kernel.astype("float64"), bias)
    got = apply(x, k.astype("float64"), b.astype("float64"))
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dtype_is_kept(rng, dtype):
    kernel = rng.normal(size=(3, 5)).astype(dtype)
    bias = np.zeros(5, dtype)
    k, b = fold_weights(kernel, bias, **_bn_params(rng, 5))
    assert k.dtype == np.dtype(dtype) and b.dtype == np.dtype(dtype)


def test_scale_shift_values():
    scale, shift = bn_scale_shift([1.0, 0.0], [3.0, 0.0], 1.0, [2.0, 1.0], [0.5, 0.0])
    np.testing.assert_allclose(scale, [1.0, 1.0])
    np.testing.assert_allclose(shift, [-0.5, 0.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layout="dense2"), "layout"),
        (dict(position="middle"), "position"),
        (dict(layout="conv_transpose", position="before"), "exact only for dense"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(variance=np.full(5, -2.0)), "variance"),
        (dict(mean=np.zeros(4), variance=np.ones(4)), "output channels"),
        (dict(gamma=np.ones(3)), "gamma"),
        (dict(bias=np.ones(2)), "bias"),
        (dict(kernel=np.ones(5)), "at least 2 dimensions"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(
        kernel=np.ones((3, 5)), bias=None, mean=np.zeros(5), variance=np.ones(5)
    )
    args.update(epsilon=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fold_weights(**args)
