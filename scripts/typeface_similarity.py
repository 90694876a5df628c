"""How alike are the installed typefaces? The measurement behind the design groups of
``specialists.prepare.typefaces.CATALOG`` (docs/DATA-typefaces.md).

For every face that would be rendered, and for one face of each skipped cut, the clean glyphs of a
seeded sample of GB2312 level-1 characters are rendered at 64×64, cropped to their ink and reduced to 32×32; two faces' similarity is the
mean Pearson correlation of their glyphs over the characters both have. Near-duplicates (derived
fonts, regional cuts) score far above different designs of the same style.

    .venv/bin/python scripts/typeface_similarity.py [--chars 300] [--faces all]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import ImageFont

from specialists.data.prepare import typefaces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=300)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--font-dir", action="append", default=None)
    args = ap.parse_args()
    dirs = args.font_dir or ["/usr/share/fonts"]
    chars = typefaces.gb2312_level1()
    rng = np.random.default_rng(0)
    chars = [chars[i] for i in np.sort(rng.choice(len(chars), args.chars, replace=False))]
    faces = typefaces.find_faces(dirs, chars)
    # Also one cut the catalogue skips, to show it duplicates a rendered one.
    extra = {"Noto Sans CJK JP", "AR PL UKai HK", "IPAPGothic", "Noto Sans CJK SC Medium"}
    faces += [f for f in _all_faces(dirs, chars) if f.name in extra]
    glyphs = {}
    for face in faces:
        font = ImageFont.truetype(face.path, size=int(round(args.size * 2 * 0.86)), index=face.index)
        g = np.full((len(chars), 32 * 32), np.nan, dtype=np.float32)
        for i, c in enumerate(chars):
            if ord(c) in face.codepoints:
                img = _ink_box(typefaces.render_glyph(font, c, args.size * 2, None)).ravel()
                if img.std() > 0:
                    g[i] = (img - img.mean()) / img.std()
        glyphs[face.name] = g
    names = list(glyphs)
    design = {f.name: f.design for f in faces}
    sim = np.zeros((len(names), len(names)))
    for a in range(len(names)):
        for b in range(len(names)):
            ga, gb = glyphs[names[a]], glyphs[names[b]]
            both = ~np.isnan(ga[:, 0]) & ~np.isnan(gb[:, 0])
            sim[a, b] = (ga[both] * gb[both]).mean() if both.any() else np.nan
    print(f"{len(names)} faces, {len(chars)} characters; most similar other face of each:")
    for a, name in enumerate(names):
        order = [b for b in np.argsort(-sim[a]) if b != a]
        other_design = next(b for b in order if design[names[b]] != design[name])
        same = [b for b in order if design[names[b]] == design[name]]
        same_txt = f"same design: {names[same[0]]} {sim[a, same[0]]:.2f}" if same else "same design: —"
        print(f"  {name:32s} [{design[name]:10s}] {same_txt:52s} other design: "
              f"{names[other_design]} ({design[names[other_design]]}) {sim[a, other_design]:.2f}")
    designs = sorted(set(design.values()))
    print("\nmean similarity between designs (max over their faces):")
    print(" " * 12 + " ".join(f"{d[:7]:>7s}" for d in designs))
    for da in designs:
        row = []
        for db in designs:
            ia = [i for i, n in enumerate(names) if design[n] == da]
            ib = [i for i, n in enumerate(names) if design[n] == db]
            vals = [sim[i, j] for i in ia for j in ib if i != j]
            row.append(f"{max(vals):7.2f}" if vals else "      —")
        print(f"{da[:11]:11s} " + " ".join(row))


def _ink_box(glyph: np.ndarray) -> np.ndarray:
    """The glyph cropped to its ink, padded square and resized to 32×32: compares shapes, not
    the placement and size that font metrics give them."""
    from PIL import Image

    ys, xs = np.nonzero(glyph > 32)
    if len(ys) == 0:
        return np.zeros((32, 32), np.float32)
    crop = glyph[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), np.uint8)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    return np.asarray(Image.fromarray(square).resize((32, 32), Image.Resampling.BOX), dtype=np.float32)


def _all_faces(dirs, chars):
    """Every face, rendered or not (the catalogue's skipped cuts included)."""
    saved = typefaces.design_of
    try:
        typefaces.design_of = lambda name, family: (saved(name, family)[0], True)
        return typefaces.find_faces(dirs, chars)
    finally:
        typefaces.design_of = saved


if __name__ == "__main__":
    main()
