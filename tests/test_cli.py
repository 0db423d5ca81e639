"""Tests for converters.cli (the `keras-bn` command), in process and through
subprocesses (only where a fresh process matters: slow)."""

import inspect
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_bn

L = keras.layers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
PROGRESS = re.compile(r"^keras-bn: .* \.\.\. \d+\.\d s$")


def _export_has_cli_options():
    from converters import export

    return "progress" in inspect.signature(export.export_onnx).parameters


# End-to-end export: needs export_onnx's route, names, precision and progress
# options, and the route's packages on this backend.
E2E = pytest.mark.skipif(
    not _export_has_cli_options(),
    reason="export_onnx has no progress/route options (CLI export options unused)",
)


def route_or_skip():
    from converters import _deps

    if BACKEND not in _deps.ROUTES:
        pytest.skip(f"no ONNX export route on the {BACKEND} backend")
    absent = _deps.missing(_deps.ROUTES[BACKEND][1])
    if absent:
        pytest.skip(f"the {BACKEND} export route needs {absent}: not installed")
    return _deps.ROUTES[BACKEND][0]


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


def messages(err):
    """The stderr lines that are not progress lines."""
    return [ln for ln in err.splitlines() if not PROGRESS.match(ln)]


def assert_one_line_error(proc, code, match):
    assert proc.returncode == code, proc.stderr
    ours = [ln for ln in messages(proc.stderr) if ln.startswith("keras-bn:")]
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


def test_fold_then_inspect(model_file, tmp_path, capsys):
    out = tmp_path / "folded.keras"
    code, stdout, err = call_main(capsys, "fold", model_file, "-o", out)
    assert code == 0, err
    assert "2 folded, 0 kept" in stdout
    import converters.affine  # noqa: F401 - registers ChannelAffine

    original = keras.saving.load_model(model_file)
    folded = keras.saving.load_model(out)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    ref = keras.ops.convert_to_numpy(original(x))
    got = keras.ops.convert_to_numpy(folded(x))
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5
    code, stdout, _ = call_main(capsys, "inspect", model_file)
    assert code == 0 and "2 BatchNormalization layer(s)" in stdout
    assert "folded_into_following" in stdout
    assert_contract(call_main(capsys, "fold", model_file, "-o", out), 2, "--force")


@E2E
def test_export_inspect_and_verification_failure(model_file, tmp_path, capsys):
    route = route_or_skip()
    out = tmp_path / "m.onnx"
    proc = run_cli("export", model_file, "-o", out, "--samples", "4")
    assert proc.returncode == 0, proc.stderr
    assert "parity: max relative error" in proc.stdout and out.exists()
    # Quiet by default: nothing on stderr but the progress lines.
    assert messages(proc.stderr) == [], proc.stderr
    assert f"keras-bn: converting with {route} ... " in proc.stderr
    # The rest in this process (a fresh one per command costs a backend import).
    code, stdout, _ = call_main(capsys, "inspect", out)  # folded: no BN node left
    assert code == 0 and "0 BatchNormalization node(s)" in stdout
    bad = tmp_path / "bad.onnx"  # float32 folding is never exact to 1e-12
    result = call_main(capsys, "export", model_file, "-o", bad, "--rtol", "1e-12")
    assert_contract(result, 1, "verification failed")
    assert not bad.exists() and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_error_paths(model_file, tmp_path, capsys):
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
        assert_contract(call_main(capsys, *args), 2, match)
    assert existing.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["exists.onnx", "junk.keras", "junk.onnx"]


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
    ours = [ln for ln in messages(err) if ln.startswith("keras-bn:")]
    assert len(ours) == 1 and match in ours[0], err


def assert_line(result, code, line):
    """Exit status `code` and exactly `line` (or nothing, for None) on stderr
    besides the progress lines."""
    got, _, err = result
    assert got == code, err
    assert messages(err) == ([] if line is None else [line]), err


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


