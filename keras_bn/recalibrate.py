"""Exact population statistics for every batch-normalization layer of a model.

The moving averages that BN keeps during training lag the weights (they mix
statistics of many past versions of the network). `recalibrate` replaces them
with the exact mean and variance of each BN layer's input over a data set, as
the paper prescribes for inference (Ioffe & Szegedy 2015, Algorithm 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
import warnings

import keras
import numpy as np

from keras_bn import _keras_graph

__all__ = ["LayerRecalibration", "RecalibrationReport", "recalibrate"]


@dataclasses.dataclass
class LayerRecalibration:
    """How far one BN layer's moving statistics were from the exact ones.

    Attributes:
        name: The layer's name (with its enclosing model's, if nested).
        count: Values per channel that entered the statistics.
        old_mean, old_variance: The moving statistics before recalibration.
        mean, variance: The exact statistics now stored in the layer.
        mean_gap: `max |old_mean - mean| / sqrt(variance + epsilon)` over the
            channels (the error of the old mean, in standard deviations).
        variance_gap: `max |old_variance - variance| / (variance + epsilon)`.
        skipped: Batches left out of this layer's statistics because its input
            held NaN or inf there (`skip_nonfinite=True`).
    """

    name: str
    count: float
    old_mean: np.ndarray
    old_variance: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    mean_gap: float
    variance_gap: float
    skipped: int = 0


@dataclasses.dataclass
class RecalibrationReport:
    """What `recalibrate` returns: one `LayerRecalibration` per BN layer.

    Attributes:
        layers: One `LayerRecalibration` per recalibrated layer, in call order.
        skipped_batches: Indices (in `data`, from 0) of the batches left out
            because a BN layer's input held NaN or inf (`skip_nonfinite=True`).
    """

    layers: list
    skipped_batches: list = dataclasses.field(default_factory=list)

    @property
    def max_gap(self) -> float:
        """The largest mean or variance gap over all layers."""
        return max(max(r.mean_gap, r.variance_gap) for r in self.layers)

    def __str__(self) -> str:
        rows = [f"{'layer':<40} {'count':>10} {'mean gap':>10} {'var gap':>10}"]
        for r in self.layers:
            rows.append(
                f"{r.name:<40} {r.count:>10.0f} {r.mean_gap:>10.3g} "
                f"{r.variance_gap:>10.3g}"
            )
        if self.skipped_batches:
            rows.append(
                f"skipped {len(self.skipped_batches)} batch(es) with non-finite "
                f"values: {self.skipped_batches}"
            )
        return "\n".join(rows)


class _Moments:
    """Per-channel (count, mean, M2) in float64, merged with Chan et al.'s rule."""

    def __init__(self):
        self.n = self.mean = self.m2 = None

    def add(self, x: np.ndarray, w: np.ndarray | None) -> None:
        """Merges a batch `(values, channels)` with 0/1 weights (or None)."""
        x = x.astype(np.float64)
        if w is None:
            n_b = np.full(x.shape[1], float(x.shape[0]))
            mean_b = x.mean(axis=0) if x.shape[0] else np.zeros(x.shape[1])
            m2_b = np.square(x - mean_b).sum(axis=0)
        else:
            x = np.where(w > 0, x, 0.0)  # A masked NaN must not leak in.
            n_b = w.sum(axis=0)
            mean_b = (w * x).sum(axis=0) / np.maximum(n_b, 1e-300)
            m2_b = (w * np.square(x - mean_b)).sum(axis=0)
        if self.n is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        safe = np.where(n > 0, n, 1.0)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / safe
        self.m2 = self.m2 + m2_b + np.square(delta) * self.n * n_b / safe
        self.n = n


