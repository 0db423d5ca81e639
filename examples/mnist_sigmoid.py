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

if __package__ in (None, ""):  # a script: import sibling examples relatively
    import importlib.util

    _here = Path(__file__).resolve().parent
    sys.path.insert(0, str(_here.parent))  # keras_bn of a source checkout
    _spec = importlib.util.spec_from_file_location(
        "keras_bn_examples",
        _here / "__init__.py",
        submodule_search_locations=[str(_here)],
    )
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    __package__ = _spec.name  # not `examples`: tf2onnx installs one

import keras
import numpy as np

import keras_bn
from keras_bn.callbacks import ActivationStatistics

from .mnist import compile_options, load_mnist

MODELS = ("baseline", "batchnorm")
BATCH_SIZE = 60
BATCHES_PER_EPOCH = 60000 // BATCH_SIZE  # 1000: one pass over the training set
LEARNING_RATE = 0.5
INIT_STDDEV = 0.1
PROBE_SIZE = 1000
STABLE_AFTER = 1000  # the stability figures use records after this step
PERCENTILES = ("p15", "p50", "p85")
RECORDED_LAYER = "sigmoid3"
NORMALIZED = ("xhat_p15", "xhat_p50", "xhat_p85", "gamma", "beta")
COLUMNS = ("step", "model", "test_accuracy", *PERCENTILES, *NORMALIZED)


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


def _percentiles(values) -> list[float]:
    return [float(v) for v in np.percentile(values, [15, 50, 85])]


class NormalizedInput(keras.callbacks.Callback):
    """Records BN's normalized value x-hat, gamma and beta of the recorded sigmoid.

    At the start of training and at the end of every epoch (the script's
    epochs are `eval_every` steps, and all backends have written the trained
    weights back to the model there), computes `z = dense3(probe)`, normalizes
    it over the probe batch as `bn3` does in training mode,
    `x_hat = (z - mean(z)) / sqrt(var(z) + epsilon)`, and records the
    {15, 50, 85}th percentiles of `x_hat` of unit `unit` (all units pooled if
    `None`) with that unit's `gamma` and `beta` (means over units if pooled).
    The sigmoid input the paper plots is `gamma * x_hat + beta`.
    """

    def __init__(self, probe, unit, layer: int = 3):
        super().__init__()
        self.probe, self.unit, self.layer = probe, unit, layer
        self.rows = []

    def _record(self, step):
        model = self.model
        bn = model.get_layer(f"bn{self.layer}")
        if not hasattr(self, "_dense"):
            self._dense = keras.Model(
                model.input, model.get_layer(f"dense{self.layer}").output
            )
        # Training mode, as the percentile probe: bn1 and bn2 normalize with the
        # probe batch's statistics. That call updates their moving averages,
        # so those are saved and restored (the probe must not change training).
        saved = [v.numpy() for v in model.non_trainable_variables]
        z = self._dense(self.probe, training=True)
        for v, value in zip(model.non_trainable_variables, saved, strict=True):
            v.assign(value)
        z = keras.ops.convert_to_numpy(z).astype("float64")
        xhat = (z - z.mean(0)) / np.sqrt(z.var(0) + bn.epsilon)
        gamma = keras.ops.convert_to_numpy(bn.gamma)
        beta = keras.ops.convert_to_numpy(bn.beta)
        if self.unit is None:
            xhat, gamma, beta = xhat.ravel(), gamma.mean(), beta.mean()
        else:
            xhat, gamma, beta = xhat[:, self.unit], gamma[self.unit], beta[self.unit]
        values = [*_percentiles(xhat), float(gamma), float(beta)]
        self.rows.append({"step": step, **dict(zip(NORMALIZED, values, strict=True))})

    def on_train_begin(self, logs=None):
        self.rows = []
        self._record(0)

    def on_epoch_end(self, epoch, logs=None):
        self._record((epoch + 1) * self.params["steps"])


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
        **compile_options(steps_per_execution=math.gcd(eval_every, 100)),
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
    callbacks = [stats, inference_stats]
    if name == "batchnorm":
        normalized = NormalizedInput(x_test[:PROBE_SIZE], unit)
        callbacks.append(normalized)
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
        callbacks=callbacks,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    accuracy = [acc0, *fit.history["val_accuracy"]]
    recorded = stats.history.as_dict()
    by_step = {s: i for i, s in enumerate(recorded["step"])}
    xhat = {r["step"]: r for r in normalized.rows} if name == "batchnorm" else {}
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
                **{k: xhat[step][k] if xhat else None for k in NORMALIZED},
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


