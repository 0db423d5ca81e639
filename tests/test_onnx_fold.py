"""Tests for converters.onnx_fold.fold_onnx on graphs built with onnx.helper."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install onnx")
ort = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters.onnx_fold import fold_onnx  # noqa: E402

RTOL = 1e-5  # max|folded - original| / max|original|, float32 ONNX Runtime


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _bn_inits(rng, c, prefix="bn"):
    return [
        _init(f"{prefix}_g", rng.normal(size=c)),
        _init(f"{prefix}_b", rng.normal(size=c)),
        _init(f"{prefix}_m", rng.normal(size=c)),
        _init(f"{prefix}_v", rng.uniform(0.3, 3, size=c)),
    ]


def _bn_node(x, y, prefix="bn"):
    ins = [x] + [f"{prefix}_{k}" for k in "gbmv"]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, epsilon=1e-3)


def _model(nodes, inits, in_shape, out_shape, extra_outputs=()):
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    outs += [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, out_shape)
        for n in extra_outputs
    ]
    graph = helper.make_graph(nodes, "g", [inp], outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(model, x):
    sess = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"x": x})


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _check(model, x):
    before = model.SerializeToString()
    folded, report = fold_onnx(model)
    assert model.SerializeToString() == before  # input unchanged
    for a, b in zip(_run(folded, x), _run(model, x), strict=True):
        assert np.abs(a - b).max() / np.abs(b).max() <= RTOL
    return folded, report


def _conv_bn(rng, op, bias, group=1):
    c_in, c_out = 4, 6
    if op == "Conv":
        w = rng.normal(size=(c_out, c_in // group, 3, 3))
    else:
        w = rng.normal(size=(c_in, c_out, 3, 3))
    inits = [_init("w", w), *_bn_inits(rng, c_out)]
    ins = ["x", "w"]
    if bias:
        inits.append(_init("b", rng.normal(size=c_out)))
        ins.append("b")
    attrs = {"group": group} if group > 1 else {}
    nodes = [helper.make_node(op, ins, ["h"], name="lin", **attrs), _bn_node("h", "y")]
    return _model(nodes, inits, [2, c_in, 6, 6], ["N", "C", "H", "W"])


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_into_conv(rng, op, bias):
    model = _conv_bn(rng, op, bias, group=2 if op == "Conv" else 1)
    x = rng.normal(size=(2, 4, 6, 6)).astype("float32")
    folded, report = _check(model, x)
    assert _ops(folded) == [op]
    assert report.records[0].action == "folded_into_preceding"


def _flipped_kernel(w):
    """Nodes and constants that flip `w`'s two spatial axes at run time, as
    jax2onnx writes a transposed convolution's kernel: Shape, Gather and
    Range make the reversed indices of axis 2, a Gather applies them, a
    negative-step Slice reverses axis 3, then a Transpose there and back."""
    i64 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [
        _init("w0", w),
        i64("two", [2]),
        i64("zero", 0),
        i64("one", 1),
        i64("last", -1),
        i64("s_start", [-1]),
        i64("s_end", [-(2**63) + 1]),
        i64("s_axes", [3]),
        i64("s_step", [-1]),
    ]
    nodes = [
        helper.make_node("Shape", ["w0"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["len2"]),
        helper.make_node("Squeeze", ["len2"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["up"]),
        helper.make_node("Sub", ["last", "up"], ["down"]),  # -1, -2, ...
        helper.make_node("Gather", ["w0", "down"], ["w1"], axis=2),
        helper.make_node(
            "Slice", ["w1", "s_start", "s_end", "s_axes", "s_step"], ["w2"]
        ),
        helper.make_node("Transpose", ["w2"], ["w3"], perm=[1, 0, 2, 3]),
        helper.make_node("Transpose", ["w3"], ["w"], perm=[1, 0, 2, 3]),
    ]
    return nodes, inits


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_bn_into_conv_whose_kernel_is_flipped_at_run_time(rng, op):
    """The kernel is computed from constants (what jax2onnx emits for Keras's
    Conv2DTranspose): the fold evaluates it as ONNX Runtime would."""
    c_in, c_out = 4, 6
    shape = (c_out, c_in, 3, 3) if op == "Conv" else (c_in, c_out, 3, 2)
    nodes, inits = _flipped_kernel(rng.normal(size=shape))
    inits += _bn_inits(rng, c_out)
    nodes += [helper.make_node(op, ["x", "w"], ["h"]), _bn_node("h", "y")]
    model = _model(nodes, inits, [2, c_in, 6, 6], ["N", "C", "H", "W"])
    folded, report = _check(model, rng.normal(size=(2, c_in, 6, 6)).astype("float32"))
    assert _ops(folded) == [op] and report.num_folded == 1


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_into_gemm(rng, trans_b, bias):
    w = rng.normal(size=(6, 5) if trans_b else (5, 6))
    inits = [_init("w", w), *_bn_inits(rng, 6)]
    ins = ["x", "w"] + (["c"] if bias else [])
    if bias:
        inits.append(_init("c", rng.normal(size=(1, 6))))
    gemm = helper.make_node("Gemm", ins, ["h"], transB=trans_b, alpha=0.5, beta=2.0)
    model = _model([gemm, _bn_node("h", "y")], inits, [3, 5], [3, 6])
    folded, _ = _check(model, rng.normal(size=(3, 5)).astype("float32"))
    assert _ops(folded) == ["Gemm"]


@pytest.mark.parametrize("c_shape", [(), (1,), (6,), (1, 6), (6, 1), (1, 1), (6, 6)])
def test_gemm_c_of_every_broadcast_shape(rng, c_shape):
    """C broadcasts to (M, N) by ONNX's rules; (M, 1) is one bias per row."""
    inits = [
        _init("w", rng.normal(size=(5, 6))),
        _init("c", rng.normal(size=c_shape)),
        *_bn_inits(rng, 6),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["h"], beta=0.5),
        _bn_node("h", "y"),
    ]
    model = _model(nodes, inits, [6, 5], [6, 6])  # M == N: (6, 1) is per row
    folded, report = _check(model, rng.normal(size=(6, 5)).astype("float32"))
    assert _ops(folded) == ["Gemm"] and report.num_folded == 1


