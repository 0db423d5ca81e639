"""The paper's Inception experiment (Table 2) and its section 4.2.1 ablation, on MNIST.

Trains the small Inception network of `examples/inception_model.py` on real
MNIST in the paper's configurations (`CONFIGS`) and in the ablation arms
(`ABLATIONS`), over several seeds, the way the paper measured Table 2:

* Every run is trained until its test accuracy **plateaus** or its step
  **cap**: it stops at the first evaluation where the best accuracy of the
  last `window` steps is no more than one standard error above the best
  accuracy before them (`plateaued`). The standard error is that of an
  accuracy measured on `eval_size` test images, `sqrt(p (1 - p) / eval_size)`.
* Each configuration's learning-rate schedule is stretched to its own
  budget: `lr * 0.5 ** (step / budget)`, where the budget is the cap
  (`cap` steps; `cap / 6` for configurations with the paper's 6x faster
  decay, which are capped at that budget too).
* The Baseline's learning rate is chosen by a sweep of Baseline runs made
  the same way (to plateau) on the first seed.
* A configuration's `steps_to_baseline` (per seed) is the first evaluated
  step at which its test accuracy reaches that seed's Baseline's best.

Configurations: `Baseline` (no BN, ReLU, dropout 0.4, L2 5e-4, shuffled
every epoch), `BN` (BN after every convolution, otherwise as Baseline),
`BN-x5`/`BN-x30` (BN, lr x5/x30 and the section 4.2.1 changes: no dropout,
L2 / 5, 6x faster decay), `BN-x5-Sigmoid`, `Baseline-Sigmoid`. Ablation
(from `BN-x5`, one change switched back at a time): `BN-x5+dropout`,
`BN-x5+L2`, `BN-x5-slow-decay`, `BN-x5-same-batches` (one permutation of the
training set drawn once and repeated every epoch, so every mini-batch always
holds the same examples), and `BN-lr-x5-only` (BN with only the learning rate
raised).

Usage (the full protocol; docs/inception_mnist.md gives what was run):

    python examples/inception_mnist.py --out runs/inception --seeds 0 1 2 \
        --sweep 0.01 0.03 0.1 --ablation

The protocol is resumable: runs already recorded in `OUT/runs.csv` are
skipped. After every run it rewrites `OUT/runs.csv` (one row per run),
`OUT/curves.csv` (every evaluation), `OUT/results.md` (sweep, Table 2 and
ablation tables, mean ± sd over seeds) and `OUT/curves.png`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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

import keras  # noqa: E402

from .inception_model import build_inception  # noqa: E402
from .mnist import compile_options, load_mnist  # noqa: E402

BASELINE_LR = 0.03  # default when no --sweep is given
MOMENTUM = 0.9
DROPOUT = 0.4
L2 = 5e-4
L2_REDUCTION = 5.0  # section 4.2.1: L2 reduced by a factor of 5
DECAY_SPEEDUP = 6  # section 4.2.1: learning-rate decay 6x faster
BATCH_SIZE = 64
EVAL_EVERY = 250
EVAL_SIZE = 5000
WIDTH = 16
CAP = 12000
WINDOW = 3000
SMOOTH = 4  # evaluations averaged (trailing) before any comparison
RUN_COLUMNS = (
    "phase",
    "config",
    "seed",
    "lr",
    "budget",
    "steps",
    "stop",
    "best_accuracy",
    "best_step",
    "best_single",
    "smooth",
    "wall_s",
)
CURVE_COLUMNS = ("config", "seed", "lr", "step", "accuracy", "train_loss", "elapsed_s")


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration of the experiment.

    Args:
        batch_norm: BN after every convolution.
        activation: `"relu"` or `"sigmoid"`.
        lr_multiplier: Learning rate as a multiple of the baseline's.
        dropout: Dropout 0.4 before the classifier (else none).
        reduced_l2: L2 reduced 5x (`L2 / 5`, else `L2`).
        fast_decay: Budget (cap and decay length) 6x shorter.
        reshuffle: Draw a new permutation of the training set every epoch
            (else one permutation, repeated: the same mini-batches every epoch).
    """

    batch_norm: bool
    activation: str = "relu"
    lr_multiplier: float = 1.0
    dropout: bool = True
    reduced_l2: bool = False
    fast_decay: bool = False
    reshuffle: bool = True


