"""`export_onnx`: fold, convert on any backend, check, and prove parity with ORT."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import resource
import time

import keras
import numpy as np

from keras_bn import _keras_graph

from . import _deps
from ._deps import require
from ._io import atomic_write_bytes, check_output_path
from ._onnx_edit import name_free_dims, opset_of, rename_io, to_float16
from ._quiet import captured
from ._tf_convert import release_memory
from .bench import blocked_latency_ms
from .fold_keras import fold_batchnorm
from .report import FoldReport

MissingDependency = getattr(_deps, "MissingDependency", ImportError)

# Keras backend -> export route (the exporter that converts its graphs).
ROUTES = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "torch.onnx"}
MIN_OPSET = 13
# jax2onnx and torch.onnx write opset-18 operators (reductions with `axes`
# inputs) even when asked for less: they convert at 18 and the result is
# converted down with `onnx.version_converter`.
_NATIVE_OPSET = 18
PRECISIONS = ("float32", "float16")
STAGES = ("fold", "convert", "check", "verify", "benchmark", "write")

FLOAT32_RTOL = 1e-5
# Units of the compute dtype's machine epsilon that ONNX Runtime may differ
# from Keras by, when either computes in 16 bits: both round every
# intermediate (at most eps/2 each) but in a different order (fused vs.
# separate operations, different accumulation), so their results differ by a
# few eps; measured 0.6 eps on mixed_float16 models. A folding mistake is
# off by a whole weight, far more.
LOW_PRECISION_EPS_UNITS = 8
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
# Input scales tried, in order, until the model's outputs vary over the
# sample inputs (random float inputs only).
VARY_SCALES = (1.0, 10.0, 100.0, 1000.0)
# Verification runs Keras and ONNX Runtime on this many samples at a time
# (with a free batch dimension): their activations, not the weights, set
# the peak memory of an export of a large-input model (a batch of 16 at
# 224x224 took 1.4 GB more than 4 at a time on MobileNetV2).
VERIFY_ROWS = 4

Spec = collections.namedtuple("Spec", ["name", "shape", "dtype"])
Spec.__doc__ = "One model input: name, shape (`None` for free dimensions), dtype."


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
        opset: ONNX opset of the file.
        fold_report: The Keras-side `FoldReport`, or `None` with `fold=False`.
        parity: Per model output, the relative error of ONNX Runtime against
            the input Keras model: `max|onnx - keras| / max|keras|` over all
            elements (`None` when `verify=False`).
        rtol: The tolerance `parity` was checked against.
        nodes: ONNX node counts by op type of the file written.
        file_size: Bytes written.
        timings: Seconds spent per stage (`"fold_s"`, `"convert_s"`, ...).
        baseline: With `benchmark=True`, what the file was timed against
            (e.g. Keras's own `model.export` of the model with Keras's
            `BatchNormalization`); else `None`.
        baseline_nodes: Node counts of that baseline file.
        latency_ms: With `benchmark=True`, ONNX Runtime latency (batch 1,
            one thread, default graph optimizations, median of 100 calls
            interleaved over 5 blocks of fresh sessions) of `"exported"` and
            `"baseline"`; empty when the baseline disagrees with Keras.
        route: The exporter: `"tf2onnx"`, `"jax2onnx"` or `"torch.onnx"`.
        rtol_reason: Why `rtol` has its value.
        peak_rss_mb: The process's peak resident memory (MiB) at the end of
            the export (`getrusage`'s `ru_maxrss`: includes anything the
            process did before).
        rss_increase_mb: That peak minus the resident memory when the export
            started: what the export added (0 when the process had peaked
            higher before).
        baseline_parity: With `benchmark=True`, the baseline file's relative
            error against Keras on the same inputs; a baseline beyond `rtol`
            is not timed and no speed-up is given.
        outputs_vary: `False` when every output is the same for every
            sample input (even at the largest input scale tried): parity then
            proves nothing about the model's computation. `None` when not
            verified or with a single sample.
        input_scale: The scale of the random verification inputs that made
            the outputs vary (1.0 unless the outputs were constant at 1.0).
        exporter: The exporter in detail (e.g. `"torch.export"` or
            `"TorchScript"` for the torch.onnx route).
        onnx_fold_report: What `fold_onnx` found in the converted graph
            (`None` with `fold=False`).
        log: Log lines, warnings and prints captured during conversion
            (empty with `verbose=True`, which lets them through).
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
    route: str = "tf2onnx"
    rtol_reason: str = ""
    peak_rss_mb: float | None = None
    rss_increase_mb: float | None = None
    baseline_parity: float | None = None
    outputs_vary: bool | None = None
    input_scale: float = 1.0
    exporter: str = ""
    onnx_fold_report: FoldReport | None = None
    log: list[str] = dataclasses.field(default_factory=list)

    @property
    def max_rel_error(self) -> float | None:
        return None if self.parity is None else max(self.parity, default=0.0)

    @property
    def baseline_agrees(self) -> bool | None:
        """Whether the baseline file matches Keras within `rtol` (None: not run)."""
        if self.baseline_parity is None:
            return None
        return self.baseline_parity <= self.rtol

    @property
    def speedup(self) -> float | None:
        """Baseline over exported ONNX Runtime latency, when measured against
        a baseline that agrees with Keras."""
        lat = self.latency_ms
        if "exported" in lat and "baseline" in lat and self.baseline_agrees:
            return lat["baseline"] / lat["exported"]
        return None

    def __str__(self) -> str:
        lines = [
            f"ONNX file: {self.path} ({self.file_size} bytes, opset {self.opset}, "
            f"{self.route}{f' ({self.exporter})' if self.exporter else ''})",
            f"nodes: {sum(self.nodes.values())} {dict(sorted(self.nodes.items()))}",
        ]
        if self.parity is not None:
            lines.append(
                f"parity: max relative error {self.max_rel_error:.2e} "
                f"(tolerance {self.rtol:.1e}: {self.rtol_reason})"
            )
        if self.outputs_vary is False:
            lines.append(
                "warning: the model's outputs are the same for every sample input "
                f"(random inputs up to scale {self.input_scale:g}), so parity "
                "checks only a constant; verify with realistic `inputs`."
            )
        elif self.input_scale != 1.0:
            lines.append(
                f"verified at input scale {self.input_scale:g} (at smaller scales "
                "the outputs did not vary)"
            )
        if self.baseline is not None:
            lines.append(
                f"baseline: {self.baseline}: {sum(self.baseline_nodes.values())} "
                f"nodes {dict(sorted(self.baseline_nodes.items()))}"
            )
        if self.baseline_agrees is False:
            lines.append(
                f"baseline disagrees with Keras (relative error "
                f"{self.baseline_parity:.2e} > {self.rtol:.1e}): not timed, "
                "no speed-up given"
            )
        if self.speedup is not None:
            lat = self.latency_ms
            lines.append(
                f"ONNX Runtime latency (batch 1, 1 thread): {lat['exported']:.3f} ms "
                f"vs baseline {lat['baseline']:.3f} ms: {self.speedup:.2f}x"
            )
        if self.peak_rss_mb is not None:
            lines.append(
                f"memory: peak RSS {self.peak_rss_mb:.0f} MiB "
                f"(+{self.rss_increase_mb:.0f} MiB during export)"
            )
        if self.fold_report is not None:
            lines.append(str(self.fold_report))
        if self.onnx_fold_report is not None and self.onnx_fold_report.records:
            lines.append(
                "fold_onnx on the converted graph: " + str(self.onnx_fold_report)
            )
        return "\n".join(lines)


def node_counts(proto) -> dict[str, int]:
    """Number of nodes of each op type in an ONNX `ModelProto` (top graph)."""
    return dict(collections.Counter(n.op_type for n in proto.graph.node))


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def _session(data: bytes, optimize: bool = True):
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _feed(sess, arrays) -> dict:
    """`arrays` for `sess`'s inputs, float arrays cast to each input's type."""
    feed = {}
    for i, a in zip(sess.get_inputs(), arrays, strict=True):
        dtype = _ORT_DTYPES.get(i.type)
        feed[i.name] = a.astype(dtype) if dtype and a.dtype.kind == "f" else a
    return feed


def _sample_inputs(specs, samples, seed):
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = list(spec.shape)
        if None in shape[1:]:
            raise ValueError(
                f"Input {spec.name!r} has unknown non-batch dimensions {shape}; "
                "pass `inputs=` (arrays to verify with) or `input_signature=` "
                "with those dimensions fixed."
            )
        if shape and shape[0] is None:
            shape[0] = samples
        dtype = np.dtype(spec.dtype)
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


def varies(outputs) -> bool | None:
    """Whether some output differs between samples (axis 0) by more than
    1e-6 of its largest magnitude; `None` with fewer than two samples."""
    outputs = [np.asarray(o, np.float64) for o in outputs]
    if not outputs or any(o.ndim == 0 or o.shape[0] < 2 for o in outputs):
        return None
    for o in outputs:
        scale = float(np.abs(o).max(initial=0.0))
        spread = float((o.max(axis=0) - o.min(axis=0)).max(initial=0.0))
        if np.isfinite(spread) and spread > 1e-6 * scale:
            return True
    return False


def compute_dtypes(model) -> set[str]:
    """The compute dtypes of `model` and every layer inside it."""
    layers = [model, *_keras_graph.sublayers(model)]
    out = set()
    for layer in layers:
        policy = getattr(layer, "dtype_policy", None)
        dtype = getattr(policy, "compute_dtype", None)
        if dtype:
            out.add(str(dtype))
    return out


def default_rtol(model, precision: str = "float32") -> tuple[float, str]:
    """`(rtol, reason)`: the parity tolerance for `model` exported at
    `precision`: 1e-5 for float32 compute; `LOW_PRECISION_EPS_UNITS` times
    the epsilon of the lowest compute precision (float16 or bfloat16)."""
    dtypes = compute_dtypes(model)
    if precision == "float16":
        dtypes.add("float16")
    low = [d for d in ("bfloat16", "float16") if d in dtypes]
    if not low:
        return FLOAT32_RTOL, "float32 compute"
    d = low[0]
    why = "exported with precision='float16'" if precision == "float16" else None
    why = why or f"the model computes in {d}"
    rtol = LOW_PRECISION_EPS_UNITS * EPS[d]
    return rtol, (
        f"{why}: {LOW_PRECISION_EPS_UNITS} x {d} epsilon "
        f"(2^{int(math.log2(EPS[d]))}); Keras and ONNX Runtime round every "
        "intermediate in a different order"
    )


def _normalize_spec(spec, i: int) -> Spec:
    name = getattr(spec, "name", None)
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        shape, dtype = spec
    elif hasattr(spec, "shape") and hasattr(spec, "dtype"):
        shape, dtype = spec.shape, spec.dtype
    else:
        raise TypeError(
            f"Argument `input_signature[{i}]` must be a keras.InputSpec, a "
            f"tf.TensorSpec or a (shape, dtype) pair such as ((None, 28, 28, 1), "
            f"'float32'). Received: {spec!r}"
        )
    try:
        if hasattr(shape, "as_list"):
            shape = shape.as_list()
        shape = tuple(None if d is None else int(d) for d in shape)
        dtype = keras.backend.standardize_dtype(getattr(dtype, "name", dtype))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Argument `input_signature[{i}]` has an invalid shape or dtype "
            f"({e}). Received: {spec!r}"
        ) from None
    if name is not None and not isinstance(name, str):
        name = None
    return Spec(name or f"input_{i}", shape, dtype)


def input_specs(model, input_signature=None, batch_size=None) -> list[Spec]:
    """The model's inputs as `Spec`s (free batch dimension unless `batch_size`)."""
    if input_signature is None:
        if not _keras_graph.is_graph_model(model):
            raise ValueError(
                f"{model.name!r} is a subclassed {type(model).__name__}: it has no "
                "declared inputs to export. Pass `input_signature=[((None, ...), "
                "'float32')]` (one (shape, dtype) per input; CLI: "
                "`--input-signature`) to trace its `call`, or rebuild it with the "
                "Functional API."
            )
        specs = [
            Spec(
                getattr(x, "name", None) or f"input_{i}",
                (None, *x.shape[1:]),
                keras.backend.standardize_dtype(x.dtype),
            )
            for i, x in enumerate(keras.tree.flatten(model.inputs))
        ]
    else:
        if not isinstance(input_signature, (list, tuple)):
            input_signature = [input_signature]
        specs = [_normalize_spec(s, i) for i, s in enumerate(input_signature)]
        if _keras_graph.is_graph_model(model):
            n = len(keras.tree.flatten(model.inputs))
            if len(specs) != n:
                raise ValueError(
                    f"Argument `input_signature` has {len(specs)} entries but the "
                    f"model has {n} inputs. Give one (shape, dtype) per input."
                )
    if batch_size is not None:
        fixed = []
        for spec in specs:
            if not spec.shape:
                fixed.append(spec)
                continue
            if spec.shape[0] not in (None, batch_size):
                raise ValueError(
                    f"Argument `batch_size={batch_size}` contradicts input "
                    f"{spec.name!r} of shape {spec.shape}. Leave one of them free."
                )
            fixed.append(spec._replace(shape=(batch_size, *spec.shape[1:])))
        specs = fixed
    return specs


