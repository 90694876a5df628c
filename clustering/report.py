"""Offline inspection report of the specialists' class sets.

A directory with ``index.html``, one ``specialist-NNN.html`` per set and small
PNGs, readable in a browser without a server: the covariance reordered by set,
how many sets cover each class, per-set covariance mass and (given a confusion
matrix) the share of errors that stay inside the set. Built to stay small and
fast at C = 3,755 (CASIA-style Chinese characters) with 40 sets x 150 classes:
images are block-averaged or capped, example strips are shared per class.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clustering.features import check_cov
from clustering.quality import chance_pair_share

logger = logging.getLogger(__name__)

__all__ = ["html_page", "set_links", "settings_table", "summary", "write_report", "write_strips"]

HEATMAP_PIXELS = 800  # the reordered covariance is block-averaged to at most this size
EXAMPLES_PER_CLASS = 4
STRIP_HEIGHT = 48  # example images are downsampled (integer stride) to at most this height
_CHUNK_BYTES = 64 << 20


def summary(
    cov: torch.Tensor | np.ndarray,
    class_sets: Sequence[Sequence[int]],
    *,
    confusion: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Figures describing a set of class sets, as plain JSON-able values.

    Covariance mass is the positive off-diagonal covariance (co-prediction):
    ``within_set_mass`` is the share of it between classes sharing a set, next
    to ``chance_pair_share``, the share of class pairs that share a set.
    With a confusion matrix (C, C) of counts (rows = true), ``error_share_inside``
    is the share of errors whose (true, predicted) pair shares a set.
    """
    cov_t = check_cov(cov)
    c = cov_t.shape[0]
    sets = _check_sets(class_sets, c)
    conf = None if confusion is None else _check_confusion(confusion, c)
    return _summary(cov_t, sets, conf)


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    cov: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    class_sets: Sequence[Sequence[int]],
    examples: Mapping[int, np.ndarray] | None = None,
    confusion: np.ndarray | torch.Tensor | None = None,
    method: Mapping[str, Any] | None = None,
    links: Sequence[tuple[str, str]] = (),
    keep: Sequence[str] = (),
) -> Path:
    """Writes the report directory atomically and returns the path of its index.html.

    Args:
        out_dir: the report directory (replaced as a whole if it exists).
        cov: (C, C) covariance of the generalist's outputs.
        class_names: C names (any Unicode; pages are UTF-8).
        class_sets: the specialists' class sets.
        examples: class index -> uint8 images (n, H, W) or (n, H, W, 3); at most
            ``EXAMPLES_PER_CLASS`` are shown per class.
        confusion: (C, C) counts, rows = true class, columns = predicted.
        method: the clustering options (``describe_method``), shown as a table.
        links: (text, href) of other pages to list at the top of index.html (see :func:`set_links`).
        keep: names of files or folders of an existing ``out_dir`` to carry into the new one
            (pages written there by others, e.g. an evaluation report).
    """
    cov_t = check_cov(cov)
    c = cov_t.shape[0]
    if len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} names but cov has {c} classes")
    sets = _check_sets(class_sets, c)
    conf = None if confusion is None else _check_confusion(confusion, c)
    examples = _check_examples(examples, c)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stats = _summary(cov_t, sets, conf)
        _write_pages(tmp, cov_t, list(map(str, class_names)), sets, examples, conf, method, stats, links)
        _carry(out, tmp, keep)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote clustering report to %s", out)
    return out / "index.html"