# -- Checks before converting --------------------------------------------------


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if the CLI gets as far as loading the model."""
    from converters import cli

    def refuse(path):
        raise AssertionError("the model was loaded: the check came too late")

    monkeypatch.setattr(cli, "_load_keras", refuse)


RTOL_HELP = "expected a finite number > 0 (e.g. 1e-5) or 'auto'"


@pytest.mark.parametrize(
    "args, line",
    [
        (["--rtol", "-1"], f"argument --rtol: {RTOL_HELP}; got '-1'"),
        (["--rtol", "nan"], f"argument --rtol: {RTOL_HELP}; got 'nan'"),
        (["--rtol", "inf"], f"argument --rtol: {RTOL_HELP}; got 'inf'"),
        (["--rtol", "0"], f"argument --rtol: {RTOL_HELP}; got '0'"),
        (["--opset", "12"], "argument --opset: expected an integer >= 13; got '12'"),
        (["--opset", "x"], "argument --opset: expected an integer >= 13; got 'x'"),
        (["--samples", "0"], "argument --samples: expected an integer >= 1; got '0'"),
        (
            ["--batch-size", "-2"],
            "argument --batch-size: expected an integer >= 1; got '-2'",
        ),
        (
            ["--input-names", "a,,b"],
            "argument --input-names: expected comma-separated non-empty names, "
            "e.g. 'image,mask'; got 'a,,b'",
        ),
        (
            ["--output-names", "y,y"],
            "argument --output-names: names must be distinct; 'y,y' repeats y",
        ),
        (
            ["--input-signature", "(None,28):float33"],
            "argument --input-signature: input 1 ('(None,28):float33'): unknown "
            "dtype 'float33'; use one of float16, bfloat16, float32, float64, int8,"
            " int16, int32, int64, uint8, uint16, uint32, uint64, bool",
        ),
    ],
)
def test_bad_arguments_exit_2_before_loading(
    model_file, tmp_path, capsys, no_load, args, line
):
    out = tmp_path / "m.onnx"
    result = call_main(capsys, "export", model_file, "-o", out, *args)
    assert_line(result, 2, f"keras-bn: error: {line}")
    assert os.listdir(tmp_path) == []


def test_opset_above_the_exporters_range_exits_2(model_file, tmp_path, capsys, no_load):
    from converters import _deps

    route = route_or_skip()
    top = _deps.max_opset(route)
    assert 13 <= top < 99
    result = call_main(
        capsys, "export", model_file, "-o", tmp_path / "m.onnx", "--opset", "99"
    )
    assert_line(
        result,
        2,
        f"keras-bn: error: argument --opset: 99 is above {top}, the highest opset "
        f"the installed {route} and onnx support; use --opset 13 to {top}",
    )
    assert os.listdir(tmp_path) == []


def test_dangling_symlink_output(model_file, tmp_path, capsys):
    link = tmp_path / "out.keras"
    link.symlink_to(tmp_path / "missing" / "target.keras")
    line = (
        f"keras-bn: error: output {str(link)!r} is a symbolic link to "
        f"{str(tmp_path / 'missing' / 'target.keras')!r}, which does not exist; "
        "remove the link, or pass --force to replace the link itself (its target "
        "is not written)"
    )
    for command in ("fold", "export"):
        out = link if command == "fold" else link.with_suffix(".onnx")
        if command == "export":
            out.symlink_to(tmp_path / "missing" / "target.keras")
            want = line.replace("out.keras'", "out.onnx'")
        else:
            want = line
        assert_line(call_main(capsys, command, model_file, "-o", out), 2, want)
        assert out.is_symlink()
    # --force replaces the link itself; its target is not created.
    code, _, err = call_main(capsys, "fold", model_file, "-o", link, "--force")
    assert code == 0, err
    assert not link.is_symlink() and link.is_file()
    assert not (tmp_path / "missing").exists()
    assert sorted(os.listdir(tmp_path)) == ["out.keras", "out.onnx"]


# -- Ctrl-C: exit 130, one line, nothing written ----------------------------------


def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _sigint_swallowed():
    """A real SIGINT, caught the way some libraries catch everything."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
    except BaseException:  # noqa: BLE001 - what a careless library does
        pass


