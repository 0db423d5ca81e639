"""`fold_onnx`: fold batch normalization into the linear nodes of any ONNX graph."""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING

import numpy as np

from converters._deps import require
from converters.fold_math import bn_scale_shift
from converters.report import (
    FOLDED_PRECEDING,
    KEPT,
    UNCHANGED,
    FoldRecord,
    FoldReport,
)

if TYPE_CHECKING:
    import onnx

_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_AFFINE = ("Mul", "Add", "Sub", "Div")


class _Graph:
    """Producers, consumers and ranks of a graph being rewritten in place.

    Shape inference runs once, on the input: every rewrite keeps the names
    and ranks of the tensors it touches (and records the rank of any tensor it
    adds), so ranks stay valid. `skip` holds the output names of nodes a
    pattern decided to leave alone: state of this pass, never written into
    the user's graph.
    """

    def __init__(self, model):
        onnx = require("onnx")
        self.onnx = onnx
        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.skip: set[str] = set()
        self.refresh()
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            vis = [*inferred.graph.value_info, *inferred.graph.output]
            vis += list(inferred.graph.input)
            self.ranks = {
                v.name: len(v.type.tensor_type.shape.dim)
                for v in vis
                if v.type.tensor_type.HasField("shape")
            }
        except Exception:  # noqa: BLE001 - shapes are an optional hint
            self.ranks = {}

    def refresh(self):
        """Recomputes producers and consumers (cheap; no shape inference)."""
        self.producer, self.consumers = {}, collections.defaultdict(list)
        for n in self.g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name):
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def set_input(self, node, index, array, like):
        """Points `node.input[index]` at a new initializer holding `array`."""
        from onnx import numpy_helper

        base = f"{node.name or node.output[0]}_folded_{index}"
        name, k = base, 0
        while name in self.inits or name in self.producer:
            k += 1
            name = f"{base}_{k}"
        dtype = like.dtype if like is not None else np.float32
        init = numpy_helper.from_array(np.asarray(array).astype(dtype), name)
        self.g.initializer.append(init)
        self.inits[name] = init
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def sole_user(self, tensor, node) -> bool:
        return tensor not in self.outputs and self.consumers[tensor] == [node]


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else a.f
    return default


def _set_attr(node, name, value):
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    from onnx import helper

    node.attribute.append(helper.make_attribute(name, value))


def _per_channel(c, axis, rank, channels):
    """`c` as a per-channel vector along `axis` of a rank-`rank` tensor, or None."""
    c = np.asarray(c, np.float64)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis % rank):
        return None
    if shape[axis % rank] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).copy()


def _squeeze_axes(g, node):
    if len(node.input) > 1 and node.input[1]:
        axes = g.const(node.input[1])
        return None if axes is None else [int(a) for a in np.ravel(axes)]
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    return None


def _linear_unit(g, tensor):
    """The linear unit making `tensor`, or None.

    Returns the 5-tuple `(linear node, weight array, bias Add node or None,
    last node of the unit, number of squeezed axes)`.

    The unit is a Conv/ConvTranspose/Gemm/MatMul with a constant weight,
    optionally followed by the bias `Add` of a MatMul, or by a `Squeeze` of
    spatial axes of a Conv (Keras's Conv1D becomes Unsqueeze-Conv-Squeeze).
    """
    p = g.producer.get(tensor)
    if p is None:
        return None
    last, bias_add, squeeze = p, None, None
    q = g.producer.get(p.input[0]) if p.input else None
    if q is not None and g.sole_user(q.output[0], p):
        if (
            p.op_type == "Add"
            and q.op_type == "MatMul"
            and g.const(p.input[1]) is not None
        ):
            bias_add, p = p, q
        elif p.op_type == "Squeeze" and q.op_type == "Conv":
            rank = (
                len(g.const(q.input[1]).shape) if g.const(q.input[1]) is not None else 0
            )
            axes = _squeeze_axes(g, p)
            if rank and axes is not None and all(a % rank >= 2 for a in axes):
                squeeze, p = p, q
    if p.op_type not in _LINEAR or len(p.input) < 2:
        return None
    w = g.const(p.input[1])
    if w is None or (p.op_type == "MatMul" and w.ndim != 2):
        return None
    n_squeezed = len(_squeeze_axes(g, squeeze)) if squeeze is not None else 0
    return p, w, bias_add, last, n_squeezed


