"""`fold_onnx`: fold batch normalization into the linear nodes of any ONNX graph."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np

from ._deps import require
from ._onnx_graph import Graph, attr, is_default_domain, node_label
from .fold_math import bn_scale_shift
from .report import (
    FOLDED_PRECEDING,
    KEPT,
    UNCHANGED,
    FoldRecord,
    FoldReport,
)

if TYPE_CHECKING:
    import onnx

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
AFFINE = ("Mul", "Add", "Sub", "Div")
#: Ops that move values without changing them: a per-channel scale and shift
#: passes through them when the channel's new axis is provable.
LAYOUT = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast")
_LINEAR_NAMES = "Conv/ConvTranspose/Gemm/MatMul"


@dataclasses.dataclass
class _Unit:
    """A linear node with a constant weight, and where its channels are."""

    node: object
    w: np.ndarray
    axis: int | None  # channel axis of the output (None: last, rank unknown)
    rank: int | None
    channels: int


@dataclasses.dataclass
class _Step:
    node: object
    scale: np.ndarray
    shift: np.ndarray
    after_layout: bool  # a layout op lies between the linear node and it


# ------------------------------------------------------------------ matching
def _linear_unit(g: Graph, node) -> _Unit | str:
    """`node` as a linear unit, or why it is not one."""
    op = node.op_type
    if op not in LINEAR or not is_default_domain(node) or len(node.input) < 2:
        return f"{node_label(node)} is not a {_LINEAR_NAMES} node"
    w = g.const(node.input[1])
    if w is None:
        return f"the weight of {node_label(node)}: {g.const_reason(node.input[1])}"
    if w.dtype.kind != "f":
        return f"the weight of {node_label(node)} is not floating point"
    if op in ("Conv", "ConvTranspose"):
        if w.ndim < 3:
            return f"the weight of {node_label(node)} has rank {w.ndim}"
        c = w.shape[0] if op == "Conv" else w.shape[1] * int(attr(node, "group", 1))
        return _Unit(node, w, 1, w.ndim, c)
    if op == "Gemm":
        if w.ndim != 2:
            return f"the weight of {node_label(node)} has rank {w.ndim}"
        return _Unit(
            node, w, 1, 2, w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        )
    if w.ndim != 2:
        return f"the weight of {node_label(node)} has rank {w.ndim}, not 2"
    rank = g.rank(node.input[0])
    if rank is None:
        return _Unit(node, w, None, None, w.shape[1])
    return _Unit(node, w, max(rank, 1) - 1, max(rank, 1), w.shape[1])


def _per_channel(c, axis, rank, channels, shape=None) -> np.ndarray | str:
    """Constant `c`, broadcast against a tensor with channels on `axis`.

    `shape` (the tensor's, if known) allows constants that repeat one value
    per channel along other axes without enlarging the tensor.
    """
    c = np.asarray(c)
    if rank is None:  # channels on the last axis, rank unknown
        if c.ndim > 1:
            return f"its constant of shape {c.shape} may broadcast to a new rank"
        rank, axis = max(c.ndim, 1), max(c.ndim, 1) - 1
    if c.ndim > rank:
        return f"its constant of shape {c.shape} has more axes than the tensor"
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    why = (
        f"its constant of shape {c.shape} is not per channel (the "
        f"{channels} channels are on axis {axis} of a rank-{rank} tensor)"
    )
    if c.shape[axis] not in (1, channels):
        return why
    others = tuple(k for k, d in enumerate(c.shape) if k != axis and d != 1)
    if others:
        if shape is None or any(shape[k] != c.shape[k] for k in others):
            return why
        first = c[
            tuple(slice(0, 1) if k in others else slice(None) for k in range(rank))
        ]
        if not np.array_equal(np.broadcast_to(first, c.shape), c):
            return why
        c = first
    return np.broadcast_to(np.reshape(c, -1), (channels,)).astype(np.float64)


def _bn_params(g: Graph, node):
    """`(scale, shift)` of an inference BatchNormalization (per channel, or
    per activation with `spatial=0`), or why it cannot be folded."""
    if g.opset >= 14 and attr(node, "training_mode", 0):
        return "it has training_mode=1 (it normalizes with the batch's statistics)"
    if g.opset < 7 and not attr(node, "is_test", 0):
        return "it runs in training mode (is_test=0)"
    extra = [o for o in node.output[1:] if o]
    if extra:
        return (
            f"it has the statistics outputs {extra} (training mode), which a "
            "folded graph cannot produce"
        )
    names = ("scale", "B", "input_mean", "input_var")
    if len(node.input) < 5:
        return "it has fewer than 5 inputs"
    values = [g.const(n) for n in node.input[1:5]]
    missing = [
        f"{k} ({g.const_reason(n)})"
        for k, n, v in zip(names, node.input[1:5], values, strict=True)
        if v is None
    ]
    if missing:
        return f"its {', '.join(missing)} input(s) are not constants"
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in values)
    eps = float(attr(node, "epsilon", 1e-5))
    if g.opset <= 8 and attr(node, "spatial", 1) == 0:
        shapes = {v.shape for v in (gamma, beta, mean, var)}
        if len(shapes) != 1:
            return f"its parameters have different shapes {sorted(shapes)}"
        if not np.all(var + eps > 0) or not np.all(np.isfinite(values)):
            return "its parameters are invalid: variance + epsilon must be positive"
        scale = gamma / np.sqrt(var + eps)
        return scale, beta - mean * scale
    try:
        return bn_scale_shift(
            np.ravel(mean),
            np.ravel(var),
            eps,
            gamma=np.ravel(gamma),
            beta=np.ravel(beta),
        )
    except ValueError as e:
        return f"its parameters are invalid: {e}"


def _affine(g: Graph, node, tensor, axis, rank, channels):
    """`(scale, shift)` per channel of `node` applied to `tensor`, or a reason.

    Returns None when `node` is no candidate at all (not an affine op).
    """
    op = node.op_type
    if not is_default_domain(node):
        return None
    if op == "BatchNormalization":
        params = _bn_params(g, node)
        if isinstance(params, str):
            return params
        scale, shift = params
        if scale.ndim == 1:  # per channel along axis 1
            if rank is None or axis != 1:
                where = "an unknown axis" if rank is None else f"axis {axis}"
                return (
                    "it normalizes axis 1, but the channels of the linear node "
                    f"are on {where} here"
                )
            if scale.size != channels:
                return f"it has {scale.size} channels, the linear node {channels}"
            return scale, shift
        # spatial=0: per activation, shaped like the input without its batch
        shape = g.shapes.get(node.input[0])
        s = _per_channel(scale, axis, rank, channels, shape)
        t = _per_channel(shift, axis, rank, channels, shape)
        if isinstance(s, str) or isinstance(t, str):
            return "its per-activation statistics (spatial=0) vary within a channel"
        return s, t
    if op not in AFFINE or len(node.input) != 2:
        return None
    if node.input[0] == node.input[1]:
        return f"{op} of a tensor with itself"
    k = list(node.input).index(tensor)
    other = node.input[1 - k]
    c = g.const(other)
    if c is None:
        return f"its other operand {g.const_reason(other)}"
    if c.dtype.kind != "f":
        return "its constant is not floating point"
    v = _per_channel(c, axis, rank, channels, g.shapes.get(tensor))
    if isinstance(v, str):
        return v
    if not np.all(np.isfinite(v)):
        return "its constant has non-finite values"
    one, zero = np.ones(channels), np.zeros(channels)
    if op == "Mul":
        return v, zero
    if op == "Add":
        return one, v
    if op == "Sub":
        return (one, -v) if k == 0 else (-one, v)
    if k == 1:
        return "it divides by the tensor (not an affine map)"
    if np.any(v == 0):
        return "it divides by zero"
    return 1.0 / v, zero


def _layout(g: Graph, node, tensor, axis, rank, channels):
    """`(axis, rank)` of the channels after layout op `node`, or a reason."""
    op = node.op_type
    out = node.output[0]
    if op == "Identity":
        return axis, rank
    if op == "Cast":
        same = g.dtypes.get(tensor) == attr(node, "to") and g.dtypes.get(tensor)
        return (axis, rank) if same else f"{node_label(node)} changes the type"
    if rank is None:
        return f"the rank before {node_label(node)} is unknown"
    known = g.shapes.get(tensor)
    if known is not None and len(known) != rank:
        return f"the rank before {node_label(node)} is uncertain"
    if op == "Transpose":
        perm = attr(node, "perm") or list(range(rank))[::-1]
        if sorted(perm) != list(range(rank)):
            return f"{node_label(node)} has an invalid perm {perm}"
        return list(perm).index(axis), rank
    if op in ("Squeeze", "Unsqueeze"):
        if len(node.input) > 1 and node.input[1]:
            a = g.const(node.input[1])
            axes = None if a is None else [int(x) for x in np.ravel(a)]
            if axes is None:
                return f"the axes of {node_label(node)} are computed at run time"
        else:
            axes = attr(node, "axes")
        if op == "Squeeze":
            shape = g.shapes.get(tensor)
            if axes is None:
                if shape is None or None in shape:
                    return f"{node_label(node)} squeezes axes unknown here"
                axes = [k for k, d in enumerate(shape) if d == 1]
            axes = sorted({a % rank for a in axes})
            if axis in axes:
                return f"{node_label(node)} removes the channel axis"
            return axis - sum(a < axis for a in axes), rank - len(axes)
        if axes is None:
            return f"{node_label(node)} has no axes"
        new_rank = rank + len(axes)
        axes = {a % new_rank for a in axes}
        return [p for p in range(new_rank) if p not in axes][axis], new_rank
    # Reshape, Flatten: provable when the channel and everything after it
    # keep their sizes (the flat index of each element keeps its channel).
    before, after = g.shapes.get(tensor), g.shapes.get(out)
    if before is None or after is None:
        return f"the shapes around {node_label(node)} are unknown"
    inner = before[axis + 1 :]
    if before[axis] not in (channels, None) or None in inner:
        return f"the shapes around {node_label(node)} are unknown"
    size = int(np.prod(inner, dtype=np.int64))
    for b in range(len(after)):
        rest = after[b + 1 :]
        if after[b] == channels and None not in rest and np.prod(rest) == size:
            return b, len(after)
    return f"{node_label(node)} moves the channels ({before} -> {after})"


def _walk(g: Graph, unit: _Unit):
    """The chain of per-channel affine nodes after `unit`.

    Returns `(steps, stop, reason)`: the affine steps (through layout ops),
    the node where the chain stopped (or None) and why.
    """
    cur, axis, rank, ch = unit.node.output[0], unit.axis, unit.rank, unit.channels
    steps, layout = [], False
    while True:
        users = g.consumers.get(cur, [])
        if cur in g.outputs or len(users) != 1:
            names = [node_label(u) for u in users] + (
                ["a graph output"] if cur in g.outputs else []
            )
            nxt = users[0] if users else None
            return steps, nxt, f"{cur!r} is read by {len(names)}: {', '.join(names)}"
        n = users[0]
        if n.op_type in LAYOUT and is_default_domain(n) and n.input[0] == cur:
            moved = _layout(g, n, cur, axis, rank, ch)
            if isinstance(moved, str):
                return steps, n, moved
            axis, rank = moved
            layout = layout or n.op_type not in ("Identity", "Cast")
            cur = n.output[0]
            continue
        if n.op_type == "BatchNormalization" and n.input[0] != cur:
            return steps, n, f"{cur!r} is not its data input"
        found = _affine(g, n, cur, axis, rank, ch)
        if found is None:
            return steps, n, f"{node_label(n)} is not an affine op"
        if isinstance(found, str):
            return steps, n, found
        steps.append(_Step(n, *found, after_layout=layout))
        cur = n.output[0]


def _root(g: Graph, node):
    """The linear node that a chain through `node` starts from, or a reason."""
    cur = node
    while True:
        x = _data_input(g, cur)
        if x is None:
            return f"{node_label(cur)} has no single tensor operand"
        p = g.producer.get(x)
        if p is None:
            return f"its input {x!r} is a graph input, not made by {_LINEAR_NAMES}"
        if not g.sole_user(x, cur):
            return f"{x!r} (from {node_label(p)}) is read by other nodes too"
        if p.op_type in LINEAR and is_default_domain(p):
            return p
        if (
            not is_default_domain(p)
            or p.op_type not in LAYOUT + AFFINE + ("BatchNormalization",)
            or _data_input(g, p) is None
        ):
            return f"its input comes from {node_label(p)}, not from {_LINEAR_NAMES}"
        cur = p


def _data_input(g: Graph, node):
    if node.op_type in LAYOUT or node.op_type == "BatchNormalization":
        return node.input[0] if node.input else None
    if node.op_type in AFFINE and len(node.input) == 2:
        consts = [g.const(i) is not None for i in node.input]
        if consts.count(False) == 1:
            return node.input[consts.index(False)]
    return None


def _bn_like(g: Graph, node) -> bool:
    """A BatchNormalization, or a scale/shift that may be one (reported)."""
    if not is_default_domain(node):
        return False
    if node.op_type == "BatchNormalization":
        return True
    vec = _vector_operand(g, node)
    if vec is None:
        return False
    if node.op_type in ("Mul", "Div"):
        return True
    # an Add/Sub next to a per-channel Mul/Div (the shift of a scale-shift)
    x = _data_input(g, node)
    p = g.producer.get(x)
    if (
        p is not None
        and p.op_type in ("Mul", "Div")
        and _vector_operand(g, p) is not None
    ):
        return True
    users = g.consumers.get(node.output[0], [])
    return (
        len(users) == 1
        and users[0].op_type in ("Mul", "Div")
        and (_vector_operand(g, users[0]) is not None)
    )


def _vector_operand(g: Graph, node):
    """The constant of an affine node if it is a vector along one axis."""
    if node.op_type not in AFFINE or _data_input(g, node) is None:
        return None
    k = list(node.input).index(_data_input(g, node))
    c = g.const(node.input[1 - k])
    if c is None or c.size < 2 or sum(d != 1 for d in c.shape) != 1:
        return None
    return c


# ------------------------------------------------------------------ rewriting
def _fold(g: Graph, unit: _Unit, steps: list[_Step]) -> None:
    """Folds `steps` (their composition) into `unit`'s weight and bias."""
    scale, shift = np.ones(unit.channels), np.zeros(unit.channels)
    for s in steps:
        scale, shift = scale * s.scale, shift * s.scale + s.shift
    p, w = unit.node, np.asarray(unit.w, np.float64)
    dtype = unit.w.dtype
    base = p.name or p.output[0]
    if p.op_type == "Conv":
        new_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif p.op_type == "ConvTranspose":
        group = int(attr(p, "group", 1))
        per = w.shape[1]
        s = scale.reshape(group, 1, per, *(1,) * (w.ndim - 2))
        new_w = (w.reshape(group, -1, *w.shape[1:]) * s).reshape(w.shape)
    elif p.op_type == "Gemm":
        new_w = w * (scale[:, None] if attr(p, "transB", 0) else scale[None, :])
    else:
        new_w = w * scale[None, :]
    g.set_input(p, 1, g.add_const(new_w.astype(dtype), f"{base}_folded_w"))
    for s in steps:
        g.remove_passthrough(s.node, _data_input(g, s.node))
    if p.op_type == "MatMul":
        if np.any(shift):
            out = p.output[0]
            mid = g.fresh(f"{out}_unbiased")
            g.shapes[mid], g.dtypes[mid] = g.shapes.get(out), g.dtypes.get(out)
            if g.shapes[mid] is None:
                del g.shapes[mid]
            g.rename_output(p, out, mid)
            t = g.add_const(shift.astype(dtype), f"{base}_folded_bias")
            add = _make("Add", [mid, t], [out], f"{base}_bias")
            g.insert(g.index(p) + 1, add)
        return
    bias = p.input[2] if len(p.input) > 2 else ""
    beta = float(attr(p, "beta", 1.0)) if p.op_type == "Gemm" else 1.0
    if p.op_type == "Gemm":
        _set_float(p, "beta", 1.0)
    if not bias:
        if np.any(shift):
            g.set_input(p, 2, g.add_const(shift.astype(dtype), f"{base}_folded_b"))
        return
    b = g.const(bias)
    if b is not None:  # any shape that broadcasts (Gemm's C: (N,), (M, 1), ...)
        new_b = np.asarray(b, np.float64) * beta * scale + shift
        g.set_input(p, 2, g.add_const(new_b.astype(dtype), f"{base}_folded_b"))
        return
    # a bias computed at run time (or an overridable one): scale it in the graph
    cur = bias
    if beta != 1.0 or np.any(scale != 1.0):
        s = g.add_const((scale * beta).astype(dtype), f"{base}_bias_scale")
        nxt = g.fresh(f"{base}_bias_scaled")
        g.insert(g.index(p), _make("Mul", [cur, s], [nxt], nxt))
        cur = nxt
    if np.any(shift):
        t = g.add_const(shift.astype(dtype), f"{base}_bias_shift")
        nxt = g.fresh(f"{base}_bias_shifted")
        g.insert(g.index(p), _make("Add", [cur, t], [nxt], nxt))
        cur = nxt
    if cur != bias:
        g.set_input(p, 2, cur)


def _make(op, inputs, outputs, name):
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name=name)