def test_keras_style_matmul_add_mul_add(rng):
    """What tf2onnx makes of Dense + BN: MatMul, Add(bias), Mul, Add."""
    inits = [
        _init("w", rng.normal(size=(5, 6))),
        _init("b", rng.normal(size=6)),
        _init("s", rng.normal(size=6)),
        _init("t", rng.normal(size=(1, 6))),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h0"]),
        helper.make_node("Add", ["h0", "b"], ["h1"]),
        helper.make_node("Mul", ["h1", "s"], ["h2"]),
        helper.make_node("Add", ["t", "h2"], ["y"]),
    ]
    model = _model(nodes, inits, [3, 5], [3, 6])
    folded, report = _check(model, rng.normal(size=(3, 5)).astype("float32"))
    assert _ops(folded) == ["MatMul", "Add"]
    assert report.num_folded == 2


def test_bn_after_matmul_without_bias_keeps_one_add(rng):
    inits = [_init("w", rng.normal(size=(5, 6))), *_bn_inits(rng, 6)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), _bn_node("h", "y")]
    model = _model(nodes, inits, [3, 5], [3, 6])
    folded, _ = _check(model, rng.normal(size=(3, 5)).astype("float32"))
    assert _ops(folded) == ["MatMul", "Add"]


@pytest.mark.parametrize("case", ["relu_before", "shared_output", "not_per_channel"])
def test_kept(rng, case):
    c = 4
    inits = [_init("w", rng.normal(size=(c, c, 1, 1))), *_bn_inits(rng, c)]
    extra = ()
    if case == "relu_before":
        nodes = [helper.make_node("Relu", ["x"], ["h"]), _bn_node("h", "y")]
    elif case == "shared_output":
        nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), _bn_node("h", "y")]
        extra = ("h",)
    else:  # a Mul by a spatial (not per-channel) constant
        inits.append(_init("s", rng.normal(size=(1, 1, 5, 5))))
        nodes = [
            helper.make_node("Conv", ["x", "w"], ["h"]),
            helper.make_node("Mul", ["h", "s"], ["y"]),
        ]
    model = _model(nodes, inits, [2, c, 5, 5], ["N", "C", "H", "W"], extra)
    folded, report = _check(model, rng.normal(size=(2, c, 5, 5)).astype("float32"))
    if case == "not_per_channel":
        assert _ops(folded) == ["Conv", "Mul"] and not report.records
    else:
        assert "BatchNormalization" not in _ops(folded)
        assert _ops(folded)[-2:] == ["Mul", "Add"]
        assert report.records[0].action == "kept_as_scale_shift"