def recalibrate(
    model: keras.Model,
    data,
    steps: int | None = None,
    *,
    batch_size: int = 32,
    unbiased: bool | None = None,
    skip_nonfinite: bool = False,
    verbose: int = 1,
) -> RecalibrationReport:
    """Sets every BN layer's moving statistics to their exact values over `data`.

    Semantics: each BN layer gets the exact mean and variance of the input it
    sees when the model runs in inference mode, with the BN layers before it
    (in call order) already recalibrated — the statistics that deployment uses.
    As each layer's input depends on the earlier layers' new statistics, the
    statistics are computed one layer after the other, one pass over `data`
    each (a pass stops at the layer being computed when that layer is called
    once per forward pass); in pass `i` the layers before layer `i` run with
    their new statistics through a `keras.StatelessScope`, so no variable
    changes. Per-batch moments are merged in float64 on the host with Chan et
    al.'s parallel rule on `(count, mean, M2)`, so nothing cancels.

    All or nothing: the new statistics are assigned to every layer at the end,
    after the last pass. If anything raises before (the data's own errors,
    such as an `OSError` from a `PyDataset`, are passed through unchanged; a
    batch of the wrong shape; non-finite values), every variable of the model
    keeps its value bit for bit.
    (PyTorch's `update_bn` instead runs the model in training mode with a
    cumulative average of the batch statistics: earlier layers then normalize
    with batch statistics, not with the population statistics used later.)

    Works on `keras_bn.BatchNormalization` and `keras.layers.BatchNormalization`
    (subclasses included), in Sequential, Functional and subclassed models,
    nested models included. Only `moving_mean` and `moving_variance` (and, with
    renorm, `moving_stddev = sqrt(variance + epsilon)`) change; every other
    weight is untouched. A masked input contributes its unmasked positions
    only. A BN layer that the forward pass never calls is left as it is (with
    a warning). The model runs eagerly, batch by batch.

    Args:
        model: A Keras model containing BN layers.
        data: The model's inputs, in any form `model.predict` accepts, with
            the same meaning; only the inputs `x` are used:
            - an array (NumPy, or a backend tensor), split into batches of
              `batch_size`;
            - for a model with several inputs, a list of arrays (in the order
              of `model.inputs`) or a dict of arrays keyed by input name;
            - a tuple `(x, y)` or `(x, y, sample_weight)`, as `fit` takes
              them (`x` an array, list or dict as above): `y` and
              `sample_weight` are ignored, and must have as many rows as `x`;
            - a `tf.data.Dataset`, a `keras.utils.PyDataset` or any iterable
              of batches (e.g. a Python generator) yielding `x`, `(x,)`,
              `(x, y)` or `(x, y, sample_weight)` (a list counts as a tuple,
              as in `fit` and `predict`).
            Ambiguous forms raise a `ValueError` that shows the unambiguous
            one: a tuple of arrays for a model with several inputs (its inputs,
            or `(x, y)`? Pass the inputs as a list or dict), a tuple whose `y`
            has a different number of rows than `x`, a tuple longer than 3, and
            a list of several arrays for a model with one input (several
            inputs, or several batches? Pass batches as a generator or
            dataset). A one-shot iterator (a generator) is read once and its
            batches are kept in host memory for the later passes.
        steps: Number of batches to use (all of `data` if None; required for
            an infinite data set). Must be positive.
        batch_size: Batch size for NumPy input.
        unbiased: If True, store the unbiased variance `M2 / (n - 1)`, if
            False the biased `M2 / n`. The default (None) follows each layer's
            `unbiased_variance` option (False for Keras's layer).
        skip_nonfinite: What to do with a batch where a BN layer's input holds
            NaN or inf (at an unmasked position): False (default) raises a
            `ValueError` naming the layer and the batch; True leaves that batch
            out of that layer's statistics and of every later layer's, and
            lists it in `RecalibrationReport.skipped_batches`.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.

    Returns:
        A `RecalibrationReport`: per layer, the old and new statistics and the
        largest gaps between them (`print(report)` shows a table), and the
        batches skipped.

    Raises:
        ValueError: If a BN layer's input holds NaN or inf (unless
            `skip_nonfinite=True`), or leaves a layer no values at all.

    Example:

    >>> report = keras_bn.recalibrate(model, x_train[:10000], verbose=0)
    >>> print(report)  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    layer  count  mean gap  var gap
    .../bn  64  ...
    """
    bns = _bn_layers(model)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(
                f"Argument `steps` must be an int or None. Received: {steps!r}"
            )
        if steps <= 0:
            raise ValueError(
                "Argument `steps` must be a positive number of batches (or None "
                f"for all of `data`). Received: steps={steps}"
            )
    if unbiased is not None and not isinstance(unbiased, bool):
        raise TypeError(
            f"Argument `unbiased` must be True, False or None. Received: {unbiased!r}"
        )
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(
            "Argument `skip_nonfinite` must be True or False. Received: "
            f"skip_nonfinite={skip_nonfinite!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(
            "Argument `batch_size` must be a positive int. Received: "
            f"batch_size={batch_size!r}"
        )
    if batch_size < 1:
        raise ValueError(
            f"Argument `batch_size` must be positive. Received: batch_size={batch_size}"
        )
    batches = _Batches(data, steps, batch_size, model)
    order = _call_order(model, bns, batches.first())
    missing = [layer.name for layer in bns if id(layer) not in order.calls]
    if missing:
        warnings.warn(
            f"keras_bn.recalibrate: BN layer(s) {missing} are not called by the "
            "model's forward pass and keep their statistics.",
            RuntimeWarning,
            stacklevel=2,
        )
    progbar = None
    if verbose:
        total = None if batches.length is None else batches.length * len(order.layers)
        progbar = keras.utils.Progbar(total, unit_name="batch")
    # Phase 1: compute every layer's statistics; no variable is written.
    new = {}  # id(layer) -> [(variable, value)], for the layers done so far
    results, skipped, done = [], set(), 0
    for layer in order.layers:
        moments = _Moments()
        hook = _Hook(layer, moments, stop=order.calls[id(layer)] == 1)
        with contextlib.ExitStack() as stack:
            stack.enter_context(hook)
            for earlier in order.layers[: len(results)]:
                stack.enter_context(_Substitute(earlier, new[id(earlier)]))
            for index, x in enumerate(batches):
                if index not in skipped:
                    hook.start()
                    try:
                        model(x, training=False)
                    except _Stop:
                        pass
                    hook.commit()
                    if hook.nonfinite is not None and not skip_nonfinite:
                        raise ValueError(
                            f"keras_bn.recalibrate: batch {index} of `data` gives "
                            f"BN layer '{order.names[id(layer)]}' NaN or inf input "
                            f"values (channels {hook.nonfinite}). Clean the data, "
                            "or pass skip_nonfinite=True to leave such batches out."
                        )
                    if hook.nonfinite is not None:
                        skipped.add(index)
                        hook.skipped += 1
                done += 1
                if progbar is not None:
                    progbar.update(done)
        result = _statistics(layer, moments, unbiased, order.names[id(layer)])
        result.skipped = hook.skipped
        results.append(result)
        new[id(layer)] = _new_values(layer, result)
    # Phase 2: assign them all (casts were done in phase 1: nothing can fail).
    for layer in order.layers:
        for variable, value in new[id(layer)]:
            variable.assign(value)
    return RecalibrationReport(results, sorted(skipped))


