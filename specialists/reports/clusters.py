"""The clustering's inspection report of a run, from what ``cluster`` wrote.

Reads the cluster stage's config copy (or the generalist's), ``clusters.json``, the covariance
and the sparse confusion counts, takes a few example images per class from the by-class shards,
and calls :func:`clustering.write_report` → the run's ``report/index.html``.

Example images: the by-class shards hold the train split sorted by class, and
the index says which shards hold a class, so only those are opened; local tar
files are walked header by header (tarfile seeks over the data) and only the
images still wanted are read, so a class costs a few reads, not a scan of the
data set.

Confusion: ``write_report`` takes a dense (C, C) matrix. It is built from the
sparse counts up to ``DENSE_CONFUSION_MAX`` classes (int64: 134 MB at 4,096);
above that the report is written without it (the overall error share is in
clusters.json "quality" either way).
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from clustering import write_report

from ..artifacts.clusters import load_clusters, read_confusion, read_covariance
from ..artifacts.shard_index import ShardIndex
from ..config import RunConfig, load_config
from ..data.pipeline import IMAGE_KEYS
from ..errors import UserError
from ..layout import RunLayout

log = logging.getLogger(__name__)

DENSE_CONFUSION_MAX = 4096
EXAMPLES_PER_CLASS = 4
EXAMPLE_SIZE = 48  # examples are fitted to at most this many pixels a side (the report shows 48 px)


def run_config(run_dir: str | Path) -> RunConfig:
    """The config a run was made with: the cluster stage's copy, else the generalist's."""
    layout = RunLayout(run_dir)
    for path in (layout.cluster_config, layout.generalist.config):
        if path.is_file():
            return load_config(path)
    raise UserError(f"{layout.root}: no cluster or generalist config.yaml in it; is this a run directory? "
                    "run `specialists cluster` first")


def write_run_report(run_dir: str | Path) -> Path:
    """Write the run's clustering report from the cluster stage's outputs; returns the path of index.html."""
    layout = RunLayout(run_dir)
    if not layout.root.is_dir():
        raise UserError(f"{layout.root}: no such run directory")
    cfg = run_config(layout.root)
    index = ShardIndex.load(cfg.data.shards)
    clusters = load_clusters(layout.clusters, index.class_names)
    c = clusters.num_classes
    cov = read_covariance(layout.covariance, c)
    confusion = None
    if c <= DENSE_CONFUSION_MAX:
        confusion = read_confusion(layout.confusion, c)
    else:
        log.info("%d classes: report written without the confusion matrix (more than %d)", c, DENSE_CONFUSION_MAX)
    wanted = sorted({i for s in clusters.sets for i in s})
    size = min(EXAMPLE_SIZE, cfg.data.image_size)
    examples = read_examples(index, wanted, per_class=EXAMPLES_PER_CLASS, size=size, channels=cfg.data.channels)
    quality = {k: round(v, 4) if isinstance(v, float) else v for k, v in (clusters.quality or {}).items()}
    method = {**clusters.method, "quality": quality}
    return write_report(layout.report_dir, cov=cov, class_names=clusters.class_names, class_sets=clusters.sets,
                        examples=examples, confusion=confusion, method=method, links=evaluation_links(layout),
                        keep=evaluation_files(layout))


def evaluation_links(layout: RunLayout) -> list[tuple[str, str]]:
    """(text, href) of the run's evaluation reports, for the top of the clustering report's index."""
    return [(f"Evaluation on the {split} split", page.name) for split, page in layout.evaluation_reports().items()]


def evaluation_files(layout: RunLayout) -> list[str]:
    """Names (in the report folder) of the evaluation reports' files: kept when the clustering report is rewritten."""
    return [name for split in layout.evaluation_reports()
            for name in (layout.evaluation_report(split).name, layout.evaluation_assets(split).name)]


def read_examples(index: ShardIndex, classes: Sequence[int], *, per_class: int, size: int,
                  channels: int) -> dict[int, np.ndarray]:
    """Up to ``per_class`` uint8 images (n, size, size[, 3]) of each class, from the by-class shards.

    Falls back to the val split's shards when the data has no by-class shards.
    """
    wanted = {int(i): per_class for i in classes}
    if "byclass" in index.meta:
        urls = [url for url, _ in index.byclass_shards(sorted(wanted))]
    else:
        urls = [url for url, _ in index.shards("val" if "val" in index.splits else index.splits[0])]
    mode = "L" if channels == 1 else "RGB"
    found: dict[int, list[np.ndarray]] = {}
    for url in urls:
        for label, data in _samples(url, wanted):
            with Image.open(io.BytesIO(data)) as img:
                img = ImageOps.fit(img.convert(mode), (size, size))
            found.setdefault(label, []).append(np.asarray(img, dtype=np.uint8))
        if not wanted:
            break
    return {i: np.stack(images) for i, images in found.items()}


def _samples(url: str, wanted: dict[int, int]) -> Iterator[tuple[int, bytes]]:
    """(label, image bytes) of samples whose class is still in ``wanted`` (decremented as they come)."""
    if not Path(url).is_file():
        yield from _samples_streamed(url, wanted)
        return
    try:
        with tarfile.open(url, "r:") as tar:
            label = key = None
            for member in tar:  # headers only: tarfile seeks over the data it is not asked for
                stem, _, ext = member.name.rpartition(".")
                if ext == "cls":
                    key = stem
                    label = int(tar.extractfile(member).read())
                elif ext.lower() in IMAGE_KEYS and stem == key and wanted.get(label, 0) > 0:
                    wanted[label] -= 1
                    if wanted[label] == 0:
                        del wanted[label]
                    yield label, tar.extractfile(member).read()
                    if not wanted:
                        return
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise UserError(f"{url}: cannot read example images ({exc})") from None


def _samples_streamed(url: str, wanted: dict[int, int]) -> Iterator[tuple[int, bytes]]:
    """The same for shards that are not local files (anything webdataset opens)."""
    import webdataset as wds

    for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
        label = int(sample["cls"])
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is not None and wanted.get(label, 0) > 0:
            wanted[label] -= 1
            if wanted[label] == 0:
                del wanted[label]
            yield label, data
            if not wanted:
                return
