"""The typefaces source: characters rendered from fonts, split by typeface design.

One small real font (tests/data/droid-subset.ttf, 41 characters) is written out under several
family names; each name is an uncatalogued face, hence its own design.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from fontTools.ttLib import TTFont
from PIL import Image, ImageFont

from specialists.config import TypefacesConfig
from specialists.data.prepare import prepare, typefaces
from specialists.errors import DataError, UserError
from specialists.layout import DataLayout

FONT = Path(__file__).parent / "data" / "droid-subset.ttf"
CHARS = "己已巳未末土士大太犬天夫人入八日曰目白百千干于午牛王玉主住往问间闻门口回田由甲申电"


def write_face(path: Path, family: str, *, drop: str = "", blank: str = "") -> Path:
    """The subset font renamed to ``family``; ``drop`` characters removed from its character map,
    ``blank`` ones mapped to an empty glyph."""
    font = TTFont(str(FONT))
    for rec in font["name"].names:
        if rec.nameID in (1, 4, 16):
            rec.string = family
    for table in font["cmap"].tables:
        for c in drop:
            table.cmap.pop(ord(c), None)
    if blank:
        from fontTools.ttLib.tables._g_l_y_f import Glyph

        cmap = font.getBestCmap()
        for c in blank:
            font["glyf"][cmap[ord(c)]] = Glyph()
    path.parent.mkdir(parents=True, exist_ok=True)
    font.save(str(path))
    return path


@pytest.fixture
def font_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fonts"
    write_face(d / "a.ttf", "Test Sans")
    write_face(d / "a-bold.ttf", "Test Sans")  # one design in two files: must stay on one side
    write_face(d / "sub/b.ttf", "Test Serif")
    write_face(d / "c.otf", "Test Kai", drop="己已")
    write_face(d / "d.ttf", "Test Hand")
    (d / "broken.ttf").write_bytes(b"not a font")
    return d


def tf_cfg(font_dir: Path, **kw) -> TypefacesConfig:
    base = TypefacesConfig(chars=CHARS, font_dirs=(str(font_dir),), val_designs=("test-serif",),
                           test_designs=("test-hand",), image_size=24, renders=2, eval_renders=1, workers=1)
    return replace(base, **kw)


def read_split(root: Path, split: str) -> list[tuple[str, int, np.ndarray]]:
    index = json.loads(DataLayout(root).index.read_text())
    out = []
    for shard in index["splits"][split]["shards"]:
        for s in wds.WebDataset(str(root / shard["name"]), shardshuffle=False):
            out.append((s["__key__"], int(s["cls"]), np.array(Image.open(io.BytesIO(s["png"])))))
    return out


def test_gb2312_level1_is_the_3755_hanzi_in_code_order():
    chars = typefaces.gb2312_level1()
    assert len(chars) == len(set(chars)) == 3755
    assert chars[0] == "啊" and chars[-1] == "座"
    assert all("\u4e00" <= c <= "\u9fff" for c in chars)


def test_select_chars_subset_is_seeded_and_keeps_order():
    cfg = TypefacesConfig(num_classes=100)
    a, b = typefaces.select_chars(cfg, 0), typefaces.select_chars(cfg, 0)
    assert a == b and len(set(a)) == 100
    full = typefaces.gb2312_level1()
    assert [full.index(c) for c in a] == sorted(full.index(c) for c in a)
    assert typefaces.select_chars(cfg, 1) != a
    with pytest.raises(UserError, match="num_classes=5000"):
        typefaces.select_chars(replace(cfg, num_classes=5000), 0)


def test_faces_designs_and_split(font_dir):
    faces = typefaces.find_faces([str(font_dir)], CHARS)
    assert sorted({f.design for f in faces}) == ["test-hand", "test-kai", "test-sans", "test-serif"]
    kai = next(f for f in faces if f.design == "test-kai")
    assert len(kai.codepoints) == len(CHARS) - 2 and ord("己") not in kai.codepoints
    split = typefaces.split_faces(faces, tf_cfg(font_dir))
    assert {f.design for f in split.train} == {"test-sans", "test-kai"}
    assert [f.design for f in split.val] == ["test-serif"] and [f.design for f in split.test] == ["test-hand"]


def test_catalogue_groups_near_duplicates():
    assert typefaces.design_of("WenQuanYi Micro Hei", "WenQuanYi Micro Hei")[0].name == "droid"
    assert typefaces.design_of("TakaoPGothic", "TakaoPGothic")[0].name == "ipa-gothic"
    assert typefaces.design_of("Klee One SemiBold", "Klee One")[0].name == "wenkai"
    assert typefaces.design_of("Noto Sans CJK SC Bold", "Noto Sans CJK SC") == (typefaces.CATALOG[0], True)
    # Another cut of a catalogued design is skipped, not made a design of its own.
    assert typefaces.design_of("Noto Sans CJK JP", "Noto Sans CJK JP") == (typefaces.CATALOG[0], False)
    assert typefaces.design_of("AR PL UKai TW", "AR PL UKai TW")[1] is False


def test_render_glyph_is_seeded_and_inked():
    font = ImageFont.truetype(str(FONT), size=55)
    clean = typefaces.render_glyph(font, "己", 32, None)
    assert clean.shape == (32, 32) and clean.dtype == np.uint8 and clean.max() > 200
    # Centred on the em box: ink balanced around the middle.
    ys, xs = np.nonzero(clean > 64)
    assert abs(ys.mean() - 15.5) < 3 and abs(xs.mean() - 15.5) < 3
    a = typefaces.render_glyph(font, "己", 32, np.random.default_rng(5))
    b = typefaces.render_glyph(font, "己", 32, np.random.default_rng(5))
    c = typefaces.render_glyph(font, "己", 32, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Distorted but still the same glyph: far closer to its own clean render than to 已's.
    other = typefaces.render_glyph(font, "巳", 32, None).astype(float)
    d_own, d_other = np.abs(a - clean.astype(float)).mean(), np.abs(clean - other).mean()
    assert d_own < 60 and d_other > 3


def test_prepare_typefaces_counts_split_and_card(font_dir, tmp_path):
    cfg = tf_cfg(font_dir)
    out = prepare("typefaces", tmp_path / "shards", seed=0, shard_size=64, typefaces_cfg=cfg)
    assert json.loads(DataLayout(out).classes.read_text()) == list(CHARS)
    n = len(CHARS)
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    # train: two Test Sans files (one face name: the larger file kept) + Test Kai without 己已.
    assert len(train) == 2 * (n + n - 2) and len(val) == n and len(test) == n
    assert {k.split("-u")[0] for k, _, _ in train} == {"test-sans", "test-kai"}
    assert {k.split("-u")[0] for k, _, _ in val} == {"test-serif"}
    assert {k.split("-u")[0] for k, _, _ in test} == {"test-hand"}
    for key, label, image in train[:20] + test[:20]:
        assert image.shape == (24, 24) and image.max() > 100
        assert key.split("-u")[1][:5] == f"{ord(CHARS[label]):05x}"  # the label is the character drawn
    card = DataLayout(out).card.read_text()
    assert "Test Serif" in card and ("a.ttf" in card or "a-bold.ttf" in card)
    assert "## test: 41 images, designs test-hand" in card


def test_prepare_is_reproducible_across_worker_counts(font_dir, tmp_path):
    digests = []
    for workers in (1, 2):
        out = prepare("typefaces", tmp_path / f"w{workers}", seed=3, shard_size=1000,
                      typefaces_cfg=tf_cfg(font_dir, workers=workers))
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))})
    assert digests[0] == digests[1] and len(digests[0]) == 4  # train, val, test, byclass


def test_blank_glyphs_are_skipped_and_reported(tmp_path):
    d = tmp_path / "fonts"
    write_face(d / "a.ttf", "Test Sans", blank="大")
    write_face(d / "b.ttf", "Test Serif")
    write_face(d / "c.ttf", "Test Hand")
    write_face(d / "e.ttf", "Test Kai")
    out = prepare("typefaces", tmp_path / "s", typefaces_cfg=tf_cfg(d))
    train = read_split(out, "train")
    assert len(train) == 2 * (2 * len(CHARS) - 1)
    assert not any(k.startswith("test-sans-u05927") for k, _, _ in train)
    assert "Test Sans: 大" in DataLayout(out).card.read_text()


def test_missing_fonts_and_characters_are_one_line_errors(font_dir, tmp_path, cli):
    with pytest.raises(DataError, match=r"no font under .*nowhere has any of the 41 characters"):
        prepare("typefaces", tmp_path / "x", typefaces_cfg=tf_cfg(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="1 requested characters are in no installed font.*: 龘"):
        prepare("typefaces", tmp_path / "x", typefaces_cfg=tf_cfg(font_dir, chars=CHARS + "龘"))
    with pytest.raises(DataError, match=r"test_designs: noto-serif not installed .*fonts-noto-cjk"):
        prepare("typefaces", tmp_path / "x", typefaces_cfg=tf_cfg(font_dir, test_designs=("noto-serif",)))
    # A val typeface lacking characters that no other val typeface has.
    with pytest.raises(DataError, match="2 characters have no glyph in any val typeface .*: 己已"):
        prepare("typefaces", tmp_path / "x", typefaces_cfg=tf_cfg(font_dir, val_designs=("test-kai",)))
    assert not (tmp_path / "x").exists()  # nothing half-written
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: typefaces\n  shards: {tmp_path / 'y'}\n  typefaces:\n"
                   f"    font_dirs: [{tmp_path / 'nowhere'}]\n")
    code, out, err = cli("prepare", "--config", cfg)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "no font under" in err


def test_renders_split_is_iid_and_disjoint(font_dir, tmp_path):
    """split=renders: every face in every split, no image bytes in two splits, every face that has a
    character has it in every split; the card says which split was made."""
    cfg = tf_cfg(font_dir, split="renders", renders=3, eval_renders=2)
    out = prepare("typefaces", tmp_path / "iid", seed=0, shard_size=64, typefaces_cfg=cfg)
    splits = {s: read_split(out, s) for s in ("train", "val", "test")}
    faces = typefaces.find_faces([str(font_dir)], CHARS)
    pairs = {(f.key, cp) for f in faces for cp in f.codepoints}
    for split, renders in (("train", 3), ("val", 2), ("test", 2)):
        got = [(k.split("-u")[0], int(k.split("-u")[1][:5], 16)) for k, _, _ in splits[split]]
        assert sorted(set(got)) == sorted(pairs)  # every (face, character) the fonts have, in every split
        assert len(got) == renders * len(pairs)
    digests = {s: {hashlib.sha256(image.tobytes()).hexdigest() for _, _, image in v} for s, v in splits.items()}
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    render_numbers = {s: {int(k.rsplit("-", 1)[1]) for k, _, _ in v} for s, v in splits.items()}
    assert render_numbers == {"train": {0, 1, 2}, "val": {3, 4}, "test": {5, 6}}
    assert "Split **by renders** (i.i.d.)" in DataLayout(out).card.read_text()
    # the design split of the same faces keeps its render numbers (existing data sets do not change)
    assert typefaces.render_offset(tf_cfg(font_dir), "test") == 0
    with pytest.raises(UserError, match="distortion=0"):
        prepare("typefaces", tmp_path / "flat", typefaces_cfg=replace(cfg, distortion=0.0))
