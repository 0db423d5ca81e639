"""One process of tests/test_multiworker.py's two-process training.

    python tests/_multiworker_worker.py BACKEND INDEX ADDRESS OUT

* `tensorflow`: ADDRESS lists every worker's `host:port` (comma-separated);
  the process joins `tf.distribute.MultiWorkerMirroredStrategy` through
  `TF_CONFIG` (one CPU replica per worker).
* `jax`: ADDRESS is the coordinator's `host:port`; the process joins with
  `keras.distribution.initialize` (`jax.distributed.initialize`, Gloo CPU
  collectives) and trains under `keras.distribution.DataParallel` over both
  processes' CPU devices.

Both workers train the same tiny model from the same initial weights, with
`synchronized=True` and `False`, through `fit` and through a custom step
(TensorFlow: `strategy.run`; JAX: a jitted `stateless_call` step on global
arrays), for `STEPS` global batches of `GLOBAL` examples, worker `w` holding
examples `[w * LOCAL, (w + 1) * LOCAL)` of each (the split of Keras's and
tf.data's auto-sharding, made explicit in the custom loops). Worker 1's
examples are shifted so that per-worker statistics differ from global ones.
Each worker saves `OUT/worker{INDEX}.npz` with, per route and flag, the weights
(moving statistics included) after training and, for the custom route, the
summed gradients of every step. Then each computes one route's reference on
one device on the global batches, without strategy or distribution (worker 0
`fit`, worker 1 the custom loop), into `OUT/reference{INDEX}.npz`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GLOBAL, STEPS, WORKERS = 16, 2, 2
LOCAL = GLOBAL // WORKERS
SHAPE = (3, 4)  # (positions, features): BN reduces over batch and positions.
LR = 0.1
START = time.perf_counter()


def log(message):
    """Progress on stderr, shown by the test when a worker fails."""
    print(
        f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True
    )


def make_data(np):
    rng = np.random.default_rng(20150211)
    x = rng.normal(1.0, 2.0, (STEPS * GLOBAL, *SHAPE)).astype("float32")
    second = (np.arange(len(x)) % GLOBAL) >= LOCAL  # Worker 1's examples.
    x[second] = 3.0 * x[second] + 4.0
    y = rng.normal(size=(len(x), 1)).astype("float32")
    return x, y


def local_part(x, worker):
    """Worker `worker`'s examples, global batch after global batch."""
    parts = x.reshape(STEPS, WORKERS, LOCAL, *x.shape[1:])[:, worker]
    return parts.reshape(STEPS * LOCAL, *x.shape[1:])


