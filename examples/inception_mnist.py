"""The paper's Inception experiment (Table 2), scaled down to MNIST.

Trains the small Inception network of `examples/inception_model.py` on real
MNIST in the paper's configurations, all with the same data order and seed:

* `Baseline`: no BN, ReLU, the baseline learning rate (chosen by `--sweep`).
* `BN`: BN after every convolution, same learning rate.
* `BN-x5`, `BN-x30`: BN, learning rate x5 / x30, and the paper's section
  4.2.1 changes: no dropout, L2 reduced 5x, learning-rate decay 6x faster.
* `BN-x5-Sigmoid`: as `BN-x5` with sigmoid units.
* `Baseline-Sigmoid`: as `Baseline` with sigmoid units.

Network (`build_inception`, width 16): 3x3 stem conv, 2x2 max pool, an
Inception module (16 filters per branch), 2x2 max pool, a module with 32 per
branch, global average pooling, dropout 0.4 (not in the accelerated
configurations), softmax. Batch size 64. Optimizer: SGD with (heavy-ball)
momentum 0.9 and an exponentially decaying learning rate,
`lr * 0.5 ** (step / steps)` for the plain configurations and six times faster
(`lr * 0.5 ** (6 * step / steps)`) for the accelerated ones; L2 5e-4 on every
kernel (1e-4 accelerated). BN layers use moving-average momentum 0.9. Every
`eval_every` steps the model is evaluated on a fixed set of test images (the
first `eval_size` of the 10,000); a configuration's `steps_to_baseline` is the
first evaluated step at which it reaches the `Baseline`'s best test accuracy
("never" if it does not).

Usage (the committed run in docs/inception_mnist.md):

    python examples/inception_mnist.py --sweep 0.01 0.03 0.1 --steps 2000 \
        --out runs/inception_sweep
    python examples/inception_mnist.py --steps 2000 --out runs/inception

Writes `OUT/results.csv` (config, lr, steps_to_baseline, best_accuracy),
`OUT/curves.csv` (config, step, accuracy, train_loss, elapsed_s) and
`OUT/curves.png`; with `--sweep`, `OUT/sweep.csv` (lr, best_accuracy,
best_step, final_accuracy).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from examples.inception_model import build_inception  # noqa: E402
from examples.mnist import load_mnist  # noqa: E402

BASELINE_LR = 0.03  # best of the --sweep recorded in docs/inception_mnist.md
MOMENTUM = 0.9
DROPOUT = 0.4
L2 = 5e-4
BATCH_SIZE = 64
EVAL_EVERY = 100
EVAL_SIZE = 5000
WIDTH = 16
RESULT_COLUMNS = ("config", "lr", "steps_to_baseline", "best_accuracy")
CURVE_COLUMNS = ("config", "step", "accuracy", "train_loss", "elapsed_s")
SWEEP_COLUMNS = ("lr", "best_accuracy", "best_step", "final_accuracy")


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration of the experiment.

    Args:
        batch_norm: BN after every convolution.
        activation: `"relu"` or `"sigmoid"`.
        lr_multiplier: Learning rate as a multiple of the baseline's.
        accelerated: Apply section 4.2.1: no dropout, L2 / 5, decay 6x faster.
    """

    batch_norm: bool
    activation: str
    lr_multiplier: float
    accelerated: bool


CONFIGS = {
    "Baseline": Config(False, "relu", 1.0, False),
    "BN": Config(True, "relu", 1.0, False),
    "BN-x5": Config(True, "relu", 5.0, True),
    "BN-x30": Config(True, "relu", 30.0, True),
    "BN-x5-Sigmoid": Config(True, "sigmoid", 5.0, True),
    "Baseline-Sigmoid": Config(False, "sigmoid", 1.0, False),
}


