"""Root conftest: the namespace the docstring examples (`>>>`) run in.

pytest runs every example in keras_bn/ and converters/ (`--doctest-modules`,
see pyproject.toml). Examples written for a user's session refer to their
`model` and data; here those names are a tiny model with keras_bn's layer and
random data of its shape, so each such example really runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(request):
    if type(request.node).__name__ != "DoctestItem":
        return
    import keras

    import keras_bn

    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="dense"),
            keras_bn.BatchNormalization(name="bn"),
            keras.layers.Activation("sigmoid", name="sigmoid_3"),
        ]
    )
    rng = np.random.default_rng(0)
    data = rng.normal(size=(64, 4)).astype("float32")
    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(
        keras=keras,
        keras_bn=keras_bn,
        np=np,
        model=model,
        x=data,
        y=rng.normal(size=(64, 3)).astype("float32"),
        x_train=data,
        x_test=data,
    )
