"""`keras_bn.recalibrate`: exact population statistics, against NumPy.

Reference: the model is recomputed layer by layer in float64 NumPy, in
inference mode, each BN using the reference statistics of the BN layers before
it. Tolerance (float32 model, float32 storage, vs float64): variance
`rtol=1e-6`; mean `|mean - ref| <= 1e-6 * (|ref| + std_ref)`, i.e. 1e-6
relative with the channel's standard deviation as the scale near zero.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from harness import assert_close, to_numpy

import keras_bn
from keras_bn.recalibrate import RecalibrationReport, recalibrate

EPS = 1e-3


def make_model(rng):
    """BN (ours) -> Dense -> [nested: Dense -> Keras BN] -> ReLU -> Dense -> BN."""
    inner = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(name="bn_inner"),
        ],
        name="inner",
    )
    inp = keras.Input((6,))
    h = keras_bn.BatchNormalization(name="bn_first")(inp)
    h = inner(keras.layers.Dense(5)(h))
    h = keras.layers.Dense(3)(keras.layers.ReLU()(h))
    out = keras_bn.BatchNormalization(name="bn_last")(h)
    model = keras.Model(inp, out)
    # Non-trivial weights and moving statistics, as after some training.
    for layer in [
        model.get_layer("bn_first"),
        inner.layers[1],
        model.get_layer("bn_last"),
    ]:
        c = layer.moving_mean.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
        layer.beta.assign(rng.normal(size=c).astype("float32"))
        layer.moving_mean.assign(rng.normal(size=c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
    return model, inner


def reference(model, inner, x, ddof=0):
    """Float64 per-layer (mean, var) of each BN's inference-mode input."""

    def w(layer):
        return [to_numpy(v) for v in layer.weights]

    def bn(h, layer):
        mean, var = h.mean(0), h.var(0, ddof=ddof)
        gamma, beta = to_numpy(layer.gamma), to_numpy(layer.beta)
        return (h - mean) / np.sqrt(var + EPS) * gamma + beta, (mean, var)

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    h, s1 = bn(np.asarray(x, np.float64), model.get_layer("bn_first"))
    k, b = w(dense[0])
    h = h @ k + b
    k, b = w(inner.layers[0])
    h, s2 = bn(h @ k + b, inner.layers[1])
    k, b = w(dense[1])
    _, s3 = bn(np.maximum(h, 0.0) @ k + b, model.get_layer("bn_last"))
    return [s1, s2, s3]


def assert_stats(layer, mean, var):
    std = np.sqrt(var)
    got_mean, got_var = to_numpy(layer.moving_mean), to_numpy(layer.moving_variance)
    assert np.all(np.abs(got_mean - mean) <= 1e-6 * (np.abs(mean) + std)), (
        layer.name,
        got_mean,
        mean,
    )
    np.testing.assert_allclose(got_var, var, rtol=1e-6, err_msg=layer.name)


def bn_layers(model, inner):
    return [model.get_layer("bn_first"), inner.layers[1], model.get_layer("bn_last")]


class Batches(keras.utils.PyDataset):
    def __init__(self, x, batch_size):
        super().__init__()
        self.x, self.batch_size = x, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        xb = self.x[i * self.batch_size : (i + 1) * self.batch_size]
        return xb, np.zeros((len(xb), 1), "float32")


def as_data(kind, x):
    if kind == "array":
        return x
    if kind == "dataset":
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(48)
    if kind == "generator":
        return (x[i : i + 40] for i in range(0, len(x), 40))
    return Batches(x, 64)


