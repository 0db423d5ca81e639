"""Tests for converters.export.export_onnx, on every backend (tf2onnx on
TensorFlow, jax2onnx on JAX, torch.onnx on torch)."""

import collections
import os

import keras
import numpy as np
import pytest

import keras_bn

L = keras.layers
RTOL = 1e-5  # max|onnx - keras| / max|keras| per output


@pytest.fixture
def rng():
    return np.random.default_rng(3)


def randomize_bn(model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize_bn(layer, rng)
        elif isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=c))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=c))
            layer.gamma.assign(rng.normal(size=c))
            layer.beta.assign(rng.normal(size=c))


def _named_spec(shape, name):
    """A named float32 input signature entry: a tf.TensorSpec on TensorFlow,
    a keras.InputSpec elsewhere."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.TensorSpec(shape, tf.float32, name=name)
    return keras.InputSpec(shape=shape, dtype="float32", name=name)


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


MODELS = {
    "dense": lambda: keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, use_bias=False),
            keras_bn.BatchNormalization(),
            L.ReLU(),
            L.Dense(3),
        ]
    ),
    "conv2d": lambda: keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3),
            L.BatchNormalization(),
            L.ReLU(),
            L.Conv2DTranspose(3, 3, strides=2),
            L.BatchNormalization(),
        ]
    ),
    "conv1d_separable": lambda: keras.Sequential(
        [
            keras.Input((12, 3)),
            L.Conv1D(4, 3, use_bias=False),
            L.BatchNormalization(),
            L.SeparableConv1D(5, 3),
            L.BatchNormalization(),
            L.GlobalAveragePooling1D(),
        ]
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_export_parity_and_node_counts(rng, tmp_path, name):
    import onnx
    import onnxruntime as ort

    model = MODELS[name]()
    randomize_bn(model, rng)
    before = _weights(model)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path)
    for a, b in zip(before, _weights(model), strict=True):  # input unchanged
        np.testing.assert_array_equal(a, b)
    assert report.max_rel_error <= RTOL
    assert report.fold_report.num_kept == 0
    after = report.nodes
    assert "BatchNormalization" not in after and "Mul" not in after
    proto = onnx.load(str(path))
    assert os.path.getsize(path) == report.file_size
    # Independent check: run the written file on fresh inputs.
    x = rng.normal(size=(5, *model.inputs[0].shape[1:])).astype("float32")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {proto.graph.input[0].name: x})
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL


def test_kept_bn_is_one_mul_add_and_multi_io(rng, tmp_path):
    a, b = keras.Input((4,), name="a"), keras.Input((5, 5, 2), name="b")
    h = L.BatchNormalization()(L.ReLU()(a))  # kept: one Mul + one Add
    k = L.Flatten()(L.BatchNormalization()(L.Conv2D(3, 3)(b)))
    model = keras.Model([a, b], [L.Dense(2)(L.Concatenate()([h, k])), h])
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx", samples=3)
    assert len(report.parity) == 2 and report.max_rel_error <= RTOL
    assert report.nodes.get("Mul", 0) == 1
    assert report.fold_report.num_kept == 1


def test_explicit_signature_and_inputs(rng, tmp_path):
    model = MODELS["dense"]()
    randomize_bn(model, rng)
    spec = [_named_spec((4, 6), "features")]
    x = rng.normal(size=(4, 6)).astype("float32") * 10.0
    report = export_onnx(model, tmp_path / "m.onnx", input_signature=spec, inputs=[x])
    assert report.max_rel_error <= RTOL
    import onnx

    (inp,) = onnx.load(str(tmp_path / "m.onnx")).graph.input
    assert inp.name == "features"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [4, 6]


def test_integer_inputs(rng, tmp_path):
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            L.Embedding(10, 4),
            L.Flatten(),
            L.Dense(6),
            L.BatchNormalization(),
        ]
    )
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx", benchmark=True)
    assert report.max_rel_error <= RTOL and report.fold_report.num_folded == 1
    # The BN's Mul is gone. With tf2onnx the baseline comes from the same
    # exporter, whose gather index handling has its own Mul: exactly one less.
    # Elsewhere Keras's export is another exporter (JAX: through TensorFlow):
    # no more than one less.
    mul, baseline_mul = report.nodes.get("Mul", 0), report.baseline_nodes.get("Mul", 0)
    if ROUTE == "tf2onnx":
        assert mul == baseline_mul - 1
    else:
        assert mul <= baseline_mul - 1


def test_normalization_constants_are_folded_not_inputs(rng, tmp_path):
    import onnx

    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Normalization(mean=[0.0, 1, 2, 3], variance=[1.0, 2, 3, 4]),
            L.Dense(2),
            L.BatchNormalization(),
        ]
    )
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.max_rel_error <= RTOL
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == [model.inputs[0].name]
    assert "BatchNormalization" not in report.nodes


def test_grouped_conv_exports_as_one_grouped_conv(rng, tmp_path):
    import onnx

    model = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            L.Conv2D(8, 3, groups=4, use_bias=False),
            keras_bn.BatchNormalization(),
        ]
    )
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.max_rel_error <= RTOL
    convs = [
        n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Conv"
    ]
    assert len(convs) == 1
    assert {a.name: a.i for a in convs[0].attribute}["group"] == 4
    assert "Mul" not in report.nodes  # the BN went into the grouped kernel


def test_exact_gelu_exports(rng, tmp_path):
    # Exact GELU is TensorFlow's Erfc, which tf2onnx 1.17 cannot convert by
    # itself (ConvNeXt); it must become ONNX Erf, with parity in the tails.
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(8, 1, use_bias=False),
            keras_bn.BatchNormalization(),
            L.Activation("gelu"),  # keras.activations.gelu: approximate=False
            L.Dense(4),
        ]
    )
    randomize_bn(model, rng)
    x = 4.0 * rng.normal(size=(4, 6, 6, 3)).astype("float32")
    report = export_onnx(model, tmp_path / "m.onnx", inputs=[x])
    assert report.max_rel_error <= RTOL
    assert "Erfc" not in report.nodes
    assert "Erf" in report.nodes


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)
        self.bn = L.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_subclassed_model_traced_or_refused(rng, tmp_path):
    model = SubclassedNet()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="fold=False, input_signature="):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="Pass `input_signature="):
        export_onnx(model, tmp_path / "m.onnx", fold=False)
    assert os.listdir(tmp_path) == []
    spec = [_named_spec((None, 4), "x")]
    report = export_onnx(model, tmp_path / "m.onnx", fold=False, input_signature=spec)
    assert report.max_rel_error <= RTOL


def test_converts_once_and_benchmark_is_opt_in(rng, tmp_path, monkeypatch):
    import importlib

    modules = {"tf2onnx": "_tf_convert", "jax2onnx": "_jax_convert"}
    route_module = importlib.import_module(
        f"converters.{modules.get(ROUTE, '_torch_convert')}"
    )
    calls = []
    real = route_module.to_onnx
    monkeypatch.setattr(route_module, "to_onnx", lambda *a: calls.append(a) or real(*a))
    model = MODELS["dense"]()
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "a.onnx")
    assert len(calls) == 1
    assert report.latency_ms == {} and report.baseline is None
    assert "latency" not in str(report)
    report = export_onnx(model, tmp_path / "b.onnx", benchmark=True)
    assert len(calls) == 2  # Keras's own export made the baseline, not us
    assert report.baseline.startswith("Keras's model.export")
    assert set(report.latency_ms) == {"exported", "baseline"}
    assert report.speedup > 0 and "baseline" in str(report)
    # Keras's export keeps the BN after a Dense as Mul + Add; ours has none.
    assert report.baseline_nodes.get("Mul", 0) >= 1 and "Mul" not in report.nodes


@pytest.mark.parametrize("name", ["conv2d", "conv1d_separable"])
def test_keras_export_of_keras_bn_model_matches_keras_bn(rng, tmp_path, name):
    """Keras's own `model.export` sees the graph Keras's BN emits."""
    import collections

    import onnx

    from keras_bn.replace import to_keras_batchnorm

    ours = keras_bn.replace_batchnorm(MODELS[name]())
    randomize_bn(ours, rng)
    theirs = to_keras_batchnorm(ours)
    counts = []
    for i, model in enumerate((ours, theirs)):
        x = rng.normal(size=(2, *model.inputs[0].shape[1:])).astype("float32")
        model(x)
        model.export(str(tmp_path / f"{i}.onnx"), format="onnx", verbose=False)
        graph = onnx.load(str(tmp_path / f"{i}.onnx")).graph
        counts.append(collections.Counter(n.op_type for n in graph.node))
    assert counts[0] == counts[1]
    assert "BatchNormalization" not in counts[0]


def test_no_fold_baseline_and_overwrite(rng, tmp_path):
    model = MODELS["dense"]()
    randomize_bn(model, rng)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, fold=False)
    assert report.fold_report is None and report.nodes.get("Mul", 0) == 1
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, path)
    report = export_onnx(model, path, overwrite=True)
    assert "Mul" not in report.nodes
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temp file left


def test_parity_failure_raises_and_writes_nothing(rng, tmp_path):
    from converters import ParityError

    model = MODELS["dense"]()
    randomize_bn(model, rng)
    with pytest.raises(ParityError, match="rtol=1e-15") as info:
        export_onnx(model, tmp_path / "m.onnx", rtol=1e-15)
    assert info.value.report.max_rel_error > 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(opset=7), ValueError, "opset.*between 13"),
        (dict(opset=30), ValueError, "opset.*between 13"),
        (dict(opset="17"), ValueError, "opset"),
        (dict(samples=0), ValueError, "samples"),
        (dict(rtol=-1.0), ValueError, "rtol.*-1.0"),
        (dict(rtol=float("nan")), ValueError, "rtol.*nan"),
        (dict(rtol=0.0), ValueError, "rtol.*> 0"),
        (dict(batch_size=0), ValueError, "batch_size.*0"),
        (dict(batch_size=True), ValueError, "batch_size"),
        (dict(precision="int8"), ValueError, "precision.*int8"),
        (dict(input_names=["a", "b"]), ValueError, "input_names.*2 names"),
        (dict(input_names="x"), TypeError, "input_names.*list of str"),
        (dict(output_names=["y", "y"]), ValueError, "output_names.*duplicate"),
        (dict(output_names=[""]), ValueError, "output_names.*non-empty"),
        (dict(input_signature=[((None, 6), "float32")] * 2), ValueError, "2 entries"),
        (dict(input_signature=["x"]), TypeError, r"input_signature\[0\]"),
        (dict(progress=3), TypeError, "progress"),
    ],
)
def test_bad_arguments_refused_before_converting(
    tmp_path, monkeypatch, kwargs, error, match
):
    import converters.export as export_module

    def no_convert(*a, **k):
        raise AssertionError("converted before checking the arguments")

    monkeypatch.setattr(export_module, "convert", no_convert)
    with pytest.raises(error, match=match):
        export_onnx(MODELS["dense"](), tmp_path / "m.onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def export_onnx(*args, **kwargs):
    from converters import export_onnx as fn

    return fn(*args, **kwargs)


def test_cli_benchmark_flag(rng, tmp_path, capsys):
    from converters.cli import main

    model = MODELS["dense"]()
    randomize_bn(model, rng)
    model.save(tmp_path / "m.keras")
    args = ["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "a.onnx")]
    assert main(args) == 0
    assert "baseline" not in capsys.readouterr().out
    assert main([*args, "--force", "--benchmark"]) == 0
    out = capsys.readouterr().out
    assert "baseline: Keras's model.export" in out and "ms vs baseline" in out


def _efficientnet_like():
    """EfficientNet's patterns in miniature: preprocessing, Conv-BN-
    swish, depthwise Conv-BN-swish, squeeze-and-excitation (pooled Conv-swish-
    Conv-sigmoid, Mul), projection Conv-BN, residual Add, Dense head."""
    inp = keras.Input((16, 16, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = L.Activation("swish")(L.BatchNormalization()(x))
    h = L.Activation("swish")(L.BatchNormalization()(L.Conv2D(32, 1)(x)))
    h = L.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    h = L.Activation("swish")(L.BatchNormalization()(h))
    s = L.GlobalAveragePooling2D(keepdims=True)(h)
    s = L.Conv2D(32, 1, activation="sigmoid")(L.Conv2D(2, 1, activation="swish")(s))
    h = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False)(L.multiply([h, s])))
    x = L.GlobalAveragePooling2D()(L.add([h, x]))
    return keras.Model(inp, L.Dense(3)(x))


def _ort_optimized_counts(proto, tmp_path, tag):
    """Op-type counts of the graph ONNX Runtime runs (default optimizations)."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.optimized_model_filepath = str(tmp_path / f"{tag}.opt.onnx")
    ort.InferenceSession(
        proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    graph = onnx.load(opts.optimized_model_filepath).graph
    return collections.Counter(n.op_type for n in graph.node)


def test_ort_optimizes_our_file_as_well_as_keras_export(rng, tmp_path):
    """What ONNX Runtime runs from our folded file is no bigger, op type by op
    type, than what it runs from Keras's export of the same weights with
    Keras's BN (zoo: EfficientNetB0/V2B0 looked slower under ORT's default
    optimizations; the optimized graphs were the same)."""
    import onnx

    from converters import _deps
    from converters.export import input_specs, keras_baseline

    model = keras_bn.replace_batchnorm(_efficientnet_like())
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "ours.onnx")
    assert report.max_rel_error <= RTOL
    ours = onnx.load(str(tmp_path / "ours.onnx"))
    x = [rng.normal(size=(1, 16, 16, 3)).astype("float32")]
    opset = _deps.default_opset(ROUTE)  # the opset of our file
    assert report.opset == opset
    what, base = keras_baseline(model, input_specs(model), opset, x)
    assert what.startswith("Keras's model.export"), what
    mine = _ort_optimized_counts(ours, tmp_path, "ours")
    theirs = _ort_optimized_counts(base, tmp_path, "keras")
    assert not mine - theirs, (mine, theirs)  # no op type more numerous
    assert "Sigmoid" not in mine and mine["QuickGelu"] >= 3  # swish fused


