"""`export_onnx`: fold, convert with tf2onnx, check, and prove parity with ORT."""

from __future__ import annotations

import collections
import dataclasses
import os
import time

import keras
import numpy as np

from converters._deps import require, require_tensorflow_backend
from converters._io import atomic_write_bytes, check_output_path
from converters._tf_convert import signature_of, to_onnx
from converters.bench import blocked_latency_ms
from converters.fold_keras import fold_batchnorm
from converters.report import FoldReport
from keras_bn import _keras_graph


class ParityError(RuntimeError):
    """ONNX Runtime's outputs differ from Keras's beyond the tolerance.

    Attributes:
        report: The `ExportReport` (nothing was written to `report.path`).
    """

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class ExportReport:
    """What `export_onnx` did.

    Attributes:
        path: The ONNX file written.
        opset: ONNX opset.
        fold_report: The `FoldReport`, or `None` with `fold=False`.
        parity: Per model output, the relative error of ONNX Runtime against
            the input Keras model: `max|onnx - keras| / max|keras|` over all
            elements (`None` when `verify=False`).
        rtol: The tolerance `parity` was checked against.
        nodes: ONNX node counts by op type of the file written.
        file_size: Bytes written.
        timings: Seconds spent folding, converting, verifying, benchmarking.
        baseline: With `benchmark=True`, what the file was timed against
            (e.g. Keras's own `model.export` of the model with Keras's
            `BatchNormalization`); else `None`.
        baseline_nodes: Node counts of that baseline file.
        latency_ms: With `benchmark=True`, ONNX Runtime latency (batch 1,
            one thread, default graph optimizations, median of 100 calls
            interleaved over 5 blocks of fresh sessions) of `"exported"` and
            `"baseline"`.
    """

    path: str
    opset: int
    fold_report: FoldReport | None
    parity: list[float] | None
    rtol: float
    nodes: dict[str, int]
    file_size: int
    timings: dict[str, float]
    baseline: str | None = None
    baseline_nodes: dict[str, int] = dataclasses.field(default_factory=dict)
    latency_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def max_rel_error(self) -> float | None:
        return None if self.parity is None else max(self.parity, default=0.0)

    @property
    def speedup(self) -> float | None:
        """Baseline over exported ONNX Runtime latency, when measured."""
        lat = self.latency_ms
        if "exported" in lat and "baseline" in lat:
            return lat["baseline"] / lat["exported"]
        return None

    def __str__(self) -> str:
        lines = [
            f"ONNX file: {self.path} ({self.file_size} bytes, opset {self.opset})",
            f"nodes: {sum(self.nodes.values())} {dict(sorted(self.nodes.items()))}",
        ]
        if self.parity is not None:
            lines.append(
                f"parity: max relative error {self.max_rel_error:.2e} "
                f"(tolerance {self.rtol:.0e})"
            )
        if self.baseline is not None:
            lines.append(
                f"baseline: {self.baseline}: {sum(self.baseline_nodes.values())} "
                f"nodes {dict(sorted(self.baseline_nodes.items()))}"
            )
        if self.speedup is not None:
            lat = self.latency_ms
            lines.append(
                f"ONNX Runtime latency (batch 1, 1 thread): {lat['exported']:.3f} ms "
                f"vs baseline {lat['baseline']:.3f} ms: {self.speedup:.2f}x"
            )
        if self.fold_report is not None:
            lines.append(str(self.fold_report))
        return "\n".join(lines)


def node_counts(proto) -> dict[str, int]:
    """Number of nodes of each op type in an ONNX `ModelProto` (top graph)."""
    return dict(collections.Counter(n.op_type for n in proto.graph.node))


def _session(data: bytes, optimize: bool = True):
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _sample_inputs(signature, samples, seed):
    rng = np.random.default_rng(seed)
    out = []
    for spec in signature:
        shape = list(spec.shape)
        if None in shape[1:]:
            raise ValueError(
                f"Input {spec.name!r} has unknown non-batch dimensions {shape}; "
                "pass `inputs=` (arrays to verify with) or `input_signature=` "
                "with those dimensions fixed."
            )
        shape[0] = samples
        dtype = np.dtype(spec.dtype.as_numpy_dtype)
        if dtype.kind in "iub":  # indices (e.g. Embedding): 0 or 1
            out.append(rng.integers(0, 2, size=shape).astype(dtype))
        else:
            out.append(rng.normal(size=shape).astype(dtype))
    return out