def make_model(keras, cls, bn):
    return cls(
        [
            keras.Input(SHAPE),
            keras.layers.Dense(5, use_bias=False),
            bn(momentum=0.5),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )


def init_weights(np, model):
    """The same initial weights in every process, whatever its RNG."""
    rng = np.random.default_rng(7)
    out = []
    for w in model.weights:
        if "moving_mean" in w.path:
            out.append(np.zeros(w.shape, "float32"))
        elif "moving_variance" in w.path:
            out.append(np.ones(w.shape, "float32"))
        elif "gamma" in w.path:
            out.append(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        else:
            out.append(rng.normal(0.0, 0.5, w.shape).astype("float32"))
    return out


def bn_factory(synchronized):
    import keras_bn

    return lambda **kw: keras_bn.BatchNormalization(synchronized=synchronized, **kw)


# -- TensorFlow: MultiWorkerMirroredStrategy --------------------------------------


def tensorflow_main(index, address, out):
    workers = address.split(",")
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    log("joined")
    import keras
    import numpy as np

    from examples.multi_worker_fit import MultiWorkerFit

    class Sequential(MultiWorkerFit, keras.Sequential):
        pass

    class BuildFixOnly(MultiWorkerFit, keras.Sequential):
        train_step = keras.Sequential.train_step

    assert strategy.num_replicas_in_sync == WORKERS, strategy.num_replicas_in_sync
    x, y = make_data(np)
    results = {}

    def global_dataset():
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL)
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy.DATA
        options.experimental_distribute.auto_shard_policy = policy
        return ds.with_options(options)

    # Keras's fit without the workaround fails, even for Keras's own BN.
    for name, cls in [("keras", keras.Sequential), ("build_fix_only", BuildFixOnly)]:
        with strategy.scope():
            model = make_model(keras, cls, keras.layers.BatchNormalization)
            model.compile(keras.optimizers.SGD(LR), "mse", jit_compile=False)
        try:
            model.fit(global_dataset(), verbose=0)
            error = ""
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge.
            error = f"{type(e).__name__}: {e}".splitlines()[0]
        results[f"error/{name}"] = np.array(error)

    for sync in (True, False):
        log(f"synchronized={sync}")
        with strategy.scope():
            model = make_model(keras, Sequential, bn_factory(sync))
            model.set_weights(init_weights(np, model))
            model.compile(keras.optimizers.SGD(LR), "mse", jit_compile=False)
        history = model.fit(global_dataset(), verbose=0, shuffle=False)
        log("fit done")
        save_weights(np, results, f"fit/{sync}", model)
        results[f"loss/{sync}"] = np.array(history.history["loss"])
        if sync:  # Inference: the same moving statistics on every worker.
            loss = model.evaluate(global_dataset(), verbose=0)
            results["evaluate"] = np.array(loss)
            log("evaluate done")

        with strategy.scope():
            model = make_model(keras, keras.Sequential, bn_factory(sync))
            model.set_weights(init_weights(np, model))
            optimizer = keras.optimizers.SGD(LR)
            optimizer.build(model.trainable_variables)
        grads = tf_custom_loop(tf, strategy, model, optimizer, x, y)
        save_weights(np, results, f"custom/{sync}", model, grads)

    np.savez(Path(out) / f"worker{index}.npz", **results)
    # One device, the global batches, no strategy (where `synchronized` has no
    # effect): worker 0 runs `fit`, worker 1 the custom loop, in parallel.
    log("reference")
    model = make_model(keras, keras.Sequential, bn_factory(False))
    model.set_weights(init_weights(np, model))
    ref = {}
    if index == 0:
        model.compile(keras.optimizers.SGD(LR), "mse", jit_compile=False)
        history = model.fit(x, y, batch_size=GLOBAL, verbose=0, shuffle=False)
        save_weights(np, ref, "ref/fit", model)
        ref["loss"] = np.array(history.history["loss"])
        ref["evaluate"] = np.array(model.evaluate(x, y, batch_size=GLOBAL, verbose=0))
    else:
        grads = tf_custom_loop(tf, None, model, keras.optimizers.SGD(LR), x, y)
        save_weights(np, ref, "ref/custom", model, grads)
    np.savez(Path(out) / f"reference{index}.npz", **ref)


def tf_custom_loop(tf, strategy, model, optimizer, x, y):
    """`STEPS` SGD steps; returns each step's gradients summed over workers."""

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            pred = model(xb, training=True)
            loss = tf.reduce_sum(tf.square(pred - yb)) / GLOBAL
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        if strategy is None:
            return grads
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)

    if strategy is None:
        step = tf.function(replica_step)
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL)
    else:

        def dataset_fn(context):
            w = context.input_pipeline_id
            parts = (local_part(x, w), local_part(y, w))
            return tf.data.Dataset.from_tensor_slices(parts).batch(LOCAL)

        @tf.function
        def step(xb, yb):
            return strategy.run(replica_step, args=(xb, yb))

        batches = strategy.distribute_datasets_from_function(dataset_fn)

    out = []
    for xb, yb in batches:
        grads = step(xb, yb)
        if strategy is not None:
            grads = [strategy.experimental_local_results(g)[0] for g in grads]
        out.append([g.numpy() for g in grads])
    assert len(out) == STEPS, len(out)
    return out


def save_weights(np, results, prefix, model, grads=None):
    for i, w in enumerate(model.weights):
        results[f"{prefix}/{i}:{w.name}"] = to_local_numpy(np, w.value)
    for step, step_grads in enumerate(grads or []):
        for i, (w, g) in enumerate(
            zip(model.trainable_variables, step_grads, strict=True)
        ):
            results[f"{prefix}/grad{step}/{i}:{w.name}"] = np.asarray(g)


def to_local_numpy(np, value):
    """This process's copy of a (replicated) value."""
    if hasattr(value, "addressable_data"):  # A jax.Array over all processes.
        value = value.addressable_data(0)
    return np.asarray(value)


