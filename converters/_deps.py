"""Lazy imports of the optional ONNX stack, with an install hint."""

from __future__ import annotations

import importlib

_PIP = {"onnxruntime": "onnxruntime", "tf2onnx": "tf2onnx", "onnx": "onnx"}


def require(module: str):
    """Imports `module` or raises `ImportError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"This needs the optional dependency {module!r}: "
            f"pip install {_PIP.get(module, module)} (or pip install 'keras-bn[onnx]')."
        ) from e


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
