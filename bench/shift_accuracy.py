"""Accuracy of the kernel's statistics on adversarial inputs, old pilot vs new.

For each distribution of `tests/test_shift_property.py` (and the two inputs
of the report that motivated the sampled pilot: a first value 10 and 100
standard deviations out), the worst error over `--trials` draws of shape
`--shape` (channels last) against float64: output `max|y - ref| /
max|ref|`, and variance `max_c |var_c - v_c| / v_c`, for the kernel with the
first-row pilot and no guard (earlier releases), the kernel as it is, both
eagerly and compiled (`tf.function(jit_compile=True)` / `jax.jit` /
`torch.compile`), and Keras's layer (eager) with `keras.ops.moments`. On
torch one more column: the layer's eager route for the same data laid out
channels-first (`(N, C, H, W)`, `axis=1`), torch's native batch norm with
the layer's per-batch guard (the kernel where the guard refuses the op).

    KERAS_BACKEND=tensorflow python bench/shift_accuracy.py
    KERAS_BACKEND=jax python bench/shift_accuracy.py
    KERAS_BACKEND=torch python bench/shift_accuracy.py
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

EPS = 1e-3


def _first_value(sigmas):
    def make(rng, m):
        z = rng.normal(size=m).astype("float32")
        z[0] = sigmas
        return z

    return make


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--shape", default="8,16,16,32")
    parser.add_argument(
        "--torch-compiler",
        default="inductor",
        help="torch.compile's backend on torch (inductor, aot_eager)",
    )
    args = parser.parse_args(argv)

    import keras
    from keras import ops
    from shift_candidates import _variant

    from keras_bn import _train
    from tests import harness as h
    from tests.test_shift_property import KINDS, _channel, _errors, _keras_errors

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax", "torch"):
        raise SystemExit(f"unsupported backend {backend!r}: tensorflow, jax, torch")
    shape = tuple(int(v) for v in args.shape.split(","))
    c = shape[-1]
    m = int(np.prod(shape)) // c

    def step(x, g, b):
        return _train.batch_norm_train(
            x, g, b, axis=len(shape) - 1, epsilon=EPS, fused=False
        )

    def native(x, g, b):
        # Channels-first, through the backend's fused route (torch: native op).
        xt = ops.moveaxis(x, -1, 1)
        g, b = ops.convert_to_tensor(g), ops.convert_to_tensor(b)
        y, mean, var = _train.batch_norm_train(xt, g, b, axis=1, epsilon=EPS)
        return ops.moveaxis(y, 1, -1), mean, var

    def compiled():
        if backend == "torch":
            import torch

            torch._dynamo.reset()  # each variant traced afresh
            return torch.compile(lambda *a: step(*a), backend=args.torch_compiler)
        if backend == "jax":
            import jax

            return jax.jit(lambda *a: step(*a))
        import tensorflow as tf

        return tf.function(step, jit_compile=True, autograph=False)

    makers = {k: (lambda rng, m, k=k: _channel(rng, k, m, True)) for k in KINDS}
    makers["first value 10 std"] = _first_value(10.0)
    makers["first value 100 std"] = _first_value(100.0)
    load = os.getloadavg()[0]
    print(f"backend={backend} shape={shape} trials={args.trials} load={load:.2f}")
    columns = ["first row, eager", "first row, compiled", "now, eager"]
    columns += ["now, compiled", "Keras"]
    if backend == "torch":
        columns.insert(4, "now, native op (channels-first)")
    print("| input | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    rng = np.random.default_rng(0)
    old = ("first", float("inf"))
    with _variant(*old):
        old_jit = compiled()
    new_jit = compiled()
    for name, make in makers.items():
        worst = np.zeros((len(columns), 2))
        for _ in range(args.trials):
            x = np.stack([make(rng, m) for _ in range(c)], -1).reshape(shape)
            g, b = np.ones(c, "float32"), np.zeros(c, "float32")
            ref = h.ref_forward(x, g, b, -1, EPS)
            xt = ops.convert_to_tensor(x)
            with _variant(*old):
                r0 = _errors(*step(xt, g, b), ref)
                r1 = _errors(*old_jit(xt, g, b), ref)
            r2 = _errors(*step(xt, g, b), ref)
            r3 = _errors(*new_jit(xt, g, b), ref)
            r4 = _keras_errors(x, -1, g, b, ref)
            rows = [r0, r1, r2, r3, r4]
            if backend == "torch":
                rows.insert(4, _errors(*native(xt, g, b), ref))
            got = np.array([r[[0, 2]] for r in rows])
            worst = np.maximum(worst, got)
        cells = " | ".join(f"{y:.1e} / {v:.1e}" for y, v in worst)
        print(f"| {name} | {cells} |")
    print("\nEach cell: output error / variance error.")


if __name__ == "__main__":
    main()