# -- JAX: jax.distributed + keras.distribution.DataParallel -----------------------


def jax_main(index, address, out):
    import keras

    keras.distribution.initialize(address, WORKERS, index)
    log("joined")
    import jax
    import numpy as np
    import tensorflow as tf

    assert jax.process_count() == WORKERS and jax.device_count() == WORKERS
    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()
    )
    x, y = make_data(np)
    results = {}
    for sync in (True, False):
        log(f"synchronized={sync}")
        with distribution.scope():
            model = make_model(keras, keras.Sequential, bn_factory(sync))
            model.set_weights(init_weights(np, model))
            model.compile(keras.optimizers.SGD(LR), "mse")
            # Keras shards the global batches over the processes itself.
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL)
            model.fit(ds, verbose=0, shuffle=False)
        save_weights(np, results, f"fit/{sync}", model)

        with distribution.scope():
            model = make_model(keras, keras.Sequential, bn_factory(sync))
            model.set_weights(init_weights(np, model))
        layout = distribution.get_data_layout((GLOBAL, *SHAPE)).backend_layout
        grads = jax_custom_loop(jax, np, model, x, y, layout)
        save_weights(np, results, f"custom/{sync}", model, grads)

    np.savez(Path(out) / f"worker{index}.npz", **results)
    log("reference")  # As on TensorFlow, without distribution.
    model = make_model(keras, keras.Sequential, bn_factory(False))
    model.set_weights(init_weights(np, model))
    ref = {}
    if index == 0:
        model.compile(keras.optimizers.SGD(LR), "mse")
        model.fit(x, y, batch_size=GLOBAL, verbose=0, shuffle=False)
        save_weights(np, ref, "ref/fit", model)
    else:
        grads = jax_custom_loop(jax, np, model, x, y, None)
        save_weights(np, ref, "ref/custom", model, grads)
    np.savez(Path(out) / f"reference{index}.npz", **ref)
    jax.distributed.shutdown()  # A barrier: the coordinator (worker 0) goes last.


def jax_custom_loop(jax, np, model, x, y, layout):
    """`STEPS` SGD steps of a jitted step; returns each step's gradients.

    With `layout` (multi-process), each process passes its own examples and
    `jax.make_array_from_process_local_data` makes the global batch.
    """
    import jax.numpy as jnp

    @jax.jit
    def step(trainable, non_trainable, xb, yb):
        def loss_fn(trainable):
            pred, non_trainable_new = model.stateless_call(
                trainable, non_trainable, xb, training=True
            )
            return jnp.mean(jnp.square(pred - yb)), non_trainable_new

        grads, non_trainable = jax.grad(loss_fn, has_aux=True)(trainable)
        trainable = [w - LR * g for w, g in zip(trainable, grads, strict=True)]
        return trainable, non_trainable, grads

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    out = []
    for s in range(STEPS):
        xb, yb = x[s * GLOBAL : (s + 1) * GLOBAL], y[s * GLOBAL : (s + 1) * GLOBAL]
        if layout is not None:
            worker = jax.process_index()
            xb, yb = (a[worker * LOCAL : (worker + 1) * LOCAL] for a in (xb, yb))
            xb = jax.make_array_from_process_local_data(layout, xb)
            spec = jax.sharding.PartitionSpec(layout.spec[0])
            y_layout = jax.sharding.NamedSharding(layout.mesh, spec)
            yb = jax.make_array_from_process_local_data(y_layout, yb)
        trainable, non_trainable, grads = step(trainable, non_trainable, xb, yb)
        out.append([to_local_numpy(np, g) for g in grads])
    for v, value in zip(model.trainable_variables, trainable, strict=True):
        v.assign(value)
    for v, value in zip(model.non_trainable_variables, non_trainable, strict=True):
        v.assign(value)
    return out


if __name__ == "__main__":
    backend, index, address, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
    os.environ["KERAS_BACKEND"] = backend
    {"tensorflow": tensorflow_main, "jax": jax_main}[backend](index, address, out)
    log(f"OK worker {index}")
    # Results are on disk; skip the interpreter's slow teardown of TF/JAX's
    # threads and collectives (seconds per process on a busy machine).
    sys.stdout.flush()
    os._exit(0)
