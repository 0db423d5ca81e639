"""Times a ResNet-50 training step on JAX, per normalization layer.

`keras.applications.ResNet50(weights=None)` three ways: with Keras's
`BatchNormalization` as built, with keras_bn's (`keras_bn.replace_batchnorm`),
and with every BN layer swapped for `Identity` (the limit: the same net
without BN). A step is one `jax.jit`-compiled function: the forward pass in
training mode (moving statistics updated), the cross-entropy loss, the
gradients and an SGD update, with the variables donated, on data already on
the device. Reported: the median (and min) step time over `--repeats` timed
runs of `--inner` steps each, after warm-up, the three models' runs
interleaved; "BN cost" is a model's time minus the no-BN model's, and
keras_bn's BN cost is given as a fraction of Keras's.

It is meant for the GPU (the lent GPU machines run Keras on JAX only):

    KERAS_BACKEND=jax python bench/bench_resnet.py --dtype float32
    KERAS_BACKEND=jax python bench/bench_resnet.py --dtype mixed_bfloat16

and runs on a CPU with small settings, as a check that it works
(`--batch 2 --size 32 --repeats 2`).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

KINDS = ("Keras BN", "keras_bn", "no BN (Identity)")


def without_bn(model):
    """A copy of `model` with every BN layer replaced by an identity."""
    import keras

    class Identity(keras.layers.Layer):
        # The model's graph calls its BN layers with `training` and `mask`.
        def call(self, inputs, training=None, mask=None):
            return inputs

        def compute_output_shape(self, input_shape):
            return input_shape

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return Identity(name=layer.name, dtype=layer.dtype_policy)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def build(kind: str, size: int, policy: str, classes: int = 1000):
    import keras

    import keras_bn

    keras.mixed_precision.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = keras.applications.ResNet50(
            weights=None, input_shape=(size, size, 3), classes=classes
        )
        if kind == "keras_bn":
            return keras_bn.replace_batchnorm(model)
        if kind == KINDS[2]:
            return without_bn(model)
        return model
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def make_step(model, lr: float = 0.01):
    """`step(trainable, non_trainable, x, y) -> (trainable, non_trainable, loss)`."""
    import jax
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def loss(trainable, non_trainable, x, y):
        out, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return loss_fn(y, out), non_trainable

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, non_trainable, x, y):
        grad = jax.value_and_grad(loss, has_aux=True)
        (value, non_trainable), grads = grad(trainable, non_trainable, x, y)
        trainable = [v - lr * g for v, g in zip(trainable, grads, strict=True)]
        return trainable, non_trainable, value

    return step


def time_steps(models: dict, x, y, repeats: int, inner: int) -> dict:
    """name -> (median s, min s) of one step, the models' runs interleaved."""
    import jax

    state = {}
    for name, model in models.items():
        step = make_step(model)
        # Copies: the step donates its state, and the model keeps its own.
        tv = [jax.numpy.array(v.value) for v in model.trainable_variables]
        ntv = [jax.numpy.array(v.value) for v in model.non_trainable_variables]
        for _ in range(3):  # compile and warm up
            tv, ntv, value = step(tv, ntv, x, y)
        jax.block_until_ready(value)
        state[name] = [step, tv, ntv]
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, entry in state.items():
            step, tv, ntv = entry
            t0 = time.perf_counter()
            for _ in range(inner):
                tv, ntv, value = step(tv, ntv, x, y)
            jax.block_until_ready(value)
            times[name].append((time.perf_counter() - t0) / inner)
            entry[1:] = tv, ntv
    return {n: (statistics.median(t), min(t)) for n, t in times.items()}


def table(results: dict) -> list[str]:
    limit = results[KINDS[2]][0]
    keras_cost = results[KINDS[0]][0] - limit
    rows = [
        "| layer | median step ms | min ms | BN cost ms | BN cost / Keras BN's |",
        "|---|---|---|---|---|",
    ]
    for name, (median, low) in results.items():
        cost = median - limit
        share = "" if name == KINDS[2] else f"{cost / keras_cost:.2f}"
        rows.append(
            f"| {name} | {median * 1e3:.2f} | {low * 1e3:.2f} | "
            f"{cost * 1e3:.2f} | {share} |"
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--dtype", default="float32", help="dtype policy: float32, mixed_bfloat16"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--inner", type=int, default=10)
    args = parser.parse_args(argv)

    import jax
    import keras
    import numpy as np

    if keras.backend.backend() != "jax":
        raise SystemExit(
            "bench_resnet.py times a jax.jit step: run it with KERAS_BACKEND=jax "
            f"(Keras runs on {keras.backend.backend()!r})."
        )
    rng = np.random.default_rng(0)
    x = jax.device_put(
        rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    )
    y = jax.device_put(rng.integers(0, 1000, args.batch))
    models = {kind: build(kind, args.size, args.dtype) for kind in KINDS}
    results = time_steps(models, x, y, args.repeats, args.inner)
    device = jax.devices()[0]
    print(
        f"backend=jax jax={jax.__version__} keras={keras.__version__} "
        f"device={device.platform}:{getattr(device, 'device_kind', '')} "
        f"machine={platform.machine()} batch={args.batch} size={args.size} "
        f"dtype={args.dtype} repeats={args.repeats} inner={args.inner}"
    )
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
