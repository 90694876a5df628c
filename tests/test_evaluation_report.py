"""The evaluation report: its figures by hand, its files, and both reports of a tiny run rendered
in headless Chromium (every image loads, no console error, the fixed/broken pairs are those
counted here from the saved predictions)."""

import json
import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from clustering import write_report
from clustering.report import set_links, settings_table
from specialists.artifacts.predictions import read_predictions, write_predictions
from specialists.errors import UserError
from specialists.layout import DataLayout, RunLayout
from specialists.reports.evaluation import TOP_PAIRS, changed_pairs, class_accuracy

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# --- figures, by hand ----------------------------------------------------------------------------
def test_changed_pairs_by_hand():
    label = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    before = np.array([1, 1, 0, 1, 0, 2, 3, 3, 3])  # wrong at 0, 1 (0→1), 4 (1→0), 6, 7 (2→3)
    after = np.array([0, 0, 2, 0, 1, 2, 2, 3, 1])  # right at 0, 1, 4, 5, 6; wrong at 2 (0→2), 3 (1→0), 8 (3→1)
    fixed, broken = changed_pairs(label, before, after)
    assert fixed == [(0, 1, 2), (1, 0, 1), (2, 3, 1)]  # by count, then true class
    assert broken == [(0, 2, 1), (1, 0, 1), (3, 1, 1)]
    assert changed_pairs(label, before, after, top=1) == ([(0, 1, 2)], [(0, 2, 1)])
    assert changed_pairs(label, label, label) == ([], [])
    n, right = class_accuracy(label, after, 5)
    assert n.tolist() == [3, 2, 3, 1, 0] and right.tolist() == [2, 1, 2, 0, 0]


def test_predictions_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "predictions-val.npz"
    label = np.array([0, 1, 2, 2])
    routed = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=bool)
    write_predictions(path, split="val", num_classes=3, label=label,
                      predicted={"generalist": np.array([0, 2, 2, 1]), "student": np.array([0, 1, 2, 1])},
                      covering=np.array([1, 0, 2, 2]), specialist_ids=[4, 7], routed=routed)
    p = read_predictions(path)
    assert p.split == "val" and p.num_examples == 4 and p.num_classes == 3
    assert sorted(p.predicted) == ["generalist", "student"] and p.correct("student").tolist() == [1, 1, 1, 0]
    assert p.routed_indptr.tolist() == [0, 1, 1, 3, 4] and p.routed_ids.tolist() == [4, 4, 7, 7]
    assert list(zip(p.routed_rows().tolist(), p.routed_ids.tolist(), strict=True)) == [(0, 4), (2, 4), (2, 7), (3, 7)]
    with pytest.raises(UserError, match="not found; run `specialists evaluate` first"):
        read_predictions(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UserError, match="bad.npz: not a predictions file"):
        read_predictions(tmp_path / "bad.npz")
    write_predictions(path, split="val", num_classes=2, label=label, predicted={"generalist": label},
                      covering=label, specialist_ids=[0])
    with pytest.raises(UserError, match=r"label holds a class outside 0\.\.1"):
        read_predictions(path)
    with pytest.raises(ValueError, match="predictions of 'generalist' have 3 rows but there are 4 labels"):
        write_predictions(path, split="val", num_classes=3, label=label, predicted={"generalist": label[:3]},
                          covering=label, specialist_ids=[0])


def test_settings_table_is_readable():
    table = settings_table({"seed": 0, "normalize": True, "coverage": None, "quality": {"lift": 3.66667},
                            "sha256": "ab" * 32, "classes": [1, 2]}, caption="clustering")
    assert "<caption>clustering</caption>" in table
    assert '<th scope="row">quality.lift</th><td>3.667</td>' in table
    assert "<td>yes</td>" in table and "<td>–</td>" in table and "<td>1, 2</td>" in table
    assert f'title="{"ab" * 32}">abababababababab…' in table  # long values cut, whole in the tooltip


