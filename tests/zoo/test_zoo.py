"""Every keras.applications family, and every keras_hub vision model that uses
BatchNormalization (tiny configurations), through the whole pipeline
(`make zoo`).

Deselected by default (marker `zoo`); minutes per model on two CPU cores.
"""

import keras
import pytest

from tests.zoo.checks import assert_conforms
from tests.zoo.hub_models import HUB
from tests.zoo.models import APPLICATIONS, UNAVAILABLE
from tests.zoo.pipeline import run

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_application_conforms(name, request):
    reason = UNAVAILABLE.get((keras.backend.backend(), name))
    if reason:
        # Strict: it fails the run once Keras builds the family on this backend.
        request.applymarker(
            pytest.mark.xfail(reason=reason, raises=ValueError, strict=True)
        )
    build, shape = APPLICATIONS[name]
    assert_conforms(run(build, shape, name=name))


@pytest.mark.parametrize("name", list(HUB))
def test_keras_hub_conforms(name):
    pytest.importorskip("keras_hub", reason="keras_hub is not installed")
    build, shape = HUB[name]
    result = run(build, shape, name=name)
    assert_conforms(result)
    # Rebuilt by its own class wherever its config allows (EfficientNet's
    # config omits `num_features`: the copy is cloned, a plain Functional).
    assert result["class_kept"] == (name != "hub_efficientnet_small_head"), result
