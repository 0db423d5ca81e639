"""Synchronized BN under torch.distributed: data-parallel training on the CPU.

Trains a small conv net on synthetic images with 2 processes (Gloo, on
127.0.0.1), each on its half of every global batch, once with
`synchronized=True` (statistics of the global batch, summed over the
processes with `torch.distributed.all_reduce`) and once with `False` (each
process's half). The gradients are averaged over the processes after each
backward pass, as `torch.nn.parallel.DistributedDataParallel` does. At the end
it prints each process's moving mean of the first BN layer: equal across the
processes with `synchronized=True`, different without.

    python examples/distributed_torch.py
    torchrun --nproc-per-node 2 examples/distributed_torch.py

Started without `torchrun`, it spawns the processes itself.
"""

from __future__ import annotations

import argparse
import os
import socket

os.environ["KERAS_BACKEND"] = "torch"


def build(synchronized: bool):
    import keras

    import keras_bn

    keras.utils.set_random_seed(0)  # the same initial weights in every process
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, use_bias=False),
            keras_bn.BatchNormalization(synchronized=synchronized),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ]
    )


def train(rank: int, world: int, synchronized: bool, steps: int, batch: int):
    import keras
    import numpy as np
    import torch
    import torch.distributed as dist

    model = build(synchronized)
    variables = model.trainable_variables
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(1)  # the same global batches everywhere
    per_process = batch // world
    for _ in range(steps):
        x = rng.normal(2.0, 3.0, (batch, 16, 16, 3)).astype("float32")
        y = rng.integers(0, 4, batch)
        part = slice(rank * per_process, (rank + 1) * per_process)
        xb, yb = torch.from_numpy(x[part]), torch.from_numpy(y[part])
        loss = loss_fn(yb, model(xb, training=True))
        grads = torch.autograd.grad(loss, [v.value for v in variables])
        for g in grads:  # What DistributedDataParallel's hooks do.
            dist.all_reduce(g)
            g /= world
        optimizer.apply(grads, variables)
    return keras.ops.convert_to_numpy(model.layers[1].moving_mean)


def run(rank: int, world: int, steps: int, batch: int) -> None:
    import numpy as np
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    for synchronized in (True, False):
        mean = train(rank, world, synchronized, steps, batch)
        print(
            f"synchronized={synchronized!s:5} process {rank}: moving mean "
            f"{np.array2string(mean[:4], precision=5)}",
            flush=True,
        )
        dist.barrier()
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, steps: int, batch: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(rank, world, steps, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        run(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            args.steps,
            args.batch,
        )
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = args.processes
    mp.spawn(_spawned, args=(world, port, args.steps, args.batch), nprocs=world)


if __name__ == "__main__":
    main()
