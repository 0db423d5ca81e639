"""The user's whole journey on one model, stage by stage (any backend).

`run(build, shape)` takes a model with Keras's BatchNormalization (random
weights), randomizes every BN's statistics, then:

1. `keras_bn.replace_batchnorm` -> inference parity with the original, the
   number of BNs swapped and whether the copy kept the model's class;
2. one `fit` step under `jit_compile=True` (batch of 8, SGD 1e-4, MSE to
   random targets; finite loss, statistics moved); eager on torch unless
   KERAS_BN_TORCH_INDUCTOR=1 (`fit_jit_compile`; `run(jit_compile=...)`
   chooses otherwise);
3. `.keras` save and load -> the loaded model computes the same;
4. `converters.fold_batchnorm` -> parity with the loaded model;
5. `converters.export_onnx` -> ONNX Runtime parity (checked inside);
6. the `keras-bn inspect` and `keras-bn export` commands (exit status 0);
   (5 and 6 export with the backend's route: tf2onnx, jax2onnx, torch.onnx)
7. measurements for docs/zoo.md: ONNX node counts of our file and of Keras's
   own export of the same weights with Keras's BN, and ONNX Runtime latency
   at batch 1 (one thread) with default optimizations and with
   ORT_DISABLE_ALL (`_measure`; TensorFlow only, where docs/zoo.md's table
   is made).

Each stage's outcome goes into a dict; a stage that raises is recorded as
failed with its message, and later stages that need it are skipped.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import traceback

import keras
import numpy as np

RTOL = 1e-5  # max|a - b| / max|b| per output, every comparison
FIT_BATCH = 8  # the fit step's batch (inference checks use `batch`)
FIT_LR = 1e-4  # 1e-3 blew up EfficientNetV2B0's outputs (max |y| 7e3)
BLOCKS, ROUNDS = 12, 30  # latency: fresh sessions per block, rounds per block


#: (backend, zoo name) -> why that model exports with a fixed batch size
#: (`batch`) there: what `export_onnx`'s error tells a user to do.
EXPORT_BATCH = {
    ("jax", "hub_deeplab_v3"): (
        "jax2onnx cannot trace the Resizing of its pooled branch with a free "
        "(symbolic) batch dimension"
    ),
}


def fit_jit_compile() -> bool:
    """`jit_compile` of the fit step: True, except on torch, where it means
    torch.compile with Inductor (many minutes per model on two CPU cores):
    there the step runs eagerly, Keras's default on torch, unless
    KERAS_BN_TORCH_INDUCTOR=1."""
    from tests.harness import inductor_opted_in

    return keras.backend.backend() != "torch" or inductor_opted_in()


def randomize_bn(model, rng) -> int:
    """Non-trivial BN statistics and affine parameters; returns the BN count."""
    from keras_bn._keras_graph import sublayers

    n = 0
    for layer in sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.2, c))
            n += 1
    return n


def rel(a, b) -> float:
    from converters.export import relative_error

    a = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(a)]
    b = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(b)]
    return max(relative_error(x, y) for x, y in zip(a, b, strict=True))


def _stage(result, name, fn):
    t = time.perf_counter()
    try:
        out = fn()
        result[name] = "ok"
        return out
    except Exception as e:  # noqa: BLE001 - recorded, reported in the table
        first = (str(e).strip().splitlines() or [""])[0][:160]
        result[name] = f"FAILED: {type(e).__name__}: {first}"
        result.setdefault("tracebacks", {})[name] = traceback.format_exc()
        return None
    finally:
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)


def _cli(result, *args) -> int | str:
    """The command's exit status; "raised" (message kept) if it raised."""
    from converters.cli import main

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return main([str(a) for a in args])
    except Exception as e:  # noqa: BLE001 - the CLI should have exited 1 or 2
        first = (str(e).strip().splitlines() or [""])[0][:160]
        result[f"cli_{args[0]}_error"] = f"{type(e).__name__}: {first}"
        return "raised"