def _max_opset(route: str) -> int:
    if hasattr(_deps, "max_opset"):
        return _deps.max_opset(route)
    onnx = require("onnx")
    top = onnx.defs.onnx_opset_version()
    if route == "tf2onnx":
        top = min(top, max(require("tf2onnx.constants").OPSET_TO_IR_VERSION))
    return top


def _route() -> str:
    backend = keras.backend.backend()
    if hasattr(_deps, "require_route"):
        return _deps.require_route(backend)
    if backend not in ROUTES:
        raise ValueError(
            f"ONNX export supports the Keras backends {sorted(ROUTES)}; got "
            f"KERAS_BACKEND={backend!r}. Set KERAS_BACKEND to one of them."
        )
    return ROUTES[backend]


def _check_names(arg: str, names, n: int | None):
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"Argument `{arg}` must be a list of str. Received: {names!r}")
    names = list(names)
    if not all(isinstance(x, str) and x.strip() for x in names):
        raise ValueError(
            f"Argument `{arg}` must hold non-empty strings. Received: {names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"Argument `{arg}` has duplicate names: {names!r}")
    if n is not None and len(names) != n:
        raise ValueError(
            f"Argument `{arg}` has {len(names)} names but the model has {n}. "
            f"Received: {names!r}"
        )
    return names


def _check_arguments(model, route, opset, samples, rtol, batch_size, precision):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Argument `model` must be a keras.Model. Received: {type(model).__name__}"
        )
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ValueError(f"Argument `opset` must be an int. Received: {opset!r}")
    top = _max_opset(route)
    if not MIN_OPSET <= opset <= top:
        raise ValueError(
            f"Argument `opset` must be between {MIN_OPSET} and {top} (the highest "
            f"the installed onnx and {route} support). Received: {opset!r}"
        )
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(
            f"Argument `samples` must be a positive int. Received: {samples!r}"
        )
    if rtol is not None and (
        isinstance(rtol, bool)
        or not isinstance(rtol, (int, float))
        or not math.isfinite(rtol)
        or rtol <= 0
    ):
        raise ValueError(
            f"Argument `rtol` must be a finite number > 0 (or None: chosen from "
            f"the model's compute dtype). Received: {rtol!r}"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            f"Argument `batch_size` must be a positive int, or None for a free "
            f"batch dimension named 'batch'. Received: {batch_size!r}"
        )
    if precision not in PRECISIONS:
        raise ValueError(
            f"Argument `precision` must be one of {PRECISIONS}. Received: {precision!r}"
        )