def _geometry(g, p, w, out, n_squeezed):
    """(channel axis, output rank, channels) of the unit's output, or a reason."""
    if p.op_type in ("Conv", "ConvTranspose"):
        if p.op_type == "ConvTranspose" and _attr(p, "group", 1) != 1:
            return f"ConvTranspose {p.name!r} is grouped"
        m = w.shape[0] if p.op_type == "Conv" else w.shape[1]
        return 1, w.ndim - n_squeezed, m
    if p.op_type == "Gemm":
        n = w.shape[0] if _attr(p, "transB", 0) else w.shape[1]
        c = g.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        if len(p.input) > 2 and p.input[2] and c is None:
            return f"Gemm {p.name!r} has a computed C input"
        if c is not None and c.size not in (1, n):
            return f"Gemm {p.name!r} has a C input of shape {c.shape}"
        return 1, 2, n
    rank = g.ranks.get(out)
    return -1, (rank or 2), w.shape[1]


def _fold(g, unit, scale, shift):
    """Applies `y -> y * scale + shift` to the unit's weights in place.

    Returns the unit's last node, or `("bias", shift, like)` for a MatMul
    without bias whose `shift` is not zero (the caller keeps an `Add`).
    """
    p, w, bias_add, last, _ = unit
    w = np.asarray(w, np.float64)
    if p.op_type == "Conv":
        new_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif p.op_type == "ConvTranspose":
        new_w = w * scale.reshape((1, -1) + (1,) * (w.ndim - 2))
    elif p.op_type == "Gemm":
        new_w = w * (scale[:, None] if _attr(p, "transB", 0) else scale[None, :])
    else:
        new_w = w * scale[None, :]
    like = g.const(p.input[1])
    g.set_input(p, 1, new_w, like)
    if bias_add is not None:
        b = np.asarray(g.const(bias_add.input[1]), np.float64)
        b = np.broadcast_to(b.reshape(-1), scale.shape) * scale + shift
        g.set_input(bias_add, 1, b, like)
        return last
    if p.op_type == "MatMul":
        return last if not np.any(shift) else ("bias", shift, like)
    b = g.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
    b = np.zeros_like(scale) if b is None else np.asarray(b, np.float64)
    b = np.broadcast_to(b.reshape(-1), scale.shape)
    if p.op_type == "Gemm":
        b = _attr(p, "beta", 1.0) * b
        _set_attr(p, "beta", 1.0)
    g.set_input(p, 2, b * scale + shift, like)
    return last


def _foldable(g, node, tensor, vec_of):
    """The linear unit making `tensor` if `node` may fold into it, else a reason."""
    unit = _linear_unit(g, tensor)
    if unit is None:
        return None, "its input is not made by Conv/ConvTranspose/Gemm/MatMul"
    p, w, _, last, n_squeezed = unit
    if not g.sole_user(last.output[0], node):
        return None, f"the output of {last.op_type} {last.name!r} is used elsewhere"
    geo = _geometry(g, p, w, last.output[0], n_squeezed)
    if isinstance(geo, str):
        return None, geo
    vec = vec_of(*geo)
    if vec is None:
        return None, "its parameters are not per-channel for that layer"
    return (unit, vec), ""


def _bn_vectors(g, node):
    """`(scale, shift)` of an inference BatchNormalization node, or a reason."""
    names = ("scale", "B", "input_mean", "input_var")
    x = [g.const(n) for n in node.input[1:5]]
    missing = [k for k, v in zip(names, x, strict=True) if v is None]
    if missing:
        return f"its {', '.join(missing)} input(s) are not constants"
    if _attr(node, "training_mode", 0) or any(node.output[1:]):
        return "it runs in training mode (outputs running statistics)"
    gamma, beta, mean, var = x
    try:
        return bn_scale_shift(
            np.ravel(mean),
            np.ravel(var),
            _attr(node, "epsilon", 1e-5),
            gamma=np.ravel(gamma),
            beta=np.ravel(beta),
        )
    except ValueError as e:
        return f"its parameters are invalid: {e}"


def _bn_match(g, node, vecs):
    """`_foldable` for a BatchNormalization: channel axis 1 of the unit."""
    rank = g.ranks.get(node.input[0])

    def bn_vec(axis, r, c):
        ok = (axis % r == 1) and (rank is None or rank == r)
        return vecs if ok and vecs[0].size == c else None

    return _foldable(g, node, node.input[0], bn_vec)


