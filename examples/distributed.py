"""Synchronized BN under `tf.distribute.MirroredStrategy`, then recalibration.

Trains a small conv net on MNIST with 2 logical CPU devices (data parallel,
each replica sees half of every batch), once with `synchronized=True` (the
statistics of the global batch) and once with `synchronized=False` (each
replica's half), and prints the test accuracy before and after
`keras_bn.recalibrate` replaces the moving statistics with the exact ones.

    python examples/distributed.py --subset 6000 --epochs 2

TensorFlow only (the strategy is TensorFlow's). `jit_compile` stays off: under
MirroredStrategy TensorFlow cannot XLA-compile the replicated step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2, help="logical CPU devices")
    p.add_argument("--subset", type=int, default=6000, help="training examples")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="steps per epoch")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--recal-examples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(keras, keras_bn, synchronized: bool):
    def bn():
        return keras_bn.BatchNormalization(synchronized=synchronized)

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, use_bias=False),
            bn(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, use_bias=False),
            bn(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices
    )
    import keras
    import numpy as np

    import keras_bn
    from examples.mnist import load_mnist
    from keras_bn.recalibrate import recalibrate

    (x_train, y_train), (x_test, y_test) = load_mnist(flatten=False)
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(x_train))[: args.subset]
    x_train, y_train = x_train[idx], y_train[idx]
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    print(
        f"{strategy.num_replicas_in_sync} replicas, global batch {args.batch_size} "
        f"({args.batch_size // strategy.num_replicas_in_sync} per replica), "
        f"{len(x_train)} training examples"
    )
    results = {}
    init = None
    for synchronized in (True, False):
        keras.utils.set_random_seed(args.seed)
        with strategy.scope():
            model = build_model(keras, keras_bn, synchronized)
            if init is None:
                init = model.get_weights()
            model.set_weights(init)  # Same start for both runs.
            model.compile(
                keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
                jit_compile=False,
            )
        start = time.perf_counter()
        model.fit(
            x_train,
            y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            steps_per_epoch=args.steps,
            verbose=0,
        )
        train_s = time.perf_counter() - start
        before = model.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
        with strategy.scope():
            report = recalibrate(
                model, x_train[: args.recal_examples], batch_size=250, verbose=0
            )
        after = model.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
        name = "synchronized" if synchronized else "per-replica"
        results[name] = dict(
            train_s=train_s, before=before, after=after, gap=report.max_gap
        )
        print(f"\n== {name} BN: trained in {train_s:.1f} s")
        print(report)
        print(
            f"test accuracy: {before:.4f} with the moving averages, "
            f"{after:.4f} after recalibration"
        )
    return results


if __name__ == "__main__":
    main()
