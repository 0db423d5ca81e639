"""Every keras.applications family through the whole pipeline (`make zoo`).

Deselected by default (marker `zoo`); minutes per model on two CPU cores.
"""

import pytest

from tests.zoo.checks import assert_conforms
from tests.zoo.models import APPLICATIONS
from tests.zoo.pipeline import run

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_application_conforms(name):
    build, shape = APPLICATIONS[name]
    assert_conforms(run(build, shape))
