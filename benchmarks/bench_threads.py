"""Two training jobs on one machine: each with every core's worth of threads, or a share each.

Each job trains compact_cnn (Fashion-MNIST shape: width 32, batch 128 of 1×28×28,
channels_last) on in-memory batches for --seconds and reports steps/s. Four settings, all
measured in one run, every job in its own process:

    alone, T threads         one job, torch's default (all cores)
    alone, 1 thread
    two jobs, T threads each what two stages or two runs did before `threads` existed
    two jobs, T/2 threads    what `threads: 0` (auto) gives each of two jobs started alike

Printed: steps/s of each job and their sum, and the ratio of the summed throughput of the
shared setting to the oversubscribed one (OpenMP threads spin-wait for each other when there
are more runnable threads than cores). On a machine shared with other work the ratios are what
that load allowed; the command line is in docs/RESULTS.md.

    .venv/bin/python benchmarks/bench_threads.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def job(threads: int, seconds: float) -> float:
    """Steps/s of compact_cnn training on one in-memory batch for ``seconds`` (after 3 warm-up steps)."""
    from specialists.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("compact_cnn", num_classes=10, in_channels=1, image_size=28, width=32)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps / (time.perf_counter() - start)


def run_jobs(threads: int, count: int, seconds: float) -> list[float]:
    """Start ``count`` jobs at once, each in its own process; their steps/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, __file__, "--job", str(threads), "--seconds", str(seconds)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=0, help="T (default: the cores available)")
    parser.add_argument("--job", type=int, help=argparse.SUPPRESS)  # child: threads
    args = parser.parse_args()
    if args.job is not None:
        print(json.dumps(job(args.job, args.seconds)))
        return
    cores = len(os.sched_getaffinity(0))
    t = args.threads or cores
    half = max(1, t // 2)
    print(f"{cores} cores available; torch {torch.__version__}; {args.seconds:.0f} s per setting")
    rows = [(f"alone, {t} threads", t, 1), ("alone, 1 thread", 1, 1),
            (f"two jobs, {t} threads each", t, 2), (f"two jobs, {half} thread(s) each", half, 2)]
    total = {}
    for label, threads, count in rows:
        rates = run_jobs(threads, count, args.seconds)
        total[label] = sum(rates)
        each = ", ".join(f"{r:.1f}" for r in rates)
        print(f"{label:28s} steps/s {each:>14s}   sum {sum(rates):6.1f}")
    over, shared = total[rows[2][0]], total[rows[3][0]]
    print(f"two jobs: {half} thread(s) each / {t} threads each = {shared / over:.2f}x the summed steps/s")


if __name__ == "__main__":
    main()