def test_rejects_non_model():
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        fold_onnx("model.onnx")


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_cross_check_onnxoptimizer(rng, op):
    onnxoptimizer = pytest.importorskip(
        "onnxoptimizer", reason="onnxoptimizer not installed: pip install onnxoptimizer"
    )
    model = _conv_bn(rng, op, bias=True)
    x = rng.normal(size=(2, 4, 6, 6)).astype("float32")
    ours, _ = fold_onnx(model)
    theirs = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    (a,), (b,) = _run(ours, x), _run(theirs, x)
    assert np.abs(a - b).max() / np.abs(b).max() <= RTOL
    assert _ops(ours) == [op]
    if op == "Conv":  # onnxoptimizer fuses BN into Conv only, computing the
        # fused weights in the graph (nodes on initializers) at run time
        assert "BatchNormalization" not in _ops(theirs)
        assert _ops(theirs).count("Conv") == 1
    else:
        assert "BatchNormalization" in _ops(theirs)


def _keras_models():
    import keras

    L = keras.layers
    return {
        "dense": lambda: keras.Sequential(
            [
                keras.Input((6,)),
                L.Dense(8),
                L.BatchNormalization(),
                L.ReLU(),
                L.Dense(8, use_bias=False),
                L.BatchNormalization(),
                L.Dense(3),
            ]
        ),
        "conv1d": lambda: keras.Sequential(
            [
                keras.Input((10, 3)),
                L.Conv1D(8, 3),
                L.BatchNormalization(),
                L.ReLU(),
                L.Conv1D(8, 3, use_bias=False),
                L.BatchNormalization(),
            ]
        ),
        "conv2d_transpose": lambda: keras.Sequential(
            [
                keras.Input((5, 5, 3)),
                L.Conv2DTranspose(8, 3, strides=2),
                L.BatchNormalization(),
                L.ReLU(),
            ]
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "dense",
        "conv1d",
        "conv2d_transpose",
    ],
)
def test_folds_keras_own_unfolded_export(rng, tmp_path, name):
    """Keras's `model.export(format="onnx")` leaves each BN as Mul and Add."""
    import keras

    model = _keras_models()[name]()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in (layer.moving_mean, layer.gamma, layer.beta):
                v.assign(rng.normal(size=8))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=8))
    x = rng.normal(size=(5, *model.inputs[0].shape[1:])).astype("float32")
    # Keras's export needs a call.
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    path = tmp_path / "keras.onnx"
    model.export(str(path), format="onnx", verbose=False)
    original = onnx.load(str(path))
    assert "Mul" in _ops(original)
    folded, report = fold_onnx(original)
    assert "Mul" not in _ops(folded) and "BatchNormalization" not in _ops(folded)
    assert report.num_kept == 0 and report.num_folded >= 2
    sess = ort.InferenceSession(
        folded.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (got,) = sess.run(None, {folded.graph.input[0].name: x})
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL


def test_user_doc_string_is_neither_state_nor_wiped(rng):
    model = _conv_bn(rng, "Conv", bias=True)
    model.graph.node[1].doc_string = "kept"  # a user's note on the BN
    model.graph.node[0].doc_string = "kept"  # and on the Conv
    folded, report = _check(model, rng.normal(size=(2, 4, 6, 6)).astype("float32"))
    assert _ops(folded) == ["Conv"] and report.num_folded == 1
    assert folded.graph.node[0].doc_string == "kept"


def test_shape_inference_runs_once(rng, monkeypatch):
    c = 4
    inits = [_init("w", rng.normal(size=(c, c, 1, 1)))]
    inits += _bn_inits(rng, c, "a") + _bn_inits(rng, c, "b")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        _bn_node("r", "h", "a"),  # kept: Mul + Add
        helper.make_node("Conv", ["h", "w"], ["k"]),
        _bn_node("k", "y", "b"),  # folded
    ]
    model = _model(nodes, inits, [2, c, 5, 5], ["N", "C", "H", "W"])
    calls = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(
        onnx.shape_inference, "infer_shapes", lambda m: calls.append(1) or real(m)
    )
    folded, report = _check(model, rng.normal(size=(2, c, 5, 5)).astype("float32"))
    assert len(calls) == 1
    assert _ops(folded) == ["Relu", "Mul", "Add", "Conv"]
    assert (report.num_folded, report.num_kept) == (1, 1)


