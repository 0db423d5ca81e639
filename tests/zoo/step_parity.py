"""One training step of keras_bn against Keras's BatchNormalization, with its
noise floor (TensorFlow backend).

    KERAS_BACKEND=tensorflow python -m tests.zoo.step_parity [--model ResNet50]
                                        [--size 64] [--batch 8] [--lr 1e-4]

Builds a keras.applications model (random weights, randomized BN statistics),
and from the same weights takes the zoo's fit step (SGD, MSE to random targets
on the scale of the outputs, one batch) three times: Keras's BN under
`jit_compile=True`, keras_bn under `jit_compile=True`, and Keras's BN under
`jit_compile=False` (A/A: the same layer, another float32 summation order).
Prints, for keras_bn vs Keras and for the A/A pair, the relative difference
of the weight updates `||du - dk|| / ||dk||` over all trainable weights and
of the inference outputs after the step (`max|a - b| / max|b|`). A random
deep net amplifies float32 rounding, so the A/A numbers are the yardstick.
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np

from tests.zoo.pipeline import FIT_LR, randomize_bn


def _step(model, x, y, lr, jit):
    before = [np.array(w) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse", jit_compile=jit)
    loss = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    update = np.concatenate(
        [
            (np.array(w) - b).ravel()
            for w, b in zip(model.trainable_weights, before, strict=True)
        ]
    )
    out = keras.ops.convert_to_numpy(model(x, training=False))
    return loss.history["loss"][0], update, out


def main(argv=None) -> int:
    from keras_bn import replace_batchnorm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ResNet50")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=FIT_LR)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    original = getattr(keras.applications, args.model)(
        weights=None,
        input_shape=(args.size, args.size, 3),
        classes=10,
        classifier_activation=None,
    )
    randomize_bn(original, rng)
    ours = replace_batchnorm(original)
    twin = keras.models.clone_model(original)
    twin.set_weights(original.get_weights())
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(original(x, training=False))
    y = (out.std() * rng.normal(size=out.shape) + out.mean()).astype("float32")

    k_loss, k_upd, k_out = _step(original, x, y, args.lr, True)
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, lr {args.lr}")
    print(
        f"step moved the outputs by {np.abs(k_out - out).max() / np.abs(out).max():.2e}"
    )
    for name, model, jit in (("keras_bn vs Keras", ours, True), ("A/A", twin, False)):
        loss, upd, got = _step(model, x, y, args.lr, jit)
        print(
            f"{name}: loss {loss:.6g} vs {k_loss:.6g}; updates "
            f"{np.linalg.norm(upd - k_upd) / np.linalg.norm(k_upd):.2e}; outputs "
            f"{np.abs(got - k_out).max() / np.abs(k_out).max():.2e}; finite "
            f"{bool(np.isfinite(got).all())}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
