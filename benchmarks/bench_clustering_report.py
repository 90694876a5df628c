"""Time and size of the inspection report at C = 3,755 classes, 40 specialists x 150.

CASIA-scale Chinese characters: CJK class names, 64x64 grey examples (6 per
class given, 4 shown), a confusion matrix. Prints seconds and the report's size.

    .venv/bin/python benchmarks/bench_clustering_report.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clustering import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=3_755)
    parser.add_argument("--specialists", type=int, default=40)
    parser.add_argument("--per-specialist", type=int, default=150)
    args = parser.parse_args()
    c = args.classes
    rng = np.random.default_rng(0)
    a = rng.normal(size=(c, 64)) / 8.0
    cov = torch.from_numpy(a @ a.T)  # (C, C) symmetric PSD stand-in
    names = [chr(0x4E00 + i) for i in range(c)]
    sets = [sorted(rng.choice(c, args.per_specialist, replace=False).tolist())
            for _ in range(args.specialists)]
    examples = {i: rng.integers(0, 256, size=(6, 64, 64), dtype=np.uint8) for i in range(c)}
    confusion = rng.poisson(0.05, size=(c, c)) + np.diag(np.full(c, 40))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = write_report(Path(tmp) / "report", cov=cov, class_names=names, class_sets=sets,
                             examples=examples, confusion=confusion, method={"method": "faiss"})
        seconds = time.perf_counter() - t0
        files = [p for p in index.parent.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        largest = max(files, key=lambda p: p.stat().st_size)
        print(f"C = {c:,}, {args.specialists} x {args.per_specialist}: report in {seconds:.1f} s, "
              f"{len(files):,} files, {size / 2**20:.1f} MiB "
              f"(largest {largest.name}: {largest.stat().st_size / 2**10:.0f} KiB)")


if __name__ == "__main__":
    main()
