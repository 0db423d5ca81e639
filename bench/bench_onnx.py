"""ONNX Runtime latency: folded (keras-bn export_onnx) vs Keras's own export.

Run (TensorFlow backend, under the shared lock):

    flock /tmp/keras-bn-heavy.lock env KERAS_BACKEND=tensorflow \
        .venv/bin/python bench/bench_onnx.py

One ORT thread (intra_op 1, inter_op 1); for each model and batch size, the
median latency of `--runs` timed calls after warm-up, the two models' calls
interleaved (a, b, b, a, ...) so both see the same machine load. The peer
is `model.export(path, format="onnx")` (Keras 3, unfolded) on the same model.
Prints a markdown table; "A/A noise" is the Keras export timed against
itself with the same protocol (1.00x ideally): ratios within that distance of
1 are noise.

`--applications MobileNetV2:96 ResNet50:64 ...` times `keras.applications`
models instead (random weights and batch-normalization statistics, keras_bn's
layer, input size after the colon) on any backend, the way `export_onnx(...,
benchmark=True)` does: our file against Keras's own `model.export(format=
"onnx")` of the same weights with Keras's `BatchNormalization` (through
`keras_baseline`), batch 1, one thread, `--blocks` blocks of fresh sessions
(ours, Keras's, Keras's again for the A/A control) with `--rounds`
interleaved calls each. The ratio is the median of the paired per-call
ratios (Keras's time over ours: above 1, our file is faster) with a
bootstrap 95% interval:

    KERAS_BACKEND=jax .venv/bin/python bench/bench_onnx.py \
        --applications MobileNetV2:96 ResNet50:64 EfficientNetB0:64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn.converters import export_onnx  # noqa: E402
from keras_bn.converters.bench import (  # noqa: E402
    bench_latency,
    blocked_latency_ms,
    latency_ms,
    median_ratio,
)

L = keras.layers


def dense_mlp():
    layers = [keras.Input((784,))]
    for _ in range(3):
        layers += [L.Dense(512, use_bias=False), L.BatchNormalization(), L.ReLU()]
    return keras.Sequential([*layers, L.Dense(10)], name="dense_mlp")


def paper_mlp():
    """The MNIST MLP of Ioffe & Szegedy (2015): 3 x 100 sigmoid units."""
    layers = [keras.Input((784,))]
    for _ in range(3):
        layers += [
            L.Dense(100, use_bias=False),
            L.BatchNormalization(),
            L.Activation("sigmoid"),
        ]
    return keras.Sequential([*layers, L.Dense(10)], name="paper_mlp")


def narrow_mlp():
    """A tabular-style MLP: narrow layers, where BN's Mul/Add weigh more."""
    layers = [keras.Input((32,))]
    for _ in range(4):
        layers += [L.Dense(64), L.BatchNormalization(), L.ReLU()]
    return keras.Sequential([*layers, L.Dense(1)], name="narrow_mlp")


def conv1d_net():
    layers = [keras.Input((128, 16))]
    for f in (32, 64, 64):
        layers += [L.Conv1D(f, 5, padding="same"), L.BatchNormalization(), L.ReLU()]
    return keras.Sequential(
        [*layers, L.GlobalAveragePooling1D(), L.Dense(10)], name="conv1d_net"
    )


def convtranspose_decoder():
    layers = [keras.Input((64,)), L.Dense(4 * 4 * 64), L.Reshape((4, 4, 64))]
    for f in (64, 32, 16):
        layers += [
            L.Conv2DTranspose(f, 4, strides=2, padding="same", use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
        ]
    return keras.Sequential([*layers, L.Conv2D(1, 3, padding="same")], name="decoder")


def small_convnet():
    layers = [keras.Input((28, 28, 1))]
    for f in (16, 32):
        layers += [L.Conv2D(f, 3, use_bias=False), L.BatchNormalization(), L.ReLU()]
        layers += [L.MaxPooling2D()]
    return keras.Sequential(
        [
            *layers,
            L.Flatten(),
            L.Dense(64),
            L.BatchNormalization(),
            L.ReLU(),
            L.Dense(10),
        ],
        name="small_convnet",
    )


def randomize(model, rng, layers=None):
    """Random statistics, scale and shift for the model's BatchNormalization
    layers (`layers`: those to change instead of `model.layers`)."""
    for layer in model.layers if layers is None else layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=c))
            layer.gamma.assign(rng.normal(size=c))
            layer.beta.assign(rng.normal(size=c))


