"""`StatisticsCallback`: the schedule, history and writers shared by both callbacks."""

from __future__ import annotations

import numbers
import os
import threading

import keras

from keras_bn.callbacks._history import StatisticsHistory
from keras_bn.callbacks._probe import Probe, check_probe
from keras_bn.callbacks._writers import CsvWriter, tensorboard_writer


def check_every_n_batches(value) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or int(value) < 1
    ):
        raise ValueError(
            f"Argument `every_n_batches` must be a positive integer (record "
            f"every that many training batches). Received: every_n_batches={value!r}"
        )
    return int(value)


def optimizer_step(model) -> int:
    """The training steps `model`'s optimizer has taken (0 without one)."""
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is None:
        return 0
    return int(keras.ops.convert_to_numpy(iterations))


class StatisticsCallback(keras.callbacks.Callback):
    """Base class: records statistics of a fixed probe batch every N batches.

    The step is the optimizer's: `model.optimizer.iterations` at the start of
    `fit`, plus the batches trained since. A second `fit` (a fine-tuning
    phase, a resumed run) therefore continues the step axis, the history, the
    CSV file (appended to) and the TensorBoard curves of the first instead of
    starting them again at 0. `history.clear()` forgets the earlier rows.

    Records once at the start of each `fit` (at the optimizer's step then),
    whenever the step reaches a multiple of `every_n_batches`, and at the end
    of training. With `steps_per_execution > 1`, Keras calls batch callbacks
    once per execution, so a record lands on the first execution end at or
    past each multiple.

    A record due after step s is taken in `on_train_batch_begin` of the next
    batch (the same weights: nothing changes them in between), or in
    `on_epoch_end` after an epoch's last batch. `on_train_batch_end` only counts
    batches and is safe for Keras's asynchronous dispatch (`async_safe`), so
    the callback does not make Keras wait for every training step to finish
    (on JAX a callback with a blocking `on_train_batch_end` does).

    Subclasses compute, the base class writes. A subclass defines:

    * `_tensors(model)`: the symbolic tensors the probe returns;
    * `_statistics()`: the names of the statistics, in column order (the one
      list that defines the history and CSV columns);
    * `_reduce(outputs)` (optional): what the compiled probe makes of those
      tensors with `keras.ops`, so that only its results cross to the host;
    * `_compute(values)`: `{layer: {statistic: float}}` from the probe's
      NumPy results, with exactly the names of `_statistics()`;
    * `_histograms(values)` (optional): `{layer: {name: array}}` for
      TensorBoard histograms (tag `<layer>[/<label>...]/<name>`, or without
      `/<name>` when `name` is empty), computed only when they are written;
    * `_labels(layer)` (optional): extra text columns of a layer's rows (e.g.
      `{"tensor": "input"}`), also part of the TensorBoard tags.

    From these the base class writes the history, the CSV file and the
    TensorBoard scalars (`<prefix>/<layer>[/<label>...]/<statistic>`).
    """

    _tb_prefix = "statistics"
    _label_columns: tuple[str, ...] = ()
    #: Keras may run `on_train_batch_end` on a worker thread: it only counts.
    async_safe = True

    def __init__(
        self,
        probe_data,
        every_n_batches,
        csv_path=None,
        log_dir=None,
        training=False,
        histograms=True,
    ):
        super().__init__()
        if not isinstance(training, bool):
            raise TypeError(
                f"Argument `training` must be a bool (run the probe in training "
                f"mode). Received: training={training!r}"
            )
        self.training = training
        self.histograms = bool(histograms)
        self.every_n_batches = check_every_n_batches(every_n_batches)
        self._probe_x = check_probe(probe_data)
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.history = StatisticsHistory(self._columns())
        self._probe = None
        self._probe_key = None
        self._csv = None
        self._tb = None
        self._lock = threading.Lock()
        self._step = 0
        self._epoch = 0
        self._epoch_start = 0
        self._epoch_done = 0
        self._last_recorded = None

    # -- to override -------------------------------------------------------
    def _statistics(self) -> list[str]:
        raise NotImplementedError

    def _tensors(self, model) -> list:
        raise NotImplementedError

    def _reduce(self, outputs):
        return outputs

    def _compute(self, values) -> dict[str, dict[str, float]]:
        raise NotImplementedError

    def _histograms(self, values) -> dict[str, dict]:
        return {}

    def _labels(self, layer: str) -> dict[str, str]:
        return {}

    # -- columns and writing -----------------------------------------------
    def _columns(self) -> list[str]:
        return ["step", "epoch", "layer", *self._label_columns, *self._statistics()]

    def _write(self, statistics: dict, histograms: dict) -> None:
        """Appends one record (`{layer: {statistic: value}}`) to every output."""
        rows, scalars, hists = [], {}, {}
        for layer, stats in statistics.items():
            labels = self._labels(layer)
            path = "/".join([layer, *labels.values()])
            row = {"step": self._step, "epoch": self._epoch, "layer": layer}
            row.update(labels)
            row.update((name, float(value)) for name, value in stats.items())
            rows.append(row)
            scalars.update((f"{path}/{k}", float(v)) for k, v in stats.items())
        for layer, named in histograms.items():
            path = "/".join([layer, *self._labels(layer).values()])
            hists.update(
                (f"{path}/{name}" if name else path, v) for name, v in named.items()
            )
        for row in rows:
            self.history.append(row)
        if self._csv is not None:
            self._csv.write(rows)
        if self._tb is not None:
            self._tb.write(self._step, scalars, hists)

    # -- lifecycle ---------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._step = self._epoch_start = optimizer_step(self.model)
        self._epoch = self._epoch_done = 0
        self._last_recorded = None
        tensors = self._tensors(self.model)
        # Reuse the compiled probe only for the very same model and tensors
        # (compared by identity on objects held here, so ids cannot be reused).
        key = (self.model, *tensors)
        same = self._probe_key is not None and len(key) == len(self._probe_key)
        if not (
            same and all(a is b for a, b in zip(key, self._probe_key, strict=True))
        ):
            self._probe = Probe(
                self.model, tensors, self._probe_x, self.training, self._reduce
            )
            self._probe_key = key
        self._probe.refresh()
        self.close()
        if self.log_dir is not None:
            self._tb = tensorboard_writer(self.log_dir, self._tb_prefix)
        if self.csv_path is not None:
            self._csv = CsvWriter(self.csv_path, self.history.columns)
        self.record()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._step
        self._epoch_done = 0

    def on_train_batch_begin(self, batch, logs=None):
        # `batch` batches of this epoch are done: take a record due after them.
        self._advance(self._epoch_start + int(batch))

    def on_train_batch_end(self, batch, logs=None):
        done = int(batch) + 1
        # With steps_per_execution > 1 Keras reports the nominal end of the last
        # execution of an epoch, which can lie past the epoch's real last batch.
        per_epoch = (self.params or {}).get("steps")
        if per_epoch:
            done = min(done, int(per_epoch))
        with self._lock:  # possibly on one of Keras's worker threads
            self._epoch_done = max(self._epoch_done, done)

    def on_epoch_end(self, epoch, logs=None):
        # Keras has waited for every `on_train_batch_end` of the epoch.
        self._advance(self._epoch_start + self._epoch_done)
        for writer in (self._csv, self._tb):
            if writer is not None:
                writer.flush()

    def on_train_end(self, logs=None):
        try:
            if self._last_recorded != self._step:
                self.record()
        finally:
            self.close()

    def _advance(self, step: int) -> None:
        previous, self._step = self._step, max(self._step, step)
        n = self.every_n_batches
        if self._step // n > previous // n:
            self.record()

    def record(self) -> None:
        """Runs the probe now and appends the statistics at the current step."""
        values = self._probe.run()
        statistics = self._compute(values)
        histograms = (
            self._histograms(values) if self._tb is not None and self.histograms else {}
        )
        self._write(statistics, histograms)
        self._last_recorded = self._step

    def close(self) -> None:
        """Closes the CSV file and TensorBoard writer (done in `on_train_end`)."""
        for writer in (self._csv, self._tb):
            if writer is not None:
                writer.close()
        self._csv = self._tb = None
