"""`ActivationStatistics`: percentiles of layer inputs/outputs during training."""

from __future__ import annotations

import numbers
import os

import keras
import numpy as np

from keras_bn.callbacks._base import StatisticsCallback
from keras_bn.callbacks._probe import layer_tensor, resolve_layers

#: Default |x| thresholds beyond which a sigmoid/tanh input counts as saturated.
#: Both are where the derivative falls to about 7% of its peak:
#: sigmoid'(4) = 0.018 (peak 0.25), tanh'(2) = 0.071 (peak 1).
SATURATION_THRESHOLDS = {"sigmoid": 4.0, "tanh": 2.0}
_WHICH = ("input", "output")


def _column(q: float) -> str:
    return f"p{q:g}"


def _check_percentiles(percentiles) -> tuple[float, ...]:
    bad = ValueError(
        f"Argument `percentiles` must be a non-empty sequence of distinct numbers "
        f"in [0, 100], e.g. (15, 50, 85). Received: percentiles={percentiles!r}"
    )
    if isinstance(percentiles, (str, bytes)) or not hasattr(percentiles, "__iter__"):
        raise bad
    qs = tuple(percentiles)
    if not qs or any(
        isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 100
        for q in qs
    ):
        raise bad
    if len({_column(q) for q in qs}) != len(qs):
        raise bad
    return tuple(float(q) for q in qs)


def _percentiles(x: np.ndarray, qs) -> list[float]:
    """`np.percentile(x, qs)` (linear) of a 1-D array, without its float64 copy.

    Sorts `x` in its own dtype (exact; NumPy's vectorized sort is several times
    faster than the selection `np.percentile` runs on 10^5 float32 values) and
    interpolates the two neighbouring order statistics in float64 as NumPy
    does. Any NaN makes every percentile NaN, as in NumPy.
    """
    if np.isnan(x).any():
        return [float("nan")] * len(qs)
    index = np.asarray(qs, dtype="float64") / 100 * (x.size - 1)
    lo = np.floor(index).astype(np.int64)
    hi = np.minimum(lo + 1, x.size - 1)
    ordered = np.sort(x)
    a, b = ordered[lo].astype("float64"), ordered[hi].astype("float64")
    t = index - lo
    out = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    return [float(v) for v in out]


def _check_which(value, argument="tensor") -> str:
    if value not in _WHICH:
        raise ValueError(
            f"Argument `{argument}` must be 'input' or 'output' (record the "
            f"layer's input tensor or its output tensor). Received: "
            f"{argument}={value!r}"
        )
    return value


def _activation_name(layer) -> str | None:
    if not isinstance(layer, keras.layers.Activation):
        return None
    fn = layer.activation
    for name in SATURATION_THRESHOLDS:
        if fn is getattr(keras.activations, name):
            return name
    return None