@pytest.mark.parametrize(
    "case, match", [("negative_variance", "variance"), ("computed", "not constants")]
)
def test_unfoldable_bn_left_unchanged_and_reported(rng, case, match):
    c = 4
    inits = [_init("w", rng.normal(size=(c, c, 1, 1))), *_bn_inits(rng, c)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), _bn_node("h", "y")]
    if case == "negative_variance":
        inits[-1] = _init("bn_v", -np.ones(c))
    else:  # the scale is computed at run time
        inits[1] = _init("g0", rng.normal(size=c))
        nodes.insert(0, helper.make_node("Relu", ["g0"], ["bn_g"]))
    model = _model(nodes, inits, [2, c, 5, 5], ["N", "C", "H", "W"])
    folded, report = fold_onnx(model)
    assert "BatchNormalization" in _ops(folded)
    (record,) = report.records
    assert record.action == "left_unchanged" and match in record.reason


def _external_model(tmp_path, rng):
    """A Conv+BN model saved with its weights in `weights.bin` next to it."""
    model = _conv_bn(rng, "Conv", bias=True)
    folder = tmp_path / "model"
    folder.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the data out of the proto it saves
    onnx.save(
        copy,
        str(folder / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return model, folder


def test_external_data_read_from_model_folder_not_cwd(rng, tmp_path, monkeypatch):
    model, folder = _external_model(tmp_path, rng)
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    size = (folder / "weights.bin").stat().st_size
    (decoy / "weights.bin").write_bytes(np.full(size // 4, 9.0, "float32").tobytes())
    monkeypatch.chdir(decoy)
    lazy = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match="Pass `base_dir=`"):
        fold_onnx(lazy)
    folded, report = fold_onnx(lazy, base_dir=folder)
    assert report.num_folded == 1
    x = rng.normal(size=(2, 4, 6, 6)).astype("float32")
    (got,), (ref,) = _run(folded, x), _run(model, x)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL
    with pytest.raises(ValueError, match="not a folder"):
        fold_onnx(lazy, base_dir=folder / "m.onnx")


def test_external_data_outside_base_dir_refused(rng, tmp_path):
    _, folder = _external_model(tmp_path, rng)
    lazy = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for t in lazy.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../model/weights.bin"
    inner = folder / "sub"
    inner.mkdir()
    with pytest.raises(ValueError, match="refusing to read it"):
        fold_onnx(lazy, base_dir=inner)


# ---------------------------------------------------------------- other producers
def _graph_model(nodes, inits, inputs, out_shape, opset=17, ir=8, outputs=("y",)):
    """A float32 model; `inputs` maps graph input names to shapes."""
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs]
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, out_shape) for n in outputs
    ]
    graph = helper.make_graph(nodes, "g", ins, outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def _run_feeds(model, feeds):
    sess = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)