# ------------------------------------------------------------------ figures
def _summary(cov: torch.Tensor, sets: list[np.ndarray], conf: np.ndarray | None) -> dict[str, Any]:
    c = cov.shape[0]
    membership = np.zeros((c, len(sets)), dtype=np.float32)  # (C, M)
    for m, s in enumerate(sets):
        membership[s, m] = 1.0
    coverage = membership.sum(axis=1).astype(np.int64)  # (C,) sets covering each class
    within = total = 0.0
    chunk = max(1, _CHUNK_BYTES // (8 * c))
    for start in range(0, c, chunk):
        stop = min(c, start + chunk)
        positive = _positive_offdiag(cov, start, stop)  # (b, C)
        shares = (membership[start:stop] @ membership.T) > 0  # (b, C) pairs sharing a set
        within += float(positive[shares].sum())
        total += float(positive.sum())
    specialists = []
    for m, s in enumerate(sets):
        entry = {"id": m, "size": int(s.size)}
        rows = cov[torch.from_numpy(s)].numpy().copy()  # (|S|, C)
        rows[np.arange(s.size), s] = 0.0
        rows = np.maximum(rows, 0.0)
        entry["within_set_mass"] = _ratio(rows[:, s].sum(), rows.sum())
        if conf is not None:
            entry.update(_set_errors(conf, s))
        specialists.append(entry)
    result: dict[str, Any] = {
        "num_classes": c,
        "num_specialists": len(sets),
        "set_size_min": int(min((s.size for s in sets), default=0)),
        "set_size_max": int(max((s.size for s in sets), default=0)),
        "set_size_mean": float(np.mean([s.size for s in sets])) if sets else 0.0,
        "coverage_counts": {int(k): int(n) for k, n in enumerate(np.bincount(coverage))},
        "uncovered_classes": int((coverage == 0).sum()),
        "within_set_mass": _ratio(within, total),
        "chance_pair_share": chance_pair_share([s.tolist() for s in sets], c) if c > 1 else 0.0,
        "specialists": specialists,
    }
    if conf is not None:
        errors = conf.copy()
        np.fill_diagonal(errors, 0)
        inside = 0.0
        for start in range(0, c, chunk):
            stop = min(c, start + chunk)
            shares = (membership[start:stop] @ membership.T) > 0
            inside += float(errors[start:stop][shares].sum())
        result["num_errors"] = float(errors.sum())
        result["error_share_inside"] = _ratio(inside, errors.sum())
    return result


def _positive_offdiag(cov: torch.Tensor, start: int, stop: int) -> np.ndarray:
    rows = cov[start:stop].numpy().copy()  # (b, C)
    rows[np.arange(stop - start), np.arange(start, stop)] = 0.0
    return np.maximum(rows, 0.0)


def _set_errors(conf: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    """Errors of the set's classes (rows), and the share predicted inside the set."""
    rows = conf[s].astype(np.float64)  # (|S|, C)
    errors = rows.sum() - rows[np.arange(s.size), s].sum()
    inside = rows[:, s].sum() - rows[np.arange(s.size), s].sum()
    return {"num_errors": float(errors), "error_share_inside": _ratio(inside, errors)}


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b > 0 else None


def _order(sets: list[np.ndarray], c: int) -> np.ndarray:
    """Classes grouped by set (first set wins for overlaps), uncovered classes last."""
    seen = np.zeros(c, dtype=bool)
    order = []
    for s in sets:
        new = s[~seen[s]]
        seen[new] = True
        order.append(new)
    order.append(np.flatnonzero(~seen))
    return np.concatenate(order)


def _block_average(cov: torch.Tensor, order: np.ndarray, pixels: int) -> np.ndarray:
    """The reordered covariance with zeroed diagonal, averaged over (pixels, pixels) blocks."""
    c = cov.shape[0]
    p = min(c, pixels)
    bins = (np.arange(c) * p) // c  # (C,) block of each reordered position
    starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])  # (p,)
    counts = np.bincount(bins, minlength=p).astype(np.float64)
    image = np.zeros((p, p))
    chunk = max(1, _CHUNK_BYTES // (8 * c))
    for start in range(0, c, chunk):
        positions = np.arange(start, min(c, start + chunk))
        rows = cov[torch.from_numpy(order[positions])].numpy()[:, order]  # (b, C) reordered
        rows[np.arange(positions.size), positions] = 0.0
        np.add.at(image, bins[positions], np.add.reduceat(rows, starts, axis=1))
    return image / np.outer(counts, counts)


# -------------------------------------------------------------------- pages
def _write_pages(
    root: Path,
    cov: torch.Tensor,
    names: list[str],
    sets: list[np.ndarray],
    examples: dict[int, np.ndarray],
    conf: np.ndarray | None,
    method: Mapping[str, Any] | None,
    stats: dict[str, Any],
    links: Sequence[tuple[str, str]] = (),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cov.shape[0]
    order = _order(sets, c)
    image = _block_average(cov, order, HEATMAP_PIXELS)
    limit = float(np.percentile(np.abs(image), 99.5)) or 1.0
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    shown = ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="covariance (diagonal set to 0)")
    ax.set_title(f"covariance of {c} classes, reordered by set (block average {image.shape[0]} px)")
    fig.savefig(root / "covariance.png", bbox_inches="tight")  # no empty band above the square map
    plt.close(fig)

    counts = stats["coverage_counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar(list(counts), list(counts.values()))
    ax.set_xticks(list(counts))  # whole numbers of sets, not a continuous axis
    ax.set_xlabel("number of sets covering a class")
    ax.set_ylabel("classes")
    fig.tight_layout()
    fig.savefig(root / "coverage.png")
    plt.close(fig)

    strips = write_strips(root, examples, sorted({int(i) for s in sets for i in s}))
    for m, s in enumerate(sets):
        confusion_png = None
        if conf is not None:
            confusion_png = f"confusion-{m:03d}.png"
            block = conf[np.ix_(s, s)].astype(np.float64)
            scale = max(1, 300 // max(1, s.size))  # small sets: enlarge the cells
            block = np.kron(np.log1p(block), np.ones((scale, scale)))
            plt.imsave(root / confusion_png, block, cmap="viridis")
        sheet_png = _write_sheet(root, m, s, examples)
        pairs = _confused_pairs(conf, s) if conf is not None else []
        page = _specialist_page(m, s, names, strips, stats["specialists"][m], confusion_png, len(sets),
                                sheet_png=sheet_png, pairs=pairs)
        (root / f"specialist-{m:03d}.html").write_text(page, encoding="utf-8")
    (root / "index.html").write_text(_index_page(names, sets, stats, method, links), encoding="utf-8")
    summary_json = {k: v for k, v in stats.items()}
    (root / "summary.json").write_text(json.dumps(summary_json, indent=1), encoding="utf-8")


def write_strips(root: Path, examples: Mapping[int, np.ndarray], classes: Sequence[int]) -> dict[int, str]:
    """One PNG per class with up to EXAMPLES_PER_CLASS examples side by side, in ``root/strips/``.

    ``examples``: class → uint8 images (n, H, W) or (n, H, W, 3). Returns class → path relative to ``root``.
    """

    paths: dict[int, str] = {}
    if not examples:
        return paths
    (root / "strips").mkdir(exist_ok=True)
    for i in classes:
        if i not in examples or len(examples[i]) == 0:
            continue
        images = examples[i][:EXAMPLES_PER_CLASS]  # (n, H, W) or (n, H, W, 3)
        stride = -(-images.shape[1] // STRIP_HEIGHT)
        images = images[:, ::stride, ::stride]
        gap = np.full((images.shape[1], 2) + images.shape[3:], 255, dtype=np.uint8)
        strip = np.concatenate([part for img in images for part in (img, gap)][:-1], axis=1)
        paths[i] = f"strips/class-{i:05d}.png"
        _save_image(root / paths[i], strip)
    return paths


def _save_image(path: Path, image: np.ndarray) -> None:
    """uint8 (H, W) grey or (H, W, 3) colour → PNG, grey kept on its 0..255 scale."""
    import matplotlib.pyplot as plt

    if image.ndim == 2:
        plt.imsave(path, image, cmap="gray", vmin=0, vmax=255)
    else:
        plt.imsave(path, image)


SHEET_COLUMNS = 25  # glyph sheet: one example per class, this many to a row
SHEET_WIDTH = 1200  # and shown at most this wide (px)
TOP_PAIRS = 12  # most-confused pairs listed per specialist page


def _write_sheet(root: Path, m: int, s: np.ndarray, examples: dict[int, np.ndarray]) -> tuple[str, int] | None:
    """One image with the first example of every class of set ``m``, in the set's order, so a
    reader sees the kind of shapes a specialist holds at a glance. Returns its path and the width
    to show it at (tiles about STRIP_HEIGHT px high, at most SHEET_WIDTH px in all)."""

    firsts = [examples[i][0] for i in s if i in examples and len(examples[i])]
    if not firsts or any(f.shape != firsts[0].shape for f in firsts):
        return None
    tile = firsts[0]
    stride = -(-tile.shape[0] // STRIP_HEIGHT)
    firsts = [f[::stride, ::stride] for f in firsts]
    h, w = firsts[0].shape[:2]
    cols = min(SHEET_COLUMNS, len(firsts))
    rows = -(-len(firsts) // cols)
    sheet = np.full((rows * (h + 2), cols * (w + 2)) + firsts[0].shape[2:], 255, dtype=np.uint8)
    for k, img in enumerate(firsts):
        r, c = divmod(k, cols)
        sheet[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = img
    path = f"sheet-{m:03d}.png"
    _save_image(root / path, sheet)
    return path, min(SHEET_WIDTH, round(sheet.shape[1] * max(1.0, STRIP_HEIGHT / h)))


def _confused_pairs(conf: np.ndarray, s: np.ndarray) -> list[tuple[int, int, int]]:
    """The most frequent (true, predicted, count) errors with both classes in the set."""
    block = conf[np.ix_(s, s)].astype(np.int64)
    np.fill_diagonal(block, 0)
    flat = np.argsort(-block, axis=None, kind="stable")[:TOP_PAIRS]
    pairs = []
    for f in flat:
        a, b = divmod(int(f), block.shape[1])
        if block[a, b] > 0:
            pairs.append((int(s[a]), int(s[b]), int(block[a, b])))
    return pairs


_STYLE = (
    "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
    "td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}th[scope=row]{font-weight:normal;color:#333}"
    "caption{text-align:left;font-weight:bold;padding:4px 0}p.note{color:#555;max-width:60em}"
    "nav#reports{background:#f3f3f3;padding:4px 10px;margin-bottom:1em}"
    ".up{color:#060}.down{color:#a00}"
    "img.strip{image-rendering:pixelated;height:48px;vertical-align:middle}img.sheet{image-rendering:pixelated;max-width:100%}"
    "img.chart{max-width:100%}div.row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}"
    "</style>"
)


def html_page(title: str, body: str) -> str:
    """A whole UTF-8 page with the reports' style sheet around ``body`` (HTML)."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{_STYLE}</head><body>\n{body}\n</body></html>\n"
    )


def settings_table(settings: Mapping[str, Any], *, caption: str | None = None) -> str:
    """A two-column HTML table of ``settings``: nested mappings as dotted keys, lists joined, None as –."""
    rows = "".join(f'<tr><th scope="row">{html.escape(k)}</th><td>{_setting(v)}</td></tr>'
                   for k, v in _flatten(settings))
    head = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="settings">{head}{rows}</table>'


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


SHORT_TEXT = 16  # longer values without spaces (hashes, paths) are cut, the whole value in a tooltip


def _setting(value: Any) -> str:
    if value is None or (isinstance(value, Mapping) and not value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(map(str, value))) or "–"
    text = str(value)
    if len(text) > SHORT_TEXT and " " not in text:
        return f'<span title="{html.escape(text)}">{html.escape(text[:SHORT_TEXT])}…</span>'
    return html.escape(text)


def _links_nav(links: Sequence[tuple[str, str]]) -> str:
    """The block of links at the top of index.html that :func:`set_links` rewrites."""
    items = " · ".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for text, href in links)
    return f'<nav id="reports">{items}</nav>' if items else '<nav id="reports" hidden></nav>'


_NAV = re.compile(r'<nav id="reports"[^>]*>.*?</nav>', re.S)


def set_links(index: str | os.PathLike[str], links: Sequence[tuple[str, str]]) -> None:
    """Rewrite the links at the top of an existing report's index.html (atomically).

    For pages written after the report (an evaluation report), so the index lists them without
    being rebuilt.
    """
    path = Path(index)
    page = path.read_text(encoding="utf-8")
    nav = _links_nav(links)
    page = _NAV.sub(lambda _: nav, page, count=1) if _NAV.search(page) else page.replace("</h1>", "</h1>\n" + nav, 1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _index_page(
    names: list[str],
    sets: list[np.ndarray],
    stats: dict[str, Any],
    method: Mapping[str, Any] | None,
    links: Sequence[tuple[str, str]] = (),
) -> str:
    parts = [f"<h1>Specialist class sets: {len(sets)} sets over {stats['num_classes']} classes</h1>",
             _links_nav(links)]
    if method is not None:
        parts.append(f"<h2>Method</h2>{settings_table(method)}")
    figures = [
        ("set sizes", f"{stats['set_size_min']}–{stats['set_size_max']} (mean {stats['set_size_mean']:.1f})"),
        ("classes in no set", str(stats["uncovered_classes"])),
        ("positive covariance mass within sets", _fmt(stats["within_set_mass"])),
        ("share of class pairs within sets (chance)", _fmt(stats["chance_pair_share"])),
    ]
    if "error_share_inside" in stats:
        figures.append(("share of errors within sets", _fmt(stats["error_share_inside"])))
    parts.append("<h2>Summary</h2><table>")
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in figures]
    parts.append("</table>")
    parts.append('<h2>Covariance</h2><img src="covariance.png" alt="covariance heatmap">')
    parts.append('<h2>Coverage</h2><img src="coverage.png" alt="coverage histogram">')
    has_errors = "error_share_inside" in stats
    parts.append("<h2>Specialists</h2><table><tr><th>specialist</th><th>size</th>"
                 "<th>covariance mass within</th>" + ("<th>errors within</th>" if has_errors else "")
                 + "<th>first classes</th></tr>")
    for m, s in enumerate(sets):
        entry = stats["specialists"][m]
        first = ", ".join(html.escape(names[i]) for i in s[:8]) + (" …" if s.size > 8 else "")
        errors = f"<td>{_fmt(entry.get('error_share_inside'))}</td>" if has_errors else ""
        parts.append(
            f'<tr><td><a href="specialist-{m:03d}.html">specialist {m}</a></td><td>{s.size}</td>'
            f"<td>{_fmt(entry['within_set_mass'])}</td>{errors}<td>{first}</td></tr>"
        )
    parts.append("</table>")
    return html_page("Specialist class sets", "\n".join(parts))


def _specialist_page(
    m: int,
    s: np.ndarray,
    names: list[str],
    strips: dict[int, str],
    entry: dict[str, Any],
    confusion_png: str | None,
    num_sets: int,
    *,
    sheet_png: tuple[str, int] | None = None,
    pairs: Sequence[tuple[int, int, int]] = (),
) -> str:
    nav = ['<p><a href="index.html">index</a>']
    if m > 0:
        nav.append(f' · <a href="specialist-{m - 1:03d}.html">previous</a>')
    if m + 1 < num_sets:
        nav.append(f' · <a href="specialist-{m + 1:03d}.html">next</a>')
    parts = ["".join(nav) + "</p>", f"<h1>Specialist {m}: {s.size} classes</h1>"]
    parts.append(f"<p>positive covariance mass within the set: {_fmt(entry['within_set_mass'])}")
    if "error_share_inside" in entry:
        parts.append(
            f"<br>errors of these classes: {entry['num_errors']:.0f}, share predicted inside "
            f"the set: {_fmt(entry['error_share_inside'])}"
        )
    parts.append("</p>")
    if sheet_png is not None:
        path, width = sheet_png
        parts.append(f'<h2>One example of each class, in table order</h2><img class="sheet" src="{path}" '
                     f'style="width:{width}px" alt="examples of every class">')
    if pairs:
        parts.append("<h2>Most confused pairs within the set (val)</h2><table>"
                     "<tr><th>true</th><th>predicted</th><th>count</th><th>true examples</th>"
                     "<th>predicted examples</th></tr>")
        for a, b, n in pairs:
            cells = "".join(f'<td><img class="strip" src="{strips[i]}" alt=""></td>' if i in strips else "<td></td>"
                            for i in (a, b))
            parts.append(f"<tr><td>{html.escape(names[a])}</td><td>{html.escape(names[b])}</td><td>{n}</td>{cells}</tr>")
        parts.append("</table>")
    if confusion_png is not None:
        parts.append("<h2>Confusion within the set (log scale; rows = true class, columns = predicted, "
                     "both in the order of the table below)</h2>"
                     f'<img src="{confusion_png}" alt="confusion matrix">')
    parts.append("<h2>Classes</h2><table><tr><th>class</th><th>name</th><th>examples</th></tr>")
    for i in s:
        strip = f'<img class="strip" src="{strips[i]}" alt="">' if i in strips else ""
        parts.append(f"<tr><td>{i}</td><td>{html.escape(names[i])}</td><td>{strip}</td></tr>")
    parts.append("</table>")
    return html_page(f"Specialist {m}", "\n".join(parts))


def _carry(old: Path, new: Path, names: Sequence[str]) -> None:
    """Copy the entries ``names`` of directory ``old`` (when there) into ``new`` (``old`` is replaced next)."""
    for name in names:
        if (old / name).exists() and not (new / name).exists():
            shutil.copytree(old / name, new / name) if (old / name).is_dir() else shutil.copy2(old / name, new / name)


def _replace_dir(new: Path, out: Path) -> None:
    """Puts `new` at `out`; an old `out` is renamed away first and removed after."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "report")
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
    os.chmod(out, 0o755)


# --------------------------------------------------------------- validation
def _check_sets(class_sets: Sequence[Sequence[int]], c: int) -> list[np.ndarray]:
    sets = []
    for m, s in enumerate(class_sets):
        array = np.unique(np.asarray(list(s), dtype=np.int64))
        if array.size == 0:
            raise ValueError(f"class_sets[{m}] is empty")
        if array[0] < 0 or array[-1] >= c:
            raise ValueError(f"class_sets[{m}] has a class outside 0..{c - 1}")
        sets.append(array)
    return sets


def _check_confusion(confusion: np.ndarray | torch.Tensor, c: int) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    conf = np.asarray(confusion)
    if conf.shape != (c, c):
        raise ValueError(f"confusion has shape {conf.shape} but expected ({c}, {c})")
    if not np.isfinite(conf).all() or (conf < 0).any():
        raise ValueError("confusion must hold finite, non-negative counts")
    return conf


def _check_examples(examples: Mapping[int, np.ndarray] | None, c: int) -> dict[int, np.ndarray]:
    checked: dict[int, np.ndarray] = {}
    for key, images in (examples or {}).items():
        i = int(key)
        if not 0 <= i < c:
            raise ValueError(f"examples has class {key} outside 0..{c - 1}")
        array = np.asarray(images)
        if array.dtype != np.uint8 or not (
            array.ndim == 3 or (array.ndim == 4 and array.shape[3] == 3)
        ):
            raise ValueError(
                f"examples[{key}] has shape {array.shape} and dtype {array.dtype} "
                "but expected uint8 (n, H, W) or (n, H, W, 3)"
            )
        checked[i] = array
    return checked
