"""Synchronized batch normalization across replicas, on the CPU.

Device counts are fixed when a backend starts, so each check runs in a fresh
process: this file, run as `python tests/test_synchronized.py BACKEND N`, sets
up N logical CPU devices (TensorFlow: `set_logical_device_configuration`;
JAX: `XLA_FLAGS=--xla_force_host_platform_device_count=N`), runs every check in
one process (imports are slow) and raises on the first mismatch. On torch it
starts N processes in a Gloo group on 127.0.0.1 (`torch.distributed`), one
replica each, which run the same grid on their shards.

Tolerances: the replicated float32 run vs one device on the global batch
(same float32 kernel, different reduction order): `rtol=1e-6` with an absolute
floor `1e-6 * max|ref|`; vs the float64 NumPy reference: `rtol=1e-5`, floor
`1e-6 * max|ref|`; weights after two `fit` steps, replicated vs one device:
`rtol=1e-5`, floor `1e-6 * max|ref|` (rounding differences pass through two
updates).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run_checks(backend: str, devices: int) -> str:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    if backend == "jax":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), backend, str(devices)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _backend() -> str:
    return os.environ.get("KERAS_BACKEND", "tensorflow")


@pytest.mark.parametrize("devices", [2, 4])
def test_tensorflow_mirrored_strategy(devices):
    if _backend() != "tensorflow":
        pytest.skip("tf.distribute.MirroredStrategy runs with the TensorFlow backend")
    out = _run_checks("tensorflow", devices)
    assert f"OK tensorflow {devices}" in out


def test_jax_data_parallel():
    if _backend() != "jax":
        pytest.skip("keras.distribution.DataParallel over XLA devices is JAX's")
    out = _run_checks("jax", 4)
    assert "OK jax 4" in out
    # XLA's SPMD partitioner turned the batch reductions into cross-device ones.
    assert "all-reduce in compiled step: True" in out


def test_torch_distributed():
    """The grid above on torch: two processes of a Gloo group (CPU), each with
    its shard, against the float64 reference (`fit` under DDP-style data
    parallelism: tests/test_ddp.py)."""
    if _backend() != "torch":
        pytest.skip("torch.distributed process groups run with the torch backend")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no Gloo process groups")
    out = _run_checks("torch", 2)
    assert "OK torch 2" in out


def test_single_replica_synchronized_is_plain(rng):
    """Without a strategy, synchronized=True computes what False computes."""
    from harness import assert_close, run_layer

    import keras_bn

    x = rng.normal(2.0, 3.0, (8, 3)).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    outs = []
    for sync in (True, False):
        layer = keras_bn.BatchNormalization(synchronized=sync)
        layer.build(x.shape)
        outs.append(run_layer(layer, x, dy))
    for key in ("y", "dx"):
        assert_close(outs[0][key], outs[1][key], rtol=1e-6)
    config = keras_bn.BatchNormalization(synchronized=True).get_config()
    assert keras_bn.BatchNormalization.from_config(config).synchronized is True


# -- the checks, run in the subprocess -------------------------------------------------


def _data(np, devices, masked):
    rng = np.random.default_rng(20150211 + devices)
    batch = 4 * devices
    x = rng.normal(3.0, 2.0, (batch, 5, 3)).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    mask = (rng.random((batch, 5)) > 0.3) if masked else None
    gamma = rng.uniform(0.5, 2.0, 3).astype("float32")
    beta = rng.normal(size=3).astype("float32")
    return x, dy, mask, gamma, beta


def _tf_main(devices: int) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * devices
    )
    import keras
    import numpy as np
    from harness import assert_close

    import keras_bn

    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(names) == devices, names
    strategy = tf.distribute.MirroredStrategy(names)
    momentum = 0.5
    # Each option on both sides of `synchronized` (a full grid is twice as slow).
    grid = [(True, False, False), (True, True, True), (False, False, True)]
    grid.append((False, True, False))
    for sync, masked, unbiased in grid:
        x, dy, mask, gamma, beta = _data(np, devices, masked)
        with strategy.scope():
            layer = keras_bn.BatchNormalization(
                synchronized=sync,
                momentum=momentum,
                unbiased_variance=unbiased,
            )
            layer.build(x.shape)
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)
        inputs = (x, dy) if mask is None else (x, dy, mask)
        ds = tf.data.Dataset.from_tensor_slices(inputs).batch(len(x))
        dist = iter(strategy.experimental_distribute_dataset(ds))

        @tf.function
        def step(*args, layer=layer):
            def replica(xb, g, mk=None):
                with tf.GradientTape() as tape:
                    tape.watch(xb)
                    kw = {} if mk is None else {"mask": mk}
                    y = layer(xb, training=True, **kw)
                    loss = tf.reduce_sum(y * g)
                grads = tape.gradient(loss, [xb, layer.gamma, layer.beta])
                return [xb, y, *grads]

            return strategy.run(replica, args=args)

        out = step(*next(dist))
        local = [
            [t.numpy() for t in strategy.experimental_local_results(o)] for o in out
        ]
        xs, ys, dxs, dgs, dbs = local
        means = [
            v.numpy()
            for v in strategy.experimental_local_results(layer.moving_mean.value)
        ]
        variances = [
            v.numpy()
            for v in strategy.experimental_local_results(layer.moving_variance.value)
        ]
        tag = f"sync={sync} masked={masked} unbiased={unbiased}"
        _compare_grid(
            np,
            x,
            dy,
            mask,
            gamma,
            beta,
            sync,
            unbiased,
            momentum,
            (xs, ys, dxs, dgs, dbs, means, variances),
            tag,
        )
    _tf_one_per_replica(tf, np, keras_bn, strategy, devices, assert_close)
    _tf_fit_check(tf, keras, np, keras_bn, strategy, devices, assert_close)
    print(f"OK tensorflow {devices}")


def _compare_grid(np, x, dy, mask, gamma, beta, sync, unbiased, momentum, got, tag):
    """One grid case against the float64 reference: per replica, its shard's
    `(x, y, dx, dgamma, dbeta, moving_mean, moving_variance)` in `got`."""
    from harness import assert_close, ref_backward, ref_forward

    xs, ys, dxs, dgs, dbs, means, variances = got
    # The global batch is split into consecutive shards.
    np.testing.assert_array_equal(np.concatenate(xs), x)
    shards = len(xs)
    size = len(x) // shards
    groups = (
        [slice(None)]
        if sync
        else [slice(i * size, (i + 1) * size) for i in range(shards)]
    )
    for i, part in enumerate(groups):
        m = None if mask is None else mask[part]
        y, mean, var = ref_forward(x[part], gamma, beta, -1, 1e-3, m)
        dx, dgamma, dbeta = ref_backward(x[part], gamma, dy[part], -1, 1e-3, m)
        got_y = np.concatenate(ys) if sync else ys[i]
        got_dx = np.concatenate(dxs) if sync else dxs[i]
        assert_close(got_y, y, what=f"y {tag}")
        assert_close(got_dx, dx, what=f"dx {tag}")
        # The optimizer sums the replicas' gamma/beta gradients.
        got_dg = sum(dgs) if sync else dgs[i]
        got_db = sum(dbs) if sync else dbs[i]
        assert_close(got_dg, dgamma, what=f"dgamma {tag}")
        assert_close(got_db, dbeta, what=f"dbeta {tag}")
        if unbiased:
            count = x[part].shape[0] * x.shape[1] if m is None else m.sum()
            var = var * count / (count - 1)
        replicas = range(shards) if sync else [i]
        for r in replicas:
            assert_close(means[r], (1 - momentum) * mean, what=f"mean {tag}")
            assert_close(
                variances[r],
                momentum + (1 - momentum) * var,
                what=f"variance {tag}",
            )


def _tf_one_per_replica(tf, np, keras_bn, strategy, devices, assert_close):
    """One example per replica: synchronized BN still has a global batch."""
    from harness import ref_forward

    x = np.random.default_rng(3).normal(size=(devices, 3)).astype("float32")
    with strategy.scope():
        layer = keras_bn.BatchNormalization(synchronized=True, momentum=0.0)
        layer.build(x.shape)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(devices)
    batch = next(iter(strategy.experimental_distribute_dataset(ds)))
    step = tf.function(lambda b: strategy.run(lambda v: layer(v, training=True), (b,)))
    ys = [t.numpy() for t in strategy.experimental_local_results(step(batch))]
    y, mean, var = ref_forward(x, np.ones(3), np.zeros(3), -1, 1e-3)
    assert_close(np.concatenate(ys), y, what="one example per replica: y")
    assert_close(layer.moving_mean.value.numpy(), mean, what="one per replica: mean")
    assert_close(layer.moving_variance.value.numpy(), var, what="one per replica: var")
    if devices >= 3:
        _tf_empty_replica(tf, np, keras_bn, strategy, devices, assert_close)


def _tf_empty_replica(tf, np, keras_bn, strategy, devices, assert_close):
    """A global batch smaller than the replicas: one replica gets no example."""
    from harness import ref_forward

    x = np.random.default_rng(4).normal(3.0, 2.0, (devices - 1, 3)).astype("float32")
    with strategy.scope():
        layer = keras_bn.BatchNormalization(synchronized=True, momentum=0.0)
        layer.build(x.shape)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(devices - 1)
    batch = next(iter(strategy.experimental_distribute_dataset(ds)))
    step = tf.function(lambda b: strategy.run(lambda v: layer(v, training=True), (b,)))
    ys = [t.numpy() for t in strategy.experimental_local_results(step(batch))]
    assert sum(len(t) for t in ys) == len(x) and min(len(t) for t in ys) == 0
    y, mean, var = ref_forward(x, np.ones(3), np.zeros(3), -1, 1e-3)
    assert_close(np.concatenate(ys), y, what="empty replica: y")
    assert_close(layer.moving_mean.value.numpy(), mean, what="empty replica: mean")
    assert_close(layer.moving_variance.value.numpy(), var, what="empty replica: var")


def _fit_model(keras, keras_bn, sync):
    return keras.Sequential(
        [
            keras.Input((5,)),
            # No bias before BN: its gradient is 0 up to rounding noise.
            keras.layers.Dense(4, use_bias=False),
            keras_bn.BatchNormalization(synchronized=sync, momentum=0.5),
            keras.layers.Dense(1),
        ]
    )


def _fit_data(np, devices):
    """Two full batches of 4 per replica and a partial one of 2 per replica."""
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, (10 * devices, 5)).astype("float32")
    return x, rng.normal(size=(len(x), 1)).astype("float32")


def _tf_fit_check(tf, keras, np, keras_bn, strategy, devices, assert_close):
    """Three SGD steps of `fit` under the strategy == one device, global batch.

    The last batch is partial, so the step is traced with an unknown batch size.
    """
    x, y = _fit_data(np, devices)
    single = _fit_model(keras, keras_bn, False)
    with strategy.scope():
        replicated = _fit_model(keras, keras_bn, True)
        replicated.set_weights(single.get_weights())
        replicated.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=False)
    single.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=False)
    kw = dict(batch_size=4 * devices, epochs=1, shuffle=False, verbose=0)
    single.fit(x, y, **kw)
    replicated.fit(x, y, **kw)
    for a, b in zip(replicated.get_weights(), single.get_weights(), strict=True):
        assert_close(a, b, rtol=1e-5, what="fit weights")


def _jax_main(devices: int) -> None:
    import jax
    import keras
    import numpy as np
    from harness import assert_close, ref_backward, ref_forward
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import keras_bn

    assert len(jax.devices()) == devices, jax.devices()
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    mesh = distribution.device_mesh.backend_mesh
    x, dy, _, gamma, beta = _data(np, devices, False)

    def run(sync, sharded):
        layer = keras_bn.BatchNormalization(synchronized=sync, momentum=0.5)
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def loss(tv, x):
            y, new = layer.stateless_call(tv, ntv, x, training=True)
            return (y * dy).sum(), (y, new)

        f = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        xs = jax.device_put(x, NamedSharding(mesh, P("batch"))) if sharded else x
        hlo = f.lower(tv, xs).compile().as_text()
        ((dgamma, dbeta), dx), (y, new) = f(tv, xs)
        if sharded:
            assert len(y.sharding.device_set) == devices, y.sharding
        arrays = [y, dx, dgamma, dbeta, *new]
        return [np.asarray(a) for a in arrays], "all-reduce" in hlo

    one, _ = run(False, False)
    y, mean, var = ref_forward(x, gamma, beta, -1, 1e-3)
    dx, dgamma, dbeta = ref_backward(x, gamma, dy, -1, 1e-3)
    for got, ref in zip(
        one, [y, dx, dgamma, dbeta, 0.5 * mean, 0.5 + 0.5 * var], strict=True
    ):
        assert_close(got, ref, what="one device vs float64")
    for sync in (True, False):
        many, reduced = run(sync, True)
        assert reduced, "no all-reduce in the sharded step"
        for got, ref in zip(many, one, strict=True):
            assert_close(got, ref, rtol=1e-6, what=f"sharded sync={sync}")
    print("all-reduce in compiled step: True")

    xf, yf = _fit_data(np, devices)
    single = _fit_model(keras, keras_bn, False)
    weights = single.get_weights()
    kw = dict(batch_size=4 * devices, epochs=1, shuffle=False, verbose=0)
    single.compile(keras.optimizers.SGD(0.1), "mse")
    single.fit(xf, yf, **kw)
    with distribution.scope():
        replicated = _fit_model(keras, keras_bn, True)
        replicated.set_weights(weights)
        replicated.compile(keras.optimizers.SGD(0.1), "mse")
        replicated.fit(xf, yf, **kw)
    kernel = replicated.layers[0].kernel.value
    assert len(kernel.sharding.device_set) == devices, kernel.sharding
    for a, b in zip(replicated.get_weights(), single.get_weights(), strict=True):
        assert_close(a, b, rtol=1e-5, what="fit weights")
    print(f"OK jax {devices}")


def _torch_main(devices: int) -> None:
    """`devices` processes in a Gloo group on 127.0.0.1, one CPU replica each."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torch_replica, args=(devices, port), nprocs=devices, join=True)
    print(f"OK torch {devices}")


