"""`bench_latency`: compare two ONNX files under ONNX Runtime, one thread."""

from __future__ import annotations

import time

import numpy as np

from ._deps import require


def _session(path, threads: int):
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(sess, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    feed = {}
    for i in sess.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        shape[0] = batch
        feed[i.name] = rng.normal(size=shape).astype(np.float32)
    return feed


def latency_ms(
    path, batch: int, *, runs: int = 50, warmup: int = 10, threads: int = 1
) -> float:
    """Median ONNX Runtime latency (ms) of one model on a random float batch."""
    sess = _session(path, threads)
    return session_latency_ms(sess, _feed(sess, batch, 0), runs=runs, warmup=warmup)


def session_latency_ms(sess, feed, *, runs: int = 20, warmup: int = 3) -> float:
    """Median latency (ms) of `sess.run(None, feed)` after `warmup` calls."""
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def bench_latency(
    path_a,
    path_b,
    batch: int = 256,
    *,
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
) -> dict[str, float]:
    """ONNX Runtime latency of two models, interleaved call by call.

    Both sessions get `warmup` calls, then `runs` timed calls each, alternating
    a, b, b, a, ... so that both see the same machine load; the latency of each
    is the median of its timed calls.

    Args:
        path_a: The ONNX file to compare (e.g. folded).
        path_b: The reference ONNX file (e.g. Keras's unfolded export).
        batch: Batch size of the random float32 inputs (same for both).
        runs: Timed calls per model.
        warmup: Untimed calls per model first.
        threads: ONNX Runtime intra-op threads (inter-op is 1).

    Returns:
        `{"a_ms": ..., "b_ms": ..., "speedup": b_ms / a_ms}`.

    Example:

    >>> r = bench_latency("folded.onnx", "keras.onnx", 256)  # doctest: +SKIP
    >>> print(f"folded is {r['speedup']:.2f}x faster")  # doctest: +SKIP
    """
    for name, value in (("batch", batch), ("runs", runs), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"Argument `{name}` must be a positive int. Received: {name}={value!r}"
            )
    sessions = [_session(path_a, threads), _session(path_b, threads)]
    feeds = [_feed(s, batch, 0) for s in sessions]
    a_ms, b_ms = interleaved_latency_ms(sessions, feeds, runs=runs, warmup=warmup)
    return {"a_ms": a_ms, "b_ms": b_ms, "speedup": b_ms / a_ms}


def interleaved_latency_ms(
    sessions, feeds, *, runs: int = 50, warmup: int = 10
) -> list[float]:
    """Median latency (ms) of each session, timed call by call in turn.

    Every session gets `warmup` untimed calls, then `runs` timed calls, in an
    order that alternates (a, b, b, a, ...) so all see the same machine load.
    """
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    times = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for i in range(runs):
        for k in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    return [1e3 * float(np.median(t)) for t in times]


def blocked_latency_ms(make_sessions, feeds, *, blocks=6, rounds=50, warmup=5, seed=0):
    """Per-call latencies (ms) of several ONNX Runtime sessions, interleaved.

    A session's speed depends on where its buffers landed, not only on its
    graph: the same file can time 10-20% apart in two sessions of one process.
    So the sessions are made afresh `blocks` times, in a random order each
    time (`make_sessions(order)` returns them in `order`'s order); in each
    block every session gets `warmup` untimed calls, then `rounds` rounds in
    which each runs once, in a random order.

    Returns:
        An array of shape `(blocks, rounds, len(feeds))`, milliseconds.
    """
    rng = np.random.default_rng(seed)
    n = len(feeds)
    times = np.empty((blocks, rounds, n))
    for b in range(blocks):
        order = rng.permutation(n)
        made = make_sessions(list(order))
        sessions = [None] * n
        for k, s in zip(order, made, strict=True):
            sessions[k] = s
        for s, f in zip(sessions, feeds, strict=True):
            for _ in range(warmup):
                s.run(None, f)
        for r in range(rounds):
            for k in rng.permutation(n):
                t = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times[b, r, k] = 1e3 * (time.perf_counter() - t)
        del made, sessions
    return times


def median_ratio(num, den, *, resamples=2000, seed=0) -> tuple[float, float, float]:
    """Median of the paired ratios `num / den`, with a bootstrap 95% interval.

    `num` and `den` are per-call times of shape `(blocks, rounds)`, paired
    call by call (same block, same round). The interval resamples blocks,
    then rounds within each block (a cluster bootstrap: calls of one block
    share their sessions' luck, so rounds alone would understate the noise).

    Returns:
        `(median, low, high)`.
    """
    ratios = np.asarray(num, np.float64) / np.asarray(den, np.float64)
    blocks, rounds = ratios.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for i in range(resamples):
        pick = ratios[rng.integers(0, blocks, blocks)]
        rows = rng.integers(0, rounds, (blocks, rounds))
        stats[i] = np.median(np.take_along_axis(pick, rows, axis=1))
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(np.median(ratios)), float(low), float(high)