def _fold_bn(g, node, report) -> bool:
    """BatchNormalization after a linear unit -> folded into its weights."""
    vecs = _bn_vectors(g, node)
    if isinstance(vecs, str):
        return False
    found, _ = _bn_match(g, node, vecs)
    if found is None:
        return False
    unit, vec = found
    last = _fold(g, unit, *vec)
    if isinstance(last, tuple):  # MatMul without bias: the BN becomes its Add
        _to_bias_add(g, node, *last[1:])
    else:
        _replace(g, node, last)
    name = node.name or node.output[0]
    report.records.append(FoldRecord(name, FOLDED_PRECEDING, unit[0].name))
    return True


def _bn_to_scale_shift(g, node, report) -> bool:
    """An unfoldable BatchNormalization -> one Mul and one Add, or kept as is."""
    name = node.name or node.output[0]
    vecs = _bn_vectors(g, node)
    rank = g.ranks.get(node.input[0])
    if isinstance(vecs, str) or rank is None:
        why = _foldable(g, node, node.input[0], lambda *_: None)[1]
        left = vecs if isinstance(vecs, str) else "its input rank is unknown"
        reason = f"{why}; {left}: left as BatchNormalization"
        report.records.append(FoldRecord(name, UNCHANGED, None, reason))
        g.skip.add(node.output[0])
        return False
    why = _bn_match(g, node, vecs)[1]
    mul, add = _to_scale_shift(g, node, vecs, rank)
    g.skip.update((mul.output[0], add.output[0]))
    report.records.append(FoldRecord(name, KEPT, None, why))
    return True


def _fold_affine(g, node, report) -> bool:
    """Mul/Add/Sub/Div by a per-channel constant after a linear unit -> folded."""
    c_idx = [i for i in (0, 1) if g.const(node.input[i]) is not None]
    if len(c_idx) != 1 or node.op_type in ("Sub", "Div") and c_idx != [1]:
        return False
    c = np.asarray(g.const(node.input[c_idx[0]]), np.float64)
    if node.op_type == "Div":
        c = 1.0 / c
    if node.op_type == "Sub":
        c = -c
    mul = node.op_type in ("Mul", "Div")
    if not mul and _is_matmul_bias(g, node):
        return False

    def vec(axis, r, ch):
        v = _per_channel(c, axis, r, ch)
        if v is None:
            return None
        return (v, np.zeros(ch)) if mul else (np.ones(ch), v)

    found, _ = _foldable(g, node, node.input[1 - c_idx[0]], vec)
    if found is None:
        return False
    target = found[0][0].name
    last = _fold(g, found[0], *found[1])
    _replace(g, node, last)
    name = f"{node.op_type} {node.name or node.output[0]}"
    report.records.append(FoldRecord(name, FOLDED_PRECEDING, target))
    return True


#: The rewrites, tried in this order on each node: (name, op types, rewrite).
#: A rewrite returns True when it changed the graph; each does exactly one
#: thing, like tf2onnx's optimizers and ONNX Runtime's fusion_* passes.
PATTERNS = (
    ("bn_into_linear", ("BatchNormalization",), _fold_bn),
    ("bn_to_scale_shift", ("BatchNormalization",), _bn_to_scale_shift),
    ("affine_into_linear", _AFFINE, _fold_affine),
)


def _step(g, report) -> bool:
    """Applies the first pattern that matches a node; True if one did."""
    for node in g.g.node:
        if node.output and node.output[0] in g.skip:
            continue
        for _, ops, rewrite in PATTERNS:
            if node.op_type in ops and rewrite(g, node, report):
                return True
    return False


def _is_matmul_bias(g, node):
    p = g.producer.get(node.input[0])
    return p is not None and p.op_type == "MatMul" and g.const(p.input[1]) is not None


def _replace(g, node, last):
    """Removes folded `node`; `last` (the unit's last node) takes its output."""
    if last is None:
        raise AssertionError("internal: fold target missing")
    last.output[0] = node.output[0]
    g.g.node.remove(node)
    g.refresh()


def _to_bias_add(g, node, shift, like):
    g.set_input(node, 1, shift, like)
    del node.input[2:]
    del node.attribute[:]
    node.op_type = "Add"
    g.refresh()