_X5 = Config(True, "relu", 5.0, dropout=False, reduced_l2=True, fast_decay=True)
CONFIGS = {
    "Baseline": Config(False),
    "BN": Config(True),
    "BN-x5": _X5,
    "BN-x30": dataclasses.replace(_X5, lr_multiplier=30.0),
    "BN-x5-Sigmoid": dataclasses.replace(_X5, activation="sigmoid"),
    "Baseline-Sigmoid": Config(False, "sigmoid"),
}
ABLATIONS = {
    "BN-x5+dropout": dataclasses.replace(_X5, dropout=True),
    "BN-x5+L2": dataclasses.replace(_X5, reduced_l2=False),
    "BN-x5-slow-decay": dataclasses.replace(_X5, fast_decay=False),
    "BN-x5-same-batches": dataclasses.replace(_X5, reshuffle=False),
    "BN-lr-x5-only": Config(True, lr_multiplier=5.0),
}
ALL_CONFIGS = {**CONFIGS, **ABLATIONS}
# Table 2 of the paper (steps to Inception's best 72.2%, max accuracy).
PAPER = {
    "Baseline": ("0.0015", "31.0e6", "72.2%"),
    "BN": ("0.0015", "13.3e6", "72.7%"),
    "BN-x5": ("0.0075", "2.1e6", "73.0%"),
    "BN-x30": ("0.045", "2.7e6", "74.8%"),
    "BN-x5-Sigmoid": ("0.0075", "never", "69.8%"),
    "Baseline-Sigmoid": ("0.0015", "never", "chance"),
}


