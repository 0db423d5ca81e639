"""Tests for `keras_bn.replace_batchnorm`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn._keras_graph import sublayers
from keras_bn.replace import to_keras_batchnorm
from tests import harness as h


def _randomize_bns(model, rng):
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            h.set_bn_weights(layer, rng)


def _all_layers(model):
    return sublayers(model)


def _sequential():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, use_bias=False),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.ReLU(),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(center=False, epsilon=1e-4),
        ],
        name="seq",
    )


def _functional():
    inp = keras.Input((5, 5, 2))
    a = keras.layers.Conv2D(4, 3, padding="same")(inp)
    a = keras.layers.BatchNormalization(axis=-1)(a)
    b = keras.layers.Conv2D(4, 1)(inp)
    b = keras.layers.BatchNormalization(renorm=True, renorm_momentum=0.9)(b)
    out = keras.layers.Add()([a, b])
    out = keras.layers.GlobalAveragePooling2D()(out)
    return keras.Model(inp, keras.layers.Dense(3)(out), name="func")


def _nested():
    inner = _sequential()
    inp = keras.Input((6,))
    x = inner(inp)
    x = keras.layers.BatchNormalization(scale=False)(x)
    return keras.Model(inp, keras.layers.Dense(2)(x), name="outer")


def _ops_node():
    """The minimal case: a keras.ops node (`x + 3.0`) in the graph."""
    inp = keras.Input((8,))
    x = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inp))
    x = keras.ops.relu(x + 0.5)
    return keras.Model(inp, keras.layers.BatchNormalization()(x) * 2.0)


def _shared():
    dense, bn = keras.layers.Dense(6), keras.layers.BatchNormalization()
    inp = keras.Input((6,))
    return keras.Model(inp, bn(dense(bn(dense(inp)))))


def _wrappers():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()]
    )
    inp = keras.Input((5, 4))
    x = keras.layers.TimeDistributed(keras.layers.BatchNormalization())(inp)
    x = keras.layers.TimeDistributed(inner)(x)
    return keras.Model(inp, keras.layers.Bidirectional(keras.layers.LSTM(2))(x))


BUILDERS = {
    "ops_node": (_ops_node, (8, 8)),
    "shared": (_shared, (8, 6)),
    "wrappers": (_wrappers, (8, 5, 4)),
    "sequential": (_sequential, (8, 6)),
    "functional": (_functional, (4, 5, 5, 2)),
    "nested": (_nested, (8, 6)),
}


def _bn_layers(model):
    return [
        la
        for la in _all_layers(model)
        if isinstance(la, keras.layers.BatchNormalization)
    ]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_replace_same_function_new_layers(rng, kind):
    build, shape = BUILDERS[kind]
    model = build()
    _randomize_bns(model, rng)
    old_ids = [id(la) for la in _all_layers(model)]
    old_weights = [w.copy() for w in model.get_weights()]
    old_bns = _bn_layers(model)
    assert old_bns and all(
        type(la) is keras.layers.BatchNormalization for la in old_bns
    )

    new = keras_bn.replace_batchnorm(model)
    for a, b in zip(old_weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    new_bns = _bn_layers(new)
    assert len(new_bns) == len(old_bns)
    assert all(type(la) is keras_bn.BatchNormalization for la in new_bns)
    for a, b in zip(old_bns, new_bns, strict=True):
        assert {
            k: v
            for k, v in b.get_config().items()
            if k in a.get_config() and k != "name"
        } == {k: v for k, v in a.get_config().items() if k != "name"}
    assert not set(map(id, _all_layers(new))) & set(old_ids)
    for a, b in zip(model.weights, new.weights, strict=True):
        assert a.name == b.name and a.shape == b.shape
        np.testing.assert_array_equal(h.to_numpy(a), h.to_numpy(b))

    x = rng.normal(0.3, 1.5, shape).astype("float32")
    h.assert_close(
        new(x, training=False), h.to_numpy(model(x, training=False)), what="inference"
    )
    for step in range(2):  # each updates its own moving statistics
        h.assert_close(
            new(x, training=True),
            h.to_numpy(model(x, training=True)),
            what=f"training step {step}",
        )
    for a, b in zip(model.weights, new.weights, strict=True):
        h.assert_close(b, h.to_numpy(a), what=a.path)

    # The input model still has its original layers (same objects).
    assert [id(la) for la in _all_layers(model)] == old_ids
    assert all(type(la) is keras.layers.BatchNormalization for la in _bn_layers(model))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_input_model_weights_untouched(rng, kind):
    build, _ = BUILDERS[kind]
    model = build()
    _randomize_bns(model, rng)
    before = [w.copy() for w in model.get_weights()]
    new = keras_bn.replace_batchnorm(model)
    for v in new.weights:
        v.assign(np.zeros(v.shape, "float32") + 7.0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# The class captured once, as `from keras.layers import BatchNormalization`
# at import does: building the layer again cannot make keras_bn's, so these
# BNs are swapped in place, in the built copy.
_CAPTURED_BN = keras.layers.BatchNormalization


class _Holder(keras.layers.Layer):
    """BNs held every way a custom layer can hold them, around a Dense."""

    def __init__(self, how="attribute", captured=True, **kwargs):
        super().__init__(**kwargs)
        self.how, self.captured = how, captured
        self.dense = keras.layers.Dense(3)
        bn = _CAPTURED_BN if captured else keras.layers.BatchNormalization
        if how == "attribute":
            self.bn = bn()
        elif how == "list":
            self.bns = [bn(), bn(epsilon=1e-2)]
        elif how == "dict":
            self.bns = {"a": bn(), "b": bn(center=False)}
        elif how == "nested":
            self.bns = {"pair": (bn(), [bn(), {"deep": bn(scale=False)}])}
        elif how == "sequential":  # a graph model held as an attribute
            self.bns = [keras.Sequential([keras.Input((3,)), bn(), bn()])]
        elif how == "set":  # tracked by Keras, but no slot to write back into
            self.bns = {bn()}

    def _all(self):
        # getattr, not vars(): on torch a layer held directly as an attribute
        # lives in the torch module's `_modules`, not in the instance dict.
        held = {k: getattr(self, k) for k in ("bn", "bns") if hasattr(self, k)}
        return list(keras.tree.flatten(held)) or list(getattr(self, "bns", ()))

    def call(self, x, training=None):
        x = self.dense(x)
        held = list(self.bns) if self.how == "set" else self._all()
        for layer in held:
            x = layer(x, training=training)
        return x

    def get_config(self):
        return {**super().get_config(), "how": self.how, "captured": self.captured}


HOW = ["attribute", "list", "dict", "nested", "sequential"]


def _holder_model(how, captured=True):
    inp = keras.Input((3,))
    x = _Holder(how, captured, name="holder")(inp)
    return keras.Model(inp, keras.layers.Dense(2)(x))


@pytest.mark.parametrize("captured", [True, False], ids=["in_place", "rebuilt"])
@pytest.mark.parametrize("how", HOW)
def test_bn_held_by_custom_layer_is_swapped(rng, how, captured):
    model = _holder_model(how, captured)
    _randomize_bns(model, rng)
    n = len(_bn_layers(model))
    new, report = keras_bn.replace_batchnorm(model, return_report=True)
    # The class is not registered: the copy is cloned layer by layer.
    assert report.route == "clone" and report.swapped == n and not report.kept
    bns = _bn_layers(new)
    assert len(bns) == n and all(type(la) is keras_bn.BatchNormalization for la in bns)
    holder = new.get_layer("holder")
    # The tracker holds the new layers only, in the old order: weights line up
    # one to one with the original's (a checkpoint still maps).
    assert not [
        la for la in sublayers(holder) if type(la) is keras.layers.BatchNormalization
    ]
    assert [w.name for w in new.weights] == [w.name for w in model.weights]
    for a, b in zip(model.weights, new.weights, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(h.to_numpy(a), h.to_numpy(b))
    x = rng.normal(size=(5, 3)).astype("float32")
    h.assert_close(new(x), h.to_numpy(model(x)), what="inference")
    for step in range(2):
        h.assert_close(
            new(x, training=True),
            h.to_numpy(model(x, training=True)),
            what=f"training step {step}",
        )
    assert [id(la) for la in _bn_layers(model)] != [id(la) for la in bns]
    if keras.backend.backend() == "torch":
        # What a torch optimizer or DDP reads: the copy's variables, each once.
        params = [id(p) for p in new.parameters()]
        assert sorted(params) == sorted(id(w.value) for w in new.weights)


def test_bn_that_cannot_be_swapped_is_reported(rng):
    model = _holder_model("set")
    _randomize_bns(model, rng)
    with pytest.warns(UserWarning, match=r"holder/.*held in no attribute"):
        new, report = keras_bn.replace_batchnorm(model, return_report=True)
    assert report.swapped == 0 and len(report.kept) == 1
    x = rng.normal(size=(4, 3)).astype("float32")
    h.assert_close(new(x), h.to_numpy(model(x)), what="inference")


def test_registered_functional_subclass_keeps_its_class(rng):
    """The config route: a registered Functional subclass stays itself."""
    model = _TinyBackbone()
    _randomize_bns(model, rng)
    new, report = keras_bn.replace_batchnorm(model, return_report=True)
    assert report.route == "config" and report.swapped == 4 == len(_bn_layers(model))
    assert type(new) is _TinyBackbone and new.width == 4
    assert set(new.pyramid) == {"P1"}
    assert type(new.spare) is keras_bn.BatchNormalization
    assert [(w.name, w.shape) for w in new.weights] == [
        (w.name, w.shape) for w in model.weights
    ]
    for a, b in zip(model.weights, new.weights, strict=True):
        np.testing.assert_array_equal(h.to_numpy(a), h.to_numpy(b))
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    h.assert_close(new(x), h.to_numpy(model(x)), what="inference")


@keras.saving.register_keras_serializable(package="keras_bn_tests")
class _TinyBackbone(keras.Model):
    """Builds its graph in its constructor, like a keras_hub Backbone."""

    def __init__(self, width=4, **kwargs):
        inp = keras.Input((6, 6, 2))
        x = keras.layers.Conv2D(width, 3)(inp)
        p1 = keras.layers.BatchNormalization()(x)
        out = _Holder("list", captured=False)(keras.layers.Flatten()(p1))
        super().__init__(inp, out, **kwargs)
        self.width = width
        self.pyramid = {"P1": p1}
        # Held but not on the graph (BASNet holds its encoder's unused stem):
        # cloning the graph would lose it, and its weights.
        self.spare = keras.layers.BatchNormalization()
        self.spare.build((None, width))

    def get_config(self):
        return {"width": self.width, "name": self.name}


@pytest.mark.parametrize("kind", ["wrappers", "nested", "ops_node"])
def test_to_keras_batchnorm_inverts_replace(rng, kind):
    build, shape = BUILDERS[kind]
    model = build()
    _randomize_bns(model, rng)
    back = to_keras_batchnorm(keras_bn.replace_batchnorm(model))
    assert _bn_layers(back) and all(
        type(la) is keras.layers.BatchNormalization for la in _bn_layers(back)
    )
    x = rng.normal(size=shape).astype("float32")
    h.assert_close(back(x), h.to_numpy(model(x)), what="inference")


def test_replaced_model_trains(rng):
    model = keras_bn.replace_batchnorm(_sequential())
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 4)).astype("float32")
    hist = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_subclassed_model_raises():
    model = _Subclassed()
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(TypeError, match=r"Sequential or Functional.*subclassed"):
        keras_bn.replace_batchnorm(model)


def test_non_model_raises():
    with pytest.raises(TypeError, match=r"Argument `model` must be.*Received"):
        keras_bn.replace_batchnorm(keras.layers.BatchNormalization())


def test_unbuilt_model_raises():
    model = keras.Sequential(
        [keras.layers.Dense(3), keras.layers.BatchNormalization()], name="lazy"
    )
    with pytest.raises(ValueError, match=r"'lazy'.*is not built"):
        keras_bn.replace_batchnorm(model)
