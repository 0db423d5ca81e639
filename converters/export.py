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
from converters.bench import session_latency_ms
from converters.fold_keras import fold_batchnorm
from converters.report import FoldReport


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
        nodes_before: ONNX node counts by op type of the unfolded conversion.
        nodes_after: ONNX node counts by op type of the file written.
        file_size: Bytes written.
        timings: Seconds spent folding, converting, verifying.
        latency_ms: ONNX Runtime latency (1 thread, the verification batch,
            median of 20 runs) of the `"unfolded"` and `"folded"` graphs, when
            both exist and `verify=True`.
    """

    path: str
    opset: int
    fold_report: FoldReport | None
    parity: list[float] | None
    rtol: float
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    file_size: int
    timings: dict[str, float]
    latency_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def max_rel_error(self) -> float | None:
        return None if self.parity is None else max(self.parity, default=0.0)

    @property
    def speedup(self) -> float | None:
        """Unfolded over folded ONNX Runtime latency, when measured."""
        lat = self.latency_ms
        if "folded" in lat and "unfolded" in lat:
            return lat["unfolded"] / lat["folded"]
        return None

    def __str__(self) -> str:
        lines = [
            f"ONNX file: {self.path} ({self.file_size} bytes, opset {self.opset})",
            f"nodes before: {dict(sorted(self.nodes_before.items()))}",
            f"nodes after:  {dict(sorted(self.nodes_after.items()))}",
        ]
        if self.parity is not None:
            lines.append(
                f"parity: max relative error {self.max_rel_error:.2e} "
                f"(tolerance {self.rtol:.0e})"
            )
        if self.speedup is not None:
            lines.append(f"ONNX Runtime speed-up from folding: {self.speedup:.2f}x")
        if self.fold_report is not None:
            lines.append(str(self.fold_report))
        return "\n".join(lines)


def _signature(model, input_signature):
    tf = require("tensorflow")
    if input_signature is not None:
        return list(input_signature)
    specs = []
    for i, x in enumerate(model.inputs):
        name = getattr(x, "name", None) or f"input_{i}"
        specs.append(tf.TensorSpec((None, *x.shape[1:]), x.dtype, name=name))
    return specs


def _convert(model, signature, opset):
    tf = require("tensorflow")
    tf2onnx = require("tf2onnx")
    struct = getattr(model, "_inputs_struct", None)

    def call(*args):
        if struct is not None and not isinstance(model, keras.Sequential):
            inputs = keras.tree.pack_sequence_as(struct, list(args))
        else:
            inputs = args[0]
        return keras.tree.flatten(model(inputs, training=False))

    fn = tf.function(call, input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=signature, opset=opset)
    return proto


def node_counts(proto) -> dict[str, int]:
    """Number of nodes of each op type in an ONNX `ModelProto` (top graph)."""
    return dict(collections.Counter(n.op_type for n in proto.graph.node))


def _session(data: bytes):
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
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
) -> ExportReport:
    """Folds batch normalization away and exports a Keras model to ONNX.

    The model is folded with `fold_batchnorm`, converted with tf2onnx
    (`tf2onnx.convert.from_function` on `model(x, training=False)`), checked
    with `onnx.checker`, and run with ONNX Runtime against the input Keras
    model. Nothing is written if a check fails; the file is written
    atomically and an existing file is replaced only with `overwrite=True`.
    TensorFlow backend only.

    Args:
        model: A Sequential or Functional Keras model.
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

    Returns:
        An `ExportReport`.

    Raises:
        ParityError: If ONNX Runtime disagrees with Keras beyond `rtol`.
        FileExistsError: If `path` exists and `overwrite` is False.
        RuntimeError: On a backend other than TensorFlow.

    Example:

    >>> report = export_onnx(model, "model.onnx")  # doctest: +SKIP
    >>> print(report.max_rel_error, report.nodes_after)  # doctest: +SKIP
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
    path = check_output_path(path, overwrite)
    timings = {}
    signature = _signature(model, input_signature)

    t = time.perf_counter()
    fold_report, target = None, model
    if fold:
        target, fold_report = fold_batchnorm(model)
    timings["fold_s"] = time.perf_counter() - t

    t = time.perf_counter()
    proto = _convert(target, signature, opset)
    before = _convert(model, signature, opset) if fold else proto
    timings["convert_s"] = time.perf_counter() - t
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()

    report = ExportReport(
        path=path,
        opset=opset,
        fold_report=fold_report,
        parity=None,
        rtol=rtol,
        nodes_before=node_counts(before),
        nodes_after=node_counts(proto),
        file_size=len(data),
        timings=timings,
    )
    if verify:
        t = time.perf_counter()
        arrays = _sample_inputs(signature, samples, seed) if inputs is None else inputs
        arrays = [np.asarray(a) for a in keras.tree.flatten(arrays)]
        sess = _session(data)
        feed = {i.name: a for i, a in zip(sess.get_inputs(), arrays, strict=True)}
        got = sess.run(None, feed)
        struct = getattr(model, "_inputs_struct", None)
        if struct is not None and not isinstance(model, keras.Sequential):
            keras_in = keras.tree.pack_sequence_as(struct, arrays)
        else:
            keras_in = arrays[0]
        ref = keras.tree.flatten(model(keras_in, training=False))
        report.parity = [
            relative_error(g, keras.ops.convert_to_numpy(r))
            for g, r in zip(got, ref, strict=True)
        ]
        timings["verify_s"] = time.perf_counter() - t
        if fold:
            report.latency_ms["folded"] = session_latency_ms(sess, feed)
            report.latency_ms["unfolded"] = session_latency_ms(
                _session(before.SerializeToString()), feed
            )
        if not report.max_rel_error <= rtol:
            raise ParityError(
                f"ONNX Runtime disagrees with Keras: max relative error "
                f"{report.max_rel_error:.3e} > rtol={rtol:g} (per output: "
                f"{report.parity}); nothing was written to {path!r}.",
                report,
            )
    atomic_write_bytes(path, data, overwrite=overwrite)
    report.file_size = os.path.getsize(path)
    return report