def check_configs(configs: Sequence[str] | None, known=ALL_CONFIGS) -> list[str]:
    """Validates configuration names; `None` means all of `known`, in order."""
    if configs is None:
        return list(known)
    if isinstance(configs, str):
        configs = [configs]
    unknown = [c for c in configs if c not in known]
    if unknown or not configs:
        raise ValueError(
            f"Argument `configs` must name configurations from {list(known)}. "
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


def budget(config: Config, cap: int) -> int:
    """Step cap of a configuration, which is also its decay length."""
    return max(1, cap // DECAY_SPEEDUP) if config.fast_decay else cap


def config_lr(name: str, baseline_lr: float) -> float:
    """A configuration's initial learning rate (6 significant digits)."""
    return float(f"{baseline_lr * ALL_CONFIGS[name].lr_multiplier:.6g}")


def learning_rate(config: Config, baseline_lr: float, cap: int, step):
    """The stretched schedule `lr * 0.5 ** (step / budget)` at `step`."""
    return baseline_lr * config.lr_multiplier * 0.5 ** (step / budget(config, cap))


def make_schedule(config: Config, baseline_lr: float, cap: int):
    """`learning_rate` as a Keras schedule (exponential decay over the budget)."""
    return keras.optimizers.schedules.ExponentialDecay(
        baseline_lr * config.lr_multiplier,
        decay_steps=budget(config, cap),
        decay_rate=0.5,
    )


def standard_error(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on `n` independent examples."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


def smoothed(curve: list[dict], smooth: int = 1) -> list[dict]:
    """The curve with each accuracy replaced by the trailing mean of `smooth` evals.

    The first `smooth - 1` points average what exists so far. With `smooth=1`
    the curve is returned unchanged. Smoothing removes the step-to-step jitter
    of training (1-7 points for a Baseline at a high learning rate) that the
    test set's standard error does not cover, so that a single lucky
    evaluation neither sets a target nor holds off a plateau.
    """
    smooth = _positive_int("smooth", smooth)
    accs = [p["accuracy"] for p in curve]
    return [
        {**p, "accuracy": float(np.mean(accs[max(0, i + 1 - smooth) : i + 1]))}
        for i, p in enumerate(curve)
    ]


def plateaued(curve: list[dict], window: int, eval_size: int, smooth: int = 1) -> bool:
    """True if the last `window` steps brought no improvement above one SE.

    On the `smoothed(curve, smooth)` accuracies, with `last` the step of the
    latest evaluation, `ref` the best accuracy at steps `<= last - window` and
    `recent` the best at steps `> last - window`:
    `recent <= ref + standard_error(ref, eval_size)`. False while fewer than
    `window` steps lie after the first evaluation.
    """
    if not curve:
        return False
    curve = smoothed(curve, smooth)
    last = curve[-1]["step"]
    before = [p["accuracy"] for p in curve if p["step"] <= last - window]
    recent = [p["accuracy"] for p in curve if p["step"] > last - window]
    if not before or not recent:
        return False
    ref = max(before)
    return max(recent) <= ref + standard_error(ref, eval_size)


def _load_data(train_size: int | None, eval_size: int):
    (x_train, y_train), (x_test, y_test) = load_mnist(flatten=False)
    if train_size is not None:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    return (x_train, y_train), (x_test[:eval_size], y_test[:eval_size])


def _data_order(n: int, total: int, seed: int, reshuffle: bool = True) -> np.ndarray:
    """Training-example indices for `total` draws: concatenated permutations.

    `reshuffle=False` repeats the first permutation every epoch (the same
    mini-batches, in the same order, every epoch).
    """
    rng = np.random.default_rng(seed)
    epochs = -(-total // n)
    if not reshuffle:
        return np.tile(rng.permutation(n), epochs)[:total]
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:total]


def train_config(
    name: str,
    data,
    *,
    cap: int,
    baseline_lr: float,
    seed: int,
    width: int = WIDTH,
    modules: int = 2,
    batch_size: int = BATCH_SIZE,
    eval_every: int = EVAL_EVERY,
    window: int = WINDOW,
    smooth: int = SMOOTH,
    verbose: bool = True,
) -> tuple[list[dict], str]:
    """Trains one configuration until it plateaus or reaches its budget.

    Returns:
        `(curve, stop)`: the curve is a list of `{"step", "accuracy",
        "train_loss", "elapsed_s"}` dicts, one per evaluation (every
        `eval_every` steps and at the budget); `stop` is `"plateau"`,
        `"cap"` or `"diverged"` (non-finite training loss).
    """
    cfg = ALL_CONFIGS[check_configs([name])[0]]
    (x_train, y_train), (x_eval, y_eval) = data
    keras.utils.set_random_seed(seed)
    model = build_inception(
        width,
        modules=modules,
        batch_norm=cfg.batch_norm,
        activation=cfg.activation,
        dropout=DROPOUT if cfg.dropout else 0.0,
        l2=L2 / L2_REDUCTION if cfg.reduced_l2 else L2,
    )
    steps = budget(cfg, cap)
    model.compile(
        optimizer=keras.optimizers.SGD(
            make_schedule(cfg, baseline_lr, cap), momentum=MOMENTUM
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        **compile_options(),
    )
    order = _data_order(len(x_train), steps * batch_size, seed, cfg.reshuffle)
    curve, done, stop, start = [], 0, "cap", time.perf_counter()
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
                f"{name:>18s} seed {seed} step {done:6d}  acc {acc:.4f}  "
                f"loss {loss:.4f}  {point['elapsed_s']:7.1f}s",
                flush=True,
            )
        if not math.isfinite(loss):
            stop = "diverged"
            break
        if plateaued(curve, window, len(x_eval), smooth):
            stop = "plateau"
            break
    return curve, stop


def steps_to_reach(curve: list[dict], target: float | None) -> int | str:
    """First evaluated step with accuracy >= `target`; "never"; "n/a" if no target."""
    if target is None:
        return "n/a"
    for point in curve:
        if point["accuracy"] >= target:
            return point["step"]
    return "never"


def mean_sd(values) -> tuple[float, float, int]:
    """Mean, sample sd (0 for a single value) and count of the numeric `values`."""
    v = np.asarray([x for x in values if isinstance(x, int | float)], "float64")
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _key(config, seed, lr) -> tuple[str, int, float]:
    return str(config), int(seed), float(lr)


class Record:
    """The protocol's runs and curves, read from and written to `out`.

    A run's `best_accuracy`/`best_step` are those of its curve smoothed over
    `smooth` evaluations (`smoothed`); `best_single` is its best single one.
    """

    def __init__(self, out: Path, smooth: int = SMOOTH):
        self.out = out
        self.smooth = _positive_int("smooth", smooth)
        self.runs = _read_csv(out / "runs.csv")
        other = {r.get("smooth") or "1" for r in self.runs} - {str(self.smooth)}
        if other:
            raise ValueError(
                f"{out / 'runs.csv'} holds runs smoothed over {sorted(other)} "
                f"evaluations. Received: smooth={smooth}. Pass the same `--smooth` "
                "to resume or merge, or use a new output folder."
            )
        self.curves = {}
        for row in _read_csv(out / "curves.csv"):
            key = _key(row["config"], row["seed"], row["lr"])
            point = {k: float(row[k] or "nan") for k in CURVE_COLUMNS[3:]}
            point["step"] = int(point["step"])
            self.curves.setdefault(key, []).append(point)

    def find(self, config, seed, lr) -> dict | None:
        key = _key(config, seed, lr)
        for run in self.runs:
            if _key(run["config"], run["seed"], run["lr"]) == key:
                return run
        return None

    def add(self, phase, config, seed, lr, budget_, curve, stop, wall_s) -> dict:
        best = max(smoothed(curve, self.smooth), key=lambda p: p["accuracy"])
        run = dict(
            phase=phase,
            config=config,
            seed=seed,
            lr=lr,
            budget=budget_,
            steps=curve[-1]["step"],
            stop=stop,
            best_accuracy=best["accuracy"],
            best_step=best["step"],
            best_single=max(p["accuracy"] for p in curve),
            smooth=self.smooth,
            wall_s=round(wall_s, 1),
        )
        self.runs.append(run)
        self.curves[_key(config, seed, lr)] = curve
        self.save()
        return run

    def save(self) -> None:
        """Writes `runs.csv` and `curves.csv` (every evaluation) to `out`."""
        _write_csv(self.out / "runs.csv", RUN_COLUMNS, self.runs)
        rows = [
            dict(config=c, seed=s, lr=lr_, **p)
            for (c, s, lr_), points in self.curves.items()
            for p in points
        ]
        _write_csv(self.out / "curves.csv", CURVE_COLUMNS, rows)


def choose_lr(sweep_runs: list[dict]) -> float:
    """The swept learning rate with the highest best accuracy (ties: the first)."""
    if not sweep_runs:
        raise ValueError("No sweep runs to choose a learning rate from.")
    return float(max(sweep_runs, key=lambda r: float(r["best_accuracy"]))["lr"])


def summarize(record: Record, seeds, baseline_lr: float, names) -> list[dict]:
    """Per-configuration mean ± sd over seeds, against each seed's Baseline best.

    Returns:
        One dict per configuration in `names` that has runs: `config`, `lr`,
        `budget`, `seeds` (runs found), `targets` (the Baselines' bests),
        `steps_to_baseline` (per seed: a step, "never", or "n/a" without
        the seed's Baseline), `reached` (count), `steps_mean_sd`,
        `best_mean_sd`, `steps_run_mean_sd`.
    """
    table = []
    for name in names:
        lr = config_lr(name, baseline_lr)
        per_seed = []
        for seed in seeds:
            run = record.find(name, seed, lr)
            if run is None:
                continue
            base = record.find("Baseline", seed, baseline_lr)
            target = None if base is None else float(base["best_accuracy"])
            curve = smoothed(record.curves[_key(name, seed, lr)], record.smooth)
            per_seed.append(
                dict(
                    seed=seed,
                    target=target,
                    reach=steps_to_reach(curve, target),
                    best=float(run["best_accuracy"]),
                    steps=int(run["steps"]),
                    stop=run["stop"],
                )
            )
        if not per_seed:
            continue
        reach = [p["reach"] for p in per_seed]
        table.append(
            dict(
                config=name,
                lr=lr,
                budget=int(record.find(name, per_seed[0]["seed"], lr)["budget"]),
                seeds=[p["seed"] for p in per_seed],
                targets=[p["target"] for p in per_seed],
                steps_to_baseline=reach,
                reached=sum(isinstance(r, int) for r in reach),
                steps_mean_sd=mean_sd(reach),
                best_mean_sd=mean_sd([p["best"] for p in per_seed]),
                steps_run_mean_sd=mean_sd([p["steps"] for p in per_seed]),
                stops=[p["stop"] for p in per_seed],
            )
        )
    return table


def _pm(stat, fmt: str) -> str:
    mean, sd, n = stat
    return "n/a" if n == 0 else f"{fmt.format(mean)} ± {fmt.format(sd)}"


def _steps_cell(row) -> str:
    n = len(row["seeds"])
    if row["reached"] == 0:
        return "never" if all(r == "never" for r in row["steps_to_baseline"]) else "n/a"
    cell = _pm(row["steps_mean_sd"], "{:.0f}")
    return cell if row["reached"] == n else f"{cell} ({row['reached']}/{n} seeds)"


def results_markdown(record: Record, settings: dict) -> str:
    """The sweep, Table 2 and ablation tables as markdown."""
    lr0 = settings["baseline_lr"]
    seeds = settings["seeds"]
    lines = []
    sweep = [r for r in record.runs if r["phase"] == "sweep"]
    if sweep:
        lines += [
            "### Baseline learning-rate sweep (seed {})".format(sweep[0]["seed"]),
            "",
            "| lr | best accuracy | at step | steps run | stop | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for r in sweep:
            lines.append(
                f"| {float(r['lr']):g} | {float(r['best_accuracy']):.4f} "
                f"| {r['best_step']} | {r['steps']} | {r['stop']} | {r['wall_s']} |"
            )
        lines += ["", f"Chosen Baseline lr: {lr0:g}.", ""]
    base = summarize(record, seeds, lr0, ["Baseline"])
    lines += [
        "### Table 2 (mean ± sd over seeds; steps to each seed's Baseline best)",
        "",
        f"Accuracies are trailing means of {record.smooth} evaluations "
        "(`--smooth`); `best_single` in runs.csv is the best single one.",
        "",
        "| configuration | paper: lr | paper: steps to 72.2% | paper: max acc. "
        "| ours: lr | budget (cap) | ours: steps to Baseline best "
        "| ours: speed-up | ours: best accuracy | steps run | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_steps = base[0]["steps_mean_sd"][0] if base else math.nan
    for row in summarize(record, seeds, lr0, list(CONFIGS)):
        paper = PAPER[row["config"]]
        steps = row["steps_mean_sd"][0]
        speed = (
            f"{base_steps / steps:.1f}x"
            if row["reached"] == len(row["seeds"]) and steps > 0
            else "-"
        )
        lines.append(
            f"| {row['config']} | {paper[0]} | {paper[1]} | {paper[2]} "
            f"| {row['lr']:g} | {row['budget']} | {_steps_cell(row)} | {speed} "
            f"| {_pm(row['best_mean_sd'], '{:.4f}')} "
            f"| {_pm(row['steps_run_mean_sd'], '{:.0f}')} "
            f"| {','.join(map(str, row['seeds']))} |"
        )
    ablation = summarize(record, seeds, lr0, ["BN-x5", *ABLATIONS])
    if any(row["config"] in ABLATIONS for row in ablation):
        lines += [
            "",
            "### Section 4.2.1 ablation (from BN-x5, one change switched back)",
            "",
            "| configuration | lr | budget (cap) | steps to Baseline best "
            "| best accuracy | steps run | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in ablation:
            lines.append(
                f"| {row['config']} | {row['lr']:g} | {row['budget']} "
                f"| {_steps_cell(row)} | {_pm(row['best_mean_sd'], '{:.4f}')} "
                f"| {_pm(row['steps_run_mean_sd'], '{:.0f}')} "
                f"| {','.join(map(str, row['seeds']))} |"
            )
    lines += [
        "",
        "### Per run",
        "",
        "| config | seed | lr | steps to Baseline best "
        "| best accuracy (at step) | steps run | stop | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summarize(record, seeds, lr0, list(ALL_CONFIGS)):
        for seed, reach in zip(row["seeds"], row["steps_to_baseline"], strict=True):
            run = record.find(row["config"], seed, row["lr"])
            lines.append(
                f"| {row['config']} | {seed} | {row['lr']:g} | {reach} "
                f"| {float(run['best_accuracy']):.4f} ({run['best_step']}) "
                f"| {run['steps']} | {run['stop']} | {run['wall_s']} |"
            )
    return "\n".join(lines) + "\n"


def plot_curves(record: Record, baseline_lr: float, path) -> None:
    """Test accuracy vs step: every run of Table 2 and of the ablation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "Plotting needs matplotlib: pip install matplotlib"
        ) from e
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    targets = [
        float(r["best_accuracy"])
        for r in record.runs
        if r["config"] == "Baseline" and math.isclose(float(r["lr"]), baseline_lr)
    ]
    zoom = (min(targets, default=0.97) - 0.04, 1.0)
    groups = (
        (axes[0], list(CONFIGS), (0, 1.0), "Table 2 configurations"),
        (axes[1], list(CONFIGS), zoom, "zoom"),
        (axes[2], ["BN-x5", *ABLATIONS], zoom, "ablation from BN-x5"),
    )
    for ax, names, ylim, title in groups:
        for i, name in enumerate(names):
            lr = config_lr(name, baseline_lr)
            runs = [(k, c) for k, c in record.curves.items() if k[0] == name]
            runs = [(k, c) for k, c in runs if math.isclose(k[2], lr)]
            for j, (_, curve) in enumerate(sorted(runs, key=lambda kc: kc[0])):
                curve = smoothed(curve, record.smooth)
                ax.plot(
                    [p["step"] for p in curve],
                    [p["accuracy"] for p in curve],
                    color=f"C{i}",
                    lw=1.0,
                    alpha=0.8,
                    label=name if j == 0 else None,
                )
        for t in targets:
            ax.axhline(t, color="k", ls=":", lw=0.6)
        ax.set_ylim(*ylim)
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
        ax.set_title(
            f"{title}\n(mean of {record.smooth} evaluations; dotted: Baseline "
            "bests; a line per seed)",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge(
    out,
    others: Sequence,
    seeds,
    baseline_lr: float,
    plot: bool = True,
    smooth: int = SMOOTH,
):
    """Adds the runs recorded in `others` to `out` (runs already there win).

    Lets independent processes (e.g. the ablation arms) write their own
    folders, merged afterwards; then rewrites `out`'s tables and figure.
    """
    record = Record(Path(out), smooth)
    for other in others:
        theirs = Record(Path(other), smooth)
        for run in theirs.runs:
            if record.find(run["config"], run["seed"], run["lr"]) is None:
                key = _key(run["config"], run["seed"], run["lr"])
                record.runs.append(run)
                record.curves[key] = theirs.curves[key]
    record.runs.sort(key=lambda r: ("sweep", "table2", "ablation").index(r["phase"]))
    record.save()
    settings = dict(baseline_lr=baseline_lr, seeds=list(seeds))
    (record.out / "results.md").write_text(results_markdown(record, settings))
    if plot:
        plot_curves(record, baseline_lr, record.out / "curves.png")
    return record


def protocol(
    out,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    sweep_lrs: Sequence[float] | None = None,
    baseline_lr: float = BASELINE_LR,
    configs: Sequence[str] | None = None,
    ablation: Sequence[str] | None = (),
    cap: int = CAP,
    window: int = WINDOW,
    smooth: int = SMOOTH,
    width: int = WIDTH,
    modules: int = 2,
    batch_size: int = BATCH_SIZE,
    eval_every: int = EVAL_EVERY,
    eval_size: int = EVAL_SIZE,
    train_size: int | None = None,
    plot: bool = True,
    verbose: bool = True,
) -> dict:
    """Runs the protocol (sweep, Table 2 over seeds, ablation); resumable.

    Args:
        out: Output directory (created); runs already in `out/runs.csv` with
            the same configuration, seed and lr are not repeated.
        seeds: Seeds of the weights and data order; the sweep uses the first.
        sweep_lrs: Baseline learning rates to sweep (`None`: use `baseline_lr`).
        baseline_lr: The Baseline's lr when there is no sweep.
        configs: Table 2 configurations (`None`: all of `CONFIGS`, the
            Baseline first; `()`: none). Steps to the Baseline's best need
            the seed's Baseline run in `out` (run here or merged).
        ablation: Ablation arms (`None`: all of `ABLATIONS`; default none).
        cap: Step cap and decay length of plain configurations (fast-decay
            ones: `cap // 6`).
        window: Plateau window in steps (see `plateaued`).
        smooth: Evaluations averaged (trailing mean, `smoothed`) for the
            plateau rule, each run's best accuracy, the Baseline targets and
            steps to reach them.
        width, modules: Network size (`build_inception`).
        batch_size: Training mini-batch size.
        eval_every: Evaluate every this many steps.
        eval_size: Evaluate on the first `eval_size` MNIST test images.
        train_size: Train on the first `train_size` images (`None`: 60,000).
        plot: Write `curves.png`.
        verbose: Print progress.

    Returns:
        `{"baseline_lr", "seeds", "table", "ablation", "results_md"}`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` must be distinct, at least one. Received: {seeds}")
    names = [] if configs == () else check_configs(configs, CONFIGS)
    if "Baseline" in names:  # the targets: each seed's Baseline runs first
        names = ["Baseline", *[n for n in names if n != "Baseline"]]
    arms = [] if ablation == () else check_configs(ablation, ABLATIONS)
    cap = _positive_int("cap", cap)
    window = _positive_int("window", window)
    eval_every = _positive_int("eval_every", eval_every)
    eval_size = _positive_int("eval_size", eval_size)
    batch_size = _positive_int("batch_size", batch_size)
    baseline_lr = _positive_float("baseline_lr", baseline_lr)
    sweep_lrs = (
        None
        if sweep_lrs is None
        else [_positive_float("sweep_lrs", lr) for lr in sweep_lrs]
    )
    if train_size is not None:
        train_size = _positive_int("train_size", train_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(train_size, eval_size)
    record = Record(out, smooth)
    common = dict(
        cap=cap,
        width=width,
        modules=modules,
        batch_size=batch_size,
        eval_every=eval_every,
        window=window,
        smooth=smooth,
        verbose=verbose,
    )

    def ensure(phase, name, seed, lr0):
        lr = config_lr(name, lr0)
        run = record.find(name, seed, lr)
        if run is not None:
            return run
        start = time.perf_counter()
        curve, stop = train_config(name, data, baseline_lr=lr0, seed=seed, **common)
        run = record.add(
            phase,
            name,
            seed,
            lr,
            budget(ALL_CONFIGS[name], cap),
            curve,
            stop,
            time.perf_counter() - start,
        )
        report()
        return run

    settings = dict(baseline_lr=baseline_lr, seeds=seeds)

    def report():
        text = results_markdown(record, settings)
        (out / "results.md").write_text(text)
        if plot:
            plot_curves(record, settings["baseline_lr"], out / "curves.png")

    if sweep_lrs:
        swept = [ensure("sweep", "Baseline", seeds[0], lr) for lr in sweep_lrs]
        settings["baseline_lr"] = baseline_lr = choose_lr(swept)
        if verbose:
            print(f"Baseline lr chosen by the sweep: {baseline_lr:g}", flush=True)
    for seed in seeds:
        for name in names:
            ensure("table2", name, seed, baseline_lr)
    for seed in seeds:
        for name in arms:
            ensure("ablation", name, seed, baseline_lr)
    report()
    return dict(
        baseline_lr=baseline_lr,
        seeds=seeds,
        table=summarize(
            record, seeds, baseline_lr, list(dict.fromkeys(["Baseline", *names]))
        ),
        ablation=summarize(record, seeds, baseline_lr, ["BN-x5", *arms]),
        results_md=str(out / "results.md"),
    )


class _DefaultsHelp(argparse.HelpFormatter):
    """Help that names each option's default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example (the full protocol): python examples/inception_mnist.py "
        "--out runs/inception --seeds 0 1 2 --sweep 0.01 0.03 0.1 --ablation",
        formatter_class=_DefaultsHelp,
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: runs.csv, curves.csv, results.md, curves.png "
        "(runs already in its runs.csv are skipped, so a run can be resumed)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run"
    )
    parser.add_argument(
        "--sweep",
        nargs="+",
        type=float,
        metavar="LR",
        help="choose the Baseline's learning rate by training a Baseline to its "
        "plateau at each of these on the first seed (overrides --lr)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=BASELINE_LR,
        help="the Baseline's learning rate when no --sweep is given; the other "
        "configurations scale it (BN-x5: 5x, BN-x30: 30x)",
    )
    parser.add_argument(
        "--configs",
        nargs="*",
        choices=list(CONFIGS),
        help="Table 2 configurations to run (default: all; the flag alone: none)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="only merge the runs of these output folders into --out and report",
    )
    parser.add_argument(
        "--ablation",
        nargs="*",
        choices=list(ABLATIONS),
        help="also run these ablation arms (the flag alone: all of them)",
    )
    parser.add_argument(
        "--cap",
        type=int,
        default=CAP,
        help="most training steps of a run (a sixth of it for the fast-decay "
        "configurations); the learning-rate schedule is stretched to it",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=WINDOW,
        help="plateau window in steps: a run stops when the last WINDOW steps "
        "did not beat the best before them by more than one standard error",
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=SMOOTH,
        help="evaluations averaged (trailing mean) before any comparison",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=WIDTH,
        help="filters of the stem and of each branch of the first Inception module",
    )
    parser.add_argument(
        "--modules", type=int, default=2, help="Inception modules in the net"
    )
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help="mini-batch size"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=EVAL_EVERY,
        help="steps between test-accuracy evaluations",
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        default=EVAL_SIZE,
        help="test images per evaluation (sets the standard error of the plateau rule)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="use only the first N training images (default: all 60,000)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (TensorFlow and torch backends)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip curves.png")
    args = parser.parse_args(argv)
    if args.threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    elif args.threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.threads)
    if args.merge:
        merge(args.out, args.merge, args.seeds, args.lr, not args.no_plot, args.smooth)
        print((Path(args.out) / "results.md").read_text())
        return 0
    configs = args.configs if args.configs != [] else ()
    if args.ablation is None:
        ablation = ()
    else:
        ablation = args.ablation or None
    result = protocol(
        args.out,
        args.seeds,
        sweep_lrs=args.sweep,
        baseline_lr=args.lr,
        configs=configs,
        ablation=ablation,
        cap=args.cap,
        window=args.window,
        smooth=args.smooth,
        width=args.width,
        modules=args.modules,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        train_size=args.train_size,
        plot=not args.no_plot,
    )
    print(Path(result["results_md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
