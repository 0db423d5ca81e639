"""Edits of an exported ONNX model: graph input/output names, free dimension
names, and float16 weights and compute. Each returns a new `ModelProto`."""

from __future__ import annotations

from ._deps import require

# (op type, input index) slots that ONNX requires to stay float32 (or whose
# float32 constant is a shape parameter, not data): left as they are by
# `to_float16`.
_FLOAT32_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _subgraphs(graph):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield attr.g
                yield from _subgraphs(attr.g)
            elif attr.type == attr.GRAPHS:
                for g in attr.graphs:
                    yield g
                    yield from _subgraphs(g)


def _tensor_names(graph) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for g in (graph, *_subgraphs(graph)):
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    return names


def _rename_tensor(graph, old: str, new: str) -> None:
    for g in (graph, *_subgraphs(graph)):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        for values in (g.input, g.output, g.value_info):
            for v in values:
                if v.name == old:
                    v.name = new
        for init in g.initializer:
            if init.name == old:
                init.name = new


def rename_io(proto, input_names=None, output_names=None):
    """`proto` with its graph inputs and outputs renamed (in order).

    A tensor inside the graph that already has one of the new names is
    renamed first (`<name>__<k>`), so that no two tensors share a name.
    """
    onnx = require("onnx")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    wanted = []
    for values, names in ((graph.input, input_names), (graph.output, output_names)):
        if names is not None:
            wanted += [
                (v.name, n) for v, n in zip(values, names, strict=True) if v.name != n
            ]
    if not wanted:
        return out
    taken = _tensor_names(graph)
    renamed = {old for old, _ in wanted}
    for _, new in wanted:
        if new in taken and new not in renamed:
            k = 0
            while f"{new}__{k}" in taken:
                k += 1
            _rename_tensor(graph, new, f"{new}__{k}")
            taken.add(f"{new}__{k}")
    # Two steps, through unique temporary names, so that swaps work.
    for j, (old, _) in enumerate(wanted):
        _rename_tensor(graph, old, f"\x00rename{j}")
    for j, (_, new) in enumerate(wanted):
        _rename_tensor(graph, f"\x00rename{j}", new)
    return out


def name_free_dims(proto, specs, batch_name: str = "batch"):
    """`proto` with free input dimensions named like `specs` and every
    output's free first dimension named `batch_name`.

    Exporters name a free dimension after an internal symbol (tf2onnx:
    `unk__12`); a batch dimension is `batch_name` in every input and output,
    others `dim_<input>_<axis>`.
    """
    onnx = require("onnx")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    for i, (value, spec) in enumerate(zip(graph.input, specs, strict=True)):
        dims = value.type.tensor_type.shape.dim
        for k, (dim, size) in enumerate(zip(dims, spec.shape, strict=False)):
            if size is None and not dim.HasField("dim_value"):
                dim.dim_param = batch_name if k == 0 else f"dim_{i}_{k}"
    if any(spec.shape and spec.shape[0] is None for spec in specs):
        for value in graph.output:
            dims = value.type.tensor_type.shape.dim
            if len(dims) and not dims[0].HasField("dim_value"):
                dims[0].dim_param = batch_name
    return out


def opset_of(proto) -> int:
    """The default-domain ("" or "ai.onnx") opset of `proto`."""
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise ValueError("The ONNX model imports no default-domain opset.")


def to_float16(proto):
    """`proto` with float32 weights, constants, casts, inputs and outputs
    made float16, so that ONNX Runtime computes in float16.

    float32 constants in slots ONNX keeps float32 (`Resize` scales) stay.
    """
    onnx = require("onnx")
    numpy_helper = require("onnx.numpy_helper")
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    keep = set()
    for g in (out.graph, *_subgraphs(out.graph)):
        for node in g.node:
            for i, name in enumerate(node.input):
                if (node.op_type, i) in _FLOAT32_SLOTS:
                    keep.add(name)

    def half(tensor):
        if tensor.data_type == f32 and tensor.name not in keep:
            array = numpy_helper.to_array(tensor).astype("float16")
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    for g in (out.graph, *_subgraphs(out.graph)):
        for init in g.initializer:
            half(init)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == attr.TENSOR and node.output[0] not in keep:
                    half(attr.t)
                elif node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
                    attr.i = f16
        for values in (g.input, g.output):
            for v in values:
                if v.type.tensor_type.elem_type == f32 and v.name not in keep:
                    v.type.tensor_type.elem_type = f16
        del g.value_info[:]
    return out
