"""Tests of `keras_bn.callbacks.ActivationStatistics` (every backend)."""

from __future__ import annotations

import csv
import math

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.callbacks import SATURATION_THRESHOLDS, ActivationStatistics
from keras_bn.callbacks.activation_statistics import _percentiles
from tests._events import read_events, tensorboard_writer_available
from tests.harness import skip_inductor_fit

# Percentiles are computed in float64 from the float32 probe outputs, so the
# only difference to the reference is the float32 forward itself (XLA-compiled
# probe vs. an eager call): rtol 1e-5, with atol 1e-6 for values near zero.
RTOL, ATOL = 1e-5, 1e-6
# The models train compiled on TensorFlow and JAX (XLA), eagerly on torch, as
# Keras's own default there (`jit_compile="auto"` is eager on torch): its
# `jit_compile=True` is Inductor, minutes per fit on 2 cores. The test of the
# compiled probe runs it on torch under KERAS_BN_TORCH_INDUCTOR=1.
JIT = keras.backend.backend() != "torch"


def _model(rng, scale=1.0, activation="sigmoid", jit_compile=JIT):
    """Dense -> BN -> Activation -> Dense -> softmax, with named layers."""
    inputs = keras.Input((6,))
    init = keras.initializers.RandomNormal(0.0, scale, seed=int(rng.integers(1e6)))
    h = keras.layers.Dense(8, use_bias=False, kernel_initializer=init, name="d1")(
        inputs
    )
    h = keras_bn.BatchNormalization(name="bn1")(h)
    h = keras.layers.Activation(activation, name="act1")(h)
    h = keras.layers.Dense(8, kernel_initializer=init, name="d2")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.5),
        "sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )
    return model


def _data(rng, n=96):
    x = (3.0 * rng.normal(size=(n, 6))).astype("float32")
    return x, rng.integers(0, 3, n)


def _reference(model, layer, which, probe, unit=None):
    layer = model.get_layer(layer)
    tensor = layer.input if which == "input" else layer.output
    x = keras.ops.convert_to_numpy(keras.Model(model.input, tensor)(probe))
    x = x.astype("float64")
    return (x if unit is None else x[..., unit]).ravel()


class _Reference(keras.callbacks.Callback):
    """Recomputes the percentiles with a separate eager forward after every
    training batch, keyed by the global step (batches trained so far)."""

    def __init__(self, layer, which, probe):
        super().__init__()
        self.layer, self.which, self.probe = layer, which, probe
        self.seen = {}
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        x = _reference(self.model, self.layer, self.which, self.probe)
        self.seen[self.step] = np.percentile(x, [15, 50, 85])


