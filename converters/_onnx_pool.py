"""Max pooling that ONNX Runtime can run, from jax2onnx's form.

jax2onnx writes a channels-last `MaxPooling2D`/`3D` (`lax.reduce_window`) as
`Unsqueeze(axes=[0, 1])`, then a `MaxPool` whose spatial axes are all the
input's axes (batch and channels with a window of 1), then `Squeeze`: a
4-D or 5-D spatial pooling, which ONNX defines but ONNX Runtime does not
run ("Unsupported pooling size"; it pools over 1 to 3 spatial axes). Keras's
own JAX export has the same form and fails the same way on e.g. ResNet50.

`channels_first_pools` rewrites each such triple as a `MaxPool` over the
real spatial axes, channels-first (between two Transposes for channels-last
data): the same values, since the batch and channel windows were 1 wide,
unpadded, stride 1.
"""

from __future__ import annotations

from ._deps import require

# ONNX Runtime's MaxPool takes 1 to 3 spatial axes.
_ORT_MAX_SPATIAL = 3


def _attrs(node) -> dict:
    onnx = require("onnx")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _axes(node, constants: dict):
    """The `axes` of an Unsqueeze/Squeeze (attribute, or constant input)."""
    attrs = _attrs(node)
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) for a in constants[node.input[1]].reshape(-1)]
    return None


def _channel_axis(pool, rank: int):
    """The input axis to move next to the batch as channels: the last one (or
    else axis 1) if the window is trivial (1 wide, stride 1, unpadded) on it
    and on the batch axis; `None` if the pool cannot be rewritten (an Indices
    output, `auto_pad`, or more than 3 axes left to pool over)."""
    a = _attrs(pool)
    if len(pool.output) > 1 and pool.output[1]:
        return None
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kernel = list(a.get("kernel_shape", []))
    if len(kernel) != rank or not 2 <= rank - 2 <= _ORT_MAX_SPATIAL:
        return None
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    pads = list(a.get("pads", [0] * 2 * rank))

    def trivial(axis):
        window = (kernel[axis], strides[axis], dilations[axis])
        return window == (1, 1, 1) and not pads[axis] and not pads[rank + axis]

    if not trivial(0):
        return None
    return next((c for c in (rank - 1, 1) if trivial(c)), None)


def _leading_unsqueezes(name, nodes, producer, consumers, constants):
    """Indices of the Unsqueeze chain (last first) that makes `name` from a
    tensor with two new leading axes, each link used only by the next;
    `None` if `name` is not made so."""
    chain, axes = [], []
    while sum(map(len, axes)) < 2 and name in producer:
        k = producer[name]
        node = nodes[k]
        if node.op_type != "Unsqueeze" or len(consumers.get(name, [])) != 1:
            return None
        axes.append(_axes(node, constants))
        if axes[-1] is None:
            return None
        chain.append(k)
        name = node.input[0]
    lead = 0  # new axes in front so far, in the order the chain runs
    for new in reversed(axes):
        if any(a < 0 or a >= lead + len(new) for a in new):
            return None
        lead += len(new)
    return chain if lead == 2 else None


def channels_first_pools(proto):
    """`proto` with jax2onnx's full-rank MaxPool triples as channels-first
    MaxPools between Transposes; `(new_proto, count)`."""
    onnx = require("onnx")
    numpy_helper = require("onnx.numpy_helper")
    graph = proto.graph
    nodes = list(graph.node)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in nodes:
        if node.op_type == "Constant" and _attrs(node).get("value") is not None:
            constants[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    consumers: dict[str, list[int]] = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(k)
    outputs = {o.name for o in graph.output}
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    replace = {}  # index of the Squeeze -> new nodes
    drop = set()  # indices of the Unsqueeze and the MaxPool
    for k, pool in enumerate(nodes):
        if pool.op_type != "MaxPool" or pool.domain not in ("", "ai.onnx"):
            continue
        chain = _leading_unsqueezes(
            pool.input[0], nodes, producer, consumers, constants
        )
        users = consumers.get(pool.output[0], [])
        if chain is None or len(users) != 1 or pool.output[0] in outputs:
            continue
        i_squeeze = users[0]
        squeeze = nodes[i_squeeze]
        if squeeze.op_type != "Squeeze" or _axes(squeeze, constants) != [0, 1]:
            continue
        if any(nodes[i].output[0] in outputs for i in chain):
            continue
        a = _attrs(pool)
        rank = len(a.get("kernel_shape", []))
        c = _channel_axis(pool, rank)
        if c is None:
            continue
        spatial = [i for i in range(1, rank) if i != c]
        kernel, strides = a["kernel_shape"], a.get("strides", [1] * rank)
        dilations = a.get("dilations", [1] * rank)
        pads = a.get("pads", [0] * 2 * rank)
        x, y = nodes[chain[-1]].input[0], squeeze.output[0]
        to_cf = [0, c, *spatial]
        to_cl = [to_cf.index(i) for i in range(rank)]  # its inverse
        base = pool.name or pool.output[0]
        new_pool = onnx.helper.make_node(
            "MaxPool",
            [f"{base}__nchw_in"],
            [f"{base}__nchw_out"],
            name=f"{base}__nchw",
            kernel_shape=[kernel[i] for i in spatial],
            strides=[strides[i] for i in spatial],
            dilations=[dilations[i] for i in spatial],
            pads=[pads[i] for i in spatial] + [pads[rank + i] for i in spatial],
            ceil_mode=a.get("ceil_mode", 0),
        )
        if to_cf == list(range(rank)):  # already channels-first
            new_pool.input[0], new_pool.output[0] = x, y
            replace[i_squeeze] = [new_pool]
        else:
            replace[i_squeeze] = [
                onnx.helper.make_node(
                    "Transpose", [x], new_pool.input, f"{base}__to_nchw", perm=to_cf
                ),
                new_pool,
                onnx.helper.make_node(
                    "Transpose", new_pool.output, [y], f"{base}__back", perm=to_cl
                ),
            ]
        drop.update((*chain, k))
    if not replace:
        return proto, 0
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    rewritten = []
    for k, node in enumerate(nodes):
        if k not in drop:
            rewritten.extend(replace.get(k, [node]))
    del out.graph.node[:]
    out.graph.node.extend(rewritten)
    return out, len(replace)