def test_index_links_and_kept_pages(tmp_path):
    """The clustering report lists pages written after it (set_links) and keeps them when rewritten."""
    c = 6
    cov = np.cov(np.random.default_rng(0).dirichlet(np.ones(c), size=100), rowvar=False)
    out = tmp_path / "report"
    index = write_report(out, cov=cov, class_names=list("abcdef"), class_sets=[[0, 1, 2], [3, 4, 5]],
                         method={"seed": 0})
    assert '<nav id="reports" hidden></nav>' in index.read_text()
    (out / "evaluation-val.html").write_text("<html></html>")
    set_links(index, [("Evaluation on the val split", "evaluation-val.html")])
    text = index.read_text()
    assert text.count("<nav") == 1 and '<a href="evaluation-val.html">Evaluation on the val split</a>' in text
    assert "<pre>" not in text and '<th scope="row">seed</th>' in text  # the method as a table
    index = write_report(out, cov=cov, class_names=list("abcdef"), class_sets=[[0, 1, 2], [3, 4, 5]],
                         keep=["evaluation-val.html", "evaluation-val"], links=[("val", "evaluation-val.html")])
    assert (out / "evaluation-val.html").read_text() == "<html></html>"
    assert '<a href="evaluation-val.html">val</a>' in index.read_text()


