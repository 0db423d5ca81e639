"""Runs the Inception protocol (`examples/inception_mnist.py`) as parallel jobs.

The protocol's runs are independent once the Baseline's learning rate is
known, so this driver runs them as separate single-threaded processes, at
most `--workers` at a time, each writing its own folder under
`OUT/jobs/`: first the lr sweep (all its learning rates at once), then,
at the lr it chose, every other Table 2 run and ablation arm over the seeds.
Finally it merges every job folder into `OUT` (`--merge`), which writes
`OUT/results.md`, `runs.csv`, `curves.csv` and `curves.png`. Resumable: a job
whose folder already records its run is skipped by the protocol itself.

    KERAS_BACKEND=jax python scripts/inception_jobs.py --out runs/inception \
        --workers 2 -- --width 8 --cap 30000 --window 4000 --eval-every 250 \
        --eval-size 5000 --smooth 4

Arguments after `--` are passed to every job (network size, cap, windows).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "inception_mnist.py"
TABLE2 = ["Baseline", "BN", "BN-x5", "BN-x30", "BN-x5-Sigmoid", "Baseline-Sigmoid"]
ABLATION = [
    "BN-x5+dropout",
    "BN-x5+L2",
    "BN-x5-same-batches",
    "BN-lr-x5-only",
    "BN-x5-slow-decay",
]


def _run_all(jobs: list[tuple[str, list[str]]], workers: int, env: dict) -> None:
    """Runs `(folder, args)` jobs, at most `workers` at a time; fails on any error."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < workers:
            folder, args = pending.pop(0)
            Path(folder).mkdir(parents=True, exist_ok=True)
            log = open(Path(folder) / "log.txt", "a")
            cmd = [sys.executable, str(SCRIPT), "--out", folder, "--no-plot", *args]
            print(time.strftime("%H:%M:%S"), "start", folder, flush=True)
            running.append(
                (folder, subprocess.Popen(cmd, stdout=log, stderr=log, env=env), log)
            )
        time.sleep(5)
        for item in list(running):
            folder, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(
                    time.strftime("%H:%M:%S"),
                    "done",
                    folder,
                    proc.returncode,
                    flush=True,
                )
                if proc.returncode:
                    raise SystemExit(f"job {folder} failed; see {folder}/log.txt")


def _best(folder: Path) -> tuple[float, float]:
    with open(folder / "runs.csv", newline="") as f:
        (run,) = list(csv.DictReader(f))
    return float(run["best_accuracy"]), float(run["lr"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--configs", nargs="+", default=TABLE2)
    parser.add_argument("--ablation", nargs="*", default=ABLATION)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = [a for a in args.rest if a != "--"]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1",
        "OMP_NUM_THREADS": "1",
    }
    jobs_dir = args.out / "jobs"
    seed0 = str(args.seeds[0])
    sweep = [
        (
            str(jobs_dir / f"sweep_lr{lr:g}"),
            ["--seeds", seed0, "--sweep", str(lr), "--configs", *rest],
        )
        for lr in args.sweep
    ]
    _run_all(sweep, max(args.workers, len(sweep)), env)
    best = max((_best(Path(folder)) for folder, _ in sweep), key=lambda b: b[0])
    lr = best[1]
    print(f"Baseline lr chosen by the sweep: {lr:g}", flush=True)
    jobs = []
    for seed in args.seeds:
        for name in args.configs:
            if name == "Baseline" and seed == args.seeds[0]:
                continue  # the sweep's run at the chosen lr
            jobs.append(
                (
                    str(jobs_dir / f"{name}_s{seed}"),
                    ["--seeds", str(seed), "--lr", str(lr), "--configs", name, *rest],
                )
            )
        for name in args.ablation:
            jobs.append(
                (
                    str(jobs_dir / f"{name}_s{seed}"),
                    [
                        "--seeds",
                        str(seed),
                        "--lr",
                        str(lr),
                        "--configs",
                        "--ablation",
                        name,
                        *rest,
                    ],
                )
            )
    # Longest first (Baselines are also the targets), the short fast-decay last.
    order = ["Baseline", "BN", "BN-lr-x5-only", "BN-x5-slow-decay", "Baseline-Sigmoid"]
    jobs.sort(
        key=lambda j: next(
            (i for i, n in enumerate(order) if Path(j[0]).name.startswith(n + "_s")),
            len(order),
        )
    )
    _run_all(jobs, args.workers, env)
    folders = [f for f, _ in sweep] + [f for f, _ in jobs]
    # The forwarded `--smooth` (as `--smooth 4` or `--smooth=4`), for the merge.
    forwarded = argparse.ArgumentParser(add_help=False)
    forwarded.add_argument("--smooth")
    smooth = forwarded.parse_known_args(rest)[0].smooth
    merge = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(args.out),
        "--seeds",
        *map(str, args.seeds),
        "--lr",
        str(lr),
        "--merge",
        *folders,
    ]
    if smooth:
        merge += ["--smooth", smooth]
    return subprocess.call(merge)


if __name__ == "__main__":
    sys.exit(main())