def _torch_replica(rank: int, devices: int, port: int) -> None:
    import datetime

    import numpy as np
    import torch
    import torch.distributed as dist

    import keras_bn

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=devices,
        timeout=datetime.timedelta(seconds=120),
    )

    def gather(values):
        out = [None] * devices
        dist.all_gather_object(out, [np.asarray(v) for v in values])
        return [list(col) for col in zip(*out, strict=True)]

    def step(layer, xb, dy=None, mask=None):
        """The replica's training call: y, and with dy: dx, dgamma, dbeta."""
        xb = torch.tensor(xb, requires_grad=dy is not None)
        kw = {} if mask is None else {"mask": torch.tensor(mask)}
        y = layer(xb, training=True, **kw)
        if dy is None:
            return [y.detach().numpy()]
        wrt = [xb, layer.gamma.value, layer.beta.value]
        grads = torch.autograd.grad(y, wrt, grad_outputs=torch.tensor(dy))
        return [t.detach().numpy() for t in (y, *grads)]

    def stats(layer):
        return [np.asarray(v.value.detach()) for v in layer.non_trainable_variables]

    try:
        momentum = 0.5
        grid = [(True, False, False), (True, True, True), (False, False, True)]
        grid.append((False, True, False))
        for sync, masked, unbiased in grid:
            x, dy, mask, gamma, beta = _data(np, devices, masked)
            size = len(x) // devices
            part = slice(rank * size, (rank + 1) * size)
            layer = keras_bn.BatchNormalization(
                synchronized=sync, momentum=momentum, unbiased_variance=unbiased
            )
            layer.build(x.shape)
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)
            mk = None if mask is None else mask[part]
            out = step(layer, x[part], dy[part], mk)
            got = gather([x[part], *out, *stats(layer)])
            tag = f"sync={sync} masked={masked} unbiased={unbiased}"
            _compare_grid(
                np, x, dy, mask, gamma, beta, sync, unbiased, momentum, got, tag
            )
        _torch_global_batch(np, keras_bn, rank, devices, step, stats, gather)
    finally:
        dist.destroy_process_group()