def _same(model, folded, feeds):
    for a, b in zip(_run_feeds(folded, feeds), _run_feeds(model, feeds), strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() / np.abs(b).max() <= RTOL


@pytest.mark.parametrize("kind", ["identity", "graph_input", "computed"])
def test_conv_bias_that_is_not_an_initializer_is_kept(rng, kind):
    """The bias reaches the folded Conv (it used to be read as zero)."""
    inits = [_init("w", rng.normal(size=(6, 4, 3, 3))), *_bn_inits(rng, 6)]
    nodes, inputs = [], [("x", [2, 4, 6, 6])]
    feeds = {"x": rng.normal(size=(2, 4, 6, 6)).astype("float32")}
    if kind == "identity":
        inits.append(_init("b0", rng.normal(size=6)))
        nodes.append(helper.make_node("Identity", ["b0"], ["b"]))
    elif kind == "graph_input":
        inputs.append(("b", [6]))
        feeds["b"] = rng.normal(size=6).astype("float32")
    else:
        inits.append(_init("b0", rng.normal(size=6)))
        nodes.append(helper.make_node("Relu", ["b0"], ["b"]))
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["h"]), _bn_node("h", "y")]
    model = _graph_model(nodes, inits, inputs, [2, 6, 4, 4])
    before = model.SerializeToString()
    folded, report = fold_onnx(model)
    assert model.SerializeToString() == before
    _same(model, folded, feeds)
    assert "BatchNormalization" not in _ops(folded) and report.num_folded == 1
    if kind == "graph_input":  # the bias stays an input: scaled in the graph
        assert [i.name for i in folded.graph.input] == ["x", "b"]
        feeds["b"] = 10 * feeds["b"]
        _same(model, folded, feeds)


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_overridable_weight_is_never_baked_in(rng, op):
    """An initializer that is also a graph input can be fed: it stays one."""
    if op == "Conv":
        w, x_shape, out_shape = (
            rng.normal(size=(6, 4, 1, 1)),
            [2, 4, 3, 3],
            [2, 6, 3, 3],
        )
    else:
        w, x_shape, out_shape = rng.normal(size=(4, 6)), [3, 4], [3, 6]
    inits = [_init("w", w), *_bn_inits(rng, 6)]
    nodes = [helper.make_node(op, ["x", "w"], ["h"]), _bn_node("h", "y")]
    model = _graph_model(
        nodes, inits, [("x", x_shape), ("w", list(w.shape))], out_shape
    )
    folded, report = fold_onnx(model)
    (record,) = report.records
    assert record.action == "kept_as_scale_shift"
    assert "can be overridden" in record.reason and "'w'" in record.reason
    assert (
        numpy_helper.to_array(
            {i.name: i for i in folded.graph.initializer}["w"]
        ).tolist()
        == numpy_helper.to_array(inits[0]).tolist()
    )
    x = rng.normal(size=x_shape).astype("float32")
    _same(model, folded, {"x": x})
    _same(model, folded, {"x": x, "w": rng.normal(size=w.shape).astype("float32")})


@pytest.mark.parametrize("bias_first", [True, False])
@pytest.mark.parametrize("tail", ["mul_add", "bn"])
def test_matmul_bias_add_in_either_order(rng, bias_first, tail):
    """PyTorch's nn.Linear on a rank-3 input: Add(bias, MatMul(x, W))."""
    rank = 3 if tail == "mul_add" else 2
    x_shape = [2, 3, 5][-rank:]
    out_shape = [*x_shape[:-1], 6]
    inits = [_init("w", rng.normal(size=(5, 6))), _init("b", rng.normal(size=6))]
    add_in = ["b", "h0"] if bias_first else ["h0", "b"]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h0"]),
        helper.make_node("Add", add_in, ["h1"]),
    ]
    if tail == "mul_add":
        inits += [
            _init("s", rng.normal(size=(1, 1, 6))),
            _init("t", rng.normal(size=6)),
        ]
        nodes += [
            helper.make_node("Mul", ["s", "h1"], ["h2"]),
            helper.make_node("Add", ["h2", "t"], ["y"]),
        ]
    else:
        inits += _bn_inits(rng, 6)
        nodes.append(_bn_node("h1", "y"))
    model = _graph_model(nodes, inits, [("x", x_shape)], out_shape)
    folded, report = fold_onnx(model)
    _same(model, folded, {"x": rng.normal(size=x_shape).astype("float32")})
    assert _ops(folded) == ["MatMul", "Add"]
    assert report.num_folded == (2 if tail == "mul_add" else 1)