def _set_float(node, name, value):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _to_scale_shift(g: Graph, node, scale, shift) -> str | tuple:
    """Replaces an unfoldable BatchNormalization by one Mul and one Add."""
    x = node.input[0]
    rank = g.rank(x)
    if scale.ndim == 1:
        if rank is None or rank < 2:
            return "its input rank is unknown"
        shape = (-1,) + (1,) * (rank - 2)
    else:
        shape = scale.shape
    dtype = g.const(node.input[1]).dtype
    base = node.name or node.output[0]
    s = g.add_const(np.reshape(scale, shape).astype(dtype), f"{base}_scale")
    t = g.add_const(np.reshape(shift, shape).astype(dtype), f"{base}_shift")
    mid = g.fresh(f"{base}_scaled")
    if x in g.shapes:
        g.shapes[mid] = g.shapes[x]
    mul = _make("Mul", [x, s], [mid], f"{base}_mul")
    add = _make("Add", [mid, t], [node.output[0]], f"{base}_add")
    at = g.index(node)
    g.remove(node)
    g.insert(at, add)
    g.insert(at, mul)
    return g.g.node[at], g.g.node[at + 1]


# -------------------------------------------------------------------- driver
def _visit(g: Graph, node, report: FoldReport, done: set) -> None:
    """Folds the chain through `node`, or reports why not (if BN-like)."""
    root = _root(g, node)
    reason = root if isinstance(root, str) else None
    if reason is None:
        unit = _linear_unit(g, root)
        if isinstance(unit, str):
            reason = unit
        else:
            steps, stop, why = _walk(g, unit)
            if any(s.node is node for s in steps):
                _fold_steps(g, unit, steps, report, done)
                return
            reason = f"not folded into {node_label(root)}: {why}"
    if not _bn_like(g, node):
        return
    name = _record_name(node)
    if node.op_type != "BatchNormalization":
        report.records.append(FoldRecord(name, KEPT, None, reason))
        return
    params = _bn_params(g, node)
    if not isinstance(params, str):
        made = _to_scale_shift(g, node, *params)
        if not isinstance(made, str):
            done.update(id(n) for n in made)
            report.records.append(FoldRecord(name, KEPT, None, reason))
            return
        params = made
    reason = params if params in reason else f"{reason}; {params}"
    reason = f"{reason}: left as BatchNormalization"
    report.records.append(FoldRecord(name, UNCHANGED, None, reason))