@contextlib.contextmanager
def _stage(name, progress, timings):
    if progress is not None:
        progress(name, None)
    t = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t
    timings[f"{name}_s"] = elapsed
    if progress is not None:
        progress(name, elapsed)


def _rss_mb() -> float:
    """Current resident memory (MiB), from /proc (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 2**10


def convert(model, specs, opset: int, route: str | None = None):
    """`(proto, exporter)`: one conversion of `model(x, training=False)` with
    the exporter of the current backend, at `opset`."""
    route = route or _route()
    if route == "tf2onnx":
        from ._tf_convert import to_onnx

        return to_onnx(model, specs, opset), "tf2onnx"
    native = max(opset, _NATIVE_OPSET)
    if route == "jax2onnx":
        from ._jax_convert import to_onnx

        proto, exporter = to_onnx(model, specs, native)
    else:
        from ._torch_convert import to_onnx

        proto, exporter = to_onnx(model, specs, native)
    if opset_of(proto) != opset:
        version_converter = require("onnx.version_converter")
        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as e:  # noqa: BLE001 - the converter raises many kinds
            raise ValueError(
                f"{route} wrote opset {opset_of(proto)} and onnx's version "
                f"converter cannot bring it to opset {opset} ({type(e).__name__}: "
                f"{e}). Pass opset={opset_of(proto)} or higher."
            ) from e
        _drop_newer_attributes(proto, opset)
    return proto, exporter


def _drop_newer_attributes(proto, opset: int) -> None:
    """Removes `noop_with_empty_axes=0` from reductions below opset 18,
    which onnx's version converter leaves (it is the default behaviour there,
    but not a known attribute)."""
    if opset >= 18:
        return
    for node in proto.graph.node:
        if node.op_type.startswith("Reduce"):
            keep = [
                a
                for a in node.attribute
                if not (a.name == "noop_with_empty_axes" and a.i == 0)
            ]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)


def export_onnx(
    model,
    path,
    *,
    fold: bool = True,
    opset: int | None = None,
    input_signature=None,
    verify: bool = True,
    inputs=None,
    samples: int = 16,
    rtol: float | None = None,
    overwrite: bool = False,
    seed: int = 0,
    benchmark: bool = False,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    batch_size: int | None = None,
    precision: str = "float32",
    progress=None,
    verbose: bool = False,
) -> ExportReport:
    """Folds batch normalization away and exports a Keras model to ONNX.

    Works on the TensorFlow, JAX and torch backends. The model is folded
    with `fold_batchnorm`, converted once with the backend's exporter
    (tf2onnx, frozen, on TensorFlow; jax2onnx on JAX; `torch.onnx` on torch:
    see `ExportReport.route`), passed through `fold_onnx` (which folds what
    the exporter left, e.g. scale and shift behind layout operations),
    checked with `onnx.checker`, and run with ONNX Runtime against the input
    Keras model. Nothing is written if a check fails; the file is written
    atomically and an existing file is replaced only with `overwrite=True`.

    Args:
        model: A Sequential or Functional Keras model; a subclassed model
            with `fold=False` and an `input_signature` (its `call` is traced).
        path: Output `.onnx` file.
        fold: Fold batch normalization first (`False`: plain export).
        opset: ONNX opset (13 to the highest the exporter supports);
            `None`: the exporter's own, 17 with tf2onnx and 18 with
            jax2onnx and `torch.onnx` (which write opset-18 operators; a
            lower opset goes through onnx's version converter, which cannot
            convert every graph).
        input_signature: Optional list, one entry per model input, of
            `(shape, dtype)` pairs (`((None, 28, 28, 1), "float32")`),
            `keras.InputSpec`s or `tf.TensorSpec`s; defaults to the model's
            inputs with a free batch dimension.
        verify: Run ONNX Runtime and check parity.
        inputs: Optional list of arrays to verify with (one per input);
            default: `samples` standard-normal rows per float input (0 or 1
            for integer inputs), scaled by up to 1000 when the model's
            outputs do not vary at scale 1 (see `ExportReport.outputs_vary`).
        samples: Batch size of the random verification inputs.
        rtol: Tolerance on `max|onnx - keras| / max|keras|` per output;
            `None`: 1e-5 for float32 compute, 8 epsilons of the compute
            dtype for a float16 or bfloat16 model (e.g. `mixed_float16`) or
            with `precision="float16"` (see `ExportReport.rtol_reason`).
        overwrite: Replace an existing `path`.
        seed: Seed of the random verification inputs.
        benchmark: Also time the file under ONNX Runtime (batch 1, one
            thread) against a baseline: Keras's own `model.export(format=
            "onnx")` of the same architecture and weights with Keras's
            `BatchNormalization` (when Keras's export fails or its file needs
            other inputs, the plain conversion of that model; the report says
            which). The baseline is first checked against Keras on the
            verification inputs; one that disagrees is not timed.
        input_names: ONNX graph input names (default: the Keras input names).
        output_names: ONNX graph output names (default: the Keras output
            names of a Functional or Sequential model).
        batch_size: A fixed batch size; `None`: a free batch dimension named
            `"batch"` in every input and output.
        precision: `"float32"`, or `"float16"`: float16 weights, inputs,
            outputs and compute, checked against the float32 Keras model
            (on float16-rounded inputs) at a float16 tolerance.
        progress: Optional `progress(stage, seconds)`, called when each of
            `"fold"`, `"convert"`, `"check"`, `"verify"`, `"benchmark"`,
            `"write"` starts (`seconds=None`) and ends (elapsed seconds).
        verbose: Let the exporters' logs, warnings and prints through; by
            default they are captured into `ExportReport.log`.

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: A bad argument (checked before converting).
        ParityError: If ONNX Runtime disagrees with Keras beyond `rtol`.
        FileExistsError: If `path` exists and `overwrite` is False.
        MissingDependency: The backend's exporter (or onnx, onnxruntime) is
            not installed (an `ImportError`; the message names the fix).

    Example:

    >>> report = export_onnx(model, "model.onnx")  # doctest: +SKIP
    >>> print(report.max_rel_error, report.nodes)  # doctest: +SKIP
    """
    route = _route()
    onnx = require("onnx")
    if opset is None:
        opset = _deps.default_opset(route)
    _check_arguments(model, route, opset, samples, rtol, batch_size, precision)
    if progress is not None and not callable(progress):
        raise TypeError(
            f"Argument `progress` must be callable or None. Received: {progress!r}"
        )
    graph_model = _keras_graph.is_graph_model(model)
    if not graph_model and fold:
        raise TypeError(
            f"{model.name!r} is a subclassed {type(model).__name__}: its `call` "
            "cannot be rewritten to fold batch normalization. Rebuild it with "
            "the Functional API, or export it unfolded with `fold=False, "
            "input_signature=[((None, ...), 'float32')]` (CLI: `--no-fold "
            "--input-signature`)."
        )
    specs = input_specs(model, input_signature, batch_size)
    input_names = _check_names("input_names", input_names, len(specs))
    n_out = len(keras.tree.flatten(model.outputs)) if graph_model else None
    output_names = _check_names("output_names", output_names, n_out)
    if input_names is not None:
        specs = [s._replace(name=n) for s, n in zip(specs, input_names, strict=True)]
    if output_names is None and graph_model:
        if isinstance(model, keras.Sequential):
            keras_names = [model.layers[-1].name]
        else:
            keras_names = list(getattr(model, "output_names", None) or [])
        if len(keras_names) == n_out and len(set(keras_names)) == n_out:
            output_names = keras_names
    if rtol is None:
        rtol, rtol_reason = default_rtol(model, precision)
    else:
        rtol_reason = "given"
    path = check_output_path(path, overwrite)
    rss_start = _rss_mb()
    timings = {}
    log: list[str] = []

    with _stage("fold", progress, timings):
        fold_report, target = None, model
        if fold:
            target, fold_report = fold_batchnorm(model)
    with _stage("convert", progress, timings), captured(log, verbose):
        proto, exporter = convert(target, specs, opset, route)
        del target  # the folded copy: not needed any more
        release_memory()
        onnx_fold_report = None
        if fold:
            from .onnx_fold import fold_onnx

            proto, onnx_fold_report = fold_onnx(proto)
        proto = rename_io(proto, [s.name for s in specs], output_names)
        proto = name_free_dims(proto, specs)
        if precision == "float16":
            proto = to_float16(proto)
    with _stage("check", progress, timings):
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
        counts = node_counts(proto)
        opset = opset_of(proto)
        half = any(
            i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
            for i in proto.graph.input
        )
        del proto
        release_memory()

    report = ExportReport(
        path=path,
        opset=opset,
        fold_report=fold_report,
        parity=None,
        rtol=rtol,
        nodes=counts,
        file_size=len(data),
        timings=timings,
        route=route,
        rtol_reason=rtol_reason,
        exporter=exporter,
        onnx_fold_report=onnx_fold_report,
        log=log,
    )
    arrays = (
        None if inputs is None else [np.asarray(a) for a in keras.tree.flatten(inputs)]
    )
    ref = None
    if verify:
        with _stage("verify", progress, timings):
            arrays, ref = _verify(
                report, model, data, specs, arrays, samples, seed, half
            )
    if benchmark:
        with _stage("benchmark", progress, timings), captured(log, verbose):
            if arrays is None:
                call = _keras_call(model)
                arrays, ref = _reference(call, specs, None, samples, seed, report)
            _benchmark(report, model, data, specs, opset, arrays, ref)
    with _stage("write", progress, timings):
        atomic_write_bytes(path, data, overwrite=overwrite)
        report.file_size = os.path.getsize(path)
    release_memory()
    report.peak_rss_mb = _peak_rss_mb()
    report.rss_increase_mb = max(0.0, report.peak_rss_mb - rss_start)
    return report


