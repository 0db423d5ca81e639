"""The conformance pipeline (tests/zoo) on tiny models, one per failure class.

Each model goes through replace -> fit (jit) -> save/load -> fold -> export
-> CLI, as in `make zoo` on keras.applications, in seconds.
"""

import pytest

from tests.zoo.checks import assert_conforms
from tests.zoo.models import SYNTHETIC
from tests.zoo.pipeline import run


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_failure_class_conforms(name):
    build, shape = SYNTHETIC[name]
    assert_conforms(run(build, shape))
