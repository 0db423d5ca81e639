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
from ._onnx_graph import Graph, attr, is_default_domain

# ONNX Runtime's MaxPool takes 1 to 3 spatial axes.
_ORT_MAX_SPATIAL = 3


def _axes(g: Graph, node):
    """The `axes` of an Unsqueeze/Squeeze (attribute, or constant input)."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1:
        value = g.const(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def _channel_axis(pool, rank: int):
    """The input axis to move next to the batch as channels: the last one (or
    else axis 1) if the window is trivial (1 wide, stride 1, unpadded) on it
    and on the batch axis; `None` if the pool cannot be rewritten (an Indices
    output, `auto_pad`, or more than 3 axes left to pool over)."""
    if len(pool.output) > 1 and pool.output[1]:
        return None
    if attr(pool, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kernel = list(attr(pool, "kernel_shape", []))
    if len(kernel) != rank or not 2 <= rank - 2 <= _ORT_MAX_SPATIAL:
        return None
    strides = list(attr(pool, "strides", [1] * rank))
    dilations = list(attr(pool, "dilations", [1] * rank))
    pads = list(attr(pool, "pads", [0] * 2 * rank))

    def trivial(axis):
        window = (kernel[axis], strides[axis], dilations[axis])
        return window == (1, 1, 1) and not pads[axis] and not pads[rank + axis]

    if not trivial(0):
        return None
    return next((c for c in (rank - 1, 1) if trivial(c)), None)


def _leading_unsqueezes(g: Graph, pool):
    """The Unsqueeze nodes (last first) that make the pool's input from a
    tensor with two new leading axes, each read only by the next; `None` if
    it is not made so."""
    chain, axes, reader, name = [], [], pool, pool.input[0]
    while sum(map(len, axes)) < 2:
        node = g.producer.get(name)
        if node is None or node.op_type != "Unsqueeze":
            return None
        if not g.sole_user(name, reader) or _axes(g, node) is None:
            return None
        chain.append(node)
        axes.append(_axes(g, node))
        reader, name = node, node.input[0]
    lead = 0  # new axes in front so far, in the order the chain runs
    for new in reversed(axes):
        if any(a < 0 or a >= lead + len(new) for a in new):
            return None
        lead += len(new)
    return chain if lead == 2 else None


def _rewrite(g: Graph, pool) -> bool:
    onnx = require("onnx")
    chain = _leading_unsqueezes(g, pool)
    users = g.consumers.get(pool.output[0], [])
    if chain is None or len(users) != 1 or not g.sole_user(pool.output[0], users[0]):
        return False
    squeeze = users[0]
    if squeeze.op_type != "Squeeze" or _axes(g, squeeze) != [0, 1]:
        return False
    rank = len(attr(pool, "kernel_shape", []))
    c = _channel_axis(pool, rank)
    if c is None:
        return False
    spatial = [i for i in range(1, rank) if i != c]
    kernel = attr(pool, "kernel_shape")
    strides = attr(pool, "strides", [1] * rank)
    dilations = attr(pool, "dilations", [1] * rank)
    pads = attr(pool, "pads", [0] * 2 * rank)
    x, y = chain[-1].input[0], squeeze.output[0]
    base = pool.name or pool.output[0]
    to_cf = [0, c, *spatial]
    channels_first = to_cf == list(range(rank))
    pool_in = x if channels_first else g.fresh(f"{base}__nchw_in")
    pool_out = y if channels_first else g.fresh(f"{base}__nchw_out")
    nodes = [
        onnx.helper.make_node(
            "MaxPool",
            [pool_in],
            [pool_out],
            name=f"{base}__nchw",
            kernel_shape=[kernel[i] for i in spatial],
            strides=[strides[i] for i in spatial],
            dilations=[dilations[i] for i in spatial],
            pads=[pads[i] for i in spatial] + [pads[rank + i] for i in spatial],
            ceil_mode=attr(pool, "ceil_mode", 0),
        )
    ]
    if not channels_first:
        to_cl = [to_cf.index(i) for i in range(rank)]  # its inverse
        nodes.insert(
            0,
            onnx.helper.make_node(
                "Transpose", [x], [pool_in], f"{base}__to_nchw", perm=to_cf
            ),
        )
        nodes.append(
            onnx.helper.make_node(
                "Transpose", [pool_out], [y], f"{base}__back", perm=to_cl
            )
        )
    for node in (squeeze, pool, *chain):
        g.remove(node)
    position = min(g.index(g.producer[x]) + 1 if x in g.producer else 0, len(g.g.node))
    for k, node in enumerate(nodes):
        g.insert(position + k, node)
    return True


def channels_first_pools(proto):
    """`proto` with jax2onnx's full-rank MaxPool triples as channels-first
    MaxPools (between Transposes for channels-last data); `(new_proto,
    count)`, `proto` itself (unchanged) when there is none."""
    onnx = require("onnx")
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    if not pools:
        return proto, 0
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = Graph(out)
    pools = [n for n in g.g.node if n.op_type == "MaxPool" and is_default_domain(n)]
    count = sum(_rewrite(g, pool) for pool in pools)
    if not count:
        return proto, 0
    g.prune()
    return out, count
