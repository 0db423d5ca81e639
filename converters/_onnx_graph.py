"""`Graph`: an ONNX graph being rewritten in place, with its constants.

What `fold_onnx`'s rewrites need to know about a graph: who makes and who
uses each tensor (uses inside `If`/`Loop`/`Scan` bodies included), which
tensors are true constants (and, for the others, why not), the shapes from
one run of shape inference, and how to add constants and nodes so that the
result stays valid for the model's IR version.
"""

from __future__ import annotations

import collections

import numpy as np

#: Ops with constant inputs whose value `Graph.const` computes (what exporters
#: emit around weights: jax2onnx transposes kernels, computes the BN's
#: `1 / sqrt(var + eps)` in the graph, and flips a transposed convolution's
#: kernel with Shape, Gather, Range and Slice).
_EVAL = (
    "Identity",
    "Shape",
    "Gather",
    "Range",
    "Slice",
    "Cast",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Neg",
    "Sqrt",
    "Reciprocal",
    "Add",
    "Sub",
    "Mul",
    "Div",
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Largest constant (elements) computed from a constant subgraph.
_MAX_EVAL = 1 << 24


def is_default_domain(node) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def node_label(node) -> str:
    """`Conv 'name'` (the first output's name when the node has no name)."""
    return f"{node.op_type} {node.name or node.output[0]!r}"


def attr(node, name, default=None):
    """Value of attribute `name` of `node` (int, float, ints, floats), or default."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_names(graph, out: set) -> None:
    for n in graph.node:
        out.update(n.input)
        for a in n.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                _subgraph_names(sub, out)


#: Initializers of more elements than this are left out of shape inference's
#: copy of the model (`_shape_skeleton`).
_SKELETON_MAX_ELEMENTS = 64


def _shape_skeleton(model):
    """`model` for shape inference: the initializers of more than
    `_SKELETON_MAX_ELEMENTS` elements (weights) become typed graph inputs.

    Shape inference works on a serialized copy of the model: of a 100 MB
    model, that is two more copies of every weight. It needs the values of
    small constants only (shapes, axes), and of the weights their types.
    """
    from onnx import helper

    skeleton = type(model)()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    g, graph = skeleton.graph, model.graph
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        if int(np.prod(init.dims)) <= _SKELETON_MAX_ELEMENTS:
            g.initializer.append(init)
        elif init.name not in inputs:
            info = helper.make_tensor_value_info(init.name, init.data_type, init.dims)
            g.input.append(info)
    return skeleton


class Graph:
    """A model's main graph, rewritten in place by the folding patterns.

    Shape inference runs once, on the input; each rewrite keeps the names and
    shapes of the tensors it keeps and records the shape of any tensor it adds.
    """

    def __init__(self, model):
        import onnx

        self.onnx = onnx
        self.model = model
        self.g = model.graph
        self.ir = model.ir_version
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS),
            1,
        )
        self.inits = {i.name: i for i in self.g.initializer}
        self.inputs = {i.name for i in self.g.input}
        #: Tensors that lost a use in a rewrite: `prune` removes what is dead.
        self.dropped: set[str] = set()
        #: ids of the nodes rewrites removed.
        self.removed: set[int] = set()
        self._values: dict[str, np.ndarray | None] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, int] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(_shape_skeleton(model))
            infos = [*inferred.graph.input, *inferred.graph.value_info]
            infos += list(inferred.graph.output)
        except Exception:  # noqa: BLE001 - shapes are an optional hint
            infos = [*self.g.input, *self.g.value_info, *self.g.output]
        for v in infos:
            t = v.type.tensor_type
            if not v.type.HasField("tensor_type"):
                continue
            if t.elem_type:
                self.dtypes[v.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[v.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None
                    for d in t.shape.dim
                )
        for name, init in self.inits.items():
            self.shapes.setdefault(name, tuple(init.dims))
            self.dtypes.setdefault(name, init.data_type)
        self.refresh()

    # ------------------------------------------------------------ structure
    def refresh(self) -> None:
        """Recomputes producers and consumers (no shape inference)."""
        self.producer = {}
        self.consumers = collections.defaultdict(list)
        for n in self.g.node:
            self._link(n)
        self.outputs = {o.name for o in self.g.output}
        # `_values` stays: every rewrite keeps the value of each tensor name
        # it keeps, and the constants it adds get fresh names.

    def _link(self, n) -> None:
        for o in n.output:
            if o:
                self.producer[o] = n
        for i in n.input:
            if i:
                self.consumers[i].append(n)
        inner: set[str] = set()
        for a in n.attribute:
            if a.type in (a.GRAPH, a.GRAPHS):
                for sub in [a.g] if a.type == a.GRAPH else list(a.graphs):
                    _subgraph_names(sub, inner)
        for i in inner - set(n.input):
            self.consumers[i].append(n)

    def _unuse(self, tensor, node) -> None:
        users = self.consumers.get(tensor, [])
        for k, u in enumerate(users):
            if u is node:
                del users[k]
                return

    def sole_user(self, tensor: str, node) -> bool:
        """True if `node` is the only reader of `tensor` (not a graph output)."""
        users = self.consumers.get(tensor, [])
        return tensor not in self.outputs and len(users) == 1 and users[0] is node

    def rank(self, tensor: str) -> int | None:
        shape = self.shapes.get(tensor)
        return None if shape is None else len(shape)

    def fresh(self, base: str) -> str:
        """A tensor name that nothing in the graph uses yet."""
        name, k = base, 0
        taken = self.inits.keys() | self.producer.keys() | self.inputs
        while name in taken or name in self.consumers or name in self.shapes:
            k += 1
            name = f"{base}_{k}"
        return name

    def index(self, node) -> int:
        for k, n in enumerate(self.g.node):
            if n is node:
                return k
        return list(self.g.node).index(node)

    # ------------------------------------------------------------ constants
    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant, else None.

        A constant is an initializer that is not a graph input (one that is
        can be overridden when the model runs), a `Constant` node, or a small
        computation of constants (`Identity`, `Cast`, `Reshape`,
        `Transpose`, arithmetic: what exporters emit around weights).
        """
        if not name:
            return None
        if name in self._values:
            return self._values[name]
        try:
            value = self._const(name)
        except Exception:  # noqa: BLE001 - not computable here: not a constant
            value = None
        self._values[name] = value
        return value

    def _const(self, name):
        from onnx import numpy_helper

        if name in self.inputs:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None or not is_default_domain(node):
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.asarray(
                        a.f if a.name == "value_float" else a.i,
                        np.float32 if a.name == "value_float" else np.int64,
                    )
                if a.name in ("value_floats", "value_ints"):
                    return np.asarray(
                        list(a.floats if a.name == "value_floats" else a.ints),
                        np.float32 if a.name == "value_floats" else np.int64,
                    )
            return None
        if node.op_type not in _EVAL or len(node.output) != 1:
            return None
        args = [self.const(i) if i else None for i in node.input]
        if not args or args[0] is None:
            return None
        return _evaluate(node, args, self.opset)

    def const_reason(self, name: str) -> str:
        """Why `name` is not a constant (for the report)."""
        if name in self.inits and name in self.inputs:
            return (
                f"{name!r} is an initializer that is also a graph input, so it "
                "can be overridden when the model runs"
            )
        if name in self.inputs:
            return f"{name!r} is a graph input"
        node = self.producer.get(name)
        if node is None:
            return f"{name!r} has no producer"
        return f"{name!r} is computed at run time (by {node_label(node)})"

    # -------------------------------------------------------------- editing
    def add_const(self, array: np.ndarray, base: str) -> str:
        """Adds a constant tensor and returns its name.

        An initializer from IR version 4 on; before that every initializer
        must also be a graph input (which a user could override), so the
        constant is a `Constant` node instead, at the top of the graph.
        """
        from onnx import helper, numpy_helper

        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if self.ir >= 4:
            self.g.initializer.append(tensor)
            self.inits[name] = tensor
        else:
            node = helper.make_node("Constant", [], [name], name=name, value=tensor)
            self.g.node.insert(0, node)
            self.producer[name] = node
        self.shapes[name] = tuple(np.shape(array))
        self.dtypes[name] = tensor.data_type
        return name

    def insert(self, position: int, node) -> None:
        self.g.node.insert(position, node)
        self._link(self.g.node[position])

    def remove(self, node) -> None:
        """Removes `node` (its inputs may be dead now)."""
        for i in node.input:
            if i:
                self._unuse(i, node)
                self.dropped.add(i)
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]
        self.removed.add(id(node))
        del self.g.node[self.index(node)]

    def rename_output(self, node, old: str, new: str) -> None:
        for k, o in enumerate(node.output):
            if o == old:
                node.output[k] = new
        self.producer.pop(old, None)
        self.producer[new] = node

    def set_input(self, node, index: int, name: str) -> None:
        """Points input `index` of `node` at `name` (the old one may be dead)."""
        while len(node.input) <= index:
            node.input.append("")
        if node.input[index]:
            self.dropped.add(node.input[index])
            self._unuse(node.input[index], node)
        node.input[index] = name
        self.consumers[name].append(node)

    def remove_passthrough(self, node, kept: str) -> None:
        """Removes `node`, whose output equals its input `kept`.

        `kept` must be read by `node` only, and made by a node: that node
        takes over `node`'s output name, so every reader (and a graph output
        of that name) sees the same tensor as before.
        """
        out = node.output[0]
        producer = self.producer[kept]
        self.remove(node)
        self.dropped.discard(kept)
        self.rename_output(producer, kept, out)

    def prune(self) -> None:
        """Removes the nodes and initializers that rewrites left unused.

        Only what lost its last use in a rewrite goes; graph inputs (and so
        every initializer of an IR < 4 model) and outputs always stay.
        """
        self.refresh()
        todo = set(self.dropped)
        while todo:
            name = todo.pop()
            if name in self.outputs or self.consumers.get(name):
                continue
            if name in self.inits and name not in self.inputs:
                self.g.initializer.remove(self.inits.pop(name))
                continue
            node = self.producer.get(name)
            if node is None:
                continue
            if any(o in self.outputs or self.consumers.get(o) for o in node.output):
                continue
            self.remove(node)
            todo.update(i for i in node.input if i)
        self.dropped.clear()


