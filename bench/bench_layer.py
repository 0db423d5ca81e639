"""Times one training step (forward + backward) of batch normalization.

Compares `keras_bn.BatchNormalization` with its peers in the same process:

* TensorFlow backend: ours without XLA (the path of `fit` with Keras's
  default `jit_compile="auto"` on a CPU: TensorFlow's fused op for
  channels-last inputs, the kernel as nested XLA functions for channels-first
  ones and for inputs below 2**18 values, such as `--shapes small`) and with
  XLA (our kernel); Keras 3's BatchNormalization with XLA on
  and off; `tf_keras.layers.BatchNormalization` (fused for 4-D inputs; `pip
  install --no-deps tf-keras`); and the fused op alone on a 4-D view, without
  a layer (the floor of the fused path). Ratios are against ours without XLA.
* JAX backend: Keras 3's BatchNormalization, both under `jax.jit`; with
  `--floor`, the bandwidth floor: 8 passes over the tensor (forward: read x
  for the statistics, read x and write y; backward: read x and dy for the
  sums, read x and dy and write dx) at the measured device-to-device copy
  bandwidth.

* torch backend (CPU): keras_bn and Keras 3's BatchNormalization eagerly
  (Keras's default on torch) and under `torch.compile`, and
  `torch.nn.functional.batch_norm` in each layout it can take the data in
  (channels-last data: the `channels_last` memory format or a permuted view,
  a permuted copy, a 2-D view), all peers; `--torch-modes eager` skips the
  compiled candidates.

A step is: y = layer(x, training=True) with the moving statistics updated,
and the gradients of <y, dy> w.r.t. x, gamma and beta; y and the gradients
are all outputs of the step, so no candidate can skip computing y. Reported: median (and
min) over `--repeats` timed runs of `--inner` steps each, after warm-up, the
candidates' runs interleaved. A second table gives, per shape, each keras_bn
row's time over the fastest peer's (any mode; the fused op alone and the
floor are not peers) and over the fastest peer compiled the same way (XLA,
`jax.jit` or `torch.compile`, or not): 1.00 or less means no slower.

    KERAS_BACKEND=tensorflow python bench/bench_layer.py            # CPU table
    KERAS_BACKEND=jax python bench/bench_layer.py
    KERAS_BACKEND=torch python bench/bench_layer.py --shapes cpu,nd
    KERAS_BACKEND=jax python bench/bench_layer.py --shapes gpu --floor \
        --dtypes float32,bfloat16 --peers flax,torch --inner 20 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

PEERS: set[str] = set()
MODES: set[str] = set()
SHAPES = {
    "cpu": [((32, 56, 56, 64), -1), ((32, 64, 56, 56), 1), ((256, 1024), -1)],
    "gpu": [((256, 56, 56, 64), -1), ((256, 14, 14, 512), -1), ((8192, 4096), -1)],
    "small": [((8, 12, 12, 16), -1), ((8, 16, 12, 12), 1), ((64, 128), -1)],
    # 5-D and 3-D, each channels-last and its channels-first twin.
    "nd": [
        ((8, 16, 28, 28, 32), -1),
        ((8, 32, 16, 28, 28), 1),
        ((64, 512, 64), -1),
        ((64, 64, 512), 1),
    ],
}


def _time(fn, repeats: int, inner: int, sync) -> tuple[float, float]:
    for _ in range(3):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), min(times)


def _time_alternated(cands: dict, repeats: int, inner: int, sync) -> dict:
    """`_time` for every candidate, their timed runs interleaved.

    Each repeat runs every candidate once, in turn, so that a slow phase of a
    shared machine hits all of them alike; returns name -> (median, min,
    median CPU time). The CPU time (`time.process_time`: all threads of the
    process) is the work done, the least sensitive to other processes on a
    shared machine; the wall time is the latency, the measure on a quiet one.
    """
    for fn in cands.values():
        for _ in range(3):
            sync(fn())
    times = {name: [] for name in cands}
    cpu = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                out = fn()
            sync(out)
            times[name].append((time.perf_counter() - t0) / inner)
            cpu[name].append((time.process_time() - c0) / inner)
    return {
        n: (statistics.median(t), min(t), statistics.median(cpu[n]))
        for n, t in times.items()
    }


def _tf_step_fn(layer, jit):
    """Forward and backward in one `tf.function`, as in `fit`'s train step.

    Under XLA an optimization barrier makes dy available only after y exists
    (see `_jax_step`); without XLA the ops run one by one and need none.
    """
    import tensorflow as tf

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        out = y
        if jit:  # outside the tape: the barrier has no gradient
            from tensorflow.compiler.tf2xla.python import xla

            out, dy = xla.optimization_barrier(y, dy)
        grads = tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)
        return out, grads

    return tf.function(step, jit_compile=jit)


def _tf_fused_op_step(x, dy, axis, transpose=False):
    """`tf.compat.v1.nn.fused_batch_norm` on a 4-D view, without a layer.

    The floor for the fused no-XLA path: the op and its registered gradient
    only, no moving-average update; 2-D input as `(N, 1, 1, C)`. With
    `transpose`, NCHW data goes through the op as NHWC, transposed there and
    back (the gradient too): the alternative to keras_bn's channels-first path.
    """
    import tensorflow as tf

    rank = len(x.shape)
    fmt = "NCHW" if axis == 1 and rank == 4 else "NHWC"
    c = x.shape[axis]
    view = x.shape if rank == 4 else (-1, 1, 1, c)
    scale, offset = tf.Variable(tf.ones(c)), tf.Variable(tf.zeros(c))

    def op(x4):
        if not (transpose and fmt == "NCHW"):
            return tf.compat.v1.nn.fused_batch_norm(
                x4, scale, offset, epsilon=1e-3, data_format=fmt
            )[0]
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            tf.transpose(x4, (0, 2, 3, 1)), scale, offset, epsilon=1e-3
        )
        return tf.transpose(y, (0, 3, 1, 2))

    @tf.function(jit_compile=False)
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reshape(op(tf.reshape(x, view)), tf.shape(x))
        return y, tape.gradient(y, [x, scale, offset], output_gradients=dy)

    return lambda: step(x, dy)


def _tf_candidates(shape, axis, dtype):
    import keras
    import tensorflow as tf

    import keras_bn

    x = tf.random.normal(shape, seed=1, dtype=dtype)
    dy = tf.random.normal(shape, seed=2, dtype=dtype)

    def step_fn(layer, jit):
        layer.build(shape)
        step = _tf_step_fn(layer, jit)
        return lambda: step(x, dy)

    policy = "mixed_bfloat16" if dtype == "bfloat16" else dtype
    cands = {
        "keras_bn (no XLA)": step_fn(
            keras_bn.BatchNormalization(axis=axis, dtype=policy), False
        ),
        "keras_bn (XLA)": step_fn(
            keras_bn.BatchNormalization(axis=axis, dtype=policy), True
        ),
        "Keras 3 BN (XLA)": step_fn(
            keras.layers.BatchNormalization(axis=axis, dtype=policy), True
        ),
        "Keras 3 BN (no XLA)": step_fn(
            keras.layers.BatchNormalization(axis=axis, dtype=policy), False
        ),
    }
    try:
        import tf_keras

        layer = tf_keras.layers.BatchNormalization(axis=axis)
        layer.build(tf.TensorShape(shape))

        step = _tf_step_fn(layer, False)

        fused = "fused" if getattr(layer, "fused", False) else "not fused"
        cands[f"tf_keras BN ({fused})"] = lambda: step(x, dy)
    except ImportError:
        print("tf_keras not installed: pip install --no-deps tf-keras")
    cands["fused op alone (no XLA)"] = _tf_fused_op_step(x, dy, axis)
    if axis == 1 and len(shape) == 4:
        cands["fused op alone, via NHWC transposes (no XLA)"] = _tf_fused_op_step(
            x, dy, axis, transpose=True
        )

    def sync(out):
        for t in tf.nest.flatten(out):
            t.numpy()

    return cands, sync, x


def _jax_step(f, x, params, dy):
    """Forward and backward in one executable, ordered as in a network.

    An optimization barrier makes dy available only after y is computed, as
    when dy comes from later layers; without it XLA may fuse the forward's
    output pass with the backward's reduction (both read x), which no real
    network allows.
    """
    import jax
    import jax.numpy as jnp

    @jax.jit
    def step(x, params, dy):
        (y, aux), vjp = jax.vjp(f, x, params)
        y, dy = jax.lax.optimization_barrier((y, dy))
        zeros = jax.tree_util.tree_map(jnp.zeros_like, aux)
        return y, aux, vjp((dy, zeros))

    return lambda: step(x, params, dy)


def _jax_candidates(shape, axis, dtype):
    import jax
    import keras

    import keras_bn

    kx, kd = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, shape, dtype=dtype)
    dy = jax.random.normal(kd, shape, dtype=dtype)
    policy = "mixed_bfloat16" if dtype == "bfloat16" else dtype

    def step_fn(layer):
        layer.build(shape)
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def f(x, tv):
            return layer.stateless_call(tv, ntv, x, training=True)

        return _jax_step(f, x, tv, dy)

    cands = {
        "keras_bn (jit)": step_fn(keras_bn.BatchNormalization(axis=axis, dtype=policy)),
        "Keras 3 BN (jit)": step_fn(
            keras.layers.BatchNormalization(axis=axis, dtype=policy)
        ),
    }

    if "flax" in PEERS:
        cands.update(_flax_candidate(shape, axis, dtype, x, dy))
    if "torch" in PEERS:
        cands.update(_torch_candidate(shape, axis, dtype))

    def sync(out):
        if isinstance(out, str):  # torch steps return a tag; sync the device
            import torch

            torch.cuda.synchronize()
        else:
            jax.block_until_ready(out)

    return cands, sync, x


def _flax_candidate(shape, axis, dtype, x, dy):
    try:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("flax not installed: skipping the Flax peer")
        return {}
    bn = nn.BatchNorm(
        use_running_average=False,
        axis=axis,
        momentum=0.99,
        epsilon=1e-3,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.float32,
    )
    variables = bn.init(jax.random.PRNGKey(0), x)
    params, stats = variables["params"], variables["batch_stats"]

    def f(x, p):
        return bn.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])

    return {"Flax linen BN (jit)": _jax_step(f, x, params, dy)}


def _torch_candidate(shape, axis, dtype):
    try:
        import torch
    except ImportError:
        print("torch not installed: skipping the PyTorch peer")
        return {}
    if not torch.cuda.is_available():
        print("torch has no CUDA device: skipping the PyTorch peer")
        return {}
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    c = shape[axis]
    if len(shape) == 4:
        # NHWC data as a channels_last NCHW tensor (what cuDNN's NHWC BN takes).
        n, h, w = (
            (shape[0], shape[1], shape[2])
            if axis == -1
            else (shape[0], shape[2], shape[3])
        )

        def make():
            t = torch.randn(n, c, h, w, device="cuda", dtype=tdtype)
            return t.to(memory_format=torch.channels_last)

        bn = torch.nn.BatchNorm2d(c, eps=1e-3, momentum=0.01).cuda()
    else:

        def make():
            return torch.randn(shape[0], c, device="cuda", dtype=tdtype)

        bn = torch.nn.BatchNorm1d(c, eps=1e-3, momentum=0.01).cuda()
    x = make().requires_grad_()
    dy = make()

    def step():
        x.grad = None
        bn.zero_grad(set_to_none=True)
        bn(x).backward(dy)
        return "torch"

    label = "PyTorch BN (cuDNN, channels_last)" if len(shape) == 4 else "PyTorch BN1d"
    return {label: step}


def _torch_candidates(shape, axis, dtype):
    """Eager steps and `torch.compile`d ones (Inductor), on the CPU.

    A layer's step: `y = layer(x, training=True)` (which updates the moving
    statistics in place), then `torch.autograd.grad` of `<y, dy>` w.r.t. x,
    gamma and beta. Compiled: the layer's call under `torch.compile` (as
    `jit_compile=True` runs `fit`'s step; its backward is compiled with it by
    AOTAutograd), compiled on the warm-up runs, which are not timed.
    The peer `torch.nn.functional.batch_norm` (with running statistics) takes
    channels-first data as it is; channels-last data in each layout it can:
    as a permuted view (for 4-D and 5-D the `channels_last` memory formats,
    no copy), as a contiguous permuted copy, and as a 2-D `(-1, C)` view.
    """
    import keras
    import torch
    import torch.nn.functional as F

    import keras_bn

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=tdtype).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=tdtype)
    rank, c = len(shape), shape[axis]
    policy = "mixed_bfloat16" if dtype == "bfloat16" else dtype

    def step_fn(layer, compiled):
        layer.build(shape)
        params = [v.value for v in layer.trainable_weights]

        def fwd(x):
            return layer(x, training=True)

        if compiled:
            fwd = torch.compile(fwd)

        def step():
            y = fwd(x)
            return y, torch.autograd.grad(y, [x, *params], grad_outputs=dy)

        return step

    def native(to, back):
        weight = torch.ones(c, requires_grad=True)
        bias = torch.zeros(c, requires_grad=True)
        running = (torch.zeros(c), torch.ones(c))

        def step():
            y = F.batch_norm(
                to(x), *running, weight, bias, training=True, momentum=0.01, eps=1e-3
            )
            y = back(y)
            return y, torch.autograd.grad(y, [x, weight, bias], grad_outputs=dy)

        return step

    cands = {
        "keras_bn (eager)": step_fn(
            keras_bn.BatchNormalization(axis=axis, dtype=policy), False
        ),
        "Keras 3 BN (eager)": step_fn(
            keras.layers.BatchNormalization(axis=axis, dtype=policy), False
        ),
    }
    if axis % rank == rank - 1 and rank > 2:
        first = (0, rank - 1, *range(1, rank - 1))
        last = (0, *range(2, rank), 1)
        view = "channels_last" if rank in (4, 5) else "permuted"
        cands[f"F.batch_norm ({view} view)"] = native(
            lambda t: t.permute(first), lambda t: t.permute(last)
        )
        cands["F.batch_norm (permuted copy)"] = native(
            lambda t: t.permute(first).contiguous(), lambda t: t.permute(last)
        )
        cands["F.batch_norm (2-D view)"] = native(
            lambda t: t.reshape(-1, c), lambda t: t.reshape(shape)
        )
    else:
        cands["F.batch_norm"] = native(lambda t: t, lambda t: t)
    if "compile" in MODES:
        cands["keras_bn (torch.compile)"] = step_fn(
            keras_bn.BatchNormalization(axis=axis, dtype=policy), True
        )
        cands["Keras 3 BN (torch.compile)"] = step_fn(
            keras.layers.BatchNormalization(axis=axis, dtype=policy), True
        )

    def sync(out):  # CPU: the step's tensors are computed when it returns
        return out

    return cands, sync, x


def _copy_floor(x, repeats, inner):
    """8 passes over x at the copy bandwidth measured on x itself (JAX, warm).

    The copy is `x + 1` (one read and one write of x, which XLA cannot elide);
    its best time over the repeats gives the bandwidth, so the floor is the
    lowest, strictest one.
    """
    import jax

    copy = jax.jit(lambda v: v + 1)
    _, t = _time(lambda: copy(x), repeats, inner, jax.block_until_ready)
    nbytes = x.size * x.dtype.itemsize
    bandwidth = 2 * nbytes / t
    return 8 * nbytes / bandwidth, bandwidth


def _is_ours(name: str) -> bool:
    return name.startswith("keras_bn (")


def _is_peer(name: str) -> bool:
    return not _is_ours(name) and not name.startswith(("fused op alone", "floor"))


def _compiled(name: str) -> bool:
    return "(XLA)" in name or "(jit)" in name or "(torch.compile)" in name


def peer_ratios(results: dict) -> list[tuple]:
    """Per keras_bn row: `(ours, peer, ratio, same-mode peer, ratio)`.

    `results` maps candidate names to `(median, ...)` seconds; ratios are of
    the medians, ours over the peer's (None where there is no such peer).
    """
    peers = {n: v[0] for n, v in results.items() if _is_peer(n)}
    rows = []
    for name, (med, *_) in results.items():
        if not _is_ours(name):
            continue
        row = [name]
        for pool in (
            peers,
            {n: t for n, t in peers.items() if _compiled(n) == _compiled(name)},
        ):
            best = min(pool, key=pool.get) if pool else None
            row += [best, med / pool[best] if best else None]
        rows.append(tuple(row))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes",
        default="cpu",
        help=f"comma-separated shape sets: {sorted(SHAPES)}",
    )
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=1)
    parser.add_argument("--floor", action="store_true", help="JAX: bandwidth floor")
    parser.add_argument(
        "--peers", default="", help="JAX: extra peers, comma-separated: flax,torch"
    )
    parser.add_argument(
        "--torch-modes",
        default="eager,compile",
        help="torch: the modes timed, comma-separated: eager,compile",
    )
    args = parser.parse_args(argv)
    MODES.update(m for m in args.torch_modes.split(",") if m)
    PEERS.update(p for p in args.peers.split(",") if p)
    shapes = []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"--shapes: {name!r} is not one of {sorted(SHAPES)}")
        shapes += SHAPES[name]

    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        make = _tf_candidates
    elif backend == "torch":
        make = _torch_candidates
        import torch

        print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    elif backend == "jax":
        make = _jax_candidates
        import jax

        print(f"devices: {jax.devices()}")
    else:
        raise SystemExit(f"unsupported backend {backend!r}")
    print(
        f"backend={backend} keras={keras.__version__} machine={platform.machine()} "
        f"cpus={os.cpu_count()} repeats={args.repeats} inner={args.inner}"
    )
    print(
        "| shape | axis | dtype | candidate | median ms | min ms | median CPU ms | "
        "its time / ours |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for dtype in args.dtypes.split(","):
        for shape, axis in shapes:
            cands, sync, x = make(shape, axis, dtype)
            results = _time_alternated(cands, args.repeats, args.inner, sync)
            if args.floor and backend == "jax":
                floor, bw = _copy_floor(x, args.repeats, max(args.inner, 10))
                results[f"floor (8 passes @ {bw / 1e9:.0f} GB/s)"] = (
                    floor,
                    floor,
                    None,
                )
            ours = next(v for k, v in results.items() if _is_ours(k))
            for name, (med, best, cpu) in results.items():
                ratio = med / ours[0]
                cpu = "-" if cpu is None else f"{cpu * 1e3:.3f}"
                print(
                    f"| {shape} | {axis} | {dtype} | {name} | {med * 1e3:.3f} | "
                    f"{best * 1e3:.3f} | {cpu} | {ratio:.2f}x |"
                )
            summary += [(shape, axis, dtype, *r) for r in peer_ratios(results)]
    print()
    print(
        "| shape | axis | dtype | ours | fastest peer | ours / it | "
        "fastest peer, same mode | ours / it |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape, axis, dtype, ours, peer, ratio, same, same_ratio in summary:
        cells = [
            f"{p} | {r:.2f}" if p else "- | -"
            for p, r in ((peer, ratio), (same, same_ratio))
        ]
        print(f"| {shape} | {axis} | {dtype} | {ours} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
