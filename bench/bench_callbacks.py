"""Overhead of the statistics callbacks during `fit`, measured robustly.

The model is the paper's 784-100-100-100-10 sigmoid network with BN
(`examples/mnist_sigmoid.py`: batch 60, SGD, `jit_compile=True`,
`steps_per_execution=1`); one epoch is 1,000 steps (one pass over MNIST). The
callbacks run at their defaults: `every_n_batches=100` (10 records per
epoch), a 1,000-image probe, `ActivationStatistics` on all 100 units of
sigmoid3's input, `BatchNormStatistics` on the three BN layers.

A record costs a few milliseconds, about 1% of a 0.5-3 s epoch each: too little
to read from the difference of two noisy epoch times on a shared machine. So
the overhead is split and each part measured where it can be read:

* cost per record, amplified: the callback recording after every batch
  (`every_n_batches=1`, `--amplified-steps` records) minus the same callback
  never recording (`every_n_batches` beyond the run), divided by the number of
  records;
* cost of the per-batch hooks (the callback present but not recording): the
  time spent inside the callback's `on_train_batch_begin/end` during an epoch
  with the never-recording callback, timed around each call. This misses one
  indirect cost: a callback whose `on_train_batch_end` blocks makes Keras wait
  for every training step (on JAX Keras otherwise dispatches batch-end hooks
  asynchronously), so the bench also prints whether Keras dispatched the
  batch hooks asynchronously with the callback present, as without it;
* overhead at the defaults = (hooks + cost per record x records per epoch) /
  epoch time without callbacks.

The peer (no callback) and every configuration run in the same process, on
the same compiled model, alternated within each of `--rounds` rounds (after
one discarded warm-up round); each round gives its own overhead estimate, and
the table reports the median and the range over rounds. The direct
measurement (epochs at the default frequency vs. without callbacks) is
printed beside it as a cross-check. With `--breakdown` it also times the parts
of one record outside `fit`: the compiled probe and the transfer to NumPy, the
statistics on the host, and the writes (history; history + CSV + TensorBoard).

Runs each backend in its own process (`KERAS_BACKEND` is fixed per process):

    python bench/bench_callbacks.py --backends jax,tensorflow --breakdown
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("activation", "batchnorm", "both")
NEVER = 10**9  # every_n_batches beyond any run: the callback never records mid-run


def _callbacks(config, probe, every, **kwargs):
    from keras_bn.callbacks import ActivationStatistics, BatchNormStatistics

    out = []
    if config in ("activation", "both"):
        out.append(
            ActivationStatistics("sigmoid3", probe, every_n_batches=every, **kwargs)
        )
    if config in ("batchnorm", "both"):
        out.append(BatchNormStatistics(probe, every_n_batches=every, **kwargs))
    return out


def _epoch_seconds(model, x, y, callbacks, steps):
    """Times one epoch of `steps` steps (excludes `on_train_begin/end`)."""
    import keras

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.t0

    timer = Timer()
    model.fit(
        x,
        y,
        batch_size=60,
        epochs=1,
        steps_per_epoch=steps,
        callbacks=[*callbacks, timer],
        verbose=0,
    )
    return timer.seconds


class _HookClock:
    """Wraps the batch hooks of callbacks and adds up the seconds spent in them
    (on the main thread and on Keras's worker threads)."""

    def __init__(self, callbacks):
        import threading

        self.seconds = 0.0
        self._lock = threading.Lock()
        for cb in callbacks:
            for name in ("on_train_batch_begin", "on_train_batch_end"):
                setattr(cb, name, self._wrap(getattr(cb, name)))

    def _wrap(self, hook):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - t0

        return timed


def _dispatch(model, callbacks) -> str:
    """Whether Keras dispatches batch-end hooks asynchronously (private API,
    read only to report it)."""
    import keras

    def is_async(cbs):
        return keras.callbacks.CallbackList(cbs, model=model)._async_train

    return f"{is_async([])} without, {is_async(callbacks)} with the callbacks"


def _model():
    import keras

    from examples.mnist_sigmoid import LEARNING_RATE, build_model

    keras.utils.set_random_seed(0)
    model = build_model(batchnorm=True)
    model.compile(
        keras.optimizers.SGD(LEARNING_RATE),
        "sparse_categorical_crossentropy",
        jit_compile=True,
    )
    return model


def bench(rounds, steps, amplified_steps, every, probe_size):
    """Returns `{quantity: [one value per round]}` (seconds)."""
    from examples.mnist import load_mnist

    (x, y), (x_test, _) = load_mnist()
    probe = x_test[:probe_size]
    model = _model()
    # One callback set per use, reused across rounds (each compiles its probe
    # once, on its first `fit`, outside the timed epoch).
    sets = {
        (config, kind): _callbacks(config, probe, n)
        for config in CONFIGS
        for kind, n in (("default", every), ("amplified", 1), ("never", NEVER))
    }
    clocks = {c: _HookClock(sets[c, "never"]) for c in CONFIGS}
    out = {
        f"async dispatch of batch hooks ({c})": _dispatch(model, sets[c, "default"])
        for c in CONFIGS
    }
    for r in range(1 + rounds):  # round 0 warms up (compilation) and is dropped
        times = {"none": _epoch_seconds(model, x, y, [], steps)}
        for config in CONFIGS:
            clocks[config].seconds = 0.0
            times[config, "never"] = _epoch_seconds(
                model, x, y, sets[config, "never"], steps
            )
            # on_train_begin/end call no batch hook: all of it is in the epoch.
            times[config, "hooks"] = clocks[config].seconds
            times[config, "default"] = _epoch_seconds(
                model, x, y, sets[config, "default"], steps
            )
            times[config, "never_short"] = _epoch_seconds(
                model, x, y, sets[config, "never"], amplified_steps
            )
            times[config, "amplified"] = _epoch_seconds(
                model, x, y, sets[config, "amplified"], amplified_steps
            )
        if r:
            for key, value in times.items():
                out.setdefault(key, []).append(value)
    return out


def _breakdown(probe_size, repeats=200):
    """Median milliseconds of the parts of one record, outside `fit`."""
    from examples.mnist import load_mnist

    (x, y), (x_test, _) = load_mnist()
    probe = x_test[:probe_size]
    model = _model()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("activation", "batchnorm"):
            for writes in ("history", "csv+tensorboard"):
                extra = {}
                if writes != "history":
                    extra = {"csv_path": f"{tmp}/{config}.csv", "log_dir": tmp}
                (cb,) = _callbacks(config, probe, NEVER, **extra)
                # A short fit sets the callback up; then open its writers again.
                model.fit(x[:600], y[:600], batch_size=60, callbacks=[cb], verbose=0)
                cb.on_train_begin()
                values = cb._probe.run()
                stats = cb._compute(values)
                hists = cb._histograms(values) if cb._tb is not None else {}
                parts = {
                    "probe (compiled forward + to NumPy)": cb._probe.run,
                    "statistics on the host": lambda cb=cb, v=values: cb._compute(v),
                    f"write ({writes})": lambda cb=cb, s=stats, h=hists: cb._write(
                        s, h
                    ),
                }
                for name, fn in parts.items():
                    fn()
                    ts = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t0)
                    rows[config, name] = 1e3 * statistics.median(ts)
                cb.on_epoch_end(0)  # flushes, as during `fit`
                cb.close()
    return rows


