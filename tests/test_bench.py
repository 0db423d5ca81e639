"""Tests for converters.bench.bench_latency on tiny ONNX graphs."""

import keras
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install onnx")
pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters.bench import bench_latency  # noqa: E402

# Backend-independent (ONNX Runtime timings of ONNX files): one backend runs it.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent ONNX Runtime benchmark helpers: runs on the TensorFlow "
    "backend only, to save CI time",
)


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


def test_median_ratio_interval_covers_and_reflects_block_noise():
    from converters.bench import median_ratio

    rng = np.random.default_rng(0)
    den = rng.uniform(1.0, 1.1, (6, 40))
    med, low, high = median_ratio(den * 1.25, den)
    assert med == pytest.approx(1.25) and low == pytest.approx(1.25) == high
    # Each block's sessions are 0.8x or 1.2x as fast: the interval widens.
    luck = np.array([0.8, 1.2, 0.8, 1.2, 0.8, 1.2])[:, None]
    num = den * luck * rng.uniform(0.99, 1.01, (6, 40))
    med, low, high = median_ratio(num, den)
    assert low < 0.85 and high > 1.15 and low <= med <= high


def test_blocked_latency_makes_fresh_sessions_in_random_orders(tmp_path):
    import onnxruntime as ort

    from converters.bench import blocked_latency_ms

    paths = [_write(tmp_path / "a.onnx", 1), _write(tmp_path / "b.onnx", 3)]
    orders = []

    def make(order):
        orders.append(tuple(order))
        return [ort.InferenceSession(str(paths[k])) for k in order]

    feeds = [{"x": np.ones((2, 16), np.float32)}] * 2
    t = blocked_latency_ms(make, feeds, blocks=8, rounds=3, warmup=1)
    assert t.shape == (8, 3, 2) and (t > 0).all()
    assert sorted(set(orders)) == [(0, 1), (1, 0)]
