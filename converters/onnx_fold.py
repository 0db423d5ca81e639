"""`fold_onnx`: fold batch normalization into the linear nodes of any ONNX graph."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from converters._deps import require
from converters.report import FOLDED_PRECEDING, KEPT, FoldRecord, FoldReport

if TYPE_CHECKING:
    import onnx

_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_AFFINE = ("Mul", "Add", "Sub", "Div")


class _Graph:
    def __init__(self, model):
        onnx = require("onnx")
        self.onnx = onnx
        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.refresh()

    def refresh(self):
        self.producer, self.consumers = {}, collections.defaultdict(list)
        for n in self.g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}
        try:
            inferred = self.onnx.shape_inference.infer_shapes(self.model)
            vis = [*inferred.graph.value_info, *inferred.graph.output]
            self.ranks = {
                v.name: len(v.type.tensor_type.shape.dim)
                for v in vis
                if v.type.tensor_type.HasField("shape")
            }
        except Exception:  # noqa: BLE001 - shapes are an optional hint
            self.ranks = {}

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
    """(linear node, weight, bias Add or None, last node) making `tensor`.

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
    x = [g.const(n) for n in node.input[1:5]]
    if any(v is None for v in x) or len(node.output) > 1 and any(node.output[1:]):
        return None
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in x)
    scale = gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))
    return scale, beta - mean * scale


def _step(g, report) -> bool:
    """Folds one node; True if the graph changed."""
    for node in g.g.node:
        if node.op_type == "BatchNormalization" and node.doc_string != "kept":
            vecs = _bn_vectors(g, node)
            if vecs is None:
                continue
            rank = g.ranks.get(node.input[0])

            def bn_vec(axis, r, c, vecs=vecs, rank=rank):
                ok = (axis % r == 1) and (rank is None or rank == r)
                return vecs if ok and vecs[0].size == c else None

            found, why = _foldable(g, node, node.input[0], bn_vec)
            name = node.name or node.output[0]
            if found is not None:
                last = _fold(g, found[0], *found[1])
                if isinstance(last, tuple):  # MatMul without bias: BN -> Add
                    _to_bias_add(g, node, *last[1:])
                else:
                    _replace(g, node, last)
                report.records.append(
                    FoldRecord(name, FOLDED_PRECEDING, found[0][0].name)
                )
                return True
            if rank is None:
                reason = f"{why}; input rank unknown, left as BatchNormalization"
                report.records.append(FoldRecord(name, KEPT, None, reason))
                node.doc_string = "kept"  # left unchanged
                continue
            _to_scale_shift(g, node, vecs, rank)
            report.records.append(FoldRecord(name, KEPT, None, why))
            return True
        if node.op_type in _AFFINE and node.doc_string != "kept":
            c_idx = [i for i in (0, 1) if g.const(node.input[i]) is not None]
            if len(c_idx) != 1 or node.op_type in ("Sub", "Div") and c_idx != [1]:
                continue
            c = np.asarray(g.const(node.input[c_idx[0]]), np.float64)
            if node.op_type == "Div":
                c = 1.0 / c
            if node.op_type == "Sub":
                c = -c
            mul = node.op_type in ("Mul", "Div")
            if not mul and _is_matmul_bias(g, node):
                continue

            def vec(axis, r, ch, c=c, mul=mul):
                v = _per_channel(c, axis, r, ch)
                if v is None:
                    return None
                return (v, np.zeros(ch)) if mul else (np.ones(ch), v)

            found, _ = _foldable(g, node, node.input[1 - c_idx[0]], vec)
            if found is None:
                continue
            target = found[0][0].name
            last = _fold(g, found[0], *found[1])
            _replace(g, node, last)
            name = f"{node.op_type} {node.name or node.output[0]}"
            report.records.append(FoldRecord(name, FOLDED_PRECEDING, target))
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
    mul.doc_string = add.doc_string = "kept"
    idx = list(g.g.node).index(node)
    g.g.node.remove(node)
    g.g.node.insert(idx, add)
    g.g.node.insert(idx, mul)
    g.refresh()


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Folds batch normalization into the linear nodes of an ONNX model.

    `BatchNormalization` nodes, and `Mul`/`Add`/`Sub`/`Div` nodes with a
    per-channel constant, that follow a `Conv`, `ConvTranspose` (group 1),
    `Gemm` or `MatMul` (with a constant 2-D weight, and its bias `Add`) whose
    output feeds only them are folded into its weights and bias. A
    `BatchNormalization` that cannot be folded becomes one `Mul` and one `Add`.
    The input model is not changed.

    Args:
        model: An `onnx.ModelProto` (for example from `onnx.load(path)`).

    Returns:
        `(folded_model, report)`: a new `onnx.ModelProto` (checked with
        `onnx.checker`) and a `FoldReport` listing every folded or kept node.

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
    g = _Graph(new)
    report = FoldReport()
    while _step(g, report):
        pass
    for node in g.g.node:
        if node.doc_string == "kept":
            node.doc_string = ""
    used = {i for n in g.g.node for i in n.input}
    keep = [i for i in g.g.initializer if i.name in used or i.name in g.outputs]
    del g.g.initializer[:]
    g.g.initializer.extend(keep)
    onnx.checker.check_model(new)
    return new, report