# ---------------------------------------------------------------------------
# Every backend: tf2onnx, jax2onnx, torch.onnx.

BACKEND = keras.backend.backend()
ROUTE = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "torch.onnx"}[BACKEND]


def _conv_model(data_format):
    axis = -1 if data_format == "channels_last" else 1
    shape = (8, 8, 3) if data_format == "channels_last" else (3, 8, 8)
    return keras.Sequential(
        [
            keras.Input(shape),
            L.Conv2D(4, 3, use_bias=False, data_format=data_format),
            keras_bn.BatchNormalization(axis=axis),
            L.ReLU(),
            L.Conv2D(5, 1, data_format=data_format),
            L.BatchNormalization(axis=axis),
            L.GlobalAveragePooling2D(data_format=data_format),
            L.Dense(6, use_bias=False),
            L.BatchNormalization(),
        ]
    )


def _keras_export_counts(model, tmp_path, opset=18):
    """Node counts of Keras's own export of `model` with Keras's BN."""
    import onnx

    from keras_bn.replace import to_keras_batchnorm

    peer = to_keras_batchnorm(model)
    peer(np.zeros((2, *model.inputs[0].shape[1:]), "float32"))
    peer.export(
        str(tmp_path / "k.onnx"), format="onnx", verbose=False, opset_version=opset
    )
    return collections.Counter(
        n.op_type for n in onnx.load(str(tmp_path / "k.onnx")).graph.node
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_every_backend_folds_and_matches_keras(rng, tmp_path, data_format):
    import onnx
    import onnxruntime as ort

    if data_format == "channels_first" and BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU Conv2D has no NCHW (channels_first) kernel")
    model = _conv_model(data_format)
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.route == ROUTE
    assert report.max_rel_error <= RTOL and report.outputs_vary
    assert report.fold_report.num_folded == 3
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    # No BN-origin Mul/Add: at most one Add per linear layer (its bias, which
    # an exporter may write as a separate Add behind a Transpose).
    assert "Mul" not in report.nodes and "BatchNormalization" not in report.nodes
    assert report.nodes.get("Add", 0) <= 3
    keras_counts = _keras_export_counts(model, tmp_path)
    assert sum(report.nodes.values()) <= sum(keras_counts.values()), (
        report.nodes,
        keras_counts,
    )
    # Independent check of the written file, on another batch size.
    x = rng.normal(size=(3, *model.inputs[0].shape[1:])).astype("float32")
    sess = ort.InferenceSession(
        str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]
    )
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_max_pooling_stem_exports(rng, tmp_path, data_format):
    """ResNet's stem (Conv, BN, ReLU, padding, 3x3/2 max pooling) exports
    and runs in ONNX Runtime from every backend (jax2onnx writes max pooling
    in a form ONNX Runtime cannot run; the export rewrites it)."""
    if data_format == "channels_first" and BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU Conv2D has no NCHW (channels_first) kernel")
    axis = -1 if data_format == "channels_last" else 1
    shape = (16, 16, 3) if data_format == "channels_last" else (3, 16, 16)
    model = keras.Sequential(
        [
            keras.Input(shape),
            L.Conv2D(4, 3, strides=2, use_bias=False, data_format=data_format),
            L.BatchNormalization(axis=axis),
            L.ReLU(),
            L.ZeroPadding2D(1, data_format=data_format),
            L.MaxPooling2D(3, strides=2, data_format=data_format),
            L.MaxPooling2D(2, padding="same", data_format=data_format),
        ]
    )
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.max_rel_error <= RTOL and report.outputs_vary
    assert report.fold_report.num_folded == 1 and report.nodes["MaxPool"] == 2