@pytest.mark.parametrize("where", ["import", "load", "export", "swallowed"])
def test_interrupt_exits_130_and_writes_nothing(
    model_file, tmp_path, capsys, monkeypatch, fake_export, where
):
    from converters import _deps, cli

    route_or_skip()
    if where == "import":  # e.g. Ctrl-C while tf2onnx imports TensorFlow
        monkeypatch.setattr(_deps, "max_opset", _raise_interrupt)
    elif where == "load":
        monkeypatch.setattr(cli, "_load_keras", _raise_interrupt)
    elif where == "export":
        fake_export.before_write = _raise_interrupt
    else:
        fake_export.before_write = _sigint_swallowed
    out = tmp_path / "m.onnx"
    result = call_main(capsys, "export", model_file, "-o", out)
    assert_line(result, 130, "keras-bn: interrupted")
    assert os.listdir(tmp_path) == []


def test_interrupt_with_debug_shows_where(model_file, tmp_path, capsys, monkeypatch):
    from converters import cli

    monkeypatch.setattr(cli, "_load_keras", _raise_interrupt)
    args = ("fold", model_file, "-o", tmp_path / "f.keras", "--debug")
    code, _, err = call_main(capsys, *args)
    assert code == 130 and "Traceback" in err and "_raise_interrupt" in err
    assert err.splitlines()[-1] == "keras-bn: interrupted"


def test_interrupt_swallowed_during_fold_writes_nothing(
    model_file, tmp_path, capsys, monkeypatch
):
    import converters.fold_keras

    fold = converters.fold_keras.fold_batchnorm

    def swallowing_fold(model):
        _sigint_swallowed()
        return fold(model)

    monkeypatch.setattr(converters.fold_keras, "fold_batchnorm", swallowing_fold)
    result = call_main(capsys, "fold", model_file, "-o", tmp_path / "f.keras")
    assert_line(result, 130, "keras-bn: interrupted")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_ctrl_c_during_an_import_in_a_fresh_process(model_file, tmp_path):
    (tmp_path / "slow_import_kbn.py").write_text(
        "import pathlib, time\n"
        "pathlib.Path('importing').write_text('')\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "f.keras"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "converters.cli",
            "--custom-objects",
            "slow_import_kbn",
            "fold",
            str(model_file),
            "-o",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "importing").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "keras-bn: interrupted\n"
    assert not out.exists()


# -- Tolerance, progress, options: export_onnx replaced by a recorder ---------------


class FakeReport:
    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __str__(self):
        return f"fake report (parity checked at {self.rtol:g})"


@pytest.fixture
def fake_export(monkeypatch):
    """Replaces export_onnx: records its arguments, reports progress, writes."""
    from converters import _io, export

    class Recorder:
        calls = []
        before_write = None
        report = {}

        def __call__(self, model, path, **kwargs):
            self.calls.append(kwargs)
            progress = kwargs["progress"]
            progress("convert", None)
            progress("convert", 4.2)
            if self.before_write is not None:
                self.before_write()
            progress("write", None)
            _io.atomic_write_bytes(path, b"onnx", overwrite=kwargs["overwrite"])
            progress("write", 0.01)
            fields = {"rtol": kwargs["rtol"] or 1e-5, "rtol_reason": "", **self.report}
            return FakeReport(**fields)

    recorder = Recorder()
    monkeypatch.setattr(export, "export_onnx", recorder)
    return recorder


def test_rtol_auto_by_default_and_the_tolerance_is_printed(
    model_file, tmp_path, capsys, fake_export
):
    route_or_skip()
    fake_export.report = {
        "rtol": 1e-3,
        "rtol_reason": "the model computes in float16",
    }
    code, out, err = call_main(capsys, "export", model_file, "-o", tmp_path / "a.onnx")
    assert code == 0, err
    assert fake_export.calls[-1]["rtol"] is None
    assert out.splitlines() == [
        "fake report (parity checked at 0.001)",
        "tolerance: 0.001 (the model computes in float16)",
    ]
    fake_export.report = {}
    args = ("export", model_file, "-o", tmp_path / "b.onnx", "--rtol", "2e-4")
    code, _, err = call_main(capsys, *args)
    assert code == 0, err
    assert fake_export.calls[-1]["rtol"] == 2e-4


