"""Runs the conformance zoo and writes docs/zoo.md (TensorFlow backend).

    KERAS_BACKEND=tensorflow python -m tests.zoo.make_table [-o docs/zoo.md]
                                        [--models ResNet50 ...] [--timeout 1800]

Each keras.applications model runs in its own process (a crash or a timeout
fails that row only) through `tests/zoo/pipeline.py` with measurements on:
ONNX node counts of our folded export and of Keras's own
`model.export(format="onnx")` of the same weights with Keras's BN, and ONNX
Runtime latency ratios at batch 1, one thread, with default graph
optimizations and with ORT_DISABLE_ALL (median paired ratio over blocks of
fresh sessions, with a bootstrap 95% interval; see `tests/zoo/pipeline.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one(name: str, out: str) -> None:
    import keras

    from tests.zoo.models import APPLICATIONS
    from tests.zoo.pipeline import run

    build, shape = APPLICATIONS[name]
    t = time.perf_counter()
    result = run(build, shape, measure=True, name=name)
    result["total_s"] = round(time.perf_counter() - t, 1)
    # Peak resident memory of this process (Linux: KiB), every stage included.
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["keras"] = keras.__version__
    result.pop("tracebacks", None)
    with open(out, "w") as f:
        json.dump(result, f)


def _fmt(v, spec=".1e"):
    return "" if v is None else format(v, spec)


def _ratio(r, key):
    """`0.99 [0.97, 1.01]`: median paired ratio and its bootstrap 95% interval."""
    ci = r.get(key + "_ci")
    ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return _fmt(r.get(key), ".2f") + ci


def _row(name, r) -> str:
    stages = ("replace", "fit_jit", "save_load", "fold", "export_onnx")
    failed = [f"{s}: {r[s]}" for s in stages if r.get(s, "ok") != "ok"]
    cli = r.get("cli_inspect") == 0 and r.get("cli_export") == 0
    ok = (
        not failed
        and cli
        and all(
            (r.get(k) or 0) <= 1e-5
            for k in ("replace_parity", "fold_parity", "onnx_parity")
        )
    )
    status = "pass" if ok else "FAIL " + "; ".join(failed or ["see row"])
    cells = [
        name,
        status,
        f"{r.get('params', 0) / 1e6:.1f}M",
        _fmt(r.get("replace_parity")),
        _fmt(r.get("fold_parity")),
        _fmt(r.get("onnx_parity")),
        f"{r.get('folded', '')}/{r.get('kept', '')}",
        str(r.get("nodes", "")),
        str(r.get("keras_nodes", "")),
        _ratio(r, "ratio_default"),
        _ratio(r, "aa_default"),
        _ratio(r, "ratio_disable_all"),
        _ratio(r, "aa_disable_all"),
        f"{r.get('cli_inspect', '-')}/{r.get('cli_export', '-')}",
        _fmt(r.get("total_s"), ".0f"),
        _fmt(r.get("peak_rss_gb"), ".1f"),
    ]
    return "| " + " | ".join(cells) + " |"


def _render(results: dict, wall: float, note: str) -> str:
    """The markdown page; `wall`: seconds, the sum of the models' times."""
    from tests.zoo.models import MISSING

    head = [
        "model",
        "result",
        "params",
        "replace parity",
        "fold parity",
        "ORT parity",
        "BN folded/kept",
        "ONNX nodes (ours)",
        "ONNX nodes (Keras export)",
        "latency ratio, ORT default",
        "A/A",
        "latency ratio, ORT_DISABLE_ALL",
        "A/A",
        "CLI inspect/export",
        "seconds",
        "peak RSS (GiB)",
    ]
    lines = [
        "# Conformance zoo: keras.applications through keras-bn",
        "",
        "Produced by `KERAS_BACKEND=tensorflow python -m tests.zoo.make_table` "
        "(`make zoo-table`); the same pipeline is asserted by `make zoo` "
        "(`pytest -m zoo tests/zoo`) and, on tiny models of each failure class, "
        "by `tests/test_conformance.py` in every test run.",
        "",
        "Per model (random weights, randomized BN statistics, batch of 2): "
        "`replace_batchnorm` (parity vs the original), one `fit` step with "
        "`jit_compile=True` (8 fresh inputs, SGD 1e-4, MSE to random targets on "
        "the outputs' scale; finite loss and outputs), `.keras` save/load, "
        "`fold_batchnorm` (parity vs the loaded model), `export_onnx` (ONNX "
        "Runtime parity vs Keras), "
        "`keras-bn inspect` and `keras-bn export` (exit status). Parity is "
        "`max|a - b| / max|b|`, tolerance 1e-5.",
        "",
        "ONNX nodes (Keras export): Keras's own `model.export(format='onnx')` of "
        "the same weights (the model after the fit step) with Keras's BN; where "
        "that export fails or needs extra inputs, the tf2onnx conversion of that "
        "model (see the notes). Latency ratio = Keras-export latency / our "
        "folded file's latency (> 1: ours is faster), ONNX Runtime, batch 1, one "
        "thread: 12 blocks of freshly made sessions (ours, the baseline, the "
        "baseline again), in a random order, 30 rounds each in a random order; "
        "the median of the 360 paired per-round ratios, with its bootstrap 95% "
        "interval (blocks, then rounds, resampled). A/A = the baseline against "
        "its second session, same protocol: the noise floor, including the "
        "10-20% a session can gain or lose from where its buffers land.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with "
        f"other jobs; {note}; per-model times add up to {wall / 60:.0f} min.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    from tests.zoo.models import APPLICATIONS

    lines += [_row(n, r) for n, r in results.items()]
    lines += [
        f"| {n} | not run (the run stopped before it) |" + " |" * 14
        for n in APPLICATIONS
        if n not in results
    ]
    lines += ["", "Notes:", ""]
    for n, r in results.items():
        if r.get("baseline") and not r["baseline"].startswith("Keras's model.export"):
            lines.append(f"- {n}: baseline is the {r['baseline']}.")
    for family, why in MISSING.items():
        lines.append(f"- {family}: {why}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tests.zoo.models import APPLICATIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default=os.path.join(ROOT, "docs", "zoo.md"))
    p.add_argument("--models", nargs="*", default=list(APPLICATIONS))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    p.add_argument(
        "--json-dir",
        help="keep each model's result as NAME.json here, and render the table "
        "from the results already there (rows of a run that stopped early)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="with --json-dir: write the table from the results there, run nothing",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        _one(args.one, args.json)
        return 0
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.json_dir or tmp
        os.makedirs(folder, exist_ok=True)
        for name in args.models:
            out = os.path.join(folder, f"{name}.json")
            if args.json_dir and os.path.exists(out):
                with open(out) as f:
                    results[name] = json.load(f)
                continue
            if args.render_only:
                continue
            cmd = [sys.executable, "-m", "tests.zoo.make_table", "--one", name]
            try:
                proc = subprocess.run(
                    [*cmd, "--json", out],
                    env=env,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
                if proc.returncode == 0:
                    with open(out) as f:
                        results[name] = json.load(f)
                else:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                    results[name] = {"replace": f"FAILED: process: {tail[0][:160]}"}
            except subprocess.TimeoutExpired:
                results[name] = {"replace": f"FAILED: over {args.timeout} s"}
            print(name, results[name].get("total_s"), flush=True)
    _write(args.output, results)
    return 0


def _write(path, results) -> None:
    import keras
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    note = (
        f"Keras {keras.__version__}, TensorFlow {tf.__version__}, tf2onnx "
        f"{tf2onnx.__version__}, ONNX Runtime {onnxruntime.__version__}"
    )
    with open(path, "w") as f:
        wall = sum(r.get("total_s", 0) for r in results.values())
        f.write(_render(results, wall, note))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
