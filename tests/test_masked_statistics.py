"""Moving statistics of batches with fewer than two unmasked values per channel.

Such a batch (or ghost batch, or replica's global batch) has no variance to learn
from: the channel keeps its moving statistics bit for bit, on every path
(eager, compiled with XLA / `jax.jit`, ghost batches, renorm, unbiased,
synchronized across replicas). A channel with enough values is still updated
(float64 NumPy reference, `rtol=1e-5`, absolute floor `1e-6 * max|ref|`).

The synchronized check needs several logical devices, fixed when a backend
starts: it runs this file as `python tests/test_masked_statistics.py N` in a
fresh TensorFlow process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import harness as h  # noqa: E402

import keras_bn  # noqa: E402

VARIANTS = [
    {},
    {"unbiased_variance": True},
    {"renorm": True},
    {"virtual_batch_size": 4},
]


def _layer(shape, **kwargs):
    layer = keras_bn.BatchNormalization(momentum=0.5, **kwargs)
    layer.build(shape)
    return layer


def _moving(layer):
    names = ["moving_mean", "moving_variance"]
    if layer.renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return {n: np.array(keras.ops.convert_to_numpy(getattr(layer, n))) for n in names}


def _data(rng, shape=(8, 5, 3)):
    x = (10.0 + rng.normal(size=shape)).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    return x, dy


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kwargs", VARIANTS, ids=str)
@pytest.mark.parametrize("unmasked", [0, 1])
def test_too_few_unmasked_values_keep_statistics(rng, kwargs, jit, unmasked):
    x, dy = _data(rng)
    layer = _layer(x.shape, **kwargs)
    before = _moving(layer)
    mask = np.zeros(x.shape[:-1], bool)
    if unmasked:
        mask[5, 2] = True
    out = h.run_layer(layer, x, dy, mask=mask, jit=jit)
    after = _moving(layer)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert np.isfinite(h.to_numpy(out["dx"])).all()


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kwargs", VARIANTS[:2], ids=str)
def test_two_unmasked_values_update(rng, kwargs, jit):
    x, dy = _data(rng)
    layer = _layer(x.shape, **kwargs)
    mask = np.zeros(x.shape[:-1], bool)
    mask[1, 1] = mask[6, 4] = True
    h.run_layer(layer, x, dy, mask=mask, jit=jit)
    mean, var = h.ref_moments(x, -1, mask)
    if kwargs:
        var = var * 2.0  # m / (m - 1) with m = 2
    h.assert_close(layer.moving_mean, 0.5 * mean, what="mean")
    h.assert_close(layer.moving_variance, 0.5 + 0.5 * var, what="variance")


@pytest.mark.parametrize("jit", [False, True])
def test_ghost_batches_without_values_leave_the_average(rng, jit):
    """Ghost batch g holds examples g, g + 2, ...: mask out every odd example."""
    x, dy = _data(rng)
    layer = _layer(x.shape, virtual_batch_size=4)
    mask = np.ones(x.shape[:-1], bool)
    mask[1::2] = False
    h.run_layer(layer, x, dy, mask=mask, jit=jit)
    mean, var = h.ref_moments(x[0::2], -1, mask[0::2])  # the one valid ghost batch
    h.assert_close(layer.moving_mean, 0.5 * mean, what="mean")
    h.assert_close(layer.moving_variance, 0.5 + 0.5 * var, what="variance")


@pytest.mark.parametrize("jit", [False, True])
def test_per_channel_mask_counts(rng, jit):
    """Channels-first with a mask broadcast over channels' last spatial axis."""
    x = (3.0 + rng.normal(size=(2, 3, 4))).astype("float32")
    layer = _layer(x.shape, axis=1)
    mask = np.zeros((2, 3), bool)  # mask drops positions of axis 1 (channels)
    mask[0, 0] = True  # channel 0 has 4 values (the last axis), others none
    h.run_layer(layer, x, mask=mask, jit=jit)
    got_mean = h.to_numpy(layer.moving_mean)
    got_var = h.to_numpy(layer.moving_variance)
    ref = x[0, 0].astype(np.float64)
    h.assert_close(got_mean[:1], [0.5 * ref.mean()], what="channel 0 mean")
    h.assert_close(got_var[:1], [0.5 + 0.5 * ref.var()], what="channel 0 var")
    np.testing.assert_array_equal(got_mean[1:], 0.0)
    np.testing.assert_array_equal(got_var[1:], 1.0)


def test_unknown_batch_size_fully_masked(rng):
    """A compiled step with an unknown batch size (the run-time predicate)."""
    if h.backend_name() != "tensorflow":
        pytest.skip("tf.function with an unknown batch dimension")
    import tensorflow as tf

    x, _ = _data(rng)
    layer = _layer(x.shape)
    step = tf.function(
        lambda a, m: layer(a, training=True, mask=m),
        input_signature=[
            tf.TensorSpec((None, 5, 3), "float32"),
            tf.TensorSpec((None, 5), "bool"),
        ],
        jit_compile=True,
    )
    before = _moving(layer)
    step(x, np.zeros((8, 5), bool))
    for name, value in _moving(layer).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_empty_batch_has_its_own_message():
    layer = _layer((4, 3))
    with pytest.raises(ValueError, match=r"empty training batch.*0 values per chan"):
        layer(np.zeros((0, 3), "float32"), training=True)


def test_synchronized_global_batch():
    if h.backend_name() != "tensorflow":
        pytest.skip("tf.distribute.MirroredStrategy: TensorFlow backend")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "2"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "OK synchronized" in proc.stdout


def _synchronized_main(devices: int) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * devices
    )
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(names)
    rng = np.random.default_rng(7)
    x = (10.0 + rng.normal(size=(4 * devices, 3))).astype("float32")
    # Replica 0's shard has one unmasked value per channel, the others none:
    # one value in the global batch keeps the statistics. Then two (one per
    # replica): the statistics move to the global batch's.
    one = np.zeros(len(x), bool)
    one[1] = True
    two = one.copy()
    two[-1] = True
    for mask, update in [(np.zeros(len(x), bool), False), (one, False), (two, True)]:
        for unbiased in (False, True):
            with strategy.scope():
                layer = keras_bn.BatchNormalization(
                    synchronized=True, momentum=0.5, unbiased_variance=unbiased
                )
                layer.build(x.shape)
            ds = tf.data.Dataset.from_tensor_slices((x, mask)).batch(len(x))
            batch = next(iter(strategy.experimental_distribute_dataset(ds)))

            @tf.function
            def step(b, layer=layer):
                return strategy.run(lambda v, m: layer(v, training=True, mask=m), b)

            step(batch)
            mean = layer.moving_mean.value.numpy()
            var = layer.moving_variance.value.numpy()
            tag = f"mask={mask.sum()} unbiased={unbiased}"
            if not update:
                assert (mean == 0).all() and (var == 1).all(), (tag, mean, var)
                continue
            ref_mean, ref_var = h.ref_moments(x[mask], -1)
            if unbiased:
                ref_var = ref_var * 2.0
            h.assert_close(mean, 0.5 * ref_mean, what=tag)
            h.assert_close(var, 0.5 + 0.5 * ref_var, what=tag)
    print("OK synchronized")


if __name__ == "__main__":
    _synchronized_main(int(sys.argv[1]))