@pytest.mark.parametrize("which", ["input", "output"])
@pytest.mark.parametrize("unit", [None, 2])
@pytest.mark.parametrize("percentiles", [(15, 50, 85), (2.5, 97.5)])
def test_statistics_equal_numpy_on_probe(rng, which, unit, percentiles):
    model = _model(rng)
    x, y = _data(rng)
    probe = x[:40]
    stats = ActivationStatistics(
        ["act1", "d2"],
        probe_data=probe,
        percentiles=percentiles,
        every_n_batches=2,
        tensor=which,
        unit=unit,
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    d = stats.history.as_dict()
    for layer in ("act1", "d2"):
        ref = _reference(model, layer, which, probe, unit)
        i = max(j for j, name in enumerate(d["layer"]) if name == layer)
        assert d["step"][i] == 6
        got = [d[f"p{q:g}"][i] for q in percentiles]
        np.testing.assert_allclose(got, np.percentile(ref, percentiles), RTOL, ATOL)
        np.testing.assert_allclose(d["mean"][i], ref.mean(), RTOL, ATOL)
        np.testing.assert_allclose(d["std"][i], ref.std(), RTOL, ATOL)


class _SyncFallback(ActivationStatistics):
    """Forgets the variable -> state index, forcing `model.jax_state_sync()`."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._probe._index = {}


class _BeginReference(keras.callbacks.Callback):
    """Like `_Reference`, but reads the weights in `on_train_batch_begin` and
    `on_epoch_end` (before the next step, after the epoch's last), so that it
    leaves Keras's asynchronous dispatch of batch-end hooks on."""

    def __init__(self, layer, which, probe):
        super().__init__()
        self.layer, self.which, self.probe = layer, which, probe
        self.seen = {}
        self.start = 0

    def _read(self, step):
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        x = _reference(self.model, self.layer, self.which, self.probe)
        self.seen[step] = np.percentile(x, [15, 50, 85])

    def on_train_batch_begin(self, batch, logs=None):
        if batch:
            self._read(self.start + batch)

    def on_epoch_end(self, epoch, logs=None):
        self.start += self.params["steps"]
        self._read(self.start)


@pytest.mark.parametrize("reference", [_Reference, _BeginReference])
@pytest.mark.parametrize("callback", [ActivationStatistics, _SyncFallback])
def test_mid_training_records_read_current_weights(rng, callback, reference):
    """On JAX the weights live in the trainer's state during fit; each record
    must see the weights after that very step (not stale or initial ones),
    whether read from that state or after `jax_state_sync()`, and whether
    Keras runs batch-end hooks synchronously or asynchronously."""
    model = _model(rng)
    x, y = _data(rng)
    stats = callback("act1", probe_data=x[:32], every_n_batches=1)
    ref = reference("act1", "input", x[:32])
    # Keras (private API, read only here) dispatches batch-end hooks on worker
    # threads on thread-safe backends unless a callback's hook may block.
    dispatch = keras.callbacks.CallbackList([stats, ref], model=model)._async_train
    threaded = keras.backend.backend() in ("jax", "torch")  # IS_THREAD_SAFE
    expected = reference is _BeginReference and threaded
    assert dispatch is expected
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[stats, ref], verbose=0)
    d = stats.history.as_dict()
    assert d["step"] == list(range(13))
    assert sorted(ref.seen) == list(range(1, 13))
    for step, expected in ref.seen.items():
        got = [d[k][step] for k in ("p15", "p50", "p85")]
        np.testing.assert_allclose(got, expected, RTOL, ATOL, err_msg=f"{step=}")
    # SGD at lr 0.5 moves the weights at every step, so records must differ.
    assert len(set(d["p50"])) == len(d["p50"])


class _CountTraces(ActivationStatistics):
    traces = 0

    def _reduce(self, outputs):
        type(self).traces += 1  # runs only while the probe is being traced
        return super()._reduce(outputs)


def _torch_compilations(probe) -> int:
    """The graphs `torch.compile` (Dynamo) compiled for the probe's function."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    fn = getattr(probe._fn, "_torchdynamo_orig_callable", probe._fn)
    return len(_debug_get_cache_entry_list(fn.__code__))


# Compiled everywhere; on torch also eagerly (what `JIT` trains with there).
@pytest.mark.parametrize("jit", sorted({JIT, True}))
def test_probe_compiled_once_and_reduced_inside(rng, jit):
    """The probe is traced once for all records of two fits (the values come
    from the trainer's state or from the variables: same signature), and
    returns the reduced (one unit, flat) tensor, not the layer's output."""
    skip_inductor_fit(jit)
    _CountTraces.traces = 0
    # Dynamo keeps a traced function's Python side effects: it would replay
    # the counter's increment at every call (and recompile for each new value
    # it reads). On torch the graphs compiled for the probe are counted instead.
    on_torch = keras.backend.backend() == "torch"
    model = _model(rng, jit_compile=jit)
    x, y = _data(rng)
    callback = ActivationStatistics if on_torch else _CountTraces
    stats = callback("act1", probe_data=x[:40], every_n_batches=1, unit=3)
    for _ in range(2):
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[stats], verbose=0)
    assert len(stats.history) == 26  # 13 records (steps 0-12) per fit
    if not on_torch:
        assert _CountTraces.traces == 1
    elif model.jit_compile:
        assert _torch_compilations(stats._probe) == 1
    else:  # torch without jit_compile runs the probe eagerly: nothing traced
        assert not hasattr(stats._probe._fn, "_torchdynamo_orig_callable")
    (values,) = stats._probe.run()
    assert values.shape == (40,) and values.dtype == np.float32
    np.testing.assert_allclose(
        values, _reference(model, "act1", "input", x[:40], unit=3), RTOL, ATOL
    )


def test_compute_returns_statistics_the_history_holds(rng):
    """`_compute` gives `{layer: {statistic: value}}`; the base class writes the
    history rows (and CSV/TensorBoard) from exactly that."""
    model = _model(rng)
    x, y = _data(rng)
    stats = ActivationStatistics(
        ["act1", ("d2", "output")], probe_data=x[:40], every_n_batches=100
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    computed = stats._compute(stats._probe.run())
    assert list(computed) == ["act1", "d2"]
    rows = stats.history.rows()[-2:]
    for row, (layer, values) in zip(rows, computed.items(), strict=True):
        assert list(values) == ["p15", "p50", "p85", "mean", "std", "saturated"]
        assert row["layer"] == layer
        assert row["tensor"] == {"act1": "input", "d2": "output"}[layer]
        np.testing.assert_equal({k: row[k] for k in values}, values)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("qs", [(15, 50, 85), (0, 2.5, 100), (33.3,)])
@pytest.mark.parametrize("ties", [False, True])
def test_percentiles_equal_numpy(rng, n, qs, ties):
    x = rng.normal(size=n).astype("float32")
    if ties:
        x = np.round(x)
    # Same order statistics; only float64 rounding of the interpolation index
    # can differ from NumPy's: rtol 1e-12.
    ref = np.percentile(x.astype("float64"), qs)
    np.testing.assert_allclose(_percentiles(x, qs), ref, rtol=1e-12, atol=0)


def test_percentiles_nan_like_numpy():
    x = np.array([1.0, np.nan, 3.0], dtype="float32")
    assert all(math.isnan(v) for v in _percentiles(x, (15, 50)))
    assert np.isnan(np.percentile(x, (15, 50))).all()


@pytest.mark.parametrize(
    "steps_per_execution, expected_steps",
    # 6 batches per epoch. With 4 per execution they end at steps 4, 6, 10, 12:
    # the record due at 8 lands on the first execution end past it, 10.
    [(1, [0, 4, 8, 12]), (2, [0, 4, 8, 12]), (4, [0, 4, 10, 12])],
)
def test_schedule_history_columns_and_continuation(
    rng, steps_per_execution, expected_steps
):
    if steps_per_execution > 1 and keras.backend.backend() == "torch":
        pytest.skip(
            "Keras's PyTorch trainer has no steps_per_execution > 1 (it runs "
            "one batch per call and raises for more)"
        )
    model = _model(rng)
    model.compile(
        keras.optimizers.SGD(0.1),
        "sparse_categorical_crossentropy",
        jit_compile=JIT,
        steps_per_execution=steps_per_execution,
    )
    x, y = _data(rng)  # 96 / 16 = 6 batches per epoch
    stats = ActivationStatistics(
        ["act1", "d2"], probe_data=(x[:8], y[:8]), every_n_batches=4
    )
    for fit in range(2):  # the second fit continues at the optimizer's step 12
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[stats], verbose=0)
        steps = [s + 12 * k for k in range(fit + 1) for s in expected_steps]
        d = stats.history.as_dict()
        assert list(d) == [
            "step",
            "epoch",
            "layer",
            "tensor",
            "p15",
            "p50",
            "p85",
            "mean",
            "std",
            "saturated",
        ]
        assert d["step"][::2] == steps
        assert d["epoch"][::2] == [0, 0, 1, 1] * (fit + 1)
        assert d["layer"] == ["act1", "d2"] * 4 * (fit + 1)
        assert d["tensor"] == ["input"] * 8 * (fit + 1)
        assert stats.history.series("d2", "step")[0] == steps
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 24
    frame = stats.history.to_dataframe()
    assert frame.shape == (16, 10)
    stats.history.clear()
    assert len(stats.history) == 0


def test_step_is_the_optimizers(rng):
    """Training before the callback is attached moves its step axis."""
    model = _model(rng)
    x, y = _data(rng)  # 6 batches per epoch
    model.fit(x[:48], y[:48], batch_size=16, epochs=1, verbose=0)  # 3 steps
    stats = ActivationStatistics("act1", probe_data=x[:8], every_n_batches=4)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    assert stats.history.as_dict()["step"] == [3, 4, 8, 9]


@pytest.mark.parametrize(
    "activation, setting, threshold",
    [
        ("sigmoid", "auto", SATURATION_THRESHOLDS["sigmoid"]),
        ("tanh", "auto", SATURATION_THRESHOLDS["tanh"]),
        ("relu", "auto", None),
        ("relu", 1.5, 1.5),
        ("sigmoid", None, None),
    ],
)
def test_saturation_fraction(rng, activation, setting, threshold):
    model = _model(rng, scale=2.0, activation=activation)  # large inputs
    x, y = _data(rng)
    stats = ActivationStatistics(
        ["act1", "d1"],
        probe_data=x[:64],
        every_n_batches=3,
        saturation_threshold=setting,
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    rows = stats.history.rows()
    last = {r["layer"]: r for r in rows if r["step"] == 6}
    ref = _reference(model, "act1", "input", x[:64])
    if threshold is None:
        assert math.isnan(last["act1"]["saturated"])
    else:
        expected = np.mean(np.abs(ref) > threshold)
        assert 0.0 < expected < 1.0  # the check below is not vacuous
        assert last["act1"]["saturated"] == pytest.approx(expected, abs=0)
    d1_saturated = last["d1"]["saturated"]
    assert math.isnan(d1_saturated) == (setting in ("auto", None))


def test_csv_written_and_files_closed(rng, tmp_path):
    model = _model(rng)
    x, y = _data(rng)
    path = tmp_path / "sub" / "act.csv"
    stats = ActivationStatistics(
        "act1", probe_data=x[:16], every_n_batches=2, csv_path=path
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    assert stats._csv is None  # closed in on_train_end
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    d = stats.history.as_dict()
    assert list(rows[0]) == list(d)
    assert [int(r["step"]) for r in rows] == d["step"] == [0, 2, 4, 6]
    np.testing.assert_allclose([float(r["p50"]) for r in rows], d["p50"], rtol=1e-12)


def test_csv_appended_by_a_second_fit_and_header_checked(rng, tmp_path):
    model = _model(rng)
    x, y = _data(rng)
    path = tmp_path / "act.csv"
    stats = ActivationStatistics(
        "act1", probe_data=x[:16], every_n_batches=3, csv_path=path
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    # A new callback object (a resumed script) appends too.
    again = ActivationStatistics(
        "act1", probe_data=x[:16], every_n_batches=3, csv_path=path
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[again], verbose=0)
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    assert lines.count(lines[0]) == 1  # one header
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 3, 6, 6, 9, 12]
    assert [int(r["step"]) for r in rows[3:]] == again.history.as_dict()["step"]

    other = ActivationStatistics(
        "act1", probe_data=x[:16], percentiles=(10, 90), csv_path=path
    )
    with pytest.raises(ValueError, match=r"act\.csv.*header.*another `csv_path`"):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[other], verbose=0)
    with open(path, newline="") as f:
        assert f.read().splitlines() == lines  # left as it was


class _CsvLines(keras.callbacks.Callback):
    def __init__(self, path):
        super().__init__()
        self.path, self.lines = path, []

    def on_epoch_end(self, epoch, logs=None):
        with open(self.path) as f:
            self.lines.append(len(f.readlines()))


def test_csv_flushed_at_each_epoch_end(rng, tmp_path):
    model = _model(rng)
    x, y = _data(rng)  # 6 batches per epoch
    path = tmp_path / "act.csv"
    stats = ActivationStatistics(
        "act1", probe_data=x[:16], every_n_batches=2, csv_path=path
    )
    lines = _CsvLines(path)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[stats, lines], verbose=0)
    # header + steps 0, 2, 4, 6, then 8, 10, 12
    assert lines.lines == [5, 8]


def test_tensorboard_events_readable_and_continued(rng, tmp_path):
    tensorboard_writer_available()
    model = _model(rng)
    x, y = _data(rng)
    stats = ActivationStatistics(
        "act1", probe_data=x[:16], every_n_batches=3, log_dir=tmp_path
    )
    for _ in range(2):  # the second fit's curves continue at step 6
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    assert stats._tb is None  # closed in on_train_end
    scalars, histograms = read_events(tmp_path)
    d = stats.history.as_dict()
    assert sorted(set(d["step"])) == [0, 3, 6, 9, 12]
    assert {s for t, s in scalars if t == "activations/act1/input/p50"} == set(
        d["step"]
    )
    for step, p50, std in zip(d["step"], d["p50"], d["std"], strict=True):
        assert scalars[("activations/act1/input/p50", step)] == pytest.approx(
            p50, rel=1e-6
        )
        assert scalars[("activations/act1/input/std", step)] == pytest.approx(
            std, rel=1e-6
        )
        assert ("activations/act1/input", step) in histograms


def test_plot_writes_png(rng, tmp_path):
    pytest.importorskip("matplotlib")
    model = _model(rng)
    x, y = _data(rng)
    stats = ActivationStatistics(["act1", "d2"], probe_data=x[:16], every_n_batches=2)
    with pytest.raises(ValueError, match="history is empty"):
        stats.plot(tmp_path / "empty.png")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    path = stats.plot(tmp_path / "bands.png", title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="Unknown layers"):
        stats.plot(tmp_path / "x.png", layers=["nope"])


def test_sequential_model_and_layer_objects(rng):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="a"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Activation("tanh", name="t"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=JIT)
    x, y = _data(rng)
    stats = ActivationStatistics(
        [model.get_layer("t"), ("a", "output")], probe_data=x[:32], every_n_batches=6
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
    d = stats.history.as_dict()
    assert d["tensor"] == ["input", "output"] * 2
    sub = keras.Model(model.inputs[0], model.get_layer("t").input)
    ref = keras.ops.convert_to_numpy(sub(x[:32])).astype("float64")
    np.testing.assert_allclose(d["p85"][2], np.percentile(ref, 85), RTOL, ATOL)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"probe_data": None}, ValueError, "probe_data` is required"),
        ({"probe_data": np.zeros((0, 6))}, ValueError, "at least one example"),
        ({"percentiles": ()}, ValueError, "percentiles"),
        ({"percentiles": (50, 101)}, ValueError, r"percentiles=\(50, 101\)"),
        ({"percentiles": (50, 50)}, ValueError, "distinct"),
        ({"every_n_batches": 0}, ValueError, "every_n_batches=0"),
        ({"every_n_batches": 2.5}, ValueError, "every_n_batches=2.5"),
        ({"tensor": "middle"}, ValueError, "tensor='middle'"),
        ({"unit": 1.5}, TypeError, "unit=1.5"),
        ({"saturation_threshold": -1.0}, ValueError, "saturation_threshold=-1.0"),
        ({"training": "yes"}, TypeError, "training='yes'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"layers": "act1", "probe_data": np.zeros((4, 6), "float32"), **kwargs}
    with pytest.raises(error, match=match):
        ActivationStatistics(**args)


@pytest.mark.parametrize(
    "layers, kwargs, match",
    [
        ("nope", {}, r"Unknown layer name 'nope'.*'act1'"),
        (["act1", "act1"], {}, "more than once"),
        ([], {}, "non-empty"),
        ([keras.layers.Dense(2, name="stranger")], {}, "not a top-level layer"),
        ("act1", {"unit": 8}, "out of range"),
    ],
)
def test_bad_layers_raise_at_train_begin(rng, layers, kwargs, match):
    model = _model(rng)
    x, y = _data(rng, 16)
    stats = ActivationStatistics(layers, probe_data=x, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[stats], verbose=0)
