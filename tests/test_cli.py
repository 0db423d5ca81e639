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


def run_cli(*args, backend=None, cwd=ROOT):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["KERAS_BACKEND"] = backend or keras.backend.backend()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "converters.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
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


# -- The exit-status contract, in process (fast) ----------------------------------


def call_main(capsys, *args):
    from converters import cli

    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_contract(result, code, match):
    got, _, err = result
    assert got == code, err
    assert "Traceback" not in err, err
    ours = [ln for ln in err.splitlines() if ln.startswith("keras-bn:")]
    assert len(ours) == 1 and match in ours[0], err


def test_output_problems_are_usage_errors(model_file, tmp_path, capsys):
    (tmp_path / "dir.keras").mkdir()
    cases = [
        (tmp_path / "dir.keras", "is a directory"),
        (tmp_path / "missing" / "f.keras", "does not exist"),
    ]
    if os.path.isdir("/proc/self"):  # not writable, even by root
        cases.append(("/proc/f.keras", "is not writable"))
    for out, match in cases:
        for force in ([], ["--force"]):
            result = call_main(capsys, "fold", model_file, "-o", out, *force)
            assert_contract(result, 2, match)
    assert os.listdir(tmp_path) == ["dir.keras"]


def test_unwritable_folder_checked_before_converting(model_file, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders (the /proc case covers it)")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = call_main(capsys, "fold", model_file, "-o", folder / "f.keras")
    finally:
        folder.chmod(0o700)
    assert_contract(result, 2, "is not writable")


def test_losing_the_race_is_a_usage_error(model_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "f.keras"
    save = keras.Model.save

    def racing_save(self, path, *args, **kwargs):
        save(self, path, *args, **kwargs)
        out.write_bytes(b"the other writer's file")

    monkeypatch.setattr(keras.Model, "save", racing_save)
    result = call_main(capsys, "fold", model_file, "-o", out)
    assert_contract(result, 2, "appeared while writing")
    assert out.read_bytes() == b"the other writer's file"
    assert os.listdir(tmp_path) == ["f.keras"]


def test_internal_error_exits_3_with_debug_hint(model_file, tmp_path, capsys, mp):
    import converters.fold_keras

    def broken(model):
        raise RuntimeError("a bug\nspanning lines")

    mp.setattr(converters.fold_keras, "fold_batchnorm", broken)
    args = ("fold", model_file, "-o", tmp_path / "f.keras")
    result = call_main(capsys, *args)
    assert_contract(result, 3, "internal error: RuntimeError: a bug spanning lines")
    assert "rerun with --debug" in result[2]
    code, _, err = call_main(capsys, "--debug", *args)
    assert code == 3 and "Traceback" in err and "raise RuntimeError" in err
    code, _, err = call_main(capsys, *args, "--debug")  # after the command too
    assert code == 3 and "Traceback" in err
    assert os.listdir(tmp_path) == []


@pytest.fixture
def mp(monkeypatch):
    return monkeypatch


def _zip_with(path, members):
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_zip_bomb_refused_before_reading(tmp_path, capsys, monkeypatch):
    from converters import cli

    bomb = tmp_path / "bomb.keras"
    _zip_with(bomb, {"config.json": b"{}", "model.weights.h5": bytes(3 * 2**20)})
    size = os.path.getsize(bomb)
    assert size < 2**16  # 3 MiB of zeros compress to a few KiB
    for command in (["inspect", bomb], ["fold", bomb, "-o", tmp_path / "o.keras"]):
        result = call_main(capsys, *command, "--max-uncompressed", 2**20)
        assert_contract(result, 2, "would expand to 3145730 bytes")
    monkeypatch.setenv(cli.ENV_MAX_UNCOMPRESSED, str(2**20))
    assert_contract(call_main(capsys, "inspect", bomb), 2, cli.ENV_MAX_UNCOMPRESSED)
    monkeypatch.setenv(cli.ENV_MAX_UNCOMPRESSED, "lots")
    assert_contract(call_main(capsys, "inspect", bomb), 2, "number of bytes")
    monkeypatch.delenv(cli.ENV_MAX_UNCOMPRESSED)
    monkeypatch.setattr(cli, "FLOOR_BYTES", 2**20)  # default: 4x size + floor
    assert_contract(call_main(capsys, "inspect", bomb), 2, "4x file size")
    assert os.listdir(tmp_path) == ["bomb.keras"]


def test_zip_headers_that_lie_are_caught_while_reading(model_file, tmp_path, capsys):
    """Sizes patched small in both headers: reading stops there, the CRC fails."""
    import struct
    import zipfile

    data = bytearray(model_file.read_bytes())
    with zipfile.ZipFile(model_file) as z:
        info = z.getinfo("config.json")
    for sig, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        start = 0
        while (start := data.find(sig, start)) >= 0:
            name_len = struct.unpack_from("<H", data, start + offset + 4)[0]
            skip = 46 if sig == b"PK\x01\x02" else 30
            if bytes(data[start + skip : start + skip + name_len]) == b"config.json":
                struct.pack_into("<I", data, start + offset, 10)
            start += 4
    liar = tmp_path / "liar.keras"
    liar.write_bytes(bytes(data))
    with zipfile.ZipFile(liar) as z:
        assert z.getinfo("config.json").file_size == 10 < info.file_size
    assert_contract(call_main(capsys, "inspect", liar), 2, "cannot load")


def test_custom_objects_module(tmp_path, capsys):
    import importlib
    import sys
    import uuid

    name = f"scale_layers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import keras\n\n\n"
        f"@keras.saving.register_keras_serializable(package={name!r})\n"
        "class Scale2(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return 2.0 * x\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    model = keras.Sequential([keras.Input((3,)), module.Scale2(), L.Dense(2)])
    path = tmp_path / "custom.keras"
    model.save(path)
    # A fresh process, where nothing registered Scale2.
    proc = run_cli("inspect", path)
    assert_one_line_error(proc, 2, "Could not locate class 'Scale2'")
    assert "--custom-objects" in proc.stderr
    proc = run_cli("--custom-objects", name, "inspect", path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "0 BatchNormalization layer(s)" in proc.stdout
    result = call_main(capsys, "--custom-objects", "no_such_mod_xyz", "inspect", path)
    assert_contract(result, 2, "cannot import --custom-objects module 'no_such_mod")
