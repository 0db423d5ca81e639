"""`keras_bn.BatchNormalization`: Keras's layer with a fused, XLA-friendly kernel."""

from __future__ import annotations

import math
import numbers
import warnings

import keras
from keras import backend, ops

from keras_bn import _ghost, _kernels, _train, _wide
from keras_bn import backend as _backend

_RENORM_KEYS = ("rmax", "rmin", "dmax")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        # Attributed to keras_bn itself: the line that emits it would tell the
        # user nothing (and during `fit` it is a line of TensorFlow's).
        warnings.warn_explicit(message, RuntimeWarning, "keras_bn", 0)


def _single_value_message(name: str) -> str:
    return (
        f"keras_bn: layer '{name}' got a training batch with a single value "
        "per channel (typically the last, partial batch of an epoch). That "
        "batch was normalized with the moving statistics, which it did not "
        "update. To train on full batches only, batch with "
        "`drop_remainder=True` or use a batch size that divides the number of "
        "examples."
    )


def _check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Argument `{name}` must be a float. Received: {name}={value!r}"
        )
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"Argument `{name}` must be in [0, 1] (the weight kept by the moving "
            f"average at each step; Keras's default is 0.99). Received: "
            f"{name}={value}"
        )
    return value


def _check_virtual_batch_size(value, synchronized: bool, renorm: bool):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            "Argument `virtual_batch_size` must be None or a positive integer (the "
            f"number of examples per ghost batch). Received: virtual_batch_size="
            f"{value!r}"
        )
    if value < 1:
        raise ValueError(
            "Argument `virtual_batch_size` must be a positive integer that divides "
            f"the batch size. Received: virtual_batch_size={value}"
        )
    if synchronized:
        raise ValueError(
            "Arguments `virtual_batch_size` and `synchronized=True` cannot be "
            "combined: ghost batches are sub-batches of each replica's batch. "
            f"Received: virtual_batch_size={value}, synchronized=True"
        )
    if renorm:
        raise ValueError(
            "Argument `virtual_batch_size` is not supported with `renorm=True`. "
            f"Received: virtual_batch_size={value}, renorm=True"
        )
    return int(value)


