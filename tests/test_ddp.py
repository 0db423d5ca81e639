"""Synchronized BN on torch: two processes (`torch.distributed`, Gloo, CPU).

tests/_ddp_worker.py runs in two processes on 127.0.0.1; each trains a small
convolutional model (a channels-first and a channels-last keras_bn layer) for
two SGD steps on its half of every batch, averaging the gradients over the
processes as DistributedDataParallel does, and also the one-process reference
on the global batches. With `synchronized=True` the two processes hold
bitwise identical weights, moving statistics and gradients, equal to the
reference (the same float32 sums in another order) within `rtol=1e-6`
(absolute floor `1e-6 * max|ref|`); gradients within the correctness grid's
tolerance for weight gradients, `rtol=1e-5` with a floor `1e-5 * max|ref|`
(a gamma gradient of the second step, a sum that cancels to half its largest
element, differed by 1.7e-6 of max|ref|). With `False` the moving
statistics are each process's own shard's and differ from the reference.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from harness import assert_close

WORKER = Path(__file__).with_name("_ddp_worker.py")
ROOT = WORKER.parents[1]
TIMEOUT_S = 240  # Both processes together; a run took about 30 s on 2 busy cores.

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch.distributed is torch's"
)


def _free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"this platform cannot open local TCP ports: {e}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no Gloo process groups")
    out = tmp_path_factory.mktemp("ddp")
    port = _free_port()
    env = dict(os.environ, KERAS_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs, logs = [], []
    for rank in range(2):
        log = open(out / f"worker{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        cmd = [sys.executable, str(WORKER), str(rank), "2", str(port), str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log))
    deadline = time.monotonic() + TIMEOUT_S
    try:  # A process whose peer died would wait for it until the deadline.
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        tails = "\n".join(
            f"--- worker {i} (exit {c}) ---\n"
            + (out / f"worker{i}.log").read_text()[-4000:]
            for i, c in enumerate(codes)
        )
        pytest.fail(f"workers failed or timed out after {TIMEOUT_S} s:\n{tails}")
    return [dict(np.load(out / f"worker{rank}.npz")) for rank in range(2)]


def _values(saved: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}


def test_synchronized_equals_one_process_on_the_global_batch(results):
    ours = [_values(w, "True/") for w in results]
    reference = _values(results[0], "ref/")
    assert set(ours[0]) == set(ours[1]) == set(reference)
    names = sorted(reference)
    assert sum("moving_mean" in n for n in names) == 2
    assert sum("moving_variance" in n for n in names) == 2
    assert sum(n.startswith("grad") for n in names) == 2 * 8  # 2 steps x 8.
    for name in names:
        np.testing.assert_array_equal(ours[0][name], ours[1][name], err_msg=name)
        if name.startswith("grad"):  # the grid's tolerance for weight gradients
            assert_close(ours[0][name], reference[name], 1e-5, 1e-5, what=name)
        else:
            assert_close(ours[0][name], reference[name], rtol=1e-6, what=name)


def test_unsynchronized_statistics_are_the_shards(results):
    """The check above can fail: without synchronization each process's
    moving statistics come from its own half of the batch."""
    ours = [_values(w, "False/") for w in results]
    reference = _values(results[0], "ref/")
    for name in sorted(reference):
        if "moving" in name:
            gap = np.max(np.abs(ours[0][name] - ours[1][name]))
            assert gap > 1e-3 * np.max(np.abs(reference[name])), name
        else:  # Averaged gradients: the same update in both processes.
            np.testing.assert_array_equal(ours[0][name], ours[1][name], err_msg=name)
