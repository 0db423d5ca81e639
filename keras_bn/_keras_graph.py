"""Every use of Keras's private API in keras-bn, in one place.

Keras 3 has no public way to walk a Functional graph node by node, to read a
model's nested input structure, to list a layer's sublayers, or to put one
sublayer in the place of another. The folding and replacing code needs all
four, so they live here: a Keras upgrade that renames `_nodes_by_depth`,
`_inbound_nodes`, `_keras_history`, `_inputs_struct`, `_flatten_layers`,
`_layers`, `_tracker` or `_torch_params` touches this file only. (The one
other private name the package reads is the JAX trainer's `_jax_state`, in
`keras_bn/backend/jax.py`, where backend code belongs.)
"""

from __future__ import annotations

import collections

import keras


def is_functional(model) -> bool:
    """True for a Functional model (`keras.Model(inputs, outputs)`)."""
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def is_graph_model(model) -> bool:
    """True for a Sequential or Functional model (a graph to rewrite)."""
    return isinstance(model, keras.Sequential) or is_functional(model)


def inputs_struct(model):
    """The model's nested input structure (Functional), else `None`."""
    if isinstance(model, keras.Sequential) or not is_functional(model):
        return None
    return model._inputs_struct


def pack_inputs(model, flat: list):
    """Packs a flat list of arrays the way `model` expects its inputs."""
    struct = inputs_struct(model)
    if struct is None:
        return flat[0] if len(flat) == 1 else flat
    return keras.tree.pack_sequence_as(struct, list(flat))


def sublayers(layer) -> list:
    """Every layer tracked inside `layer` (recursively), `layer` excluded."""
    return list(layer._flatten_layers(include_self=False, recursive=True))


def graph_operations(model) -> list:
    """The operations (layers, `keras.ops` ops) of a graph model's graph."""
    graph = model._functional if isinstance(model, keras.Sequential) else model
    if graph is None:
        return list(model.layers)
    return list(graph.operations)


def holders(model) -> dict:
    """`id(layer)` -> the layers (`model` included) tracking it directly."""
    owners = collections.defaultdict(list)
    for parent in [model, *sublayers(model)]:
        for child in parent._layers:
            owners[id(child)].append(parent)
    return owners


def replace_sublayer(parent, old, new) -> list[str]:
    """Puts `new` wherever `parent` holds `old`; returns the attribute paths.

    Looks through `parent`'s attributes, directly and inside (nested) lists,
    tuples and dicts, and replaces `old` by `new` at `old`'s position in
    `parent`'s layer tracker, so that `parent.weights` keeps its order and
    length. Nothing is changed (and `[]` returned) if no attribute holds
    `old` (it is then reachable only in a way this cannot rewrite).
    """
    store = parent._layers
    found = []
    attributes = dict(vars(parent))
    # On torch a layer is a `torch.nn.Module`: the layers it holds directly as
    # attributes live in its `_modules` dict, not in the instance dict.
    modules = attributes.pop("_modules", None)
    for name, value in attributes.items():
        if value is store or name in ("_tracker", "_inbound_nodes", "_outbound_nodes"):
            continue
        new_value, paths = _substitute(value, old, new, name)
        if paths:
            found.extend(paths)
            if new_value is not value:
                object.__setattr__(parent, name, new_value)
    for name, value in list((modules or {}).items()):
        new_value, paths = _substitute(value, old, new, name)
        if paths:
            found.extend(paths)
            if new_value is not value:
                dict.__setitem__(modules, name, new_value)  # no re-tracking
    if found:
        parent._tracker.replace_tracked_value("layers", old, new)
    return found


def retrack_torch_params(model) -> None:
    """On torch, makes `model.parameters()` list the variables it now holds.

    Each built layer keeps its variables (its sublayers' included) in a
    `torch.nn.ParameterDict` made at build; a sublayer swapped in place after
    that would leave the swapped-out layer's variables there, in what torch
    code (a torch optimizer, DDP) reads. A no-op on the other backends.
    """
    for layer in [model, *sublayers(model)]:
        if hasattr(layer, "_torch_params"):
            layer._track_variables()


