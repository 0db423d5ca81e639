"""Peak memory of one ONNX export in a fresh process: keras-bn vs Keras.

Run each side in its own process under `/usr/bin/time -v` (its "Maximum
resident set size" is the number to compare), for example:

    KERAS_BACKEND=tensorflow /usr/bin/time -v .venv/bin/python \
        bench/export_memory.py ours --model ResNet50
    KERAS_BACKEND=tensorflow /usr/bin/time -v .venv/bin/python \
        bench/export_memory.py keras --model ResNet50

`ours` is `export_onnx` of the model with keras_bn's layer (fold, convert,
fold_onnx, check, verify on `--samples` random inputs); `keras` is Keras's
own `model.export(format="onnx")` of the same model with Keras's layer (after
one call, which its export needs). Random weights; the script prints the
process's peak RSS before and after the export, and `ExportReport`'s numbers.
For `ours`, a thread samples the resident memory every 5 ms and the script
prints the highest sample within each stage of `export_onnx` (its `progress`
callback) and the resident memory when the stage ends.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class StageMemory:
    """`progress` callback: the highest resident memory seen in each stage
    (sampled every `interval` seconds) and the resident memory at its end."""

    def __init__(self, interval: float = 0.005):
        self.rows = []  # (stage, peak MiB, end MiB, seconds)
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,))
        self._thread.daemon = True
        self._thread.start()

    def _sample(self, interval):
        while not self._stop.wait(interval):
            rss = _rss_mb()
            with self._lock:
                self._peak = max(self._peak, rss)

    def __call__(self, stage, seconds):
        rss = _rss_mb()
        with self._lock:
            if seconds is None:
                self._peak = rss
                return
            peak = max(self._peak, rss)
        self.rows.append((stage, peak, rss, seconds))

    def close(self):
        self._stop.set()
        self._thread.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["ours", "keras"])
    parser.add_argument("--model", default="ResNet50", help="keras.applications name")
    parser.add_argument("--size", type=int, default=224, help="input height/width")
    parser.add_argument("--samples", type=int, default=16, help="verification batch")
    args = parser.parse_args(argv)

    import keras_bn

    build = getattr(keras.applications, args.model)
    model = build(weights=None, input_shape=(args.size, args.size, 3))
    if args.which == "ours":
        model = keras_bn.replace_batchnorm(model)
    x = np.random.default_rng(0).normal(size=(1, args.size, args.size, 3))
    model(x.astype("float32"))
    before = _peak_mb()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        if args.which == "ours":
            from keras_bn.converters import export_onnx

            stages = StageMemory()
            report = export_onnx(model, path, samples=args.samples, progress=stages)
            stages.close()
            for stage, peak, end, seconds in stages.rows:
                print(
                    f"stage {stage:9s} {seconds:6.1f} s  peak {peak:6.0f} MiB  "
                    f"end {end:6.0f} MiB"
                )
            print(
                f"report: peak {report.peak_rss_mb:.0f} MiB, "
                f"+{report.rss_increase_mb:.0f}"
            )
            print(
                f"parity {report.max_rel_error:.2e}, nodes {sum(report.nodes.values())}"
            )
        else:
            model.export(path, format="onnx", verbose=False)
        # Keras's JAX export writes the weights next to the file (m.onnx.data).
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    print(
        f"{keras.backend.backend()} {args.model} {args.which}: "
        f"{time.perf_counter() - t:.1f} s, files {size / 2**20:.1f} MiB, "
        f"peak RSS before export {before:.0f} MiB, after {_peak_mb():.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
