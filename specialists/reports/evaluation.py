"""The evaluation report: what the specialists changed on one split, as an offline page.

``report/evaluation-<split>.html`` with its images in ``report/evaluation-<split>/``, beside the
clustering report (whose index links to it), from ``metrics-<split>.json`` and
``predictions-<split>.npz``:

* the paper's tables 3 and 4 and McNemar's b / c / p for every predictor in the metrics;
* per specialist: the images routed to it and the change in correct answers among them (bar chart);
* the confusion pairs the ensemble fixed and broke most often, with example images of both classes
  (the clustering report's strips);
* per class: the generalist's accuracy against each other predictor's (scatter);
* the settings: inference, clustering, the dustbin correction applied to each specialist.

Its cost does not grow with C² anywhere: pairs are counted as sparse (true, other) codes, and
example images are read for the classes of the listed pairs only (``docs/RESULTS.md`` has the
build time and size at 3,755 classes).
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clustering.report import html_page, set_links, settings_table, write_strips

from ..artifacts.clusters import load_clusters
from ..artifacts.metrics import read_metrics
from ..artifacts.predictions import Predictions, read_predictions
from ..artifacts.shard_index import ShardIndex
from ..config import RunConfig
from ..io import atomic_directory, atomic_write_text
from ..layout import RunLayout
from .clusters import EXAMPLE_SIZE, EXAMPLES_PER_CLASS, evaluation_links, read_examples, run_config

log = logging.getLogger(__name__)

BASELINE = "generalist"
MAIN = "ensemble"
TOP_PAIRS = 20  # fixed / broken confusion pairs listed
LABELLED = 20  # the per-class scatter names its points up to this many classes
SPECIALIST_PAGE = "specialist-{:03d}.html"  # the clustering report's page of the set at this position

Pair = tuple[int, int, int]  # (true class, the other class, images)


# ------------------------------------------------------------------------------ the figures
def changed_pairs(label: np.ndarray, before: np.ndarray, after: np.ndarray, *, top: int = TOP_PAIRS
                  ) -> tuple[list[Pair], list[Pair]]:
    """The confusions ``after`` fixed and those it broke, most frequent first.

    Fixed: ``before`` wrong and ``after`` right, counted by (true, ``before``'s answer). Broken:
    ``before`` right and ``after`` wrong, counted by (true, ``after``'s answer). Ties are ordered by
    the true class, then the other.
    """
    fixed = (before != label) & (after == label)
    broken = (before == label) & (after != label)
    return _count_pairs(label[fixed], before[fixed], top), _count_pairs(label[broken], after[broken], top)


def _count_pairs(true: np.ndarray, other: np.ndarray, top: int) -> list[Pair]:
    if true.size == 0:
        return []
    width = int(max(true.max(), other.max())) + 1
    codes, counts = np.unique(true.astype(np.int64) * width + other, return_counts=True)  # sorted by code
    order = np.argsort(-counts, kind="stable")[:top]
    return [(int(codes[i] // width), int(codes[i] % width), int(counts[i])) for i in order]


def class_accuracy(label: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(C,) examples of each class and (C,) of them ``pred`` got right."""
    n = np.bincount(label, minlength=num_classes)
    right = np.bincount(label[pred == label], minlength=num_classes)
    return n, right


# -------------------------------------------------------------------------------- the files
def write_evaluation_report(run_dir: str | Path, split: str, *, cfg: RunConfig | None = None) -> Path:
    """Write the run's evaluation report for ``split`` and link it from the clustering report's index."""
    layout = RunLayout(run_dir)
    metrics = read_metrics(layout.metrics(split))
    predictions = read_predictions(layout.predictions(split))
    cfg = cfg or run_config(layout.root)
    index = ShardIndex.load(cfg.data.shards)
    method = load_clusters(layout.clusters, index.class_names).method if layout.clusters.is_file() else None
    size = min(EXAMPLE_SIZE, cfg.data.image_size)

    def examples(classes: Sequence[int]) -> dict[int, np.ndarray]:
        return read_examples(index, classes, per_class=EXAMPLES_PER_CLASS, size=size, channels=cfg.data.channels)

    page = build_report(layout.evaluation_report(split), layout.evaluation_assets(split), metrics, predictions,
                        index.class_names, examples, method=method,
                        clustering_pages=layout.report_index.is_file())
    if layout.report_index.is_file():
        set_links(layout.report_index, evaluation_links(layout))
    log.info("evaluation report written to %s", page)
    return page


def build_report(page: Path, assets: Path, metrics: Mapping[str, Any], predictions: Predictions,
                 class_names: Sequence[str], examples: Callable[[Sequence[int]], Mapping[int, np.ndarray]], *,
                 method: Mapping[str, Any] | None = None, clustering_pages: bool = False) -> Path:
    """Write ``page`` and its images in ``assets`` (both atomically); returns ``page``.

    ``examples(classes)`` gives uint8 images per class for the strips; ``clustering_pages``: link
    each specialist to the clustering report's page beside ``page``.
    """
    split = metrics["split"]
    if predictions.split != split or predictions.num_examples != metrics["num_examples"]:
        raise ValueError(f"the predictions ({predictions.split}, {predictions.num_examples} examples) are not "
                         f"those of the metrics ({split}, {metrics['num_examples']} examples)")
    fixed, broken = ([], []) if MAIN not in predictions.predicted else changed_pairs(
        predictions.label, predictions.predicted[BASELINE], predictions.predicted[MAIN])
    shown = sorted({c for a, b, _ in fixed + broken for c in (a, b)})
    with atomic_directory(assets, overwrite=True) as tmp:
        strips = write_strips(tmp, examples(shown), shown)
        charts = _charts(tmp, metrics, predictions, class_names)
    rel = assets.name
    body = "\n".join([
        _header(metrics, clustering_pages),
        _top1_section(metrics),
        _conditional_section(metrics),
        _coverage_section(metrics),
        _specialists_section(metrics, charts.get("specialists"), rel, clustering_pages),
        _pairs_section(metrics, fixed, broken, class_names, {c: f"{rel}/{p}" for c, p in strips.items()}),
        _classes_section(metrics, predictions, charts.get("classes"), rel),
        _settings_section(metrics, method),
    ])
    atomic_write_text(page, html_page(f"Evaluation on {split}: {metrics.get('run', '')}", body))
    os.chmod(assets, 0o755)  # readable like the clustering report (temporary files are private)
    os.chmod(page, 0o644)
    return page


# ------------------------------------------------------------------------------- the charts
def _charts(root: Path, metrics: Mapping[str, Any], predictions: Predictions, names: Sequence[str]
            ) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    charts = {}
    if any("routed_change_correct" in s for s in metrics["specialists"]):
        charts["specialists"] = _specialists_chart(root / "specialists.png", metrics)
    others = [k for k in metrics["predictors"] if k != BASELINE and k in predictions.predicted]
    if others and BASELINE in predictions.predicted:
        charts["classes"] = _classes_chart(root / "classes.png", metrics["split"], predictions, others, names)
    return {k: Path(v).name for k, v in charts.items()}


def _specialists_chart(path: Path, metrics: Mapping[str, Any]) -> Path:
    import matplotlib.pyplot as plt

    rows = sorted(metrics["specialists"], key=lambda s: (-s.get("routed_change_correct", 0), s["id"]))
    change = [s.get("routed_change_correct", 0) for s in rows]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.18 * len(rows) + 2)), 3.6), dpi=100)
    ax.bar(range(len(rows)), change, color=["#2a7" if v > 0 else "#c33" if v < 0 else "#999" for v in change])
    ax.axhline(0, color="black", linewidth=0.8)
    if len(rows) <= 60:
        ax.set_xticks(range(len(rows)), [str(s["id"]) for s in rows], fontsize=7 if len(rows) > 25 else 9)
    ax.set_xlabel("specialist (sorted by change)")
    ax.set_ylabel("ensemble − generalist correct")
    ax.set_title(f"{metrics['split']} images routed to each specialist: change in correct answers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _classes_chart(path: Path, split: str, predictions: Predictions, others: list[str],
                   names: Sequence[str]) -> Path:
    """Per class: the generalist's accuracy (x) against each other predictor's (y); marker area ∝
    the number of classes at that point (accuracies of a few images per class coincide). The axes
    span the accuracies seen, so that small changes show; up to ``LABELLED`` classes are named."""
    import matplotlib.pyplot as plt

    c = predictions.num_classes
    n, g_right = class_accuracy(predictions.label, predictions.predicted[BASELINE], c)
    seen = np.flatnonzero(n > 0)
    x = g_right[seen] / n[seen]
    ys = {name: class_accuracy(predictions.label, predictions.predicted[name], c)[1][seen] / n[seen] for name in others}
    lo = min(x.min(), *(y.min() for y in ys.values())) if seen.size else 0.0
    lo = max(0.0, lo - 0.05 * (1.0 - lo) - 0.01)
    fig, axes = plt.subplots(1, len(others), figsize=(4.2 * len(others) + 0.6, 4.4), dpi=100, squeeze=False)
    for ax, (name, y) in zip(axes[0], ys.items(), strict=True):
        points, counts = np.unique(np.stack([x, y], axis=1), axis=0, return_counts=True)
        ax.scatter(points[:, 0], points[:, 1], s=12 + 60 * np.sqrt(counts / counts.max()), alpha=0.6,
                   color="#357", edgecolors="none")
        if seen.size <= LABELLED:
            for k, px, py in zip(seen, x, y, strict=True):
                label = names[k] if str(names[k]).isascii() else str(k)  # the plot's font may lack the script
                ax.annotate(label, (px, py), xytext=(3, -3), textcoords="offset points", fontsize=7, color="#333")
        ax.plot([lo, 1], [lo, 1], color="#999", linewidth=0.8)
        ax.set_xlim(lo, 1.0 + 0.02 * (1 - lo))
        ax.set_ylim(lo, 1.0 + 0.02 * (1 - lo))
        ax.set_aspect("equal")
        ax.set_xlabel(f"{BASELINE} accuracy on {split}")
        ax.set_ylabel(f"{name} accuracy on {split}")
        ax.set_title(f"{name}: {int((y > x).sum())} classes up, {int((y < x).sum())} down", fontsize=10)
    fig.suptitle(f"Per-class top-1 on the {split} split ({seen.size} classes)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- the pages
def _e(value: Any) -> str:
    return html.escape(str(value))


def _n(value: Any) -> str:
    """A count with thousands separators ("–" when absent)."""
    return f"{value:,}" if isinstance(value, int) else "–" if value is None else _e(value)


def _pct(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.2f}%" if signed else f"{100 * value:.2f}%"


def _signed(value: int | None) -> str:
    if value is None:
        return "–"
    css = "up" if value > 0 else "down" if value < 0 else ""
    return f'<span class="{css}">{value:+,d}</span>' if css else "0"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str = "",
           attrs: Sequence[str] | None = None) -> str:
    """An HTML table; cells are HTML already. Columns whose cells are all numbers are right-aligned."""
    numeric = [all(_numeric(row[i]) for row in rows) if rows else False for i in range(len(header))]
    align = [' class="num"' if n else "" for n in numeric]
    head = "".join(f"<th{a}>{h}</th>" for a, h in zip(align, header, strict=True))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f"<td{a}>{v}</td>" for a, v in zip(align, row, strict=True))
        body.append(f"<tr{' ' + attrs[r] if attrs else ''}>{cells}</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{''.join(body)}</table>"


def _numeric(cell: Any) -> bool:
    text = str(cell)
    return not text or text[0] in "0123456789+-–" or text.startswith(('<span class="up">', '<span class="down">'))


def _header(metrics: Mapping[str, Any], clustering_pages: bool) -> str:
    split = metrics["split"]
    nav = '<nav id="reports"><a href="index.html">Specialist class sets (clustering report)</a></nav>' \
        if clustering_pages else ""
    return (f"{nav}<h1>Evaluation on the {_e(split)} split: run {_e(metrics.get('run', ''))}</h1>"
            f"<p>{_n(metrics['num_examples'])} {_e(split)} images, {_n(metrics.get('num_classes'))} classes, "
            f"{_n(metrics.get('num_specialists'))} specialists. Every figure on this page "
            f"was measured on the {_e(split)} split.</p>")


def _top1_section(metrics: Mapping[str, Any]) -> str:
    preds, split = metrics["predictors"], metrics["split"]
    rows = []
    for name, p in preds.items():
        v = p.get("vs_generalist")
        mc = v["mcnemar"] if v else None
        rows.append([_e(name), _n(p["correct"]), _pct(p["top1"]), _signed(v["change_correct"]) if v else "–",
                     _n(mc["b"]) if mc else "–", _n(mc["c"]) if mc else "–", f"{mc['p_value']:.3g}" if mc else "–"])
    parts = [f"<h2>Top-1 on the {_e(split)} split</h2>",
             _table(["predictor", "correct", "top-1", "change", "b", "c", "McNemar p"], rows),
             f'<p class="note">b: images the {BASELINE} got right and the predictor wrong; c: the reverse; '
             "p: McNemar's exact two-sided test (binomial, c of b + c at ½).</p>"]
    vs_control = preds.get(MAIN, {}).get("vs_control")
    if vs_control:
        mc = vs_control["mcnemar"]
        parts.append(f"<p>{MAIN} vs control: {_signed(vs_control['change_correct'])} correct; b = {mc['b']:,} "
                     f"(control right only), c = {mc['c']:,} ({MAIN} right only), p = {mc['p_value']:.3g}.</p>")
    return "\n".join(parts)


def _conditional_section(metrics: Mapping[str, Any]) -> str:
    preds, split, sub = metrics["predictors"], metrics["split"], metrics.get("conditional_subset")
    if not sub:
        return ""
    rows = [[_e(name), _n(p["conditional"]["correct"]), _pct(p["conditional"]["accuracy"]),
             _pct(p.get("vs_generalist", {}).get("conditional_relative_change"), signed=True)]
            for name, p in preds.items() if "conditional" in p]
    return (f"<h2>Table 3: conditional accuracy on the {_e(split)} split</h2>"
            f'<p class="note">{sub["num_examples"]:,} {_e(split)} images whose class is in some specialist\'s set; '
            f"every predictor answers among the {sub['union_classes']:,} classes of the sets.</p>"
            + _table(["predictor", "correct", "accuracy", "relative change"], rows))


def _coverage_section(metrics: Mapping[str, Any]) -> str:
    preds, split = metrics["predictors"], metrics["split"]
    others = [k for k, p in preds.items() if "by_coverage" in p.get("vs_generalist", {})]
    if not others:
        return ""
    by = {k: preds[k]["vs_generalist"]["by_coverage"] for k in others}
    header = ["covering specialists", "images", f"{BASELINE} correct"]
    for k in others:
        header += [f"{_e(k)} correct", f"{_e(k)} change", f"{_e(k)} relative"]
    rows = []
    for i, row in enumerate(by[others[0]]):
        if row["num_examples"] == 0:
            continue
        cells = [row["covering"], _n(row["num_examples"]), _n(row["generalist_correct"])]
        for k in others:
            r = by[k][i]
            cells += [_n(r["correct"]), _signed(r["change_correct"]), _pct(r["relative_change"], signed=True)]
        rows.append(cells)
    return (f"<h2>Table 4: by number of specialists covering the true class, on the {_e(split)} split</h2>"
            + _table(header, rows))


def _specialists_section(metrics: Mapping[str, Any], chart: str | None, rel: str, clustering_pages: bool) -> str:
    split = metrics["split"]
    applied = {s["id"]: s.get("applied", {}) for s in metrics["models"].get("specialists", [])}
    order = sorted(range(len(metrics["specialists"])),
                   key=lambda i: (-metrics["specialists"][i].get("routed_change_correct", 0),
                                  metrics["specialists"][i]["id"]))
    rows = []
    for i in order:
        s = metrics["specialists"][i]
        a = applied.get(s["id"], {})
        name = f"specialist&nbsp;{s['id']}"
        link = f'<a href="{SPECIALIST_PAGE.format(i)}">{name}</a>' if clustering_pages else name
        rows.append([link, _n(len(s["classes"])), _n(s.get("routed")), _n(s.get("routed_generalist_correct")),
                     _n(s.get("routed_correct")), _signed(s.get("routed_change_correct")), _n(s["num_examples"]),
                     _pct(s["generalist_accuracy"]), _pct(s["specialist_accuracy"]),
                     _number(a.get("dustbin_bias")), _number(a.get("temperature"))])
    header = ["specialist", "classes", "images routed", f"{BASELINE} correct", f"{MAIN} correct", "change",
              "images of its classes", f"{BASELINE} among its classes", "specialist alone", "dustbin bias",
              "temperature"]
    figure = f'<p><img class="chart" src="{rel}/{chart}" alt="change per specialist"></p>' if chart else ""
    return (f"<h2>Specialists on the {_e(split)} split</h2>{figure}"
            f'<p class="note">Images routed: the {_e(split)} images the {MAIN} ran the specialist on (whatever their '
            f"class); correct and change are counted among them (an image routed to several specialists counts for "
            f"each). Alone: the specialist's top-1 among its own classes (dustbin excluded) on the {_e(split)} images "
            f"of those classes, next to the {BASELINE} restricted to the same classes. The dustbin bias and "
            f"temperature are those the {MAIN} applied.</p>" + _table(header, rows))


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _pairs_section(metrics: Mapping[str, Any], fixed: list[Pair], broken: list[Pair], names: Sequence[str],
                   strips: Mapping[int, str]) -> str:
    split = metrics["split"]
    mc = metrics["predictors"].get(MAIN, {}).get("vs_generalist", {}).get("mcnemar")
    totals = f" ({mc['c']:,} images fixed and {mc['b']:,} broken in all)" if mc else ""
    parts = [f"<h2>Confusions the {MAIN} fixed and broke on the {_e(split)} split{totals}</h2>",
             f'<p class="note">Fixed: the {BASELINE} answered the other class, the {MAIN} the true one. Broken: the '
             f"{BASELINE} was right, the {MAIN} answered the other class. The {TOP_PAIRS} most frequent pairs of each; "
             "examples are from the training data.</p>"]
    for key, title, pairs in (("fixed", "Fixed", fixed), ("broken", "Broken", broken)):
        rows, attrs = [], []
        for a, b, n in pairs:
            cells = [_class_cell(a, names), _class_cell(b, names), n]
            cells += [f'<img class="strip" src="{strips[c]}" alt="examples of {_e(names[c])}">' if c in strips else ""
                      for c in (a, b)]
            rows.append(cells)
            attrs.append(f'data-true="{a}" data-other="{b}" data-count="{n}"')
        table = _table(["true class", "confused with", "images", "examples of the true class",
                        "examples of the other"], rows, attrs=attrs) if rows else "<p>none</p>"
        parts.append(f'<section id="{key}-pairs"><h3>{title}</h3>{table}</section>')
    return "\n".join(parts)


def _class_cell(c: int, names: Sequence[str]) -> str:
    return f"{_e(names[c])} <small>({c})</small>"


def _classes_section(metrics: Mapping[str, Any], predictions: Predictions, chart: str | None, rel: str) -> str:
    if chart is None:
        return ""
    return (f"<h2>Per-class accuracy on the {_e(metrics['split'])} split</h2>"
            f'<p><img class="chart" src="{rel}/{chart}" alt="per-class accuracy"></p>'
            f'<p class="note">One point per class with {_e(metrics["split"])} images; above the diagonal the predictor '
            f"beats the {BASELINE} on that class. The marker's size grows with the number of classes at that "
            "point; the axes start at the lowest accuracy seen.</p>")


def _settings_section(metrics: Mapping[str, Any], method: Mapping[str, Any] | None) -> str:
    run = {"run": metrics.get("run"), "split": metrics["split"], "images": metrics["num_examples"],
           "classes": metrics.get("num_classes"), "specialists": metrics.get("num_specialists"),
           "processes": metrics.get("world_size"),
           "generalist sha256": metrics["models"].get("generalist", {}).get("sha256")}
    corrections = sorted({s.get("applied", {}).get("correction") for s in metrics["models"].get("specialists", [])
                          if s.get("applied")} - {None})
    inference = dict(metrics["inference"])
    if corrections != [inference.get("correction")]:
        inference["corrections applied"] = corrections or None
    tables = [settings_table(run, caption="run"), settings_table(inference, caption="inference")]
    if method is not None:
        tables.append(settings_table(method, caption="clustering: how the class sets were made"))
    return (f"<h2>Settings of this evaluation ({_e(metrics['split'])} split)</h2>"
            f'<div class="row">{"".join(tables)}</div>'
            '<p class="note">The dustbin bias and temperature applied to each specialist are in the '
            "specialists' table above.</p>")
