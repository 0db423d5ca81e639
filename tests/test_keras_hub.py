"""keras_hub vision models (tiny, random weights) through replace and fold.

One model per family of custom layers: the copy keeps the model's class,
every BN is swapped (graph nodes and those held by custom layers), the
weights line up one to one, outputs are equal, `.keras` save/load gives the
same outputs, and `fold_batchnorm` folds or reports every BN. The whole list
runs in the zoo (`make zoo`, tests/zoo/test_zoo.py).
"""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub", reason="keras_hub is not installed")

import keras_bn  # noqa: E402
from converters import fold_batchnorm  # noqa: E402
from keras_bn._keras_graph import sublayers  # noqa: E402
from keras_bn.replace import batchnorm_scope  # noqa: E402
from tests.zoo.hub_models import HUB  # noqa: E402
from tests.zoo.pipeline import RTOL, randomize_bn, rel  # noqa: E402

# One per custom-layer family; "clone": the config does not rebuild the model
# (EfficientNetBackbone's config omits `num_features`), so the copy is cloned.
FAST = {
    "hub_resnet_classifier": "config",  # a Task: backbone + preprocessor
    "hub_mobilenet": "config",  # BNs in custom blocks
    "hub_mobilenet_v5": "config",
    "hub_hgnetv2": "config",
    "hub_efficientnet_small_head": "clone",
    "hub_retinanet": "config",  # FPN layer holding BNs in lists
    "hub_deeplab_v3": "config",  # SpatialPyramidPooling holds Sequentials
}


def _bns(model, cls=keras.layers.BatchNormalization):
    return [la for la in sublayers(model) if type(la) is cls]


@pytest.fixture(scope="module", params=sorted(FAST))
def replaced(request):
    name = request.param
    build, shape = HUB[name]
    model = build()
    rng = np.random.default_rng(0)
    total = randomize_bn(model, rng)
    x = rng.normal(size=(2, *shape)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, report = keras_bn.replace_batchnorm(model, return_report=True)
    assert not [w for w in caught if "BatchNormalization" in str(w.message)]
    return name, model, new, report, total, x


def test_class_kept_and_every_bn_swapped(replaced):
    name, model, new, report, total, _ = replaced
    assert report.route == FAST[name], report
    assert report.swapped == total and not report.kept
    assert len(_bns(new, keras_bn.BatchNormalization)) == total and not _bns(new)
    if report.route == "config":
        assert type(new) is type(model)
        assert new.get_config() == model.get_config()
    if isinstance(model, keras_hub.models.Task):
        assert type(new.backbone) is type(model.backbone)
        assert type(new.preprocessor) is type(model.preprocessor)
        assert new.backbone in sublayers(new)
    if report.route == "config" and isinstance(
        model, keras_hub.models.FeaturePyramidBackbone
    ):
        assert set(new.pyramid_outputs) == set(model.pyramid_outputs)
    # The input model is untouched.
    assert len(_bns(model)) == total


def test_weights_line_up_and_outputs_equal(replaced):
    _, model, new, _, _, x = replaced
    assert len(new.weights) == len(model.weights)
    for a, b in zip(model.weights, new.weights, strict=True):
        assert (a.name, a.shape) == (b.name, b.shape)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    # The same inference ops on the same weights: equal up to rounding.
    assert rel(new(x, training=False), model(x, training=False)) <= RTOL


def test_save_load(replaced, tmp_path):
    _, model, new, report, total, x = replaced
    path = os.path.join(tmp_path, "model.keras")
    new.save(path)
    want = new(x, training=False)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(new)
    assert rel(loaded(x, training=False), want) == 0.0
    with batchnorm_scope():  # layers built in constructors: keras_bn's again
        again = keras.saving.load_model(path)
    assert len(_bns(again, keras_bn.BatchNormalization)) == total
    assert rel(again(x, training=False), want) == 0.0


def test_fold(replaced):
    _, model, _, _, total, x = replaced
    folded, report = fold_batchnorm(model)
    assert report.num_folded + report.num_kept == total
    assert report.num_unchanged == 0, report
    assert not [
        la
        for la in sublayers(folded)
        if isinstance(la, keras.layers.BatchNormalization)
    ]
    assert rel(folded(x, training=False), model(x, training=False)) <= RTOL
