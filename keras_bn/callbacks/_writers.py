"""CSV and TensorBoard writers shared by the statistics callbacks."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from keras_bn.callbacks._history import is_nan


class CsvWriter:
    """Appends history rows to a CSV file with a header (style of `CSVLogger`).

    Rows are buffered; `flush` (called by the callbacks at each epoch end) and
    `close` write them out.

    Args:
        path: The file to write; its folder is created if needed. An existing
            file is overwritten when `append=False`.
        columns: The header.
        append: Add to an existing file instead of overwriting it (the header is
            written only if the file is new or empty).
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], append=False):
        path = os.fspath(path)
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        has_data = append and os.path.isfile(path) and os.path.getsize(path) > 0
        self._file = open(path, "a" if append else "w", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._file)
        self._columns = tuple(columns)
        if not has_data:
            self._writer.writerow(self._columns)

    def write(self, rows: Sequence[dict]) -> None:
        self._writer.writerows([row[c] for c in self._columns] for row in rows)

    def flush(self) -> None:
        """Pushes the buffered rows to the file (the callbacks: every epoch)."""
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _import_tf_summary():
    try:
        import tensorboard  # noqa: F401 - tf.summary's implementation
        import tensorflow as tf
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "TensorBoard logging (`log_dir=...`) writes event files with "
            "`tf.summary`, which needs TensorFlow and TensorBoard (on any Keras "
            f"backend; missing: {e.name!r}). pip install tensorflow-cpu "
            "tensorboard, or pass log_dir=None."
        ) from e
    return tf


class TensorBoardWriter:
    """Writes scalars and histograms to TensorBoard event files via `tf.summary`.

    Works on every Keras backend as long as TensorFlow is importable: the values
    are NumPy arrays computed by the callback, so no tensor crosses backends.
    One record's summaries are written by one `tf.function` call (traced once
    per set of tags), not op by op in eager mode, which costs about 1-2 ms per
    summary.

    Args:
        log_dir: The folder for the event files.
        prefix: Prepended to every tag, e.g. `"activations"`.
    """

    def __init__(self, log_dir: str | os.PathLike, prefix: str):
        tf = _import_tf_summary()
        self._tf = tf
        self._prefix = prefix
        self._functions = {}
        with tf.device("/cpu:0"):
            self._writer = tf.summary.create_file_writer(os.fspath(log_dir))

    def _function(self, scalar_tags: tuple, histogram_tags: tuple):
        tf, writer = self._tf, self._writer

        @tf.function(reduce_retracing=True)
        def write(step, scalars, histograms):
            with writer.as_default(step=step):
                for i, tag in enumerate(scalar_tags):
                    tf.summary.scalar(tag, scalars[i])
                for tag, values in zip(histogram_tags, histograms, strict=True):
                    tf.summary.histogram(tag, values)

        return write

    def write(self, step: int, scalars: dict, histograms: dict) -> None:
        """Writes `{tag: float}` scalars (NaN skipped) and `{tag: array}`
        histograms (empty ones skipped) at `step`."""
        tf = self._tf
        scalars = {t: float(v) for t, v in scalars.items() if not is_nan(v)}
        histograms = {
            t: np.asarray(v, dtype="float64").ravel() for t, v in histograms.items()
        }
        histograms = {t: v for t, v in histograms.items() if v.size}
        key = (
            tuple(f"{self._prefix}/{t}" for t in scalars),
            tuple(f"{self._prefix}/{t}" for t in histograms),
        )
        if key not in self._functions:
            self._functions[key] = self._function(*key)
        with tf.device("/cpu:0"):
            self._functions[key](
                tf.constant(int(step), tf.int64),
                tf.constant(list(scalars.values()), tf.float32, shape=[len(scalars)]),
                [tf.constant(v) for v in histograms.values()],
            )

    def flush(self) -> None:
        """Writes the buffered events to disk (the callbacks: every epoch)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._functions = {}