def test_constant_outputs_warn_on_stderr(model_file, tmp_path, capsys, fake_export):
    route_or_skip()
    fake_export.report = {"outputs_vary": False}
    result = call_main(capsys, "export", model_file, "-o", tmp_path / "a.onnx")
    assert_line(
        result,
        0,
        "keras-bn: warning: the model's outputs are the same for every sample "
        "input, so the parity check proves nothing about its numbers",
    )
    fake_export.report = {"outputs_vary": True}
    assert_line(
        call_main(capsys, "export", model_file, "-o", tmp_path / "b.onnx"), 0, None
    )


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, dtype="mixed_float16"),
            keras_bn.BatchNormalization(dtype="mixed_float16"),
            L.Dense(3, dtype="mixed_float16"),
        ]
    )
    path = tmp_path_factory.mktemp("mixed") / "mixed.keras"
    model.save(path)
    return path


def test_parity_failure_with_a_given_rtol_hints_at_auto(
    mixed_file, model_file, tmp_path, capsys, fake_export
):
    from converters import export

    route_or_skip()

    def fail():
        raise export.ParityError("error 6.1e-04 > rtol=1e-05", None)

    fake_export.before_write = fail
    want = "keras-bn: verification failed: error 6.1e-04 > rtol=1e-05"
    hint = (
        " The model computes in float16: leave out --rtol (auto) for a tolerance "
        "that follows its compute dtype."
    )
    args = ("-o", tmp_path / "m.onnx", "--rtol", "1e-5")
    assert_line(call_main(capsys, "export", mixed_file, *args), 1, want + hint)
    assert_line(call_main(capsys, "export", model_file, *args), 1, want)  # float32
    assert os.listdir(tmp_path) == []


def test_export_options_reach_export_onnx(model_file, tmp_path, capsys, fake_export):
    route_or_skip()
    code, _, err = call_main(
        capsys, "export", model_file, "-o", tmp_path / "a.onnx",
        "--input-names", "pixels", "--output-names", "logits,probs",
        "--batch-size", "8", "--float16", "--opset", "13", "--samples", "3",
        "--no-fold", "--input-signature", "(None, 6)",
    )  # fmt: skip
    assert code == 0, err
    kwargs = fake_export.calls[-1]
    assert kwargs["input_names"] == ["pixels"]
    assert kwargs["output_names"] == ["logits", "probs"]
    assert (kwargs["batch_size"], kwargs["precision"]) == (8, "float16")
    assert (kwargs["opset"], kwargs["samples"], kwargs["fold"]) == (13, 3, False)
    assert kwargs["input_signature"] == [((None, 6), "float32")]
    assert kwargs["verbose"] is False
    code, _, err = call_main(capsys, "export", model_file, "-o", tmp_path / "b.onnx")
    assert code == 0, err
    kwargs = fake_export.calls[-1]
    assert (kwargs["input_names"], kwargs["batch_size"]) == (None, None)
    assert (kwargs["precision"], kwargs["fold"]) == ("float32", True)
    args = ("export", model_file, "-o", tmp_path / "c.onnx", "--verbose")
    assert call_main(capsys, *args)[0] == 0
    assert fake_export.calls[-1]["verbose"] is True


def test_progress_lines(model_file, tmp_path, capsys, fake_export):
    route = route_or_skip()
    out = tmp_path / "a.onnx"
    code, _, err = call_main(capsys, "export", model_file, "-o", out)
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 4 and all(PROGRESS.match(ln) for ln in lines), err
    assert lines[0].startswith(f"keras-bn: importing keras ({BACKEND}) and {route} ")
    assert lines[1].startswith(f"keras-bn: loading {model_file} ... ")
    assert lines[2] == f"keras-bn: converting with {route} ... 4.2 s"
    assert lines[3] == f"keras-bn: writing {out} ... 0.0 s"
    args = ("export", model_file, "-o", tmp_path / "b.onnx", "--quiet")
    code, _, err = call_main(capsys, *args)
    assert (code, err) == (0, "")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_finishes_the_line(monkeypatch):
    from converters import cli

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    out = cli._Stderr(route="tf2onnx")
    out("convert")
    assert term.getvalue() == "keras-bn: converting with tf2onnx ..."
    out("convert", 4.24)
    out("verify")
    out.error("interrupted")
    assert term.getvalue().splitlines() == [
        "keras-bn: converting with tf2onnx ... 4.2 s",
        "keras-bn: verifying with ONNX Runtime ...",
        "keras-bn: interrupted",
    ]


# -- Subclassed models and --input-signature -----------------------------------------


