"""The layer across input dtypes and layer dtypes, against Keras's layer.

Keras's `BatchNormalization` is the reference: it normalizes in
`result_type(input, float32)` (float32 for integers, float16 and bfloat16;
float64 for float64) and casts the output to the layer's compute dtype. Each
case runs a training step of `keras_bn.BatchNormalization` and of Keras's
layer with the same weights and compares the output (value and dtype), the
gradients and the moving statistics; the output is also checked against the
float64 NumPy reference (`harness.ref_forward`), so that a case where both
layers were wrong would fail too.

The grid:

* eager training steps (`test_training_step`): the full product of the input
  dtypes (int8, int32, uint8, float16, bfloat16, float32, float64), the layer
  dtypes (float32, mixed_float16, the pure low-precision bfloat16 and float16,
  float64) and XLA on/off (`tf.function(jit_compile=True)` / `jax.jit`
  / on torch `torch.compile` (Dynamo and AOTAutograd, `harness.torch_compile`)
  against eager): 70 cases, each a single call, so no sampling is needed
  on TensorFlow and JAX. On torch, Dynamo traces every compiled case anew,
  2-5 s for keras_bn's layer and about 12 s for Keras's (with its graph
  breaks) on 2 cores, 10 minutes for the grid: there the compiled grid is
  `TORCH_COMPILED` (every layer dtype with an integer input and a float
  one, every input dtype; an integer input is normalized in float32, any
  float input in the compute dtype), against Keras's layer run eagerly:
  compiled so (without Inductor) it computes bit for bit what it computes
  eagerly in each of these cases, so compiling it would only add tracing.
* `model.fit` (`test_fit`): 12 cases (`FIT_CASES`): every layer dtype with
  an unknown batch size without XLA and a known one with XLA, plus an
  unknown one with XLA for float32 and bfloat16, each with one input dtype,
  chosen so that every input dtype appears. A `fit` compiles a step per case
  (5-20 s each on a loaded 2-core machine), so the product with all 7 input
  dtypes and both XLA settings (140 fits, two models each) would take many
  minutes per backend, while the input dtype only changes the cast in front
  of the layer, which the eager grid covers in full. On
  TensorFlow an unknown batch size is a `tf.data` dataset batched without
  `drop_remainder`, with a partial last batch (the step's batch dimension is
  `None`: the layer's run-time `cond`); on JAX and torch shapes are always
  known when tracing, and "unknown" is the partial last batch, traced on its
  own (on torch, `fit` without `jit_compile` runs the step eagerly; with it,
  Inductor compiles it for minutes: those cases need
  KERAS_BN_TORCH_INDUCTOR=1).

Tolerances: those of `harness.TOL` for the coarser of the two dtypes compared
(float32: `rtol=1e-5`; float16: `2e-3`, four units in the last place;
bfloat16: `1.6e-2`), and `rtol=1e-12` for float64 on TensorFlow and torch
(against Keras's layer only where it computes in float64 too: on TensorFlow;
on torch Keras normalizes a float64 layer in float32, so there keras_bn's
float64 gradients are checked against the float64 reference). On JAX,
float64 exists only with `jax_enable_x64`, off by default: a float64 layer
then stores and computes in float32, as Keras's own layer does, and is
compared at float32 tolerances (`test_float64_jacobian` checks JAX with x64
in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_bn
from tests import harness as h

pytestmark = [
    # JAX without x64: a float64 layer is float32 (module docstring).
    pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64"),
]

INPUTS = ["int8", "int32", "uint8", "float16", "bfloat16", "float32", "float64"]
LAYERS = ["float32", "mixed_float16", "bfloat16", "float16", "float64"]
CHANNELS = 3
EPS = 1e-3
BACKEND = keras.backend.backend()


def _x64() -> bool:
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def _coarsest(*dtypes) -> str:
    """The least precise of the float dtypes (float32 for integers)."""
    order = ["float64", "float32", "float16", "bfloat16"]
    names = [keras.backend.standardize_dtype(d) for d in dtypes]
    names = [n if n in order else "float32" for n in names]
    if not _x64():
        names = ["float32" if n == "float64" else n for n in names]
    return max(names, key=order.index)


def _tol(*dtypes) -> dict:
    d = _coarsest(*dtypes)
    return dict(rtol=1e-12, atol_scale=1e-12) if d == "float64" else h.TOL[d]


def _keras_tol(*dtypes) -> dict:
    """`_tol` for a comparison with Keras's layer, which normalizes in
    `keras.backend.result_type(dtype, "float32")`: float32 for a float64
    layer wherever Keras maps float64 to float32 (off TensorFlow), where
    keras_bn's float64 layer keeps float64 (checked against the float64
    reference instead)."""
    keras_dtypes = [keras.backend.result_type(d, "float32") for d in dtypes]
    return _tol(*dtypes, *keras_dtypes)


def _computed_in(input_dtype, compute_dtype) -> str:
    return "float32" if input_dtype.startswith(("int", "uint")) else compute_dtype


def _np64(x) -> np.ndarray:
    """A tensor, variable or array as float64 NumPy (no float32 detour)."""
    if hasattr(x, "value") and not isinstance(x, np.ndarray):
        x = x.value
    if keras.backend.standardize_dtype(x.dtype) in ("bfloat16", "float16"):
        x = ops.cast(x, "float32")
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def _close(actual, ref, tol, what):
    h.assert_close(_np64(actual), np.asarray(ref, np.float64), what=what, **tol)


def _values(rng, dtype, shape):
    """Values exact in every input dtype: integers 0..40, or quarters 0..40."""
    k = rng.integers(0, 41, shape)
    if dtype.startswith(("int", "uint")):
        return k.astype(dtype)
    return ops.cast(k.astype("float32") / 4.0, dtype)


def _pair(layer_dtype, rng, shape):
    """keras_bn's layer and Keras's, built, with the same non-trivial weights."""
    ours = keras_bn.BatchNormalization(dtype=layer_dtype, momentum=0.5, epsilon=EPS)
    ref = keras.layers.BatchNormalization(dtype=layer_dtype, momentum=0.5, epsilon=EPS)
    ours.build(shape)
    ref.build(shape)
    h.set_bn_weights(ours, rng)
    ref.set_weights(ours.get_weights())
    return ours, ref


def _step(layer, x, dy, xla):
    """One training call with its gradients: `(y, dx or None, [dgamma, dbeta])`.

    The gradient with respect to an integer input is None (it has none).
    """
    wrt_x = keras.backend.is_float_dtype(x.dtype)
    if BACKEND == "jax":
        import jax

        ntv = [v.value for v in layer.non_trainable_variables]

        def step(x, tv, dy):
            def f(tv, x):
                return layer.stateless_call(tv, ntv, x, training=True)

            if wrt_x:
                y, pullback, new = jax.vjp(lambda x, tv: f(tv, x), x, tv, has_aux=True)
                dx, dtv = pullback(dy.astype(y.dtype))
            else:
                y, pullback, new = jax.vjp(lambda tv: f(tv, x), tv, has_aux=True)
                (dtv,), dx = pullback(dy.astype(y.dtype)), None
            return y, dx, dtv, new

        if xla:
            step = jax.jit(step)
        tv = [v.value for v in layer.trainable_variables]
        y, dx, dtv, new = step(x, tv, ops.convert_to_tensor(dy))
        for v, value in zip(layer.non_trainable_variables, new, strict=True):
            v.assign(value)
        return y, dx, list(dtv)
    if BACKEND == "torch":
        import torch

        tv = [v.value for v in layer.trainable_variables]
        x = ops.convert_to_tensor(x).detach().requires_grad_(wrt_x)

        def forward(x):
            return layer(x, training=True)

        y = (h.torch_compile(forward) if xla else forward)(x)
        sources = ([x] if wrt_x else []) + tv
        grads = torch.autograd.grad(
            y, sources, grad_outputs=h.backend_cast(dy, y.dtype)
        )
        return y.detach(), (grads[0] if wrt_x else None), list(grads[int(wrt_x) :])
    import tensorflow as tf

    def step(x, dy):
        with tf.GradientTape() as tape:
            if wrt_x:
                tape.watch(x)
            y = layer(x, training=True)
        sources = ([x] if wrt_x else []) + list(layer.trainable_variables)
        grads = tape.gradient(y, sources, output_gradients=tf.cast(dy, y.dtype))
        return y, (grads[0] if wrt_x else None), grads[int(wrt_x) :]

    if xla:
        step = tf.function(step, jit_compile=True)
    return step(tf.convert_to_tensor(x), tf.convert_to_tensor(dy))


# The compiled (input dtype, layer dtype) cases on torch (module docstring).
TORCH_COMPILED = {
    ("int8", "float32"),
    ("float32", "float32"),
    ("bfloat16", "float32"),
    ("int32", "mixed_float16"),
    ("float32", "mixed_float16"),
    ("uint8", "bfloat16"),
    ("float16", "bfloat16"),
    ("int8", "float16"),
    ("float64", "float16"),
    ("int32", "float64"),
    ("float64", "float64"),
}


@pytest.mark.parametrize("xla", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("layer_dtype", LAYERS)
@pytest.mark.parametrize("input_dtype", INPUTS)
def test_training_step(rng, input_dtype, layer_dtype, xla):
    torch_compiled = xla and BACKEND == "torch"
    if torch_compiled and (input_dtype, layer_dtype) not in TORCH_COMPILED:
        pytest.skip(
            "torch.compile traces each case for seconds on 2 cores: on torch the "
            "compiled grid is TORCH_COMPILED (every layer and input dtype)"
        )
    shape = (16, 4, CHANNELS)
    ours, ref = _pair(layer_dtype, rng, shape)
    x = _values(rng, input_dtype, shape)
    dy = rng.normal(size=shape).astype("float32")
    old = [_np64(v) for v in (ours.moving_mean, ours.moving_variance)]
    y, dx, dw = _step(ours, x, dy, xla)
    # On torch Keras's layer runs eagerly: compiled, it gives the same bits
    # (module docstring).
    y_ref, dx_ref, dw_ref = _step(ref, x, dy, xla and not torch_compiled)

    # Integers are normalized in float32 whatever the layer's dtype (Keras:
    # `result_type(int, float32)`); floats are autocast to the compute dtype.
    compute = _computed_in(input_dtype, ours.compute_dtype)
    assert ops.dtype(y) == ops.dtype(y_ref), (ops.dtype(y), ops.dtype(y_ref))
    dtypes = (compute, ours.compute_dtype, ours.variable_dtype)
    tol, ktol = _tol(*dtypes), _keras_tol(*dtypes)
    _close(y, _np64(y_ref), ktol, "y vs Keras")
    gamma, beta = (_np64(v) for v in (ref.gamma, ref.beta))
    y64, mean64, var64 = h.ref_forward(_np64(x), gamma, beta, -1, EPS)
    _close(y, y64, tol, "y vs float64")
    # Gradients: gamma and beta always get one, as in Keras (also from
    # integer inputs); the input's only where it is a float.
    assert (dx is None) == (dx_ref is None)
    if dx is not None:
        assert ops.dtype(dx) == ops.dtype(dx_ref)
        _close(dx, _np64(dx_ref), _keras_tol(compute, input_dtype), "dx vs Keras")
    for name, g, g_ref in zip(("dgamma", "dbeta"), dw, dw_ref, strict=True):
        assert g is not None, name
        _close(g, _np64(g_ref), ktol, f"{name} vs Keras")
    if _coarsest(*dtypes) == "float64":  # float64 gradients, whatever Keras's
        grads64 = h.ref_backward(_np64(x), gamma, dy, -1, EPS)
        if dx is not None:  # in the input's dtype
            _close(dx, grads64[0], _tol(compute, input_dtype), "dx vs float64")
        for name, g, g64 in zip(("dgamma", "dbeta"), dw, grads64[1:], strict=True):
            _close(g, g64, tol, f"{name} vs float64")
    for v, v_ref in zip(
        ours.non_trainable_variables, ref.non_trainable_variables, strict=True
    ):
        assert v.dtype == v_ref.dtype
        _close(v, _np64(v_ref), ktol, f"{v.path} vs Keras")
    for v, stat, prev in zip(
        (ours.moving_mean, ours.moving_variance), (mean64, var64), old, strict=True
    ):
        _close(v, 0.5 * prev + 0.5 * stat, tol, v.path)


# Per layer dtype: an unknown batch size without XLA (on TensorFlow the fused
# op under the run-time `cond`) and a known one with XLA; an unknown one with
# XLA (a dynamic dimension inside XLA) for float32 and bfloat16. Every input
# dtype appears (module docstring).
FIT_CASES = [
    ("int8", "float32", "unknown", False),
    ("float32", "float32", "known", True),
    ("uint8", "float32", "unknown", True),
    ("float16", "mixed_float16", "unknown", False),
    ("int32", "mixed_float16", "known", True),
    ("bfloat16", "bfloat16", "unknown", False),
    ("float32", "bfloat16", "known", True),
    ("int8", "bfloat16", "unknown", True),
    ("float16", "float16", "unknown", False),
    ("uint8", "float16", "known", True),
    ("float64", "float64", "unknown", False),
    ("bfloat16", "float64", "known", True),
]


def _fit_data(rng, input_dtype, batch):
    n = 64 if batch == "known" else 72  # batches of 16: a last batch of 8
    x = np.asarray(ops.convert_to_numpy(_values(rng, input_dtype, (n, CHANNELS))))
    y = rng.normal(size=(n, CHANNELS)).astype("float32")
    if BACKEND != "tensorflow":
        return dict(x=x, y=y, batch_size=16)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.batch(16, drop_remainder=batch == "known")
    dim = ds.element_spec[0].shape[0]
    assert (dim is None) == (batch == "unknown")
    return dict(x=ds)


@pytest.mark.parametrize("input_dtype,layer_dtype,batch,xla", FIT_CASES)
def test_fit(rng, input_dtype, layer_dtype, batch, xla):
    h.skip_inductor_fit(xla)
    models = []
    for cls in (keras_bn.BatchNormalization, keras.layers.BatchNormalization):
        model = keras.Sequential(
            [
                keras.Input((CHANNELS,), dtype=input_dtype),
                cls(dtype=layer_dtype, momentum=0.5, epsilon=EPS),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=xla)
        models.append(model)
    ours, ref = models
    h.set_bn_weights(ours.layers[0], rng)
    ref.set_weights(ours.get_weights())
    data = _fit_data(rng, input_dtype, batch)
    for model in models:
        model.fit(**data, epochs=1, shuffle=False, verbose=0)
    layer = ours.layers[0]
    computed = _computed_in(input_dtype, layer.compute_dtype)
    tol = _keras_tol(computed, layer.compute_dtype, layer.variable_dtype)
    for v, v_ref in zip(ours.weights, ref.weights, strict=True):
        assert v.dtype == v_ref.dtype
        _close(v, _np64(v_ref), tol, v.path)
    # The moving statistics moved (the steps did train).
    assert not np.allclose(_np64(layer.moving_variance), 1.0)


def test_integer_inputs_train_in_float32(rng):
    """int32 0..40 normalizes to about [-1.7, 1.7], uint8 does not wrap."""
    for dtype in ("int32", "uint8", "int8"):
        x = np.arange(40).reshape(10, 4).astype(dtype)
        layer = keras_bn.BatchNormalization()
        layer.build(x.shape)
        y, _, (dgamma, dbeta) = _step(layer, x, np.ones((10, 4), "float32"), False)
        assert ops.dtype(y) == "float32"
        y64, _, _ = h.ref_forward(x, np.ones(4), np.zeros(4), -1, layer.epsilon)
        _close(y, y64, h.TOL["float32"], dtype)
        assert dgamma is not None and dbeta is not None
        _close(dbeta, np.full(4, 10.0), h.TOL["float32"], "dbeta")


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_pure_low_precision_fit_on_dataset(rng, float32_policy, clear_warned, policy):
    """A global non-mixed policy, a partial last batch of one: no TypeError."""
    keras.mixed_precision.set_dtype_policy(policy)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            keras_bn.BatchNormalization(name="bn"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = rng.normal(size=(65, 6)).astype("float32")
    y = rng.normal(size=(65, 1)).astype("float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        data = dict(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    else:
        data = dict(x=x, y=y, batch_size=32)

    def train():
        model.fit(**data, epochs=2, verbose=0)

    if BACKEND == "torch":
        # torch's `fit` without `jit_compile` calls the layers eagerly, and an
        # eager batch of one raises (documented); `jit_compile=True` compiles
        # with Inductor (minutes). The full batches train eagerly, then the
        # batch of one runs as the compiled step traces it (`run_layer`'s
        # Dynamo and AOTAutograd, without Inductor).
        with pytest.raises(ValueError, match="single value per channel"):
            train()

        def train():
            out = h.run_layer(model, x[64:], y[64:], jit=True)
            assert np.all(np.isfinite(_np64(out["y"])))
            assert all(np.all(np.isfinite(_np64(g))) for g in out["dweights"])

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train()
    assert model.layers[1].compute_dtype == policy
    for v in model.weights:
        assert np.all(np.isfinite(_np64(v))), v.path
    single = [r for r in rec if "single value" in str(r.message)]
    assert len(single) == 1, [str(r.message) for r in rec]
    assert "layer 'bn'" in str(single[0].message)


_JACOBIAN = """
import numpy as np, keras, keras_bn
from keras import ops
rng = np.random.default_rng(0)
x = rng.normal(3.0, 2.0, size=(8, 3))
layer = keras_bn.BatchNormalization(dtype="float64", momentum=0.5)
layer.build(x.shape)
def y(x):
    out = layer.stateless_call(
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        ops.convert_to_tensor(x, "float64"), training=True)
    return np.asarray(ops.convert_to_numpy(out[0])), out[1]