def _train_pair(data, steps, eval_every, seed, learning_rate, unit, verbose):
    """Trains both networks with one seed."""
    rows, inference_rows, seconds, models = [], [], {}, {}
    for name in MODELS:
        if verbose:
            print(f"seed {seed}: training {name} for {steps} steps ...", flush=True)
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
    return rows, inference_rows, seconds, models


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
    rows, inference_rows, seconds, models = _train_pair(
        data, steps, eval_every, seed, learning_rate, unit, verbose
    )
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
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


SEED_STATS = (
    ("final_accuracy", "final test accuracy", "{:.4f}"),
    ("best_accuracy", "best test accuracy", "{:.4f}"),
    (
        "p50_spread",
        "spread (max-min) of the sigmoid input's p50 after step 1000",
        "{:.3f}",
    ),
    ("band_spread", "spread (max-min) of its p85-p15 after step 1000", "{:.3f}"),
    ("band_first", "p85-p15 of the sigmoid input at step 0", "{:.3f}"),
    ("band_last", "p85-p15 of the sigmoid input at the last step", "{:.3f}"),
    (
        "xhat_band_spread",
        "spread (max-min) of x-hat's p85-p15 after step 1000",
        "{:.3f}",
    ),
    ("xhat_band_last", "p85-p15 of x-hat at the last step", "{:.3f}"),
    (
        "gamma_last",
        "gamma of the recorded unit at the last step (1 at step 0)",
        "{:.3f}",
    ),
)


def seed_summary(rows: list[dict], stable_after: int = STABLE_AFTER) -> dict:
    """Per-seed figures: `summarize`'s, plus band widths, x-hat and gamma."""
    out = summarize(rows, stable_after=stable_after)
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        out[name]["band_first"] = mine[0]["p85"] - mine[0]["p15"]
        out[name]["band_last"] = mine[-1]["p85"] - mine[-1]["p15"]
    bn = [r for r in rows if r["model"] == "batchnorm"]
    late = [r for r in bn if r["step"] >= stable_after] or bn
    width = [r["xhat_p85"] - r["xhat_p15"] for r in late]
    out["batchnorm"]["xhat_band_spread"] = max(width) - min(width)
    out["batchnorm"]["xhat_band_last"] = bn[-1]["xhat_p85"] - bn[-1]["xhat_p15"]
    out["batchnorm"]["gamma_last"] = bn[-1]["gamma"]
    return out


