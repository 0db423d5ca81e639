"""Backend-specific pieces of keras_bn, one module per Keras backend.

As in Keras's own `keras/src/backend/<name>/`, the module for the backend
Keras runs on is chosen once, when keras_bn is imported, and its functions are
re-exported here; everything else in keras_bn is backend-neutral
(`keras.ops`). Each backend module defines the names in `API`:

* `kernel_train(x, scale, offset, weights, *, axis, epsilon, all_reduce,
  count_epsilon)`: `keras_bn._kernels.forward` with `_kernels.backward` as its
  custom gradient; returns `(y, mean, variance)`.
* `fused_train(x, scale, offset, *, axis, epsilon)`: a faster step than
  `kernel_train` where the backend has one (TensorFlow without XLA: its fused
  batch-norm op, or the kernel compiled by XLA as nested functions; torch
  eagerly, for channels-first inputs: its native batch norm);
  `(y, mean, biased variance)`, or None to use `kernel_train`.
* `reduce_sum(v, axes)`: the sum over `axes` with `keepdims=True`, in the
  form the backend's compiler runs fastest and sums accurately (all the
  kernel's sums go through it).
* `warn_if(flag, warn)`: calls the Python function `warn()` when the
  boolean tensor `flag` is true, at run time where the step is traced.
* `is_traced(x)`: inside `tf.function`/`jax.jit` (as in `fit`) or
  `torch.compile`, not eager.
* `cross_replica_sum()`: a function summing a tensor over the replicas of the
  current distribution strategy (on torch: the processes of the default
  `torch.distributed` process group), or None with a single replica.
* `assert_divisible(x, k)`: a run-time check that the batch size divides by `k`
  (where shapes can be unknown when tracing).
* `compile_function(fn, jit)`, `convert_inputs(x)`, `variable_index(model)`,
  `current_value(model, variable, index)`: what the callbacks' probe needs to
  compile a forward pass and read the variables' current values during `fit`.

Adding a backend is one new module defining `API` plus its tests.
"""

from __future__ import annotations

import importlib

import keras

SUPPORTED = ("tensorflow", "jax", "torch")
API = (
    "kernel_train",
    "fused_train",
    "reduce_sum",
    "warn_if",
    "is_traced",
    "cross_replica_sum",
    "assert_divisible",
    "compile_function",
    "convert_inputs",
    "variable_index",
    "current_value",
)

NAME = keras.backend.backend()


def _unsupported(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(
            f"keras_bn supports the Keras backends {list(SUPPORTED)}; Keras runs "
            f"on {name!r}. Set the environment variable KERAS_BACKEND to "
            "'tensorflow', 'jax' or 'torch' before importing keras."
        )

    return fail


if NAME in SUPPORTED:
    _module = importlib.import_module(f"keras_bn.backend.{NAME}")
    globals().update({attr: getattr(_module, attr) for attr in API})
else:
    # Importing keras_bn stays possible (e.g. for the converters' messages);
    # any use of the layer's backend pieces raises the error above.
    globals().update({attr: _unsupported(NAME) for attr in API})
