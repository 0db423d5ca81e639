"""Tests for examples/inception_mnist.py and examples/inception_model.py.

Pure helpers (plateau rule, stretched schedules, ablation configurations,
seed aggregation) are tested on synthetic curves; one tiny protocol run
(512 training images, width 4, one Inception module, two seeds, batches of
16; a two-point sweep, the Baseline and one ablation arm: 5 runs) checks the
driver end to end: resumable records, tables, figure.
"""

from __future__ import annotations

import csv
import dataclasses
import math

import keras
import numpy as np
import pytest

from examples import inception_mnist as im
from examples.inception_model import build_inception

TINY = dict(
    width=4,
    modules=1,
    train_size=512,
    batch_size=16,
    eval_every=20,
    eval_size=300,
    cap=120,  # plain configurations: 120 steps; fast-decay ones: 20
    window=40,
)
SEEDS = [0, 1]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _curve(accuracies, every=100):
    return [dict(step=every * (i + 1), accuracy=a) for i, a in enumerate(accuracies)]


# --- plateau rule -----------------------------------------------------------


def test_standard_error():
    assert im.standard_error(0.98, 5000) == pytest.approx(math.sqrt(0.98 * 0.02 / 5000))
    assert im.standard_error(1.0, 10) == 0.0


def test_rising_curve_never_plateaus(rng):
    acc = np.linspace(0.5, 0.99, 60) + rng.uniform(-1e-4, 1e-4, 60)
    curve = _curve(np.maximum.accumulate(acc))
    assert not any(im.plateaued(curve[: i + 1], 1000, 5000) for i in range(60))


def test_flat_curve_plateaus_after_one_window(rng):
    se = im.standard_error(0.98, 5000)  # 0.002
    acc = 0.98 + rng.uniform(-se, se / 2, size=40)  # noise below one SE
    acc[:5] = [0.5, 0.8, 0.9, 0.95, 0.98]
    curve = _curve(acc)
    stops = [i for i in range(40) if im.plateaued(curve[: i + 1], 1000, 5000)]
    # Step 500 holds 0.98; the window (1000 steps) after it ends at step 1500.
    assert stops and curve[stops[0]]["step"] >= 1500
    assert curve[stops[0]]["step"] <= 1500 + 1000  # noise can't hold it off long


@pytest.mark.parametrize("gain_in_se, stops", [(0.5, True), (1.0, True), (1.5, False)])
def test_plateau_threshold_is_one_standard_error(gain_in_se, stops):
    ref = 0.95
    late = ref + gain_in_se * im.standard_error(ref, 2000) - 1e-12 * (gain_in_se == 1)
    curve = _curve([0.9, ref, ref - 0.01, late])  # steps 100..400
    assert im.plateaued(curve, 200, 2000) is stops  # window: steps 300, 400


def test_no_plateau_without_a_full_window():
    curve = _curve([0.97, 0.97, 0.97])
    assert not im.plateaued(curve, 300, 5000)  # nothing at step <= 0
    assert im.plateaued(curve, 200, 5000)
    assert not im.plateaued([], 200, 5000)


def test_smoothed_is_a_trailing_mean():
    curve = _curve([0.5, 0.7, 0.9, 0.7, 0.5])
    got = [p["accuracy"] for p in im.smoothed(curve, 3)]
    np.testing.assert_allclose(got, [0.5, 0.6, 0.7, 23 / 30, 0.7], rtol=1e-12)
    assert [p["step"] for p in im.smoothed(curve, 3)] == [100, 200, 300, 400, 500]
    assert im.smoothed(curve, 1) == curve
    assert curve[1]["accuracy"] == 0.7  # input not modified
    with pytest.raises(ValueError, match="`smooth` must be a positive integer"):
        im.smoothed(curve, 0)


def test_smoothing_ignores_a_single_lucky_evaluation():
    # Flat at 0.95 but for one evaluation 1 point up (over 3 SE at n=5000):
    # alone it holds off the plateau; averaged over 4 it adds 0.25 points.
    se = im.standard_error(0.95, 5000)
    assert 0.0025 < se < 0.01 / 3
    curve = _curve([0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.96, 0.95])
    assert not im.plateaued(curve, 300, 5000)
    assert im.plateaued(curve, 300, 5000, smooth=4)
    # A real rise is not smoothed away: +1 point held for 4 evaluations.
    rising = _curve([0.9, 0.95, 0.95, 0.95, 0.95, 0.96, 0.96, 0.96, 0.96])
    assert not im.plateaued(rising, 400, 5000, smooth=4)