def relative_error(got, ref) -> float:
    """`max|got - ref| / max|ref|` over all elements (0/0 counts as 0)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    diff = float(np.abs(got - ref).max(initial=0.0))
    scale = float(np.abs(ref).max(initial=0.0))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def export_onnx(
    model,
    path,
    *,
    fold: bool = True,
    opset: int = 17,
    input_signature=None,
    verify: bool = True,
    inputs=None,
    samples: int = 16,
    rtol: float = 1e-5,
    overwrite: bool = False,
    seed: int = 0,
    benchmark: bool = False,
) -> ExportReport:
    """Folds batch normalization away and exports a Keras model to ONNX.

    The model is folded with `fold_batchnorm`, converted once with tf2onnx
    (`model(x, training=False)`, frozen so that constants such as a
    `Normalization` layer's mean fold into the graph and the file has exactly
    the model's inputs; grouped convolutions become an ONNX `Conv` with
    `group`), checked with `onnx.checker`, and run with ONNX Runtime against
    the input Keras model. Nothing is written if a check fails; the file is
    written atomically and an existing file is replaced only with
    `overwrite=True`. TensorFlow backend only.

    Args:
        model: A Sequential or Functional Keras model; a subclassed model
            with `fold=False` and an `input_signature` (its `call` is traced).
        path: Output `.onnx` file.
        fold: Fold batch normalization first (`False`: plain tf2onnx export).
        opset: ONNX opset.
        input_signature: Optional list of `tf.TensorSpec`; defaults to the
            model's inputs with a free batch dimension.
        verify: Run ONNX Runtime and check parity.
        inputs: Optional list of arrays to verify with (one per input);
            default: `samples` standard-normal rows per float input (0 or 1
            for integer inputs; pass realistic `inputs` where that matters).
        samples: Batch size of the random verification inputs.
        rtol: Tolerance on `max|onnx - keras| / max|keras|` per output.
        overwrite: Replace an existing `path`.
        seed: Seed of the random verification inputs.
        benchmark: Also time the file under ONNX Runtime (batch 1, one
            thread) against a baseline: Keras's own `model.export(format=
            "onnx")` of the same architecture and weights with Keras's
            `BatchNormalization` (when Keras's export fails or its file needs
            other inputs, the plain tf2onnx conversion of that model; the
            report says which).

    Returns:
        An `ExportReport`.

    Raises:
        ParityError: If ONNX Runtime disagrees with Keras beyond `rtol`.
        FileExistsError: If `path` exists and `overwrite` is False.
        RuntimeError: On a backend other than TensorFlow.

    Example:

    >>> report = export_onnx(model, "model.onnx")  # doctest: +SKIP
    >>> print(report.max_rel_error, report.nodes)  # doctest: +SKIP
    """
    require_tensorflow_backend("export_onnx")
    onnx = require("onnx")
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Argument `model` must be a keras.Model. Received: {type(model).__name__}"
        )
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"Argument `opset` must be an int >= 13. Received: {opset!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(
            f"Argument `samples` must be a positive int. Received: {samples!r}"
        )
    graph_model = _keras_graph.is_graph_model(model)
    if not graph_model and fold:
        raise TypeError(
            f"{model.name!r} is a subclassed {type(model).__name__}: its `call` "
            "cannot be rewritten to fold batch normalization. Rebuild it with "
            "the Functional API, or export it unfolded with `fold=False, "
            "input_signature=[tf.TensorSpec((None, ...), 'float32')]` "
            "(CLI: `--no-fold`)."
        )
    path = check_output_path(path, overwrite)
    timings = {}
    signature = signature_of(model, input_signature)

    t = time.perf_counter()
    fold_report, target = None, model
    if fold:
        target, fold_report = fold_batchnorm(model)
    timings["fold_s"] = time.perf_counter() - t

    t = time.perf_counter()
    proto = to_onnx(target, signature, opset)
    timings["convert_s"] = time.perf_counter() - t
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()

    report = ExportReport(
        path=path,
        opset=opset,
        fold_report=fold_report,
        parity=None,
        rtol=rtol,
        nodes=node_counts(proto),
        file_size=len(data),
        timings=timings,
    )
    arrays = _sample_inputs(signature, samples, seed) if inputs is None else inputs
    arrays = [np.asarray(a) for a in keras.tree.flatten(arrays)]
    if verify:
        t = time.perf_counter()
        sess = _session(data)
        feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays, strict=True)}
        got = sess.run(None, feed)
        keras_in = _keras_graph.pack_inputs(model, arrays)
        ref = keras.tree.flatten(model(keras_in, training=False))
        report.parity = [
            relative_error(g, keras.ops.convert_to_numpy(r))
            for g, r in zip(got, ref, strict=True)
        ]
        timings["verify_s"] = time.perf_counter() - t
        if not report.max_rel_error <= rtol:
            raise ParityError(
                f"ONNX Runtime disagrees with Keras: max relative error "
                f"{report.max_rel_error:.3e} > rtol={rtol:g} (per output: "
                f"{report.parity}); nothing was written to {path!r}.",
                report,
            )
    if benchmark:
        t = time.perf_counter()
        _benchmark(report, model, data, signature, opset, [a[:1] for a in arrays])
        timings["benchmark_s"] = time.perf_counter() - t
    atomic_write_bytes(path, data, overwrite=overwrite)
    report.file_size = os.path.getsize(path)
    return report