def _bn_layers(model) -> list:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"Argument `model` must be a Keras model. Received: {type(model).__name__}"
        )
    layers = [model, *_keras_graph.sublayers(model)]
    bns = [
        layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not bns:
        raise ValueError(
            f"Model '{model.name}' has no BatchNormalization layer to recalibrate."
        )
    return bns


class _Batches:
    """Re-iterable batches of model inputs (`x` only) from any supported data."""

    def __init__(self, data, steps, batch_size, model):
        self.steps = steps
        self._cache = None
        self._unpack = True  # batches of a data set: `(x, y, sample_weight)`
        x = _array_inputs(data, model)
        if x is not None:
            rows = _rows(x, "x" if isinstance(data, tuple) else "data")
            if rows == 0:
                raise ValueError("Argument `data` is empty (0 examples).")
            n = math.ceil(rows / batch_size)
            self._source = lambda: (
                keras.tree.map_structure(lambda a, s=s: a[s], x)
                for s in (slice(i * batch_size, (i + 1) * batch_size) for i in range(n))
            )
            self.length = n
            self._unpack = False
        elif isinstance(data, keras.utils.PyDataset):
            n = data.num_batches
            self._source = lambda: (data[i] for i in range(n))
            self.length = n
        elif _is_tf_dataset(data):
            import tensorflow as tf

            card = int(data.cardinality())
            if card == tf.data.INFINITE_CARDINALITY and steps is None:
                raise ValueError(
                    "Argument `data` is an infinite tf.data.Dataset; pass `steps`."
                )
            self._source = lambda: iter(data)
            self.length = card if card >= 0 else None
        elif not hasattr(data, "__iter__"):
            raise TypeError(
                "Argument `data` must be a NumPy array, a tf.data.Dataset, a "
                "keras.utils.PyDataset or an iterable of batches. Received: "
                f"{type(data).__name__}"
            )
        elif inspect.isgenerator(data) or iter(data) is data:
            self._cache = []
            self._source = _caching(iter(data), self._cache)
            self.length = None
        else:
            self._source = lambda: iter(data)
            self.length = len(data) if hasattr(data, "__len__") else None
        if steps is not None:
            self.length = steps if self.length is None else min(steps, self.length)

    def first(self):
        for x in self:
            return x
        raise ValueError("Argument `data` is empty: it yielded no batch.")

    def __iter__(self):
        source = self._source() if self._cache is None else self._replay()
        count = 0
        for batch in source:
            if self.steps is not None and count >= self.steps:
                break
            count += 1
            if not self._unpack:
                yield batch
                continue
            yield keras.utils.unpack_x_y_sample_weight(_to_numpy(batch))[0]
        if self.length is None:
            self.length = count

    def _replay(self):
        yield from self._cache
        yield from self._source


def _is_array(v) -> bool:
    """A NumPy array or a backend tensor (not a data set)."""
    if isinstance(v, np.ndarray):
        return True
    return (
        hasattr(v, "shape")
        and hasattr(v, "dtype")
        and hasattr(v, "__array__")
        and not _is_tf_dataset(v)
    )


def _num_inputs(model) -> int | None:
    """The number of inputs of a Functional/Sequential model, else None."""
    try:
        inputs = model.inputs
    except Exception:  # A subclassed model has no `inputs`.
        return None
    return len(inputs) if inputs else None


def _array_inputs(data, model):
    """`x` (NumPy: an array, list or dict of them) if `data` holds arrays.

    None when `data` is a data set or an iterable of batches. Raises for the
    ambiguous forms (see `recalibrate`'s `data`).
    """
    if _is_array(data):
        return _numpy(data)
    n_inputs = _num_inputs(model)
    if isinstance(data, dict):
        if not data or not all(_is_array(v) for v in data.values()):
            raise TypeError(
                "Argument `data` is a dict: it must map the model's input names "
                "to arrays, as `predict` takes them. Received values of type "
                f"{sorted({type(v).__name__ for v in data.values()})}"
            )
        return {k: _numpy(v) for k, v in data.items()}
    if isinstance(data, list):
        if not data or not all(_is_array(v) for v in data):
            return None  # a list of batches
        if n_inputs == 1 and len(data) > 1:
            raise ValueError(
                f"Argument `data` is a list of {len(data)} arrays, which "
                f"`predict` reads as the inputs of a model with {len(data)} "
                f"inputs, but model '{model.name}' has 1 input. Pass a single "
                "array (`np.concatenate(data)`), or pass batches as a generator "
                "(`iter(data)`), a tf.data.Dataset or a keras.utils.PyDataset."
            )
        return [_numpy(v) for v in data]
    if not isinstance(data, tuple):
        return None
    if not 1 <= len(data) <= 3:
        raise ValueError(
            "Argument `data` is a tuple, read as `(x, y)` or `(x, y, "
            f"sample_weight)` as `fit` takes them, but it has {len(data)} "
            "elements. Pass the inputs of a model with several inputs as a list "
            "or a dict of arrays."
        )
    x, rest = data[0], data[1:]
    if _is_array(x) and n_inputs is not None and n_inputs > 1:
        raise ValueError(
            f"Argument `data` is a tuple of {len(data)} elements, read as `(x, "
            "y)` or `(x, y, sample_weight)` as `fit` takes them, but its `x` is "
            f"one array and model '{model.name}' has {n_inputs} inputs. Pass "
            "the inputs as a list, `[x1, x2, ...]`, or a dict keyed by input "
            "name; with targets, as `([x1, x2, ...], y)`."
        )
    if not (_is_array(x) or isinstance(x, (list, dict))):
        raise TypeError(
            "Argument `data` is a tuple, read as `(x, y)` or `(x, y, "
            "sample_weight)` as `fit` takes them; `x` must be an array, a list "
            "or a dict of arrays. To pass batches, pass a generator, a "
            f"tf.data.Dataset or a keras.utils.PyDataset. Received: x of type "
            f"{type(x).__name__}"
        )
    x = _array_inputs(x, model)
    if x is None:
        raise TypeError(
            "Argument `data` is a tuple whose `x` is a list of batches; pass "
            "batches as a generator, a tf.data.Dataset or a keras.utils.PyDataset."
        )
    rows = _rows(x, "x")
    for name, v in zip(("y", "sample_weight"), rest, strict=False):
        if v is None:
            continue
        leaves = keras.tree.flatten(v)
        if not leaves or not all(_is_array(a) for a in leaves):
            raise TypeError(
                f"Argument `data` is a tuple, read as `(x, y)` or `(x, y, "
                f"sample_weight)` as `fit` takes them; its `{name}` must be an "
                f"array (or a structure of arrays). Received: {type(v).__name__}"
            )
        other = {int(np.shape(a)[0]) if np.ndim(a) else None for a in leaves}
        if other != {rows}:
            raise ValueError(
                f"Argument `data` is a tuple, read as `(x, y)` or `(x, y, "
                f"sample_weight)` as `fit` takes them (only `x` is used), but its "
                f"`{name}` has {sorted(other, key=str)} rows where `x` has {rows}, "
                "so it cannot be one. If every array is an input of the model, "
                "pass them as a list or a dict; if `data` is a pair of batches, "
                "pass them as a generator or a tf.data.Dataset."
            )
    return x


def _numpy(v):
    return v if isinstance(v, np.ndarray) else np.asarray(_to_numpy(v))


def _rows(x, what: str) -> int:
    """The common number of rows of the arrays in `x`, or a ValueError."""
    leaves = keras.tree.flatten(x)
    rows = {int(a.shape[0]) if a.ndim else None for a in leaves}
    if len(rows) != 1 or None in rows:
        raise ValueError(
            f"Argument `{what}` holds arrays with different numbers of rows "
            f"(examples): {sorted(rows, key=str)}. Every input array must have "
            "one row per example."
        )
    return rows.pop()


def _caching(iterator, cache):
    class _Source:
        def __iter__(self):
            for batch in iterator:
                cache.append(batch)
                yield batch

    source = _Source()
    return source


def _is_tf_dataset(data) -> bool:
    module = type(data).__module__
    if not module.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)


