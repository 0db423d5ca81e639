"""Times an epoch of `model.fit` for a Conv-BN-ReLU net, per normalization layer.

The net: 4 blocks of Conv2D (3x3, no bias) -> normalization -> ReLU on a
32x32x3 input, then global average pooling and a 10-way Dense, trained with
SGD on random data, batch 64. The normalization is Keras's
`BatchNormalization`, keras_bn's, or `Identity` (the limit: a net without BN).
Each is compiled twice: with Keras's default `compile()` (`jit_compile="auto"`,
which is no XLA on TensorFlow on a CPU) and with `jit_compile=True`.

All models are built and warmed up (one epoch, which traces the step) first;
then the timed epochs alternate between them, `--repeats` rounds, and the
median epoch time is reported (from the epoch's start to its end, measured by
a callback: `fit`'s own set-up is not counted), and the median of all timed
steps, and the median CPU time of an epoch (`time.process_time`: all threads
of the process), the least sensitive to other processes on a shared machine.
"BN cost" is a model's time minus the Identity model's in the same compile
mode; keras_bn's BN cost is given as a fraction of Keras's.

On torch, `jit_compile=True` is `torch.compile` of the train step (through
Keras); its compile time falls in the untimed warm-up epoch.

    python bench/bench_fit.py --backend tensorflow
    python bench/bench_fit.py --backend jax
    python bench/bench_fit.py --backend torch
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

LAYERS = ("Keras BN", "keras_bn", "no BN (Identity)")
MODES = {"default compile": "auto", "jit_compile=True": True}


def _norm(kind: str):
    import keras

    import keras_bn

    if kind == "Keras BN":
        return keras.layers.BatchNormalization()
    if kind == "keras_bn":
        return keras_bn.BatchNormalization()
    return keras.layers.Identity()


def build(kind: str, filters=(32, 32, 64, 64), seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((32, 32, 3))]
    for f in filters:
        layers += [
            keras.layers.Conv2D(f, 3, padding="same", use_bias=False),
            _norm(kind),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def _epoch_timer():
    """A callback recording the wall time of each epoch and of its steps."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            self.cpu0 = time.process_time()
            self.steps = []

        def on_train_batch_begin(self, batch, logs=None):
            self.t_step = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append(time.perf_counter() - self.t_step)

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.t0
            self.cpu = time.process_time() - self.cpu0

    return EpochTimer()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=16, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated: {list(MODES)}"
    )
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch"),
        default=None,
        help="KERAS_BACKEND for this run (default: the environment's)",
    )
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend

    import keras

    if args.backend and keras.backend.backend() != args.backend:
        raise SystemExit(
            f"Keras was imported with {keras.backend.backend()!r} before "
            f"--backend {args.backend} could apply"
        )

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    models = {}
    for mode in args.modes.split(","):
        for kind in LAYERS:
            model = build(kind)
            model.compile(
                optimizer="sgd",
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=MODES[mode],
            )
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)  # warm-up
            models[(mode, kind)] = model
    times = {key: [] for key in models}
    steps = {key: [] for key in models}
    cpu = {key: [] for key in models}
    timer = _epoch_timer()
    for _ in range(args.repeats):
        for key, model in models.items():
            model.fit(
                x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=[timer]
            )
            times[key].append(timer.seconds)
            steps[key].extend(timer.steps)
            cpu[key].append(timer.cpu)

    print(
        f"backend={keras.backend.backend()} keras={keras.__version__} "
        f"machine={platform.machine()} cpus={os.cpu_count()} "
        f"repeats={args.repeats} steps/epoch={args.steps} batch={args.batch}"
    )
    print(
        "| compile | resolved jit_compile | layer | median epoch s (min-max) | "
        "BN cost / Keras BN's | median epoch CPU s | BN cost / Keras BN's | "
        "median step ms | BN cost / Keras BN's |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        medians = [
            {k: statistics.median(samples[(mode, k)]) for k in LAYERS}
            for samples in (times, cpu, steps)
        ]
        for kind in LAYERS:
            t = times[(mode, kind)]
            row = [mode, str(models[(mode, kind)].jit_compile), kind]
            for med, fmt in zip(medians, ("{:.3f}", "{:.3f}", "{:.1f}"), strict=True):
                value = med[kind] * (1e3 if fmt == "{:.1f}" else 1.0)
                if med is medians[0]:
                    row.append(f"{value:.3f} ({min(t):.3f}-{max(t):.3f})")
                else:
                    row.append(fmt.format(value))
                cost = med[kind] - med[LAYERS[2]]
                keras_cost = med["Keras BN"] - med[LAYERS[2]]
                row.append(f"{cost / keras_cost:.2f}" if kind != LAYERS[2] else "")
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