def test_default_opset_is_the_exporters_own(rng, tmp_path):
    """With no `opset`, each route writes the opset its exporter writes
    natively (jax2onnx and torch.onnx: 18), so a model with padding (which
    onnx's version converter cannot bring below 18) exports by default."""
    from keras_bn.converters import _deps

    model = keras.Sequential(
        [
            keras.Input((9, 9, 3)),
            L.ZeroPadding2D(((0, 1), (0, 1))),
            L.Conv2D(4, 3, strides=2, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
        ]
    )
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.opset == _deps.default_opset(ROUTE)
    assert report.opset == {"tf2onnx": 17, "jax2onnx": 18, "torch.onnx": 18}[ROUTE]
    assert report.max_rel_error <= RTOL and report.fold_report.num_folded == 1


def test_kept_bn_behind_layout_ops_is_one_scale_shift(rng, tmp_path):
    """A BN after a ReLU cannot fold; on every backend it is one Mul + Add,
    whatever Transposes the exporter puts around the convolutions."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(4, 3),
            L.ReLU(),
            keras_bn.BatchNormalization(),
            L.Activation("tanh"),
        ]
    )
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.max_rel_error <= RTOL
    assert report.fold_report.num_kept == 1
    assert report.nodes.get("Mul", 0) <= 1


def test_names_and_free_batch_dimension(rng, tmp_path):
    import onnx

    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = L.Dense(5)(L.Concatenate()([a, b]))
    model = keras.Model([a, b], [L.BatchNormalization()(h), L.Dense(2)(h)])
    randomize_bn(model, rng)
    report = export_onnx(
        model,
        tmp_path / "m.onnx",
        input_names=["features", "extra"],
        output_names=["scores", "logits"],
        samples=3,
    )
    assert report.max_rel_error <= RTOL
    graph = onnx.load(str(tmp_path / "m.onnx")).graph

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert [i.name for i in graph.input] == ["features", "extra"]
    assert [o.name for o in graph.output] == ["scores", "logits"]
    assert [dims(i) for i in graph.input] == [["batch", 4], ["batch", 3]]
    assert [dims(o) for o in graph.output] == [["batch", 5], ["batch", 2]]


def test_default_output_names_are_keras_names_and_batch_size_is_static(rng, tmp_path):
    import onnx
    import onnxruntime as ort

    model = MODELS["dense"]()
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx", batch_size=4)
    assert report.max_rel_error <= RTOL
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [o.name for o in graph.output] == [model.layers[-1].name]
    (inp,) = graph.input
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [4, 6]
    sess = ort.InferenceSession(
        str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]
    )
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {inp.name: np.zeros((2, 6), "float32")})


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="jax2onnx's tracing with symbolic dimensions: the JAX route only",
)
def test_jax_layer_needing_a_concrete_batch_says_batch_size(rng, tmp_path):
    """jax2onnx's resize cannot take a symbolic batch (keras_hub's DeepLabV3
    resizes its pooled branch so): the error names the fix, which works."""
    model = keras.Sequential(
        [keras.Input((1, 1, 4)), L.Conv2D(4, 1), keras_bn.BatchNormalization()]
        + [L.Resizing(4, 4)]
    )
    randomize_bn(model, rng)
    with pytest.raises(ValueError, match=r"free dimensions.*`batch_size=N`"):
        export_onnx(model, tmp_path / "free.onnx")
    assert not (tmp_path / "free.onnx").exists()
    report = export_onnx(model, tmp_path / "fixed.onnx", batch_size=2, samples=2)
    assert report.max_rel_error <= RTOL and "BatchNormalization" not in report.nodes


def test_float16_precision(rng, tmp_path):
    import onnx

    model = _conv_model("channels_last")
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx", precision="float16")
    # 8 float16 epsilons, against float32 Keras on float16-rounded inputs.
    assert report.rtol == 8 * 2.0**-10 and "float16" in report.rtol_reason
    assert 0 < report.max_rel_error <= report.rtol
    proto = onnx.load(str(tmp_path / "m.onnx"))
    f16 = onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == f16
    assert proto.graph.output[0].type.tensor_type.elem_type == f16
    assert all(i.data_type != onnx.TensorProto.FLOAT for i in proto.graph.initializer)
    # The float32 file is more exact: float16 is what limits the error.
    report32 = export_onnx(model, tmp_path / "m32.onnx")
    assert report32.max_rel_error < report.max_rel_error
    assert report32.rtol == RTOL and report32.rtol_reason == "float32 compute"


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_passes_by_default(rng, tmp_path, float32_policy, policy):
    keras.mixed_precision.set_dtype_policy(policy)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(8, 3, use_bias=False),
            keras_bn.BatchNormalization(),
            L.ReLU(),
            L.Conv2D(8, 3),
            L.GlobalAveragePooling2D(),
            L.Dense(4, dtype="float32"),
        ]
    )
    randomize_bn(model, rng)
    try:
        report = export_onnx(model, tmp_path / "m.onnx")
    except Exception as e:  # noqa: BLE001
        if "ParityError" in type(e).__name__:
            raise
        if policy == "mixed_bfloat16" and "bfloat16" in str(e):
            pytest.skip(f"ONNX Runtime's CPU provider has no bfloat16 Conv: {e}")
        if BACKEND != "tensorflow":
            pytest.skip(f"{ROUTE} cannot export a {policy} model: {e}")
        raise
    dtype = policy.split("_")[1]
    assert dtype in report.rtol_reason
    assert report.rtol == 8 * {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    assert report.max_rel_error <= report.rtol


def test_constant_outputs_are_exercised_or_flagged(tmp_path):
    # ReLU(x.sum() - 50): zero for every standard-normal row, varies at x100.
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(2, kernel_initializer="ones", bias_initializer="zeros"),
            L.BatchNormalization(),
            L.Dense(
                2,
                kernel_initializer="ones",
                bias_initializer=keras.initializers.Constant(-50.0),
            ),
            L.ReLU(),
        ]
    )
    report = export_onnx(model, tmp_path / "a.onnx")
    assert report.outputs_vary is True and report.input_scale > 1.0
    assert report.max_rel_error <= RTOL
    # Constant whatever the input: said so, in the report and its text.
    flat = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(2, kernel_initializer="zeros", bias_initializer="ones"),
            L.BatchNormalization(),
        ]
    )
    report = export_onnx(flat, tmp_path / "b.onnx")
    assert report.outputs_vary is False
    assert "same for every sample input" in str(report)
    # Given inputs are used as they are.
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    report = export_onnx(model, tmp_path / "c.onnx", inputs=[x])
    assert report.outputs_vary is False and report.input_scale == 1.0


def test_progress_stages(rng, tmp_path):
    calls = []
    model = MODELS["dense"]()
    randomize_bn(model, rng)
    export_onnx(model, tmp_path / "m.onnx", progress=lambda s, t: calls.append((s, t)))
    stages = ["fold", "convert", "check", "verify", "write"]
    assert [s for s, _ in calls] == [s for s in stages for _ in (0, 1)]
    assert all(t is None for _, t in calls[::2])
    assert all(t >= 0 for _, t in calls[1::2])


@pytest.mark.parametrize("verbose", [False, True])
def test_conversion_noise_captured_unless_verbose(
    rng, tmp_path, capfd, monkeypatch, verbose
):
    import logging
    import warnings

    import converters.export as export_module

    real = export_module.convert

    def noisy_convert(*args, **kwargs):  # as chatty as TensorFlow and tf2onnx
        warnings.warn("noisy deprecation", DeprecationWarning, stacklevel=1)
        for name in ("tensorflow", "absl", "tf2onnx", "torch.onnx", "jax2onnx"):
            logging.getLogger(name).warning("noisy log line from %s", name)
        print("noisy print")
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "convert", noisy_convert)
    # The levels a user left (the command line sets these loggers to ERROR in
    # this process when an earlier test ran it) decide what is emitted at all.
    from converters import _quiet

    for name in _quiet.LOGGERS:  # parents ("torch") included
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logger.level)  # restored after
        logger.setLevel(logging.WARNING if name == "" else logging.NOTSET)
    model = MODELS["dense"]()
    randomize_bn(model, rng)
    capfd.readouterr()
    report = export_onnx(model, tmp_path / "m.onnx", verbose=verbose)
    out, err = capfd.readouterr()
    if verbose:
        # Left to the process's handlers (pytest's own capture takes the
        # warnings and log records here).
        assert "noisy print" in out and report.log == []
    else:
        assert "noisy" not in out + err, out + err
        joined = "\n".join(report.log)
        assert "noisy print" in joined and "noisy deprecation" in joined
        for name in ("tensorflow", "absl", "tf2onnx", "torch.onnx", "jax2onnx"):
            assert f"noisy log line from {name}" in joined
    # Logging is as it was afterwards.
    assert logging.getLogger("tensorflow").propagate is not None


def test_benchmark_checks_its_baseline(rng, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    import converters.export as export_module

    model = MODELS["dense"]()
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "a.onnx", benchmark=True)
    assert report.baseline_parity is not None and report.baseline_parity <= RTOL
    assert report.speedup is not None and report.speedup > 0

    real = export_module.keras_baseline

    def wrong_baseline(*args):  # a baseline whose weights are off by 2x
        what, proto = real(*args)
        bad = onnx.ModelProto()
        bad.CopyFrom(proto)
        for init in bad.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype == np.float32 and array.ndim == 2:
                init.CopyFrom(numpy_helper.from_array(2 * array, init.name))
        return what, bad

    monkeypatch.setattr(export_module, "keras_baseline", wrong_baseline)
    report = export_onnx(model, tmp_path / "b.onnx", benchmark=True)
    assert report.baseline_parity > RTOL and report.baseline_agrees is False
    assert report.latency_ms == {} and report.speedup is None
    assert "baseline disagrees with Keras" in str(report)
    assert os.path.exists(tmp_path / "b.onnx")  # our file is still verified


def test_memory_is_reported(rng, tmp_path):
    model = MODELS["dense"]()
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.peak_rss_mb > 50 and 0 <= report.rss_increase_mb <= report.peak_rss_mb
    assert "peak RSS" in str(report)


def test_verification_runs_a_few_samples_at_a_time(rng, tmp_path, monkeypatch):
    from converters import export as export_module

    calls = []
    chunked = export_module._in_chunks

    def record(fn, arrays, rows):
        out = chunked(fn, arrays, rows)
        calls.append((len(arrays[0]), rows))
        return out

    monkeypatch.setattr(export_module, "_in_chunks", record)
    model = MODELS["dense"]()
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "m.onnx", samples=10)
    assert report.max_rel_error <= report.rtol
    assert calls and all(r == export_module.VERIFY_ROWS for _, r in calls)


def test_in_chunks_concatenates_or_falls_back():
    from converters.export import _in_chunks

    x = np.arange(10.0).reshape(10, 1)
    seen = []

    def double(arrays):
        seen.append(len(arrays[0]))
        return [arrays[0] * 2]

    np.testing.assert_array_equal(_in_chunks(double, [x], 4)[0], x * 2)
    assert seen == [4, 4, 2]
    seen.clear()

    def total(arrays):  # no batch dimension in the output: all at once
        seen.append(len(arrays[0]))
        return [arrays[0].sum()]

    assert _in_chunks(total, [x], 4)[0] == x.sum()
    assert seen[-1] == 10


def test_missing_exporter_says_what_to_install(tmp_path, monkeypatch):
    import sys

    module = {"tf2onnx": "tf2onnx", "jax2onnx": "jax2onnx", "torch.onnx": "onnxscript"}[
        ROUTE
    ]
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(
        ImportError, match=f"{module}.*pip install|pip install.*{module}"
    ):
        export_onnx(MODELS["dense"](), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_subclassed_model_with_signature_pairs(rng, tmp_path):
    model = SubclassedNet()
    model(np.zeros((1, 4), "float32"))
    randomize_bn(model, rng)
    report = export_onnx(
        model,
        tmp_path / "m.onnx",
        fold=False,
        input_signature=[((None, 4), "float32")],
        input_names=["x"],
    )
    assert report.max_rel_error <= RTOL and report.route == ROUTE


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_fold_onnx_removes_the_bn_the_exporter_wrote(rng, tmp_path, data_format):
    """Unfolded in Keras, the BN reaches the exporter, which writes it in its
    own form (on torch and JAX, channels-last: Sub/Mul/Add behind a
    Transpose); `fold_onnx` must fold it into the Conv."""
    if data_format == "channels_first" and BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU Conv2D has no NCHW (channels_first) kernel")
    from converters.export import convert, input_specs, node_counts
    from converters.onnx_fold import fold_onnx

    axis = -1 if data_format == "channels_last" else 1
    shape = (6, 6, 3) if data_format == "channels_last" else (3, 6, 6)
    model = keras.Sequential(
        [
            keras.Input(shape),
            L.Conv2D(4, 3, data_format=data_format),
            L.BatchNormalization(axis=axis),
            L.Conv2D(2, 1, data_format=data_format),
        ]
    )
    randomize_bn(model, rng)
    proto, _ = convert(model, input_specs(model), 17)
    folded, report = fold_onnx(proto)
    counts = node_counts(folded)
    left = {op: counts[op] for op in ("Mul", "Sub", "Div") if op in counts}
    # A scale and shift behind a Transpose (torch and JAX) is folded too.
    assert not left and "BatchNormalization" not in counts, (
        left,
        node_counts(proto),
        str(report),
    )
    assert sum(counts.values()) <= sum(_keras_export_counts(model, tmp_path).values())