#: Integer arithmetic NumPy computes as ONNX does (exactly, wrapping around).
_EXACT_INT = ("Neg", "Add", "Sub", "Mul")


def _evaluate_indexing(node, args):
    """Shape, Gather, Range and Slice on constants, as the ONNX spec defines."""
    op, x = node.op_type, args[0]
    if op == "Shape":
        shape = np.asarray(x.shape, np.int64)
        return shape[attr(node, "start", 0) : attr(node, "end", len(shape))]
    if op == "Range":
        if len(args) != 3 or any(a is None or a.ndim for a in args):
            return None
        count = max(int(np.ceil((args[1] - args[0]) / args[2])), 0)
        return (args[0] + args[2] * np.arange(count)).astype(x.dtype)
    if len(args) < 2 or args[1] is None or args[1].dtype.kind not in "iu":
        return None
    if op == "Gather":
        return np.take(x, args[1], axis=attr(node, "axis", 0))
    if len(args) < 3 or args[2] is None or any(a is None for a in args[3:]):
        return None  # Slice: data, starts, ends[, axes[, steps]]
    starts, ends = np.ravel(args[1]), np.ravel(args[2])
    axes = np.ravel(args[3]) if len(args) > 3 else np.arange(len(starts))
    steps = np.ravel(args[4]) if len(args) > 4 else np.ones(len(starts), np.int64)
    index = [slice(None)] * x.ndim
    for a, b, e, k in zip(axes, starts, ends, steps, strict=True):
        index[int(a)] = slice(int(b), int(e), int(k))
    return x[tuple(index)]


