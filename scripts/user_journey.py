"""A user's journey with one `keras.applications` model, public API only.

Random weights and BN statistics; then `keras_bn.replace_batchnorm` (the
original must be left as it was), `fit` with Keras's default `compile()` on a
`tf.data` dataset whose last batch is partial (on a CPU: TensorFlow without
XLA, batch size unknown when traced), `.keras` save and load,
`converters.fold_batchnorm`, and `converters.export_onnx` (ONNX Runtime
parity checked inside). Prints each stage's result; exits non-zero on the
first failure. A manual check for a model the tests do not use:

    KERAS_BACKEND=tensorflow python scripts/user_journey.py --model ResNet101 \
        --data-format channels_first --size 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np


def rel(a, b) -> float:
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ResNet101")
    parser.add_argument("--data-format", default="channels_last")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rtol", type=float, default=1e-5)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    import keras_bn
    from keras_bn.converters import export_onnx, fold_batchnorm

    keras.config.set_image_data_format(args.data_format)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    shape = (3, args.size, args.size)
    if args.data_format == "channels_last":
        shape = shape[1:] + shape[:1]
    builder = getattr(keras.applications, args.model)
    model = builder(weights=None, input_shape=shape, classes=10)
    bns = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in bns:
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0, 0.2, c))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
    x = rng.normal(size=(4, *shape)).astype("float32")
    before = [np.array(w) for w in model.get_weights()]
    want = model.predict(x, verbose=0)

    def check(name, ok, detail):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            sys.exit(1)

    ours = keras_bn.replace_batchnorm(model)
    swapped = sum(isinstance(la, keras_bn.BatchNormalization) for la in ours.layers)
    err = rel(ours.predict(x, verbose=0), want)
    check(
        "replace", swapped == len(bns) and err <= args.rtol, f"{swapped} BN, {err:.1e}"
    )
    same = all(
        np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)
    )
    kinds = {type(layer) for layer in bns} == {keras.layers.BatchNormalization}
    check("original untouched", same and kinds, "weights and layers as given")

    ours.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    n = 20  # batches of 8, 8 and 4: the batch size is unknown when traced
    data = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(n, *shape)).astype("float32"), rng.normal(size=(n, 10)))
    ).batch(8)
    loss = ours.fit(data, epochs=2, verbose=0).history["loss"]
    check("fit", bool(np.all(np.isfinite(loss))), f"jit_compile={ours.jit_compile}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        ours.save(path)
        loaded = keras.models.load_model(path)
        reference = ours.predict(x, verbose=0)
        err = rel(loaded.predict(x, verbose=0), reference)
        check("save/load", err <= args.rtol, f"{err:.1e}")

        folded, report = fold_batchnorm(loaded)
        err = rel(folded.predict(x, verbose=0), reference)
        detail = f"{report.num_folded} of {len(bns)} folded, {err:.1e}"
        check("fold", err <= args.rtol, detail)

        onnx_report = export_onnx(loaded, os.path.join(tmp, "model.onnx"))
        parity = max(onnx_report.parity)
        nodes = sum(onnx_report.nodes.values())
        check("export_onnx", parity <= args.rtol, f"{nodes} nodes, {parity:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