y0, new = y(x)
assert y0.dtype == np.float64, y0.dtype
assert all(ops.dtype(v) == "float64" for v in new)
x1 = x.copy()
x1[0, 0] += 1e-6
fd = (y(x1)[0] - y0)[:, 0] / 1e-6
# d y[i, 0] / d x[0, 0] = (delta_i0 - 1/n - xhat_i xhat_0 / n) / sqrt(var + eps)
n, xc = 8, x[:, 0] - x[:, 0].mean()
var = (xc ** 2).mean()
xhat = xc / np.sqrt(var + 1e-3)
exact = ((np.arange(n) == 0) - 1 / n - xhat * xhat[0] / n) / np.sqrt(var + 1e-3)
np.testing.assert_allclose(fd, exact, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(
    np.asarray(ops.convert_to_numpy(new[0])), 0.5 * x.mean(0), rtol=1e-14)
print("ok")
"""


def test_float64_jacobian(rng):
    """A float64 layer trains at float64 precision: 1e-6 finite differences.

    In float32 the step is below the input's resolution (3.0 * 2**-24 ~
    1.8e-7 absolute, 18% of 1e-6) and the difference quotient is noise. On
    JAX it runs in a subprocess with `JAX_ENABLE_X64=1`.
    """
    if BACKEND == "jax":
        env = {**os.environ, "JAX_ENABLE_X64": "1", "KERAS_BACKEND": "jax"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_JACOBIAN)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
        return
    exec(textwrap.dedent(_JACOBIAN), {})


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="Keras's layer normalizes float64 in float64 on TensorFlow only (its "
    "result_type maps float64 to float32 on JAX and torch)",
)
@pytest.mark.parametrize("xla", [False, True])
def test_float64_matches_keras_to_1e12(rng, xla):
    shape = (32, 5)
    ours, ref = _pair("float64", rng, shape)
    x = rng.normal(1e3, 1.0, shape)
    dy = rng.normal(size=shape)
    y, dx, dw = _step(ours, x, dy, xla)
    y_ref, dx_ref, dw_ref = _step(ref, x, dy, xla)
    tol = dict(rtol=1e-10, atol_scale=1e-12)
    pairs = [(y, y_ref, "y"), (dx, dx_ref, "dx")]
    pairs += [(dw[0], dw_ref[0], "dgamma"), (dw[1], dw_ref[1], "dbeta")]
    for a, b, what in pairs:
        assert ops.dtype(a) == "float64", what
        _close(a, _np64(b), tol, what)
    _close(ours.moving_variance, _np64(ref.moving_variance), tol, "var")
