"""Chinese characters rendered from the typefaces Debian ships: thousands of real, confusable classes.

The classes are the 3,755 level-1 characters of GB2312 (rows 16–55; the class set of the
CASIA-HWDB benchmark), or a seeded subset of them. Every installed font face that really has a
glyph for a character (its character map says so and the glyph has ink) renders it with seeded
augmentation: affine jitter, stroke thickness, blur and noise. Two splits:

* ``design`` (default): faces of one design (weights, regional variants, derived fonts) all go to
  one of train / val / test, so val and test measure generalisation to typefaces never seen in
  training — a generalisation-limited task.
* ``renders``: every face is in every split, with disjoint renders (train renders 0..R-1, val the
  next ``eval_renders``, test the ones after): i.i.d. splits of one distribution, where more data
  and capacity pay — the paper's JFT regime.

Fonts are found by their face names (``CATALOG``); a face that is not catalogued is its own
design, named by its family. Rendering runs in worker processes, one font face per task.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ...config import TypefacesConfig
from ...errors import DataError, UserError
from ...progress import progress_bar
from .writer import Record, encode_png

log = logging.getLogger(__name__)

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")


@dataclass(frozen=True)
class Design:
    """One typeface design: the faces whose full name starts with ``family`` belong to it;
    those whose full name is matched whole by ``use`` are rendered."""

    name: str
    style: str  # hei (sans) | song (serif, Ming) | kai (brush) | hand (handwriting)
    packages: str  # Debian packages that ship it
    family: str  # regular expression, matched at the start of the face's full name (name ID 4)
    use: str  # regular expression, matched against the whole full name


# Near-duplicates share a design so they stay on one side of the split: regional cuts (Noto
# SC/TC/JP/KR/HK, UKai CN/TW/HK), proportional and derived fonts (IPA → IPAex → Takao; Micro Hei
# from Droid Sans Fallback; LXGW WenKai from Klee One) and the weights of one family. Of each
# design only faces that add variety are rendered (``use``): scripts/typeface_similarity.py finds
# Micro Hei = Droid, Takao = IPA, Zen Hei Sharp = Zen Hei and the CN/TW/HK cuts of UKai and UMing
# identical on these characters (correlation 1.00), and other faces of one design at 0.72–0.95
# against at most 0.69 between designs (docs/DATA-typefaces.md).
CATALOG: tuple[Design, ...] = (
    Design("noto-sans", "hei", "fonts-noto-cjk fonts-noto-cjk-extra", r"Noto Sans (Mono )?CJK",
           r"Noto Sans CJK SC( Bold)?"),
    Design("noto-serif", "song", "fonts-noto-cjk fonts-noto-cjk-extra", r"Noto Serif CJK",
           r"Noto Serif CJK SC( Bold)?"),
    Design("droid", "hei", "fonts-droid-fallback fonts-wqy-microhei", r"Droid Sans Fallback|WenQuanYi Micro Hei",
           r"Droid Sans Fallback"),
    Design("wqy-zenhei", "hei", "fonts-wqy-zenhei", r"WenQuanYi Zen Hei", r"WenQuanYi Zen Hei"),
    Design("ipa-gothic", "hei", "fonts-ipafont-gothic fonts-ipaexfont-gothic fonts-takao-gothic",
           r"IPA\w*Gothic|Takao\w*Gothic", r"IPAexGothic"),
    Design("vl-gothic", "hei", "fonts-vlgothic", r"VL P?Gothic", r"VL Gothic Regular"),
    Design("uming", "song", "fonts-arphic-uming", r"AR PL UMing", r"AR PL UMing CN"),
    Design("ipa-mincho", "song", "fonts-ipafont-mincho fonts-ipaexfont-mincho", r"IPA\w*Mincho",
           r"IPAexMincho"),
    Design("hanamin", "song", "fonts-hanazono", r"HanaMin", r"HanaMinA Regular"),
    Design("tw-sung", "song", "fonts-cns11643-sung", r"TW-Sung", r"TW-Sung"),
    Design("ukai", "kai", "fonts-arphic-ukai", r"AR PL UKai", r"AR PL UKai CN"),
    Design("tw-kai", "kai", "fonts-cns11643-kai", r"TW-Kai", r"TW-Kai"),
    Design("cwtex-kai", "kai", "fonts-cwtex-kai", r"cwTeXKai", r"cwTeXKai"),
    Design("wenkai", "kai", "fonts-lxgw-wenkai fonts-klee", r"LXGW WenKai|Klee One",
           r"LXGW WenKai|Klee One Regular"),
    Design("seto", "hand", "fonts-seto", r"SetoFont", r"SetoFont"),
)


@dataclass(frozen=True)
class Face:
    path: str
    index: int  # face number inside a .ttc/.otc collection
    name: str  # full name, e.g. "Noto Sans CJK SC Bold"
    design: str
    style: str
    packages: str
    codepoints: frozenset[int] = field(repr=False, compare=False)

    @property
    def key(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def gb2312_level1() -> list[str]:
    """The 3,755 level-1 hanzi of GB2312 (rows 16–55), in code order (by pinyin)."""
    chars = []
    for row in range(16, 56):
        for cell in range(1, 95):
            try:
                chars.append(bytes([0xA0 + row, 0xA0 + cell]).decode("gb2312"))
            except UnicodeDecodeError:  # row 55 ends at cell 89
                pass
    return chars


def select_chars(cfg: TypefacesConfig, seed: int) -> list[str]:
    """The class characters: ``chars`` (gb2312-1 | file:PATH | the characters themselves), then
    a seeded subset of ``num_classes`` of them, kept in their original order."""
    spec = cfg.chars
    if spec == "gb2312-1":
        chars = gb2312_level1()
    elif spec.startswith("file:"):
        path = Path(spec[5:])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read the character list ({e})") from None
        chars = [c for c in text if not c.isspace()]
    else:
        chars = [c for c in spec if not c.isspace()]
    seen: set[str] = set()
    unique = [c for c in chars if not (c in seen or seen.add(c))]
    if len(unique) < 2:
        raise UserError(f"typefaces chars={spec!r}: expected at least 2 distinct characters")
    n = cfg.num_classes
    if n is not None:
        if not 2 <= n <= len(unique):
            raise UserError(f"typefaces num_classes={n}: expected 2..{len(unique)} (the size of {spec!r})")
        keep = np.sort(np.random.default_rng([seed, 23]).choice(len(unique), n, replace=False))
        unique = [unique[i] for i in keep]
    return unique


def _font_files(dirs: Iterable[str]) -> list[Path]:
    files = []
    for d in dirs:
        root = Path(d)
        if root.is_dir():
            files += [p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file()]
    # One entry per real file: Debian links the same font into several directories.
    unique = {p.resolve(): p for p in sorted(files)}
    return sorted(unique)


def design_of(name: str, family: str) -> tuple[Design, bool]:
    """The design of a face and whether to render it; an uncatalogued face is its own design."""
    for design in CATALOG:
        if re.match(design.family, name):
            return design, re.fullmatch(design.use, name) is not None
    slug = re.sub(r"[^a-z0-9]+", "-", family.lower()).strip("-")
    return Design(slug, "other", "", re.escape(family), re.escape(name)), True


def find_faces(font_dirs: Sequence[str], chars: Sequence[str]) -> list[Face]:
    """Every face under ``font_dirs`` whose character map has at least one of ``chars``."""
    from fontTools.ttLib import TTCollection, TTFont, TTLibError

    wanted = {ord(c) for c in chars}
    faces = []
    for path in _font_files(font_dirs):
        try:
            if path.suffix.lower() in (".ttc", ".otc"):
                fonts = list(TTCollection(str(path), lazy=True).fonts)
            else:
                fonts = [TTFont(str(path), lazy=True)]
        except (TTLibError, OSError, AssertionError, struct_error) as e:
            log.warning("%s: not a readable font (%s); skipped", path, e)
            continue
        for index, font in enumerate(fonts):
            cmap = font.getBestCmap() or {}
            have = frozenset(wanted.intersection(cmap))
            if not have:
                continue
            name = font["name"].getDebugName(4) or path.stem
            family = font["name"].getDebugName(1) or name
            design, use = design_of(name, family)
            if use:
                faces.append(Face(str(path), index, name, design.name, design.style, design.packages, have))
    # Two files can hold one face (Droid Sans Fallback and its "Full" build): keep the larger.
    by_name: dict[str, Face] = {}
    for face in faces:
        if face.name not in by_name or len(face.codepoints) > len(by_name[face.name].codepoints):
            by_name[face.name] = face
    return sorted(by_name.values(), key=lambda f: (f.design, f.name))


@dataclass(frozen=True)
class Split:
    train: list[Face]
    val: list[Face]
    test: list[Face]

    def items(self):
        return (("train", self.train), ("val", self.val), ("test", self.test))


def split_faces(faces: Sequence[Face], cfg: TypefacesConfig) -> Split:
    """``design``: val and test designs from the config, every other installed design trains.
    ``renders``: every face not excluded in all three splits (renders keep them apart)."""
    designs = {f.design for f in faces}
    excluded = set(cfg.exclude_designs)
    if cfg.split == "renders":
        if cfg.distortion <= 0:
            raise UserError("typefaces split=renders with distortion=0: every render of a glyph would be the same "
                            "image in train, val and test; use a distortion > 0")
        kept = [f for f in faces if f.design not in excluded]
        if not kept:
            raise DataError(f"typefaces: no typeface left (installed designs: {', '.join(sorted(designs)) or 'none'}; "
                            f"excluded: {', '.join(sorted(excluded))})")
        return Split(train=list(kept), val=list(kept), test=list(kept))
    for role, names in (("val", cfg.val_designs), ("test", cfg.test_designs)):
        missing = [n for n in names if n not in designs]
        if missing:
            hint = {d.name: d.packages for d in CATALOG}
            pkgs = " ".join(sorted({hint[n] for n in missing if n in hint})) or "a font of that family"
            raise DataError(f"typefaces {role}_designs: {', '.join(missing)} not installed under "
                            f"{', '.join(cfg.font_dirs)} (install {pkgs}; installed: {', '.join(sorted(designs)) or 'none'})")
    both = set(cfg.val_designs) & set(cfg.test_designs)
    if both:
        raise UserError(f"typefaces: {', '.join(sorted(both))} is in both val_designs and test_designs")
    held = set(cfg.val_designs) | set(cfg.test_designs) | excluded
    split = Split(
        train=[f for f in faces if f.design not in held],
        val=[f for f in faces if f.design in cfg.val_designs],
        test=[f for f in faces if f.design in cfg.test_designs],
    )
    for role, members in split.items():
        if not members:
            raise DataError(f"typefaces: no {role} typeface (installed designs: {', '.join(sorted(designs)) or 'none'}; "
                            "scripts/install-fonts.sh installs the Debian CJK font packages)")
    return split


# ---------------------------------------------------------------------------------------------
# Rendering


def _seed(seed: int, face: Face, codepoint: int, render: int) -> list[int]:
    return [seed, zlib.crc32(face.name.encode()), codepoint, render]


def render_glyph(
    font: ImageFont.FreeTypeFont, char: str, size: int, rng: np.random.Generator | None, *,
    supersample: int = 2, distortion: float = 1.0,
) -> np.ndarray:
    """A (size, size) uint8 image of ``char``, white ink on black, centred on the em box.

    With ``rng`` the glyph is distorted: scale, shift, rotation and shear, stroke thickness (one
    pixel of dilation or erosion at the supersampled size), Gaussian blur and noise; ``distortion``
    scales every amplitude. Without ``rng`` it is the clean glyph.
    """
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if rng is None:
        draw.text((big / 2, big / 2), char, fill=255, font=font, anchor="mm")
        return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
    d = distortion
    cx = big / 2 + rng.uniform(-0.06, 0.06) * d * big
    cy = big / 2 + rng.uniform(-0.06, 0.06) * d * big
    draw.text((cx, cy), char, fill=255, font=font, anchor="mm")
    scale = 1.0 + rng.uniform(-0.08, 0.06) * d
    angle = np.deg2rad(rng.uniform(-5, 5) * d)
    shear = rng.uniform(-0.12, 0.12) * d
    # Inverse map of output → input about the centre (PIL's AFFINE takes the inverse).
    a, b = np.cos(angle) / scale, (np.sin(angle) + shear) / scale
    c, e = -np.sin(angle) / scale, np.cos(angle) / scale
    h = big / 2
    canvas = canvas.transform((big, big), Image.Transform.AFFINE,
                              (a, b, h - a * h - b * h, c, e, h - c * h - e * h), Image.Resampling.BILINEAR)
    stroke = rng.random()
    if stroke < 0.25 * min(1.0, d):
        canvas = canvas.filter(ImageFilter.MaxFilter(3))
    elif stroke > 1 - 0.2 * min(1.0, d):
        thinner = canvas.filter(ImageFilter.MinFilter(3))
        # Keep hairline faces legible: erode only while most of the ink survives.
        if np.asarray(thinner, dtype=np.float32).sum() > 0.6 * np.asarray(canvas, dtype=np.float32).sum():
            canvas = thinner
    small = canvas.resize((size, size), Image.Resampling.BOX)
    if rng.random() < 0.5:
        small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7) * d))
    image = np.asarray(small, dtype=np.float32)
    image = image * rng.uniform(0.75, 1.0) + rng.normal(0.0, rng.uniform(0, 10) * d, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


@dataclass(frozen=True)
class _Task:
    face: Face
    split: str
    renders: int
    items: tuple[tuple[int, str], ...]  # (label, char)
    first: int = 0  # number of the first render (the renders split keeps the splits' renders apart)


@dataclass(frozen=True)
class _Result:
    face: Face
    split: str
    renders: int
    records: list[Record]
    blank: list[str]  # characters the face maps but draws without ink


_RENDER = {"size": 32, "supersample": 2, "distortion": 1.0, "seed": 0}


def _init_worker(options: dict) -> None:
    _RENDER.update(options)


def _render_task(task: _Task) -> _Result:
    size, ss, dist, seed = (_RENDER[k] for k in ("size", "supersample", "distortion", "seed"))
    face = task.face
    font = ImageFont.truetype(face.path, size=int(round(size * ss * 0.86)), index=face.index)
    records, blank = [], []
    for label, char in task.items:
        cp = ord(char)
        if not np.asarray(render_glyph(font, char, size, None, supersample=ss)).any():
            blank.append(char)  # mapped to an empty glyph: not really in the font
            continue
        for r in range(task.first, task.first + task.renders):
            rng = np.random.default_rng(_seed(seed, face, cp, r))
            image = render_glyph(font, char, size, rng, supersample=ss, distortion=dist)
            records.append(Record(f"{face.key}-u{cp:05x}-{r}", label, "png", encode_png(image)))
    return _Result(face, task.split, task.renders, records, blank)


def render_offset(cfg: TypefacesConfig, role: str) -> int:
    """The first render number of a split: 0 for all under the design split (other faces), and
    0 / renders / renders + eval_renders for train / val / test under the renders split."""
    if cfg.split != "renders":
        return 0
    return {"train": 0, "val": cfg.renders, "test": cfg.renders + cfg.eval_renders}[role]


def render_splits(
    chars: Sequence[str], split: Split, cfg: TypefacesConfig, seed: int
) -> tuple[dict[str, list[Record]], dict]:
    """Render every (face, character) pair of every split; returns records by split and a census."""
    tasks = []
    for role, faces in split.items():
        renders = cfg.renders if role == "train" else cfg.eval_renders
        first = render_offset(cfg, role)
        for face in faces:
            items = tuple((label, c) for label, c in enumerate(chars) if ord(c) in face.codepoints)
            # Chunks keep the pool busy to the end and the progress bar moving.
            for start in range(0, len(items), 400):
                tasks.append(_Task(face, role, renders, items[start : start + 400], first))
    options = {"size": cfg.image_size, "supersample": cfg.supersample, "distortion": cfg.distortion, "seed": seed}
    workers = cfg.workers or os.cpu_count() or 1
    records: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    blank: dict[str, list[str]] = defaultdict(list)
    total = sum(len(t.items) * t.renders for t in tasks)
    bar = progress_bar(total, desc="render", unit="img")
    if workers == 1:
        _init_worker(options)
        results: Iterable[_Result] = map(_render_task, tasks)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(options,))
        results = pool.imap(_render_task, tasks)
    try:
        for res in results:
            records[res.split] += res.records
            blank[res.face.name] += res.blank
            done = len(res.records) + len(res.blank) * res.renders
            bar.update(done, images=done)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    census = _census(chars, split, records, blank)
    return records, census


def _census(chars: Sequence[str], split: Split, records: dict[str, list[Record]], blank: dict) -> dict:
    """Per split: faces, and the classes every split must have at least once."""
    num = len(chars)
    census: dict = {"splits": {}, "blank_glyphs": {k: "".join(v) for k, v in blank.items() if v}}
    for role, faces in split.items():
        counts = np.bincount([r.label for r in records[role]], minlength=num)
        missing = [chars[i] for i in np.flatnonzero(counts == 0)]
        if missing:
            raise DataError(f"typefaces: {len(missing)} characters have no glyph in any {role} typeface "
                            f"({', '.join(sorted({f.design for f in faces}))}): {_shown(missing)}")
        census["splits"][role] = {
            "images": len(records[role]),
            "designs": sorted({f.design for f in faces}),
            "faces": [{"name": f.name, "file": f.path, "index": f.index, "design": f.design, "style": f.style,
                       "packages": f.packages, "characters": sum(ord(c) in f.codepoints for c in chars)
                       - len(blank.get(f.name, []))} for f in faces],
        }
    return census


def _shown(chars: Sequence[str], limit: int = 20) -> str:
    return "".join(chars[:limit]) + ("…" if len(chars) > limit else "")


def check_chars_available(chars: Sequence[str], faces: Sequence[Face], font_dirs: Sequence[str]) -> None:
    if not faces:
        raise DataError(f"typefaces: no font under {', '.join(font_dirs)} has any of the {len(chars)} characters "
                        "(install CJK fonts: scripts/install-fonts.sh, or e.g. apt-get install fonts-noto-cjk)")
    have = set().union(*(f.codepoints for f in faces))
    missing = [c for c in chars if ord(c) not in have]
    if missing:
        raise DataError(f"typefaces: {len(missing)} requested characters are in no installed font "
                        f"under {', '.join(font_dirs)}: {_shown(missing)}")


def data_card(chars: Sequence[str], census: dict, cfg: TypefacesConfig, seed: int) -> str:
    """DATA.md: what was rendered from which fonts, and how it was split."""
    lines = [
        "# Typefaces: Chinese characters rendered from installed fonts",
        "",
        f"- Classes: {len(chars)} characters ({cfg.chars}"
        + (f", seeded subset of {cfg.num_classes}" if cfg.num_classes else "") + "); `classes.json` lists them.",
        f"- Images: {cfg.image_size}×{cfg.image_size} grayscale, white ink on black, rendered at "
        f"{cfg.supersample}× and reduced; distortion {cfg.distortion} (scale, shift, rotation, shear, "
        "stroke dilation/erosion, blur, noise), seeded by (seed, face, character, render).",
        f"- Renders per face and character: train {cfg.renders}, val and test {cfg.eval_renders}. Seed {seed}.",
        ("- Split **by design**: no design (weights, regional cuts and derived fonts of one typeface) "
         "appears in two splits." if cfg.split == "design" else
         "- Split **by renders** (i.i.d.): every face is in train, val and test; train has renders "
         f"0–{cfg.renders - 1} of each face and character, val the next {cfg.eval_renders}, test the "
         f"{cfg.eval_renders} after (no render in two splits)."),
        "",
    ]
    for role, info in census["splits"].items():
        lines += [f"## {role}: {info['images']:,} images, designs {', '.join(info['designs'])}", "",
                  "| face | design | style | characters | file | Debian packages |", "|---|---|---|---|---|---|"]
        for f in info["faces"]:
            lines.append(f"| {f['name']} | {f['design']} | {f['style']} | {f['characters']} | "
                         f"`{f['file']}`#{f['index']} | {f['packages'] or '—'} |")
        lines.append("")
    if census["blank_glyphs"]:
        lines += ["## Glyphs mapped but empty (skipped)", ""]
        lines += [f"- {name}: {chars_}" for name, chars_ in census["blank_glyphs"].items()]
        lines.append("")
    return "\n".join(lines)
