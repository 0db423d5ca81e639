"""Tests for converters._tf_convert (TensorFlow backend only)."""

import keras
import pytest

from converters.export import node_counts

L = keras.layers
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="ONNX conversion uses tf2onnx: TensorFlow backend only",
)


def _mobilenet_head():
    """keras.applications MobileNet's head: a 1x1 map, a 1x1 conv, Reshape."""
    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, strides=2, padding="same")(x)
    x = L.GlobalAveragePooling2D(keepdims=True)(x)
    x = L.Conv2D(5, 1, padding="same")(x)
    return keras.Model(inp, L.Reshape((5,))(x))


def _convert(model):
    from converters._tf_convert import signature_of, to_onnx

    return to_onnx(model, signature_of(model), 17)


def test_result_is_a_fixed_point_of_tf2onnx_optimizers():
    from tf2onnx.graph import GraphUtil

    keras.utils.set_random_seed(0)
    proto = _convert(_mobilenet_head())
    again = GraphUtil.optimize_model_proto(proto)
    assert [n.op_type for n in again.graph.node] == [
        n.op_type for n in proto.graph.node
    ]
    assert "Shape" not in node_counts(proto)  # the Reshape's shape is a constant


def test_optimizer_loop_that_stops_early_is_finished(monkeypatch):
    # tf2onnx's optimizer loop stops when no optimizer reports a change, but
    # some change the graph without reporting it (run-to-run, by node visiting
    # order). Simulate that: its first optimize_graph runs a single round.
    import tf2onnx.optimizer as tf2onnx_optimizer

    keras.utils.set_random_seed(0)
    model = _mobilenet_head()
    expected = node_counts(_convert(model))

    full = tf2onnx_optimizer.optimize_graph
    calls = []

    def one_round_first(graph, catch_errors=True, optimizers=None):
        calls.append(1)
        if len(calls) > 1:
            return full(graph, catch_errors, optimizers=optimizers)
        opts = optimizers or tf2onnx_optimizer._get_optimizers()
        for factory in opts.values():
            graph = factory().optimize(graph, 0) or graph
        return graph

    monkeypatch.setattr(tf2onnx_optimizer, "optimize_graph", one_round_first)
    got = node_counts(_convert(model))
    assert got == expected
    assert len(calls) >= 2  # tf2onnx's loop, then ours


def test_optimizers_run_without_graph_copies(monkeypatch):
    # tf2onnx deep-copies the graph before each optimizer unless told not to
    # catch errors: each copy holds the weights again.
    import tf2onnx.optimizer as tf2onnx_optimizer

    full = tf2onnx_optimizer.optimize_graph
    catch = []

    def record(graph, catch_errors=True, optimizers=None):
        catch.append(catch_errors)
        return full(graph, catch_errors, optimizers=optimizers)

    monkeypatch.setattr(tf2onnx_optimizer, "optimize_graph", record)
    keras.utils.set_random_seed(0)
    _convert(_mobilenet_head())
    assert catch and not any(catch)


def test_failing_optimizer_falls_back_to_tf2onnx_default(monkeypatch):
    import os

    import tf2onnx.optimizer as tf2onnx_optimizer

    keras.utils.set_random_seed(0)
    model = _mobilenet_head()
    expected = node_counts(_convert(model))
    full = tf2onnx_optimizer.optimize_graph
    catch = []

    def fail_without_catching(graph, catch_errors=True, optimizers=None):
        catch.append(catch_errors)
        if not catch_errors:
            raise RuntimeError("an optimizer failed")
        return full(graph, catch_errors, optimizers=optimizers)

    monkeypatch.setattr(tf2onnx_optimizer, "optimize_graph", fail_without_catching)
    monkeypatch.delenv("TF2ONNX_CATCH_ERRORS", raising=False)
    assert node_counts(_convert(model)) == expected
    assert False in catch and True in catch
    assert "TF2ONNX_CATCH_ERRORS" not in os.environ
