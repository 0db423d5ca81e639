"""`BatchNormStatistics`: moving statistics of BN layers vs. batch statistics."""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_bn.callbacks._base import StatisticsCallback
from keras_bn.callbacks._probe import layer_tensor, resolve_layers

#: The statistics of each row, in column order, as functions of the per-channel
#: arrays of `_channel_statistics`: the one definition of the columns.
_STATISTICS = {
    "moving_mean": lambda c: c["moving_mean"].mean(),
    "moving_variance": lambda c: c["moving_variance"].mean(),
    "batch_mean": lambda c: c["batch_mean"].mean(),
    "batch_variance": lambda c: c["batch_variance"].mean(),
    "mean_gap": lambda c: c["mean_gap"].mean(),
    "mean_gap_max": lambda c: c["mean_gap"].max(),
    "variance_log_ratio": lambda c: c["variance_log_ratio"].mean(),
    "variance_log_ratio_max": lambda c: c["variance_log_ratio"].max(),
}
#: The per-channel arrays written as TensorBoard histograms.
_HISTOGRAMS = ("mean_gap", "variance_log_ratio")


def _channel_moments(x, axis: int):
    """Per-channel `(shift, mean - shift, variance)` of `x`, with `keras.ops`.

    Runs inside the compiled probe in float32, so only three vectors per layer
    cross to the host. Stable for large means: the data are first shifted by
    one example's value of each channel (exact for values within a factor 2 of
    it), then the variance is taken in two passes on the shifted values; the
    host adds the shift back in float64.
    """
    ops = keras.ops
    x = ops.cast(x, "float32")
    x = ops.moveaxis(x, axis % len(x.shape), -1)
    x = ops.reshape(x, (-1, x.shape[-1]))
    shift = x[0]
    d = x - shift
    mean = ops.mean(d, axis=0)
    return shift, mean, ops.mean(ops.square(d - mean), axis=0)


