"""Tests for `keras_bn.BatchNormalization` (TensorFlow, JAX and torch backends)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_bn
from tests import harness as h

# torch's `fit` without `jit_compile` calls the layers eagerly (no tracing), so
# a training batch with a single value per channel raises there, as it does
# with `run_eagerly=True` on the other backends.
EAGER_FIT = keras.backend.backend() == "torch"

EPS = 1e-3
# Constructor arguments keras_bn adds to Keras's, with their neutral defaults.
EXTENSION_DEFAULTS = {"virtual_batch_size": None, "unbiased_variance": False}


def _shape(rank: int, axis: int, channels: int = 5) -> tuple[int, ...]:
    dims = [4, 3, 2, 3][: rank - 1]  # batch 4, small spatial dims
    dims.insert(axis % rank, channels)
    return tuple(dims)


def _axis_cases():
    """(rank, axis): channels-last, channels-first and a middle axis."""
    cases = []
    for rank in (2, 3, 4, 5):
        axes = {-1: -1, 1: 1 % rank}
        if rank >= 4:
            axes[2] = 2
        seen = set()
        for axis in (-1, 1, 2):
            if axis in axes and axes[axis] % rank not in seen:
                seen.add(axes[axis] % rank)
                cases.append((rank, axis))
    return cases


AXIS_CASES = _axis_cases()


def _layer(shape, rng, **kwargs):
    layer = keras_bn.BatchNormalization(**kwargs)
    layer.build(shape)
    h.set_bn_weights(layer, rng)
    return layer


def _data(rng, shape, loc=0.5, dtype="float32"):
    x = rng.normal(loc, 1.5, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    return x, dy


# -- forward/backward vs the float64 reference -------------------------------------


# Every (rank, axis) with gamma and beta; center/scale off on a subset of them.
AFFINE_CASES = [(r, a, True, True) for r, a in AXIS_CASES] + [
    (r, a, c, s)
    for r, a in AXIS_CASES
    if r in (2, 4)
    for c, s in ((False, True), (True, False), (False, False))
]


@pytest.mark.parametrize("rank,axis,center,scale", AFFINE_CASES)
def test_training_matches_float64_reference(rng, rank, axis, center, scale):
    shape = _shape(rank, axis)
    layer = _layer(
        shape, rng, axis=axis, center=center, scale=scale, momentum=0.9, epsilon=EPS
    )
    old_mean = h.to_numpy(layer.moving_mean)
    old_var = h.to_numpy(layer.moving_variance)
    gamma, beta = h.affine_of(layer)
    x, dy = _data(rng, shape)
    out = h.run_layer(layer, x, dy)
    y_ref, mean, var = h.ref_forward(x, gamma, beta, axis, EPS)
    dx_ref, dgamma_ref, dbeta_ref = h.ref_backward(x, gamma, dy, axis, EPS)
    h.assert_close(out["y"], y_ref, what="y")
    h.assert_close(out["dx"], dx_ref, what="dx")
    grads = list(out["dweights"])
    if scale:
        h.assert_close(grads.pop(0), dgamma_ref, what="dgamma")
    if center:
        h.assert_close(grads.pop(0), dbeta_ref, what="dbeta")
    assert grads == []
    h.assert_close(layer.moving_mean, 0.9 * old_mean + 0.1 * mean, what="mean")
    h.assert_close(layer.moving_variance, 0.9 * old_var + 0.1 * var, what="var")
    assert h.dtype_of(out["y"]) == "float32"


@pytest.mark.parametrize("rank,axis", AXIS_CASES)
def test_inference_matches_float64_reference(rng, rank, axis):
    shape = _shape(rank, axis)
    layer = _layer(shape, rng, axis=axis, epsilon=EPS)
    before = [w.copy() for w in layer.get_weights()]
    gamma, beta = h.affine_of(layer)
    x, _ = _data(rng, shape)
    y = layer(x, training=False)
    ref = h.ref_inference(
        x,
        h.to_numpy(layer.moving_mean),
        h.to_numpy(layer.moving_variance),
        gamma,
        beta,
        axis,
        EPS,
    )
    h.assert_close(y, ref)
    for a, b in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rank,axis", [(2, -1), (4, -1), (4, 1), (5, 2)])
def test_gradients_match_autodiff_of_composite(rng, rank, axis):
    """The analytic backward equals autodiff through plain-op BN (float32)."""
    shape = _shape(rank, axis)
    layer = _layer(shape, rng, axis=axis, epsilon=EPS)
    x, dy = _data(rng, shape)
    beta = ops.convert_to_tensor(np.asarray(h.to_numpy(layer.beta), "float32"))
    gamma = ops.convert_to_tensor(np.asarray(h.to_numpy(layer.gamma), "float32"))
    red = [i for i in range(rank) if i != axis % rank]
    bshape = [1] * rank
    bshape[axis % rank] = -1

    def composite(x, g, b):
        mean = ops.mean(x, axis=red, keepdims=True)
        var = ops.mean(ops.square(x - mean), axis=red, keepdims=True)
        xhat = (x - mean) / ops.sqrt(var + EPS)
        return xhat * ops.reshape(g, bshape) + ops.reshape(b, bshape)

    _, (dx_ad, dg_ad, db_ad) = h.vjp(
        composite, [ops.convert_to_tensor(x), gamma, beta], dy
    )
    out = h.run_layer(layer, x, dy)
    h.assert_close(out["dx"], h.to_numpy(dx_ad), what="dx")
    h.assert_close(out["dweights"][0], h.to_numpy(dg_ad), what="dgamma")
    h.assert_close(out["dweights"][1], h.to_numpy(db_ad), what="dbeta")


# -- mixed precision ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mixed_policy", ["mixed_float16", "mixed_bfloat16"], indirect=True
)
@pytest.mark.parametrize("rank,axis", [(2, -1), (4, -1), (4, 1)])
def test_mixed_precision(rng, mixed_policy, rank, axis):
    compute = "float16" if mixed_policy == "mixed_float16" else "bfloat16"
    tol = h.TOL[compute]
    shape = _shape(rank, axis)
    layer = _layer(shape, rng, axis=axis, momentum=0.0, epsilon=EPS)
    assert layer.compute_dtype == compute
    for v in layer.weights:
        assert v.dtype == "float32", v.path
    gamma, beta = h.affine_of(layer)
    x32, dy32 = _data(rng, shape)
    x = h.to_numpy(ops.cast(x32, compute))  # the values the layer really sees
    dy = h.to_numpy(ops.cast(dy32, compute))
    out = h.run_layer(layer, ops.cast(x32, compute), ops.cast(dy32, compute))
    assert h.dtype_of(out["y"]) == compute
    assert h.dtype_of(out["dx"]) == compute
    y_ref, mean, var = h.ref_forward(x, gamma, beta, axis, EPS)
    dx_ref, dgamma_ref, dbeta_ref = h.ref_backward(x, gamma, dy, axis, EPS)
    h.assert_close(out["y"], y_ref, **tol, what="y")
    h.assert_close(out["dx"], dx_ref, **tol, what="dx")
    # Weight gradients are float32 sums of float32 products of exact inputs.
    h.assert_close(out["dweights"][0], dgamma_ref, rtol=1e-5, atol_scale=1e-5)
    h.assert_close(out["dweights"][1], dbeta_ref, rtol=1e-5, atol_scale=1e-5)
    # momentum=0: the moving statistics are the batch statistics, in float32,
    # computed in float32 from the low-precision input.
    assert layer.moving_mean.dtype == "float32"
    assert layer.moving_variance.dtype == "float32"
    h.assert_close(layer.moving_mean, mean, rtol=1e-5, atol_scale=1e-6, what="mean")
    h.assert_close(layer.moving_variance, var, rtol=1e-5, atol_scale=1e-6, what="var")


# -- equivalence with keras.layers.BatchNormalization -----------------------------


def _pair(shape, rng, **kwargs):
    ours = keras_bn.BatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    h.set_bn_weights(theirs, rng)
    if kwargs.get("renorm"):
        c = shape[kwargs.get("axis", -1)]
        theirs.renorm_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
        theirs.renorm_stddev.assign(rng.uniform(0.5, 2, c).astype("float32"))
        theirs.moving_stddev.assign(rng.uniform(0.5, 2, c).astype("float32"))
    ours.set_weights(theirs.get_weights())
    return ours, theirs


KERAS_CASES = [
    dict(),
    dict(axis=1, center=False),
    dict(axis=2, scale=False, momentum=0.5),
    dict(
        renorm=True,
        renorm_clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.3},
        renorm_momentum=0.7,
        momentum=0.8,
    ),
    dict(renorm=True, renorm_momentum=0.5),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kwargs", KERAS_CASES, ids=lambda k: str(sorted(k)))
def test_matches_keras_layer(rng, kwargs, masked):
    shape = (6, 4, 5)
    ours, theirs = _pair(shape, rng, epsilon=EPS, **kwargs)
    for step in range(4):
        x, dy = _data(rng, shape)
        mask = None
        if masked:
            mask = rng.random(shape[:-1]) > 0.3
            mask[0, 0] = True
        a = h.run_layer(ours, x, dy, mask=mask)
        b = h.run_layer(theirs, x, dy, mask=mask)
        for key in ("y", "dx"):
            h.assert_close(a[key], h.to_numpy(b[key]), what=f"{key} step {step}")
        for ga, gb in zip(a["dweights"], b["dweights"], strict=True):
            h.assert_close(ga, h.to_numpy(gb), what=f"dweights step {step}")
    for va, vb in zip(ours.weights, theirs.weights, strict=True):
        assert va.path.split("/")[-1] == vb.path.split("/")[-1]
        h.assert_close(va, h.to_numpy(vb), what=va.path)
    x, _ = _data(rng, shape)
    h.assert_close(
        ours(x, training=False), h.to_numpy(theirs(x, training=False)), what="inference"
    )


@pytest.mark.parametrize(
    "mixed_policy", ["mixed_float16", "mixed_bfloat16"], indirect=True
)
@pytest.mark.parametrize("kwargs", [dict(), dict(renorm=True, axis=1)], ids=str)
def test_matches_keras_layer_mixed_precision(rng, mixed_policy, kwargs):
    """Both compute in float32 and round once to the compute dtype."""
    compute = keras.mixed_precision.dtype_policy().compute_dtype
    shape = (6, 4, 5)
    ours, theirs = _pair(shape, rng, epsilon=EPS, momentum=0.5, **kwargs)
    for _step in range(2):
        x, dy = _data(rng, shape)
        x, dy = ops.cast(x, compute), ops.cast(dy, compute)
        a = h.run_layer(ours, x, dy)
        b = h.run_layer(theirs, x, dy)
        assert h.dtype_of(a["y"]) == compute
        for key in ("y", "dx"):
            h.assert_close(a[key], h.to_numpy(b[key]), **h.TOL[compute], what=key)
        for ga, gb in zip(a["dweights"], b["dweights"], strict=True):
            h.assert_close(ga, h.to_numpy(gb), rtol=1e-5, atol_scale=1e-5)
    for va, vb in zip(ours.weights, theirs.weights, strict=True):
        assert va.dtype == vb.dtype == "float32"
        h.assert_close(va, h.to_numpy(vb), what=va.path)


def test_frozen_layer_runs_in_inference_mode(rng):
    shape = (6, 5)
    ours, theirs = _pair(shape, rng)
    ours.trainable = False
    before = ours.get_weights()
    x, _ = _data(rng, shape)
    h.assert_close(ours(x, training=True), h.to_numpy(theirs(x, training=False)))
    for a, b in zip(before, ours.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# -- config, serialization, weight transfer ---------------------------------------


CONFIG_CASES = [
    dict(),
    dict(axis=1, momentum=0.9, epsilon=1e-5, center=False),
    dict(renorm=True),
    dict(renorm=True, renorm_clipping={"rmax": 3.0}, renorm_momentum=0.9),
    dict(
        gamma_regularizer="l2",
        beta_constraint="non_neg",
        moving_variance_initializer="zeros",
    ),
]


@pytest.mark.parametrize("kwargs", CONFIG_CASES, ids=lambda k: str(sorted(k)))
def test_config_equals_keras_and_round_trips(kwargs):
    ours = keras_bn.BatchNormalization(name="bn", **kwargs)
    theirs = keras.layers.BatchNormalization(name="bn", **kwargs)
    ours_config, theirs_config = ours.get_config(), theirs.get_config()
    # Keras's config is contained unchanged; the only additions are keras_bn's
    # own extension arguments, at their defaults (which reproduce Keras).
    assert {k: ours_config[k] for k in theirs_config} == theirs_config
    extra = {k: v for k, v in ours_config.items() if k not in theirs_config}
    assert set(extra) <= EXTENSION_DEFAULTS.keys()
    assert all(EXTENSION_DEFAULTS[k] == v for k, v in extra.items())
    clone = keras_bn.BatchNormalization.from_config(ours.get_config())
    assert type(clone) is keras_bn.BatchNormalization
    assert clone.get_config() == ours.get_config()
    # Keras's layer reads our config and vice versa.
    assert (
        keras_bn.BatchNormalization.from_config(theirs.get_config()).get_config()
        == ours.get_config()
    )
    ser = keras.saving.serialize_keras_object(ours)
    assert ser["registered_name"] == "keras_bn>BatchNormalization"
    assert isinstance(ours, keras.layers.BatchNormalization)


@pytest.mark.parametrize("renorm", [False, True])
def test_keras_file_round_trip(rng, tmp_path, renorm):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5),
            keras_bn.BatchNormalization(momentum=0.5, renorm=renorm),
        ]
    )
    h.set_bn_weights(model.layers[-1], rng)
    x, _ = _data(rng, (8, 6))
    model(x, training=True)
    path = tmp_path / "m.keras"
    keras.saving.save_model(model, path)
    loaded = keras.saving.load_model(path)
    bn = loaded.layers[-1]
    assert type(bn) is keras_bn.BatchNormalization
    assert bn.get_config() == model.layers[-1].get_config()
    for a, b in zip(model.weights, loaded.weights, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(h.to_numpy(a), h.to_numpy(b))
    np.testing.assert_array_equal(h.to_numpy(model(x)), h.to_numpy(loaded(x)))


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(center=False), dict(scale=False), dict(renorm=True)],
    ids=str,
)
def test_weight_transfer_from_keras_layer(rng, kwargs):
    shape = (4, 3, 5)
    theirs = keras.layers.BatchNormalization(**kwargs)
    theirs.build(shape)
    h.set_bn_weights(theirs, rng)
    ours = keras_bn.BatchNormalization(**kwargs)
    ours.build(shape)
    assert [v.name for v in ours.weights] == [v.name for v in theirs.weights]
    assert [v.shape for v in ours.weights] == [v.shape for v in theirs.weights]
    assert [v.trainable for v in ours.weights] == [v.trainable for v in theirs.weights]
    ours.set_weights(theirs.get_weights())
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x, _ = _data(rng, shape)
    h.assert_close(ours(x), h.to_numpy(theirs(x)))


# -- compilation --------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kwargs", [dict(), dict(axis=1), dict(renorm=True)], ids=str)
def test_eager_and_jit_agree(rng, kwargs, masked):
    shape = (6, 4, 5)
    eager = _layer(shape, rng, momentum=0.7, **kwargs)
    jitted = keras_bn.BatchNormalization(momentum=0.7, **kwargs)
    jitted.build(shape)
    jitted.set_weights(eager.get_weights())
    x, dy = _data(rng, shape)
    mask = (rng.random(shape[:-1]) > 0.3) if masked else None
    a = h.run_layer(eager, x, dy, mask=mask)
    b = h.run_layer(jitted, x, dy, mask=mask, jit=True)
    h.assert_close(b["y"], h.to_numpy(a["y"]), what="y")
    h.assert_close(b["dx"], h.to_numpy(a["dx"]), what="dx")
    for ga, gb in zip(a["dweights"], b["dweights"], strict=True):
        h.assert_close(gb, h.to_numpy(ga))
    for va, vb in zip(eager.weights, jitted.weights, strict=True):
        h.assert_close(vb, h.to_numpy(va), what=va.path)


def _model(**bn_kwargs):
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, use_bias=False),
            keras_bn.BatchNormalization(**bn_kwargs),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(1),
        ]
    )


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_runs(rng, jit_compile):
    h.skip_inductor_fit(jit_compile)
    x = rng.normal(2.0, 3.0, (64, 6)).astype("float32")
    y = (x[:, :1] > 2.0).astype("float32")
    model = _model(momentum=0.5)
    model.compile(optimizer="adam", loss="mse", jit_compile=jit_compile)
    hist = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(hist.history["loss"]))
    bn = model.layers[1]
    # After 8 steps with momentum 0.5 the moving mean tracks the batch means.
    feats = h.to_numpy(model.layers[0](x))
    np.testing.assert_allclose(
        h.to_numpy(bn.moving_mean), feats.mean(0), atol=0.5 * feats.std(0).max()
    )
    for v in model.weights:
        assert np.all(np.isfinite(h.to_numpy(v)))


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(axis="1"), TypeError, r"`axis` must be an integer.*axis='1'"),
        (dict(axis=[1, 2]), TypeError, r"`axis` must be an integer"),
        (dict(axis=1.0), TypeError, r"`axis` must be an integer"),
        (dict(momentum=1.5), ValueError, r"`momentum` must be in \[0, 1\].*1.5"),
        (dict(momentum=-0.1), ValueError, r"`momentum`.*-0.1"),
        (dict(momentum="x"), TypeError, r"`momentum` must be a float"),
        (dict(renorm_momentum=2.0), ValueError, r"`renorm_momentum`.*2.0"),
        (
            dict(epsilon=-1e-3),
            ValueError,
            r"`epsilon` must be a non-negative.*"
            r"-0.001",
        ),
        (dict(epsilon=float("nan")), ValueError, r"`epsilon`.*nan"),
        (
            dict(renorm=True, renorm_clipping={"rmax": 2, "bogus": 1}),
            ValueError,
            r"Received invalid keys for `renorm_clipping` argument: "
            r"unknown key\(s\) \['bogus'\]",
        ),
        (
            dict(renorm=True, renorm_clipping=[1.0]),
            TypeError,
            r"`renorm_clipping` must be a dict",
        ),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_bn.BatchNormalization(**kwargs)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range_at_build(axis):
    layer = keras_bn.BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=rf"`axis`={axis} is out of range.*rank 2"):
        layer.build((4, 3))


def test_unknown_channel_dimension_at_build():
    layer = keras_bn.BatchNormalization()
    with pytest.raises(
        ValueError,
        match=r"channel dimension \(axis=-1\).*must be "
        r"known.*\(None, None\)",
    ):
        layer.build((None, None))


@pytest.mark.parametrize("shape,axis", [((1, 5), -1), ((1, 5, 1), 1)])
def test_single_value_per_channel_eager_training_raises(rng, shape, axis):
    layer = keras_bn.BatchNormalization(axis=axis)
    layer.build(shape)
    x = rng.normal(size=shape).astype("float32")
    with pytest.raises(ValueError, match=r"single value per channel.*at least 2"):
        layer(x, training=True)  # eager: JAX arrays here are not tracers
    # Inference with one example is fine.
    assert np.all(np.isfinite(h.to_numpy(layer(x, training=False))))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("first_padded", [False, True])
@pytest.mark.parametrize("ghost", [None, 2])
def test_nan_at_masked_positions_stays_out(rng, jit, first_padded, ghost):
    """Flax's masked batch-norm test: padding holds NaN, the mask excludes it.

    The unmasked outputs and the moving statistics equal those of the same
    batch with the padding set to 0 (Keras's layer passes this too). With
    `first_padded`, the first example is all padding (the kernel's pilot
    shift then comes from a slice that is all masked).
    """
    shape = (4, 6, 3)
    layer = _layer(shape, rng, momentum=0.5, virtual_batch_size=ghost)
    clean = _layer(shape, rng, momentum=0.5, virtual_batch_size=ghost)
    clean.set_weights(layer.get_weights())
    x = rng.normal(2.0, 1.5, shape).astype("float32")
    mask = np.ones(shape[:2], bool)
    mask[:, 4:] = False  # sequences of length 4, padded to 6
    if first_padded:
        mask[0] = False
    x_nan = np.where(mask[..., None], x, np.nan).astype("float32")
    x_zero = np.where(mask[..., None], x, 0.0).astype("float32")
    y = h.to_numpy(h.run_layer(layer, x_nan, mask=mask, jit=jit)["y"])
    y_ref = h.to_numpy(h.run_layer(clean, x_zero, mask=mask, jit=jit)["y"])
    assert np.all(np.isfinite(y[mask])), "NaN leaked into unmasked outputs"
    h.assert_close(y[mask], y_ref[mask], what="unmasked outputs")
    for v, v_ref in zip(
        layer.non_trainable_variables, clean.non_trainable_variables, strict=True
    ):
        h.assert_close(v, h.to_numpy(v_ref), what=v.path)


def test_mask_of_wrong_rank_raises(rng):
    layer = keras_bn.BatchNormalization()
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    layer.build(x.shape)
    with pytest.raises(
        ValueError,
        match=r"mask must have one dimension less.*"
        r"mask.shape=\(4,\)",
    ):
        layer(x, training=True, mask=np.ones((4,), bool))


# -- partial last batch, NaN, stability ---------------------------------------------


@pytest.mark.parametrize(
    "jit_compile,policy",
    [(True, "float32"), (False, "float32"), (True, "mixed_float16")],
)
def test_fit_with_final_batch_of_one(
    rng, clear_warned, float32_policy, jit_compile, policy
):
    h.skip_inductor_fit(jit_compile)
    keras.mixed_precision.set_dtype_policy(policy)
    x = rng.normal(size=(61, 6)).astype("float32")
    y = rng.normal(size=(61, 1)).astype("float32")
    model = _model()
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    if EAGER_FIT and not jit_compile:
        with pytest.raises(ValueError, match="single value per channel"):
            model.fit(x, y, batch_size=60, epochs=2, verbose=0)
        return
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        hist = model.fit(x, y, batch_size=60, epochs=2, verbose=0)
    assert np.all(np.isfinite(hist.history["loss"]))
    for v in model.weights:
        assert np.all(np.isfinite(h.to_numpy(v))), v.path
    single = [r for r in rec if "single value" in str(r.message)]
    if h.backend_name() == "tensorflow" and jit_compile:
        # TensorFlow traces `fit`'s step for an unknown batch size here, and
        # XLA cannot call back into Python when the batch of one runs.
        assert not single
        return
    assert len(single) == 1  # once, although it happened in both epochs
    message = str(single[0].message)
    assert message.startswith("keras_bn: layer '") and "drop_remainder" in message
    assert clear_warned._warned  # the warn-once registry recorded it


@pytest.mark.parametrize("n", [60, 61])
def test_unknown_batch_size_warns_only_when_a_batch_of_one_runs(rng, clear_warned, n):
    """A `tf.data` pipeline without `drop_remainder`: batch size unknown.

    60 examples in batches of 20 never give a batch of one: no warning. 61 do
    (the last batch): one warning, naming the layer and the fix, attributed to
    keras_bn without a source line to echo.
    """
    tf = pytest.importorskip("tensorflow")
    if h.backend_name() != "tensorflow":
        pytest.skip("unknown batch sizes when tracing are TensorFlow's")
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    model = _model(name="bn_under_test")
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model.fit(data, epochs=2, verbose=0)
    ours = [r for r in rec if "keras_bn" in str(r.message)]
    if n == 60:
        assert not ours, [str(r.message) for r in ours]
        return
    assert len(ours) == 1, [str(r.message) for r in ours]
    r = ours[0]
    assert r.category is RuntimeWarning
    assert "layer 'bn_under_test'" in str(r.message)
    assert "drop_remainder=True" in str(r.message)
    text = warnings.formatwarning(r.message, r.category, r.filename, r.lineno)
    assert text.count("\n") == 1, text  # one line: no source line echoed


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_final_batch_of_one_leaves_moving_statistics(
    rng, clear_warned, jit_compile
):
    """One epoch on 61 samples (batches 60 + 1) vs on the first 60 only."""
    if EAGER_FIT and not jit_compile:
        pytest.skip("torch's fit without jit_compile is eager: the batch raises")
    h.skip_inductor_fit(jit_compile)
    x = rng.normal(1.0, 2.0, size=(61, 6)).astype("float32")
    y = rng.normal(size=(61, 1)).astype("float32")
    models = [_model(momentum=0.5) for _ in range(2)]
    models[1].set_weights(models[0].get_weights())
    for model, n in zip(models, (60, 61), strict=True):
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model.fit(x[:n], y[:n], batch_size=60, epochs=1, shuffle=False, verbose=0)
    bn60, bn61 = models[0].layers[1], models[1].layers[1]
    assert not np.allclose(h.to_numpy(bn60.moving_mean), 0.0)  # step 1 updated
    h.assert_close(bn61.moving_mean, h.to_numpy(bn60.moving_mean), what="mean")
    h.assert_close(bn61.moving_variance, h.to_numpy(bn60.moving_variance))
    # The trainable weights did take the second (inference-mode) step.
    assert not np.allclose(h.to_numpy(bn61.gamma), h.to_numpy(bn60.gamma))


@pytest.mark.parametrize("shape,axis", [((1, 5), -1), ((1, 5, 1, 1), 1)])
def test_traced_single_value_batch_uses_moving_statistics(
    rng, clear_warned, shape, axis
):
    layer = _layer(shape, rng, axis=axis, momentum=0.5)
    before = layer.get_weights()
    x = rng.normal(size=shape).astype("float32")
    expected = h.to_numpy(layer(x, training=False))
    with pytest.warns(RuntimeWarning, match="single value per channel"):
        out = h.run_layer(layer, x, np.ones(shape, "float32"), jit=True)
    h.assert_close(out["y"], expected)
    for a, b in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Inference gradient: dx = gamma / sqrt(moving_var + eps).
    gamma = h.to_numpy(layer.gamma)
    inv = 1 / np.sqrt(h.to_numpy(layer.moving_variance) + layer.epsilon)
    h.assert_close(
        out["dx"],
        np.broadcast_to(
            (gamma * inv).reshape(
                [-1 if i == axis % len(shape) else 1 for i in range(len(shape))]
            ),
            shape,
        ),
    )


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_nan_channel_keeps_its_moving_statistics(rng, renorm, jit):
    shape = (8, 3, 4)
    layer = _layer(shape, rng, momentum=0.5, renorm=renorm)
    before = [h.to_numpy(v) for v in layer.non_trainable_variables]
    x, _ = _data(rng, shape)
    x[2, 1, 1] = np.nan
    out = h.run_layer(layer, x, jit=jit)
    y = h.to_numpy(out["y"])
    assert np.all(np.isnan(y[..., 1]))
    assert np.all(np.isfinite(np.delete(y, 1, axis=-1)))
    _, mean, var = h.ref_forward(
        np.delete(x, 1, axis=-1), np.ones(3), np.zeros(3), -1, layer.epsilon
    )
    for v, old in zip(layer.non_trainable_variables, before, strict=True):
        new = h.to_numpy(v)
        assert np.all(np.isfinite(new)), v.path
        assert new[1] == old[1], v.path
        assert np.all(np.delete(new, 1) != np.delete(old, 1)), v.path
    if not renorm:
        old_mean, old_var = (np.delete(b, 1) for b in before)
        h.assert_close(
            np.delete(h.to_numpy(layer.moving_mean), 1), 0.5 * old_mean + 0.5 * mean
        )
        h.assert_close(
            np.delete(h.to_numpy(layer.moving_variance), 1), 0.5 * old_var + 0.5 * var
        )


@pytest.mark.parametrize(
    "shape,axis", [((256, 8), -1), ((16, 4, 4, 3), -1), ((8, 3, 5, 5), 1)]
)
def test_large_mean_is_normalized_accurately(rng, shape, axis):
    """Mean 1e4, std 1 in float32: |y - ref| <= 1e-4 * max|ref|."""
    layer = keras_bn.BatchNormalization(axis=axis, momentum=0.0, epsilon=EPS)
    layer.build(shape)
    x = rng.normal(1e4, 1.0, shape).astype("float32")
    out = h.run_layer(layer, x, rng.normal(size=shape).astype("float32"))
    y_ref, mean, var = h.ref_forward(
        x, np.ones(shape[axis]), np.zeros(shape[axis]), axis, EPS
    )
    err = np.max(np.abs(h.to_numpy(out["y"]) - y_ref)) / np.max(np.abs(y_ref))
    print(f"relative error of y at mean 1e4: {err:.2e}")
    assert err <= 1e-4
    # Stricter, and true of the shifted one-pass kernel: float32 rounding of
    # x itself (1e4 * 2**-24 ~ 6e-4 absolute) is already inside the reference.
    assert err <= 1e-5
    h.assert_close(layer.moving_mean, mean, what="mean")
    h.assert_close(layer.moving_variance, var, rtol=1e-4, atol_scale=1e-4, what="var")


def test_warns_once_per_kind(clear_warned):
    import keras_bn.batch_normalization as bn

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        bn._warn_once("single", "one")
        bn._warn_once("single", "two")
    assert [str(r.message) for r in rec] == ["one"]
    assert all(r.category is RuntimeWarning for r in rec)
