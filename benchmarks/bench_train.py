"""Training throughput (images/s): forward + backward + SGD step on in-memory batches.

    python benchmarks/bench_train.py                  # compact_cnn and resnet18, 28×28, CPU
    python benchmarks/bench_train.py --device cuda    # + AMP (bf16) and channels_last variants

Each figure is printed with its ratio to the first row (compact_cnn, contiguous, fp32),
measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from specialists.models import create_model


def throughput(arch: str, *, device: str, batch: int, size: int, channels: int, channels_last: bool, amp: bool,
               steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=channels, image_size=size).to(device)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", default="compact_cnn,resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch}, {args.channels}×{args.size}×{args.size}, median of {args.steps} steps")
    variants = [(False, False), (True, False)] + ([(True, True)] if device == "cuda" else [])
    base = None
    print(f"{'arch':12s} {'channels_last':>13s} {'amp':>5s} {'images/s':>10s} {'ratio':>7s}")
    for arch in args.archs.split(","):
        for channels_last, amp in variants:
            rate = throughput(arch, device=device, batch=args.batch, size=args.size, channels=args.channels,
                              channels_last=channels_last, amp=amp, steps=args.steps)
            base = base or rate
            print(f"{arch:12s} {channels_last!s:>13s} {amp!s:>5s} {rate:10,.0f} {rate / base:6.2f}x")


if __name__ == "__main__":
    main()
