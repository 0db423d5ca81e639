"""keras-bn converters: fold batch normalization away and export to ONNX.

`fold_weights` is pure NumPy; `fold_batchnorm` works on every Keras backend;
`export_onnx` needs TensorFlow, tf2onnx, onnx and onnxruntime; `fold_onnx`
needs onnx. Everything is imported on first use, so `import converters` (and
the `keras-bn` command line) starts fast.
"""

import importlib

_EXPORTS = {
    "ChannelAffine": "converters.affine",
    "fold_batchnorm": "converters.fold_keras",
    "bn_scale_shift": "converters.fold_math",
    "fold_weights": "converters.fold_math",
    "FoldRecord": "converters.report",
    "FoldReport": "converters.report",
    "export_onnx": "converters.export",
    "ExportReport": "converters.export",
    "ParityError": "converters.export",
    "fold_onnx": "converters.onnx_fold",
    "bench_latency": "converters.bench",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")


def __dir__():
    return __all__
