"""CSV and TensorBoard writers shared by the statistics callbacks."""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Sequence

import numpy as np

from keras_bn.callbacks._history import is_nan


class CsvWriter:
    """Appends history rows to a CSV file with a header (style of `CSVLogger`).

    A new or empty file gets the header first. An existing file is appended
    to, so that the rows of a second `fit` (or of a resumed run) continue the
    first's; its header must then be exactly `columns`, or a `ValueError`
    names the file and what to do. Rows are buffered; `flush` (called by the
    callbacks at each epoch end) and `close` write them out.

    Args:
        path: The file to write; its folder is created if needed.
        columns: The header.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]):
        path = os.fspath(path)
        self._columns = tuple(columns)
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        has_data = os.path.isfile(path) and os.path.getsize(path) > 0
        if has_data:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != self._columns:
                raise ValueError(
                    f"Cannot append to the CSV file {path!r}: its header is "
                    f"{header}, but this callback writes the columns "
                    f"{list(self._columns)}. Pass another `csv_path`, or delete "
                    f"or rename the file to start a new one."
                )
        self._file = open(path, "a", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._file)
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


def _finite_histograms(histograms: dict) -> dict:
    """`{tag: float64 vector}` of the finite values; empty histograms dropped."""
    out = {}
    for tag, values in histograms.items():
        v = np.asarray(values, dtype="float64").ravel()
        v = v[np.isfinite(v)]
        if v.size:
            out[tag] = v
    return out


def tensorboard_writer(log_dir: str | os.PathLike, prefix: str):
    """The TensorBoard writer for the running Keras backend.

    TensorFlow backend: `tf.summary` (TensorFlow is loaded already, and its
    `tensorboard` dependency is installed with it). JAX and torch backends:
    tensorboardX, so that logging neither needs TensorFlow nor loads it into
    the process.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        return TensorBoardWriter(log_dir, prefix)
    return TensorBoardXWriter(log_dir, prefix)


#: Numbers the event files this process opens with tensorboardX.
_FILE_NUMBERS = itertools.count()


class TensorBoardXWriter:
    """Writes scalars and histograms to TensorBoard event files via tensorboardX.

    Needs neither TensorFlow nor a Keras backend: the values are NumPy arrays
    computed by the callback. Scalars NaN are skipped; histograms hold the
    finite values (empty ones are skipped).

    Args:
        log_dir: The folder for the event files.
        prefix: Prepended to every tag, e.g. `"activations"`.
    """

    def __init__(self, log_dir: str | os.PathLike, prefix: str):
        try:
            from tensorboardX import SummaryWriter
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "TensorBoard logging (`log_dir=...`) on the JAX and torch "
                "backends writes event files with tensorboardX: pip install "
                "tensorboardX (or keras-bn[tensorboard]), or pass log_dir=None."
            ) from e
        self._prefix = prefix
        # flush_secs: flushed by `flush()` at each epoch end, not by a timer.
        # The suffix: tensorboardX names a file by the second it was opened
        # and the host, so a second writer in the same second (two short
        # `fit`s) would overwrite the first one's file; as tf.summary does,
        # the process id and a counter keep every file.
        self._writer = SummaryWriter(
            os.fspath(log_dir),
            flush_secs=3600,
            filename_suffix=f".{os.getpid()}.{next(_FILE_NUMBERS)}",
        )

    def write(self, step: int, scalars: dict, histograms: dict) -> None:
        """Writes `{tag: float}` scalars and `{tag: array}` histograms at `step`."""
        step = int(step)
        for tag, value in scalars.items():
            if not is_nan(value):
                self._writer.add_scalar(f"{self._prefix}/{tag}", float(value), step)
        for tag, values in _finite_histograms(histograms).items():
            self._writer.add_histogram(
                f"{self._prefix}/{tag}", values, step, bins="tensorflow"
            )

    def flush(self) -> None:
        """Writes the buffered events to disk (the callbacks: every epoch)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TensorBoardWriter:
    """Writes scalars and histograms to TensorBoard event files via `tf.summary`.

    Used on the TensorFlow backend (`tensorboard_writer`); it works on any
    backend where TensorFlow is importable, since the values are NumPy arrays
    computed by the callback. One record's summaries are written by one
    `tf.function` call (traced once per set of tags), not op by op in eager
    mode, which costs about 1-2 ms per summary.

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
        histograms (of the finite values; empty ones skipped) at `step`."""
        tf = self._tf
        scalars = {t: float(v) for t, v in scalars.items() if not is_nan(v)}
        histograms = _finite_histograms(histograms)
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
