"""Tests of `keras_bn.callbacks.BatchNormStatistics` (every backend)."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.callbacks import BatchNormStatistics
from keras_bn.callbacks.batchnorm_statistics import _STATISTICS
from tests._events import read_events, tensorboard_writer_available
from tests.harness import skip_inductor_fit

# Statistics are computed in float64 from float32 probe outputs; the reference
# differs only by the float32 forward (compiled probe vs. eager): rtol 1e-5,
# atol 1e-6 for values near zero.
RTOL, ATOL = 1e-5, 1e-6
# The models train compiled on TensorFlow and JAX (XLA), eagerly on torch, as
# Keras's own default there (`jit_compile="auto"` is eager on torch): its
# `jit_compile=True` is Inductor, minutes per fit on 2 cores. The test of the
# moments' accuracy in the compiled probe runs it on torch under
# KERAS_BN_TORCH_INDUCTOR=1.
JIT = keras.backend.backend() != "torch"
BN_CLASSES = {
    "keras_bn": keras_bn.BatchNormalization,
    "keras": keras.layers.BatchNormalization,
}


def _dense_model(rng, bn_class):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(7, name="d1")(inputs)
    h = bn_class(momentum=0.8, name="bn1")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dense(4, name="d2")(h)
    h = bn_class(momentum=0.8, name="bn2")(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def _conv_model(rng, bn_class):
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, name="c1")(inputs)
    h = bn_class(axis=-1, momentum=0.8, name="bn1")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def _compile(model, lr=0.1, jit_compile=JIT):
    model.compile(
        keras.optimizers.SGD(lr),
        "sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )
    return model


def _data(rng, shape, n=64):
    x = (2.0 + 3.0 * rng.normal(size=(n, *shape))).astype("float32")
    return x, rng.integers(0, 3, n)


def _expected(model, name, probe):
    layer = model.get_layer(name)
    x = keras.Model(model.input, layer.input)(probe)
    x = keras.ops.convert_to_numpy(x).astype("float64")
    reduce = tuple(range(x.ndim - 1))
    m, v = x.mean(axis=reduce), x.var(axis=reduce)
    mm = keras.ops.convert_to_numpy(layer.moving_mean).astype("float64")
    mv = keras.ops.convert_to_numpy(layer.moving_variance).astype("float64")
    eps = layer.epsilon
    gap = np.abs(m - mm) / np.sqrt(v + eps)
    ratio = np.abs(np.log((mv + eps) / (v + eps)))
    return {
        "moving_mean": mm.mean(),
        "moving_variance": mv.mean(),
        "batch_mean": m.mean(),
        "batch_variance": v.mean(),
        "mean_gap": gap.mean(),
        "mean_gap_max": gap.max(),
        "variance_log_ratio": ratio.mean(),
        "variance_log_ratio_max": ratio.max(),
    }


@pytest.mark.parametrize("bn", sorted(BN_CLASSES))
@pytest.mark.parametrize(
    "build, shape", [(_dense_model, (5,)), (_conv_model, (6, 6, 2))]
)
def test_statistics_equal_numpy(rng, bn, build, shape):
    model = _compile(build(rng, BN_CLASSES[bn]))
    x, y = _data(rng, shape)
    stats = BatchNormStatistics(probe_data=x[:32], every_n_batches=3)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    names = [
        la.name
        for la in model.layers
        if isinstance(la, keras.layers.BatchNormalization)
    ]
    rows = stats.history.rows()
    assert [r["layer"] for r in rows] == names * 3  # steps 0, 3, 4
    assert [r["step"] for r in rows[:: len(names)]] == [0, 3, 4]
    for name in names:
        row = [r for r in rows if r["layer"] == name][-1]
        for key, value in _expected(model, name, x[:32]).items():
            np.testing.assert_allclose(row[key], value, RTOL, ATOL, err_msg=key)
    first = rows[0]  # before training: moving stats are 0 and 1
    assert first["moving_mean"] == 0.0 and first["moving_variance"] == 1.0


# Compiled everywhere; on torch also eagerly (what `JIT` trains with there).
@pytest.mark.parametrize("jit", sorted({JIT, True}))
@pytest.mark.parametrize("axis", [-1, 1])
def test_batch_moments_stable_for_large_means(rng, axis, jit):
    """Batch moments are computed in float32 inside the probe: with inputs of
    mean 1e4 and standard deviation 1 they must still match float64 NumPy
    (a one-pass float32 variance would be off by orders of magnitude)."""
    skip_inductor_fit(jit)
    inputs = keras.Input((3, 4))
    h = keras_bn.BatchNormalization(axis=axis, name="bn1")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(h))
    model = _compile(keras.Model(inputs, outputs), lr=0.0, jit_compile=jit)
    x = (1e4 + rng.normal(size=(64, 3, 4))).astype("float32")
    y = rng.integers(0, 3, 64)
    stats = BatchNormStatistics(probe_data=x[:48], every_n_batches=100)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    row = stats.history.rows()[-1]
    ref = x[:48].astype("float64")
    reduce = tuple(i for i in range(3) if i != axis % 3)
    m, v = ref.mean(axis=reduce), ref.var(axis=reduce)
    np.testing.assert_allclose(row["batch_mean"], m.mean(), RTOL, ATOL)
    np.testing.assert_allclose(row["batch_variance"], v.mean(), RTOL, ATOL)
    layer = model.get_layer("bn1")
    mm = keras.ops.convert_to_numpy(layer.moving_mean).astype("float64")
    gap = np.abs(m - mm) / np.sqrt(v + layer.epsilon)
    np.testing.assert_allclose(row["mean_gap_max"], gap.max(), RTOL, ATOL)


def test_compute_returns_statistics_the_history_holds(rng):
    """`_compute` gives `{layer: {statistic: value}}` with the statistics of
    `_STATISTICS`, in column order; the history rows hold exactly those."""
    model = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    x, y = _data(rng, (5,))
    stats = BatchNormStatistics(probe_data=x[:16], every_n_batches=100)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    assert stats.history.columns == ("step", "epoch", "layer", *_STATISTICS)
    computed = stats._compute(stats._probe.run())
    assert list(computed) == ["bn1", "bn2"]
    for row, (layer, values) in zip(
        stats.history.rows()[-2:], computed.items(), strict=True
    ):
        assert list(values) == list(_STATISTICS) and row["layer"] == layer
        np.testing.assert_equal({k: row[k] for k in values}, values)
    # The probe returns three per-channel vectors per layer, not the inputs.
    shapes = [[a.shape for a in moments] for moments in stats._probe.run()]
    assert shapes == [[(7,)] * 3, [(4,)] * 3]


class _MovingMeans(keras.callbacks.Callback):
    """After each batch, reads bn1's moving mean (syncing JAX's state first)."""

    def __init__(self):
        super().__init__()
        self.seen = {}
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        mm = self.model.get_layer("bn1").moving_mean
        # float64, as the callback averages: a float32 mean of values that
        # nearly cancel differs from it by more than the tolerance.
        self.seen[self.step] = keras.ops.convert_to_numpy(mm).astype("float64").mean()


def test_mid_training_moving_statistics_are_current(rng):
    model = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    x, y = _data(rng, (5,))
    stats = BatchNormStatistics(probe_data=x[:16], layers=["bn1"], every_n_batches=1)
    ref = _MovingMeans()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[stats, ref], verbose=0)
    steps, means = stats.history.series("bn1", "moving_mean")
    assert steps == list(range(9))
    np.testing.assert_allclose(means[1:], [ref.seen[s] for s in steps[1:]], rtol=1e-6)
    assert len(set(means)) == len(means)  # momentum 0.8: it moves every step


@pytest.mark.parametrize("training", [False, True])
def test_probe_has_no_side_effects(rng, training):
    """Training with the callback (every batch, even in training mode) gives the
    same weights and moving statistics as training without it."""
    x, y = _data(rng, (5,))
    first = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    second = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    second.set_weights(first.get_weights())
    stats = BatchNormStatistics(probe_data=x[:16], every_n_batches=1, training=training)
    first.fit(
        x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[stats], verbose=0
    )
    second.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(stats.history) == 2 * 5


def test_training_mode_probe_uses_batch_statistics_upstream(rng):
    model = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    x, y = _data(rng, (5,))
    stats = BatchNormStatistics(
        probe_data=x[:32], layers="bn2", every_n_batches=4, training=True
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    layer = model.get_layer("bn2")
    h = keras.Model(model.input, layer.input)(x[:32], training=True)
    h = keras.ops.convert_to_numpy(h).astype("float64")
    row = stats.history.rows()[-1]
    np.testing.assert_allclose(row["batch_mean"], h.mean(axis=0).mean(), RTOL, ATOL)
    np.testing.assert_allclose(row["batch_variance"], h.var(axis=0).mean(), RTOL, ATOL)


def test_csv_and_tensorboard(rng, tmp_path):
    tensorboard_writer_available()
    model = _compile(_dense_model(rng, keras.layers.BatchNormalization))
    x, y = _data(rng, (5,))
    stats = BatchNormStatistics(
        probe_data=x[:16],
        every_n_batches=2,
        csv_path=tmp_path / "bn.csv",
        log_dir=tmp_path / "tb",
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    assert stats._csv is None and stats._tb is None  # closed in on_train_end
    d = stats.history.as_dict()
    assert list(d) == [
        "step",
        "epoch",
        "layer",
        "moving_mean",
        "moving_variance",
        "batch_mean",
        "batch_variance",
        "mean_gap",
        "mean_gap_max",
        "variance_log_ratio",
        "variance_log_ratio_max",
    ]
    with open(tmp_path / "bn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == d["layer"]
    np.testing.assert_allclose(
        [float(r["mean_gap"]) for r in rows], d["mean_gap"], rtol=1e-12
    )
    scalars, histograms = read_events(tmp_path / "tb")
    for step, layer, gap in zip(d["step"], d["layer"], d["mean_gap"], strict=True):
        assert scalars[(f"batchnorm/{layer}/mean_gap", step)] == pytest.approx(
            gap, rel=1e-6
        )
        assert (f"batchnorm/{layer}/variance_log_ratio", step) in histograms


@pytest.mark.parametrize(
    "layers, match",
    [
        ("nope", r"Unknown layer name 'nope'"),
        (["d1"], "'d1' in `layers` is a Dense, not a BatchNormalization"),
    ],
)
def test_bad_layers(rng, layers, match):
    model = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    x, y = _data(rng, (5,), n=16)
    stats = BatchNormStatistics(probe_data=x, layers=layers)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)


def test_model_without_batchnorm(rng):
    inputs = keras.Input((5,))
    model = _compile(
        keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    )
    x, y = _data(rng, (5,), n=16)
    with pytest.raises(ValueError, match="no top-level BatchNormalization"):
        model.fit(x, y, callbacks=[BatchNormStatistics(probe_data=x)], verbose=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"probe_data": None}, ValueError, "probe_data` is required"),
        ({"probe_data": np.zeros((0, 5))}, ValueError, "at least one example"),
        ({"probe_data": np.float32(3.0)}, ValueError, "at least one example"),
        ({"every_n_batches": -1}, ValueError, "every_n_batches=-1"),
        ({"training": 1}, TypeError, "training=1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"probe_data": np.zeros((4, 5), "float32"), **kwargs}
    with pytest.raises(error, match=match):
        BatchNormStatistics(**args)


def test_second_fit_continues_history_and_csv(rng, tmp_path):
    model = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    x, y = _data(rng, (5,))  # 4 batches per epoch
    stats = BatchNormStatistics(
        probe_data=x[:16],
        layers=["bn2"],
        every_n_batches=3,
        csv_path=tmp_path / "b.csv",
    )
    for _ in range(2):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    steps = [0, 3, 4, 4, 6, 8]
    assert stats.history.as_dict()["step"] == steps
    with open(tmp_path / "b.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == steps
    # After the second fit, the record at its start (step 4) matches the
    # moving statistics the first fit ended with: the same weights.
    rows = stats.history.rows()
    assert rows[2] == {**rows[3], "epoch": rows[2]["epoch"]}


def test_plot_writes_png(rng, tmp_path):
    pytest.importorskip("matplotlib")
    model = _compile(_dense_model(rng, keras_bn.BatchNormalization))
    x, y = _data(rng, (5,))
    stats = BatchNormStatistics(probe_data=x[:16], every_n_batches=2)
    with pytest.raises(ValueError, match="history is empty"):
        stats.plot(tmp_path / "empty.png")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    path = stats.plot(tmp_path / "gaps.png", title="t")
    assert path == str(tmp_path / "gaps.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    stats.plot(tmp_path / "one.png", layers=["bn1"])
    with pytest.raises(ValueError, match="Unknown layers"):
        stats.plot(tmp_path / "x.png", layers=["nope"])