def test_ir3_initializers_are_inputs_and_output_passes_checker(rng):
    """IR 3: every initializer is a graph input (overridable); what folds (a
    weight in a Constant node) gets Constant nodes, never new initializers."""
    c = 4
    w = rng.normal(size=(c, c, 1, 1)).astype("float32")
    consts = [
        helper.make_node("Constant", [], ["wc"], value=_init("wc", w)),
        *(
            helper.make_node("Constant", [], [t.name], value=t)
            for t in _bn_inits(rng, c, "k") + _bn_inits(rng, c, "a")
        ),
    ]
    nodes = consts + [
        helper.make_node("Conv", ["x", "wc"], ["h"]),
        _bn_node("h", "h2", "k"),  # constants only: folds
        helper.make_node("Conv", ["h2", "wi"], ["h3"]),
        _bn_node("h3", "h4", "a"),  # its Conv's weight is an input in IR 3
        helper.make_node("Relu", ["h4"], ["r"]),
        _bn_node("r", "y", "b"),  # initializer parameters: left as it is
    ]
    inits = [_init("wi", w), *_bn_inits(rng, c, "b")]
    inputs = [("x", [2, c, 3, 3])] + [(i.name, list(i.dims)) for i in inits]
    model = _graph_model(nodes, inits, inputs, [2, c, 3, 3], opset=9, ir=3)
    folded, report = fold_onnx(model)  # runs onnx.checker on the result
    assert folded.ir_version == 3
    assert {i.name for i in folded.graph.initializer} <= {
        i.name for i in folded.graph.input
    }
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    actions = {r.name: r.action for r in report.records}
    assert actions == {
        "k": "folded_into_preceding",
        "a": "kept_as_scale_shift",
        "b": "left_unchanged",
    }
    x = rng.normal(size=(2, c, 3, 3)).astype("float32")
    _same(model, folded, {"x": x})  # (ONNX Runtime feeds no initializer in IR 3)


@pytest.mark.parametrize("after", ["relu", "conv_per_channel", "conv_per_activation"])
def test_opset7_bn_spatial0_per_activation(rng, after):
    """Opset <= 8 BatchNormalization(spatial=0): statistics per activation."""
    c, hw = 3, 4
    shape = (c, hw, hw)
    if after == "conv_per_channel":  # per-activation form of per-channel values
        stats = [np.broadcast_to(rng.uniform(0.5, 2, (c, 1, 1)), shape) for _ in "gbmv"]
    else:
        stats = [rng.uniform(0.5, 2, shape) for _ in "gbmv"]
    inits = [_init(f"bn_{k}", v) for k, v in zip("gbmv", stats, strict=True)]
    inits.append(_init("w", rng.normal(size=(c, c, 1, 1))))
    first = helper.make_node(
        "Relu" if after == "relu" else "Conv",
        *((["x"], ["h"]) if after == "relu" else (["x", "w"], ["h"])),
    )
    bn = helper.make_node(
        "BatchNormalization", ["h", "bn_g", "bn_b", "bn_m", "bn_v"], ["y"], spatial=0
    )
    model = _graph_model(
        [first, bn], inits, [("x", [2, c, hw, hw])], [2, c, hw, hw], opset=7, ir=4
    )
    folded, report = fold_onnx(model)
    _same(model, folded, {"x": rng.normal(size=(2, c, hw, hw)).astype("float32")})
    (record,) = report.records
    if after == "conv_per_channel":
        assert _ops(folded) == ["Conv"] and record.action == "folded_into_preceding"
    else:
        assert _ops(folded)[-2:] == ["Mul", "Add"]
        assert record.action == "kept_as_scale_shift"


