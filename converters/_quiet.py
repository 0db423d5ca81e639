"""Capture of the Python-side noise that converters print.

TensorFlow, tf2onnx, absl, torch.onnx and jax2onnx report through Python
`logging` (absl's handler sits on the root logger; `tf.get_logger()` is the
`"tensorflow"` logger with its own handler), through `warnings`
(deprecations), and by printing. `captured` routes all three into a list
for the duration of a conversion. TensorFlow's C++ logs are written by C++
to the process's stderr and are controlled by `TF_CPP_MIN_LOG_LEVEL`, which
TensorFlow reads once, when it is first imported: the command line sets it
before importing TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

# Loggers that own handlers (and so print even when the root logger is
# quiet), besides the root logger itself.
LOGGERS = (
    "",
    "tensorflow",
    "tf2onnx",
    "absl",
    "torch",
    "torch.onnx",
    "torch._dynamo",
    "torch.export",
    "jax",
    "jax2onnx",
    "onnxscript",
    "onnx_ir",
    "py.warnings",
)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.NOTSET)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append(f"{record.levelname}:{record.name}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a bad log record must not break export
            self.sink.append(f"{record.levelname}:{record.name}: {record.msg!r}")


@contextlib.contextmanager
def captured(sink: list[str], verbose: bool = False) -> Iterator[list[str]]:
    """Collects logs, warnings and prints into `sink` (`verbose`: lets them
    through instead, and collects nothing)."""
    if verbose:
        yield sink
        return
    handler = _ListHandler(sink)
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            warnings.simplefilter("always")
            yield sink
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        for w in caught if "caught" in locals() else ():
            sink.append(f"{w.category.__name__}: {w.message}")
        for stream in (out, err):
            sink.extend(line for line in stream.getvalue().splitlines() if line)
