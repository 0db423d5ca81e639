"""Tests for converters.bench.bench_latency on tiny ONNX graphs."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install onnx")
pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters.bench import bench_latency  # noqa: E402


def _write(path, n_matmuls):
    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "w")
    names = ["x"] + [f"h{i}" for i in range(n_matmuls - 1)] + ["y"]
    nodes = [
        helper.make_node("MatMul", [names[i], "w"], [names[i + 1]])
        for i in range(n_matmuls)
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_bench_latency_reports_ratio(tmp_path):
    a, b = _write(tmp_path / "a.onnx", 1), _write(tmp_path / "b.onnx", 3)
    r = bench_latency(a, b, batch=4, runs=3, warmup=1)
    assert r["a_ms"] > 0 and r["b_ms"] > 0
    assert r["speedup"] == pytest.approx(r["b_ms"] / r["a_ms"])


def test_bench_latency_bad_batch(tmp_path):
    a = _write(tmp_path / "a.onnx", 1)
    with pytest.raises(ValueError, match="batch"):
        bench_latency(a, a, batch=0)