def _axes(node, args, opset):
    if len(args) > 1 and args[1] is not None:
        return [int(a) for a in np.ravel(args[1])]
    return attr(node, "axes")


def _evaluate(node, args, opset):
    """NumPy value of `node` on constant `args` (None when not computable)."""
    op, x = node.op_type, args[0]
    if op == "Identity":
        return x
    if op == "Cast":
        from onnx import helper

        return x.astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))
    if op == "Transpose":
        perm = attr(node, "perm")
        return np.transpose(x, perm if perm else None)
    if op == "Reshape":
        if len(args) < 2 or args[1] is None:
            return None
        shape = [int(d) for d in np.ravel(args[1])]
        if not attr(node, "allowzero", 0):
            shape = [x.shape[k] if d == 0 else d for k, d in enumerate(shape)]
        return np.reshape(x, shape)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(node, args, opset)
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(axes))
        if axes is None:
            return None
        return np.expand_dims(x, tuple(axes))
    if op in ("Shape", "Gather", "Range", "Slice"):
        return _evaluate_indexing(node, args)
    if x.dtype.kind not in "fiu" or (x.dtype.kind != "f" and op not in _EXACT_INT):
        return None  # NumPy's integer division floors, ONNX's truncates
    if op == "Neg":
        return np.negative(x)
    if op == "Sqrt":
        return np.sqrt(x)
    if op == "Reciprocal":
        return np.reciprocal(x)
    if len(args) != 2 or args[1] is None or args[1].dtype != x.dtype:
        return None
    y = args[1]
    if np.broadcast_shapes(x.shape, y.shape) and x.size * y.size > _MAX_EVAL:
        return None
    fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
    with np.errstate(all="ignore"):
        return fn[op](x, y)
