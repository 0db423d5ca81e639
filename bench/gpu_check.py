"""Correctness of the fused kernel on the device it runs on (JAX backend).

Compares keras_bn's training forward and backward with a float64 NumPy
reference on fresh random inputs, by ||out - ref|| / ||ref||, for float32 and
bfloat16 inputs, and checks the 1e4-mean stability case. Exits non-zero on a
failure. Run before timing:  KERAS_BACKEND=jax python bench/gpu_check.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import keras_bn

LIMITS = {"float32": 1e-5, "bfloat16": 1e-2}


def reference(x, gamma, beta, dy, axis, eps):
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    g, b = gamma.reshape(shape), beta.reshape(shape)
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    inv = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    y = g * xhat + b
    m = x.size / x.shape[axis]
    dxhat = dy * g
    dx = (
        inv
        / m
        * (
            m * dxhat
            - dxhat.sum(axes, keepdims=True)
            - xhat * (dxhat * xhat).sum(axes, keepdims=True)
        )
    )
    return y, dx, (dy * xhat).sum(axes), dy.sum(axes)


def run(shape, axis, dtype, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.normal(size=shape) * 2 + 0.5 + loc).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    gamma = rng.normal(size=c).astype(np.float32)
    beta = rng.normal(size=c).astype(np.float32)
    layer = keras_bn.BatchNormalization(
        axis=axis, dtype="mixed_bfloat16" if dtype == "bfloat16" else "float32"
    )
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    xj = jnp.asarray(x, dtype=dtype)
    dyj = jnp.asarray(dy, dtype=dtype)

    @jax.jit
    def step(tv, x, dy):
        def f(x, tv):
            return layer.stateless_call(tv, ntv, x, training=True)[0]

        y, vjp = jax.vjp(f, x, tv)
        dx, (dg, db) = vjp(dy)
        return y, dx, dg, db

    out = [np.asarray(o, dtype=np.float64) for o in step(tv, xj, dyj)]
    ref = reference(
        np.asarray(xj, np.float64),
        gamma,
        beta,
        np.asarray(dyj, np.float64),
        axis,
        layer.epsilon,
    )
    errs = [
        np.linalg.norm(o - r) / np.linalg.norm(r) for o, r in zip(out, ref, strict=True)
    ]
    ok = all(np.isfinite(e) and e <= LIMITS[dtype] for e in errs)
    names = ("y", "dx", "dgamma", "dbeta")
    detail = " ".join(f"{n}={e:.2e}" for n, e in zip(names, errs, strict=True))
    print(f"{'ok  ' if ok else 'FAIL'} {shape} axis={axis} {dtype} loc={loc}: {detail}")
    return ok


def main() -> int:
    print(f"devices: {jax.devices()}")
    cases = [((64, 28, 28, 32), -1), ((64, 32, 28, 28), 1), ((4096, 512), -1)]
    ok = True
    for seed, (shape, axis) in enumerate(cases):
        for dtype in ("float32", "bfloat16"):
            ok &= run(shape, axis, dtype, seed)
    ok &= run((256, 64), -1, "float32", 7, loc=1e4)
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
