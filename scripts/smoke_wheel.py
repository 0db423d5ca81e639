"""Smoke test of an installed keras-bn (the wheel), run outside the repository.

    python smoke_wheel.py            # from a folder outside the checkout

Checks what a user of the wheel does first, with only the installed package
(`keras-bn[tf-cpu,export]`): import; train two steps with keras_bn's layer;
`recalibrate`; `fold_batchnorm`; `export_onnx` and the same model in ONNX
Runtime against Keras (relative 1e-5); a folded `.keras` that kept a batch
norm (`ChannelAffine`) reloaded in a fresh process after `import keras_bn`
alone; the `keras-bn` command (`--version`, `export`); and, where README.md
lies next to this script, the README's quickstart (its first Python block)
pasted into a file and run.

The checks run in a child process whose stderr is captured: the smoke test
fails unless that stderr holds nothing but the command line's progress lines
(lines that start with `keras-bn`), i.e. no warnings, deprecation notices or
C++ log lines. Exit status 0 when every check passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

#: The stderr lines a run may print: the `keras-bn` command's progress lines.
PROGRESS = re.compile(r"^keras-bn\b")
RTOL = 1e-5


def _installed_outside(module, checkout_markers=("pyproject.toml", ".git")) -> None:
    """Fails if `module` was imported from a source checkout."""
    folder = os.path.dirname(os.path.abspath(module.__file__))
    parent = os.path.dirname(folder)
    found = [m for m in checkout_markers if os.path.exists(os.path.join(parent, m))]
    if found or "site-packages" not in folder:
        raise SystemExit(f"{module.__name__} imported from {folder}, not a wheel")


def checks(work: str) -> None:
    import importlib.util

    import keras
    import numpy as np

    import keras_bn
    from keras_bn.converters import ChannelAffine, export_onnx, fold_batchnorm

    _installed_outside(keras_bn)
    _installed_outside(keras_bn.converters)
    for name in ("converters", "examples"):  # no generic top-level names
        spec = importlib.util.find_spec(name)
        if spec is not None and "keras_bn" in str(spec.origin):
            raise SystemExit(f"the wheel installs a top-level {name!r}")
    print(f"keras_bn {keras_bn.__version__} from {keras_bn.__file__}")

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 64)
    inputs = keras.Input((8, 8, 3))
    h = keras_bn.BatchNormalization(name="bn_input")(inputs)  # kept: ChannelAffine
    # padding="same": the input BN cannot fold forward into this convolution.
    h = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="conv")(h)
    h = keras_bn.BatchNormalization(name="bn_conv")(h)  # folded into the conv
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(4, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert steps == 2, steps
    print(f"trained {steps} steps, loss {history.history['loss'][-1]:.4f}")

    report = keras_bn.recalibrate(model, x, batch_size=32, verbose=0)
    print(f"recalibrated {len(report.layers)} batch norms")

    folded, fold_report = fold_batchnorm(model)
    kept = [la for la in folded.layers if isinstance(la, ChannelAffine)]
    assert len(kept) == 1, fold_report
    expected = model.predict(x[:16], verbose=0)
    np.testing.assert_allclose(folded.predict(x[:16], verbose=0), expected, RTOL, 1e-6)
    print(f"folded: {str(fold_report).splitlines()[0]}")

    onnx_path = os.path.join(work, "model.onnx")
    export = export_onnx(model, onnx_path)
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x[:16]})
    error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    assert error <= RTOL, error
    print(f"ONNX Runtime vs Keras: relative error {error:.2e} (export: {export.path})")

    keras_path = os.path.join(work, "folded.keras")
    folded.save(keras_path)
    reload = (
        "import sys, keras, numpy as np, keras_bn\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "x = np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], m.predict(x, verbose=0))\n"
    )
    np.save(os.path.join(work, "x.npy"), x[:16])
    out = os.path.join(work, "reloaded.npy")
    subprocess.run(
        [sys.executable, "-c", reload, keras_path, os.path.join(work, "x.npy"), out],
        check=True,
    )
    np.testing.assert_allclose(np.load(out), expected, RTOL, 1e-6)
    print("folded .keras with ChannelAffine reloads after `import keras_bn`")

    cli = os.path.join(os.path.dirname(sys.executable), "keras-bn")
    # The command must be quiet by itself: TensorFlow's log level left unset.
    cli_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    version = subprocess.run(
        [cli, "--version"], check=True, stdout=subprocess.PIPE, text=True, env=cli_env
    ).stdout
    assert keras_bn.__version__ in version, version
    print(f"keras-bn --version: {version.strip()}")
    model_path = os.path.join(work, "model.keras")
    model.save(model_path)
    cli_onnx = os.path.join(work, "cli.onnx")
    subprocess.run([cli, "export", model_path, "-o", cli_onnx], check=True, env=cli_env)
    assert os.path.getsize(cli_onnx) > 0
    print("keras-bn export: done")

    # The README's quickstart, pasted into a file, as a newcomer runs it.
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
        quickstart = os.path.join(work, "quickstart.py")
        with open(quickstart, "w", encoding="utf-8") as f:
            f.write(blocks[0])
        subprocess.run([sys.executable, quickstart], cwd=work, check=True)
        print("README quickstart: done")


def main() -> int:
    if sys.argv[1:2] == ["--checks"]:
        checks(sys.argv[2])
        return 0
    with tempfile.TemporaryDirectory(prefix="keras-bn-smoke-") as work:
        run = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--checks", work],
            cwd=work,
            stderr=subprocess.PIPE,
            text=True,
        )
    noise = [
        line
        for line in run.stderr.splitlines()
        if line.strip() and not PROGRESS.match(line)
    ]
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        print(f"smoke test FAILED (exit {run.returncode})", file=sys.stderr)
        return 1
    if noise:
        print(
            f"smoke test FAILED: {len(noise)} stderr line(s) besides progress "
            "lines (shown above)",
            file=sys.stderr,
        )
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
