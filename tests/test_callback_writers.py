"""Tests of the callbacks' CSV and TensorBoard writers (any backend)."""

from __future__ import annotations

import csv
import sys

import keras
import numpy as np
import pytest

from keras_bn.callbacks._writers import (
    CsvWriter,
    TensorBoardWriter,
    TensorBoardXWriter,
    tensorboard_writer,
)
from tests._events import read_events

COLUMNS = ("step", "layer", "p50")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("existing", [None, "", "step,layer,p50\n0,d,0.5\n"])
def test_csv_new_empty_or_same_header_appends(tmp_path, existing):
    path = tmp_path / "sub" / "s.csv"
    if existing is not None:
        path.parent.mkdir()
        path.write_text(existing)
    writer = CsvWriter(path, COLUMNS)
    writer.write([{"step": 7, "layer": "d", "p50": 0.25}])
    writer.close()
    before = _rows(path)
    assert before[0] == list(COLUMNS) and before[-1] == ["7", "d", "0.25"]
    assert len(before) == (3 if existing and existing.strip() else 2)


@pytest.mark.parametrize(
    "header", ["step,layer,p15,p50\n", "layer,step,p50\n", "garbage\n"]
)
def test_csv_other_header_raises_and_leaves_the_file(tmp_path, header):
    path = tmp_path / "s.csv"
    path.write_text(header + "1,2,3\n")
    with pytest.raises(ValueError, match=r"s\.csv.*header.*another `csv_path`"):
        CsvWriter(path, COLUMNS)
    assert path.read_text() == header + "1,2,3\n"


def _write(writer):
    scalars = {"a/x": 1.5, "a/nan": float("nan"), "b/y": -2.0}
    histograms = {
        "a/h": np.array([0.0, 1.0, np.nan, np.inf, 2.0]),
        "a/empty": np.array([]),
        "a/only_nan": np.array([np.nan]),
    }
    for step in (3, 8):
        writer.write(step, scalars, histograms)
    writer.flush()
    writer.close()


@pytest.mark.parametrize("cls", [TensorBoardWriter, TensorBoardXWriter])
def test_tensorboard_writers_write_the_same_tags(tmp_path, cls):
    pytest.importorskip("tensorboard", reason="reading event files needs it")
    if cls is TensorBoardWriter:
        pytest.importorskip("tensorflow", reason="tf.summary needs TensorFlow")
    else:
        pytest.importorskip("tensorboardX", reason="the writer needs tensorboardX")
    _write(cls(tmp_path, "pre"))
    scalars, histograms = read_events(tmp_path)
    assert scalars == {
        ("pre/a/x", 3): 1.5,
        ("pre/b/y", 3): -2.0,
        ("pre/a/x", 8): 1.5,
        ("pre/b/y", 8): -2.0,
    }
    assert histograms == {("pre/a/h", 3), ("pre/a/h", 8)}


@pytest.mark.parametrize("cls", [TensorBoardWriter, TensorBoardXWriter])
def test_writers_opened_in_the_same_second_keep_every_file(tmp_path, cls, monkeypatch):
    """Two short `fit`s open two writers in one second: both files stay."""
    pytest.importorskip("tensorboard", reason="reading event files needs it")
    if cls is TensorBoardWriter:
        pytest.importorskip("tensorflow", reason="tf.summary needs TensorFlow")
    else:
        pytest.importorskip("tensorboardX", reason="the writer needs tensorboardX")
    import time

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # one second
    for step in (3, 8):
        writer = cls(tmp_path, "pre")
        writer.write(step, {"a/x": float(step)}, {})
        writer.close()
    scalars, _ = read_events(tmp_path)
    assert scalars == {("pre/a/x", 3): 3.0, ("pre/a/x", 8): 8.0}


def test_writer_follows_the_backend(tmp_path):
    if keras.backend.backend() == "tensorflow":
        pytest.importorskip("tensorflow")
        expected = TensorBoardWriter
    else:
        pytest.importorskip("tensorboardX", reason="the writer needs tensorboardX")
        expected = TensorBoardXWriter
    writer = tensorboard_writer(tmp_path, "pre")
    try:
        assert type(writer) is expected
    finally:
        writer.close()


def test_missing_tensorboardx_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ModuleNotFoundError, match="pip install tensorboardX"):
        TensorBoardXWriter(tmp_path, "pre")
