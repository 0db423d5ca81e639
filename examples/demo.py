"""The main job (`make demo`): the paper's MNIST experiment, then deployment.

1. Trains the paper's 784-100-100-100-10 sigmoid network on real MNIST with
   and without `keras_bn.BatchNormalization` (a shortened run of
   `examples/mnist_sigmoid.py`), printing both test accuracies and the
   activation statistics of a sigmoid input (stable with BN, drifting without).
2. Folds the trained BN network's population statistics into its Dense
   layers, exports it to ONNX (tf2onnx on TensorFlow, jax2onnx on JAX,
   `torch.onnx` on torch), verifies it with ONNX Runtime against Keras, and
   times it against Keras's own (unfolded) ONNX export.

Runs in under 3 minutes on 2 CPU cores on TensorFlow, the default backend
here; set KERAS_BACKEND=jax or torch to run it on another:

    python examples/demo.py [--steps 30000] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

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

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=FutureWarning)  # tf2onnx's np.object


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from keras_bn.converters import bench_latency, export_onnx

    from . import mnist_sigmoid
    from .mnist import load_mnist

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the demo's own folder: every run starts clean
    out.mkdir(parents=True)
    start = time.perf_counter()

    print(f"== 1. MNIST, sigmoid MLP, batch 60, {args.steps} SGD steps per net ==")
    results = mnist_sigmoid.run(
        steps=args.steps, out=out / "mnist_sigmoid", seed=args.seed
    )
    model = results["models"]["batchnorm"]

    print("== 2. Fold BN, export to ONNX, verify with ONNX Runtime ==")
    (_, _), (x_test, _) = load_mnist(flatten=True)
    folded_path = out / "mnist_bn_folded.onnx"
    report = export_onnx(model, folded_path, inputs=[x_test[:256]])
    print(report)
    keras_path = out / "mnist_bn_keras_export.onnx"
    model.export(str(keras_path), format="onnx", verbose=False)
    for batch in (1, 256):
        r = bench_latency(folded_path, keras_path, batch, runs=200, threads=1)
        print(
            f"ONNX Runtime, 1 thread, batch {batch}: folded {r['a_ms']:.3f} ms, "
            f"Keras's model.export {r['b_ms']:.3f} ms -> {r['speedup']:.2f}x"
        )
    print(f"done in {time.perf_counter() - start:.0f} s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
