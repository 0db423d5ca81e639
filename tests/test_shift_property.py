"""Property test: adversarial inputs for the kernel's shifted one-pass moments.

The one-pass variance `E[(x - k)^2] - E[x - k]^2` loses about
`((k - mean) / std)^2 * 2^-24` of itself to the pilot shift `k`, so a pilot
that one value can drag away from the mean (an outlier where the pilot
looks) would ruin it. Hypothesis draws shapes (ranks 2 to 5, channels last
or at axis 1) and, per channel, a distribution meant to fool the pilot:
outliers of 10 to 1e4 standard deviations at any position (the first value
included), heavy tails, post-ReLU zeros with rare large values, means of
30 to 300 and of 1e4 standard deviations, tiny variances, and scales that
differ across channels by up to 1e6.

Every path the layer trains through runs it: the kernel called eagerly,
under XLA (`tf.function(jit_compile=True)` / `jax.jit`; on torch
`torch.compile`, `harness.torch_compile`), on TensorFlow the no-XLA step
(`FusedBatchNormV3` with its fallback, or the kernel compiled as nested
functions), and on torch the eager step (channels-first inputs: torch's
native batch norm with its per-batch guard, else the kernel). Errors
against float64 NumPy, per channel `c` with reference mean `mu_c` and
variance `v_c`:

* output: `max|y - y_ref| / max|y_ref|` (as everywhere in the tests);
* mean: `max_c |mean_c - mu_c| / (|mu_c| + sqrt(v_c))` (float32 holds the
  mean itself to 2^-24 of its magnitude, at best);
* variance: `max_c |var_c - v_c| / v_c`.

Each must be within `max(1e-6, R(m))` of float64 (plus, where TensorFlow's
fused op runs, the error bound documented for it, `_fused_allowance`: the op
sums without a shift, as Keras's layer does), and within twice Keras's own
error (its layer's output; `keras.ops.moments` for the statistics) plus
`R(m)` (plus the fused op's bound where it runs: its variance, formed around
its own unshifted mean, differs from Keras's by more than rounding when the
variance is tiny).

`R(m) = (m + 3) * 2^-24` is the first-order rounding error, relative, of a
variance formed in float32 from m values, by any implementation: a float32
sum of m nonnegative terms in any order is off by up to `(m - 1) * 2^-24`
(Higham, Accuracy and Stability of Numerical Algorithms, 4.2), each term
`(x - k)^2` by up to `3 * 2^-24` (the rounding of `x - k`, doubled by the
square, and the square's own), and the final `- E[x - k]^2` by `2^-24`.
Every implementation carries it, Keras's too, and none can promise less:
with m = 2 Keras's error may happen to be 0.5 * 2^-24 while an exact shift
leaves 2 * 2^-24, and with many equal terms (post-ReLU zeros) the rounding
errors add up instead of cancelling, so two implementations summing in
different orders (or around a slightly different centre) differ by up to
`R(m)`. A pilot shift far from the mean costs far more
(`((k - mean) / std)^2 * 2^-24`: 1e-3 for the pilot of earlier releases with
one outlier), which this still catches.

Shapes keep at most 2048 values per channel, to stay fast.
`KERAS_BN_PROPERTY_EXAMPLES` sets the number of examples per path (default
10, seeded; derandomized so that every run draws the same).
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_bn import _train
from tests import harness as h

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

EPS = 1e-3
EXAMPLES = int(os.environ.get("KERAS_BN_PROPERTY_EXAMPLES", "10"))
TOL = 1e-6
KINDS = (
    "normal",
    "outlier_first",
    "outliers",
    "heavy_tail",
    "relu_rare",
    "moderate_mean",
    "mean_1e4",
    "tiny_variance",
)
PATHS = ["eager", "xla"]
if h.backend_name() == "tensorflow":
    # No XLA: on a CPU these small inputs take the kernel compiled as nested
    # functions; "fused_op" lowers the size rule so that channels-last ones
    # take TensorFlow's fused op and its fallback.
    PATHS += ["no_xla", "fused_op"]
if h.backend_name() == "torch":
    # Eagerly through the backend's route: torch's native op for
    # channels-first inputs where its guard accepts the batch.
    PATHS += ["native"]


def _rounding(m: int) -> float:
    """`R(m)`: a float32 variance's rounding error (see the module's docstring)."""
    return (m + 3) * 2.0**-24


def _channel(rng, kind: str, m: int, first: bool) -> np.ndarray:
    """m values of one channel, in the order they sit in the batch."""
    scale = 10.0 ** rng.uniform(-3, 3)
    z = rng.normal(size=m)
    if kind == "outlier_first" or kind == "outliers":
        count = 1 if kind == "outlier_first" else int(rng.integers(1, 4))
        where = [0] if first or kind == "outlier_first" else []
        where += list(rng.integers(0, m, count))
        z[where[:count]] = rng.choice([-1.0, 1.0], count) * 10.0 ** rng.uniform(1, 4)
    elif kind == "heavy_tail":
        z = rng.standard_t(1.5, size=m)
    elif kind == "relu_rare":
        z = np.where(rng.random(m) < 0.03, rng.uniform(10, 1e3, m), 0.0)
        z[int(rng.integers(0, m))] = rng.uniform(10, 1e3)  # not constant
        if first:
            z[0] = 1e3
    elif kind == "moderate_mean":
        z = z + rng.choice([-1.0, 1.0]) * rng.uniform(30, 300)
    elif kind == "mean_1e4":
        return (rng.choice([-1e4, 1e4]) + z * rng.uniform(0.5, 2)).astype("float32")
    elif kind == "tiny_variance":
        return (rng.uniform(-10, 10) + z * 1e-4).astype("float32")
    return (z * scale).astype("float32")


def _draw_input(data):
    """`(x, axis)`: a drawn shape and, per channel, a drawn distribution."""
    rank = data.draw(st.integers(2, 5), label="rank")
    axis = -1 if rank == 2 else data.draw(st.sampled_from([-1, 1]), label="axis")
    dims = [data.draw(st.integers(1, 8), label=f"dim{i}") for i in range(rank)]
    dims[0] = max(dims[0], 2)
    channels = dims[axis]
    # At most 2048 values per channel (see the module's docstring).
    while math.prod(dims) // channels > 2048:
        j = max((i for i in range(rank) if i != axis % rank), key=lambda i: dims[i])
        dims[j] //= 2
    kinds = data.draw(
        st.lists(st.sampled_from(KINDS), min_size=channels, max_size=channels),
        label="kinds",
    )
    first = data.draw(st.booleans(), label="outlier at the first value")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    m = math.prod(dims) // channels
    cols = [_channel(rng, kind, m, first) for kind in kinds]
    # Channel c's values in batch order: the channel axis moved last, flattened.
    moved = [d for i, d in enumerate(dims) if i != axis % rank] + [channels]
    x = np.stack(cols, axis=-1).reshape(moved)
    return np.ascontiguousarray(np.moveaxis(x, -1, axis)), axis


def _errors(y, mean, var, ref):
    y_ref, mu, v = ref
    y = h.to_numpy(y)
    err_y = np.abs(y - y_ref).max() / np.abs(y_ref).max()
    err_mean = (np.abs(h.to_numpy(mean) - mu) / (np.abs(mu) + np.sqrt(v))).max()
    var = h.to_numpy(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        err_var = np.where(v > 0, np.abs(var - v) / v, np.where(var == 0, 0, np.inf))
    err_var = err_var.max()
    return np.array([err_y, err_mean, err_var])


def _keras_errors(x, axis, gamma, beta, ref):
    """Errors of Keras's layer (output) and `keras.ops.moments` (statistics)."""
    layer = keras.layers.BatchNormalization(axis=axis, epsilon=EPS)
    layer.build(x.shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    y = layer(x, training=True)
    axes = [i for i in range(x.ndim) if i != axis % x.ndim]
    mean, var = ops.moments(ops.convert_to_tensor(x), axes)
    return _errors(y, mean, var, ref)


def _fused_allowance(path, x, axis, gamma, ref):
    """What the fused op may add to the error where it runs, else 0.

    The op's documented bound: where `_fused_error_estimate` (standard
    deviations) stays within `FUSED_MAX_MEAN_ERROR` in every channel the op's
    output is used, off by up to that estimate (measured: 0.1-0.6 of it) times
    `|gamma|`, relative to `max|y_ref|`; its mean by up to the estimate in
    standard deviations.
    """
    if path != "fused_op" or axis % x.ndim != x.ndim - 1:
        return np.zeros(3)
    from keras_bn.backend import tensorflow as tfb

    y_ref, mu, v = ref
    m = x.size // x.shape[axis]
    est = np.abs(mu) / np.sqrt(v + EPS) * 2.0**-24 * math.sqrt(m)
    if (est > tfb.FUSED_MAX_MEAN_ERROR).any():
        return np.zeros(3)  # the kernel ran
    y_est = (np.abs(gamma) * est).max() / np.abs(y_ref).max()
    return np.array([y_est, est.max(), est.max()])


def _run(path: str, x, axis: int, gamma, beta):
    """`(y, mean, var)` of the layer's training step on `path`."""
    ax = axis % x.ndim

    def step(x, g, b):
        return _train.batch_norm_train(
            x,
            g,
            b,
            axis=ax,
            epsilon=EPS,
            fused=path in ("no_xla", "fused_op", "native"),
        )

    if path in ("eager", "native"):
        g, b = ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta)
        return step(ops.convert_to_tensor(x), g, b)
    if h.backend_name() == "jax":
        import jax

        return jax.jit(step)(x, gamma, beta)
    if h.backend_name() == "torch":
        args = [ops.convert_to_tensor(v) for v in (x, gamma, beta)]
        return h.torch_compile(step)(*args)
    import tensorflow as tf

    fn = tf.function(step, jit_compile=path == "xla", autograph=False)
    if path == "fused_op":
        fn = step  # eagerly: the same op and fallback as in a tf.function
    return fn(tf.constant(x), tf.constant(gamma), tf.constant(beta))


