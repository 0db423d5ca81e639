"""Shared pytest fixtures for keras_bn's tests."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Scripts that the tests run in their own processes: not collected (importing
# `_ddp_worker` would set KERAS_BACKEND=torch for this whole process).
collect_ignore = ["_ddp_worker.py", "_multiworker_worker.py"]

SEED = 20150211  # Ioffe & Szegedy's arXiv submission date.


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded NumPy generator per test (reproducible in isolation)."""
    return np.random.default_rng(SEED)


@pytest.fixture
def backend_name() -> str:
    return keras.backend.backend()


@pytest.fixture
def float32_policy():
    """Restores the global dtype policy to float32 after the test."""
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture
def mixed_policy(request):
    """Sets the mixed policy named by the test's parameter; restores float32."""
    keras.mixed_precision.set_dtype_policy(request.param)
    yield request.param
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture
def clear_warned(monkeypatch):
    """Empties keras_bn's warn-once registry for this test only."""
    import keras_bn.batch_normalization as bn

    monkeypatch.setattr(bn, "_warned", set())
    return bn


@pytest.fixture(autouse=True)
def fresh_torch_compile_cache():
    """On torch, each test starts with an empty `torch.compile` cache.

    Keras's trainer compiles the same code object (its train step) for every
    model; past Dynamo's recompilation limit the step would silently run
    eagerly, and a compiled-path test would test the eager path.
    """
    if keras.backend.backend() == "torch":
        import torch

        torch._dynamo.reset()
    yield