def _substitute(value, old, new, path):
    """(value with `old` replaced by `new`, the paths where it was found)."""
    if value is old:
        return new, [path]
    if isinstance(value, keras.layers.Layer) or not isinstance(
        value, (list, tuple, dict)
    ):
        return value, []
    found = []
    if isinstance(value, dict):
        for key, item in list(value.items()):
            item2, paths = _substitute(item, old, new, f"{path}[{key!r}]")
            if paths:
                found.extend(paths)
                dict.__setitem__(value, key, item2)  # no re-tracking
        return value, found
    items = list(value)
    for i, item in enumerate(items):
        item2, paths = _substitute(item, old, new, f"{path}[{i}]")
        if paths:
            found.extend(paths)
            items[i] = item2
            if isinstance(value, list):
                list.__setitem__(value, i, item2)  # no re-tracking
    if found and isinstance(value, tuple):
        if hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items), found
        return type(value)(items), found
    return value, found


class Graph:
    """Consumers, producers and per-operation nodes of one graph model.

    Attributes:
        graph: The Functional graph (a Sequential's inner Functional).
        nodes: The nodes in topological order (inputs excluded).
        operations: Each distinct operation (layer or `keras.ops` op) once.
        layer_nodes: `id(operation)` -> its nodes.
    """

    def __init__(self, model):
        graph = model._functional if isinstance(model, keras.Sequential) else model
        if graph is None:
            raise ValueError(
                f"The Sequential model {model.name!r} has no graph yet. Start it "
                "with `keras.Input(shape)` (or call it on data) first."
            )
        self.graph = graph
        depths = sorted(graph._nodes_by_depth, reverse=True)
        self.nodes = [
            n
            for d in depths
            for n in graph._nodes_by_depth[d]
            if n.operation is not None and not n.is_input
        ]
        self.node_ids = {id(n) for n in self.nodes}
        self.consumers = collections.defaultdict(list)
        self.layer_nodes = collections.defaultdict(list)
        for n in self.nodes:
            self.layer_nodes[id(n.operation)].append(n)
            for t in n.input_tensors:
                self.consumers[id(t)].append(n)
        self.output_ids = {id(t) for t in graph.outputs}
        self.operations = list(
            {id(n.operation): n.operation for n in self.nodes}.values()
        )

    def producer(self, tensor):
        """The node making `tensor` in this graph, or None (an input)."""
        op, node_index, _ = tensor._keras_history
        node = op._inbound_nodes[node_index]
        return node if id(node) in self.node_ids else None

    def only_consumer(self, tensor):
        """The single node consuming `tensor`, or None (several, none, output)."""
        users = self.consumers.get(id(tensor), [])
        if id(tensor) in self.output_ids or len(users) != 1:
            return None
        return users[0]

    def rebuild(self, model, replacement: dict):
        """A new model calling `replacement[id(op)]` in place of each op.

        A replacement of `None` makes the node an identity on its first input.
        """
        if isinstance(model, keras.Sequential):
            layers = [replacement[id(op)] for op in model.layers]
            layers = [lyr for lyr in layers if lyr is not None]
            inputs = _new_input(model.inputs[0])
            return keras.Sequential([inputs, *layers], name=model.name)
        graph = self.graph
        tensors = {}
        new_inputs = keras.tree.map_structure(_new_input, graph._inputs_struct)
        for old, new in zip(graph.inputs, keras.tree.flatten(new_inputs), strict=True):
            tensors[id(old)] = new
        for node in self.nodes:
            args, kwargs = node.arguments.fill_in(tensors)
            op = replacement[id(node.operation)]
            if op is None:  # folded away: identity
                outputs = args[0] if args else kwargs["inputs"]
            else:
                outputs = op(*args, **kwargs)
            for old, new in zip(node.outputs, keras.tree.flatten(outputs), strict=True):
                tensors[id(old)] = new
        outputs = keras.tree.map_structure(
            lambda t: tensors[id(t)], graph._outputs_struct
        )
        return keras.Model(new_inputs, outputs, name=model.name)


def _new_input(x):
    return keras.Input(batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse, name=x.name)