@pytest.mark.parametrize(
    "opset, attrs, outputs, match",
    [
        (15, {"training_mode": 1}, ["y", "rm", "rv"], "training_mode=1"),
        (15, {"training_mode": 1}, ["y"], "training_mode=1"),
        (9, {}, ["y", "m", "v", "sm", "sv"], "statistics outputs"),
        (7, {}, ["y", "m", "", "", ""], "statistics outputs"),
    ],
)
def test_bn_in_training_form_is_left_unchanged(rng, opset, attrs, outputs, match):
    inits = [_init("w", rng.normal(size=(4, 4, 1, 1))), *_bn_inits(rng, 4)]
    bn = helper.make_node(
        "BatchNormalization", ["h", "bn_g", "bn_b", "bn_m", "bn_v"], outputs, **attrs
    )
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), bn]
    extra = [o for o in outputs[1:] if o]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 3])]
    outs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4]) for o in extra]
    graph = helper.make_graph(nodes, "g", ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    folded, report = fold_onnx(model)
    assert _ops(folded) == ["Conv", "BatchNormalization"]
    (record,) = report.records
    assert record.action == "left_unchanged" and match in record.reason


def test_bn_named_statistics_outputs_are_in_the_reason(rng):
    """A BN whose statistics output is read elsewhere must stay (opset 9)."""
    inits = [_init("w", rng.normal(size=(4, 4, 1, 1))), *_bn_inits(rng, 4)]
    bn = helper.make_node(
        "BatchNormalization",
        ["h", "bn_g", "bn_b", "bn_m", "bn_v"],
        ["y", "m", "", "", ""],
    )
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), bn]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])]
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 3]),
        helper.make_tensor_value_info("m", TensorProto.FLOAT, [4]),
    ]
    graph = helper.make_graph(nodes, "g", ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 7
    folded, report = fold_onnx(model)
    assert _ops(folded) == ["Conv", "BatchNormalization"]
    assert "['m']" in report.records[0].reason


# ------------------------------------------------------------ through layout ops
def _channels_last_conv(rng, c_in=3, c_out=4, tail=("Sub", "Mul", "Add"), bias=None):
    """What torch.onnx makes of a channels-last Conv2D + BN: the BN's
    Sub/Mul/Add (constants of shape (1, 1, 1, C)) behind a Transpose and a
    no-op Cast."""
    inits = [_init("w", rng.normal(size=(c_out, c_in, 3, 3)))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "w"], ["h"], name="conv"),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 3, 1]),
        helper.make_node("Cast", ["ht"], ["cur"], to=TensorProto.FLOAT),
    ]
    for k, op in enumerate(tail):
        shape = (1, 1, 1, c_out) if k % 2 == 0 else (c_out,)
        value = rng.uniform(0.5, 2, size=shape)
        if op in ("Mul", "Div"):
            value = value * rng.choice([-1, 1], size=shape)
        inits.append(_init(f"c{k}", value))
        out = "y" if k == len(tail) - 1 else f"t{k}"
        nodes.append(helper.make_node(op, ["cur", f"c{k}"], [out], name=f"{op}{k}"))
        nodes[-1].input[0] = nodes[-2].output[0] if k else "cur"
    return _graph_model(nodes, inits, [("x", [2, 6, 6, c_in])], [2, 4, 4, c_out])


def test_folds_through_transpose_and_noop_cast(rng):
    model = _channels_last_conv(rng)
    folded, report = fold_onnx(model)
    _same(model, folded, {"x": rng.normal(size=(2, 6, 6, 3)).astype("float32")})
    assert _ops(folded) == ["Transpose", "Conv", "Transpose", "Cast"]
    assert report.num_folded == 3 and report.num_kept == 0