@pytest.mark.parametrize("kind", ["array", "dataset", "generator", "pydataset"])
def test_exact_statistics(rng, kind):
    x = rng.normal(3.0, 2.0, (300, 6)).astype("float32")
    model, inner = make_model(rng)
    others = {v.path: to_numpy(v) for v in model.weights if "moving" not in v.path}
    old = [
        (to_numpy(b.moving_mean), to_numpy(b.moving_variance))
        for b in bn_layers(model, inner)
    ]
    report = recalibrate(model, as_data(kind, x), batch_size=64, verbose=0)
    for layer, (mean, var) in zip(
        bn_layers(model, inner), reference(model, inner, x), strict=True
    ):
        assert_stats(layer, mean, var)
    # Nothing else changed.
    for v in model.weights:
        if "moving" not in v.path:
            np.testing.assert_array_equal(to_numpy(v), others[v.path], err_msg=v.path)
    # The report: call order, old and new values, gaps.
    assert isinstance(report, RecalibrationReport)
    assert [r.name.split("/")[-1] for r in report.layers] == [
        "bn_first",
        "bn_inner",
        "bn_last",
    ]
    for r, (old_mean, old_var) in zip(report.layers, old, strict=True):
        np.testing.assert_array_equal(r.old_mean, old_mean)
        np.testing.assert_array_equal(r.old_variance, old_var)
        assert r.count == 300
        gap = np.max(np.abs(old_mean - r.mean) / np.sqrt(r.variance + EPS))
        assert r.mean_gap == pytest.approx(gap)
    assert report.max_gap > 0.1
    assert "bn_last" in str(report)


def test_unbiased_follows_layer_option(rng):
    x = rng.normal(size=(50, 3)).astype("float32")
    ours = keras_bn.BatchNormalization(unbiased_variance=True)
    keras_bn_plain = keras_bn.BatchNormalization()
    model = keras.Sequential([keras.Input((3,)), ours, keras_bn_plain])
    recalibrate(model, x, verbose=0)
    np.testing.assert_allclose(
        to_numpy(ours.moving_variance), x.astype(np.float64).var(0, ddof=1), rtol=1e-6
    )
    recalibrate(model, x, unbiased=False, verbose=0)
    np.testing.assert_allclose(
        to_numpy(ours.moving_variance), x.astype(np.float64).var(0), rtol=1e-6
    )


