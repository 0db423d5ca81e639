"""Tests for converters.export.export_onnx (TensorFlow backend only)."""

import os

import keras
import numpy as np
import pytest

import keras_bn

L = keras.layers
RTOL = 1e-5  # max|onnx - keras| / max|keras| per output
TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="ONNX export uses tf2onnx: TensorFlow backend only",
)


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


@TF_ONLY
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
    ref = np.asarray(model(x, training=False))
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL


@TF_ONLY
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


@TF_ONLY
def test_explicit_signature_and_inputs(rng, tmp_path):
    import tensorflow as tf

    model = MODELS["dense"]()
    randomize_bn(model, rng)
    spec = [tf.TensorSpec((4, 6), tf.float32, name="features")]
    x = rng.normal(size=(4, 6)).astype("float32") * 10.0
    report = export_onnx(model, tmp_path / "m.onnx", input_signature=spec, inputs=[x])
    assert report.max_rel_error <= RTOL
    import onnx

    (inp,) = onnx.load(str(tmp_path / "m.onnx")).graph.input
    assert inp.name == "features"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [4, 6]


@TF_ONLY
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
    # The gather's index handling has its own Mul; the BN's is gone.
    assert report.nodes["Mul"] == report.baseline_nodes["Mul"] - 1


@TF_ONLY
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


@TF_ONLY
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


@TF_ONLY
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


@TF_ONLY
def test_subclassed_model_traced_or_refused(rng, tmp_path):
    import tensorflow as tf

    model = SubclassedNet()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="fold=False, input_signature="):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="Pass `input_signature="):
        export_onnx(model, tmp_path / "m.onnx", fold=False)
    assert os.listdir(tmp_path) == []
    spec = [tf.TensorSpec((None, 4), tf.float32, name="x")]
    report = export_onnx(model, tmp_path / "m.onnx", fold=False, input_signature=spec)
    assert report.max_rel_error <= RTOL


@TF_ONLY
def test_converts_once_and_benchmark_is_opt_in(rng, tmp_path, monkeypatch):
    import converters.export as export_module

    calls = []
    real = export_module.to_onnx
    monkeypatch.setattr(
        export_module, "to_onnx", lambda *a: calls.append(a) or real(*a)
    )
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


@TF_ONLY
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


@TF_ONLY
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


@TF_ONLY
def test_parity_failure_raises_and_writes_nothing(rng, tmp_path):
    from converters import ParityError

    model = MODELS["dense"]()
    randomize_bn(model, rng)
    with pytest.raises(ParityError, match="rtol=0") as info:
        export_onnx(model, tmp_path / "m.onnx", rtol=0.0)
    assert info.value.report.max_rel_error > 0
    assert os.listdir(tmp_path) == []


@TF_ONLY
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(opset=7), ValueError, "opset"),
        (dict(samples=0), ValueError, "samples"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(MODELS["dense"](), tmp_path / "m.onnx", **kwargs)


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="non-TF only")
def test_other_backend_says_how(tmp_path):
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow"):
        export_onnx(MODELS["dense"](), tmp_path / "m.onnx")


def export_onnx(*args, **kwargs):
    from converters import export_onnx as fn

    return fn(*args, **kwargs)


@TF_ONLY
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


@TF_ONLY
def test_ort_optimizes_our_file_as_well_as_keras_export(rng, tmp_path):
    """What ONNX Runtime runs from our folded file is no bigger, op type by op
    type, than what it runs from Keras's export of the same weights with
    Keras's BN (zoo: EfficientNetB0/V2B0 looked slower under ORT's default
    optimizations; the optimized graphs were the same)."""
    import onnx

    from converters._tf_convert import signature_of
    from converters.export import keras_baseline

    model = keras_bn.replace_batchnorm(_efficientnet_like())
    randomize_bn(model, rng)
    report = export_onnx(model, tmp_path / "ours.onnx")
    assert report.max_rel_error <= RTOL
    ours = onnx.load(str(tmp_path / "ours.onnx"))
    x = [rng.normal(size=(1, 16, 16, 3)).astype("float32")]
    what, base = keras_baseline(model, signature_of(model), 17, x)
    assert what.startswith("Keras's model.export"), what
    mine = _ort_optimized_counts(ours, tmp_path, "ours")
    theirs = _ort_optimized_counts(base, tmp_path, "keras")
    assert not mine - theirs, (mine, theirs)  # no op type more numerous
    assert "Sigmoid" not in mine and mine["QuickGelu"] >= 3  # swish fused