def run(
    build,
    shape,
    *,
    seed: int = 0,
    measure: bool = False,
    batch: int = 2,
    jit_compile: bool | None = None,
    name: str | None = None,
):
    """Runs every stage on `build()` with inputs of `shape` (no batch axis).

    `jit_compile` of the fit step: `fit_jit_compile()` unless given
    (recorded as `result["jit_compile"]`). `name`: the model's zoo name, for
    `EXPORT_BATCH`.
    """
    import onnx

    from converters import export_onnx, fold_batchnorm
    from converters.export import keras_baseline, node_counts
    from keras_bn import replace_batchnorm

    rng = np.random.default_rng(seed)
    jit = fit_jit_compile() if jit_compile is None else jit_compile
    result = {"jit_compile": jit}
    original = build()
    result["bn_layers"] = randomize_bn(original, rng)
    result["params"] = original.count_params()
    x = rng.normal(size=(batch, *shape)).astype("float32")
    ref = original(x, training=False)

    replaced = _stage(
        result, "replace", lambda: replace_batchnorm(original, return_report=True)
    )
    if replaced is None:
        return result
    ours, report = replaced
    result["swapped"], result["route"] = report.swapped, report.route
    result["class_kept"] = type(ours) is type(original)
    result["replace_parity"] = rel(ours(x, training=False), ref)

    def fit():
        # A user's step: a batch of FIT_BATCH fresh inputs, SGD at FIT_LR, MSE to
        # random targets on the scale of the model's outputs. (Batch 2 at lr
        # 0.01 to zero targets sent Keras's own BN to NaN on ResNet50.)
        xs = rng.normal(size=(FIT_BATCH, *shape)).astype("float32")
        out = ours(xs, training=False)
        y = keras.tree.map_structure(
            lambda t: (np.std(t) * rng.normal(size=t.shape) + np.mean(t)).astype(
                "float32"
            ),
            keras.tree.map_structure(keras.ops.convert_to_numpy, out),
        )
        if hasattr(ours, "backbone") and hasattr(ours, "num_classes"):
            # A keras_hub classifier: class labels, its own loss and metrics.
            y = rng.integers(0, ours.num_classes, size=FIT_BATCH)
            ours.compile(optimizer=keras.optimizers.SGD(FIT_LR), jit_compile=jit)
        else:
            ours.compile(
                optimizer=keras.optimizers.SGD(FIT_LR), loss="mse", jit_compile=jit
            )
        before = [np.array(v) for v in ours.non_trainable_weights]
        loss = ours.fit(xs, y, batch_size=FIT_BATCH, epochs=1, verbose=0).history[
            "loss"
        ]
        after = [np.array(v) for v in ours.non_trainable_weights]
        if not np.isfinite(loss[0]):
            raise FloatingPointError(f"loss {loss[0]}")
        if not all(
            np.isfinite(keras.ops.convert_to_numpy(t)).all()
            for t in keras.tree.flatten(ours(x, training=False))
        ):
            raise FloatingPointError("outputs not finite after the step")
        moved = any(
            not np.array_equal(a, b) for a, b in zip(before, after, strict=True)
        )
        if before and not moved:
            raise AssertionError("no moving statistic changed")

    _stage(result, "fit_jit", fit)

    with tempfile.TemporaryDirectory() as tmp:
        keras_path = os.path.join(tmp, "model.keras")

        def save_load():
            ours.save(keras_path)
            loaded = keras.saving.load_model(keras_path)
            err = rel(loaded(x, training=False), ours(x, training=False))
            if err != 0.0:
                raise AssertionError(f"loaded model differs: {err:.2e}")
            return loaded

        loaded = _stage(result, "save_load", save_load)
        if loaded is None:
            return result
        now = loaded(x, training=False)

        folded = _stage(result, "fold", lambda: fold_batchnorm(loaded))
        if folded is not None:
            model, report = folded
            result["fold_parity"] = rel(model(x, training=False), now)
            result["folded"], result["kept"] = report.num_folded, report.num_kept

        result["cli_inspect"] = _cli(result, "inspect", keras_path)
        onnx_path = os.path.join(tmp, "model.onnx")
        fixed = EXPORT_BATCH.get((keras.backend.backend(), name))
        result["export_batch_size"] = batch if fixed else None
        export = _stage(
            result,
            "export_onnx",
            lambda: export_onnx(
                loaded, onnx_path, samples=2, batch_size=result["export_batch_size"]
            ),
        )
        if export is not None:
            result["onnx_parity"] = export.max_rel_error
            result["nodes"] = sum(export.nodes.values())
            result["bn_nodes_left"] = export.nodes.get("BatchNormalization", 0)
        result["cli_export"] = _cli(
            result,
            "export",
            keras_path,
            "-o",
            os.path.join(tmp, "cli.onnx"),
            "--samples",
            2,
            *(["--batch-size", batch] if fixed else []),
        )
        if measure and export is not None and keras.backend.backend() == "tensorflow":
            _stage(
                result,
                "measure",
                lambda: _measure(
                    result, loaded, onnx.load(onnx_path), keras_baseline, node_counts
                ),
            )
    return result


def _measure(result, model, proto, keras_baseline, node_counts):
    """Node counts and latency against Keras's export of the same weights.

    The baseline is `model` (the keras_bn model that was exported) with
    Keras's BatchNormalization swapped back in: same weights, so the two
    files differ only in who folded batch normalization. Latency: batch 1,
    one thread, `BLOCKS` blocks of freshly made sessions (ours, baseline,
    baseline again for A/A) of `ROUNDS` interleaved rounds each; the ratio is
    the median of the paired per-round ratios, with a bootstrap 95% interval.
    """
    import onnxruntime as ort

    from converters._tf_convert import signature_of
    from converters.bench import blocked_latency_ms, median_ratio

    signature = signature_of(model)
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(1, *s.shape[1:])).astype("float32") for s in signature]
    what, base = keras_baseline(model, signature, 17, arrays)
    result["baseline"] = what
    result["keras_nodes"] = sum(node_counts(base).values())
    files = [proto.SerializeToString(), base.SerializeToString()]
    files.append(files[1])
    feeds = []
    for p in (proto, base, base):
        inits = {i.name for i in p.graph.initializer}
        names = [i.name for i in p.graph.input if i.name not in inits]
        feeds.append(dict(zip(names, arrays, strict=True)))
    for level, key in (
        (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "ratio_default"),
        (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "ratio_disable_all"),
    ):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.graph_optimization_level = level

        def make(order, opts=opts):
            return [
                ort.InferenceSession(files[k], opts, providers=["CPUExecutionProvider"])
                for k in order
            ]

        t = blocked_latency_ms(make, feeds, blocks=BLOCKS, rounds=ROUNDS)
        # > 1: our file is faster than Keras's export; A/A: baseline vs itself.
        aa = key.replace("ratio", "aa")
        result[key], *result[key + "_ci"] = median_ratio(t[..., 1], t[..., 0])
        result[aa], *result[aa + "_ci"] = median_ratio(t[..., 1], t[..., 2])
        result[key.replace("ratio", "ms")] = float(np.median(t[..., 0]))
        result[key.replace("ratio", "base_ms")] = float(np.median(t[..., 1]))