def test_shared_layer_and_subclassed_model(rng):
    class Twin(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()
            self.dense = keras.layers.Dense(3)

        def call(self, x, training=None):
            a = self.bn(x, training=training)
            b = self.bn(self.dense(x), training=training)
            return a + b

    x = rng.normal(1.0, 2.0, (40, 3)).astype("float32")
    model = Twin()
    model(x[:2])
    recalibrate(model, x, batch_size=16, verbose=0)
    k, b = (to_numpy(v) for v in model.dense.weights)
    both = np.concatenate([x.astype(np.float64), x @ k + b])
    np.testing.assert_allclose(
        to_numpy(model.bn.moving_mean), both.mean(0), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(model.bn.moving_variance), both.var(0), rtol=1e-6
    )


def test_masked_positions_excluded(rng):
    tokens = rng.integers(1, 10, (30, 7))
    tokens[:, 4:] = 0  # padding
    model = keras.Sequential(
        [
            keras.Input((7,), dtype="int32"),
            keras.layers.Embedding(10, 3, mask_zero=True),
            keras_bn.BatchNormalization(),
        ]
    )
    recalibrate(model, tokens, verbose=0)
    table = to_numpy(model.layers[0].embeddings)
    values = table[tokens[:, :4].ravel()]
    np.testing.assert_allclose(
        to_numpy(model.layers[1].moving_mean), values.mean(0), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        to_numpy(model.layers[1].moving_variance), values.var(0), rtol=1e-6
    )


def test_steps_limits_batches(rng):
    x = rng.normal(size=(100, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    report = recalibrate(model, x, steps=2, batch_size=10, verbose=0)
    assert report.layers[0].count == 20
    np.testing.assert_allclose(
        to_numpy(model.layers[0].moving_mean),
        x[:20].astype(np.float64).mean(0),
        rtol=1e-6,
        atol=1e-7,
    )


def test_renorm_keeps_stddev_consistent(rng):
    x = rng.normal(2.0, 3.0, (64, 4)).astype("float32")
    layer = keras.layers.BatchNormalization(renorm=True)
    model = keras.Sequential([keras.Input((4,)), layer])
    recalibrate(model, x, verbose=0)
    var = x.astype(np.float64).var(0)
    np.testing.assert_allclose(to_numpy(layer.moving_variance), var, rtol=1e-6)
    np.testing.assert_allclose(
        to_numpy(layer.moving_stddev), np.sqrt(var + EPS), rtol=1e-6
    )


def test_progress_bar(rng, capsys):
    x = rng.normal(size=(20, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    recalibrate(model, x, batch_size=10, verbose=1)
    assert "2/2" in capsys.readouterr().out


# -- All or nothing ----------------------------------------------------------------


def snapshot(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.weights}


def assert_unchanged(model, before):
    for v in model.weights:
        got = np.array(keras.ops.convert_to_numpy(v))
        np.testing.assert_array_equal(got, before[v.path], err_msg=v.path)
        assert got.tobytes() == before[v.path].tobytes(), v.path  # -0.0, NaN bits


class FailingBatches(Batches):
    """Raises `OSError` on the `fail_at`-th read (counting from 1)."""

    def __init__(self, x, batch_size, fail_at):
        super().__init__(x, batch_size)
        self.reads, self.fail_at = 0, fail_at

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError(f"disk went away at read {self.reads}")
        return super().__getitem__(i)


# Reads: 1 finds the call order; 2-4 are the first layer's pass, 5-7 the
# second's, 8-10 the last's (the fault used to leave bn_first recalibrated).
@pytest.mark.parametrize("fail_at", [1, 3, 4, 6, 10])
def test_data_error_leaves_every_statistic_bit_identical(rng, fail_at):
    x = rng.normal(3.0, 2.0, (150, 6)).astype("float32")
    model, _ = make_model(rng)
    before = snapshot(model)
    data = FailingBatches(x, 64, fail_at)
    with pytest.raises(OSError, match=f"disk went away at read {fail_at}$"):
        recalibrate(model, data, verbose=0)
    assert_unchanged(model, before)


def test_wrongly_shaped_batch_midway(rng):
    x = rng.normal(size=(40, 6)).astype("float32")
    model, _ = make_model(rng)
    before = snapshot(model)
    batches = [x[:20], x[20:], x[:10, :5]]  # the last has 5 features, not 6
    with pytest.raises(ValueError, match=r"5"):
        recalibrate(model, iter(batches), verbose=0)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_data_raises_naming_layer_and_batch(rng, bad):
    x = rng.normal(size=(60, 6)).astype("float32")
    x[47, 2] = bad  # batch 2 of 20 examples each
    model, _ = make_model(rng)
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"batch 2 of `data`.*'bn_first'.*channels \[2\].*skip_nonf"
    ):
        recalibrate(model, x, batch_size=20, verbose=0)
    assert_unchanged(model, before)


def test_nonfinite_after_a_later_layer(rng):
    """Finite data whose activations overflow only after the first BN."""
    x = rng.normal(size=(40, 3)).astype("float32")
    x[25] = 50.0  # about 6 standard deviations: exp(20 * 6) overflows float32
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras_bn.BatchNormalization(name="bn_a", center=False, scale=False),
            keras.layers.Lambda(lambda t: keras.ops.exp(20.0 * t)),
            keras.layers.BatchNormalization(name="bn_b"),
        ]
    )
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"batch 1 of `data`.*bn_b'"):
        recalibrate(model, x, batch_size=20, verbose=0)
    assert_unchanged(model, before)
    report = recalibrate(model, x, batch_size=20, skip_nonfinite=True, verbose=0)
    assert report.skipped_batches == [1]
    assert [(r.count, r.skipped) for r in report.layers] == [(40, 0), (20, 1)]


def test_statistics_that_overflow_float32(rng):
    x = rng.normal(size=(20, 3)).astype("float32") * 1e30  # variance 1e60
    model = keras.Sequential([keras.Input((3,)), keras_bn.BatchNormalization()])
    model.add(keras.layers.BatchNormalization())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"do not fit in float32.*variance"):
        recalibrate(model, x, verbose=0)
    assert_unchanged(model, before)


def test_skip_nonfinite_counts_batches(rng):
    x = rng.normal(3.0, 2.0, (100, 6)).astype("float32")
    x[5, 0] = np.nan  # batch 0
    x[85, 4] = np.inf  # batch 4
    model, inner = make_model(rng)
    clean, _ = make_model(np.random.default_rng(0))
    clean.set_weights(model.get_weights())
    report = recalibrate(model, x, batch_size=20, skip_nonfinite=True, verbose=0)
    assert report.skipped_batches == [0, 4]
    assert [r.skipped for r in report.layers] == [2, 0, 0]  # found at bn_first
    assert all(r.count == 60 for r in report.layers)
    assert "skipped 2 batch(es)" in str(report)
    recalibrate(clean, x[20:80], batch_size=20, verbose=0)
    for a, b in zip(model.weights, clean.weights, strict=True):
        assert_close(to_numpy(a), to_numpy(b), rtol=1e-6, what=a.path)


