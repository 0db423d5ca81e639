"""The assertions every zoo model must pass (shared by both test files)."""

from __future__ import annotations

from tests.zoo.pipeline import RTOL


def assert_conforms(result: dict) -> None:
    stages = ["replace", "fit_jit", "save_load", "fold", "export_onnx"]
    failed = {s: result.get(s) for s in stages if result.get(s) != "ok"}
    assert not failed, (failed, result.get("tracebacks"))
    assert result["replace_parity"] <= RTOL, result
    assert result["swapped"] == result["bn_layers"], result
    assert result["fold_parity"] <= RTOL, result
    assert result["folded"] + result["kept"] == result["bn_layers"], result
    assert result["cli_inspect"] == 0, result
    assert result["onnx_parity"] <= RTOL, result
    assert result["bn_nodes_left"] == 0, result
    assert result["cli_export"] == 0, result