def _to_numpy(batch):
    def convert(v):
        return v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else v

    if isinstance(batch, list):
        batch = tuple(batch)
    return keras.tree.map_structure(convert, batch)


class _Stop(Exception):
    """Ends a forward pass once the layer being recalibrated has its input."""


class _Order:
    def __init__(self):
        self.layers, self.calls, self.names = [], {}, {}


def _call_order(model, bns, x) -> _Order:
    """Runs one batch to find the BN layers' call order and call counts."""
    order = _Order()
    hooks = []
    for layer in bns:

        def record(inputs, *args, _layer=layer, _call=layer.call, **kwargs):
            if id(_layer) not in order.calls:
                order.layers.append(_layer)
                order.calls[id(_layer)] = 0
                order.names[id(_layer)] = (
                    _layer.path if hasattr(_layer, "path") else _layer.name
                )
            order.calls[id(_layer)] += 1
            return _call(inputs, *args, **kwargs)

        hooks.append(_Patch(layer, record))
    for hook in hooks:
        hook.__enter__()
    try:
        model(x, training=False)
    finally:
        for hook in hooks:
            hook.__exit__()
    return order


class _Patch:
    """Temporarily replaces `layer.call` on the instance."""

    def __init__(self, layer, call):
        self.layer, self.call = layer, call

    def __enter__(self):
        object.__setattr__(self.layer, "call", self.call)
        return self

    def __exit__(self, *exc):
        object.__delattr__(self.layer, "call")