def applications(specs, blocks: int, rounds: int, tmp: str) -> None:
    """Latency of `keras.applications` models: our file vs Keras's export."""
    import keras_bn
    from keras_bn.converters.export import (
        _feed,
        _session,
        input_specs,
        keras_baseline,
        node_counts,
    )

    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    print(
        f"{keras.backend.backend()}; batch 1, 1 thread, {blocks} blocks x "
        f"{rounds} rounds; load average (1 min) {load:.1f} at the start"
    )
    print(
        "| model | nodes (Keras / ours) | Keras export (ms) | ours (ms) "
        "| ratio [95% CI] | A/A [95% CI] | parity |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    notes = []
    for spec in specs:
        name, _, size = spec.partition(":")
        size = int(size or 224)
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3)
        )
        randomize(model, rng, model._flatten_layers(include_self=False))
        model = keras_bn.replace_batchnorm(model)
        path = os.path.join(tmp, f"{name}.onnx")
        try:
            report = export_onnx(model, path, samples=2, overwrite=True)
        except Exception as e:  # noqa: BLE001 - report it, time the others
            notes.append(f"{name} {size}px: export failed: {type(e).__name__}: {e}")
            continue
        x = [rng.normal(size=(1, size, size, 3)).astype("float32")]
        what, base = keras_baseline(model, input_specs(model), report.opset, x)
        notes.append(f"{name} {size}px: baseline {what}")
        with open(path, "rb") as f:
            ours = f.read()
        files = [ours, base.SerializeToString(), base.SerializeToString()]
        base_nodes = sum(node_counts(base).values())
        del base
        feeds = [_feed(_session(f), x) for f in files]
        t = blocked_latency_ms(
            lambda order, files=files: [_session(files[k]) for k in order],
            feeds,
            blocks=blocks,
            rounds=rounds,
        )
        r = median_ratio(t[..., 1], t[..., 0])
        aa = median_ratio(t[..., 1], t[..., 2])
        print(
            f"| {name} {size}px | {base_nodes} / {sum(report.nodes.values())} | "
            f"{np.median(t[..., 1]):.3f} | {np.median(t[..., 0]):.3f} | "
            f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] | "
            f"{aa[0]:.3f} [{aa[1]:.3f}, {aa[2]:.3f}] | {report.max_rel_error:.1e} |",
            flush=True,
        )
    print(f"load average (1 min) {os.getloadavg()[0]:.1f} at the end")
    for line in notes:
        print(line[:300])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="timed calls per model")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="fewer runs for slow cases: about this long per case",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument(
        "--applications",
        nargs="+",
        metavar="NAME:SIZE",
        help="time keras.applications models (e.g. MobileNetV2:96) instead",
    )
    ap.add_argument("--blocks", type=int, default=8, help="with --applications")
    ap.add_argument("--rounds", type=int, default=40, help="with --applications")
    args = ap.parse_args(argv)
    if args.applications:
        with tempfile.TemporaryDirectory() as tmp:
            applications(args.applications, args.blocks, args.rounds, tmp)
        return
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for make in (
            dense_mlp,
            paper_mlp,
            narrow_mlp,
            conv1d_net,
            convtranspose_decoder,
            small_convnet,
        ):
            model = make()
            randomize(model, rng)
            ours = os.path.join(tmp, f"{model.name}_folded.onnx")
            theirs = os.path.join(tmp, f"{model.name}_keras.onnx")
            report = export_onnx(model, ours)  # also calls the model once,
            # which Keras's own export needs
            model.export(theirs, format="onnx", verbose=False)
            for batch in args.batches:
                est = latency_ms(theirs, batch, runs=3, warmup=1) / 1e3
                runs = max(15, min(args.runs, int(args.max_seconds / (2 * est))))
                r = bench_latency(ours, theirs, batch, runs=runs)
                # Noise band: the Keras export against itself, same protocol.
                r["a_a"] = bench_latency(theirs, theirs, batch, runs=runs)["speedup"]
                rows.append((model.name, batch, r, report.max_rel_error, runs))
    print(
        "| model | batch | Keras export (ms) | folded (ms) | speed-up "
        "| A/A noise | parity | calls |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch, r, err, runs in rows:
        print(
            f"| {name} | {batch} | {r['b_ms']:.3f} | {r['a_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {r['a_a']:.2f}x | {err:.1e} | {runs} |"
        )


if __name__ == "__main__":
    main()
