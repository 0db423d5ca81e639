"""The MNIST experiment of Ioffe & Szegedy (2015), Figure 1, on real MNIST.

A 784-100-100-100-10 fully connected network with sigmoid nonlinearities,
trained with plain SGD on batches of 60, with and without batch normalization
before each sigmoid (`Dense(use_bias=False) -> keras_bn.BatchNormalization ->
sigmoid`). Test accuracy on the 10,000 test images is recorded every K steps,
and `keras_bn.callbacks.ActivationStatistics` records the {15, 50, 85}th
percentiles of the input to one sigmoid of the last hidden layer over a fixed
probe batch (the paper's Figure 1(b,c)).

Choices the paper leaves open (stated here and in the results table):
weights drawn from N(0, 0.1^2) (same draws for both networks; biases 0; BN
gamma=1, beta=0), SGD learning rate 0.5 without momentum for both, probe =
the first 1,000 test images, recorded sigmoid = unit 0 of the third hidden
layer.

    python examples/mnist_sigmoid.py --steps 50000 --out runs/mnist_sigmoid

writes `metrics.csv` (step, model, test_accuracy, p15, p50, p85),
`mnist_sigmoid.png` and `results.md` into `--out` and prints the results table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras

import keras_bn
from examples.mnist import load_mnist
from keras_bn.callbacks import ActivationStatistics

MODELS = ("baseline", "batchnorm")
BATCH_SIZE = 60
BATCHES_PER_EPOCH = 60000 // BATCH_SIZE  # 1000: one pass over the training set
LEARNING_RATE = 0.5
INIT_STDDEV = 0.1
PROBE_SIZE = 1000
STABLE_AFTER = 1000  # the stability figures use records after this step
PERCENTILES = ("p15", "p50", "p85")
RECORDED_LAYER = "sigmoid3"


def build_model(batchnorm: bool, seed: int = 0, init_stddev: float = INIT_STDDEV):
    """Returns the paper's 784-100-100-100-10 sigmoid network (uncompiled).

    Args:
        batchnorm: Insert `keras_bn.BatchNormalization` before each sigmoid
            (and drop the Dense bias, which BN's beta replaces).
        seed: Seed of the initial weights (the same draws for both variants).
        init_stddev: Standard deviation of the Gaussian initial weights.

    Returns:
        A `keras.Model` whose sigmoid layers are named `sigmoid1..3`.
    """
    inputs = keras.Input((784,), name="pixels")
    h = inputs
    for i in (1, 2, 3):
        init = keras.initializers.RandomNormal(0.0, init_stddev, seed=seed * 10 + i)
        h = keras.layers.Dense(
            100, use_bias=not batchnorm, kernel_initializer=init, name=f"dense{i}"
        )(h)
        if batchnorm:
            h = keras_bn.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.Activation("sigmoid", name=f"sigmoid{i}")(h)
    init = keras.initializers.RandomNormal(0.0, init_stddev, seed=seed * 10 + 4)
    outputs = keras.layers.Dense(
        10, activation="softmax", kernel_initializer=init, name="softmax"
    )(h)
    name = "batchnorm" if batchnorm else "baseline"
    return keras.Model(inputs, outputs, name=name)


_DIVISORS_OF_1000 = (1000, 500, 250, 200, 125, 100, 50, 40, 25, 20, 10, 8, 5, 4, 2, 1)


def _eval_every(steps: int) -> int:
    """Largest divisor of 1000 and `steps` giving >= 100 evaluations (>= 20 below
    20,000 steps; fewer only if `steps` has no such divisor)."""
    target = 100 if steps >= 20000 else 20
    fits = [k for k in _DIVISORS_OF_1000 if steps % k == 0]
    return next((k for k in fits if steps // k >= target), fits[-1])


def _check_args(steps, eval_every):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int. Received: steps={steps!r}")
    if eval_every is None:
        return _eval_every(steps)
    if (
        isinstance(eval_every, bool)
        or not isinstance(eval_every, int)
        or eval_every < 1
        or BATCHES_PER_EPOCH % eval_every
        or steps % eval_every
    ):
        raise ValueError(
            f"`eval_every` must divide both 1000 (the batches in one pass over "
            f"MNIST) and steps={steps}. Received: eval_every={eval_every!r}"
        )
    return eval_every


def train_one(name, data, steps, eval_every, seed, learning_rate, unit):
    """Trains one network.

    Returns:
        Rows of (step, accuracy, percentiles), the same percentiles with the
        probe in inference mode, the training seconds, and the trained model.
    """
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)  # same shuffling for both networks
    model = build_model(name == "batchnorm", seed)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
        steps_per_execution=math.gcd(eval_every, 100),
    )
    stats, inference_stats = (
        ActivationStatistics(
            RECORDED_LAYER,
            probe_data=x_test[:PROBE_SIZE],
            every_n_batches=eval_every,
            unit=unit,
            training=training,
        )
        for training in (True, False)
    )
    acc0 = model.evaluate(x_test, y_test, batch_size=2000, verbose=0)[1]
    start = time.perf_counter()
    fit = model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=steps // eval_every,
        steps_per_epoch=eval_every,
        validation_data=(x_test, y_test),
        validation_batch_size=2000,
        shuffle=True,
        callbacks=[stats, inference_stats],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    accuracy = [acc0, *fit.history["val_accuracy"]]
    recorded = stats.history.as_dict()
    by_step = {s: i for i, s in enumerate(recorded["step"])}
    rows = []
    for e, acc in enumerate(accuracy):
        step = e * eval_every
        i = by_step[step]
        rows.append(
            {
                "step": step,
                "model": name,
                "test_accuracy": float(acc),
                "p15": recorded["p15"][i],
                "p50": recorded["p50"][i],
                "p85": recorded["p85"][i],
            }
        )
    inference = inference_stats.history.as_dict()
    inference_rows = [
        {"step": s, "model": name, **{k: inference[k][i] for k in PERCENTILES}}
        for i, s in enumerate(inference["step"])
    ]
    return rows, inference_rows, seconds, model


def _spreads(rows, stable_after):
    late = [r for r in rows if r["step"] >= stable_after] or rows
    p50 = [r["p50"] for r in late]
    width = [r["p85"] - r["p15"] for r in late]
    return max(p50) - min(p50), max(width) - min(width)


def summarize(
    rows: list[dict], inference_rows=(), stable_after: int = STABLE_AFTER
) -> dict:
    """Computes the results table from the metrics rows of both networks."""
    out = {}
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        out[name] = {
            "final_accuracy": mine[-1]["test_accuracy"],
            "best_accuracy": max(r["test_accuracy"] for r in mine),
        }
        out[name]["p50_spread"], out[name]["band_spread"] = _spreads(mine, stable_after)
        inf = [r for r in inference_rows if r["model"] == name]
        if inf:
            spreads = _spreads(inf, stable_after)
            out[name]["p50_spread_inference"] = spreads[0]
            out[name]["band_spread_inference"] = spreads[1]
    target = out["baseline"]["final_accuracy"]
    reach = [
        r["step"]
        for r in rows
        if r["model"] == "batchnorm" and r["test_accuracy"] >= target
    ]
    out["bn_reaches_baseline_final_at"] = reach[0] if reach else None
    return out


def results_markdown(results: dict) -> str:
    """Formats `run`'s results as a markdown table."""
    s = results["summary"]
    reach = s["bn_reaches_baseline_final_at"]
    steps = results["steps"]
    lines = [
        f"MNIST, 784-100-100-100-10 sigmoid MLP, SGD lr={results['learning_rate']}, "
        f"batch {BATCH_SIZE}, {steps} steps, seed {results['seed']}, "
        f"backend {results['backend']}, test accuracy every "
        f"{results['eval_every']} steps on the 10,000 test images.",
        "",
        "| | baseline | with BN |",
        "|---|---|---|",
        "| final test accuracy | {:.4f} | {:.4f} |".format(
            s["baseline"]["final_accuracy"], s["batchnorm"]["final_accuracy"]
        ),
        "| best test accuracy | {:.4f} | {:.4f} |".format(
            s["baseline"]["best_accuracy"], s["batchnorm"]["best_accuracy"]
        ),
        "| spread (max-min) of p50 after step {} | {:.3f} | {:.3f} |".format(
            results["stable_after"],
            s["baseline"]["p50_spread"],
            s["batchnorm"]["p50_spread"],
        ),
        "| spread (max-min) of p85-p15 after step {} | {:.3f} | {:.3f} |".format(
            results["stable_after"],
            s["baseline"]["band_spread"],
            s["batchnorm"]["band_spread"],
        ),
    ]
    if "p50_spread_inference" in s["batchnorm"]:
        lines += [
            "| same, p50, probe in inference mode (BN: moving stats) "
            "| {:.3f} | {:.3f} |".format(
                s["baseline"]["p50_spread_inference"],
                s["batchnorm"]["p50_spread_inference"],
            ),
            "| same, p85-p15, probe in inference mode | {:.3f} | {:.3f} |".format(
                s["baseline"]["band_spread_inference"],
                s["batchnorm"]["band_spread_inference"],
            ),
        ]
    lines += [
        "| training time (s, fit incl. evaluations) | {:.0f} | {:.0f} |".format(
            results["seconds"]["baseline"], results["seconds"]["batchnorm"]
        ),
        "",
        "BN net first reaches the baseline's final accuracy at step: "
        + (f"{reach}" if reach is not None else "never (within this run)")
        + f" (of {steps}).",
        "",
        f"Percentiles: input of {results['recorded']} over the first "
        f"{PROBE_SIZE} test images, probe run in training mode (BN normalizes "
        "with the probe batch's statistics, as in a training step), recorded "
        "every evaluation; metrics.csv holds these.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> str:
    """Draws accuracy vs. steps and the percentile bands of both networks."""
    from keras_bn.callbacks._plot import draw_bands, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"baseline": "C1", "batchnorm": "C0"}
    labels = {"baseline": "Without BN", "batchnorm": "With BN"}
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        steps = [r["step"] for r in mine]
        axes[0].plot(
            steps,
            [r["test_accuracy"] for r in mine],
            color=colors[name],
            label=labels[name],
        )
    late = [r["test_accuracy"] for r in rows if r["step"] >= rows[-1]["step"] / 10]
    axes[0].set_ylim(min(0.85, min(late) - 0.01), 1.0)
    axes[0].set_title("(a) test accuracy")
    axes[0].legend(loc="lower right")
    for ax, name, tag in zip(axes[1:], MODELS, "bc", strict=True):
        mine = [r for r in rows if r["model"] == name]
        cols = {k: [r[k] for r in mine] for k in ("p15", "p50", "p85")}
        draw_bands(ax, [r["step"] for r in mine], cols, colors[name], labels[name])
        ax.set_title(f"({tag}) {labels[name]}: sigmoid input p15/p50/p85")
    lo = min(min(r["p15"] for r in rows), -2)
    hi = max(max(r["p85"] for r in rows), 2)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        ax.set_ylim(lo, hi)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(
    steps: int = 50000,
    out: str | os.PathLike = "runs/mnist_sigmoid",
    seed: int = 0,
    learning_rate: float = LEARNING_RATE,
    eval_every: int | None = None,
    unit: int | None = 0,
    verbose: bool = True,
) -> dict:
    """Trains both networks and writes metrics.csv, the figure and results.md.

    Args:
        steps: SGD steps per network (the paper: 50,000).
        out: Output folder (created).
        seed: Seed of the weights and the shuffling.
        learning_rate: SGD learning rate of both networks.
        eval_every: Evaluate test accuracy and record percentiles every that
            many steps (must divide 1000 and `steps`; default: the largest
            such value giving at least 100 evaluations, else 10).
        unit: Which unit of the last hidden layer's sigmoid input to record
            (`None`: pool all 100 units).
        verbose: Print progress and the results table.

    Returns:
        A dict with `rows` (the metrics), `summary` (see `summarize`),
        `seconds` per network, the trained `models` by name, the settings,
        and the paths written.
    """
    eval_every = _check_args(steps, eval_every)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist(flatten=True)
    rows, inference_rows, seconds, models = [], [], {}, {}
    for name in MODELS:
        if verbose:
            print(f"training {name} for {steps} steps ...", flush=True)
        r, inf, seconds[name], models[name] = train_one(
            name, data, steps, eval_every, seed, learning_rate, unit
        )
        rows += r
        inference_rows += inf
        if verbose:
            print(
                f"  {name}: test accuracy {r[-1]['test_accuracy']:.4f} "
                f"({seconds[name]:.0f} s)",
                flush=True,
            )
    columns = ["step", "model", "test_accuracy", "p15", "p50", "p85"]
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    results = {
        "rows": rows,
        "summary": summarize(rows, inference_rows),
        "inference_rows": inference_rows,
        "seconds": seconds,
        "models": models,
        "steps": steps,
        "seed": seed,
        "learning_rate": learning_rate,
        "eval_every": eval_every,
        "stable_after": STABLE_AFTER,
        "backend": keras.backend.backend(),
        "recorded": f"{RECORDED_LAYER}"
        + (" (all units)" if unit is None else f" (unit {unit})"),
    }
    results["metrics_csv"] = str(out / "metrics.csv")
    results["figure"] = plot(rows, out / "mnist_sigmoid.png")
    table = results_markdown(results)
    (out / "results.md").write_text(table)
    results["results_md"] = str(out / "results.md")
    if verbose:
        print(table)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50000)
    parser.add_argument("--out", default="runs/mnist_sigmoid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument(
        "--unit", default="0", help="unit of sigmoid3's input to record, or 'all'"
    )
    args = parser.parse_args(argv)
    unit = None if args.unit == "all" else int(args.unit)
    return run(args.steps, args.out, args.seed, args.lr, args.eval_every, unit)


if __name__ == "__main__":
    main()
