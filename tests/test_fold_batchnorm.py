"""Tests for converters.fold_keras.fold_batchnorm (both backends)."""

import keras
import numpy as np
import pytest

import keras_bn
from converters import ChannelAffine, fold_batchnorm
from tests import harness as h

L = keras.layers
RTOL = 1e-5  # relative: max|folded - original| / max|original|, float32 models


@pytest.fixture
def rng():
    return np.random.default_rng(42)


def randomize_bn(model, rng):
    """Random non-trivial statistics for every BN (variance positive)."""
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=c))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=c))
            if layer.scale:
                layer.gamma.assign(rng.normal(size=c))
            if layer.center:
                layer.beta.assign(rng.normal(size=c))
        elif layer.weights and not isinstance(layer, keras.Model):
            for v in layer.weights:  # non-zero biases too
                v.assign(rng.normal(size=v.shape) * 0.5)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _bn_left(model):
    return [lyr for lyr in _all_layers(model) if isinstance(lyr, L.BatchNormalization)]


def _snapshot(model):
    return [type(lyr).__name__ for lyr in _all_layers(model)], [
        np.array(w) for w in model.get_weights()
    ]


def _np(x):
    """A backend tensor (a torch one may require grad) as a float64 array."""
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def _rel_err(a, b):
    a, b = _np(a), _np(b)
    return np.abs(a - b).max() / np.abs(b).max()


def check_fold(model, inputs, rng, expect_bn_left=0):
    randomize_bn(model, rng)
    before = _snapshot(model)
    ref = model(inputs, training=False)
    folded, report = fold_batchnorm(model)
    after = _snapshot(model)
    assert before[0] == after[0]  # input model unchanged: structure ...
    for w0, w1 in zip(before[1], after[1], strict=True):  # ... and weights
        np.testing.assert_array_equal(w0, w1)
    got = folded(inputs, training=False)
    for r, g in zip(keras.tree.flatten(ref), keras.tree.flatten(got), strict=True):
        assert _rel_err(g, r) <= RTOL
    assert len(_bn_left(folded)) == 0  # kept ones become ChannelAffine
    kept = [lyr for lyr in _all_layers(folded) if isinstance(lyr, ChannelAffine)]
    assert len(kept) == expect_bn_left == report.num_kept
    assert len(report.records) == len(_bn_left(model))
    return folded, report


LAYERS = {
    "Dense": (lambda **k: L.Dense(6, **k), (5,)),
    "Conv1D": (lambda **k: L.Conv1D(6, 3, **k), (7, 4)),
    "Conv2D": (lambda **k: L.Conv2D(6, 3, strides=2, **k), (7, 7, 4)),
    "Conv3D": (lambda **k: L.Conv3D(6, 2, **k), (4, 4, 4, 3)),
    "Conv2D_groups2": (lambda **k: L.Conv2D(6, 3, groups=2, **k), (6, 6, 4)),
    "DepthwiseConv1D": (lambda **k: L.DepthwiseConv1D(3, **k), (7, 4)),
    "DepthwiseConv2D_dm3": (
        lambda **k: L.DepthwiseConv2D(3, depth_multiplier=3, **k),
        (6, 6, 4),
    ),
    "SeparableConv1D": (
        lambda **k: L.SeparableConv1D(6, 3, depth_multiplier=2, **k),
        (7, 4),
    ),
    "SeparableConv2D": (lambda **k: L.SeparableConv2D(6, 3, **k), (6, 6, 4)),
    "Conv1DTranspose": (lambda **k: L.Conv1DTranspose(6, 3, strides=2, **k), (5, 4)),
    "Conv2DTranspose": (lambda **k: L.Conv2DTranspose(6, 3, **k), (5, 5, 4)),
    "Conv3DTranspose": (lambda **k: L.Conv3DTranspose(5, 2, **k), (3, 3, 3, 4)),
}


def _grid():
    for name in LAYERS:
        for fmt in (
            ["channels_last"]
            if name == "Dense"
            else ["channels_last", "channels_first"]
        ):
            for use_bias in [True, False]:
                yield name, fmt, use_bias