@pytest.mark.parametrize(
    "layout, c_shape",
    [
        ("reshape_flat_spatial", (1, 6, 1)),  # (N, C, H, W) -> (N, C, H*W)
        ("reshape_split_batch", (1, 1, 6, 1, 1)),  # (N, C, H, W) -> (1, N, C, H, W)
        ("squeeze", (6, 1)),  # Conv1D as Unsqueeze-Conv-Squeeze
        ("unsqueeze", (1, 6, 1, 1, 1)),
        ("flatten_1x1", (1, 6)),  # (N, C, 1, 1) -> (N, C)
    ],
)
def test_folds_through_reshape_squeeze_unsqueeze(rng, layout, c_shape):
    spatial = (1, 1) if layout == "flatten_1x1" else (3, 4)
    x_shape = [2, 4, *spatial]
    inits = [
        _init("w", rng.normal(size=(6, 4, 1, 1))),
        _init("s", rng.normal(size=c_shape)),
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"])]
    out = {
        "reshape_flat_spatial": [2, 6, 12],
        "reshape_split_batch": [1, 2, 6, 3, 4],
        "squeeze": [2, 6, 4],
        "unsqueeze": [2, 6, 1, 3, 4],
        "flatten_1x1": [2, 6],
    }[layout]
    if layout.startswith("reshape"):
        inits.append(numpy_helper.from_array(np.array(out, np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["h", "shape"], ["l"]))
    elif layout == "squeeze":
        x_shape = [2, 4, 1, 4]
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
        nodes.append(helper.make_node("Squeeze", ["h", "axes"], ["l"]))
    elif layout == "unsqueeze":
        inits.append(numpy_helper.from_array(np.array([-3], np.int64), "axes"))
        nodes.append(helper.make_node("Unsqueeze", ["h", "axes"], ["l"]))
    else:
        nodes.append(helper.make_node("Flatten", ["h"], ["l"]))
    nodes.append(helper.make_node("Mul", ["l", "s"], ["y"]))
    model = _graph_model(nodes, inits, [("x", x_shape)], out)
    folded, report = fold_onnx(model)
    _same(model, folded, {"x": rng.normal(size=x_shape).astype("float32")})
    assert "Mul" not in _ops(folded) and report.num_folded == 1


@pytest.mark.parametrize("case", ["reshape_mixes_channels", "relu_first", "shared"])
def test_scale_shift_not_folded_is_reported(rng, case):
    """A BN-like Mul/Add that cannot fold is in the report with the reason."""
    inits = [
        _init("w", rng.normal(size=(6, 4, 1, 1))),
        _init("s", rng.normal(size=6)),
        _init("t", rng.normal(size=6)),
        numpy_helper.from_array(np.array([2, 3, 4, 6], np.int64), "shape"),
    ]
    first = "Relu" if case == "relu_first" else "Conv"
    nodes = [
        helper.make_node(first, ["x", "w"][: 1 if first == "Relu" else 2], ["h"]),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["ht", "s"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    x_shape, outputs = [2, 6 if first == "Relu" else 4, 3, 4], ("y",)
    if (
        case == "reshape_mixes_channels"
    ):  # (2, 6, 3, 4) -> (2, 3, 4, 6): not a transpose
        nodes[1] = helper.make_node("Reshape", ["h", "shape"], ["ht"])
    if case == "shared":
        outputs = ("y", "h")
    out_shape = [2, 3, 4, 6]
    model = _graph_model(nodes, inits, [("x", x_shape)], out_shape, outputs=outputs)
    if case == "shared":
        model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 6
        model.graph.output[1].type.tensor_type.shape.dim[3].dim_value = 4
        model.graph.output[1].type.tensor_type.shape.dim[2].dim_value = 3
    folded, report = fold_onnx(model)
    _same(model, folded, {"x": rng.normal(size=x_shape).astype("float32")})
    assert _ops(folded) == _ops(model)
    assert [r.action for r in report.records] == ["kept_as_scale_shift"] * 2
    why = {
        "reshape_mixes_channels": "moves the channels",
        "relu_first": "Relu",
        "shared": "is read by",
    }[case]
    assert all(why in r.reason for r in report.records), report


def _export_keras(tmp_path, rng, channels_first=False):
    import keras

    L = keras.layers
    fmt = "channels_first" if channels_first else "channels_last"
    shape = (3, 8, 8) if channels_first else (8, 8, 3)
    model = keras.Sequential(
        [
            keras.Input(shape),
            L.Conv2D(4, 3, data_format=fmt),
            L.BatchNormalization(axis=1 if channels_first else -1),
            L.ReLU(),
            L.Conv2D(5, 3, use_bias=False, data_format=fmt),
            L.BatchNormalization(axis=1 if channels_first else -1),
            L.Flatten(),
            L.Dense(6),
            L.BatchNormalization(),
        ]
    )
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            for v in (layer.gamma, layer.beta, layer.moving_mean):
                v.assign(rng.normal(size=n))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=n))
    x = rng.normal(size=(2, *shape)).astype("float32")
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    path = tmp_path / "keras.onnx"
    model.export(str(path), format="onnx", verbose=False)
    return onnx.load(str(path)), x, ref


@pytest.mark.skipif(
    __import__("keras").backend.backend() not in ("torch", "jax"),
    reason="torch.onnx / jax2onnx exports: torch and JAX backends",
)
@pytest.mark.parametrize("channels_first", [False, True])
def test_folds_torch_and_jax_exports_of_keras_models(rng, tmp_path, channels_first):
    """Keras's own export on torch/JAX: BN as Sub/Mul/Add behind a Transpose."""
    if __import__("keras").backend.backend() == "jax":
        pytest.importorskip("jax2onnx", reason="pip install jax2onnx")
        if channels_first:  # jax2onnx emits the same Transpose form; each
            pytest.skip("export takes ~45 s on 2 cores: channels-last only on JAX")
    original, x, ref = _export_keras(tmp_path, rng, channels_first)
    assert {"Mul", "Add"} <= set(_ops(original))
    folded, report = fold_onnx(original)
    assert "Mul" not in _ops(folded) and "Sub" not in _ops(folded)
    assert _ops(folded).count("Add") == 1  # the Dense's bias
    assert report.num_kept == 0 and report.num_folded >= 6
    sess = ort.InferenceSession(
        folded.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (got,) = sess.run(None, {folded.graph.input[0].name: x})
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL
