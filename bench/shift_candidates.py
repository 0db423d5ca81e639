"""Times the candidate pilot shifts of the kernel in one training step.

The kernel's one-pass variance loses `((k - mean) / std)^2 * 2^-24` to its
pilot shift `k`. Candidates, each the keras_bn layer with the kernel's pilot
and guard replaced while its step is traced:

* `first row`: the pilot of earlier releases, the mean of the first slice
  along the first reduction axis (one pixel per channel for channels-last
  inputs), no guard;
* `first row + guard`: the same pilot, with the guard that recomputes the
  moments around the mean when `E[x - k]^2 > var` in any channel;
* `sample S`: the mean of S values per channel spread over the batch
  (`_kernels.pilot_shift`), with and without the guard.

Steps as in `bench_layer.py` (forward and backward, moving statistics
updated), the candidates' timed runs interleaved. Ratios are against the
`first row` candidate of the same mode, in the same run.

    KERAS_BACKEND=tensorflow python bench/shift_candidates.py
    KERAS_BACKEND=jax python bench/shift_candidates.py
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_layer  # noqa: E402

SHAPES = [((32, 56, 56, 64), -1), ((32, 64, 56, 56), 1), ((256, 1024), -1)]
CANDIDATES = {
    # name: (pilot: "first" or samples, guard)
    "first row": ("first", math.inf),
    "first row + guard": ("first", 1.0),
    "sample 64": (64, math.inf),
    "sample 64 + guard": (64, 1.0),
    "sample 256 + guard": (256, 1.0),
}


def _first_row_pilot(x, axes, weights=None, samples=None, *, exact_slice=False):
    """The earlier pilot: the mean of the first slice along `axes[0]` (no mask)."""
    from keras import ops

    index = [slice(None)] * len(x.shape)
    index[axes[0]] = slice(0, 1)
    x0 = x[tuple(index)]
    n = 1
    for i in axes:
        n *= x0.shape[i] if x0.shape[i] is not None else ops.shape(x0)[i]
    return ops.sum(x0 / n, axis=axes, keepdims=True)


@contextlib.contextmanager
def _variant(pilot, guard):
    from keras_bn import _kernels

    saved = (_kernels.pilot_shift, _kernels.PILOT_SAMPLES, _kernels.SHIFT_GUARD)
    if pilot == "first":
        _kernels.pilot_shift = _first_row_pilot
    else:
        _kernels.PILOT_SAMPLES = pilot
    _kernels.SHIFT_GUARD = guard
    _clear_caches()
    try:
        yield
    finally:
        _kernels.pilot_shift, _kernels.PILOT_SAMPLES, _kernels.SHIFT_GUARD = saved


def _clear_caches():
    import keras

    if keras.backend.backend() == "tensorflow":
        from keras_bn.backend import tensorflow as tfb

        tfb._compiled_pair.cache_clear()


def _candidates(shape, axis, modes):
    import keras

    import keras_bn

    backend = keras.backend.backend()
    cands = {}
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.random.normal(shape, seed=1)
        dy = tf.random.normal(shape, seed=2)

        def sync(out):
            for t in tf.nest.flatten(out):
                t.numpy()

        for mode in modes:
            for name, (pilot, guard) in CANDIDATES.items():
                layer = keras_bn.BatchNormalization(axis=axis)
                layer.build(shape)
                with _variant(pilot, guard):
                    step = bench_layer._tf_step_fn(layer, mode == "XLA")
                    sync(step(x, dy))  # traced under the variant

                cands[f"{name} ({mode})"] = lambda step=step: step(x, dy)
    else:
        import jax

        kx, kd = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, shape)
        dy = jax.random.normal(kd, shape)
        sync = jax.block_until_ready
        for name, (pilot, guard) in CANDIDATES.items():
            layer = keras_bn.BatchNormalization(axis=axis)
            layer.build(shape)
            tv = [v.value for v in layer.trainable_variables]
            ntv = [v.value for v in layer.non_trainable_variables]

            def f(x, tv, layer=layer, ntv=ntv):
                return layer.stateless_call(tv, ntv, x, training=True)

            with _variant(pilot, guard):
                step = bench_layer._jax_step(f, x, tv, dy)
                sync(step())
            cands[f"{name} (jit)"] = step
    return cands, sync


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=1)
    parser.add_argument("--modes", default="no XLA,XLA", help="TensorFlow only")
    args = parser.parse_args(argv)

    import keras

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise SystemExit(f"unsupported backend {backend!r}")
    load = os.getloadavg()
    print(
        f"backend={backend} keras={keras.__version__} cpus={os.cpu_count()} "
        f"repeats={args.repeats} inner={args.inner} "
        f"load average={load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print("| shape | axis | candidate | median ms | min ms | median CPU ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for shape, axis in SHAPES:
        cands, sync = _candidates(shape, axis, args.modes.split(","))
        res = bench_layer._time_alternated(cands, args.repeats, args.inner, sync)
        for name, (med, best, cpu) in res.items():
            mode = name[name.rindex("(") :]
            base = res[f"first row {mode}"][0]
            print(
                f"| {shape} | {axis} | {name} | {med * 1e3:.3f} | {best * 1e3:.3f} "
                f"| {cpu * 1e3:.3f} | {med / base:.2f} |"
            )


if __name__ == "__main__":
    main()
