"""The enriched stream a specialist trains on (section 5.2).

Every batch holds ``round(f · B)`` samples of the specialist's classes Sᵐ and the rest
from the other classes, each part in its natural proportions. The special part is read
from the *by-class* shards that hold Sᵐ, so a specialist never scans the data set for
its classes: one small stream per class (by-class shards are sorted by class, so a
single stream would serve one class at a time) that reads only the byte range of its
class's tar members, each sample's class drawn with the train split's class frequencies. The rest is read from the shuffled train shards with
Sᵐ filtered out on the raw label, before any image is decoded. Every stream cycles
forever with a reshuffle per pass; the caller takes as many batches as it trains for.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from ..artifacts.shard_index import ShardIndex
from ..config import DataConfig
from ..errors import DataError
from .pipeline import ToExample, _decode_pil, _raise_data_error, build_transform, own_rng


@dataclass
class StreamStats:
    """Samples read from the shards (before the label filter) and used in batches, per part."""

    read_special: int = 0
    read_rest: int = 0
    used: int = 0

    @property
    def read(self) -> int:
        return self.read_special + self.read_rest


def _cycle_shards(urls: list[str], rng: random.Random) -> Iterator[dict]:
    """Shard URLs forever, reshuffled on every pass (this worker's share, or all of them)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and len(urls) >= info.num_workers:
        urls = urls[info.id :: info.num_workers]
    while True:
        order = list(urls)
        rng.shuffle(order)
        for url in order:
            yield {"url": url}


def _cycle_ranges(ranges: list[tuple[str, int, int, int]], rng: random.Random) -> Iterator[dict]:
    """One class's byte ranges of tar members forever, as in-memory tar streams."""
    while True:
        order = list(ranges)
        rng.shuffle(order)
        for url, _, start, end in order:
            with open(url, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            if len(data) != end - start:
                raise DataError(f"{url}: shorter than the by-class range {start}:{end} in index.json; re-run prepare")
            yield {"url": f"{url}#{start}:{end}", "stream": io.BytesIO(data)}


def _counting_select(keep: set[int] | None, drop: set[int] | None, stats: StreamStats, part: str) -> Callable:
    def stage(src):
        for sample in src:
            setattr(stats, part, getattr(stats, part) + 1)
            label = int(sample["cls"])
            if (keep is None or label in keep) and (drop is None or label not in drop):
                yield sample

    return stage


def _tar_samples(streams: Iterator[dict]) -> Iterator[dict]:
    """Samples of opened tar streams ({"url", "stream"} dicts), grouped by key."""
    return group_by_keys(tar_file_expander(streams, handler=_raise_data_error), handler=_raise_data_error)


def _pipeline(samples: Callable[[], Iterator[dict]], select: Callable, example: ToExample, buffer: int,
              initial: int, rng: random.Random) -> Iterator:
    return iter(wds.DataPipeline(
        samples,
        select,
        wds.shuffle(buffer, initial=initial, rng=rng),
        wds.decode(_decode_pil, handler=_raise_data_error),
        wds.map(example),
    ))


def _shard_samples(urls: list[str], rng: random.Random) -> Callable[[], Iterator[dict]]:
    return lambda: _tar_samples(url_opener(_cycle_shards(urls, rng), handler=_raise_data_error))


def _range_samples(ranges: list[tuple[str, int, int, int]], rng: random.Random) -> Callable[[], Iterator[dict]]:
    return lambda: _tar_samples(_cycle_ranges(ranges, rng))


class EnrichedStream(torch.utils.data.IterableDataset):
    """Endless ``(images uint8 (B, C, S, S), labels (B,), special (B,) bool)`` batches.

    Labels are the generalist's class indices (map them with
    :func:`specialists.surgery.map_labels`); ``special`` marks the Sᵐ part of the batch.
    """

    def __init__(self, index: ShardIndex, data_cfg: DataConfig, classes: Sequence[int], *,
                 special_fraction: float, batch_size: int, seed: int, transform: Callable | None = None) -> None:
        if not 0.0 < special_fraction < 1.0:
            raise ValueError(f"special_fraction={special_fraction}: expected a value in (0, 1)")
        self.classes = sorted({int(c) for c in classes})
        if not self.classes or self.classes[0] < 0 or self.classes[-1] >= index.num_classes:
            raise DataError(f"{index.root}: class set {list(classes)[:5]}… has classes outside 0..{index.num_classes - 1}")
        if len(self.classes) == index.num_classes:
            raise DataError(f"{index.root}: the class set covers every class; nothing is left for the dustbin")
        counts = index.class_counts("train")
        if counts[self.classes].sum() == 0:
            raise DataError(f"{index.root}: no training samples of the classes {self.classes[:5]}…")
        self.index = index
        self.class_urls = {c: [url for url, _ in index.byclass_shards([c])] for c in self.classes}
        self.class_weights = [float(counts[c]) for c in self.classes]
        self.rest_urls = [url for url, _ in index.shards("train")]
        self.num_special = round(special_fraction * batch_size)
        self.batch_size = batch_size
        self.seed = seed
        self.buffer = max(1, data_cfg.shuffle_buffer)
        self.example = ToExample(transform or build_transform(data_cfg, train=True), index.num_classes, data_cfg.channels)
        self.stats = StreamStats()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(hash((self.seed, worker, 5)))
        special_set = set(self.classes)
        per_class_buffer = max(1, min(self.buffer, 256))
        special = {}
        for c, urls in self.class_urls.items():
            select = _counting_select({c}, None, self.stats, "read_special")
            ranges = self.index.byclass_ranges(c)
            if ranges is None:  # shards prepared before byte ranges were recorded: scan and filter
                special[c] = _pipeline(_shard_samples(urls, rng), select, self.example, per_class_buffer,
                                       min(per_class_buffer, 100), rng)
            else:
                buffer = max(1, min(per_class_buffer, sum(n for _, n, _, _ in ranges)))
                special[c] = _pipeline(_range_samples(ranges, rng), select, self.example, buffer, buffer, rng)
        rest = _pipeline(_shard_samples(self.rest_urls, rng), _counting_select(None, special_set, self.stats, "read_rest"),
                         self.example, self.buffer, min(self.buffer, 100), rng)
        flags = torch.zeros(self.batch_size, dtype=torch.bool)
        flags[: self.num_special] = True
        while True:
            drawn = rng.choices(self.classes, weights=self.class_weights, k=self.num_special)
            samples = [next(special[c]) for c in drawn]
            samples += [next(rest) for _ in range(self.batch_size - self.num_special)]
            self.stats.used += len(samples)
            images = torch.stack([s[0] for s in samples])
            labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
            yield images, labels, flags.clone()


def enriched_batches(stream: EnrichedStream, num_workers: int, seed: int) -> Iterator:
    """The stream's batches through a DataLoader (``num_workers`` processes); with none, the
    main process reads it on an RNG of its own (:func:`own_rng`), as a worker would."""
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, generator=generator,
                                         persistent_workers=False, prefetch_factor=4 if num_workers else None)
    return iter(loader) if num_workers else own_rng(iter(loader), seed)
