"""Overhead of the statistics callbacks on the MNIST sigmoid run (issue 3).

Trains the paper's 784-100-100-100-10 sigmoid network with BN
(`examples/mnist_sigmoid.py`: batch 60, SGD, `jit_compile=True`, one epoch =
1000 steps = one pass over MNIST) with no callback (the peer), with
`ActivationStatistics` on sigmoid3's input, with `BatchNormStatistics` on the
three BN layers, and with both, all at the default frequency
(`every_n_batches=100`, probe = 1,000 test images). Each configuration runs
`--rounds` fits (configurations interleaved) of one warm-up epoch (compilation)
plus `--epochs` timed epochs; reported: the median epoch time per
configuration and its overhead relative to the no-callback peer measured in
the same process.

    KERAS_BACKEND=jax python bench/bench_callbacks.py
    KERAS_BACKEND=tensorflow python bench/bench_callbacks.py --steps-per-execution 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from examples.mnist import load_mnist  # noqa: E402
from examples.mnist_sigmoid import BATCH_SIZE, LEARNING_RATE, build_model  # noqa: E402
from keras_bn.callbacks import ActivationStatistics, BatchNormStatistics  # noqa: E402

CONFIGS = ("none", "activation", "batchnorm", "both")


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t0)


def _callbacks(config, probe, every):
    out = []
    if config in ("activation", "both"):
        out.append(ActivationStatistics("sigmoid3", probe, every_n_batches=every))
    if config in ("batchnorm", "both"):
        out.append(BatchNormStatistics(probe, every_n_batches=every))
    return out


def bench(epochs=3, rounds=2, steps_per_epoch=1000, every=100, probe_size=1000, spe=1):
    """Returns `{config: [epoch seconds...]}` (warm-up epochs excluded)."""
    (x, y), (x_test, _) = load_mnist()
    probe = x_test[:probe_size]
    times = {c: [] for c in CONFIGS}
    for _ in range(rounds):
        for config in CONFIGS:
            keras.utils.set_random_seed(0)
            model = build_model(batchnorm=True)
            model.compile(
                keras.optimizers.SGD(LEARNING_RATE),
                "sparse_categorical_crossentropy",
                jit_compile=True,
                steps_per_execution=spe,
            )
            timer = _EpochTimer()
            model.fit(
                x,
                y,
                batch_size=BATCH_SIZE,
                epochs=1 + epochs,
                steps_per_epoch=steps_per_epoch,
                callbacks=[*_callbacks(config, probe, every), timer],
                verbose=0,
            )
            times[config] += timer.times[1:]
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--probe-size", type=int, default=1000)
    parser.add_argument("--steps-per-execution", type=int, default=1)
    args = parser.parse_args()
    times = bench(
        args.epochs,
        args.rounds,
        args.steps_per_epoch,
        args.every,
        args.probe_size,
        args.steps_per_execution,
    )
    base = statistics.median(times["none"])
    print(
        f"backend {keras.backend.backend()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; epoch = {args.steps_per_epoch} steps of batch "
        f"{BATCH_SIZE}, steps_per_execution={args.steps_per_execution}, record every "
        f"{args.every} batches on {args.probe_size} probe images; median of "
        f"{args.epochs * args.rounds} timed epochs after warm-up\n"
    )
    print("| callbacks | epoch time (s), median | min | overhead vs none |")
    print("|---|---|---|---|")
    for config in CONFIGS:
        med = statistics.median(times[config])
        print(
            f"| {config} | {med:.3f} | {min(times[config]):.3f} | "
            f"{100 * (med / base - 1):+.1f}% |"
        )


if __name__ == "__main__":
    main()
