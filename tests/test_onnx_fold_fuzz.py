"""Differential testing of converters.onnx_fold.fold_onnx on random graphs.

Each example is a small ONNX graph in the idioms of several producers (tf2onnx,
torch.onnx, jax2onnx, old model-zoo files, hand edits): a Conv, ConvTranspose,
Gemm or MatMul whose weight and bias come from an initializer, an overridable
initializer, a Constant node, a transposed constant, an Identity, a graph input
or a computed value; then a chain of BatchNormalization (in its opset's form),
Mul/Add/Sub/Div by constants of every broadcast shape, in either operand
order, and layout ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze,
Identity, Cast); sometimes a weight shared with a second node, or an
intermediate tensor that is also a graph output; IR versions 3 to what ONNX
Runtime loads, opsets 7 to what it runs.

The property: `fold_onnx` never raises on a valid model and never changes it;
its result passes `onnx.checker` and matches the original in ONNX Runtime
(1e-5 relative) on random inputs and on random values for every overridable
initializer; every BatchNormalization and every per-channel Mul/Div that is
still in the graph is in the report with a reason.

`make test` runs a seeded, bounded number of examples;
`make fuzz` runs more (FUZZ_EXAMPLES=N, default 3000, random seed;
KERAS_BN_FUZZ_DUMP=folder saves the shrunk failing model there).
"""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="pip install onnx")
ort = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters.onnx_fold import fold_onnx  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
    reason="backend-independent (ONNX only): runs once, under the TensorFlow backend",
)

RTOL = 1e-5
EXAMPLES = int(os.environ.get("KERAS_BN_FUZZ_EXAMPLES", "250"))