def _torch_global_batch(np, keras_bn, rank, devices, step, stats, gather):
    """One example per replica, then a replica without examples: statistics of
    the global batch all the same."""
    from harness import assert_close, ref_forward

    rng = np.random.default_rng(3)
    one = rng.normal(size=(devices, 3)).astype("float32")
    # All examples on the first replica: the others get none.
    empty = rng.normal(3.0, 2.0, (2, 3)).astype("float32")
    shards = {"one example per replica": one[rank : rank + 1]}
    shards["empty replica"] = empty if rank == 0 else empty[:0]
    for (what, shard), x in zip(shards.items(), (one, empty), strict=True):
        layer = keras_bn.BatchNormalization(synchronized=True, momentum=0.0)
        layer.build(x.shape)
        ys, means, variances = gather([*step(layer, shard), *stats(layer)])
        y, mean, var = ref_forward(x, np.ones(3), np.zeros(3), -1, 1e-3)
        assert_close(np.concatenate(ys), y, what=f"{what}: y")
        for r in range(devices):
            assert_close(means[r], mean, what=f"{what}: mean")
            assert_close(variances[r], var, what=f"{what}: var")


if __name__ == "__main__":
    backend_arg, devices_arg = sys.argv[1], int(sys.argv[2])
    if backend_arg == "tensorflow":
        _tf_main(devices_arg)
    elif backend_arg == "torch":
        _torch_main(devices_arg)
    else:
        _jax_main(devices_arg)
