"""Time and size of the evaluation report at C = 3,755 classes, 40 specialists x 150, 30,040 test images.

Shaped like the typefaces run: synthetic shards of 3,755 classes (8 test images per class; example
images come from their by-class shards, as in a real run), a generalist right on ~92% of the test
images, an ensemble and a control that each fix and break a few hundred of them (errors between
classes of one set), overlapping sets, routing by the generalist's top-1. The metrics are computed
by the evaluation's own code and the report is written by the same call as ``specialists evaluate``.
Prints seconds and the report's size.

    .venv/bin/python benchmarks/bench_evaluation_report.py [--shards DIR] [--run DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from clustering import describe_method
from specialists.artifacts.clusters import write_clusters
from specialists.artifacts.metrics import write_metrics
from specialists.artifacts.predictions import write_predictions
from specialists.artifacts.shard_index import ShardIndex
from specialists.config import SyntheticConfig, load_config
from specialists.data.prepare import prepare
from specialists.evaluation import BASELINE, Records, compute_metrics
from specialists.layout import RunLayout
from specialists.reports.evaluation import write_evaluation_report


def synthetic_run(run: Path, index: ShardIndex, num_specialists: int, per_set: int, seed: int = 0) -> None:
    """metrics-test.json, predictions-test.npz and clusters.json of a made-up evaluation of ``index``'s test split."""
    rng = np.random.default_rng(seed)
    c = index.num_classes
    label = np.concatenate([np.full(int(n), k) for k, n in enumerate(index.class_counts("test"))])
    sets = [np.sort(rng.choice(c, per_set, replace=False)) for _ in range(num_specialists)]
    holder = np.full(c, -1)
    for m, s in enumerate(sets):
        holder[s[holder[s] < 0]] = m
    look_alike = np.array([rng.choice(sets[h]) if h >= 0 else rng.integers(c) for h in holder])  # (C,)

    def answers(accuracy: float) -> np.ndarray:
        wrong = rng.random(len(label)) > accuracy
        return np.where(wrong, look_alike[label], label)

    gen = answers(0.92)
    preds = {BASELINE: gen}
    for name, flips in (("ensemble", 0.014), ("control", 0.02)):  # each changes ~1.4–2% of the answers
        p = gen.copy()
        change = rng.random(len(label)) < flips
        p[change] = np.where(gen[change] == label[change], look_alike[label[change]], label[change])
        preds[name] = p
    member = np.zeros((c, num_specialists), dtype=bool)
    for m, s in enumerate(sets):
        member[s, m] = True
    covering = member[label].sum(1)
    routed = member[gen]  # (N, M): top-1 routing
    cols = {"label": label, "covering": covering, f"{BASELINE}.pred": gen, f"{BASELINE}.union_pred": gen}
    for name in ("ensemble", "control"):
        cols.update({f"{name}.pred": preds[name], f"{name}.union_pred": preds[name], f"{name}.active": routed.sum(1)})
    counts = np.array([[member[label, m].sum(), (member[label, m] & (preds["ensemble"] == label)).sum(),
                        (member[label, m] & (gen == label)).sum()] for m in range(num_specialists)])
    records = Records(cols, counts, ["ensemble", "control"], routed=routed)
    sets_list = [s.tolist() for s in sets]
    layout = RunLayout(run)
    metrics = {
        "run": "bench-3755", "split": "test", "run_dir": str(run), "num_examples": len(label), "num_classes": c,
        "num_specialists": num_specialists, "world_size": 1,
        "inference": {"top_n": 1, "solver": "em", "bias": "trained", "correction": "routed", "tol": 1e-7,
                      "max_iter": 100},
        "models": {"generalist": {"path": "generalist/model.safetensors", "sha256": "0" * 64},
                   "specialists": [{"id": m, "path": f"specialists/{m:03d}", "sha256": "0" * 64,
                                    "applied": {"correction": "routed", "dustbin_bias": float(rng.normal(-3, 0.5)),
                                                "temperature": float(rng.uniform(0.5, 1.5))}}
                                   for m in range(num_specialists)]},
        "baseline": BASELINE, **compute_metrics(records, sets_list),
    }
    write_metrics(layout.metrics("test"), metrics)
    write_predictions(layout.predictions("test"), split="test", num_classes=c, label=label, predicted=preds,
                      covering=covering, specialist_ids=list(range(num_specialists)), routed=routed)
    method = describe_method(num_specialists, per_set, "faiss", 0, coverage=None)
    write_clusters(layout.clusters, index.class_names, sets_list, method=method, quality={"split": "val"},
                   deciding={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=3_755)
    parser.add_argument("--specialists", type=int, default=40)
    parser.add_argument("--per-specialist", type=int, default=150)
    parser.add_argument("--shards", help="prepared synthetic shards to reuse (made in a temporary folder otherwise)")
    parser.add_argument("--run", help="write the made-up run (and its report) here to look at, instead of a "
                                      "temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards or Path(tmp) / "shards")
        if not (shards / "index.json").is_file():
            t0 = time.perf_counter()
            prepare("synthetic", shards, seed=0, shard_size=2000, synthetic_cfg=SyntheticConfig(
                num_classes=args.classes, group_size=5, train_per_class=2, val_per_class=1, test_per_class=8,
                image_size=32))
            print(f"prepared {args.classes:,}-class synthetic shards in {time.perf_counter() - t0:.0f} s")
        index = ShardIndex.load(shards)
        run = Path(args.run or Path(tmp) / "run")
        synthetic_run(run, index, args.specialists, args.per_specialist)
        cfg = load_config(None, [f"data.shards={shards}", f"run_dir={run}", "data.image_size=32"])
        layout = RunLayout(run)
        t0 = time.perf_counter()
        page = write_evaluation_report(run, "test", cfg=cfg)
        seconds = time.perf_counter() - t0
        files = [page, *[p for p in layout.evaluation_assets("test").rglob("*") if p.is_file()]]
        size = sum(p.stat().st_size for p in files)
        largest = max(files, key=lambda p: p.stat().st_size)
        print(f"C = {index.num_classes:,}, {args.specialists} x {args.per_specialist}, "
              f"{index.count('test'):,} test images: evaluation report "
              f"in {seconds:.1f} s, {len(files)} files, {size / 2**20:.2f} MiB (largest {largest.name}: "
              f"{largest.stat().st_size / 2**10:.0f} KiB; predictions-test.npz "
              f"{layout.predictions('test').stat().st_size / 2**10:.0f} KiB, metrics-test.json "
              f"{layout.metrics('test').stat().st_size / 2**10:.0f} KiB)")


if __name__ == "__main__":
    main()