class ActivationStatistics(StatisticsCallback):
    """Records percentiles of chosen layers' inputs or outputs during `fit`.

    This is the measurement behind Figure 1(b,c) of Ioffe & Szegedy (2015): the
    distribution of a sigmoid's input over training. Every `every_n_batches`
    training batches (and at the start and end of each `fit`; the step is the
    optimizer's, so a second `fit` continues the first), one compiled forward pass of
    the fixed `probe_data` returns the tensors of all chosen layers together,
    and for each layer the callback records the requested percentiles, mean,
    standard deviation (population, ddof=0) and fraction of saturated units
    over all probe examples and all units (or one unit, see `unit`): exact
    percentiles of the float32 values (interpolated in float64), moments
    accumulated in float64. The forward pass runs in inference mode unless
    `training=True`.

    Saturation: a value x of a sigmoid (tanh) input is saturated when
    |x| > threshold. With `saturation_threshold="auto"` the thresholds are
    `SATURATION_THRESHOLDS` (sigmoid 4.0, tanh 2.0: where the derivative is ~7%
    of its peak) and the fraction is computed for the input of a
    `keras.layers.Activation("sigmoid"|"tanh")` layer; other tensors get `nan`.
    A float threshold applies |x| > threshold to every recorded tensor; `None`
    never computes it (`nan`).

    Results live in `callback.history` (a `StatisticsHistory`, kept across
    `fit` calls) with columns `step, epoch, layer, tensor, p<q>..., mean,
    std, saturated` (e.g. `p15, p50, p85`); `history.as_dict()` gives columns
    for `pandas.DataFrame`. Optionally also appended to `csv_path` (one row per
    record and layer; an existing file must have the same header) and written
    to TensorBoard under `log_dir` (scalars
    `activations/<layer>/<tensor>/<stat>` and a histogram
    `activations/<layer>/<tensor>`): with `tf.summary` on the TensorFlow
    backend, with tensorboardX on JAX and torch. On JAX the callback reads the
    trainer's current weights, not the model's stale copy.

    Args:
        layers: A layer name or object, or a list of them (top-level layers of
            the model). An entry may also be a pair `(layer, "input"|"output")`
            to override `tensor` for that layer.
        probe_data: A fixed batch of model inputs, e.g. `x_test[:1000]`; a
            tuple `(x, y)` is accepted and `y` ignored.
        percentiles: Percentiles to record, in [0, 100].
        every_n_batches: Record every that many training batches.
        tensor: `"input"` (default) or `"output"` of each layer.
        unit: If an int, only that index of the last axis (one unit, as the
            paper's "typical sigmoid"); `None` pools all units.
        saturation_threshold: `"auto"`, a positive float, or `None` (above).
        csv_path: Optional CSV file to write.
        log_dir: Optional TensorBoard log folder.
        histograms: Also write TensorBoard histograms (if `log_dir`).
        training: Run the probe in training mode: BN layers then normalize
            with the probe batch's own statistics, as during a training step
            (the distribution the sigmoid sees while training), and dropout is
            active. Moving statistics are never updated by the probe. Default
            `False`: inference mode, as `predict` (BN uses moving statistics).

    Example:

    >>> stats = ActivationStatistics("sigmoid_3", probe_data=x_test[:1000])
    >>> model.fit(x, y, callbacks=[stats])  # doctest: +SKIP
    >>> stats.history.as_dict()["p50"]  # doctest: +SKIP
    >>> stats.plot("sigmoid_input.png")  # doctest: +SKIP
    """

    _tb_prefix = "activations"
    _label_columns = ("tensor",)

    def __init__(
        self,
        layers,
        probe_data,
        percentiles=(15, 50, 85),
        every_n_batches: int = 100,
        tensor: str = "input",
        unit: int | None = None,
        saturation_threshold: float | str | None = "auto",
        csv_path: str | os.PathLike | None = None,
        log_dir: str | os.PathLike | None = None,
        histograms: bool = True,
        training: bool = False,
    ):
        self.percentiles = _check_percentiles(percentiles)
        self.tensor = _check_which(tensor)
        if unit is not None and (
            isinstance(unit, bool) or not isinstance(unit, numbers.Integral)
        ):
            raise TypeError(
                f"Argument `unit` must be an int (index on the last axis) or None. "
                f"Received: unit={unit!r}"
            )
        self.unit = unit
        if not (
            saturation_threshold is None
            or saturation_threshold == "auto"
            or (
                isinstance(saturation_threshold, numbers.Real)
                and not isinstance(saturation_threshold, bool)
                and saturation_threshold > 0
            )
        ):
            raise ValueError(
                "Argument `saturation_threshold` must be 'auto', a positive float "
                "(|x| above it counts as saturated) or None. Received: "
                f"saturation_threshold={saturation_threshold!r}"
            )
        self.saturation_threshold = saturation_threshold
        self.layers = layers
        self._targets, self._which = [], {}
        super().__init__(
            probe_data, every_n_batches, csv_path, log_dir, training, histograms
        )

    def _statistics(self):
        return [*(_column(q) for q in self.percentiles), "mean", "std", "saturated"]

    def _labels(self, layer):
        return {"tensor": self._which[layer]}

    def _entries(self):
        items = self.layers
        if isinstance(items, (str, keras.layers.Layer)) or (
            isinstance(items, tuple) and len(items) == 2 and items[1] in _WHICH
        ):
            items = [items]
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(
                "Argument `layers` must be a layer name or object, or a non-empty "
                f"list of them. Received: layers={self.layers!r}"
            )
        out = []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2:
                out.append((item[0], _check_which(item[1], "layers")))
            else:
                out.append((item, self.tensor))
        return out

    def _threshold(self, layer, which):
        if self.saturation_threshold is None:
            return None
        if self.saturation_threshold == "auto":
            name = _activation_name(layer) if which == "input" else None
            return SATURATION_THRESHOLDS.get(name)
        return float(self.saturation_threshold)

    def _tensors(self, model):
        entries = self._entries()
        layers = resolve_layers(model, [e[0] for e in entries])
        self._targets, self._which = [], {}
        tensors = []
        names = [layer.name for layer in layers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"Layers {twice} appear more than once in `layers`; record each "
                f"layer once per callback (use a second callback for another "
                f"tensor of the same layer)."
            )
        for layer, (_, which) in zip(layers, entries, strict=True):
            tensor = layer_tensor(layer, which)
            if self.unit is not None:
                size = tensor.shape[-1]
                if size is not None and not -size <= self.unit < size:
                    raise ValueError(
                        f"Argument `unit`={self.unit} is out of range for the "
                        f"{which} of layer {layer.name!r}, whose last axis has "
                        f"{size} units."
                    )
            self._targets.append((layer.name, which, self._threshold(layer, which)))
            self._which[layer.name] = which
            tensors.append(tensor)
        return tensors

    def _reduce(self, outputs):
        # In the compiled probe: keep one unit, flatten, float32 statistics
        # under mixed precision. Percentiles need every value, and an exact
        # sort on the host (NumPy's vectorized sort) is far cheaper than one
        # in XLA on CPU (measured: 17-42 ms vs 0.2 ms for 10^5 values, see
        # docs/callbacks.md), so the flat tensor itself crosses to the host.
        ops = keras.ops
        out = []
        for x in outputs:
            if self.unit is not None:
                x = x[..., self.unit]
            out.append(ops.reshape(ops.cast(x, "float32"), (-1,)))
        return out

    def _compute(self, values):
        results = {}
        for (name, _, threshold), x in zip(self._targets, values, strict=True):
            stats = {
                _column(q): p
                for q, p in zip(
                    self.percentiles, _percentiles(x, self.percentiles), strict=True
                )
            }
            stats["mean"] = float(np.mean(x, dtype="float64"))
            stats["std"] = float(np.std(x, dtype="float64"))
            stats["saturated"] = (
                np.count_nonzero(np.abs(x) > threshold) / x.size
                if threshold is not None
                else float("nan")
            )
            results[name] = stats
        return results

    def _histograms(self, values):
        return {
            name: {"": x} for (name, _, _), x in zip(self._targets, values, strict=True)
        }

    def plot(self, path: str | os.PathLike, layers=None, title: str | None = None):
        """Draws the percentile bands over training steps (Figure 1(b,c) style).

        Args:
            path: Image file to write (format from the suffix, e.g. `.png`).
            layers: Layer names to draw (default: every recorded layer).
            title: Optional figure title.

        Returns:
            The path written.
        """
        from keras_bn.callbacks._plot import plot_percentile_history

        return plot_percentile_history(
            self.history, [_column(q) for q in self.percentiles], path, layers, title
        )
