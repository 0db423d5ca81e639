"""`StatisticsCallback`: the schedule, history and writers shared by both callbacks."""

from __future__ import annotations

import numbers
import os

import keras

from keras_bn.callbacks._history import StatisticsHistory
from keras_bn.callbacks._probe import Probe, check_probe
from keras_bn.callbacks._writers import CsvWriter, TensorBoardWriter


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


class StatisticsCallback(keras.callbacks.Callback):
    """Base class: records statistics of a fixed probe batch every N batches.

    Records once at the start of training (step 0), then whenever the global
    step (batches trained since `on_train_begin`, across epochs) reaches a
    multiple of `every_n_batches`, and at the end of training. With
    `steps_per_execution > 1`, Keras calls batch callbacks once per execution,
    so a record lands on the first execution end at or past each multiple.

    Subclasses define `_columns()`, `_tensors(model)` (the symbolic tensors the
    probe returns) and `_rows(step, epoch, values)`.
    """

    _tb_prefix = "statistics"

    def __init__(
        self, probe_data, every_n_batches, csv_path=None, log_dir=None, training=False
    ):
        super().__init__()
        if not isinstance(training, bool):
            raise TypeError(
                f"Argument `training` must be a bool (run the probe in training "
                f"mode). Received: training={training!r}"
            )
        self.training = training
        self.every_n_batches = check_every_n_batches(every_n_batches)
        self._probe_x = check_probe(probe_data)
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.history = StatisticsHistory(self._columns())
        self._probe = None
        self._probe_key = None
        self._csv = None
        self._tb = None
        self._step = 0
        self._epoch = 0
        self._epoch_start = 0
        self._last_recorded = None

    # -- to override -------------------------------------------------------
    def _columns(self) -> list[str]:
        raise NotImplementedError

    def _tensors(self, model) -> list:
        raise NotImplementedError

    def _rows(self, step, epoch, values) -> tuple[list[dict], dict, dict]:
        """Returns `(history rows, TensorBoard scalars, TensorBoard histograms)`."""
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------
    def on_train_begin(self, logs=None):
        self.history.clear()
        self._step = self._epoch = self._epoch_start = 0
        self._last_recorded = None
        tensors = self._tensors(self.model)
        # Reuse the compiled probe only for the very same model and tensors
        # (compared by identity on objects held here, so ids cannot be reused).
        key = (self.model, *tensors)
        same = self._probe_key is not None and len(key) == len(self._probe_key)
        if not (
            same and all(a is b for a, b in zip(key, self._probe_key, strict=True))
        ):
            self._probe = Probe(self.model, tensors, self._probe_x, self.training)
            self._probe_key = key
        self.close()
        if self.log_dir is not None:
            self._tb = TensorBoardWriter(self.log_dir, self._tb_prefix)
        if self.csv_path is not None:
            self._csv = CsvWriter(self.csv_path, self.history.columns)
        self.record()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._step

    def on_train_batch_end(self, batch, logs=None):
        previous = self._step
        done = int(batch) + 1
        # With steps_per_execution > 1 Keras reports the nominal end of the last
        # execution of an epoch, which can lie past the epoch's real last batch.
        per_epoch = (self.params or {}).get("steps")
        if per_epoch:
            done = min(done, int(per_epoch))
        self._step = self._epoch_start + done
        n = self.every_n_batches
        if self._step // n > previous // n:
            self.record()

    def on_train_end(self, logs=None):
        try:
            if self._last_recorded != self._step:
                self.record()
        finally:
            self.close()

    def record(self) -> None:
        """Runs the probe now and appends the statistics at the current step."""
        values = self._probe.run()
        rows, scalars, histograms = self._rows(self._step, self._epoch, values)
        for row in rows:
            self.history.append(row)
        if self._csv is not None:
            self._csv.write(rows)
        if self._tb is not None:
            self._tb.write(self._step, scalars, histograms)
        self._last_recorded = self._step

    def close(self) -> None:
        """Closes the CSV file and TensorBoard writer (done in `on_train_end`)."""
        for writer in (self._csv, self._tb):
            if writer is not None:
                writer.close()
        self._csv = self._tb = None
