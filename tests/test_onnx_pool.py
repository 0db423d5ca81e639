"""Tests for converters._onnx_pool: jax2onnx's full-rank MaxPool rewritten to
one ONNX Runtime runs, checked against NumPy on hand-written graphs."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from keras_bn.converters._onnx_pool import channels_first_pools  # noqa: E402

H = onnx.helper


@pytest.fixture
def rng():
    return np.random.default_rng(5)


def _full_rank_pool(shape, kernel, strides, pads, two_unsqueezes=False):
    """jax2onnx's form: Unsqueeze to two new leading axes, a MaxPool over all
    of the input's axes, Squeeze."""
    rank = len(shape)
    out = [
        (shape[i] + pads[i] + pads[rank + i] - kernel[i]) // strides[i] + 1
        for i in range(rank)
    ]
    axes = [H.make_tensor("axes01", onnx.TensorProto.INT64, [2], [0, 1])]
    if two_unsqueezes:
        axes += [H.make_tensor("axes0", onnx.TensorProto.INT64, [1], [0])]
        unsq = [
            H.make_node("Unsqueeze", ["x", "axes0"], ["u0"]),
            H.make_node("Unsqueeze", ["u0", "axes0"], ["u"]),
        ]
    else:
        unsq = [H.make_node("Unsqueeze", ["x", "axes01"], ["u"])]
    nodes = [
        *unsq,
        H.make_node(
            "MaxPool", ["u"], ["p"], kernel_shape=kernel, strides=strides, pads=pads
        ),
        H.make_node("Squeeze", ["p", "axes01"], ["y"]),
    ]
    graph = H.make_graph(
        nodes,
        "pool",
        [H.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [H.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out)],
        initializer=axes,
    )
    assert rank == len(kernel)
    return H.make_model(graph, opset_imports=[H.make_opsetid("", 18)])


def _reference(x, kernel, strides, pads):
    rank = x.ndim
    padded = np.pad(
        x,
        [(pads[i], pads[rank + i]) for i in range(rank)],
        constant_values=-np.inf,
    )
    out_shape = [(padded.shape[i] - kernel[i]) // strides[i] + 1 for i in range(rank)]
    out = np.empty(out_shape, x.dtype)
    for idx in np.ndindex(*out_shape):
        window = tuple(
            slice(idx[i] * strides[i], idx[i] * strides[i] + kernel[i])
            for i in range(rank)
        )
        out[idx] = padded[window].max()
    return out


def _run(proto, x):
    sess = ort.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "shape,kernel,strides,pads",
    [
        # channels-last 2-D: ResNet's stem pool, and "same" padding
        ((2, 9, 9, 3), [1, 3, 3, 1], [1, 2, 2, 1], [0, 0, 0, 0, 0, 0, 0, 0]),
        ((2, 7, 7, 3), [1, 2, 2, 1], [1, 2, 2, 1], [0, 0, 0, 0, 0, 1, 1, 0]),
        # channels-last 3-D
        ((2, 4, 5, 6, 3), [1, 2, 1, 3, 1], [1, 1, 2, 2, 1], [0] * 10),
        # channels-first 2-D: no Transposes needed
        ((2, 3, 8, 8), [1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 1, 0, 0, 0, 0, 1]),
    ],
)
@pytest.mark.parametrize("two_unsqueezes", [False, True])
def test_rewritten_pool_runs_and_matches_numpy(
    rng, shape, kernel, strides, pads, two_unsqueezes
):
    proto = _full_rank_pool(shape, kernel, strides, pads, two_unsqueezes)
    x = rng.normal(size=shape).astype("float32")
    with pytest.raises(Exception, match="Unsupported pooling size"):
        _run(proto, x)  # the form ONNX Runtime refuses
    new, count = channels_first_pools(proto)
    assert count == 1
    onnx.checker.check_model(new, full_check=True)
    ops = [n.op_type for n in new.graph.node]
    assert "Unsqueeze" not in ops and "Squeeze" not in ops
    np.testing.assert_array_equal(_run(new, x), _reference(x, kernel, strides, pads))
    assert [n.op_type for n in proto.graph.node][-1] == "Squeeze"  # input unchanged


@pytest.mark.parametrize(
    "kernel,strides,pads,why",
    [
        ([2, 2, 2, 1], [1, 2, 2, 1], [0] * 8, "pools over the batch"),
        ([1, 2, 2, 2], [1, 2, 2, 2], [0] * 8, "pools over every other axis"),
        ([1, 2, 2, 1], [1, 2, 2, 1], [1, 0, 0, 0, 0, 0, 0, 0], "pads the batch"),
    ],
)
def test_pools_that_cannot_be_rewritten_are_left(kernel, strides, pads, why):
    proto = _full_rank_pool((2, 6, 6, 3), kernel, strides, pads)
    new, count = channels_first_pools(proto)
    assert count == 0 and new is proto, why