@pytest.mark.parametrize("name, data_format, use_bias", list(_grid()))
def test_fold_into_preceding(rng, name, data_format, use_bias):
    make, shape = LAYERS[name]
    kwargs = {"use_bias": use_bias}
    if name != "Dense":
        kwargs["data_format"] = data_format
        if data_format == "channels_first":
            shape = (shape[-1], *shape[:-1])
    axis = 1 if data_format == "channels_first" else -1
    # Alternate the two BN implementations over the grid.
    bn_cls = keras_bn.BatchNormalization if use_bias else L.BatchNormalization
    model = keras.Sequential(
        [keras.Input(shape), make(**kwargs), bn_cls(axis=axis), L.ReLU()]
    )
    x = rng.normal(size=(2, *shape)).astype("float32")
    with h.skip_if_no_cpu_nchw_conv():
        folded, report = check_fold(model, x, rng)
    (record,) = report.records
    assert record.action == "folded_into_preceding"
    assert [type(lyr).__name__ for lyr in folded.layers] == [
        type(model.layers[0]).__name__,
        "ReLU",
    ]
    assert folded.layers[0].use_bias


@pytest.mark.parametrize(
    "bn",
    [
        lambda: keras_bn.BatchNormalization(renorm=True),
        lambda: keras_bn.BatchNormalization(center=False),
        lambda: keras_bn.BatchNormalization(scale=False, epsilon=0.1),
        lambda: L.BatchNormalization(renorm=True, center=False, scale=False),
    ],
)
def test_bn_variants(rng, bn):
    model = keras.Sequential([keras.Input((5,)), L.Dense(4), bn(), L.Dense(3)])
    x = rng.normal(size=(3, 5)).astype("float32")
    check_fold(model, x, rng)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_fold_into_following_conv(rng, data_format):
    axis = 1 if data_format == "channels_first" else -1
    shape = (4, 7, 7) if axis == 1 else (7, 7, 4)
    model = keras.Sequential(
        [
            keras.Input(shape),
            L.Activation("relu"),
            L.BatchNormalization(axis=axis),
            L.Conv2D(5, 3, strides=2, use_bias=False, data_format=data_format),
        ]
    )
    x = rng.normal(size=(2, *shape)).astype("float32")
    with h.skip_if_no_cpu_nchw_conv():
        _, report = check_fold(model, x, rng)
    assert report.records[0].action == "folded_into_following"


def test_fold_into_following_dense_rank3_and_fused_activation(rng):
    inp = keras.Input((3, 5))
    h = L.Dense(4, activation="relu")(inp)  # nonlinear: cannot fold before
    h = L.BatchNormalization()(h)
    out = L.Dense(2)(h)
    x = rng.normal(size=(2, 3, 5)).astype("float32")
    _, report = check_fold(keras.Model(inp, out), x, rng)
    (rec,) = report.records
    assert (
        rec.action == "folded_into_following"
        and rec.target == out._keras_history[0].name
    )


@pytest.mark.parametrize(
    "follower, reason",
    [
        (lambda: L.Conv2D(3, 3, padding="same"), "pads its input"),
        (lambda: L.Conv2D(4, 3, groups=2), "grouped convolution"),
        (lambda: L.DepthwiseConv2D(3), "not a dense or plain conv"),
        (lambda: L.Flatten(), "not a dense or plain conv"),
    ],
)
def test_fallback_scale_shift(rng, follower, reason):
    model = keras.Sequential(
        [keras.Input((6, 6, 4)), L.ReLU(), L.BatchNormalization(), follower()]
    )
    x = rng.normal(size=(2, 6, 6, 4)).astype("float32")
    _, report = check_fold(model, x, rng, expect_bn_left=1)
    assert reason in report.records[0].reason
    assert "no preceding layer" not in report.records[0].reason


def test_fallback_shared_output_and_wrong_axis(rng):
    inp = keras.Input((4, 6))
    d = L.Dense(6)(inp)
    bn_a, bn_b = L.BatchNormalization(), L.BatchNormalization(axis=1)
    a = bn_a(d)  # d also feeds `c`: kept
    b = bn_b(L.Dense(6)(inp))  # axis != Dense axis: kept
    c = L.Dense(2)(d)
    model = keras.Model(inp, [a, L.ReLU()(b), c])
    x = rng.normal(size=(2, 4, 6)).astype("float32")
    _, report = check_fold(model, x, rng, expect_bn_left=2)
    first, second = report.by_name()[bn_a.name], report.by_name()[bn_b.name]
    assert "also feeds other layers" in first.reason
    assert "not the channel axis" in second.reason


def test_shared_block_siamese_and_shared_bn(rng):
    dense, bn = L.Dense(5, use_bias=False), L.BatchNormalization()
    x1, x2 = keras.Input((4,)), keras.Input((4,))
    y1, y2 = bn(dense(x1)), bn(dense(x2))  # shared Dense+BN: foldable
    shared_bn = L.BatchNormalization()
    z1 = shared_bn(L.Dense(5)(x1))  # one BN after two different Dense: kept
    z2 = shared_bn(L.Dense(5)(x2))
    y = keras.ops.tanh(L.Add()([y1, y2])) * 2.0  # keras.ops nodes too
    model = keras.Model([x1, x2], {"y": y, "z": L.Add()([z1, z2])})
    xs = [rng.normal(size=(3, 4)).astype("float32") for _ in range(2)]
    folded, report = check_fold(model, xs, rng, expect_bn_left=1)
    recs = report.by_name()
    assert recs[bn.name].action == "folded_into_preceding"
    assert recs[shared_bn.name].action == "kept_as_scale_shift"
    assert "different layers" in recs[shared_bn.name].reason


def test_nested_models(rng):
    inner = keras.Sequential(
        [keras.Input((6,)), L.Dense(5), L.BatchNormalization(), L.ReLU()],
        name="inner",
    )
    inp = keras.Input((4,))
    h = L.Dense(6)(inp)
    h = L.BatchNormalization()(h)
    out = L.Dense(3)(inner(L.Dense(6)(inner(h))))  # inner is called twice
    model = keras.Model(inp, out)
    x = rng.normal(size=(2, 4)).astype("float32")
    folded, report = check_fold(model, x, rng)
    assert "inner/" + inner.layers[1].name in report.by_name()


def test_subclassed_model_raises():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    with pytest.raises(TypeError, match="subclassed Net"):
        fold_batchnorm(Net())
    with pytest.raises(TypeError, match="must be a keras.Model"):
        fold_batchnorm(L.Dense(2))


def test_folded_model_saves_and_loads(rng, tmp_path):
    model = keras.Sequential(
        [keras.Input((5,)), L.ReLU(), keras_bn.BatchNormalization(), L.Flatten()]
    )
    randomize_bn(model, rng)
    folded, _ = fold_batchnorm(model)
    path = tmp_path / "f.keras"
    folded.save(path)
    loaded = keras.saving.load_model(path)
    x = rng.normal(size=(2, 5)).astype("float32")
    np.testing.assert_array_equal(_np(loaded(x)), _np(folded(x)))


def test_lora_dense_is_not_folded_into(rng):
    dense = L.Dense(4)
    model = keras.Sequential([keras.Input((5,)), dense, L.BatchNormalization()])
    dense.enable_lora(2)
    dense.lora_kernel_b.assign(rng.normal(size=(2, 4)))  # non-zero LoRA update
    x = rng.normal(size=(3, 5)).astype("float32")
    _, report = check_fold(model, x, rng, expect_bn_left=1)
    assert "LoRA" in report.records[0].reason


def test_sequential_built_by_a_call_and_unbuilt(rng):
    model = keras.Sequential([L.Dense(3), L.BatchNormalization()])
    with pytest.raises(ValueError, match="no graph yet"):
        fold_batchnorm(model)
    x = rng.normal(size=(2, 4)).astype("float32")
    model(x)  # builds it
    check_fold(model, x, rng)


def test_ops_nodes_in_the_graph(rng):
    """The minimal case, plus ops nodes between BN and its layers."""
    inp = keras.Input((8,))
    x = L.BatchNormalization()(L.Dense(4)(inp))
    x = keras.ops.relu(x + 3.0)
    x = L.Dense(4)(L.BatchNormalization()(x))
    folded, report = check_fold(keras.Model(inp, x * 2.0), np.ones((3, 8)), rng)
    assert report.num_folded == 2
    assert "add" in {type(op).__name__.lower() for op in folded.operations}


class _Holder(L.Layer):
    """A custom layer holding a BN, a Dense->BN Sequential, and a BN in a set."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = L.BatchNormalization()
        self.blocks = [keras.Sequential([L.Dense(6), L.BatchNormalization()])]
        self.odd = {L.BatchNormalization()}  # no slot to write back into

    def call(self, x, training=None):
        x = self.blocks[0](self.bn(x, training=training), training=training)
        for layer in self.odd:
            x = layer(x, training=training)
        return x


def test_wrappers_folded_or_reported(rng):
    inner = keras.Sequential([keras.Input((6,)), L.Dense(5), L.BatchNormalization()])
    inp = keras.Input((4, 6))
    x = L.TimeDistributed(L.BatchNormalization(name="bn"), name="td_bn")(inp)
    x = L.TimeDistributed(inner, name="td_seq")(x)
    x = _Holder(name="holder")(x)
    model = keras.Model(inp, L.Bidirectional(L.LSTM(2))(x))
    holder = model.get_layer("holder")
    bns = (
        model.get_layer("td_bn").layer,
        inner.layers[-1],
        holder.bn,
        holder.blocks[0].layers[-1],
        *holder.odd,
    )
    for layer in bns:
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(size=c))
        layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=c))
    x = rng.normal(size=(3, 4, 6)).astype("float32")
    before = [np.array(w) for w in model.get_weights()]
    folded, report = fold_batchnorm(model)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _rel_err(folded(x), model(x)) <= RTOL
    records = report.by_name()
    assert records["td_bn/bn"].action == "kept_as_scale_shift"
    assert "TimeDistributed" in records["td_bn/bn"].reason
    (seq_bn,) = [r for n, r in records.items() if n.startswith("td_seq/")]
    assert seq_bn.action == "folded_into_preceding"
    # Inside the custom layer: the BN it holds becomes a ChannelAffine, the
    # Sequential it holds is folded, the BN in a set is left and reported.
    held = {r.action: r for n, r in records.items() if n.startswith("holder/")}
    assert set(held) == {
        "kept_as_scale_shift",
        "folded_into_preceding",
        "left_unchanged",
    }
    assert "_Holder" in held["kept_as_scale_shift"].reason
    assert "no attribute" in held["left_unchanged"].reason
    assert report.num_unchanged == 1 and "1 left unchanged" in str(report)
    assert len(report.records) == len(bns)
    assert isinstance(folded.get_layer("td_bn").layer, ChannelAffine)
    new_holder = folded.get_layer("holder")
    assert isinstance(new_holder.bn, ChannelAffine)
    assert [type(la).__name__ for la in new_holder.blocks[0].layers] == ["Dense"]
    assert new_holder.bn in new_holder._layers and holder.bn not in new_holder._layers


def test_bn_tracked_but_unused_is_reported(rng):
    """BASNet's case: its encoder's stem BN is held but not on the graph."""
    encoder = keras.Sequential(
        [keras.Input((5,)), L.Dense(4), L.BatchNormalization(name="stem_bn")]
    )

    class WithSpare(keras.Model):
        def __init__(self):
            inp = keras.Input((5,))
            out = L.BatchNormalization()(L.Dense(3)(inp))
            super().__init__(inp, out)
            self.encoder = encoder  # tracked, never called by the graph

    model = WithSpare()
    folded, report = fold_batchnorm(model)
    assert report.num_folded == 1 and report.num_unchanged == 1
    assert report.by_name()["stem_bn"].reason.endswith("dropped")
    x = rng.normal(size=(2, 5)).astype("float32")
    assert _rel_err(folded(x), model(x)) <= RTOL