@keras.saving.register_keras_serializable(package="test_cli")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(3)
        self.bn = keras_bn.BatchNormalization()

    def call(self, x, training=False):
        return self.bn(self.dense(x), training=training)


@pytest.fixture(scope="module")
def subclassed_file(tmp_path_factory):
    model = Subclassed()
    model(np.zeros((2, 4), "float32"))
    path = tmp_path_factory.mktemp("sub") / "sub.keras"
    model.save(path)
    return path


@pytest.mark.parametrize(
    "flags, needed",
    [
        ([], "--no-fold --input-signature '(None,28,28,1):float32;(None,10):int32'"),
        (["--no-fold"], "--input-signature '(None,28,28,1):float32;(None,10):int32'"),
        (["--input-signature", "(None,4)"], "--no-fold"),
    ],
)
def test_subclassed_model_hint_names_the_options(
    subclassed_file, tmp_path, capsys, fake_export, flags, needed
):
    route_or_skip()
    result = call_main(
        capsys, "export", subclassed_file, "-o", tmp_path / "s.onnx", *flags
    )
    assert_line(
        result,
        2,
        f"keras-bn: error: {str(subclassed_file)!r} holds a subclassed Subclassed: "
        "its call cannot be rewritten to fold batch normalization and it declares "
        f"no inputs; export it with {needed} (one '(dims):dtype' per input of its "
        "call, ';' between inputs), or rebuild it with the Functional API",
    )
    assert fake_export.calls == [] and os.listdir(tmp_path) == []


def test_subclassed_model_in_one_step(subclassed_file, tmp_path, capsys, fake_export):
    route_or_skip()
    code, _, err = call_main(
        capsys,
        "export",
        subclassed_file,
        "-o",
        tmp_path / "s.onnx",
        "--no-fold",
        "--input-signature",
        "(None,4):float32",
    )
    assert code == 0, err
    kwargs = fake_export.calls[-1]
    assert kwargs["input_signature"] == [((None, 4), "float32")]
    assert kwargs["fold"] is False


def test_input_signature_must_fit_a_functional_model(
    model_file, tmp_path, capsys, fake_export
):
    route_or_skip()
    name = keras.saving.load_model(model_file).inputs[0].name
    out = tmp_path / "m.onnx"
    cases = [
        (
            "(None,5)",
            "input 1 has shape (None,5), but the model's input "
            f"{name!r} has shape (None,6); use e.g. '(None,6)'",
        ),
        (
            "(None,6,1)",
            "input 1 has shape (None,6,1), but the model's input "
            f"{name!r} has shape (None,6); use e.g. '(None,6)'",
        ),
        (
            "(None,6);(None,2)",
            "2 input(s) given, but the model has 1; give one '(dims):dtype' per "
            "input, ';' between them",
        ),
    ]
    for text, line in cases:
        result = call_main(capsys, "export", model_file, "-o", out,
                           "--input-signature", text)  # fmt: skip
        assert_line(result, 2, f"keras-bn: error: argument --input-signature: {line}")
    assert fake_export.calls == [] and os.listdir(tmp_path) == []
    result = call_main(capsys, "export", model_file, "-o", out,
                       "--input-signature", "(8,6)")  # fmt: skip
    assert result[0] == 0 and fake_export.calls[-1]["input_signature"] == [
        ((8, 6), "float32")
    ]


@pytest.mark.parametrize(
    "text, specs",
    [
        (
            "(None,28,28,1):float32;(None,10):int32",
            [((None, 28, 28, 1), "float32"), ((None, 10), "int32")],
        ),
        ("(None, 4)", [((None, 4), "float32")]),
        ("(?,4) : bfloat16", [((None, 4), "bfloat16")]),
        ("(8,)", [((8,), "float32")]),
        (
            "(None,3);(None,2,2):uint8",
            [((None, 3), "float32"), ((None, 2, 2), "uint8")],
        ),
    ],
)
def test_parse_input_signature(text, specs):
    from converters.cli import parse_input_signature

    assert parse_input_signature(text) == specs