def mean_sd(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of `values`."""
    values = np.asarray([v for v in values if v is not None], dtype="float64")
    if values.size == 0:
        return math.nan, math.nan, 0
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), sd, int(values.size)


def aggregate(summaries: dict[int, dict]) -> dict:
    """Mean and sd over seeds of every `SEED_STATS` figure and of the reach step."""
    out = {}
    for name in MODELS:
        out[name] = {
            key: mean_sd(s[name].get(key) for s in summaries.values())
            for key, _, _ in SEED_STATS
        }
    reach = [s["bn_reaches_baseline_final_at"] for s in summaries.values()]
    out["bn_reaches_baseline_final_at"] = mean_sd(reach)
    out["never"] = sum(r is None for r in reach)
    return out


def _fmt(stat, fmt) -> str:
    mean, sd, n = stat
    if n == 0:
        return "n/a"
    return f"{fmt.format(mean)} ± {fmt.format(sd)}"


def seeds_markdown(results: dict) -> str:
    """Formats `run_seeds`'s results: mean ± sd over seeds and a per-seed table."""
    agg, seeds = results["aggregate"], results["seeds"]
    lines = [
        f"MNIST, 784-100-100-100-10 sigmoid MLP, SGD lr={results['learning_rate']}, "
        f"batch {BATCH_SIZE}, {results['steps']} steps, seeds {seeds}, backend "
        f"{results['backend']}, test accuracy every {results['eval_every']} steps "
        f"on the 10,000 test images; recorded: {results['recorded']}. "
        f"Mean ± sample sd over the {len(seeds)} seeds.",
        "",
        "| | baseline | with BN |",
        "|---|---|---|",
    ]
    for key, label, fmt in SEED_STATS:
        base, bn = agg["baseline"][key], agg["batchnorm"][key]
        lines.append(f"| {label} | {_fmt(base, fmt)} | {_fmt(bn, fmt)} |")
    reach = agg["bn_reaches_baseline_final_at"]
    lines += [
        "",
        f"BN net first reaches the baseline's final accuracy at step "
        f"{_fmt(reach, '{:.0f}')} (of {results['steps']}; never in "
        f"{agg['never']} of {len(seeds)} seeds).",
        "",
        "Per seed:",
        "",
        "| seed | final acc. baseline / BN | BN reaches baseline's final at "
        "| p50 spread baseline / BN | p85-p15 spread baseline / BN "
        "| x-hat p85-p15 spread | p85-p15 at end baseline / BN / x-hat "
        "| gamma at end | fit s baseline / BN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        s, t = results["summaries"][seed], results["seconds"][seed]
        b, n = s["baseline"], s["batchnorm"]
        lines.append(
            f"| {seed} | {b['final_accuracy']:.4f} / {n['final_accuracy']:.4f} "
            f"| {s['bn_reaches_baseline_final_at']} "
            f"| {b['p50_spread']:.3f} / {n['p50_spread']:.3f} "
            f"| {b['band_spread']:.3f} / {n['band_spread']:.3f} "
            f"| {n['xhat_band_spread']:.3f} "
            f"| {b['band_last']:.3f} / {n['band_last']:.3f} "
            f"/ {n['xhat_band_last']:.3f} "
            f"| {n['gamma_last']:.3f} | {t['baseline']:.0f} / {t['batchnorm']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _seed_band(ax, rows, seeds, keys, color, label):
    """Mean over seeds of each column in `keys` (a line) and its min-max band."""
    steps = sorted({r["step"] for r in rows})
    for key in keys:
        table = np.array(
            [[r[key] for r in rows if r["seed"] == seed] for seed in seeds], "float64"
        )
        ls = "-" if key.endswith(("p50", "accuracy", "width")) else "--"
        ax.fill_between(steps, table.min(0), table.max(0), color=color, alpha=0.2, lw=0)
        ax.plot(
            steps,
            table.mean(0),
            color=color,
            lw=1.2,
            ls=ls,
            label=label if key == keys[len(keys) // 2] else None,
        )


def plot_seeds(rows: list[dict], seeds, path) -> str:
    """Figure 1 over seeds: means (lines) and min-max over seeds (shaded)."""
    from keras_bn.callbacks._plot import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colors = {"baseline": "C1", "batchnorm": "C0"}
    labels = {"baseline": "Without BN", "batchnorm": "With BN"}
    by = {name: [r for r in rows if r["model"] == name] for name in MODELS}
    for r in rows:
        r["width"] = r["p85"] - r["p15"]
        if r["xhat_p15"] is not None:
            r["xhat_width"] = r["xhat_p85"] - r["xhat_p15"]
    for name in MODELS:
        _seed_band(
            axes[0, 0], by[name], seeds, ["test_accuracy"], colors[name], labels[name]
        )
    late = [r["test_accuracy"] for r in rows if r["step"] >= rows[-1]["step"] / 10]
    axes[0, 0].set_ylim(min(0.85, min(late) - 0.01), 1.0)
    axes[0, 0].set_title("(a) test accuracy")
    axes[0, 0].legend(loc="lower right")
    for ax, name, tag in zip(axes[0, 1:], MODELS, "bc", strict=True):
        _seed_band(ax, by[name], seeds, list(PERCENTILES), colors[name], labels[name])
        ax.set_title(f"({tag}) {labels[name]}: sigmoid input p15/p50/p85")
    lo = min(min(r["p15"] for r in rows), -2)
    hi = max(max(r["p85"] for r in rows), 2)
    for ax in axes[0, 1:]:
        ax.set_ylim(lo, hi)
    ax = axes[1, 0]
    _seed_band(ax, by["batchnorm"], seeds, list(NORMALIZED[:3]), "C2", "With BN")
    ax.set_ylim(lo, hi)
    ax.set_title("(d) With BN: normalized x-hat p15/p50/p85 (before gamma, beta)")
    ax = axes[1, 1]
    _seed_band(ax, by["batchnorm"], seeds, ["gamma"], "C0", "gamma")
    _seed_band(ax, by["batchnorm"], seeds, ["beta"], "C3", "beta")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(loc="best")
    ax.set_title("(e) With BN: gamma and beta of the recorded unit")
    ax = axes[1, 2]
    for name in MODELS:
        _seed_band(
            ax,
            by[name],
            seeds,
            ["width"],
            colors[name],
            f"{labels[name]}: sigmoid input",
        )
    _seed_band(ax, by["batchnorm"], seeds, ["xhat_width"], "C2", "With BN: x-hat")
    ax.legend(loc="best")
    ax.set_title("(f) band width p85-p15")
    for r in rows:
        r.pop("width", None)
        r.pop("xhat_width", None)
    for ax in axes.ravel():
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Figure 1 over seeds {list(seeds)}: lines = mean, shaded = min-max over seeds"
    )
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_seeds(
    seeds=(0, 1, 2),
    steps: int = 50000,
    out: str | os.PathLike = "runs/mnist_sigmoid",
    learning_rate: float = LEARNING_RATE,
    eval_every: int | None = None,
    unit: int | None = 0,
    verbose: bool = True,
) -> dict:
    """Trains both networks for every seed; writes the figure and tables over seeds.

    Writes `metrics.csv` (the `COLUMNS` with a leading `seed`), `mnist_sigmoid.png`
    (`plot_seeds`) and `results.md` (`seeds_markdown`) into `out`.

    Returns:
        A dict with `rows`, per-seed `summaries` (`seed_summary`), `aggregate`
        (mean, sd, n of each figure), `seconds[seed][model]`, the settings and
        the paths written.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"`seeds` must be distinct integers, at least one. Received: seeds={seeds}"
        )
    eval_every = _check_args(steps, eval_every)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist(flatten=True)
    rows, summaries, seconds = [], {}, {}
    for seed in seeds:
        mine, _, seconds[seed], _ = _train_pair(
            data, steps, eval_every, seed, learning_rate, unit, verbose
        )
        summaries[seed] = seed_summary(mine)
        rows += [{"seed": seed, **r} for r in mine]
        with open(out / "metrics.csv", "w", newline="") as f:  # after every seed
            writer = csv.DictWriter(f, fieldnames=["seed", *COLUMNS])
            writer.writeheader()
            writer.writerows(rows)
    results = {
        "rows": rows,
        "summaries": summaries,
        "aggregate": aggregate(summaries),
        "seconds": seconds,
        "seeds": seeds,
        "steps": steps,
        "learning_rate": learning_rate,
        "eval_every": eval_every,
        "backend": keras.backend.backend(),
        "recorded": f"{RECORDED_LAYER}"
        + (" (all units)" if unit is None else f" (unit {unit})"),
        "metrics_csv": str(out / "metrics.csv"),
    }
    results["figure"] = plot_seeds(rows, seeds, out / "mnist_sigmoid.png")
    table = seeds_markdown(results)
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
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="run these seeds; figure over seeds"
    )
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument(
        "--unit", default="0", help="unit of sigmoid3's input to record, or 'all'"
    )
    args = parser.parse_args(argv)
    unit = None if args.unit == "all" else int(args.unit)
    if args.seeds:
        return run_seeds(
            args.seeds, args.steps, args.out, args.lr, args.eval_every, unit
        )
    return run(args.steps, args.out, args.seed, args.lr, args.eval_every, unit)


if __name__ == "__main__":
    main()
