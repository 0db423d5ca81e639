"""Tests for converters.cli (the `keras-bn` command) through subprocess."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_bn

L = keras.layers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="ONNX export uses tf2onnx: TensorFlow backend only",
)


def run_cli(*args, backend=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["KERAS_BACKEND"] = backend or keras.backend.backend()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "converters.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


def assert_one_line_error(proc, code, match):
    assert proc.returncode == code, proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("keras-bn:")]
    assert len(ours) == 1 and match in ours[0], proc.stderr


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    rng = np.random.default_rng(11)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, use_bias=False),
            keras_bn.BatchNormalization(),
            L.ReLU(),
            L.BatchNormalization(),
            L.Dense(3),
        ]
    )
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=8))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=8))
            layer.gamma.assign(rng.normal(size=8))
            layer.beta.assign(rng.normal(size=8))
    path = tmp_path_factory.mktemp("cli") / "model.keras"
    model.save(path)
    return path


def test_fold_then_inspect(model_file, tmp_path):
    out = tmp_path / "folded.keras"
    proc = run_cli("fold", model_file, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "2 folded, 0 kept" in proc.stdout
    import converters.affine  # noqa: F401 - registers ChannelAffine

    original = keras.saving.load_model(model_file)
    folded = keras.saving.load_model(out)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    ref = np.asarray(original(x))
    got = np.asarray(folded(x))
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5
    proc = run_cli("inspect", model_file)
    assert proc.returncode == 0 and "2 BatchNormalization layer(s)" in proc.stdout
    assert "folded_into_following" in proc.stdout
    assert_one_line_error(run_cli("fold", model_file, "-o", out), 2, "--force")


@TF_ONLY
def test_export_inspect_and_verification_failure(model_file, tmp_path):
    out = tmp_path / "m.onnx"
    proc = run_cli("export", model_file, "-o", out, "--samples", "4")
    assert proc.returncode == 0, proc.stderr
    assert "parity: max relative error" in proc.stdout and out.exists()
    proc = run_cli("inspect", out)  # folded already: no BN node left
    assert proc.returncode == 0 and "0 BatchNormalization node(s)" in proc.stdout
    bad = tmp_path / "bad.onnx"  # rtol 0: float32 folding is never bit-exact
    proc = run_cli("export", model_file, "-o", bad, "--rtol", "0")
    assert_one_line_error(proc, 1, "verification failed")
    assert not bad.exists() and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_error_paths(model_file, tmp_path):
    missing = tmp_path / "missing.keras"
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    junk_onnx = tmp_path / "junk.onnx"
    junk_onnx.write_bytes(b"\x00\x01garbage")
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    cases = [
        (["export", missing, "-o", tmp_path / "a.onnx"], "does not exist"),
        (["fold", junk, "-o", tmp_path / "b.keras"], "not a valid .keras"),
        (["inspect", tmp_path / "model.h5"], "unsupported file"),
        (["inspect", junk_onnx], "cannot load"),
        (["export", model_file, "-o", existing], "--force"),
        (["export", model_file, "-o", tmp_path / "c.txt"], "must end with .onnx"),
        (["export", model_file], "required"),
        (["frobnicate"], "invalid choice"),
    ]
    for args, match in cases:
        assert_one_line_error(run_cli(*args), 2, match)
    assert existing.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["exists.onnx", "junk.keras", "junk.onnx"]


def test_export_on_other_backend_is_usage_error(model_file, tmp_path):
    proc = run_cli("export", model_file, "-o", tmp_path / "m.onnx", backend="jax")
    assert_one_line_error(proc, 2, "KERAS_BACKEND=tensorflow")