def test_masked_nonfinite_values_are_ignored(rng):
    tokens = rng.integers(1, 10, (30, 7))
    tokens[:, 4:] = 0  # padding, embedded as NaN below
    emb = keras.layers.Embedding(10, 3, mask_zero=True)
    model = keras.Sequential([keras.Input((7,), dtype="int32"), emb])
    model.add(keras_bn.BatchNormalization())
    table = rng.normal(size=(10, 3)).astype("float32")
    table[0] = np.nan
    emb.embeddings.assign(table)
    recalibrate(model, tokens, verbose=0)
    values = table[tokens[:, :4].ravel()].astype(np.float64)
    assert_close(model.layers[1].moving_variance, values.var(0), rtol=1e-6)


def test_conv_model_nan_pixel(rng):
    """A reported probe: one NaN pixel used to turn every BN's statistics NaN."""
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras_bn.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.BatchNormalization(),
        ]
    )
    x = rng.normal(size=(16, 8, 8, 2)).astype("float32")
    x[9, 3, 3, 1] = np.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"batch 1 of `data`"):
        recalibrate(model, x, batch_size=8, verbose=0)
    assert_unchanged(model, before)
    report = recalibrate(model, x, batch_size=8, skip_nonfinite=True, verbose=0)
    assert report.skipped_batches == [1]
    y = keras.ops.convert_to_numpy(model(x[:8], training=False))
    assert np.isfinite(y).all()


def test_no_batchnorm():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        recalibrate(model, np.ones((4, 3), "float32"))


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        (np.ones((0, 3), "float32"), {}, ValueError, "empty"),
        ((b for b in []), {}, ValueError, "empty"),
        (np.ones((4, 3), "float32"), dict(steps=0), ValueError, "steps=0"),
        (np.ones((4, 3), "float32"), dict(steps=-1), ValueError, "steps=-1"),
        (np.ones((4, 3), "float32"), dict(steps=1.5), TypeError, "1.5"),
        (np.ones((4, 3), "float32"), dict(unbiased="no"), TypeError, "unbiased"),
        (np.ones((4, 3), "float32"), dict(skip_nonfinite=1), TypeError, "skip_non"),
        (42, {}, TypeError, "Received: int"),
    ],
)
def test_bad_input(data, kwargs, error, match):
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    with pytest.raises(error, match=match):
        recalibrate(model, data, verbose=0, **kwargs)


def test_infinite_dataset_needs_steps(rng):
    tf = pytest.importorskip("tensorflow")
    x = rng.normal(size=(8, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    data = tf.data.Dataset.from_tensor_slices(x).batch(4).repeat()
    with pytest.raises(ValueError, match="pass `steps`"):
        recalibrate(model, data, verbose=0)
    report = recalibrate(model, data, steps=4, verbose=0)
    assert report.layers[0].count == 16


# -- data formats: what `predict` accepts, with the same meaning ---------------------


def two_input_model():
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    return keras.Model([a, b], keras_bn.BatchNormalization(name="bn")(h))


def one_input_model():
    inp = keras.Input((4,))
    return keras.Model(inp, keras_bn.BatchNormalization(name="bn")(inp))


def assert_bn_stats(model, h):
    mean, var = h.mean(0), h.var(0)
    assert_stats(model.get_layer("bn"), mean, var)


def tf_data(*arrays):
    tf = pytest.importorskip("tensorflow")
    return tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0])


@pytest.mark.parametrize(
    "form", ["x", "(x,)", "(x, y)", "(x, y, sample_weight)", "tensor", "(x, None)"]
)
def test_single_input_forms_use_only_x(rng, form):
    """`(x, y)` as `fit` takes it: `y` used to enter the statistics as a batch."""
    x = rng.normal(2.0, 3.0, (70, 4)).astype("float32")
    y = rng.normal(-50.0, 1.0, (70, 4)).astype("float32")  # label-like rows
    sw = np.ones(70, "float32")
    data = {
        "x": x,
        "(x,)": (x,),
        "(x, y)": (x, y),
        "(x, y, sample_weight)": (x, y, sw),
        "tensor": keras.ops.convert_to_tensor(x),
        "(x, None)": (x, None),
    }[form]
    model = one_input_model()
    report = recalibrate(model, data, batch_size=32, verbose=0)
    assert report.layers[0].count == 70
    assert_bn_stats(model, x.astype(np.float64))