def _check_unbiased(value, renorm: bool) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            "Argument `unbiased_variance` must be True or False. Received: "
            f"unbiased_variance={value!r}"
        )
    if value and renorm:
        raise ValueError(
            "Argument `unbiased_variance=True` is not supported with "
            "`renorm=True` (renorm keeps its own moving standard deviations). "
            "Received: unbiased_variance=True, renorm=True"
        )
    return value


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with a fused training kernel and analytic backward.

    A drop-in replacement for `keras.layers.BatchNormalization`: the same
    arguments, defaults, weights (in the same order) and inference behaviour,
    and an instance of it. Training uses a fused kernel (`keras_bn._kernels`)
    that computes per-channel statistics in one numerically stable pass and
    back-propagates with the closed-form gradient instead of autodiff through
    the composite, which XLA (`jit_compile=True` on TensorFlow, `jax.jit`)
    compiles into few passes over the data. On TensorFlow without XLA (eager,
    or `fit` with Keras's default `compile()` on CPUs and under
    `tf.distribute` strategies) it trains with TensorFlow's fused op
    (`FusedBatchNormV3`, as `tf_keras` does), falling back per batch to the
    kernel where the op's unshifted float32 sums would lose accuracy (a mean
    far from zero) or overflow; on a CPU, channels-first inputs and small
    inputs of a known size train with the kernel compiled by XLA as nested
    functions instead, which is faster there.

    During training the layer returns, per channel,

        y = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    with the batch statistics, and updates

        moving_mean = momentum * moving_mean + (1 - momentum) * mean(x)
        moving_variance = momentum * moving_variance + (1 - momentum) * var(x)

    In inference (`training=False`, the default, or a frozen layer with
    `trainable=False`) it uses `moving_mean` and `moving_variance` instead.

    Where it differs from Keras's layer (documented, tested):

    * A training call whose batch holds a single value per channel raises a
      `ValueError` when called eagerly (the variance is 0 and meaningless, as
      PyTorch also reports). Inside a compiled step (as in `model.fit`, whose
      last batch may hold one example) the layer instead normalizes that batch
      with the moving statistics, leaves them unchanged, and warns once, when
      such a batch runs (on TensorFlow with an unknown batch size under XLA,
      `jit_compile=True`, it cannot call back to warn, and stays silent).
      (`model.fit(..., run_eagerly=True)` calls the layer eagerly, so there
      such a last batch raises: drop it with `drop_remainder=True` or pick a
      batch size that divides the data set.)
    * A channel with fewer than two unmasked values in the batch (in each
      ghost batch with `virtual_batch_size`: those are left out of the
      average; in the global batch with `synchronized=True`) keeps its moving
      statistics: a fully masked batch, or one with a single unmasked value,
      has no variance to learn from. An eager training call on an empty batch
      (size 0) raises a `ValueError`.
    * A channel whose batch mean or variance is not finite (NaN or inf in the
      input) keeps its previous moving statistics, so one bad batch cannot
      poison inference; the output for that channel is non-finite, as the math
      says, for the loss to report.
    * `synchronized=True` is accepted on JAX as well (there, under
      `keras.distribution.DataParallel`, statistics over a sharded batch are
      global either way).
    * A float64 layer trains at float64 precision: its statistics, output
      and gradients come from the float64 composite of `keras_bn._wide`, with
      automatic differentiation (as Keras's layer computes it), not from the
      float32 kernel. On JAX, float64 needs `jax_enable_x64`; without it a
      float64 layer computes in float32, as Keras's layer does there.
      Integer inputs are normalized in float32, as in Keras.
    * Statistics are exact for inputs whose mean is far from zero (the mean
      1e4 with standard deviation 1 in float32 normalizes to 1e-6).

    Args:
        axis: Integer, the channel axis (for `Conv2D` with
            `data_format="channels_first"`, use `axis=1`).
        momentum: Momentum for the moving average, in [0, 1].
        epsilon: Non-negative float added to the variance.
        center: If `True`, add the learned offset `beta`.
        scale: If `True`, multiply by the learned `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: Initializers, as in Keras.
        beta_regularizer, gamma_regularizer: Optional regularizers.
        beta_constraint, gamma_constraint: Optional constraints.
        renorm: Whether to use Batch Renormalization (Ioffe, 2017), exactly as
            Keras defines it.
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`.
        renorm_momentum: Momentum of the renorm moving statistics.
        synchronized: If `True`, statistics (and their gradients) are computed
            over the global batch across replicas of a `tf.distribute` strategy
            (`MirroredStrategy`, `MultiWorkerMirroredStrategy`); with `False`
            each replica uses its own shard's statistics (and its own copy of
            the moving statistics; the first replica's is saved). On JAX,
            under `keras.distribution.DataParallel`, the batch is one sharded
            array and XLA reduces over all of it, so statistics are global with
            `True` or `False` (accepted for portability).
        virtual_batch_size: None (default) or a positive integer `k`: ghost
            batch normalization (Hoffer et al., 2017) as in tf_keras. Training
            statistics are computed per ghost batch of `k` examples (ghost
            batch `g` of a batch of `B` holds examples `g, g + B/k, ...`), and
            the moving statistics are updated with their average over ghost
            batches. The batch size must be a multiple of `k`: a `ValueError`
            when it is known when tracing, an `InvalidArgumentError` at run time
            on TensorFlow when it is not (e.g. the last partial batch of a
            `fit` epoch; batch with `drop_remainder=True`). Not combinable with
            `synchronized=True` or `renorm=True`.
        unbiased_variance: If `True`, the moving variance is updated with the
            unbiased batch variance `m / (m - 1) * var` (`m` values per channel,
            or the mask's count), the population estimate of the paper's
            Algorithm 2; normalization still uses the batch variance. A channel
            with `m <= 1` keeps its moving statistics. Default `False`, as Keras.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean; `True` normalizes with batch statistics.
        mask: Optional tensor of shape `inputs.shape[:-1]`; masked positions do
            not enter the batch statistics (as in Keras).

    Example:

    >>> import keras, keras_bn
    >>> model = keras.Sequential([
    ...     keras.Input((784,)),
    ...     keras.layers.Dense(100, use_bias=False),
    ...     keras_bn.BatchNormalization(),
    ...     keras.layers.Activation("sigmoid"),
    ... ])

    Reference:
        Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network
        Training by Reducing Internal Covariate Shift", ICML 2015,
        https://arxiv.org/abs/1502.03167
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        virtual_batch_size=None,
        unbiased_variance=False,
        **kwargs,
    ):
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(
                "Argument `axis` must be an integer (the channel axis, e.g. -1 for "
                f"channels-last or 1 for channels-first). Received: axis={axis!r}"
            )
        momentum = _check_unit_interval("momentum", momentum)
        renorm_momentum = _check_unit_interval("renorm_momentum", renorm_momentum)
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
            raise TypeError(
                f"Argument `epsilon` must be a float. Received: epsilon={epsilon!r}"
            )
        epsilon = float(epsilon)
        if not epsilon >= 0.0:
            raise ValueError(
                "Argument `epsilon` must be a non-negative float (a small value "
                f"such as 1e-3 keeps the division stable). Received: "
                f"epsilon={epsilon}"
            )
        if renorm_clipping is not None:
            if not isinstance(renorm_clipping, dict):
                raise TypeError(
                    "Argument `renorm_clipping` must be a dict with optional keys "
                    f"{list(_RENORM_KEYS)}. Received: "
                    f"renorm_clipping={renorm_clipping!r}"
                )
            unknown = sorted(set(renorm_clipping) - set(_RENORM_KEYS))
            if unknown:
                raise ValueError(
                    f"Received invalid keys for `renorm_clipping` argument: "
                    f"unknown key(s) {unknown}; "
                    f"supported keys are {list(_RENORM_KEYS)}. Received: "
                    f"renorm_clipping={renorm_clipping!r}"
                )
        super().__init__(
            axis=int(axis),
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            synchronized=False,  # Keras refuses True off TensorFlow; we don't.
            **kwargs,
        )
        self.synchronized = bool(synchronized)
        if renorm and self.renorm_clipping is None:
            self.renorm_clipping = {}
        self.virtual_batch_size = _check_virtual_batch_size(
            virtual_batch_size, self.synchronized, renorm
        )
        self.unbiased_variance = _check_unbiased(unbiased_variance, renorm)

    def build(self, input_shape):
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"Argument `axis`={self.axis} is out of range for inputs of rank "
                f"{rank} (shape {tuple(input_shape)}); use an axis in "
                f"[{-rank}, {rank - 1}]."
            )
        if input_shape[self.axis] is None:
            raise ValueError(
                f"The channel dimension (axis={self.axis}) of the input must be "
                f"known when the layer is built, but the input shape is "
                f"{tuple(input_shape)}. Give the model an Input with a fixed "
                "number of channels."
            )
        if self.virtual_batch_size is not None and self.axis % rank == 0:
            raise ValueError(
                "With `virtual_batch_size`, axis 0 is the batch axis and cannot be "
                f"the channel axis. Received: axis={self.axis}"
            )
        super().build(input_shape)
        self._channel_axis = self.axis % rank

    # -- call -----------------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs. Received: "
                f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(inputs.shape)}"
            )
        if not (training and self.trainable):
            # The very ops Keras's own BatchNormalization emits in inference
            # (float32 math, `ops.batch_normalization` on the moving statistics)
            # so that tf2onnx, the TFLite converter and `model.export` see the
            # pattern they fold into the neighbouring convolution.
            dtype = backend.result_type(inputs.dtype, "float32")
            x = ops.cast(inputs, dtype)
            y = ops.batch_normalization(
                x,
                mean=ops.cast(self.moving_mean, dtype),
                variance=ops.cast(self.moving_variance, dtype),
                axis=self.axis,  # as given, like Keras: -1 adds no Reshape
                offset=ops.cast(self.beta, dtype) if self.center else None,
                scale=ops.cast(self.gamma, dtype) if self.scale else None,
                epsilon=self.epsilon,
            )
            return ops.cast(y, self.compute_dtype)

        # As Keras: integers (which are not autocast) are normalized in
        # float32, and so is a float16/bfloat16 input of another compute dtype
        # (e.g. via `stateless_call`, which does not autocast), so that the
        # output is rounded once, to the compute dtype. float64 trains at
        # float64 precision (`_wide`).
        dtype = backend.standardize_dtype(inputs.dtype)
        if not backend.is_float_dtype(dtype) or dtype not in (
            self.compute_dtype,
            _wide.DTYPE,
            "float32",
        ):
            inputs = ops.cast(inputs, backend.result_type(dtype, "float32"))
        stats = self._statistics_dtype(inputs)
        gamma, beta = self._affine(stats)
        if self.virtual_batch_size is not None:
            self._check_ghost_batch(inputs)
        weights = None
        if mask is not None:
            weights = ops.cast(ops.expand_dims(mask, -1), stats)
        if self._all_reduce() is not None:
            return self._train_synchronized(inputs, gamma, beta, weights)
        ok = self._enough_values(inputs)
        if ok is False:
            return self.call(inputs, training=False)
        if ok is True:
            y, mean, var = self._train(inputs, gamma, beta, weights)
        else:  # Unknown batch size: decide at run time.
            y, mean, var = ops.cond(
                ok,
                lambda: self._train(inputs, gamma, beta, weights),
                lambda: (
                    ops.cast(self.call(inputs, training=False), inputs.dtype),
                    ops.cast(self.moving_mean, stats),
                    ops.cast(self.moving_variance, stats),
                ),
            )
            _backend.warn_if(
                ops.logical_not(ok),
                lambda: _warn_once("single", _single_value_message(self.name)),
            )
        if weights is not None:  # A channel needs two unmasked values to update.
            ok = _both(ok, self._count(inputs, weights, {}) > 1.0)
        self._update_moving_statistics(mean, var, ok)
        return ops.cast(y, self.compute_dtype)

    def _affine(self, dtype):
        channels = self.moving_mean.shape[0]
        gamma = self.gamma if self.scale else ops.ones((channels,), dtype)
        beta = self.beta if self.center else ops.zeros((channels,), dtype)
        return ops.cast(gamma, dtype), ops.cast(beta, dtype)

    @staticmethod
    def _statistics_dtype(inputs) -> str:
        """float64 for float64 inputs (a float64 layer), else float32."""
        wide = backend.standardize_dtype(inputs.dtype) == _wide.DTYPE
        return _wide.DTYPE if wide else "float32"

    @staticmethod
    def _normalize(x, scale, offset, weights=None, **kw):
        """`_train.batch_norm_train`, or its float64 counterpart for float64."""
        if backend.standardize_dtype(x.dtype) == _wide.DTYPE:
            return _wide.batch_norm_train(x, scale, offset, weights, **kw)
        return _train.batch_norm_train(x, scale, offset, weights, **kw)

    def _all_reduce(self):
        """Sums over replicas (synchronized, several replicas), else None."""
        return _backend.cross_replica_sum() if self.synchronized else None

    def _train(self, inputs, gamma, beta, weights):
        if self.virtual_batch_size is not None:
            return self._train_ghost(inputs, gamma, beta, weights)
        all_reduce = self._all_reduce()
        kw = dict(
            axis=self._channel_axis,
            epsilon=self.epsilon,
            all_reduce=all_reduce,
            count_epsilon=0.0 if weights is None else backend.epsilon(),
        )
        if not self.renorm and all_reduce is None:
            y, mean, var = self._normalize(inputs, gamma, beta, weights, **kw)
            return y, mean, self._unbias(var, inputs, weights, kw)
        # The kernel normalizes only (xhat, in float32 so that a float16 output
        # is rounded once and gamma's gradient comes from unrounded xhat), and
        # the affine map is applied here: under synchronization so that gamma's
        # and beta's gradients are this replica's partial sums (the optimizer
        # sums them over replicas) while the input gradient uses the global
        # sums; under renorm because the map depends on the batch statistics.
        xhat, mean, var = self._normalize(
            ops.cast(inputs, self._statistics_dtype(inputs)),
            ops.ones_like(gamma),
            ops.zeros_like(beta),
            weights,
            fused=False,  # renorm differentiates the statistics
            **kw,
        )
        if self.renorm:
            r, d, mean, var = self._renorm_correction_and_moments(mean, var)
            r, d = ops.stop_gradient(r), ops.stop_gradient(d)
            gamma, beta = r * gamma, d * gamma + beta
        else:
            var = self._unbias(var, inputs, weights, kw)
        shape = _kernels.broadcast_shape(len(inputs.shape), kw["axis"], -1)
        y = xhat * ops.reshape(gamma, shape) + ops.reshape(beta, shape)
        return ops.cast(y, inputs.dtype), mean, var

    def _train_synchronized(self, inputs, gamma, beta, weights):
        """Cross-replica training step, without control flow around it.

        tf.distribute refuses cross-replica reductions inside `tf.cond`, and
        what matters is the global batch: a replica may hold a single example
        (or, in a last partial batch, none). A channel's moving statistics are
        left unchanged when the global batch has at most one (unmasked) value
        in it.
        """
        y, mean, var = self._train(inputs, gamma, beta, weights)
        kw = {"all_reduce": self._all_reduce()}
        total = self._count(inputs, weights, kw)  # over the global batch
        self._update_moving_statistics(mean, var, ops.greater(total, 1.0))
        return ops.cast(y, self.compute_dtype)

    def _train_ghost(self, inputs, gamma, beta, weights):
        k, axis = self.virtual_batch_size, self._channel_axis
        channels = inputs.shape[axis]
        static = all(d is not None for d in inputs.shape)
        if not static:
            inputs = _backend.assert_divisible(inputs, k)
        if weights is not None or not static:
            # The weights path counts values at run time (unknown batch size).
            w = ops.ones([1] * len(inputs.shape)) if weights is None else weights
            weights = _ghost.fold(ops.broadcast_to(w, ops.shape(inputs)), axis, k)[0]
        x, axis = _ghost.fold(inputs, axis, k)
        groups = ops.shape(inputs)[0] // k
        kw = dict(
            axis=axis,
            epsilon=self.epsilon,
            count_epsilon=0.0 if weights is None else backend.epsilon(),
        )
        y, mean, var = self._normalize(
            x,
            _ghost.tile(gamma, groups),
            _ghost.tile(beta, groups),
            weights,
            fused=False,
            **kw,
        )
        var = self._unbias(var, x, weights, kw)
        y = _ghost.unfold(y, inputs, self._channel_axis, k)
        if weights is None:
            mean = _ghost.group_average(mean, channels)
            return y, mean, _ghost.group_average(var, channels)
        # Average over the ghost batches with two values or more in a channel
        # (NaN, so not updated, where there is none: see
        # `_update_moving_statistics`).
        valid = ops.cast(self._count(x, weights, kw) > 1.0, mean.dtype)
        groups_ok = _ghost.group_average(valid, channels)
        mean = _ghost.group_average(ops.where(valid > 0, mean, 0.0), channels)
        var = _ghost.group_average(ops.where(valid > 0, var, 0.0), channels)
        none = groups_ok <= 0.0
        return (
            y,
            ops.where(none, float("nan"), mean / ops.maximum(groups_ok, 1e-30)),
            ops.where(none, float("nan"), var / ops.maximum(groups_ok, 1e-30)),
        )

    def _check_ghost_batch(self, inputs):
        k, batch = self.virtual_batch_size, inputs.shape[0]
        if batch is not None and batch % k:
            raise ValueError(
                f"Layer '{self.name}': the batch size {batch} is not divisible by "
                f"virtual_batch_size={k}. Use a batch size that is a multiple of "
                f"{k} (e.g. `drop_remainder=True` when batching a tf.data "
                "dataset)."
            )
        dims = [d for i, d in enumerate(inputs.shape[1:], 1) if i != self._channel_axis]
        if all(d is not None for d in dims) and k * math.prod(dims) == 1:
            raise ValueError(
                f"Layer '{self.name}': virtual_batch_size=1 on inputs of shape "
                f"{tuple(inputs.shape)} leaves a single value per channel in each "
                "ghost batch (variance 0). Use virtual_batch_size >= 2."
            )

    def _unbias(self, var, x, weights, kw):
        """Algorithm 2's `m / (m - 1) * var` for the moving variance, if asked.

        A channel with at most one value gets NaN, so that it is not updated.
        """
        if not self.unbiased_variance:
            return var
        count = ops.cast(self._count(x, weights, kw), var.dtype)
        safe = ops.maximum(count - 1.0, 1.0)
        return ops.where(count > 1.0, var * count / safe, float("nan"))

    def _count(self, x, weights, kw):
        """Values per channel (unmasked ones), `(C,)` float32, over all replicas.

        `kw` holds the kernel's `axis` (default: the layer's) and `all_reduce`.
        A mask of shape `x.shape[:-1] + (1,)` is summed before broadcasting, so
        this costs a reduction over the mask, not over `x`.
        """
        axis = kw.get("axis", self._channel_axis)
        rank = len(x.shape)
        if weights is None:
            channels = x.shape[axis]
            count = ops.cast(ops.size(x), "float32") / channels
            count = ops.ones((channels,), "float32") * count
        else:
            w = ops.cast(weights, "float32")
            axes = _kernels.reduction_axes(rank, axis)
            count = ops.sum(w, axis=axes, keepdims=True)
            shape = ops.shape(x)
            for i in axes:  # Axes along which `w` broadcasts count each value.
                if w.shape[i] == 1 and x.shape[i] != 1:
                    count = count * ops.cast(shape[i], "float32")
            full = _kernels.broadcast_shape(rank, axis, shape[axis])
            count = ops.reshape(ops.broadcast_to(count, full), (-1,))
        if kw.get("all_reduce") is not None:
            count = ops.reshape(kw["all_reduce"](ops.reshape(count, (1, -1))), (-1,))
        return count

    def _enough_values(self, inputs):
        """True, False (one value per channel, traced) or a run-time predicate."""
        dims = [d for i, d in enumerate(inputs.shape) if i != self._channel_axis]
        if all(d is not None for d in dims):
            if math.prod(dims) > 1:
                return True
            if math.prod(dims) == 0 and not _backend.is_traced(inputs):
                raise ValueError(
                    f"Layer '{self.name}' got an empty training batch (input shape "
                    f"{tuple(inputs.shape)}: 0 values per channel), which has no "
                    "statistics. Skip empty batches, or call it with "
                    "training=False."
                )
            if not _backend.is_traced(inputs):
                raise ValueError(
                    f"Layer '{self.name}' got a training batch with a single value "
                    f"per channel (input shape {tuple(inputs.shape)}, axis="
                    f"{self.axis}); its batch variance is 0 and meaningless. Use a "
                    "batch of at least 2 examples, or call it with training=False."
                )
            # Traced for this shape: such a batch is about to run.
            _warn_once("single", _single_value_message(self.name))
            return False
        # Unknown when tracing: `call` warns at run time if such a batch comes.
        size = ops.size(inputs) // inputs.shape[self._channel_axis]
        return ops.greater(size, 1)

    def _update_moving_statistics(self, mean, var, ok):
        finite = ops.logical_and(ops.isfinite(mean), ops.isfinite(var))
        if ok is not True:
            finite = ops.logical_and(finite, ok)
        if self.renorm:
            self._update_renorm_masked(mean, var, finite)
            return
        m = self.momentum
        # The statistics' dtype (float32, or float64 for a float64 layer).
        old_mean = ops.cast(self.moving_mean, mean.dtype)
        old_var = ops.cast(self.moving_variance, mean.dtype)
        self.moving_mean.assign(
            ops.where(finite, old_mean * m + mean * (1.0 - m), old_mean)
        )
        self.moving_variance.assign(
            ops.where(finite, old_var * m + var * (1.0 - m), old_var)
        )

    def _update_renorm_masked(self, mean, var, finite):
        names = ("renorm_mean", "renorm_stddev", "moving_mean", "moving_stddev")
        # A snapshot: on TensorFlow, convert_to_tensor(variable) is the variable.
        old = {n: ops.copy(getattr(self, n)) for n in names}
        old_var = ops.copy(self.moving_variance)
        self._update_renorm_statistics(mean, var)
        for n in names:
            v = getattr(self, n)
            v.assign(ops.where(finite, ops.convert_to_tensor(v), old[n]))
        self.moving_variance.assign(
            ops.where(finite, ops.convert_to_tensor(self.moving_variance), old_var)
        )

    def get_config(self):
        return {
            **super().get_config(),
            "synchronized": self.synchronized,
            "virtual_batch_size": self.virtual_batch_size,
            "unbiased_variance": self.unbiased_variance,
        }


def _both(ok, predicate):
    """`ok` (True or a boolean tensor) and a per-channel `predicate`."""
    return predicate if ok is True else ops.logical_and(ok, predicate)