class _Hook(_Patch):
    """Accumulates the moments of `layer`'s input over the forward passes.

    A batch's moments are merged (`commit`) only after its whole forward pass
    saw finite values at this layer (a layer called several times per pass
    buffers them), so a skipped batch leaves no trace. `nonfinite` lists the
    channels holding NaN or inf in the current batch, if any.
    """

    def __init__(self, layer, moments: _Moments, stop: bool):
        original = layer.call
        self.moments, self.nonfinite, self.skipped = moments, None, 0
        self._pending = []

        def hooked(inputs, *args, mask=None, **kwargs):
            x = np.asarray(keras.ops.convert_to_numpy(inputs))
            axis = layer.axis % x.ndim
            flat = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
            w = None
            if mask is not None:
                m = np.asarray(keras.ops.convert_to_numpy(mask), np.float64)
                m = np.broadcast_to(m[..., None], x.shape)
                w = np.moveaxis(m, axis, -1).reshape(-1, x.shape[axis])
            bad = ~np.isfinite(flat)
            if w is not None:
                bad &= w > 0
            if bad.any():
                self.nonfinite = np.flatnonzero(bad.any(axis=0)).tolist()
                raise _Stop
            self._pending.append((flat, w))
            if stop:
                raise _Stop
            return original(inputs, *args, mask=mask, **kwargs)

        super().__init__(layer, hooked)

    def start(self) -> None:
        """Before each forward pass."""
        self.nonfinite, self._pending = None, []

    def commit(self) -> None:
        """After a forward pass that raised nothing but `_Stop`."""
        if self.nonfinite is None:
            for flat, w in self._pending:
                self.moments.add(flat, w)
        self._pending = []