def report(times, args):
    import keras

    rounds = len(times["none"])
    per_epoch = args.steps // args.every
    print(
        f"backend {keras.backend.backend()} (Keras {keras.__version__}), "
        f"{platform.machine()}, {os.cpu_count()} CPUs; epoch = {args.steps} "
        f"steps of batch 60; defaults: every_n_batches={args.every} "
        f"({per_epoch} records/epoch), {args.probe_size}-image probe; amplified: "
        f"{args.amplified_steps} records; {rounds} rounds after 1 warm-up round\n"
    )
    base = statistics.median(times["none"])
    print(
        f"epoch without callbacks: median {base:.3f} s, range "
        f"[{min(times['none']):.3f}, {max(times['none']):.3f}]"
    )
    for key, value in times.items():
        if isinstance(value, str):
            print(f"{key}: {value}")
    print()
    print(
        "| callbacks | ms per record | hooks, ms per epoch | overhead at defaults, "
        "median [min, max] over rounds | direct: epoch at defaults vs none |"
    )
    print("|---|---|---|---|---|")
    for config in CONFIGS:
        cost, hooks, over, direct = [], [], [], []
        for r in range(rounds):
            c = (
                times[config, "amplified"][r] - times[config, "never_short"][r]
            ) / args.amplified_steps
            h = times[config, "hooks"][r]
            t0 = times["none"][r]
            cost.append(c)
            hooks.append(h)
            over.append((h + c * per_epoch) / t0)
            direct.append(times[config, "default"][r] / t0 - 1)
        med = statistics.median
        print(
            f"| {config} | {1e3 * med(cost):.2f} [{1e3 * min(cost):.2f}, "
            f"{1e3 * max(cost):.2f}] | {1e3 * med(hooks):.1f} | "
            f"**{100 * med(over):+.1f}%** [{100 * min(over):+.1f}, "
            f"{100 * max(over):+.1f}] | {100 * med(direct):+.1f}% "
            f"[{100 * min(direct):+.1f}, {100 * max(direct):+.1f}] |"
        )
    records = []
    for config in CONFIGS:
        shares = [
            (times[config, "amplified"][r] - times[config, "never_short"][r])
            / args.amplified_steps
            * per_epoch
            / times["none"][r]
            for r in range(rounds)
        ]
        records.append(f"{config} {100 * statistics.median(shares):+.1f}%")
    print(
        "\nrecords only (cost per record x records per epoch / epoch time): "
        + ", ".join(records)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated, each run in its own process (default: "
        "$KERAS_BACKEND in this process)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000, help="steps per epoch")
    parser.add_argument("--amplified-steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--probe-size", type=int, default=1000)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    if args.backends:
        rest = [a for a in sys.argv[1:] if not a.startswith("--backends")]
        if "--backends" in sys.argv:  # "--backends x" as two arguments
            i = sys.argv.index("--backends")
            rest = sys.argv[1:i] + sys.argv[i + 2 :]
        for backend in args.backends.split(","):
            env = {**os.environ, "KERAS_BACKEND": backend}
            subprocess.run([sys.executable, __file__, *rest], env=env, check=True)
            print()
        return
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    times = bench(
        args.rounds, args.steps, args.amplified_steps, args.every, args.probe_size
    )
    report(times, args)
    if args.breakdown:
        print("\n| one record, outside fit | ms (median of 200) |\n|---|---|")
        for (config, part), ms in _breakdown(args.probe_size).items():
            print(f"| {config}: {part} | {ms:.2f} |")


if __name__ == "__main__":
    main()
