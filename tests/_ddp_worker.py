"""One process of tests/test_ddp.py: synchronized BN under torch.distributed.

Usage: python _ddp_worker.py RANK WORLD PORT OUT_DIR

Before joining the process group it trains the one-process reference on the
global batch (no group: `cross_replica_sum()` is None); then it joins a Gloo
group on 127.0.0.1 and trains the same model on its shard of every batch, with
`synchronized=True` and `False`, averaging the gradients over the processes
as `torch.nn.parallel.DistributedDataParallel` does. It saves weights, moving
statistics and gradients to OUT_DIR/worker{RANK}.npz.
"""

from __future__ import annotations

import datetime
import os
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import keras_bn  # noqa: E402

STEPS, BATCH, LR = 2, 16, 0.1


def build(synchronized: bool) -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((3, 4, 4)),
            # No bias before BN: its gradient is zero (rounding noise only).
            keras.layers.Conv2D(
                4, 3, padding="same", use_bias=False, data_format="channels_first"
            ),
            keras_bn.BatchNormalization(
                axis=1, momentum=0.5, synchronized=synchronized
            ),
            keras.layers.Activation("tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, use_bias=False),
            keras_bn.BatchNormalization(momentum=0.5, synchronized=synchronized),
            keras.layers.Dense(1),
        ]
    )


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (STEPS, BATCH, 3, 4, 4)).astype("float32")
    y = rng.normal(size=(STEPS, BATCH, 1)).astype("float32")
    return x, y


def train(model, x, y, world: int) -> dict:
    """`STEPS` SGD steps on the given batches; gradients averaged over `world`."""
    saved = {}
    variables = model.trainable_variables
    # Keys by position (layer names differ between the models of a process).
    for step in range(STEPS):
        xb, yb = torch.from_numpy(x[step]), torch.from_numpy(y[step])
        loss = torch.mean((model(xb, training=True) - yb) ** 2)
        grads = torch.autograd.grad(loss, [v.value for v in variables])
        for i, (v, g) in enumerate(zip(variables, grads, strict=True)):
            if world > 1:  # What DDP's gradient hooks do.
                g = g.clone()
                dist.all_reduce(g)
                g = g / world
            saved[f"grad{step}/{i}:{v.name}"] = g.numpy().copy()
            v.assign(v.value - LR * g)
    for i, v in enumerate(model.weights):
        saved[f"{i}:{v.name}"] = keras.ops.convert_to_numpy(v.value).copy()
    return saved


def main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    x, y = data()
    # The reference trains with the kernel, as synchronized layers do (alone, a
    # channels-first layer would take torch's native op: other float32
    # arithmetic, compared with float64 by the correctness grid instead).
    native = keras_bn.backend.fused_train
    keras_bn.backend.fused_train = lambda *args, **kwargs: None
    saved = {f"ref/{k}": v for k, v in train(build(True), x, y, 1).items()}
    keras_bn.backend.fused_train = native
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for sync in (True, False):
        result = train(build(sync), x[:, shard], y[:, shard], world)
        saved.update({f"{sync}/{k}": v for k, v in result.items()})
    dist.barrier()
    dist.destroy_process_group()
    np.savez(os.path.join(out, f"worker{rank}.npz"), **saved)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
