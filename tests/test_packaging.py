"""Tests of the package layout: what the wheel holds, and how it imports.

The wheel installs one top-level package, `keras_bn`; the repository's
`converters/` folder becomes `keras_bn.converters`. In a source checkout
`import keras_bn` loads that folder under the same name, and the checkout's
old name `converters` is the very same module (one copy of each class). The
end-to-end check of an installed wheel in a fresh environment is
`make wheel-smoke` (scripts/smoke_wheel.py).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RTOL = 1e-5

# Backend-independent (package metadata, layout, imports): run on the TensorFlow
# backend only, to save CI time.
_ONE_BACKEND = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent packaging check: runs on the TensorFlow backend "
    "only, to save CI time",
)


def _run(code: str, *args, cwd, env=None) -> subprocess.CompletedProcess:
    """Runs `python -c code` with only the checkout's root on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    """`(line, module)` of every absolute import in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@_ONE_BACKEND
def test_license_and_build_system():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    # The SPDX `license` string needs setuptools 77 (PEP 639); 76 rejects it.
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]
    assert project["scripts"] == {"keras-bn": "keras_bn.converters.cli:main"}


@_ONE_BACKEND
def test_extras_match_features():
    extras = PYPROJECT["project"]["optional-dependencies"]

    def names(extra):
        return {req.split(";")[0].split(">")[0].split("[")[0] for req in extras[extra]}

    assert {"tf2onnx", "onnx", "onnxruntime"} <= names("onnx")
    # export brings TensorFlow too (tensorflow-cpu or tensorflow, by platform).
    assert {"keras-bn", "tensorflow-cpu", "tensorflow"} <= names("export")
    assert "keras-bn[onnx]" in extras["export"]
    # Test-only packages are in dev, not in a runtime extra.
    for tool in ("pytest", "hypothesis", "onnxoptimizer", "ruff", "codespell"):
        assert tool in names("dev")
        runtime = set().union(*(names(e) for e in extras if e not in ("dev", "all")))
        assert tool not in runtime


@_ONE_BACKEND
def test_wheel_installs_keras_bn_only(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools>=77, found {setuptools.__version__}")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"),
            *("--no-build-isolation", "-w", tmp_path, ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("keras_bn-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(info).decode()
    top = {n.split("/")[0] for n in names}
    assert top == {"keras_bn", f"keras_bn-{_version()}.dist-info"}
    installed = {n[len("keras_bn/converters/") :] for n in names}
    assert {p.name for p in (ROOT / "converters").glob("*.py")} <= installed
    assert f"keras_bn-{_version()}.dist-info/licenses/LICENSE" in names
    assert "keras-bn = keras_bn.converters.cli:main" in entry_points


def _version() -> str:
    import keras_bn

    return keras_bn.__version__


@_ONE_BACKEND
def test_converters_import_each_other_relatively():
    """Inside converters/, `converters.x` exists only in a checkout: an
    installed wheel has `keras_bn.converters.x`. keras_bn/ uses that name."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for folder in ("converters", "keras_bn")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in _imports(path)
        if module == "converters" or module.startswith("converters.")
    ]
    assert not bad, "absolute `converters` imports:\n" + "\n".join(bad)


@_ONE_BACKEND
def test_one_copy_of_each_module_in_a_checkout(tmp_path):
    code = (
        "import converters.affine, converters, sys\n"
        "import keras_bn, keras_bn.converters, keras_bn.converters.affine as a\n"
        "from converters import ChannelAffine\n"
        "import keras\n"
        "assert converters is keras_bn.converters\n"
        "assert converters.affine is a and ChannelAffine is a.ChannelAffine\n"
        "registered = 'keras_bn_converters>ChannelAffine'\n"
        "assert keras.saving.get_registered_object(registered) is ChannelAffine\n"
        "assert a.__spec__.name == 'keras_bn.converters.affine'\n"
        "print(keras_bn.converters.__file__)\n"
    )
    run = _run(code, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(ROOT / "converters" / "__init__.py")


def test_folded_keras_with_channel_affine_loads_after_import_keras_bn(tmp_path):
    import keras_bn
    from keras_bn.converters import ChannelAffine, fold_batchnorm

    rng = np.random.default_rng(3)
    inputs = keras.Input((5, 5, 2))
    h = keras_bn.BatchNormalization(name="bn")(inputs)  # no layer to fold into
    h = keras.layers.Conv2D(3, 3, padding="same", name="conv")(h)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))
    x = rng.normal(size=(64, 5, 5, 2)).astype("float32")
    keras_bn.recalibrate(model, 3.0 + x, verbose=0)  # non-trivial statistics
    folded, report = fold_batchnorm(model)
    assert report.num_kept == 1
    assert any(isinstance(la, ChannelAffine) for la in folded.layers)
    folded.save(tmp_path / "folded.keras")
    np.save(tmp_path / "x.npy", x[:8])
    code = (
        "import sys, keras, numpy as np\n"
        "import keras_bn\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "assert 'converters' not in sys.modules\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))))\n"
    )
    out = tmp_path / "y.npy"
    run = _run(code, tmp_path / "folded.keras", tmp_path / "x.npy", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = keras.ops.convert_to_numpy(model(x[:8]))
    np.testing.assert_allclose(np.load(out), expected, RTOL, 1e-6)


@_ONE_BACKEND
def test_examples_import_siblings_without_a_top_level_examples(tmp_path):
    """tf2onnx installs a top-level `examples` package; the scripts must not
    import theirs by that name."""
    for path in sorted((ROOT / "examples").glob("*.py")):
        bad = [m for _, m in _imports(path) if m.split(".")[0] == "examples"]
        assert not bad, f"{path.name} imports {bad}"
    # Run a script that imports a sibling at module level, with another
    # `examples` package (as tf2onnx's) imported first.
    decoy = tmp_path / "decoy" / "examples"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("DECOY = True\n")
    code = (
        "import runpy, sys\n"
        "import examples\n"
        "assert examples.DECOY\n"
        "sys.argv = [sys.argv[1], '--help']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    script = ROOT / "examples" / "mnist_sigmoid.py"
    run = _run(
        code, script, cwd=tmp_path, env={"PYTHONPATH": f"{decoy.parent}{os.pathsep}"}
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage: mnist_sigmoid.py" in run.stdout