def keras_baseline(model, signature, opset: int, arrays: list):
    """(description, ONNX proto) of Keras's own export of `model`.

    The model's keras_bn layers are swapped back for Keras's
    `BatchNormalization` (same weights) and exported with
    `model.export(format="onnx")` (after one call on `arrays`, which Keras's
    export needs). When that fails or the file needs inputs
    the model does not have, the same model is converted with this module's
    converter instead, and the description says so.
    """
    import tempfile

    from keras_bn.replace import to_keras_batchnorm

    onnx = require("onnx")
    what = "Keras's BatchNormalization"
    if _keras_graph.is_graph_model(model):
        peer = to_keras_batchnorm(model)
        peer(
            _keras_graph.pack_inputs(peer, arrays), training=False
        )  # export needs a call
    else:
        peer, what = model, "the model as given (subclassed)"
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "keras.onnx")
        try:
            peer.export(
                file,
                format="onnx",
                verbose=False,
                input_signature=None if peer is not model else signature,
                opset_version=opset,
            )
            proto = onnx.load(file)
            n_in = len(proto.graph.input)
            if n_in != len(signature):
                raise ValueError(f"{n_in} inputs instead of {len(signature)}")
            _session(proto.SerializeToString())
            return f"Keras's model.export(format='onnx') with {what}", proto
        except Exception as e:  # noqa: BLE001 - any failure: documented fallback
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            why = f"{type(e).__name__}: {why}" if why else type(e).__name__
    proto = to_onnx(peer, signature, opset)
    return f"tf2onnx conversion of the model with {what} (model.export: {why})", proto


def _benchmark(report, model, data, signature, opset, arrays) -> None:
    report.baseline, baseline = keras_baseline(model, signature, opset, arrays)
    report.baseline_nodes = node_counts(baseline)
    files = [data, baseline.SerializeToString()]
    feeds = [
        {i.name: a for i, a in zip(_session(f).get_inputs(), arrays, strict=True)}
        for f in files
    ]
    # Fresh sessions per block, in a random order: a session's speed depends
    # on where its buffers land (up to ~20% between two sessions of one file).
    times = blocked_latency_ms(
        lambda order: [_session(files[k]) for k in order], feeds, blocks=5, rounds=20
    )
    exported, base = np.median(times, axis=(0, 1))
    report.latency_ms = {"exported": float(exported), "baseline": float(base)}