def _fold_steps(g, unit, steps, report, done) -> None:
    target = unit.node.name or unit.node.output[0]
    bias = (
        unit.node.op_type == "MatMul"
        and steps[0].node.op_type == "Add"
        and not steps[0].after_layout
    )
    if bias and len(steps) == 1:
        done.add(id(steps[0].node))  # a MatMul's own bias: nothing to fold
        return
    for s in steps[1:] if bias else steps:
        report.records.append(
            FoldRecord(_record_name(s.node), FOLDED_PRECEDING, target)
        )
    done.update(id(s.node) for s in steps)
    _fold(g, unit, steps)


def _record_name(node) -> str:
    name = node.name or node.output[0]
    return name if node.op_type == "BatchNormalization" else f"{node.op_type} {name}"


def _candidate(g: Graph, node) -> bool:
    if not is_default_domain(node):
        return False
    if node.op_type == "BatchNormalization":
        return True
    return node.op_type in AFFINE and _data_input(g, node) is not None


def _run(g: Graph, report: FoldReport) -> None:
    if g.opset < 7:
        for n in g.g.node:
            if n.op_type == "BatchNormalization" and is_default_domain(n):
                reason = (
                    f"opset {g.opset} < 7 (legacy broadcasting) is not supported: "
                    "left as BatchNormalization"
                )
                report.records.append(
                    FoldRecord(_record_name(n), UNCHANGED, None, reason)
                )
        return
    done: set[int] = set()
    for node in list(g.g.node):
        if id(node) in done or not _candidate(g, node):
            continue
        if id(node) in g.removed:
            continue  # removed by an earlier fold
        done.add(id(node))
        _visit(g, node, report, done)


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

    A chain of per-channel affine nodes (`BatchNormalization` in inference
    mode, `Mul`/`Add`/`Sub`/`Div` by a per-channel constant) after a `Conv`,
    `ConvTranspose`, `Gemm` or `MatMul` with a constant weight is folded into
    that node's weight and bias, also through layout ops that provably keep
    each element's channel (`Transpose`, `Reshape`, `Flatten`, `Squeeze`,
    `Unsqueeze`, `Identity`, a `Cast` to the same type), where every tensor
    on the way feeds only the next node. A `BatchNormalization` that cannot
    be folded becomes one `Mul` and one `Add`, or is left as it is (training
    mode, parameters that are not constants). Every batch normalization, and
    every per-channel scale-shift that was not folded, is in the report with
    the reason. Weights that are graph inputs (initializers a user can
    override, as every initializer of an IR < 4 model is) are never baked
    in. The input model is not changed.

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
        TypeError: If `model` is not an `onnx.ModelProto`.
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
    g = Graph(new)
    report = FoldReport()
    _run(g, report)
    g.prune()
    del g  # its cache of constant values
    # A message keeps the memory of the fields removed from it (the weights
    # replaced by their folded values) until it is freed: a copy holds only
    # what is left.
    out = onnx.ModelProto()
    out.CopyFrom(new)
    del new
    onnx.checker.check_model(out)
    return out, report
