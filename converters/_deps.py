"""Lazy imports of the optional export stack, with an install hint.

`require` turns only a genuinely missing package into `MissingDependency`:
an import that is interrupted (Ctrl-C) or fails inside an installed package
propagates unchanged, so a broken install is never reported as "not
installed".
"""

from __future__ import annotations

import importlib
import importlib.util

EXTRA = "export"
# The extra that brings each backend's export route (pyproject.toml).
ROUTE_EXTRAS = {"tensorflow": "export", "jax": "export-jax", "torch": "export-torch"}
# Import name -> distribution name on PyPI, where they differ.
_PIP = {"tensorflow": "tensorflow-cpu", "torch": "torch"}
# Export route per Keras backend: (route name, modules it imports).
ROUTES = {
    "tensorflow": ("tf2onnx", ("tensorflow", "tf2onnx", "onnx", "onnxruntime")),
    "jax": ("jax2onnx", ("jax", "jax2onnx", "onnx", "onnxruntime")),
    "torch": ("torch.onnx", ("torch", "onnxscript", "onnx", "onnxruntime")),
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message says how to install it."""


def _hint(modules: list[str], extra: str | None) -> str:
    names = " ".join(_PIP.get(m, m) for m in modules)
    if extra:
        return f'pip install "keras-bn[{extra}]" (or pip install {names})'
    return f"pip install {names}"


def _missing_error(modules: list[str], what: str, extra: str | None):
    listed = ", ".join(modules)
    verb = "is" if len(modules) == 1 else "are"
    return MissingDependency(
        f"{what} needs {listed}, which {verb} not installed: {_hint(modules, extra)}"
    )


def require(module: str, extra: str | None = EXTRA, what: str | None = None):
    """Imports `module`; raises `MissingDependency` only if it is not installed.

    Args:
        module: Module to import (e.g. `"onnxruntime"` or `"onnx.helper"`).
        extra: The keras-bn extra that installs it (named in the hint), or
            `None` to name only the package.
        what: What needs it, for the message (default: "This").

    Returns:
        The imported module.

    Raises:
        MissingDependency: `module`, or a package it lives in, is not
            installed (a `ModuleNotFoundError` naming it). Any other error
            while importing, `KeyboardInterrupt` included, propagates
            unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        parents = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if e.name not in parents:
            raise  # something the installed package imports: a broken install
        raise _missing_error([e.name], what or "This", extra) from e


def missing(modules) -> list[str]:
    """The top-level packages among `modules` that are not installed.

    Uses `importlib.util.find_spec`, which imports nothing.
    """
    out = []
    for module in modules:
        top = module.split(".")[0]
        if top not in out and importlib.util.find_spec(top) is None:
            out.append(top)
    return out


def require_route(backend: str) -> str:
    """The ONNX export route of a Keras backend, checked to be installed.

    Args:
        backend: `"tensorflow"`, `"jax"` or `"torch"`.

    Returns:
        The route name: `"tf2onnx"`, `"jax2onnx"` or `"torch.onnx"`.

    Raises:
        ValueError: Another backend.
        MissingDependency: A package the route needs is not installed (one
            line naming all of them and the `pip install` fix). Nothing is
            imported.
    """
    if backend not in ROUTES:
        raise ValueError(
            f"ONNX export supports the Keras backends {sorted(ROUTES)}; got "
            f"KERAS_BACKEND={backend!r}. Set KERAS_BACKEND to one of them."
        )
    route, modules = ROUTES[backend]
    absent = missing(modules)
    if absent:
        raise _missing_error(
            absent, f"ONNX export on the {backend} backend", ROUTE_EXTRAS[backend]
        )
    return route


def require_tensorflow_backend(what: str) -> None:
    """Raises `RuntimeError` unless Keras runs on the TensorFlow backend."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{what} needs the TensorFlow backend (tf2onnx converts TensorFlow "
            f"graphs), but Keras runs on {backend!r}. Run with "
            "KERAS_BACKEND=tensorflow, e.g. save the model with "
            "`model.save('model.keras')` and export it there: "
            "`KERAS_BACKEND=tensorflow keras-bn export model.keras -o model.onnx`."
        )


MIN_OPSET = 13
# The opset each exporter writes natively: tf2onnx converts to any opset;
# jax2onnx and torch.onnx write opset-18 operators (reductions with `axes`
# inputs), and onnx's version converter cannot bring every graph below 18
# (it has no Pad adapter, for one).
DEFAULT_OPSETS = {"tf2onnx": 17, "jax2onnx": 18, "torch.onnx": 18}


def default_opset(route: str) -> int:
    """The opset `export_onnx` writes when none is given, for `route`."""
    return DEFAULT_OPSETS[route]


def max_opset(route: str) -> int:
    """The highest ONNX opset both the installed `onnx` and `route` support.

    Imports `onnx` (and, on the tf2onnx route, `tf2onnx`, which imports
    TensorFlow).
    """
    onnx = require("onnx")
    top = onnx.defs.onnx_opset_version()
    if route == "tf2onnx":
        constants = require("tf2onnx.constants")
        top = min(top, max(constants.OPSET_TO_IR_VERSION))
    elif route == "torch.onnx":
        import torch.onnx

        limit = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", None)
        if isinstance(limit, int):
            top = min(top, limit)
    return top