def _in_chunks(fn, arrays, rows) -> list[np.ndarray]:
    """`fn(arrays)` (a list of arrays), computed `rows` samples at a time
    when `rows` is set and every input and output has the same leading
    (batch) dimension; else at once."""
    n = arrays[0].shape[0] if arrays and np.ndim(arrays[0]) else 0
    if not rows or n <= rows or any(np.ndim(a) == 0 or len(a) != n for a in arrays):
        return fn(arrays)
    parts = []
    for start in range(0, n, rows):
        chunk = [a[start : start + rows] for a in arrays]
        out = [np.asarray(o) for o in fn(chunk)]
        if any(o.ndim == 0 or len(o) != len(chunk[0]) for o in out):
            return fn(arrays)  # an output without the batch dimension
        parts.append(out)
    return [np.concatenate(p, axis=0) for p in zip(*parts, strict=True)]


def _verify_rows(specs) -> int | None:
    """`VERIFY_ROWS` when every input has a free batch dimension, else None."""
    free = all(s.shape and s.shape[0] is None for s in specs)
    return VERIFY_ROWS if free else None


def _keras_call(model):
    """`arrays -> outputs`: `model(inputs, training=False)` as NumPy arrays.

    On JAX one compiled function (`_jax_convert.inference_call`): an eager
    call there compiles every operation for each new input shape, which
    costs more memory than the whole conversion (MobileNetV2 at 224 px,
    4 rows: +430 MiB eagerly, +110 MiB compiled once). On torch without
    autograd (`_torch_convert.inference_call`): an eager call records the
    graph for a backward pass, every activation kept until the outputs go.
    """
    if keras.backend.backend() == "jax":
        from ._jax_convert import inference_call

        return inference_call(model)
    if keras.backend.backend() == "torch":
        from ._torch_convert import inference_call

        return inference_call(_eager_call(model))
    return _eager_call(model)


