"""Synchronized BN in data-parallel training on the CPU, then recalibration.

Trains a small conv net on MNIST data-parallel (each replica sees its part of
every global batch), once with `synchronized=True` (the statistics of the
global batch) and once with `synchronized=False` (each replica's part), and
prints the test accuracy before and after `keras_bn.recalibrate` replaces the
moving statistics with the exact ones. Three ways to run it:

    python examples/distributed.py --subset 6000 --epochs 2
    python examples/distributed.py --workers 2 --subset 6000 --epochs 2
    python examples/distributed.py --workers 2 --backend jax --subset 6000

* One process (default): `tf.distribute.MirroredStrategy` over `--devices`
  logical CPU devices (JAX: `keras.distribution.DataParallel` over as many
  host devices).
* `--workers N`: the script starts N local worker processes itself, on free
  localhost ports: TensorFlow's `MultiWorkerMirroredStrategy` (through
  `TF_CONFIG`, one replica per process; Keras 3.15's `fit` needs
  examples/multi_worker_fit.py there), or JAX's `jax.distributed` (through
  `keras.distribution.initialize`, Gloo CPU collectives) with
  `keras.distribution.DataParallel` over all processes' devices. When they
  finish it prints worker 0's output and a digest of every worker's moving
  statistics. On a real
  cluster, start one worker per machine with the same `--cluster` and its own
  `--worker-index`.

Evaluation and recalibration run on a one-device copy of the trained model (as
deployment would). TensorFlow's `jit_compile` stays off: TensorFlow cannot
XLA-compile the replicated step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["tensorflow", "jax"], default="tensorflow")
    p.add_argument("--devices", type=int, default=2, help="CPU devices (1 process)")
    p.add_argument("--workers", type=int, default=0, help="local worker processes")
    p.add_argument(
        "--worker-index", type=int, default=None, help="this worker (with --cluster)"
    )
    p.add_argument(
        "--cluster", default=None, help="host:port of every worker, comma-separated"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds, --workers")
    p.add_argument("--subset", type=int, default=6000, help="training examples")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="steps per epoch")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--recal-examples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.workers == 1 or args.workers < 0:
        p.error(f"--workers must be 0 (one process) or at least 2, got {args.workers}")
    if args.worker_index is not None and not args.cluster:
        p.error("--worker-index needs --cluster host:port,host:port,...")
    return args


def build_model(keras, keras_bn, synchronized: bool, cls=None):
    def bn():
        return keras_bn.BatchNormalization(synchronized=synchronized)

    return (cls or keras.Sequential)(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, use_bias=False),
            bn(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, use_bias=False),
            bn(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


# -- the launcher (--workers N) -----------------------------------------------------


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(args, argv) -> dict:
    """Starts `args.workers` local workers; prints worker 0's output."""
    cluster = ",".join(f"localhost:{p}" for p in free_ports(args.workers))
    print(f"{args.workers} {args.backend} workers on {cluster}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(args.workers):
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
            cmd += ["--worker-index", str(i), "--cluster", cluster]
            out, err = (open(Path(tmp, f"{i}.{s}"), "w") for s in ("out", "err"))
            with out, err:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=err))
        wait_all(procs, args.timeout)
        outputs = [Path(tmp, f"{i}.out").read_text() for i in range(args.workers)]
        errors = [Path(tmp, f"{i}.err").read_text() for i in range(args.workers)]
    codes = [p.returncode for p in procs]
    if any(codes):
        print(outputs[0], end="")
        for i, code in enumerate(codes):
            print(f"--- worker {i}: exit {code}\n{errors[i][-3000:]}", file=sys.stderr)
        raise SystemExit(1)
    print("".join(outputs[0].splitlines(keepends=True)[:-1]), end="")
    results = [json.loads(out.splitlines()[-1]) for out in outputs]
    for name in results[0]:
        digests = [r[name]["digest"] for r in results]
        same = "identical" if len(set(digests)) == 1 else "different"
        print(f"{name} BN: moving statistics on the {args.workers} workers: {same}")
        for i, d in enumerate(digests):
            print(f"  worker {i}: sha1 {d}")
    return {"workers": results}