# --- a tiny run's reports, in a browser -----------------------------------------------------------
def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def _browser():
    """Headless Debian Chromium driven by Playwright (no browser download); skipped where absent,
    except under CI, which installs both."""
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium (Debian package) and playwright (the dev extra)")
        pytest.skip("needs chromium and playwright")
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
                                     env={**os.environ, "HOME": profile})
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, page_path: Path) -> tuple[object, list[str]]:
    """The page loaded from disk, and every console error, page error and failed request on the way."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(page_path.as_uri(), wait_until="load")
    return page, problems


def _pairs_shown(page, section: str) -> list[tuple[int, int, int]]:
    rows = page.eval_on_selector_all(f"#{section}-pairs tr[data-true]",
                                     "rows => rows.map(r => [r.dataset.true, r.dataset.other, r.dataset.count])")
    return [tuple(int(v) for v in row) for row in rows]


def _pairs_counted(label: np.ndarray, wrong_answer: np.ndarray, mask: np.ndarray) -> list[tuple[int, int, int]]:
    counts = Counter(zip(label[mask].tolist(), wrong_answer[mask].tolist(), strict=True))
    return sorted(((a, b, n) for (a, b), n in counts.items()), key=lambda t: (-t[2], t[0], t[1]))[:TOP_PAIRS]


def test_both_reports_render_in_chromium(tiny_run, tmp_path):
    layout = RunLayout(tiny_run)
    evaluation = layout.evaluation_report("test")
    pages = [layout.report_index, evaluation, *sorted(layout.report_dir.glob("specialist-*.html"))]
    assert len(pages) == 5
    # The pairs, counted here from the raw arrays of the saved predictions (numpy only).
    with np.load(layout.predictions("test")) as npz:
        y, g, e = npz["label"], npz["pred.generalist"], npz["pred.ensemble"]
    fixed = _pairs_counted(y, g, (g != y) & (e == y))
    broken = _pairs_counted(y, e, (g == y) & (e != y))
    assert fixed and broken  # the tiny run changes some answers both ways: the check means something
    metrics = json.loads(layout.metrics("test").read_text())
    mc = metrics["predictors"]["ensemble"]["vs_generalist"]["mcnemar"]
    names = json.loads(DataLayout(tiny_run.parent / "data").classes.read_text())
    with _browser() as browser:
        for path in pages:
            page, problems = _open(browser, path)
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, "
                                                      "i.naturalWidth])")
            assert images, f"{path.name} shows no image"
            assert [src for src, complete, width in images if not complete or width == 0] == [], path.name
            assert problems == [], f"{path.name}: {problems}"
            if path == evaluation:
                assert _pairs_shown(page, "fixed") == fixed and _pairs_shown(page, "broken") == broken
                assert sum(n for *_, n in fixed) <= mc["c"] and sum(n for *_, n in broken) <= mc["b"]
                first = page.inner_text("#fixed-pairs tr[data-true] td")
                assert first.startswith(names[fixed[0][0]])
                text = page.inner_text("body")
                assert "Top-1 on the test split" in text and "Table 3: conditional accuracy on the test split" in text
                assert "val split" not in text  # every label names the split measured
                page.screenshot(path=str(tmp_path / "evaluation.png"), full_page=True)
            if path == layout.report_index:
                assert page.get_attribute("nav#reports a", "href") == evaluation.name
            page.close()


def test_any_predictor_in_the_metrics_is_reported(tmp_path):
    """A predictor the evaluation does not know (a distilled student, say) gets its top-1 row with
    McNemar's b / c / p and its own scatter panel; figures it lacks (table 3, 4) are left out."""
    from specialists.evaluation import mcnemar
    from specialists.reports.evaluation import build_report

    label = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    preds = {"generalist": np.array([0, 1, 1, 1, 2, 3, 3, 3]), "ensemble": np.array([0, 0, 1, 0, 2, 2, 3, 3]),
             "student": np.array([1, 0, 1, 1, 2, 2, 2, 3])}
    ok = {k: v == label for k, v in preds.items()}
    student_mc = mcnemar(ok["generalist"], ok["student"])
    metrics = {
        "run": "hand", "split": "val", "num_examples": 8, "num_classes": 4, "num_specialists": 1,
        "inference": {"top_n": 1, "correction": "none"}, "models": {"specialists": [{"id": 0, "applied": {
            "correction": "none", "dustbin_bias": 0.0, "temperature": 1.0}}]},
        "conditional_subset": {"num_examples": 8, "union_classes": 4},
        "predictors": {
            "generalist": {"correct": 6, "top1": 0.75, "conditional": {"correct": 6, "accuracy": 0.75}},
            "ensemble": {"correct": 7, "top1": 0.875, "conditional": {"correct": 7, "accuracy": 0.875},
                         "vs_generalist": {"change_correct": 1, "conditional_relative_change": 1 / 6,
                                           "mcnemar": mcnemar(ok["generalist"], ok["ensemble"])}},
            "student": {"correct": 6, "top1": 0.75, "vs_generalist": {"change_correct": 0, "mcnemar": student_mc}},
        },
        "specialists": [{"id": 0, "classes": [0, 1, 2, 3], "num_examples": 8, "specialist_accuracy": 0.5,
                         "generalist_accuracy": 0.75, "routed": 8, "routed_generalist_correct": 6,
                         "routed_correct": 7, "routed_change_correct": 1}],
    }
    path = tmp_path / "preds.npz"
    write_predictions(path, split="val", num_classes=4, label=label, predicted=preds, covering=np.ones(8),
                      specialist_ids=[0], routed=np.ones((8, 1), dtype=bool))
    examples = {c: np.full((2, 8, 8), 60 * c, dtype=np.uint8) for c in range(4)}
    page = build_report(tmp_path / "evaluation-val.html", tmp_path / "evaluation-val", metrics,
                        read_predictions(path), ["a", "b", "c", "d"], lambda classes: examples)
    text = page.read_text()
    assert (student_mc["b"], student_mc["c"]) == (2, 2)
    assert ('<tr><td>student</td><td class="num">6</td><td class="num">75.00%</td><td class="num">0</td>'
            f'<td class="num">2</td><td class="num">2</td><td class="num">{student_mc["p_value"]:.3g}</td></tr>') in text
    assert text.count("<td>student</td>") == 1  # not in table 3: it has no conditional figure
    assert 'data-true="0" data-other="1" data-count="1"' in text and 'data-true="1" data-other="0"' in text
    import matplotlib.pyplot as plt

    chart = plt.imread(tmp_path / "evaluation-val" / "classes.png")
    assert chart.shape[1] == round(100 * (4.2 * 2 + 0.6))  # two panels: ensemble and student
