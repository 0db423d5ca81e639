"""keras-bn converters: fold batch normalization away and export to ONNX.

`fold_weights` is pure NumPy; `fold_batchnorm` works on every Keras backend;
`export_onnx` needs onnx, onnxruntime and the backend's exporter (tf2onnx on
TensorFlow, jax2onnx on JAX, `torch.onnx` with onnxscript on torch); `fold_onnx`
needs onnx. Everything is imported on first use, so `import
keras_bn.converters` (and the `keras-bn` command line) starts fast.
"""

import importlib

if __name__ == "converters":  # a source checkout's root is on sys.path
    from keras_bn._checkout import alias_converters

    alias_converters()  # `converters` is `keras_bn.converters`: one copy
else:
    _EXPORTS = {
        "ChannelAffine": ".affine",
        "fold_batchnorm": ".fold_keras",
        "bn_scale_shift": ".fold_math",
        "fold_weights": ".fold_math",
        "FoldRecord": ".report",
        "FoldReport": ".report",
        "export_onnx": ".export",
        "ExportReport": ".export",
        "ParityError": ".export",
        "fold_onnx": ".onnx_fold",
        "bench_latency": ".bench",
    }
    __all__ = sorted(_EXPORTS)

    def __getattr__(name):
        if name in _EXPORTS:
            module = importlib.import_module(_EXPORTS[name], __name__)
            return getattr(module, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__():
        return __all__