def _loads(opset, ir):
    """Whether ONNX Runtime loads a model with this opset and IR version."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2])
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["t", "t"], ["y"]),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    m.ir_version = ir
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - not supported by this ONNX Runtime
        return False
    return True


def _versions():
    opsets = [o for o in range(7, onnx.defs.onnx_opset_version() + 1) if _loads(o, 7)]
    # ONNX Runtime warns on, but loads, opsets newer than it knows: keep the
    # released ones it implements (those listed by its schema registry).
    known = max(
        (s.since_version for s in onnx.defs.get_all_schemas_with_history()),
        default=opsets[-1],
    )
    max_opset = min(max(opsets), known)
    irs = [i for i in range(3, onnx.IR_VERSION + 1) if _loads(7, i)]
    return max_opset, max(irs)


MAX_OPSET, MAX_IR = _versions()


class _Builder:
    """Builds one random graph from hypothesis draws."""

    def __init__(self, draw, opset, ir, rng):
        self.draw, self.opset, self.ir, self.rng = draw, opset, ir, rng
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.feeds, self.overridable = {}, {}
        self.k = 0
        self.first_affine = True

    def name(self, base):
        self.k += 1
        return f"{base}{self.k}"

    def const(self, value, kinds=("init", "init", "init", "overridable", "node")):
        """A float32 (or int64) constant from a drawn source; returns its name."""
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        kind = self.draw(st.sampled_from(kinds))
        name = self.name("c")
        tensor = numpy_helper.from_array(value, name)
        if kind == "node" or (
            kind == "init" and self.ir < 4 and value.dtype.kind != "f"
        ):
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            return name
        self.inits.append(tensor)
        if kind == "overridable" or self.ir < 4:
            self.inputs.append(
                helper.make_tensor_value_info(name, tensor.data_type, list(value.shape))
            )
            if self.ir >= 4 and value.dtype.kind == "f":
                self.overridable[name] = value
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def axes_node(self, op, x, axes):
        if self.opset >= 13:
            return self.node(
                op, [x, self.const(np.array(axes, np.int64), ("node", "init"))]
            )
        return self.node(op, [x], axes=axes)

    def graph_input(self, shape):
        name = self.name("in")
        self.inputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        )
        self.feeds[name] = self.rng.normal(size=shape).astype(np.float32)
        return name

    # ------------------------------------------------------------ pieces
    def weight(self, w):
        kind = self.draw(
            st.sampled_from(
                ["init", "init", "init", "overridable", "node", "transposed"]
            )
        )
        if kind == "transposed":  # jax2onnx: Transpose of a constant kernel
            perm = list(range(w.ndim))[::-1]
            src = self.const(np.transpose(w, perm), ("init", "node"))
            return self.node("Transpose", [src], perm=perm)
        return self.const(w, (kind,))

    def bias(self, b):
        kind = self.draw(
            st.sampled_from(
                ["init", "init", "overridable", "identity", "input", "computed"]
            )
        )
        if kind == "input":
            name = self.graph_input(list(b.shape))
            return name
        if kind == "identity":
            return self.node("Identity", [self.const(b, ("init", "node"))])
        if kind == "computed":
            return self.node("Relu", [self.const(b, ("init", "node"))])
        return self.const(b, (kind,))

    def linear(self):
        """A linear node; returns (output, shape, channel axis)."""
        op = self.draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]))
        rng = self.rng
        if op in ("Conv", "ConvTranspose"):
            spatial = self.draw(st.sampled_from([(5,), (3, 4)]))
            group = self.draw(st.sampled_from([1, 2]))
            c_in, c_out = 2 * group, group * self.draw(st.sampled_from([1, 2, 3]))
            k = self.draw(st.sampled_from([1, 3]))
            x = self.graph_input([2, c_in, *spatial])
            if op == "Conv":
                w = rng.normal(size=(c_out, c_in // group, *(k,) * len(spatial)))
            else:
                w = rng.normal(size=(c_in, c_out // group, *(k,) * len(spatial)))
            ins = [x, self.weight(w)]
            if self.draw(st.booleans()):
                ins.append(self.bias(rng.normal(size=c_out)))
            pads = [k // 2] * (2 * len(spatial))
            out = self.node(op, ins, group=group, pads=pads)
            self.share([2, c_out, *spatial], op, ins, group=group, pads=pads)
            return out, [2, c_out, *spatial], 1
        if op == "Gemm":
            m, kk, n = self.draw(st.sampled_from([(3, 4, 5), (4, 3, 4), (5, 2, 5)]))
            trans_b = self.draw(st.sampled_from([0, 1]))
            x = self.graph_input([m, kk])
            w = rng.normal(size=(n, kk) if trans_b else (kk, n))
            ins = [x, self.weight(w)]
            c_shape = self.draw(
                st.sampled_from([None, (), (1,), (n,), (1, n), (m, 1), (1, 1), (m, n)])
            )
            if c_shape is not None or self.opset < 11:
                ins.append(self.bias(rng.normal(size=c_shape or (n,))))
            attrs = dict(
                transB=trans_b,
                alpha=self.draw(st.sampled_from([1.0, 0.5])),
                beta=self.draw(st.sampled_from([1.0, 2.0])),
            )
            out = self.node("Gemm", ins, **attrs)
            self.share([m, n], "Gemm", ins, **attrs)
            return out, [m, n], 1
        x_shape = self.draw(st.sampled_from([[3, 4], [2, 3, 4]]))
        n = self.draw(st.sampled_from([3, 5]))
        x = self.graph_input(x_shape)
        ins = [x, self.weight(rng.normal(size=(4, n)))]
        out = self.node("MatMul", ins)
        shape = [*x_shape[:-1], n]
        self.share(shape, "MatMul", ins)
        if self.draw(st.booleans()):  # its bias, in either operand order
            b = self.bias(rng.normal(size=n))
            out = self.node("Add", [b, out] if self.draw(st.booleans()) else [out, b])
        return out, shape, len(shape) - 1

    def share(self, shape, op, ins, **attrs):
        """Sometimes a second node reads the same weight (and bias)."""
        if self.draw(st.integers(0, 5)) == 0:
            self.outputs.append((self.node(op, list(ins), **attrs), shape))

    def layout(self, x, shape, axis):
        """A layout op; returns (output, shape, channel axis or None)."""
        r = len(shape)
        choice = self.draw(
            st.sampled_from(
                ["transpose", "reshape", "flatten", "unsqueeze", "squeeze", "identity"]
            )
        )
        if choice == "transpose":
            perm = self.draw(st.permutations(list(range(r))))
            new_axis = None if axis is None else list(perm).index(axis)
            return (
                self.node("Transpose", [x], perm=perm),
                [shape[p] for p in perm],
                new_axis,
            )
        if choice == "unsqueeze":
            at = self.draw(st.integers(0, r))
            new = shape[:at] + [1] + shape[at:]
            new_axis = None if axis is None else axis + (at <= axis)
            neg = self.opset >= 11 and self.draw(st.booleans())
            return (
                self.axes_node("Unsqueeze", x, [at - (r + 1) if neg else at]),
                new,
                new_axis,
            )
        if choice == "squeeze" and 1 in shape and r > 1:
            at = self.draw(st.sampled_from([k for k, d in enumerate(shape) if d == 1]))
            if at == axis:
                return x, shape, axis
            new_axis = None if axis is None else axis - (at < axis)
            return (
                self.axes_node("Squeeze", x, [at]),
                shape[:at] + shape[at + 1 :],
                new_axis,
            )
        if choice == "flatten" and r >= 2:
            at = self.draw(st.integers(1, r - 1))
            new = [int(np.prod(shape[:at])), int(np.prod(shape[at:]))]
            return self.node("Flatten", [x], axis=at), new, None
        if choice == "reshape" and r >= 2:
            mode = self.draw(st.sampled_from(["merge_last", "split_first", "flat"]))
            if mode == "merge_last" and r >= 3:
                new = shape[:-2] + [shape[-2] * shape[-1]]
            elif mode == "split_first":
                new = [1] + shape
            else:
                new = [shape[0], int(np.prod(shape[1:]))]
            target = np.array(new, np.int64)
            if self.draw(st.booleans()):  # 0 copies a dimension, -1 infers one
                target[0] = 0 if mode != "split_first" else 1
                target[-1] = -1
            src = self.const(target, ("node", "init"))
            return self.node("Reshape", [x, src]), new, None
        if self.draw(st.booleans()):
            return self.node("Cast", [x], to=TensorProto.FLOAT), shape, axis
        return self.node("Identity", [x]), shape, axis

    def affine_const(self, shape, axis):
        r = len(shape)
        kinds = ["scalar", "last", "full", "other_axis"]
        if axis is not None:
            kinds += ["channel"] * 8 + ["channel_repeated"] * 2
        kind = self.draw(st.sampled_from(kinds))
        c_shape = [1] * r
        if kind == "scalar":
            c_shape = []
        elif kind == "last":
            c_shape = [shape[-1]]
        elif kind == "full":
            c_shape = list(shape)
        elif kind == "other_axis":
            c_shape[self.draw(st.integers(0, r - 1))] = shape[
                self.draw(st.integers(0, r - 1))
            ]
            c_shape = [
                d if d == 1 or d == shape[k] else 1 for k, d in enumerate(c_shape)
            ]
        else:
            c_shape[axis] = shape[axis]
            if kind == "channel_repeated" and r > 1:
                other = self.draw(st.sampled_from([k for k in range(r) if k != axis]))
                c_shape[other] = shape[other]
        trim = self.draw(st.integers(0, len(c_shape)))
        while trim and c_shape and c_shape[0] == 1:  # right-aligned broadcast
            c_shape, trim = c_shape[1:], trim - 1
        value = self.rng.uniform(0.5, 2.0, size=c_shape) * self.rng.choice(
            [-1.0, 1.0], size=c_shape
        )
        if kind == "channel_repeated" and len(c_shape) > 1:
            keep = [slice(None)] * len(c_shape)
            pos = len(c_shape) - r + other
            if pos >= 0:
                keep[pos] = slice(0, 1)
                value = np.broadcast_to(value[tuple(keep)], c_shape).copy()
        return value

    def affine(self, x, shape, axis):
        op = self.draw(st.sampled_from(["Mul", "Add", "Sub", "Div", "BN"]))
        first, self.first_affine = self.first_affine, False
        if op == "BN":
            return self.bn(x, shape, training_allowed=first)
        c = self.const(self.affine_const(shape, axis))
        first = self.draw(st.booleans()) and op != "Div"
        return self.node(op, [c, x] if first else [x, c])

    def bn(self, x, shape, training_allowed):
        if len(shape) < 2:
            return self.node("Relu", [x])
        rng, attrs = (
            self.rng,
            {"epsilon": float(self.draw(st.sampled_from([1e-5, 1e-3])))},
        )
        stats = (shape[1],)
        outputs = [self.name("bn")]
        if self.opset <= 8 and self.draw(st.booleans()):
            attrs["spatial"] = self.draw(st.sampled_from([0, 1]))
            if attrs["spatial"] == 0:
                stats = tuple(shape[1:])
        if self.opset >= 14 and self.draw(st.booleans()):
            attrs["training_mode"] = 0  # explicit inference mode
        # The training form (left unchanged) normalizes with the batch's
        # statistics, which magnifies any rounding before it: only as the
        # first step, whose input no rewrite changes.
        train = training_allowed and self.draw(st.integers(0, 5)) == 0
        if train:
            if self.opset >= 14:
                attrs["training_mode"] = 1  # (ONNX Runtime crashes on "" here)
                outputs += [self.name("bn_mean"), self.name("bn_var")]
            else:
                outputs += [self.name("bn_mean"), self.name("bn_var"), "", ""]
        params = [
            self.const(rng.normal(size=stats)),
            self.const(rng.normal(size=stats)),
            self.const(rng.normal(size=stats)),
            self.const(rng.uniform(0.3, 3.0, size=stats)),
        ]
        self.nodes.append(
            helper.make_node(
                "BatchNormalization", [x, *params], outputs, name=outputs[0], **attrs
            )
        )
        return outputs[0]

    def build(self):
        x, shape, axis = self.linear()
        if self.draw(st.integers(0, 5)) == 0:
            self.outputs.append((x, shape))  # an intermediate is also an output
        steps = self.draw(st.integers(1, 5))
        for k in range(steps):
            if k < steps - 1 and self.draw(st.integers(0, 2)) == 0:
                x, shape, axis = self.layout(x, shape, axis)
            else:
                x = self.affine(x, shape, axis)
        self.outputs.append((x, shape))
        outs = [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, s)
            for o, s in dict(self.outputs).items()
        ]
        graph = helper.make_graph(self.nodes, "fuzz", self.inputs, outs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)]
        )
        model.ir_version = self.ir
        return model


@st.composite
def _graphs(draw):
    opset = draw(st.integers(7, MAX_OPSET))
    low = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    ir = draw(st.integers(max(3, low), MAX_IR))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = _Builder(draw, opset, ir, rng)
    return b.build(), b


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about overridable initializers
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _compare(original, folded, feeds):
    ref, got = _session(original).run(None, feeds), _session(folded).run(None, feeds)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        scale = max(float(np.abs(b).max()), np.finfo(np.float32).tiny)
        assert float(np.abs(a - b).max()) / scale <= RTOL


def _vector_nodes(model):
    """Mul/Div nodes of `model` by a constant with one non-1 axis of size > 1."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    inputs = {i.name for i in model.graph.input}
    out = set()
    for n in model.graph.node:
        if n.op_type in ("Mul", "Div"):
            for i in n.input:
                c = consts.get(i)
                if i not in inputs and c is not None and c.size > 1:
                    if sum(d != 1 for d in c.shape) == 1:
                        out.add(f"{n.op_type} {n.name}")
    return out


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="KERAS_BN_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_graphs())
def test_fold_onnx_differential(case):
    try:
        _check(*case)
    except Exception as e:
        dump = os.environ.get("KERAS_BN_FUZZ_DUMP")
        if dump and not isinstance(
            e, hypothesis.errors.UnsatisfiedAssumption
        ):  # the last failing example is the shrunk one
            os.makedirs(dump, exist_ok=True)
            onnx.save(case[0], os.path.join(dump, "failing.onnx"))
        raise


def _check(model, b):
    onnx.checker.check_model(model)
    try:
        _session(model)
    except Exception as e:  # noqa: BLE001 - only a training-form BN may not run
        hypothesis.assume("training" not in str(e).lower())
        raise
    before = model.SerializeToString()
    folded, report = fold_onnx(model)
    assert model.SerializeToString() == before  # the input is not changed
    onnx.checker.check_model(folded)
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    records = report.by_name()
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            assert n.name in records, report
    left = {f"{n.op_type} {n.name}" for n in folded.graph.node}
    for name in _vector_nodes(model) & left:
        assert name in records, (name, str(report))
    for r in report.records:
        assert r.folded or r.reason, r
        hypothesis.event(f"record: {r.action}")
    hypothesis.event(f"folded something: {report.num_folded > 0}")
    hypothesis.event(f"IR < 4: {model.ir_version < 4}")
    _compare(model, folded, b.feeds)
    if b.overridable:
        rng = np.random.default_rng(1)
        feeds = dict(b.feeds)
        for name, value in b.overridable.items():
            feeds[name] = rng.uniform(0.5, 2.0, size=value.shape).astype(np.float32)
        _compare(model, folded, feeds)