def wait_all(procs, timeout: float) -> None:
    """Waits for every process; kills the rest when one fails or time is up.

    A worker whose peer died waits for it forever inside a collective.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if None not in codes or any(codes):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- one process: setup per backend --------------------------------------------------


def setup_tensorflow(args):
    """(scope, model class, fit arguments maker) for tf.distribute."""
    if args.worker_index is not None and "TF_CONFIG" not in os.environ:
        os.environ["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": args.cluster.split(",")},
                "task": {"type": "worker", "index": args.worker_index},
            }
        )
    import tensorflow as tf

    if args.worker_index is None:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices
        )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    from .multi_worker_fit import MultiWorkerFit

    class Sequential(MultiWorkerFit, keras.Sequential):
        pass

    def fit_data(x, y):
        if args.worker_index is None:
            return dict(x=x, y=y, batch_size=args.batch_size)
        return dict(x=global_batches(tf, args, x, y), shuffle=False)

    return strategy.scope, Sequential, fit_data, strategy.num_replicas_in_sync


def setup_jax(args):
    """(scope, model class, fit arguments maker) for keras.distribution."""
    if args.worker_index is None:
        flags = os.environ.get("XLA_FLAGS", "")
        count = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{flags} {count}".strip()
    import keras

    if args.worker_index is not None:
        coordinator = args.cluster.split(",")[0]
        keras.distribution.initialize(coordinator, args.workers, args.worker_index)
    import tensorflow as tf

    devices = keras.distribution.list_devices()
    distribution = keras.distribution.DataParallel(devices=devices)

    def fit_data(x, y):
        if args.worker_index is None:
            return dict(x=x, y=y, batch_size=args.batch_size)
        # Keras gives each process its part of every global batch.
        return dict(x=global_batches(tf, args, x, y), shuffle=False)

    return distribution.scope, keras.Sequential, fit_data, len(devices)


def global_batches(tf, args, x, y):
    """A tf.data pipeline of global batches, the same in every worker."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed)
    ds = ds.batch(args.batch_size, drop_remainder=True)
    options = tf.data.Options()  # Split every batch over the workers.
    policy = tf.data.experimental.AutoShardPolicy.DATA
    options.experimental_distribute.auto_shard_policy = policy
    return ds.with_options(options)


def local_weights(model) -> list:
    """This process's copy of every weight, as NumPy arrays."""
    import numpy as np

    out = []
    for v in model.weights:
        value = v.value
        if hasattr(value, "addressable_data"):  # JAX: replicated over processes.
            value = value.addressable_data(0)
        out.append(np.asarray(value))
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.workers and args.worker_index is None:
        return launch(args, argv)
    os.environ["KERAS_BACKEND"] = args.backend
    setup = setup_tensorflow if args.backend == "tensorflow" else setup_jax
    scope, model_cls, fit_data, replicas = setup(args)
    import keras
    import numpy as np

    import keras_bn
    from keras_bn.recalibrate import recalibrate

    from .mnist import load_mnist

    chief = args.worker_index in (None, 0)
    say = print if chief else (lambda *a, **k: None)
    (x_train, y_train), (x_test, y_test) = load_mnist(flatten=False)
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(x_train))[: args.subset]
    x_train, y_train = x_train[idx], y_train[idx]
    say(
        f"{args.backend}: {replicas} replicas, global batch {args.batch_size} "
        f"({args.batch_size // replicas} per replica), "
        f"{len(x_train)} training examples"
    )
    results = {}
    init = None
    for synchronized in (True, False):
        keras.utils.set_random_seed(args.seed)
        with scope():
            model = build_model(keras, keras_bn, synchronized, model_cls)
            if init is None:
                init = local_weights(model)
            model.set_weights(init)  # Same start for both runs.
            model.compile(
                keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=False if args.backend == "tensorflow" else "auto",
            )
            start = time.perf_counter()
            model.fit(
                **fit_data(x_train, y_train),
                epochs=args.epochs,
                steps_per_epoch=args.steps,
                verbose=0,
            )
            train_s = time.perf_counter() - start
        weights = local_weights(model)
        moving = [
            w for v, w in zip(model.weights, weights, strict=True) if "moving" in v.path
        ]
        digest = hashlib.sha1(b"".join(w.tobytes() for w in moving)).hexdigest()[:16]
        # A one-device copy (no strategy / distribution), as deployment uses.
        copy = build_model(keras, keras_bn, synchronized)
        copy.set_weights(weights)
        copy.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        before = copy.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
        report = recalibrate(
            copy, x_train[: args.recal_examples], batch_size=250, verbose=0
        )
        after = copy.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
        name = "synchronized" if synchronized else "per-replica"
        results[name] = dict(
            train_s=train_s,
            before=float(before),
            after=float(after),
            gap=float(report.max_gap),
            digest=digest,
        )
        say(f"\n== {name} BN: trained in {train_s:.1f} s")
        if args.backend == "jax" and not synchronized:
            say("(on JAX the statistics are those of the global batch either way)")
        say(report)
        say(
            f"test accuracy: {before:.4f} with the moving averages, "
            f"{after:.4f} after recalibration"
        )
    if args.worker_index is not None:  # The launcher reads the last line.
        print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