def test_record_targets_are_smoothed(tmp_path):
    record = _fake_record(
        tmp_path,
        {
            ("Baseline", 0): [0.90, 0.90, 0.90, 0.99, 0.90],  # smoothed best: 0.9225
            ("BN", 0): [0.90, 0.93, 0.93, 0.94],  # smoothed: .9, .915, .92, .925
        },
        smooth=4,
    )
    base = record.find("Baseline", 0, 0.03)
    assert float(base["best_accuracy"]) == pytest.approx(0.9225)
    assert float(base["best_single"]) == 0.99 and int(base["smooth"]) == 4
    rows = {r["config"]: r for r in im.summarize(record, [0], 0.03, im.CONFIGS)}
    assert rows["BN"]["steps_to_baseline"] == [400]  # 0.99 alone is not the target


# --- stretched schedules and budgets ---------------------------------------


@pytest.mark.parametrize("name", list(im.ALL_CONFIGS))
def test_schedule_is_stretched_to_the_budget(name):
    cfg = im.ALL_CONFIGS[name]
    cap = 12000
    b = im.budget(cfg, cap)
    assert b == (2000 if cfg.fast_decay else 12000)
    schedule = im.make_schedule(cfg, 0.03, cap)
    lr0 = 0.03 * cfg.lr_multiplier
    for step in (0, b // 3, b, 2 * b):
        got = float(keras.ops.convert_to_numpy(schedule(step)))
        np.testing.assert_allclose(got, lr0 * 0.5 ** (step / b), rtol=1e-6)
        np.testing.assert_allclose(
            got, im.learning_rate(cfg, 0.03, cap, step), rtol=1e-6
        )
    # Halved exactly at the end of the configuration's own budget.
    np.testing.assert_allclose(im.learning_rate(cfg, 0.03, cap, b), lr0 / 2)


def test_config_lr_has_no_float_noise():
    assert im.config_lr("BN-x30", 0.03) == 0.9
    assert im.config_lr("BN-x5", 0.03) == 0.15


# --- ablation configurations -----------------------------------------------


def _differences(a, b):
    return {
        f.name
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    }


def test_table2_configurations():
    c = im.CONFIGS
    assert _differences(c["Baseline"], c["BN"]) == {"batch_norm"}
    accelerated = {"lr_multiplier", "dropout", "reduced_l2", "fast_decay"}
    assert _differences(c["BN"], c["BN-x5"]) == accelerated
    assert _differences(c["BN-x5"], c["BN-x30"]) == {"lr_multiplier"}
    assert _differences(c["BN-x5"], c["BN-x5-Sigmoid"]) == {"activation"}
    assert _differences(c["Baseline"], c["Baseline-Sigmoid"]) == {"activation"}
    assert c["BN-x5"].lr_multiplier == 5 and c["BN-x30"].lr_multiplier == 30


@pytest.mark.parametrize(
    "arm, field, value",
    [
        ("BN-x5+dropout", "dropout", True),
        ("BN-x5+L2", "reduced_l2", False),
        ("BN-x5-slow-decay", "fast_decay", False),
        ("BN-x5-same-batches", "reshuffle", False),
    ],
)
def test_each_ablation_arm_switches_back_one_change(arm, field, value):
    cfg = im.ABLATIONS[arm]
    assert _differences(im.CONFIGS["BN-x5"], cfg) == {field}
    assert getattr(cfg, field) == value
    if field != "reshuffle":  # our BN and Baseline reshuffle every epoch too
        assert value == getattr(im.CONFIGS["BN"], field)


def test_lr_only_arm_is_bn_with_the_raised_lr():
    cfg = im.ABLATIONS["BN-lr-x5-only"]
    assert _differences(im.CONFIGS["BN"], cfg) == {"lr_multiplier"}
    assert cfg.lr_multiplier == im.CONFIGS["BN-x5"].lr_multiplier


@pytest.mark.parametrize("n, total", [(10, 10), (10, 35), (7, 3)])
@pytest.mark.parametrize("reshuffle", [True, False])
def test_data_order_is_seeded_permutations(n, total, reshuffle):
    order = im._data_order(n, total, 3, reshuffle)
    assert len(order) == total
    np.testing.assert_array_equal(order, im._data_order(n, total, 3, reshuffle))
    epochs = [order[s : s + n] for s in range(0, total - n + 1, n)]
    for epoch in epochs:  # every full epoch is a permutation
        assert sorted(epoch) == list(range(n))
    if len(epochs) > 1:
        same = all((e == epochs[0]).all() for e in epochs)
        assert same is (not reshuffle)


# --- seed aggregation -------------------------------------------------------


def test_mean_sd():
    assert im.mean_sd([1, 2, 3]) == (2.0, 1.0, 3)
    assert im.mean_sd([500, "never", 700]) == (600.0, pytest.approx(141.42, 1e-4), 2)
    assert im.mean_sd([4.0]) == (4.0, 0.0, 1)
    mean, sd, n = im.mean_sd(["never"])
    assert n == 0 and math.isnan(mean) and math.isnan(sd)


def _fake_record(tmp_path, curves, smooth=1):
    record = im.Record(tmp_path, smooth)
    for (name, seed), acc in curves.items():
        lr = im.config_lr(name, 0.03)
        record.add("t", name, seed, lr, 100, _curve(acc), "plateau", 1.0)
    return record


def test_summarize_pairs_each_seed_with_its_baseline(tmp_path):
    record = _fake_record(
        tmp_path,
        {
            ("Baseline", 0): [0.5, 0.9, 0.92, 0.91],
            ("Baseline", 1): [0.6, 0.95, 0.94, 0.94],
            ("BN", 0): [0.8, 0.93, 0.96, 0.96],  # reaches 0.92 at step 200
            ("BN", 1): [0.9, 0.94, 0.96, 0.97],  # reaches 0.95 at step 300
            ("BN-x5", 0): [0.7, 0.91, 0.90, 0.9],  # never reaches 0.92
            ("BN-x5", 1): [0.96, 0.97, 0.97, 0.97],  # reaches 0.95 at step 100
        },
    )
    rows = {r["config"]: r for r in im.summarize(record, [0, 1], 0.03, im.CONFIGS)}
    assert set(rows) == {"Baseline", "BN", "BN-x5"}
    assert rows["Baseline"]["targets"] == [0.92, 0.95]
    assert rows["Baseline"]["steps_to_baseline"] == [300, 200]
    assert rows["BN"]["steps_to_baseline"] == [200, 300]
    assert rows["BN"]["steps_mean_sd"] == (250.0, pytest.approx(70.71, 1e-3), 2)
    assert rows["BN"]["best_mean_sd"][:2] == (
        pytest.approx(0.965),
        pytest.approx(np.std([0.96, 0.97], ddof=1)),
    )
    assert rows["BN-x5"]["steps_to_baseline"] == ["never", 100]
    assert rows["BN-x5"]["reached"] == 1 and rows["BN-x5"]["lr"] == 0.15
    assert im._steps_cell(rows["BN-x5"]) == "100 ± 0 (1/2 seeds)"
    # The record round-trips through its CSV files (what a resumed run reads).
    again = im.summarize(im.Record(tmp_path, 1), [0, 1], 0.03, im.CONFIGS)
    with pytest.raises(ValueError, match=r"smoothed over \['1'\].*smooth=4"):
        im.Record(tmp_path, 4)
    assert [r["steps_to_baseline"] for r in again] == [
        r["steps_to_baseline"] for r in rows.values()
    ]


def test_summarize_without_a_baseline_says_na(tmp_path):
    record = _fake_record(tmp_path, {("BN", 0): [0.5, 0.6]})
    (row,) = im.summarize(record, [0], 0.03, ["Baseline", "BN"])
    assert row["steps_to_baseline"] == ["n/a"] and im._steps_cell(row) == "n/a"


def test_choose_lr():
    runs = [
        dict(lr="0.01", best_accuracy="0.97"),
        dict(lr="0.03", best_accuracy="0.98"),
    ]
    assert im.choose_lr(runs) == 0.03
    with pytest.raises(ValueError, match="No sweep runs"):
        im.choose_lr([])


# --- the driver, end to end (tiny) -----------------------------------------


def _run_tiny(out, **kwargs):
    """The tiny protocol: a two-lr sweep, the Baseline and one ablation arm."""
    return im.protocol(
        out,
        SEEDS,
        sweep_lrs=[0.03, 0.1],
        configs=["Baseline"],
        ablation=["BN-x5-same-batches"],
        verbose=False,
        **kwargs,
        **TINY,
    )


@pytest.fixture(scope="module")
def tiny_protocol(tmp_path_factory):
    out = tmp_path_factory.mktemp("inception")
    return out, _run_tiny(out)


def test_protocol_records_every_run(tiny_protocol):
    out, result = tiny_protocol
    columns, runs = _read(out / "runs.csv")
    assert tuple(columns) == im.RUN_COLUMNS
    lr = result["baseline_lr"]
    assert lr in (0.03, 0.1)
    expected = {("Baseline", s, lr) for s in SEEDS}
    expected |= {("Baseline", 0, 0.03), ("Baseline", 0, 0.1)}
    expected |= {("BN-x5-same-batches", s, 5 * lr) for s in SEEDS}
    got = {(r["config"], int(r["seed"]), round(float(r["lr"]), 6)) for r in runs}
    assert got == {(c, s, round(x, 6)) for c, s, x in expected}
    assert len(runs) == 5  # the sweep's seed-0 run at the chosen lr is reused
    for r in runs:
        cfg = im.ALL_CONFIGS[r["config"]]
        assert int(r["budget"]) == (20 if cfg.fast_decay else 120)
        assert r["stop"] in ("plateau", "cap", "diverged")
        if r["stop"] == "cap":
            assert int(r["steps"]) == int(r["budget"])
        else:
            assert int(r["steps"]) <= int(r["budget"])
    _, curves = _read(out / "curves.csv")
    for r in runs:
        steps = [
            int(c["step"])
            for c in curves
            if (c["config"], c["seed"], c["lr"]) == (r["config"], r["seed"], r["lr"])
        ]
        assert steps == list(range(20, int(r["steps"]) + 1, 20))


def test_protocol_writes_tables_and_figure(tiny_protocol):
    out, result = tiny_protocol
    text = (out / "results.md").read_text()
    for heading in ("learning-rate sweep", "Table 2", "ablation", "Per run"):
        assert heading in text
    assert "| BN-x5-same-batches |" in text
    (base,) = [r for r in result["table"] if r["config"] == "Baseline"]
    assert base["reached"] == len(SEEDS)  # a Baseline always reaches its best
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_protocol_resumes_without_training_again(tiny_protocol, monkeypatch):
    out, result = tiny_protocol
    before = (out / "runs.csv").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("trained a run that was already recorded")

    monkeypatch.setattr(im, "train_config", fail)
    again = _run_tiny(out, plot=False)
    assert (out / "runs.csv").read_text() == before
    assert again["baseline_lr"] == result["baseline_lr"]


def test_untrained_model_is_near_chance():
    _, (x_eval, y_eval) = im._load_data(512, 300)
    keras.utils.set_random_seed(0)
    model = build_inception(4, modules=1)
    probs = keras.ops.convert_to_numpy(model(x_eval, training=False))
    assert np.mean(probs.argmax(axis=1) == y_eval) < 0.2


# --- argument checking ------------------------------------------------------


@pytest.mark.parametrize("configs", [["Bogus"], ["BN", "bn-x5"], []])
def test_unknown_configuration_is_rejected(tmp_path, configs):
    with pytest.raises(ValueError, match=r"configs.*'Baseline', 'BN'"):
        im.protocol(tmp_path, configs=configs, **TINY)


def test_unknown_ablation_arm_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"configs.*'BN-x5\+dropout'"):
        im.protocol(tmp_path, ablation=["BN-x5"], **TINY)


def test_cli_rejects_unknown_configuration(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        im.main(["--out", str(tmp_path), "--configs", "Bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'Bogus'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cap=0), "cap"),
        (dict(window=0), "window"),
        (dict(eval_every=0), "eval_every"),
        (dict(baseline_lr=-0.1), "baseline_lr"),
        (dict(baseline_lr=float("nan")), "baseline_lr"),
        (dict(sweep_lrs=[0.1, 0.0]), "sweep_lrs"),
        (dict(train_size=0), "train_size"),
        (dict(seeds=[0, 0]), "seeds"),
    ],
)
def test_protocol_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        im.protocol(tmp_path, configs=["BN"], **kwargs)


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