def _eager_call(model):
    def call(arrays):
        packed = _keras_graph.pack_inputs(model, list(arrays))
        return [
            np.asarray(keras.ops.convert_to_numpy(r))
            for r in keras.tree.flatten(model(packed, training=False))
        ]

    return call


def _keras_outputs(call, arrays, rows=None) -> list[np.ndarray]:
    return _in_chunks(call, list(arrays), rows)


def _ort_outputs(sess, arrays, rows=None) -> list[np.ndarray]:
    return _in_chunks(lambda a: sess.run(None, _feed(sess, a)), list(arrays), rows)


def _reference(call, specs, arrays, samples, seed, report):
    """(inputs, Keras outputs): the given `arrays`, or random inputs scaled
    up (`VARY_SCALES`) until the outputs vary over the samples. `call`:
    `_keras_call(model)`."""
    rows = _verify_rows(specs)
    if arrays is not None:
        ref = _keras_outputs(call, arrays, rows)
        report.outputs_vary = varies(ref)
        return arrays, ref
    base = _sample_inputs(specs, samples, seed)
    for scale in VARY_SCALES:
        arrays = [
            a * np.asarray(scale, a.dtype) if a.dtype.kind == "f" else a for a in base
        ]
        ref = _keras_outputs(call, arrays, rows)
        report.input_scale = scale
        report.outputs_vary = varies(ref)
        if report.outputs_vary is not False:
            break
        if not any(a.dtype.kind == "f" for a in base):
            break
    if report.outputs_vary is False:  # constant everywhere: report scale 1
        arrays = base
        ref = _keras_outputs(call, arrays, rows)
        report.input_scale = VARY_SCALES[-1]
    return arrays, ref


