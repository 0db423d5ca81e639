"""Property-based differential test of `fold_batchnorm` (the Keras-side fold).

`hypothesis` builds random Sequential and Functional stacks of Dense,
Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D and
Conv1D/2D/3DTranspose layers, batch normalizations (before and after them,
on the channel axis or another one) and activations, with random settings
(padding, strides, dilation, groups, bias, fused activation, data format,
BN center/scale/epsilon) and random BN statistics and weights. Each model is
folded and compared with the original in inference.

Properties:
- every batch normalization is in the report, folded or with a reason, and
  none is left in the folded model;
- one that directly follows a linear layer without a fused activation, on
  its channel axis, and is that layer's only consumer is folded into it;
- the input model is unchanged;
- the folded model computes the same function: relative error
  `max|folded - original| / max|original| <= 1e-5`. Both are float32
  computations of the same map; each is within a few float32 ulps
  (6e-8 each) per layer of the exact result, times the accumulation length
  (at most a few hundred terms here) and the gain of the BN scale (statistics
  are drawn so that `gamma / sqrt(variance + epsilon)` stays below ~30), so
  their difference stays well under 1e-5 of the output's scale; a folding bug
  (a wrong axis, layout or bias) gives errors of order 1.

`KERAS_BN_FUZZ_EXAMPLES` sets the number of examples (default 20, well under
a minute per backend; the suite's budget is under a minute per backend).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
st = hypothesis.strategies

from converters import ChannelAffine, fold_batchnorm  # noqa: E402
from converters.report import FOLDED_PRECEDING  # noqa: E402
from keras_bn._keras_graph import sublayers  # noqa: E402

L = keras.layers
RTOL = 1e-5  # see the module docstring
EXAMPLES = int(os.environ.get("KERAS_BN_FUZZ_EXAMPLES", "20"))
# TensorFlow's CPU kernels take channels-last only (NCHW Conv2D and NDHWC-only
# transposed Conv3D); channels-first is generated on the other backends.
FORMATS = (
    ["channels_last"]
    if keras.backend.backend() == "tensorflow"
    else ["channels_last", "channels_first"]
)


def _out_size(size, kernel, stride, dilation, padding, transpose):
    span = dilation * (kernel - 1) + 1
    if transpose:
        return size * stride if padding == "same" else (size - 1) * stride + span
    if padding == "same":
        return -(-size // stride)
    return (size - span) // stride + 1 if size >= span else 0


@st.composite
def _linear(draw, rank, channels, size, fmt):
    """(layer spec, output channels, output size) of a random linear layer.

    A spec is `(class name, keyword arguments)`: the layers are made in the
    test, not in the strategy.
    """
    if rank == 0:
        units = draw(st.integers(1, 6))
        act = draw(st.sampled_from([None, None, "relu"]))
        bias = draw(st.booleans())
        return ("Dense", dict(units=units, use_bias=bias, activation=act)), units, size
    kinds = ["conv", "transpose"] + (["depthwise", "separable"] if rank < 3 else [])
    kind = draw(st.sampled_from(kinds))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 1, 2]))
    dilation = 1 if stride > 1 or kind == "transpose" else draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["valid", "same"]))
    out = _out_size(size, kernel, stride, dilation, padding, kind == "transpose")
    if not 1 <= out <= 12:
        kernel, stride, dilation, padding, out = 1, 1, 1, "valid", size
    common = dict(
        kernel_size=kernel,
        strides=stride,
        dilation_rate=dilation,
        padding=padding,
        data_format=fmt,
        use_bias=draw(st.booleans()),
        activation=draw(st.sampled_from([None, None, "relu"])),
    )
    if kind == "depthwise":
        mult = draw(st.integers(1, 2))
        spec = (f"DepthwiseConv{rank}D", dict(depth_multiplier=mult, **common))
        return spec, channels * mult, out
    filters = draw(st.integers(1, 6))
    if kind == "separable":
        mult = draw(st.integers(1, 2))
        spec = dict(filters=filters, depth_multiplier=mult, **common)
        return (f"SeparableConv{rank}D", spec), filters, out
    if kind == "transpose":
        return (f"Conv{rank}DTranspose", dict(filters=filters, **common)), filters, out
    groups = draw(st.sampled_from([1, channels]))
    if groups > 1:
        filters = groups * draw(st.integers(1, 2))
    spec = dict(filters=filters, groups=groups, **common)
    return (f"Conv{rank}D", spec), filters, out


@st.composite
def _bn(draw, axis):
    return (
        "BatchNormalization",
        dict(
            axis=axis,
            center=draw(st.booleans()),
            scale=draw(st.booleans()),
            epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        ),
    )


@st.composite
def stacks(draw):
    """(layer specs, input shape without batch, functional?, indices of the
    BNs that must fold into the preceding layer)."""
    rank = draw(st.integers(0, 3))  # spatial dimensions; 0: Dense
    fmt = draw(st.sampled_from(FORMATS)) if rank else "channels_last"
    channels = draw(st.integers(1, 4))
    size = draw(st.integers(3, {0: 4, 1: 9, 2: 7, 3: 5}[rank]))
    # Dense on (features,) or on (time, features): axis 1 is then not channels.
    spatial = rank if rank else draw(st.integers(0, 1))
    layers, must_fold = [], []

    def shape(c, s):
        dims = [s] * spatial
        return tuple([c, *dims] if fmt == "channels_first" else [*dims, c])

    input_shape = shape(channels, size)
    full_rank = spatial + 2
    channel_axis = 1 if fmt == "channels_first" else full_rank - 1
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            layers.append(("ReLU", {}))
        if draw(st.integers(0, 2)) == 0:  # BN before the linear layer
            layers.append(draw(_bn(channel_axis)))
        linear, channels, size = draw(_linear(rank, channels, size, fmt))
        layers.append(linear)
        if draw(st.integers(0, 3)) > 0:  # BN after it
            other = [a for a in range(1, full_rank) if a != channel_axis]
            on_channels = not other or draw(st.integers(0, 4)) > 0
            axis = channel_axis if on_channels else draw(st.sampled_from(other))
            if draw(st.booleans()):
                axis -= full_rank  # negative axes too
            bn = draw(_bn(axis))
            layers.append(bn)
            if on_channels and linear[1]["activation"] is None:
                must_fold.append(len(layers) - 1)
    functional = draw(st.booleans())
    return layers, input_shape, functional, must_fold


def _build(specs, input_shape, functional):
    layers = [getattr(L, name)(**kwargs) for name, kwargs in specs]
    if not functional:
        return keras.Sequential([keras.Input(input_shape), *layers]), layers
    inp = keras.Input(input_shape)
    x = inp
    for layer in layers:
        x = layer(x)
    # The last output also feeds a second output.
    return keras.Model(inp, [x, L.Activation("tanh")(x)]), layers


def _randomize(model, rng):
    for layer in sublayers(model):
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 1.0, c))
            # scale = gamma / sqrt(var + eps) stays below ~30 (docstring).
            layer.moving_variance.assign(np.exp(rng.uniform(np.log(2e-3), 2.5, c)))
            if layer.scale:
                layer.gamma.assign(rng.uniform(-1.5, 1.5, c))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 1.0, c))
        else:
            for v in layer.weights:
                v.assign(rng.normal(0.0, 0.5, v.shape))


def _rel_err(a, b):
    a = np.asarray(keras.ops.convert_to_numpy(a), "float64")
    b = np.asarray(keras.ops.convert_to_numpy(b), "float64")
    scale = np.abs(b).max()
    return np.abs(a - b).max() / scale if scale else np.abs(a).max()


@hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run
    suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(spec=stacks(), seed=st.integers(0, 2**31 - 1))
def test_fold_matches_original(spec, seed):
    specs, input_shape, functional, must_fold = spec
    model, layers = _build(specs, input_shape, functional)
    rng = np.random.default_rng(seed)
    _randomize(model, rng)
    bns = [la for la in sublayers(model) if isinstance(la, L.BatchNormalization)]
    before = [np.array(w) for w in model.get_weights()]
    x = rng.normal(0.0, 1.0, (3, *input_shape)).astype("float32")
    ref = keras.tree.flatten(model(x, training=False))

    folded, report = fold_batchnorm(model)

    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the input model is unchanged
    assert len(report.records) == len(bns), report
    assert all(r.folded or r.reason for r in report.records), report
    left = [la for la in sublayers(folded) if isinstance(la, L.BatchNormalization)]
    assert not left, report
    affines = [la for la in sublayers(folded) if isinstance(la, ChannelAffine)]
    assert len(affines) == report.num_kept, report
    actions = {r.name: r.action for r in report.records}
    for i in must_fold:
        assert actions[layers[i].name] == FOLDED_PRECEDING, report
    got = keras.tree.flatten(folded(x, training=False))
    for r, g in zip(ref, got, strict=True):
        r, g = keras.ops.convert_to_numpy(r), keras.ops.convert_to_numpy(g)
        assert r.shape == g.shape
        assert _rel_err(g, r) <= RTOL, (_rel_err(g, r), report)