@pytest.mark.parametrize("path", PATHS)
def test_adversarial_inputs_match_float64_and_keras(path, monkeypatch):
    if path == "fused_op":
        from keras_bn.backend import tensorflow as tfb

        monkeypatch.setattr(tfb, "FUSED_MIN_SIZE", 0)

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        # No shrinking: each example compiles; the note gives the failing one.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(st.data())
    def check(data):
        x, axis = _draw_input(data)
        c = x.shape[axis]
        rng = np.random.default_rng(c)
        gamma, beta = h.random_affine(rng, c)
        ref = h.ref_forward(x, gamma, beta, axis, EPS)
        ours = _errors(*_run(path, x, axis, gamma, beta), ref)
        theirs = _keras_errors(x, axis, gamma, beta, ref)
        # Keras's layer on torch forms the variance as E[x^2] - E[x]^2, which
        # float32 makes negative for a mean of 1e4 standard deviations: a NaN
        # output, worse than any finite error (the bound below still holds).
        theirs = np.where(np.isnan(theirs), np.inf, theirs)
        m = x.size // c
        limit = 2.0 * theirs + _rounding(m)
        names = ("y", "mean", "var")
        report = ", ".join(
            f"{n}: ours {o:.1e} keras {t:.1e}"
            for n, o, t in zip(names, ours, theirs, strict=True)
        )
        hypothesis.note(f"shape {x.shape} axis {axis}: {report}")
        bound = max(TOL, _rounding(m))
        fused = _fused_allowance(path, x, axis, gamma, ref)
        assert (ours <= bound + fused).all(), report
        assert (ours <= limit + fused).all(), report

    check()