def _verify(report, model, data, specs, arrays, samples, seed, half):
    """Keras's outputs, then ONNX Runtime's, one after the other (Keras's
    compiled call is freed before the session is made: less memory at once).
    `half`: the file's inputs are float16."""
    if arrays is not None:
        arrays = list(arrays)
    call = _keras_call(model)
    arrays, ref = _reference(call, specs, arrays, samples, seed, report)
    if half:  # Keras sees the float16-rounded inputs ONNX Runtime sees
        arrays = [a.astype(np.float16) if a.dtype.kind == "f" else a for a in arrays]
        ref = _keras_outputs(
            call,
            [a.astype(np.float32) if a.dtype.kind == "f" else a for a in arrays],
            _verify_rows(specs),
        )
    del call
    got = _ort_outputs(_session(data), arrays, _verify_rows(specs))
    report.parity = [relative_error(g, r) for g, r in zip(got, ref, strict=True)]
    if not report.max_rel_error <= report.rtol:
        raise ParityError(
            f"ONNX Runtime disagrees with Keras: max relative error "
            f"{report.max_rel_error:.3e} > rtol={report.rtol:g} "
            f"({report.rtol_reason}; per output: {report.parity}); nothing was "
            f"written to {report.path!r}.",
            report,
        )
    return arrays, ref


