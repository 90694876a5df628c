"""write_report: every referenced file exists; the index names every specialist."""

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from clustering import summary, write_report


@pytest.fixture()
def inputs():
    c = 12
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(c) * 0.3, size=500)
    cov = torch.from_numpy(np.cov(x, rowvar=False, bias=True))
    names = [chr(0x4E00 + i) for i in range(c)]  # CJK characters
    sets = [[0, 1, 2, 3], [3, 4, 5], [6, 7, 8, 9]]  # 10, 11 uncovered
    examples = {i: rng.integers(0, 256, size=(6, 64, 64), dtype=np.uint8) for i in range(c)}
    examples[5] = rng.integers(0, 256, size=(2, 20, 20, 3), dtype=np.uint8)
    confusion = rng.integers(0, 5, size=(c, c)) + np.diag(np.full(c, 50))
    return cov, names, sets, examples, confusion


def _links(page: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page.read_text(encoding="utf-8"))


def test_report_files_exist_and_index_names_every_specialist(tmp_path, inputs):
    cov, names, sets, examples, confusion = inputs
    index = write_report(
        tmp_path / "report", cov=cov, class_names=names, class_sets=sets,
        examples=examples, confusion=confusion, method={"method": "faiss", "seed": 0},
    )
    assert index == tmp_path / "report" / "index.html"
    pages = sorted(index.parent.glob("*.html"))
    assert [p.name for p in pages] == ["index.html"] + [f"specialist-{m:03d}.html" for m in range(3)]
    for page in pages:
        for link in _links(page):
            assert (page.parent / link).is_file(), f"{page.name} links to missing {link}"
    text = index.read_text(encoding="utf-8")
    for m in range(3):
        assert f'href="specialist-{m:03d}.html"' in text and f"specialist {m}<" in text
    assert names[4] in (index.parent / "specialist-001.html").read_text(encoding="utf-8")
    assert len(list((index.parent / "strips").glob("*.png"))) == 10  # covered classes only
    # A glyph sheet: one 48-px tile (64 px, stride 2 → 32 px) per class of set 0, side by side.
    page = (index.parent / "specialist-000.html").read_text(encoding="utf-8")
    assert 'src="sheet-000.png"' in page
    sheet = plt.imread(index.parent / "sheet-000.png")
    assert sheet.shape[:2] == (32 + 2, 4 * (32 + 2))
    assert not (index.parent / "sheet-001.png").exists()  # set 1 mixes image shapes: no sheet
    # The most confused pair inside set 0, with its count.
    block = confusion[np.ix_(sets[0], sets[0])].copy()
    np.fill_diagonal(block, 0)
    a, b = np.unravel_index(np.argmax(block), block.shape)
    row = f"<tr><td>{names[sets[0][a]]}</td><td>{names[sets[0][b]]}</td><td>{block[a, b]}</td>"
    assert row in page
    stats = json.loads((index.parent / "summary.json").read_text(encoding="utf-8"))
    assert stats["uncovered_classes"] == 2
    assert stats["coverage_counts"] == {"0": 2, "1": 9, "2": 1}
    assert not list(tmp_path.glob(".report*"))  # no temp dirs left behind


def test_report_replaces_an_old_one_without_examples(tmp_path, inputs):
    cov, names, sets, _, _ = inputs
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_report(out, cov=cov, class_names=names, class_sets=sets)
    assert not (out / "stale.txt").exists() and (out / "covariance.png").is_file()
    for page in out.glob("*.html"):
        assert all((out / link).is_file() for link in _links(page))


def test_summary_figures_by_hand():
    cov = np.array(
        [[1.0, 0.3, -0.2, 0.0], [0.3, 1.0, 0.1, 0.0], [-0.2, 0.1, 1.0, 0.4], [0.0, 0.0, 0.4, 1.0]]
    )
    confusion = np.array([[8, 2, 0, 0], [1, 9, 0, 0], [0, 3, 5, 2], [0, 0, 0, 10]])
    stats = summary(cov, [[0, 1], [2, 3]], confusion=confusion)
    # positive off-diagonal mass: 2*(0.3 + 0.1 + 0.4) = 1.6, within sets 2*(0.3 + 0.4) = 1.4
    assert stats["within_set_mass"] == pytest.approx(1.4 / 1.6)
    assert stats["chance_pair_share"] == pytest.approx(4 / 12)
    # errors: 2 + 1 (inside {0,1}), 3 (2->1, outside), 2 (2->3, inside) -> 5 of 8
    assert stats["error_share_inside"] == pytest.approx(5 / 8)
    assert stats["specialists"][1]["error_share_inside"] == pytest.approx(2 / 5)
    assert stats["specialists"][0]["within_set_mass"] == pytest.approx(0.6 / 0.7)


def test_report_errors(tmp_path, inputs):
    cov, names, sets, _, _ = inputs
    with pytest.raises(ValueError, match="class_names has 3 names but cov has 12 classes"):
        write_report(tmp_path / "r", cov=cov, class_names=names[:3], class_sets=sets)
    with pytest.raises(ValueError, match=r"class_sets\[1\] has a class outside 0..11"):
        write_report(tmp_path / "r", cov=cov, class_names=names, class_sets=[[0, 1], [5, 12]])
    with pytest.raises(ValueError, match=r"examples\[2\] has shape \(3, 8\)"):
        write_report(tmp_path / "r", cov=cov, class_names=names, class_sets=sets,
                     examples={2: np.zeros((3, 8), dtype=np.uint8)})
    assert not (tmp_path / "r").exists()