class BatchNormStatistics(StatisticsCallback):
    """Tracks each BN layer's moving statistics and their gap to batch statistics.

    A BN layer trains on batch statistics and infers with its moving averages;
    when the two disagree, the network computes something different at
    inference than it was trained on. Every `every_n_batches` training batches
    (and at the start and end of each `fit`; the step is the optimizer's, so a
    second `fit` continues the first) one compiled forward pass of the fixed
    `probe_data` (in inference mode unless `training=True`) computes, for the
    input of every tracked BN layer and per channel c (the layer's `axis`), the
    batch mean m_c and variance v_c (ddof=0, over all other axes; in float32
    inside the compiled call, shifted and in two passes so that large means
    stay exact, so only per-channel vectors reach the host); the callback
    compares them, in float64, with the layer's current `moving_mean` M_c and
    `moving_variance` V_c:

        mean_gap_c = |m_c - M_c| / sqrt(v_c + epsilon)
        variance_log_ratio_c = |log((V_c + epsilon) / (v_c + epsilon))|

    (`mean_gap` is the shift of the normalized output, in batch standard
    deviations; `variance_log_ratio` is 0 when the variances agree and log(2)
    when one is twice the other). Each history row holds, for one layer, the
    channel averages of M, V, m, v, both gaps, and the channel maxima of the
    gaps (`..._max`). Columns: `step, epoch, layer, moving_mean,
    moving_variance, batch_mean, batch_variance, mean_gap, mean_gap_max,
    variance_log_ratio, variance_log_ratio_max`.

    Tracks every top-level `keras.layers.BatchNormalization` of the model
    (`keras_bn.BatchNormalization` included, being a subclass) unless `layers`
    names some. Outputs are as for `ActivationStatistics`: `history`, optional
    CSV (appended to), optional TensorBoard (scalars `batchnorm/<layer>/<stat>`,
    histograms of the per-channel gaps), and `plot()` of both gaps over steps.

    Args:
        probe_data: A fixed batch of model inputs (a tuple `(x, y)` is
            accepted; `y` is ignored).
        layers: `None` (every BN layer) or names/objects of BN layers.
        every_n_batches: Record every that many training batches.
        csv_path: Optional CSV file to write.
        log_dir: Optional TensorBoard log folder.
        histograms: Also write per-channel gap histograms (if `log_dir`).
        training: Run the probe in training mode, so that upstream BN layers
            normalize with batch statistics (what a training step feeds the
            layer) instead of their moving ones. Never updates moving
            statistics. Default `False` (inference mode).

    Example:

    >>> bn_stats = BatchNormStatistics(probe_data=x_test[:1000])
    >>> model.fit(x, y, callbacks=[bn_stats])  # doctest: +SKIP
    >>> bn_stats.history.to_dataframe()  # doctest: +SKIP
    >>> bn_stats.plot("bn_gaps.png")  # doctest: +SKIP
    """

    _tb_prefix = "batchnorm"

    def __init__(
        self,
        probe_data,
        layers=None,
        every_n_batches: int = 100,
        csv_path: str | os.PathLike | None = None,
        log_dir: str | os.PathLike | None = None,
        histograms: bool = True,
        training: bool = False,
    ):
        self.layers = layers
        self._bn_layers = []
        super().__init__(
            probe_data, every_n_batches, csv_path, log_dir, training, histograms
        )

    def _statistics(self):
        return list(_STATISTICS)

    def _tensors(self, model):
        if self.layers is None:
            layers = [
                la
                for la in model.layers
                if isinstance(la, keras.layers.BatchNormalization)
            ]
            if not layers:
                raise ValueError(
                    f"Model {model.name!r} has no top-level BatchNormalization "
                    f"layer to track (layers: {[la.name for la in model.layers]})."
                )
        else:
            layers = resolve_layers(model, self.layers)
            for layer in layers:
                if not isinstance(layer, keras.layers.BatchNormalization):
                    raise ValueError(
                        f"Layer {layer.name!r} in `layers` is a "
                        f"{type(layer).__name__}, not a BatchNormalization layer."
                    )
        self._bn_layers = layers
        return [layer_tensor(layer, "input") for layer in layers]

    def _reduce(self, outputs):
        return [
            _channel_moments(x, layer.axis)
            for layer, x in zip(self._bn_layers, outputs, strict=True)
        ]

    def _channel_statistics(self, layer, moments) -> dict[str, np.ndarray]:
        """Per-channel float64 arrays: moving and batch moments, both gaps."""
        shift, mean, v = (np.asarray(a, dtype="float64") for a in moments)
        m = shift + mean
        mm, mv = (
            keras.ops.convert_to_numpy(self._probe.value(var)).astype("float64")
            for var in (layer.moving_mean, layer.moving_variance)
        )
        eps = float(layer.epsilon)
        return {
            "moving_mean": mm,
            "moving_variance": mv,
            "batch_mean": m,
            "batch_variance": v,
            "mean_gap": np.abs(m - mm) / np.sqrt(v + eps),
            "variance_log_ratio": np.abs(np.log((mv + eps) / (v + eps))),
        }

    def _compute(self, values):
        results = {}
        for layer, moments in zip(self._bn_layers, values, strict=True):
            c = self._channel_statistics(layer, moments)
            results[layer.name] = {k: float(f(c)) for k, f in _STATISTICS.items()}
        return results

    def _histograms(self, values):
        results = {}
        for layer, moments in zip(self._bn_layers, values, strict=True):
            c = self._channel_statistics(layer, moments)
            results[layer.name] = {k: c[k] for k in _HISTOGRAMS}
        return results

    def plot(self, path: str | os.PathLike, layers=None, title: str | None = None):
        """Draws both gaps over training steps, one column of panels per layer.

        Top: `mean_gap` (channel average, solid) and `mean_gap_max` (dashed).
        Bottom: `variance_log_ratio` and `variance_log_ratio_max`. Both are 0
        when the moving statistics match the probe batch's.

        Args:
            path: Image file to write (format from the suffix, e.g. `.png`).
            layers: Layer names to draw (default: every recorded layer).
            title: Optional figure title.

        Returns:
            The path written.
        """
        from keras_bn.callbacks._plot import plot_gap_history

        return plot_gap_history(self.history, path, layers, title)