@pytest.mark.parametrize(
    "text, match",
    [
        ("None,4", r"^input 1 \('None,4'\) is not '\(dims\):dtype'; expected e\.g\."),
        ("(None,4);", r"^input 2 \(''\) is not '\(dims\):dtype'"),
        ("(None,0)", r"^input 1 \('\(None,0\)'\): dimension '0' is not a positive"),
        ("(None,-3)", r"dimension '-3' is not a positive integer or None"),
        ("()", r"dimension '' is not a positive integer or None"),
        ("(None,4):int", r"unknown dtype 'int'; use one of float16, "),
    ],
)
def test_parse_input_signature_errors(text, match):
    from converters.cli import parse_input_signature

    with pytest.raises(ValueError, match=match):
        parse_input_signature(text)


# -- Routes by backend ----------------------------------------------------------


def test_missing_route_dependency_exits_2_naming_the_extra(
    model_file, tmp_path, capsys, monkeypatch, no_load
):
    from converters import _deps

    route, modules = _deps.ROUTES[BACKEND]
    monkeypatch.setitem(_deps.ROUTES, BACKEND, (route, (*modules, "no_such_pkg_kbn")))
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    result = call_main(capsys, "export", model_file, "-o", tmp_path / "m.onnx")
    assert_line(
        result,
        2,
        f"keras-bn: error: ONNX export on the {BACKEND} backend needs "
        f"no_such_pkg_kbn, which is not installed: pip install "
        f'"keras-bn[{_deps.ROUTE_EXTRAS[BACKEND]}]" (or pip install no_such_pkg_kbn)',
    )


def test_backend_without_a_route_exits_2(
    model_file, tmp_path, capsys, monkeypatch, no_load
):
    monkeypatch.setenv("KERAS_BACKEND", "numpy")
    result = call_main(capsys, "export", model_file, "-o", tmp_path / "m.onnx")
    assert_line(
        result,
        2,
        "keras-bn: error: ONNX export supports the Keras backends ['jax', "
        "'tensorflow', 'torch']; got KERAS_BACKEND='numpy'. Set KERAS_BACKEND to "
        "one of them.",
    )


def test_backend_name_follows_keras_config(tmp_path, monkeypatch):
    from converters.cli import backend_name

    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert backend_name() == "tensorflow"
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert backend_name() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert backend_name() == "torch"


# -- --version, --help, quiet by default ------------------------------------------


def test_version_and_help_defaults(capsys):
    import keras_bn

    code, out, err = call_main(capsys, "--version")
    assert code == 0 and err == ""
    assert out.startswith(
        f"keras-bn {keras_bn.__version__} (keras {keras.__version__},"
    )
    code, out, _ = call_main(capsys, "export", "--help")
    assert code == 0
    flat = " ".join(out.split())
    opset_default = (
        "(default: the exporter's own, 17 with tf2onnx, 18 with jax2onnx and "
        "torch.onnx)"
    )
    for shown in (opset_default, "(default: 16)", "(default: auto)"):
        assert shown in flat, out


def test_version_in_a_fresh_process_is_quiet():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("keras-bn ")
    assert "tensorflow" not in proc.stderr.lower()


def test_library_logs_quiet_unless_verbose(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing.keras"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert call_main(capsys, "--verbose", "inspect", missing)[0] == 2
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    assert call_main(capsys, "inspect", missing)[0] == 2
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert logging.getLogger("tf2onnx").level == logging.ERROR


# -- End to end, with the real export_onnx ----------------------------------------


@E2E
def test_mixed_float16_model_exports_at_its_tolerance(tmp_path, capsys):
    route_or_skip()
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, dtype="mixed_float16"),
            keras_bn.BatchNormalization(dtype="mixed_float16"),
            L.Dense(3, dtype="mixed_float16"),
        ]
    )
    path = tmp_path / "mixed.keras"
    model.save(path)
    out = tmp_path / "mixed.onnx"
    code, stdout, err = call_main(capsys, "export", path, "-o", out)
    assert code == 0, err
    assert out.exists() and "float16" in stdout, stdout


@E2E
def test_subclassed_model_exports_end_to_end(subclassed_file, tmp_path, capsys):
    route_or_skip()
    out = tmp_path / "s.onnx"
    code, stdout, err = call_main(
        capsys,
        "export",
        subclassed_file,
        "-o",
        out,
        "--no-fold",
        "--input-signature",
        "(None,4)",
    )
    assert code == 0, err
    assert out.exists() and "parity" in stdout
