"""Tests for examples/inception_mnist.py and examples/inception_model.py.

A tiny-budget run of every configuration (512 training images, width 16, one
Inception module, 300 steps of 16 images) checks the output files and that
the BN configurations learn.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from examples import inception_mnist as im
from examples.inception_model import build_inception

TINY = dict(
    width=16,
    modules=1,
    train_size=512,
    batch_size=16,
    eval_every=100,
    eval_size=500,
    seed=0,
)
TINY_STEPS = 300
TINY_EVALS = [100, 200, 300]
BN_CONFIGS = ["BN", "BN-x5", "BN-x30", "BN-x5-Sigmoid"]
# Chance is 0.1 (the most frequent class in the 500 evaluation images holds
# 13.4%); the untrained network scores 0.08-0.15 (seeds 0-2), and a broken
# one that predicts a constant class at most 0.134. Measured best
# accuracies of this tiny run (seeds 0 and 1, TensorFlow and JAX): 0.39-0.68
# for the ReLU BN configurations, 0.28-0.35 for BN-x5-Sigmoid, whose sigmoid
# features learn slowest. Each bar sits between chance and those minima.
LEARNS = {"relu": 0.3, "sigmoid": 0.2}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inception")
    rows = im.run(TINY_STEPS, out, None, verbose=False, **TINY)
    return out, rows


def test_results_csv_schema(tiny_run):
    out, rows = tiny_run
    columns, table = _read(out / "results.csv")
    assert tuple(columns) == im.RESULT_COLUMNS
    assert [r["config"] for r in table] == list(im.CONFIGS)
    for r in table:
        expected_lr = im.BASELINE_LR * im.CONFIGS[r["config"]].lr_multiplier
        np.testing.assert_allclose(float(r["lr"]), expected_lr, rtol=1e-12)
        assert 0.0 <= float(r["best_accuracy"]) <= 1.0
        s = r["steps_to_baseline"]
        assert s == "never" or int(s) in TINY_EVALS
    assert [r["config"] for r in rows] == list(im.CONFIGS)


def test_curves_csv_and_png(tiny_run):
    out, _ = tiny_run
    columns, table = _read(out / "curves.csv")
    assert tuple(columns) == im.CURVE_COLUMNS
    for name in im.CONFIGS:
        steps = [int(r["step"]) for r in table if r["config"] == name]
        assert steps == TINY_EVALS, name
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_reaches_its_own_best(tiny_run):
    out, _ = tiny_run
    _, table = _read(out / "curves.csv")
    _, results = _read(out / "results.csv")
    base = [r for r in table if r["config"] == "Baseline"]
    best = max(base, key=lambda r: float(r["accuracy"]))
    assert results[0]["steps_to_baseline"] == best["step"]


@pytest.mark.parametrize("name", BN_CONFIGS)
def test_bn_configurations_learn(tiny_run, name):
    _, rows = tiny_run
    (row,) = [r for r in rows if r["config"] == name]
    assert row["best_accuracy"] > LEARNS[im.CONFIGS[name].activation], row


def test_untrained_model_fails_the_learning_threshold():
    # The negative control for both bars: the same network before training.
    import keras

    _, (x_eval, y_eval) = im._load_data(TINY["train_size"], TINY["eval_size"])
    keras.utils.set_random_seed(TINY["seed"])
    model = build_inception(TINY["width"], modules=TINY["modules"])
    probs = keras.ops.convert_to_numpy(model(x_eval, training=False))
    assert np.mean(probs.argmax(axis=1) == y_eval) < min(LEARNS.values())


@pytest.mark.parametrize("configs", [["Bogus"], ["BN", "bn-x5"], []])
def test_unknown_configuration_is_rejected(tmp_path, configs):
    with pytest.raises(ValueError, match=r"configs.*'Baseline', 'BN'"):
        im.run(10, tmp_path, configs, **TINY)


def test_cli_rejects_unknown_configuration(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        im.main(["--steps", "10", "--out", str(tmp_path), "--configs", "Bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'Bogus'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=10, eval_every=0), "eval_every"),
        (dict(steps=10, baseline_lr=-0.1), "baseline_lr"),
        (dict(steps=10, baseline_lr=float("nan")), "baseline_lr"),
        (dict(steps=10, train_size=0), "train_size"),
    ],
)
def test_run_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        im.run(out=tmp_path, configs=["BN"], **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=0), "width"),
        (dict(width=2.5), "width"),
        (dict(activation="tanh"), "activation"),
        (dict(dropout=1.0), "dropout"),
        (dict(l2=-1.0), "l2"),
        (dict(modules=0), "modules"),
    ],
)
def test_build_inception_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_inception(**kwargs)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_build_inception_layout(batch_norm):
    model = build_inception(4, batch_norm=batch_norm, dropout=0.4)
    assert model.output_shape == (None, 10)
    convs = [layer for layer in model.layers if layer.name.endswith("_conv")]
    bns = [layer for layer in model.layers if layer.name.endswith("_bn")]
    assert len(convs) == 15  # stem + 7 convolutions in each of 2 modules
    assert len(bns) == (15 if batch_norm else 0)
    assert all(conv.use_bias is not batch_norm for conv in convs)
    if batch_norm:
        import keras_bn

        assert all(isinstance(b, keras_bn.BatchNormalization) for b in bns)


def test_steps_to_reach(rng):
    acc = rng.uniform(0.1, 0.99, size=30)
    curve = [dict(step=100 * (i + 1), accuracy=a) for i, a in enumerate(acc)]
    target = float(np.sort(acc)[-5])  # reached, but not at the first point
    first = int(np.argmax(acc >= target))
    assert im.steps_to_reach(curve, target) == 100 * (first + 1)
    assert im.steps_to_reach(curve, float(acc.max()) + 1e-3) == "never"
    assert im.steps_to_reach(curve, None) == "n/a"


@pytest.mark.parametrize("n, total", [(10, 10), (10, 35), (7, 3)])
def test_data_order_is_seeded_permutations(n, total):
    order = im._data_order(n, total, seed=3)
    assert len(order) == total
    np.testing.assert_array_equal(order, im._data_order(n, total, seed=3))
    for start in range(0, total - n + 1, n):  # every full epoch is a permutation
        assert sorted(order[start : start + n]) == list(range(n))


def test_summarize_targets_the_baseline_best(rng):
    steps = [100, 200, 300]
    acc = {n: rng.uniform(0.5, 0.99, size=3) for n in ("Baseline", "BN-x30")}
    curves = {
        n: [dict(step=s, accuracy=float(a)) for s, a in zip(steps, v, strict=True)]
        for n, v in acc.items()
    }
    rows, target = im.summarize(curves, 0.03)
    assert target == float(acc["Baseline"].max())
    assert rows[0]["steps_to_baseline"] == steps[int(acc["Baseline"].argmax())]
    assert rows[1]["lr"] == 0.9  # 30 x 0.03, printed without float noise
    assert rows[1]["best_accuracy"] == round(float(acc["BN-x30"].max()), 4)
    rows, target = im.summarize({"BN-x30": curves["BN-x30"]}, 0.03)
    assert target is None and rows[0]["steps_to_baseline"] == "n/a"