def keras_baseline(model, specs, opset: int, arrays: list):
    """(description, ONNX proto) of Keras's own export of `model`.

    The model's keras_bn layers are swapped back for Keras's
    `BatchNormalization` (same weights) and exported with
    `model.export(format="onnx")` (after one call on `arrays`, which Keras's
    export needs). When that fails or the file needs inputs the model does
    not have, the same model is converted with this module's route instead,
    and the description says so.
    """
    import tempfile

    from keras_bn.replace import to_keras_batchnorm

    onnx = require("onnx")
    route = _route()
    specs = [
        s if isinstance(s, Spec) else _normalize_spec(s, i) for i, s in enumerate(specs)
    ]
    what = "Keras's BatchNormalization"
    if _keras_graph.is_graph_model(model):
        peer = to_keras_batchnorm(model)
        peer(_keras_graph.pack_inputs(peer, list(arrays)), training=False)
    else:
        peer, what = model, "the model as given (subclassed)"
    signature = [
        keras.InputSpec(shape=s.shape, dtype=s.dtype, name=s.name) for s in specs
    ]
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "keras.onnx")
        # jax2onnx and torch.onnx write opset-18 reductions at any opset:
        # Keras's export is asked for 18 there, then converted down like ours.
        native = opset if route == "tf2onnx" else max(opset, _NATIVE_OPSET)
        try:
            peer.export(
                file,
                format="onnx",
                verbose=False,
                input_signature=None if peer is not model else signature,
                opset_version=native,
            )
            proto = onnx.load(file)
            if opset_of(proto) != opset:
                proto = require("onnx.version_converter").convert_version(proto, opset)
                _drop_newer_attributes(proto, opset)
                onnx.checker.check_model(proto)
            n_in = len(proto.graph.input)
            if n_in != len(specs):
                raise ValueError(f"{n_in} inputs instead of {len(specs)}")
            _session(proto.SerializeToString())
            return f"Keras's model.export(format='onnx') with {what}", proto
        except Exception as e:  # noqa: BLE001 - any failure: documented fallback
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            why = f"{type(e).__name__}: {why}" if why else type(e).__name__
    proto, _ = convert(peer, specs, opset, route)
    return f"{route} conversion of the model with {what} (model.export: {why})", proto


def _benchmark(report, model, data, specs, opset, arrays, ref) -> None:
    report.baseline, baseline = keras_baseline(model, specs, opset, arrays)
    report.baseline_nodes = node_counts(baseline)
    files = [data, baseline.SerializeToString()]
    del baseline
    # The baseline must compute the model before its time means anything.
    sess = _session(files[1])
    got = _ort_outputs(sess, arrays, _verify_rows(specs))
    report.baseline_parity = (
        max(
            (relative_error(g, r) for g, r in zip(got, ref, strict=True)),
            default=0.0,
        )
        if len(got) == len(ref)
        else float("inf")
    )
    del sess
    if not report.baseline_agrees:
        return
    free_batch = all(s.shape and s.shape[0] is None for s in specs)
    ones = [a[:1] for a in arrays] if free_batch else arrays
    feeds = [_feed(_session(f), ones) for f in files]
    # Fresh sessions per block, in a random order: a session's speed depends
    # on where its buffers land (up to ~20% between two sessions of one file).
    times = blocked_latency_ms(
        lambda order: [_session(files[k]) for k in order], feeds, blocks=5, rounds=20
    )
    exported, base = np.median(times, axis=(0, 1))
    report.latency_ms = {"exported": float(exported), "baseline": float(base)}
