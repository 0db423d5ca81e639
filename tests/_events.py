"""Reads TensorBoard event files back, whichever writer wrote them.

tf.summary writes scalars and histograms as tensors, tensorboardX as the older
`simple_value` and `histo` protos; `data_compat.migrate_value` (TensorBoard's
own reader step) turns both into tensors. Needs only the `tensorboard` package.
"""

from __future__ import annotations

import pytest


def tensorboard_writer_available() -> None:
    """Skips the test unless this backend's TensorBoard writer is installed."""
    import keras

    pytest.importorskip("tensorboard", reason="reading event files needs tensorboard")
    if keras.backend.backend() == "tensorflow":
        pytest.importorskip("tensorflow", reason="tf.summary needs TensorFlow")
    else:
        pytest.importorskip("tensorboardX", reason="writing events needs tensorboardX")


def read_events(log_dir) -> tuple[dict, set]:
    """`({(tag, step): float}, {(tag, step)})`: scalars and histogram tags."""
    from tensorboard import data_compat
    from tensorboard.backend.event_processing.event_file_loader import (
        EventFileLoader,
    )
    from tensorboard.util import tensor_util

    scalars, histograms = {}, set()
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                value = data_compat.migrate_value(value)
                array = tensor_util.make_ndarray(value.tensor)
                if array.ndim == 0:
                    scalars[(value.tag, event.step)] = float(array)
                else:
                    histograms.add((value.tag, event.step))
    return scalars, histograms