@pytest.mark.parametrize(
    "form",
    [
        "list",
        "dict",
        "(list, y)",
        "(dict, y)",
        "dataset dict",
        "dataset (list, y)",
        "generator (dict, y)",
        "pydataset list",
    ],
)
def test_multi_input_forms(rng, form):
    xa = rng.normal(1.0, 2.0, (50, 3)).astype("float32")
    xb = rng.normal(-3.0, 0.5, (50, 2)).astype("float32")
    y = rng.normal(size=(50, 1)).astype("float32")

    class Inputs(keras.utils.PyDataset):
        # As in `fit` and `predict`, a batch that is a list or tuple of two
        # arrays is `(x, y)`: the two inputs are nested, `([xa, xb],)`.
        def __len__(self):
            return 3

        def __getitem__(self, i):
            s = slice(20 * i, 20 * (i + 1))
            return ([xa[s], xb[s]],)

    def generator():
        for i in range(0, 50, 16):
            yield {"a": xa[i : i + 16], "b": xb[i : i + 16]}, y[i : i + 16]

    if form.startswith("dataset"):
        data = (
            tf_data({"a": xa, "b": xb}).batch(16)
            if form == "dataset dict"
            else tf_data((xa, xb), y).batch(16)
        )
    else:
        data = {
            "list": [xa, xb],
            "dict": {"a": xa, "b": xb},
            "(list, y)": ([xa, xb], y),
            "(dict, y)": ({"b": xb, "a": xa}, y),
            "generator (dict, y)": generator(),
            "pydataset list": Inputs(),
        }[form]
    model = two_input_model()
    recalibrate(model, data, batch_size=16, verbose=0)
    assert_bn_stats(model, np.concatenate([xa, xb], axis=1).astype(np.float64))


@pytest.mark.parametrize("kind", ["dataset", "generator"])
def test_batches_of_x_only(rng, kind):
    x = rng.normal(2.0, 3.0, (70, 4)).astype("float32")
    data = (
        tf_data(x).batch(32)
        if kind == "dataset"
        else (x[i : i + 32] for i in range(0, 70, 32))
    )
    model = one_input_model()
    recalibrate(model, data, verbose=0)
    assert_bn_stats(model, x.astype(np.float64))


@pytest.mark.parametrize(
    "inputs,make,match",
    [
        (
            2,
            lambda xa, xb, x: (xa, xb),
            r"tuple of 2 elements, read as `\(x, y\)`.*model '.*' has 2 inputs.*"
            r"Pass the inputs as a list",
        ),
        (
            1,
            lambda xa, xb, x: (x, x[:10]),
            r"its `y` has \[10\] rows where `x` has 40, so it cannot be one.*"
            r"pass them as a list",
        ),
        (
            1,
            lambda xa, xb, x: (x, x, x, x),
            r"tuple.*has 4 elements.*Pass the inputs .* as a list",
        ),
        (
            1,
            lambda xa, xb, x: [x, x],
            r"list of 2 arrays.*model '.*' has 1 input.*generator",
        ),
        (
            1,
            lambda xa, xb, x: {"a": x, "b": "text"},
            r"dict: it must map the model's input names to arrays",
        ),
        (
            2,
            lambda xa, xb, x: [xa, xb[:5]],
            r"different numbers of rows.*\[40, 5\]",
        ),
    ],
    ids=[
        "tuple-for-two-inputs",
        "y-rows",
        "long-tuple",
        "list-one-input",
        "dict-values",
        "rows",
    ],
)
def test_ambiguous_forms_are_refused(rng, inputs, make, match):
    xa = rng.normal(size=(40, 3)).astype("float32")
    xb = rng.normal(size=(40, 2)).astype("float32")
    x = rng.normal(size=(40, 4)).astype("float32")
    data = make(xa, xb, x)
    model = two_input_model() if inputs == 2 else one_input_model()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        recalibrate(model, data, verbose=0)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_batch_size_is_checked(rng, bad):
    with pytest.raises((ValueError, TypeError), match=r"batch_size"):
        recalibrate(one_input_model(), np.ones((4, 4), "float32"), batch_size=bad)
