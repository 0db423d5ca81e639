"""Tests for converters._deps: only a missing package reads as "not installed"."""

import importlib
import sys
import uuid

import pytest

from converters import _deps


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path to write throwaway modules into."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(source):
        name = f"kbn_dep_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        importlib.invalidate_caches()
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_missing_package_names_the_extra():
    with pytest.raises(
        _deps.MissingDependency,
        match=r"^Export needs no_such_pkg_kbn, which is not installed: "
        r'pip install "keras-bn\[export\]" \(or pip install no_such_pkg_kbn\)$',
    ):
        _deps.require("no_such_pkg_kbn", what="Export")
    with pytest.raises(_deps.MissingDependency, match=r"needs no_such_pkg_kbn,"):
        _deps.require("no_such_pkg_kbn.sub")  # the package itself is missing
    with pytest.raises(_deps.MissingDependency, match=r": pip install no_such_pkg$"):
        _deps.require("no_such_pkg", extra=None)
    assert issubclass(_deps.MissingDependency, ImportError)


def test_interrupted_import_propagates(module_dir):
    name = module_dir("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        _deps.require(name)


def test_broken_install_is_not_reported_missing(module_dir):
    name = module_dir("import no_such_inner_dep_kbn\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_inner_dep_kbn") as info:
        _deps.require(name)
    assert not isinstance(info.value, _deps.MissingDependency)
    name = module_dir("raise RuntimeError('bad build')\n")
    with pytest.raises(RuntimeError, match="bad build"):
        _deps.require(name)


def test_present_module_is_returned(module_dir):
    name = module_dir("VALUE = 3\n")
    assert _deps.require(name).VALUE == 3


def test_missing_imports_nothing():
    before = set(sys.modules)
    assert _deps.missing(["no_such_pkg_kbn", "json", "no_such_pkg_kbn.x"]) == [
        "no_such_pkg_kbn"
    ]
    assert "no_such_pkg_kbn" not in set(sys.modules) - before


def test_require_route(monkeypatch):
    with pytest.raises(ValueError, match=r"got KERAS_BACKEND='numpy'.*Set KERAS"):
        _deps.require_route("numpy")
    monkeypatch.setitem(
        _deps.ROUTES, "jax", ("jax2onnx", ("json", "no_such_a_kbn", "no_such_b_kbn"))
    )
    with pytest.raises(
        _deps.MissingDependency,
        match=r"^ONNX export on the jax backend needs no_such_a_kbn, no_such_b_kbn, "
        r'which are not installed: pip install "keras-bn\[export-jax\]"',
    ):
        _deps.require_route("jax")
    monkeypatch.setitem(_deps.ROUTES, "jax", ("jax2onnx", ("json",)))
    assert _deps.require_route("jax") == "jax2onnx"
