"""Tests for `keras_bn.backend` (one module per Keras backend, chosen once)."""

from __future__ import annotations

import importlib.util
import pathlib

import keras
import numpy as np
import pytest

from keras_bn import backend

TF = keras.backend.backend() == "tensorflow"
JAX = keras.backend.backend() == "jax"
TORCH = keras.backend.backend() == "torch"


def test_module_of_the_running_backend():
    assert backend.NAME == keras.backend.backend() in backend.SUPPORTED
    module = importlib.import_module(f"keras_bn.backend.{backend.NAME}")
    for name in backend.API:
        assert getattr(backend, name) is getattr(module, name), name


@pytest.mark.parametrize("other", ["numpy", "openvino"])
def test_unsupported_backend_raises_on_use(monkeypatch, other):
    """No silent TensorFlow default: every entry point names the backend."""
    monkeypatch.setattr(keras.backend, "backend", lambda: other)
    path = pathlib.Path(backend.__file__)
    spec = importlib.util.spec_from_file_location(f"_kbn_backend_{other}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NAME == other
    for name in module.API:
        with pytest.raises(
            NotImplementedError,
            match=rf"keras_bn supports the Keras backends "
            rf"\['tensorflow', 'jax', 'torch'\]; "
            rf"Keras runs on '{other}'\. Set .*KERAS_BACKEND",
        ):
            getattr(module, name)(None)


def test_is_traced():
    x = np.ones((2, 3), "float32")
    if TF:
        import tensorflow as tf

        assert backend.is_traced(tf.constant(x)) is False
        assert bool(tf.function(lambda t: backend.is_traced(t))(x)) is True
    elif TORCH:
        import torch

        def probe(t):
            return t.sum() * 0 + float(backend.is_traced(t))

        t = torch.from_numpy(x)
        assert backend.is_traced(t) is False
        assert float(torch.compile(probe, backend="eager", fullgraph=True)(t)) == 1.0
    else:
        import jax

        assert backend.is_traced(jax.numpy.asarray(x)) is False
        assert bool(jax.jit(lambda t: backend.is_traced(t))(x)) is True


def test_in_xla_context_tensorflow():
    if not TF:
        pytest.skip("TensorFlow's XLA detection")
    import tensorflow as tf

    from keras_bn.backend import tensorflow as tfb

    def probe():
        return tf.constant(tfb.in_xla_context())

    xla = tf.function(probe, jit_compile=True)
    assert tfb.in_xla_context() is False
    assert not bool(tf.function(probe)())
    assert bool(xla())
    assert bool(tf.function(lambda: xla())())  # nested in a plain tf.function
    assert bool(tf.function(lambda: tf.function(probe)(), jit_compile=True)())


@pytest.mark.parametrize(
    "shape,axis,expected",
    [
        ((8, 5), 1, ((-1, 1, 1, 5), "NHWC")),
        ((8, 4, 5), 2, ((-1, 1, 1, 5), "NHWC")),
        ((8, 5, 4), 1, ((-1, 5, 4, 1), "NCHW")),
        ((None, 4, 4, 5), 3, (None, "NHWC")),
        ((None, 5, 4, 4), 1, (None, "NCHW")),
        ((8, 5, 4, 3, 2), 1, ((-1, 5, 24, 1), "NCHW")),
        ((8, 4, 5, 3, 2), 2, ((-1, 5, 6, 1), "NCHW")),
        ((5, 8), 0, ((1, 5, 8, 1), "NCHW")),
        ((8, None, 5), 2, None),
        ((8,), 0, None),
    ],
)
def test_fused_view(shape, axis, expected):
    if not TF:
        pytest.skip("TensorFlow's fused op")
    from keras_bn.backend import tensorflow as tfb

    assert tfb.fused_view(shape, axis) == expected


def test_fused_op_not_used_where_it_does_not_apply(rng, monkeypatch):
    """XLA, float64, an epsilon cuDNN would clamp: None (use the kernel)."""
    if not TF:
        pytest.skip("TensorFlow's fused op")
    import tensorflow as tf

    from keras_bn.backend import tensorflow as tfb

    monkeypatch.setattr(tfb, "FUSED_MIN_SIZE", 0)  # the op even for (6, 3)

    x = tf.constant(rng.normal(size=(6, 3)).astype("float32"))
    one, zero = tf.ones(3), tf.zeros(3)

    def fused(x, epsilon=1e-3):
        out = tfb.fused_train(x, one, zero, axis=1, epsilon=epsilon)
        return tf.constant(out is not None)

    assert bool(fused(x))
    assert bool(tf.function(fused)(x))
    assert not bool(tf.function(fused, jit_compile=True)(x))
    assert not bool(fused(x, epsilon=1e-6))
    assert not bool(fused(tf.cast(x, "float64")))


def test_jax_custom_vjp_is_defined_once():
    if not JAX:
        pytest.skip("JAX's custom_vjp")
    import jax

    from keras_bn.backend import jax as jb

    assert isinstance(jb._train, jax.custom_vjp)
    assert backend.fused_train(None, None, None, axis=0, epsilon=1e-3) is None


def test_cross_replica_sum_without_strategy_is_none():
    assert backend.cross_replica_sum() is None


REDUCE_CASES = [
    ((6, 5), [0]),
    ((4, 3, 7), [0, 2]),
    ((4, 3, 7), [2]),
    ((3, 4, 5), [0, 1]),
]


def _compilers():
    """The ways the kernel's sums run: eager, traced, and compiled by XLA."""
    if TF:
        import tensorflow as tf

        return {
            "eager": lambda f: f,
            "traced": tf.function,
            "compiled": lambda f: tf.function(f, jit_compile=True),
        }
    if TORCH:
        import torch

        def compiled(f):
            # Inductor's generated code: its sum is the one to check.
            compiled_f = torch.compile(f, fullgraph=True)
            return lambda x: compiled_f(torch.from_numpy(x))

        return {
            "eager": lambda f: lambda x: f(torch.from_numpy(x)),
            "compiled": compiled,
        }
    import jax

    return {"eager": lambda f: f, "compiled": jax.jit}


@pytest.mark.parametrize("how", ["eager", "traced", "compiled"])
@pytest.mark.parametrize("shape,axes", REDUCE_CASES)
def test_reduce_sum_matches_float64(rng, shape, axes, how):
    """The same value, keepdims, however the backend computes it (rel 1e-6)."""
    compile_ = _compilers().get(how)
    if compile_ is None:
        pytest.skip("JAX and torch trace only to compile")
    x = rng.normal(1.0, 2.0, size=shape).astype("float32")
    want = np.sum(np.square(x.astype("float64")), axis=tuple(axes), keepdims=True)
    got = np.asarray(compile_(lambda v: backend.reduce_sum(v * v, axes))(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_reduce_sum_gradient_is_ones(rng):
    """Differentiable like a sum (the TensorFlow form's barriers are identity)."""
    x = rng.normal(size=(4, 3, 7)).astype("float32")
    if TF:
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def grad(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                s = tf.reduce_sum(backend.reduce_sum(v, [0, 2]))
            return tape.gradient(s, v)

    elif TORCH:
        import torch

        def grad(v):
            v = torch.from_numpy(v).requires_grad_()
            backend.reduce_sum(v, [0, 2]).sum().backward()
            return v.grad

    else:
        import jax

        grad = jax.jit(jax.grad(lambda v: backend.reduce_sum(v, [0, 2]).sum()))
    np.testing.assert_array_equal(np.asarray(grad(x)), np.ones_like(x))


@pytest.mark.parametrize(
    "axes,barriers", [([0, 2], 2), ([2], 1), ([0], 0), ([0, 1], 0)]
)
def test_reduce_sum_bars_row_sums_under_tensorflow_xla(axes, barriers):
    """Under XLA on a CPU a sum over the last axis is barred (rows, then the
    rest); column sums and graphs XLA does not compile are left as they are."""
    if not TF:
        pytest.skip("TensorFlow's XLA on a CPU")
    import tensorflow as tf

    x = tf.ones((4, 3, 7))

    def f(v):
        return backend.reduce_sum(v * v, axes)

    hlo = tf.function(f, jit_compile=True).experimental_get_compiler_ir(x)()
    assert hlo.count("opt-barrier(") == barriers
    graph = tf.function(f).get_concrete_function(x).graph
    assert "XlaOptimizationBarrier" not in {op.type for op in graph.get_operations()}


def test_reduce_sum_of_long_rows_keeps_precision(rng):
    """1.6 million values per channel summed over the last axis under XLA:
    within 1e-6 of float64 (one running sum over all of them lost 2.7e-5)."""
    x = rng.normal(0.5, 1.0, size=(16, 2, 100352)).astype("float32")
    want = np.sum(np.square(x.astype("float64")), axis=(0, 2), keepdims=True)
    compile_ = _compilers()["compiled"]
    got = np.asarray(compile_(lambda v: backend.reduce_sum(v * v, [0, 2]))(x))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_reduce_sum_does_not_bar_unknown_dimensions():
    """XLA cannot pass a dynamic dimension through a barrier (`fit` under
    `jit_compile=True` on a dataset of unknown batch size): no barrier."""
    if not TF:
        pytest.skip("TensorFlow's XLA on a CPU")
    import tensorflow as tf

    spec = tf.TensorSpec((None, 3, 7), tf.float32)
    f = tf.function(
        lambda v: backend.reduce_sum(v * v, [0, 2]),
        jit_compile=True,
        input_signature=[spec],
    )
    assert "opt-barrier(" not in f.experimental_get_compiler_ir(tf.ones((4, 3, 7)))()


# -- torch ------------------------------------------------------------------------


def _torch_step(x, axis, mask=None):
    """`batch_norm_train` and a loss of its outputs (y, mean and variance)."""
    import torch

    from keras_bn import _train

    c = x.shape[axis]
    scale = torch.linspace(0.5, 2.0, c, requires_grad=True)
    offset = torch.linspace(-1.0, 1.0, c, requires_grad=True)

    def step(x, scale, offset, mask):
        y, mean, var = _train.batch_norm_train(
            x, scale, offset, mask, axis=axis % x.dim(), epsilon=1e-3
        )
        return (y.float() ** 2).sum() + mean.sum() + var.sum()

    return step, (x, scale, offset, mask)


@pytest.mark.parametrize(
    "shape,axis,masked",
    [
        ((16, 5), -1, False),
        ((4, 3, 3, 5), -1, False),
        ((4, 5, 3, 3), 1, False),
        ((4, 6, 5), -1, True),
    ],
)
def test_torch_compile_has_no_graph_break(rng, shape, axis, masked):
    """Dynamo traces the kernel (forward as one custom op, its backward, the
    statistics) in one graph: `torch._dynamo.explain` finds no break."""
    if not TORCH:
        pytest.skip("torch.compile (Dynamo)")
    import torch

    x = torch.from_numpy(rng.normal(size=shape).astype("float32"))
    mask = None
    if masked:
        mask = torch.from_numpy((rng.uniform(size=shape[:-1]) > 0.3)[..., None])
        mask = mask.float()
    step, args = _torch_step(x.requires_grad_(), axis, mask)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # The custom op is what keeps the forward's run-time branch opaque.
    ops_in_graph = {
        str(node.target)
        for graph in explanation.graphs
        for module in graph.modules()  # the autograd Function's subgraphs too
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
    }
    assert "keras_bn.kernel_forward" in ops_in_graph, ops_in_graph


def test_torch_compiled_step_matches_eager(rng):
    """The layer's training step under `torch.compile` with Inductor (as
    `jit_compile=True` runs it), output and gradients equal to eager."""
    if not TORCH:
        pytest.skip("torch.compile (Inductor)")
    import torch

    x = torch.from_numpy(rng.normal(3.0, 2.0, (8, 4, 4, 5)).astype("float32"))
    step, args = _torch_step(x.requires_grad_(), -1)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        loss = fn(*args)
        grads = torch.autograd.grad(loss, args[:3])
        results.append([loss.detach(), *grads])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,axis,expected",
    [
        ((8, 5), 1, None),
        ((8, 4, 5), 2, None),
        ((8, 5, 4), 1, (8, 5, 4)),
        ((8, 5, 4, 3), 1, (8, 5, 12)),
        ((8, 4, 5, 3, 2), 2, (32, 5, 6)),
        ((5, 8, 2), 0, (1, 5, 16)),
        ((8, 5, 1), 1, None),
    ],
)
def test_torch_native_view(shape, axis, expected):
    if not TORCH:
        pytest.skip("torch's native batch norm")
    from keras_bn.backend import torch as tb

    assert tb.native_view(shape, axis) == expected


def test_torch_native_op_not_used_where_it_does_not_apply(rng):
    """Channels-last, float64, under torch.compile: None (use the kernel)."""
    if not TORCH:
        pytest.skip("torch's native batch norm")
    import torch

    def native(x, axis):
        out = backend.fused_train(
            x, torch.ones(3), torch.zeros(3), axis=axis, epsilon=1e-3
        )
        return out is not None

    x = torch.from_numpy(rng.normal(size=(6, 3, 4)).astype("float32"))
    assert native(x, 1)
    assert not native(x.transpose(1, 2).contiguous(), 2)
    assert not native(x.double(), 1)
    assert not native(x[:1, :, :1], 1)  # a single value per channel
    flags = []

    def probe(t):
        flags.append(native(t, 1))
        return t * 2

    torch.compile(probe, backend="eager", fullgraph=True)(x)
    assert flags == [False]


def test_torch_kernel_is_an_autograd_function():
    if not TORCH:
        pytest.skip("torch.autograd")
    from keras_bn.backend import torch as tb

    assert issubclass(tb.KernelTrain, __import__("torch").autograd.Function)


@pytest.mark.parametrize(
    "shape,axis,loc,std,route",
    [
        ((6, 4, 5), -1, 0.0, 1.0, "few-pass"),  # channels-last
        ((6, 4, 5), -1, 1e4, 1.0, "few-pass"),  # the shift keeps full precision
        ((16, 5), -1, 3.0, 2.0, "few-pass"),  # 2-D
        ((6, 4, 5), -1, 0.0, 1e20, "general"),  # squares overflow: recompute
        ((6, 5, 4), 1, 0.0, 1.0, "native"),  # channels-first
    ],
)
def test_torch_eager_route(rng, monkeypatch, shape, axis, loc, std, route):
    """Which route an eager training step takes, per layout: torch's native
    op, the kernel's few-pass form, or the general kernel (its guard fired),
    and that each matches float64."""
    if not TORCH:
        pytest.skip("torch's eager routes")
    import torch

    from keras_bn import _train
    from keras_bn.backend import torch as tb

    taken = []
    native, few = tb.fused_train, tb._eager_forward

    def spy_native(*args, **kwargs):
        out = native(*args, **kwargs)
        taken.append("native" if out is not None else "not native")
        return out

    def spy_few(*args, **kwargs):
        out = few(*args, **kwargs)
        taken.append("few-pass" if out is not None else "general")
        return out

    monkeypatch.setattr(backend, "fused_train", spy_native)
    monkeypatch.setattr(tb, "_eager_forward", spy_few)
    x64 = rng.normal(loc, std, shape)
    x = torch.from_numpy(x64.astype("float32")).requires_grad_()
    c = shape[axis]
    scale = torch.linspace(0.5, 2.0, c, requires_grad=True)
    offset = torch.linspace(-1.0, 1.0, c, requires_grad=True)
    dy = torch.from_numpy(rng.normal(size=shape).astype("float32"))
    y, mean, var = _train.batch_norm_train(
        x, scale, offset, axis=axis % len(shape), epsilon=1e-3
    )
    grads = torch.autograd.grad(y, (x, scale, offset), dy)
    assert taken[-1] == route, taken

    t64 = torch.from_numpy(x.detach().numpy().astype("float64")).requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    o64 = offset.detach().double().requires_grad_()
    dims = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    bshape = [1] * len(shape)
    bshape[axis] = c
    m = t64.mean(dims, keepdim=True)
    v = t64.var(dims, unbiased=False, keepdim=True)
    y64 = (t64 - m) / torch.sqrt(v + 1e-3) * s64.reshape(bshape) + o64.reshape(bshape)
    ref = [y64, *torch.autograd.grad(y64, (t64, s64, o64), dy.double())]
    for got, want in zip((y, *grads), ref, strict=True):
        want = want.detach().numpy()
        err = np.max(np.abs(got.detach().numpy() - want)) / np.max(np.abs(want))
        assert err <= 1e-6, err
    np.testing.assert_allclose(
        mean.detach().numpy(), m.flatten().detach(), rtol=1e-6, atol=1e-6 * std
    )