class _Substitute(_Patch):
    """Runs `layer` with the given variable values, without assigning them."""

    def __init__(self, layer, values: list):
        original = layer.call

        def substituted(*args, **kwargs):
            with keras.StatelessScope(state_mapping=values):
                return original(*args, **kwargs)

        super().__init__(layer, substituted)


def _new_values(layer, result: LayerRecalibration) -> list:
    """`(variable, value)` pairs to assign, each value in its variable's dtype."""
    values = [
        (layer.moving_mean, result.mean),
        (layer.moving_variance, result.variance),
    ]
    if getattr(layer, "renorm", False):
        values.append((layer.moving_stddev, np.sqrt(result.variance + layer.epsilon)))
    out = []
    for variable, value in values:
        with np.errstate(over="ignore"):
            cast = value.astype(variable.dtype)
        if not np.isfinite(cast).all():
            raise ValueError(
                f"keras_bn.recalibrate: the statistics of BN layer '{result.name}' "
                f"over `data` do not fit in {variable.dtype} (largest mean "
                f"{np.abs(result.mean).max():.3g}, variance "
                f"{result.variance.max():.3g}); rescale the data."
            )
        out.append((variable, keras.ops.convert_to_tensor(cast)))
    return out


def _statistics(layer, moments: _Moments, unbiased, name) -> LayerRecalibration:
    if moments.n is None or not np.all(moments.n > 0):
        raise ValueError(
            f"Argument `data` gave layer '{layer.name}' no values to compute "
            "statistics from (empty data, or every position masked)."
        )
    if unbiased is None:
        unbiased = bool(getattr(layer, "unbiased_variance", False))
    n = moments.n
    if unbiased and not np.all(n > 1):
        raise ValueError(
            f"unbiased=True needs at least 2 values per channel; layer "
            f"'{layer.name}' got {int(n.min())}."
        )
    variance = moments.m2 / (n - 1.0 if unbiased else n)
    mean = moments.mean
    old_mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
    old_var = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
    std = np.sqrt(variance + layer.epsilon)
    return LayerRecalibration(
        name=name,
        count=float(n.min()),
        old_mean=old_mean,
        old_variance=old_var,
        mean=mean,
        variance=variance,
        mean_gap=float(np.max(np.abs(old_mean - mean) / std)),
        variance_gap=float(
            np.max(np.abs(old_var - variance) / (variance + layer.epsilon))
        ),
    )
