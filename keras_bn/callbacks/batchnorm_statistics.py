"""`BatchNormStatistics`: moving statistics of BN layers vs. batch statistics."""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_bn.callbacks._base import StatisticsCallback
from keras_bn.callbacks._probe import layer_tensor, resolve_layers

_STATS = (
    "moving_mean",
    "moving_variance",
    "batch_mean",
    "batch_variance",
    "mean_gap",
    "mean_gap_max",
    "variance_log_ratio",
    "variance_log_ratio_max",
)


class BatchNormStatistics(StatisticsCallback):
    """Tracks each BN layer's moving statistics and their gap to batch statistics.

    A BN layer trains on batch statistics and infers with its moving averages;
    when the two disagree, the network computes something different at
    inference than it was trained on. Every `every_n_batches` training batches
    (and at steps 0 and the last) one compiled forward pass of the fixed
    `probe_data` (in inference mode unless `training=True`) returns the input
    of every tracked BN layer; the callback computes, per channel c (the
    layer's `axis`), the batch mean m_c and variance v_c (ddof=0, float64, over
    all other axes) and compares them with the layer's current `moving_mean`
    M_c and `moving_variance` V_c:

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
    CSV, optional TensorBoard (scalars `batchnorm/<layer>/<stat>`, histograms
    of the per-channel gaps) through `tf.summary`.

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
        self.histograms = bool(histograms)
        self._bn_layers = []
        super().__init__(probe_data, every_n_batches, csv_path, log_dir, training)

    def _columns(self):
        return ["step", "epoch", "layer", *_STATS]

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

    def _rows(self, step, epoch, values):
        rows, scalars, histograms = [], {}, {}
        for layer, x in zip(self._bn_layers, values, strict=True):
            x = np.asarray(x, dtype="float64")
            axis = layer.axis % x.ndim
            reduce = tuple(i for i in range(x.ndim) if i != axis)
            m, v = x.mean(axis=reduce), x.var(axis=reduce)
            mm, mv = (
                keras.ops.convert_to_numpy(self._probe.value(v)).astype("float64")
                for v in (layer.moving_mean, layer.moving_variance)
            )
            eps = float(layer.epsilon)
            gap = np.abs(m - mm) / np.sqrt(v + eps)
            ratio = np.abs(np.log((mv + eps) / (v + eps)))
            stats = {
                "moving_mean": mm.mean(),
                "moving_variance": mv.mean(),
                "batch_mean": m.mean(),
                "batch_variance": v.mean(),
                "mean_gap": gap.mean(),
                "mean_gap_max": gap.max(),
                "variance_log_ratio": ratio.mean(),
                "variance_log_ratio_max": ratio.max(),
            }
            row = {"step": int(step), "epoch": int(epoch), "layer": layer.name}
            row.update({k: float(val) for k, val in stats.items()})
            rows.append(row)
            for k in _STATS:
                scalars[f"{layer.name}/{k}"] = row[k]
            if self.histograms:
                histograms[f"{layer.name}/mean_gap"] = gap
                histograms[f"{layer.name}/variance_log_ratio"] = ratio
        return rows, scalars, histograms