def _to_scale_shift(g, node, vecs, rank):
    from onnx import helper, numpy_helper

    shape = (-1,) + (1,) * (rank - 2)
    dtype = g.const(node.input[1]).dtype
    base = node.name or node.output[0]
    names = []
    for suffix, v in (("scale", vecs[0]), ("shift", vecs[1])):
        name, k = f"{base}_{suffix}", 0
        while name in g.inits or name in g.producer:
            k += 1
            name = f"{base}_{suffix}_{k}"
        init = numpy_helper.from_array(np.reshape(v, shape).astype(dtype), name)
        g.g.initializer.append(init)
        g.inits[name] = init
        names.append(name)
    mid = f"{base}_scaled"
    mul = helper.make_node("Mul", [node.input[0], names[0]], [mid], name=f"{base}_mul")
    add = helper.make_node("Add", [mid, names[1]], [node.output[0]], name=f"{base}_add")
    g.ranks[mid] = rank
    idx = list(g.g.node).index(node)
    g.g.node.remove(node)
    g.g.node.insert(idx, add)
    g.g.node.insert(idx, mul)
    g.refresh()
    return mul, add


def _load_external_data(model, base_dir) -> None:
    """Reads `model`'s external tensor data from `base_dir`, and only there."""
    from onnx import external_data_helper as ext

    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    external = [t for t in tensors if ext.uses_external_data(t)]
    if not external:
        return
    names = [t.name for t in external[:3]]
    if base_dir is None:
        raise ValueError(
            f"The model keeps the data of {len(external)} tensor(s) (e.g. {names}) "
            "in external files, and where they are is unknown (it was loaded "
            "with load_external_data=False). Pass `base_dir=` the folder of "
            "the .onnx file, or load it with onnx.load(path)."
        )
    base = os.path.realpath(os.fspath(base_dir))
    if not os.path.isdir(base):
        raise ValueError(
            f"Argument `base_dir` must be the folder of the .onnx file. "
            f"Received: base_dir={base_dir!r} (not a folder)"
        )
    for t in external:
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        path = os.path.realpath(os.path.join(base, location))
        if os.path.commonpath([base, path]) != base or not os.path.isfile(path):
            raise ValueError(
                f"External data of tensor {t.name!r} ({location!r}) is not a file "
                f"inside base_dir={base_dir!r}; refusing to read it."
            )
    ext.load_external_data_for_model(model, base)


def fold_onnx(
    model: onnx.ModelProto, base_dir: str | os.PathLike | None = None
) -> tuple[onnx.ModelProto, FoldReport]:
    """Folds batch normalization into the linear nodes of an ONNX model.

    `BatchNormalization` nodes, and `Mul`/`Add`/`Sub`/`Div` nodes with a
    per-channel constant, that follow a `Conv`, `ConvTranspose` (group 1),
    `Gemm` or `MatMul` (with a constant 2-D weight, and its bias `Add`) whose
    output feeds only them are folded into its weights and bias. A
    `BatchNormalization` that cannot be folded becomes one `Mul` and one `Add`.
    A `BatchNormalization` whose parameters are not constants (or invalid)
    is left as it is, reported. The input model is not changed.

    The rewrites are the table `PATTERNS` (one rewrite each), applied until
    none matches; shapes are inferred once.

    Args:
        model: An `onnx.ModelProto` (for example from `onnx.load(path)`).
        base_dir: The folder of the model's `.onnx` file, needed only when it
            was loaded with `load_external_data=False` and keeps tensors in
            external files: they are read from there (never from the working
            directory), and only from inside it.

    Returns:
        `(folded_model, report)`: a new `onnx.ModelProto` (checked with
        `onnx.checker`; tensors from external files are stored inside it) and
        a `FoldReport` listing every folded, kept or unchanged node.

    Raises:
        ValueError: If the model has external data and `base_dir` is missing,
            not a folder, or the data lies outside it.

    Example:

    >>> import onnx  # doctest: +SKIP
    >>> folded, report = fold_onnx(onnx.load("model.onnx"))  # doctest: +SKIP
    """
    onnx = require("onnx")
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(
            "Argument `model` must be an onnx.ModelProto (e.g. onnx.load(path)). "
            f"Received: {type(model).__name__}"
        )
    new = onnx.ModelProto()
    new.CopyFrom(model)
    _load_external_data(new, base_dir)
    g = _Graph(new)
    report = FoldReport()
    while _step(g, report):
        pass
    used = {i for n in g.g.node for i in n.input}
    keep = [i for i in g.g.initializer if i.name in used or i.name in g.outputs]
    del g.g.initializer[:]
    g.g.initializer.extend(keep)
    onnx.checker.check_model(new)
    return new, report
