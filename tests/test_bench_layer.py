"""Tests for bench/bench_layer.py's summary (pure; nothing is timed)."""

import importlib.util
import pathlib

import keras
import pytest

_PATH = pathlib.Path(__file__).parent.parent / "bench" / "bench_layer.py"
_spec = importlib.util.spec_from_file_location("bench_layer", _PATH)
bench_layer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_layer)

# Backend-independent (the summary of timings given as numbers): one backend runs it.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent benchmark summary: runs on the TensorFlow "
    "backend only, to save CI time",
)


def test_peer_ratios_fastest_peer_any_mode_and_same_mode():
    results = {
        "keras_bn (no XLA)": (9.0, 8.0),
        "keras_bn (XLA)": (14.0, 13.0),
        "Keras 3 BN (XLA)": (8.5, 8.0),
        "Keras 3 BN (no XLA)": (24.0, 23.0),
        "tf_keras BN (fused)": (10.0, 9.5),
        "fused op alone (no XLA)": (1.0, 1.0),  # a floor, not a peer
    }
    rows = {r[0]: r[1:] for r in bench_layer.peer_ratios(results)}
    peer, ratio, same, same_ratio = rows["keras_bn (no XLA)"]
    assert (peer, same) == ("Keras 3 BN (XLA)", "tf_keras BN (fused)")
    assert ratio == pytest.approx(9.0 / 8.5)
    assert same_ratio == pytest.approx(9.0 / 10.0)
    peer, ratio, same, same_ratio = rows["keras_bn (XLA)"]
    assert peer == same == "Keras 3 BN (XLA)"
    assert ratio == same_ratio == pytest.approx(14.0 / 8.5)


def test_peer_ratios_without_a_same_mode_peer():
    results = {"keras_bn (jit)": (2.0, 2.0), "PyTorch BN1d": (1.0, 1.0)}
    [(ours, peer, ratio, same, same_ratio)] = bench_layer.peer_ratios(results)
    assert (ours, peer, ratio) == ("keras_bn (jit)", "PyTorch BN1d", 2.0)
    assert same is None and same_ratio is None