def check_configs(configs: Sequence[str] | None) -> list[str]:
    """Validates configuration names; `None` means all, in the canonical order."""
    if configs is None:
        return list(CONFIGS)
    if isinstance(configs, str):
        configs = [configs]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise ValueError(
            f"Argument `configs` must name configurations from {list(CONFIGS)}. "
            f"Received: configs={list(configs)!r} (unknown: {unknown!r})"
        )
    return list(dict.fromkeys(configs))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(
            f"Argument `{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"Argument `{name}` must be a number. Received: {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"Argument `{name}` must be a finite number > 0. Received: {name}={value!r}"
        )
    return float(value)


def _load_data(train_size: int | None, eval_size: int):
    (x_train, y_train), (x_test, y_test) = load_mnist(flatten=False)
    if train_size is not None:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    return (x_train, y_train), (x_test[:eval_size], y_test[:eval_size])


def _data_order(n: int, total: int, seed: int) -> np.ndarray:
    """Training-example indices for `total` draws: concatenated permutations."""
    rng = np.random.default_rng(seed)
    epochs = -(-total // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:total]


def train_config(
    name: str,
    data,
    *,
    steps: int,
    baseline_lr: float,
    seed: int,
    width: int,
    batch_size: int,
    eval_every: int,
    modules: int = 2,
    verbose: bool = True,
) -> list[dict]:
    """Trains one configuration; returns its accuracy curve.

    Returns:
        A list of `{"step", "accuracy", "train_loss", "elapsed_s"}` dicts, one
        per evaluation (every `eval_every` steps and at the last step). Stops
        early if the training loss becomes non-finite (diverged).
    """
    cfg = CONFIGS[check_configs([name])[0]]
    (x_train, y_train), (x_eval, y_eval) = data
    keras.utils.set_random_seed(seed)
    model = build_inception(
        width,
        modules=modules,
        batch_norm=cfg.batch_norm,
        activation=cfg.activation,
        dropout=0.0 if cfg.accelerated else DROPOUT,
        l2=L2 / 5 if cfg.accelerated else L2,
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(
        baseline_lr * cfg.lr_multiplier,
        decay_steps=steps / (6.0 if cfg.accelerated else 1.0),
        decay_rate=0.5,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=MOMENTUM),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    order = _data_order(len(x_train), steps * batch_size, seed)
    curve, done, start = [], 0, time.perf_counter()
    while done < steps:
        chunk = min(eval_every, steps - done)
        idx = order[done * batch_size : (done + chunk) * batch_size]
        hist = model.fit(
            x_train[idx],
            y_train[idx],
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        done += chunk
        loss = float(hist.history["loss"][-1])
        _, acc = model.evaluate(x_eval, y_eval, batch_size=500, verbose=0)
        point = dict(
            step=done,
            accuracy=float(acc),
            train_loss=loss,
            elapsed_s=round(time.perf_counter() - start, 2),
        )
        curve.append(point)
        if verbose:
            print(
                f"{name:>16s} step {done:6d}  acc {acc:.4f}  loss {loss:.4f}  "
                f"{point['elapsed_s']:7.1f}s",
                flush=True,
            )
        if not math.isfinite(loss):
            if verbose:
                print(f"{name:>16s} diverged (non-finite loss); stopping it.")
            break
    return curve


def steps_to_reach(curve: list[dict], target: float | None) -> int | str:
    """First evaluated step with accuracy >= `target`; "never"; "n/a" if no target."""
    if target is None:
        return "n/a"
    for point in curve:
        if point["accuracy"] >= target:
            return point["step"]
    return "never"


def summarize(
    curves: dict[str, list[dict]], baseline_lr: float, target: float | None = None
) -> tuple[list[dict], float | None]:
    """Turns accuracy curves into `results.csv` rows.

    Args:
        curves: Configuration name -> curve, as returned by `train_config`.
        baseline_lr: The baseline's learning rate.
        target: Accuracy that defines `steps_to_baseline`; `None` uses the
            `Baseline`'s best accuracy if `curves` holds it (else "n/a").

    Returns:
        `(rows, target)`: one dict per configuration with the `RESULT_COLUMNS`
        keys, and the target accuracy used.
    """
    if target is None and "Baseline" in curves:
        target = max(p["accuracy"] for p in curves["Baseline"])
    rows = [
        dict(
            config=name,
            lr=float(f"{baseline_lr * CONFIGS[name].lr_multiplier:.6g}"),
            steps_to_baseline=steps_to_reach(curve, target),
            best_accuracy=round(max(p["accuracy"] for p in curve), 4),
        )
        for name, curve in curves.items()
    ]
    return rows, target


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(curves: dict[str, list[dict]], target: float | None, path) -> None:
    """Saves test accuracy vs training step for every configuration as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "Plotting needs matplotlib: pip install matplotlib"
        ) from e
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for name, curve in curves.items():
            steps = [p["step"] for p in curve]
            ax.plot(steps, [p["accuracy"] for p in curve], label=name, lw=1.4)
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8, label="Baseline best")
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if zoom:
            low = 0.95 if target is None else min(0.97, target - 0.01)
            ax.set_ylim(low, 1.0)
            ax.set_title("zoom near the baseline's best")
        else:
            ax.set_ylim(0, 1.0)
            ax.set_title("Small Inception on MNIST: test accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    steps: int,
    out,
    configs: Sequence[str] | None = None,
    *,
    seed: int = 0,
    baseline_lr: float = BASELINE_LR,
    width: int = WIDTH,
    modules: int = 2,
    batch_size: int = BATCH_SIZE,
    eval_every: int = EVAL_EVERY,
    eval_size: int = EVAL_SIZE,
    train_size: int | None = None,
    target: float | None = None,
    plot: bool = True,
    verbose: bool = True,
) -> list[dict]:
    """Runs the configurations and writes results, curves and a figure to `out`.

    Args:
        steps: Training steps per configuration.
        out: Output directory (created if needed).
        configs: Configuration names from `CONFIGS`; `None` runs all of them.
        seed: Seed of the data order and the weight initialization (shared by
            every configuration).
        baseline_lr: The baseline's initial learning rate.
        width: Filters per branch of the first Inception module.
        modules: Number of Inception modules (2 in the experiment).
        batch_size: Training mini-batch size.
        eval_every: Evaluate every this many steps.
        eval_size: Evaluate on the first `eval_size` MNIST test images.
        train_size: Train on the first `train_size` training images (`None`:
            all 60,000).
        target: Accuracy that defines `steps_to_baseline`; `None` uses the
            `Baseline`'s best accuracy when `Baseline` runs, else "n/a".
        plot: Write `curves.png` (needs matplotlib).
        verbose: Print progress.

    Returns:
        One dict per configuration with the `results.csv` columns.

    Example:

    >>> rows = run(50, "runs/tiny", ["BN"], width=4, train_size=512,
    ...            eval_every=25, eval_size=500)
    """
    names = check_configs(configs)
    steps = _positive_int("steps", steps)
    batch_size = _positive_int("batch_size", batch_size)
    eval_every = _positive_int("eval_every", eval_every)
    eval_size = _positive_int("eval_size", eval_size)
    baseline_lr = _positive_float("baseline_lr", baseline_lr)
    if train_size is not None:
        train_size = _positive_int("train_size", train_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(train_size, eval_size)
    curves = {}
    for name in names:
        curves[name] = train_config(
            name,
            data,
            steps=steps,
            baseline_lr=baseline_lr,
            seed=seed,
            width=width,
            modules=modules,
            batch_size=batch_size,
            eval_every=eval_every,
            verbose=verbose,
        )
    rows, target = summarize(curves, baseline_lr, target)
    _write_csv(out / "results.csv", RESULT_COLUMNS, rows)
    _write_csv(
        out / "curves.csv",
        CURVE_COLUMNS,
        [dict(config=n, **p) for n, curve in curves.items() for p in curve],
    )
    if plot:
        plot_curves(curves, target, out / "curves.png")
    return rows


def sweep(
    lrs: Sequence[float],
    steps: int,
    out,
    *,
    seed: int = 0,
    width: int = WIDTH,
    modules: int = 2,
    batch_size: int = BATCH_SIZE,
    eval_every: int = EVAL_EVERY,
    eval_size: int = EVAL_SIZE,
    train_size: int | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Trains `Baseline` at each learning rate; writes `out/sweep.csv`.

    Returns:
        One dict per learning rate with the `sweep.csv` columns.
    """
    lrs = [_positive_float("lrs", lr) for lr in lrs]
    if not lrs:
        raise ValueError("Argument `lrs` must hold at least one learning rate.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(train_size, _positive_int("eval_size", eval_size))
    rows = []
    for lr in lrs:
        curve = train_config(
            "Baseline",
            data,
            steps=_positive_int("steps", steps),
            baseline_lr=lr,
            seed=seed,
            width=width,
            modules=modules,
            batch_size=batch_size,
            eval_every=eval_every,
            verbose=verbose,
        )
        best = max(curve, key=lambda p: p["accuracy"])
        rows.append(
            dict(
                lr=lr,
                best_accuracy=round(best["accuracy"], 4),
                best_step=best["step"],
                final_accuracy=round(curve[-1]["accuracy"], 4),
            )
        )
    _write_csv(out / "sweep.csv", SWEEP_COLUMNS, rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=BASELINE_LR, help="baseline lr")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--modules", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    parser.add_argument("--eval-size", type=int, default=EVAL_SIZE)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--sweep",
        nargs="+",
        type=float,
        metavar="LR",
        help="instead of the configurations, sweep the Baseline's learning rate",
    )
    args = parser.parse_args(argv)
    common = dict(
        seed=args.seed,
        width=args.width,
        modules=args.modules,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        train_size=args.train_size,
    )
    if args.sweep:
        rows = sweep(args.sweep, args.steps, args.out, **common)
        best = max(rows, key=lambda r: r["best_accuracy"])
        print(f"best baseline lr: {best['lr']} (accuracy {best['best_accuracy']})")
    else:
        rows = run(
            args.steps,
            args.out,
            args.configs,
            baseline_lr=args.lr,
            target=args.target,
            plot=not args.no_plot,
            **common,
        )
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
