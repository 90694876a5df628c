"""Where an ensemble's changes come from, by coverage (docs/RESULTS.md, typefaces section).

For each image the script records how many specialists' sets hold the true class and the
ensemble's class, and how many *active* specialists hold each. It prints, per coverage of
the true class, the ensemble's wins and losses against the generalist, and for the losses
how often the ensemble's class has more active specialists voting for it than the true
class: the KL objective (section 5) sums one term per active specialist, so a class held by
two active specialists gets two votes where a class held by one gets one.

    .venv/bin/python scripts/coverage_analysis.py --config configs/typefaces.yaml --split val \
        --set inference.bias=none --set inference.top_n=3
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from specialists.config import load_config
from specialists.data import ShardIndex, eval_batches, normalize
from specialists.ensemble import load_ensemble


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    index = ShardIndex.load(cfg.data.shards)
    loaded = load_ensemble(cfg, "cpu")
    engine = loaded.engine
    member = torch.zeros((len(loaded.sets), loaded.num_classes), dtype=torch.bool)  # (M, C)
    for m, s in enumerate(loaded.sets):
        member[m, s] = True
    coverage = member.sum(0)  # (C,)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("label", "gen", "ens", "active_true", "active_pred")}
    for images, labels, valid in eval_batches(index, cfg.data, args.split, batch_size=cfg.inference.batch_size):
        pred = engine.predict(normalize(images, cfg.data))
        active = pred.active.cpu()  # (B, M)
        keep = valid.bool()
        holders = active.float() @ member.float()  # (B, C): active specialists holding each class
        active_true = holders.gather(1, labels[:, None]).squeeze(1)
        active_pred = holders.gather(1, pred.top1.cpu()[:, None]).squeeze(1)
        for k, v in (("label", labels), ("gen", pred.general_top1.cpu()), ("ens", pred.top1.cpu()),
                     ("active_true", active_true), ("active_pred", active_pred)):
            cols[k].append(v[keep].numpy())
    c = {k: np.concatenate(v) for k, v in cols.items()}
    gen_ok, ens_ok = c["gen"] == c["label"], c["ens"] == c["label"]
    cov_true = coverage.numpy()[c["label"]]
    cov_pred = coverage.numpy()[c["ens"]]
    print(f"{args.split}: {len(c['label'])} images, generalist {gen_ok.sum()}, ensemble {ens_ok.sum()} "
          f"({int(ens_ok.sum()) - int(gen_ok.sum()):+d}); overrides {' '.join(args.overrides) or '-'}")
    print("covering  images  lost(b)  won(c)  change  b: ens class covered by (1/2/..)  "
          "b: active votes pred>true  c: active votes true>pred")
    for k in sorted(set(cov_true.tolist())):
        g = cov_true == k
        b, w = g & gen_ok & ~ens_ok, g & ~gen_ok & ens_ok
        by = Counter(cov_pred[b].tolist())
        more_b = int((c["active_pred"][b] > c["active_true"][b]).sum())
        more_w = int((c["active_true"][w] > c["active_pred"][w]).sum())
        print(f"{k:8d}  {g.sum():6d}  {b.sum():7d}  {w.sum():6d}  {int(w.sum()) - int(b.sum()):+6d}  "
              f"{'/'.join(str(by.get(j, 0)) for j in range(1, int(coverage.max()) + 1)):>32}  "
              f"{more_b:>25d}  {more_w:>25d}")
    share = np.bincount(coverage.numpy(), minlength=int(coverage.max()) + 1)
    print("classes by coverage:", {i: int(n) for i, n in enumerate(share) if n})


if __name__ == "__main__":
    main()
