"""Reading prepared shards: the WebDataset pipeline every stage uses.

Two kinds of epoch:

* **train** (:func:`train_batches`): shards shuffled per epoch (same order on
  every rank), split by node then by DataLoader worker, a shuffle buffer in each
  worker, augmentation, and a fixed number of batches per rank computed from the
  index — every rank runs the same number of steps, so DDP never hangs on
  uneven shards. With one process an epoch is an exact pass over the split.
* **eval** (:func:`eval_batches`): every sample of the split exactly once over
  all ranks; batches are padded to a fixed size with a ``valid`` mask so that
  they can be gathered across ranks and the padding dropped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from ..artifacts.shard_index import ShardIndex
from ..config import DataConfig
from ..errors import DataError

IMAGE_KEYS = ("png", "jpg", "jpeg")


def build_transform(cfg: DataConfig, *, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample geometry on uint8 (C, H, W) → uint8 (C, S, S); augmented when ``train``.

    Conversion to float and normalisation happen per batch (:func:`normalize`), on the
    device that trains: cheaper than per sample, and uint8 batches move 4× fewer bytes.
    """
    size = cfg.image_size
    steps: list = []
    if train and cfg.augment == "random-resized-crop":
        steps += [v2.RandomResizedCrop(size, antialias=True)]
    else:
        steps += [_FitSize(size)]
    if train and cfg.augment in ("crop", "crop-flip"):
        steps += [RandomShiftFlip(cfg.crop_padding, flip=cfg.augment == "crop-flip")]
    if train and cfg.augment == "random-resized-crop":
        steps += [v2.RandomHorizontalFlip()]
    return v2.Compose(steps)


class RandomShiftFlip(torch.nn.Module):
    """Zero-padded random crop (= a random shift of up to ``padding`` pixels) and a horizontal flip.

    Same distribution as ``RandomCrop(S, padding=p)`` + ``RandomHorizontalFlip()`` for S×S
    inputs, in one copy: about 10× cheaper per small image, which matters on a CPU.
    """

    def __init__(self, padding: int, flip: bool = True) -> None:
        super().__init__()
        self.padding = padding
        self.flip = flip  # off for glyphs: a mirrored character is another shape

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (C, H, W)
        p = self.padding
        dy, dx = torch.randint(-p, p + 1, (2,)).tolist()
        flip = self.flip and bool(torch.rand(()) < 0.5)
        h, w = image.shape[-2:]
        out = torch.zeros_like(image)
        out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
            image[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
        return out.flip(-1) if flip else out


class _FitSize(torch.nn.Module):
    """Resize the short side to ``size`` and centre-crop; a no-op for images already S×S."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] == (self.size, self.size):
            return image
        return self.resize(image)


def normalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (B, C, S, S) → float32 normalised with ``cfg.mean`` / ``cfg.std``, on the batch's device."""
    mean = torch.tensor(cfg.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _raise_data_error(exn: Exception) -> bool:
    """WebDataset handler: turn any read/decode failure into a one-line DataError naming the shard."""
    where = getattr(exn, "url", None)
    key = getattr(exn, "key", None)
    if where is None:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and (a.endswith(".tar") or "/" in a)), None)
    cause = exn.__cause__ or exn
    label = f"{where}" + (f" (sample {key})" if key else "")
    message = str(cause.args[0]) if cause.args else cause.__class__.__name__
    raise DataError(f"{label or 'shard'}: {cause.__class__.__name__}: {message}")


class ToExample:
    """Decoded sample dict → (image float tensor, label int), checking label and channels."""

    def __init__(self, transform: Callable, num_classes: int, channels: int) -> None:
        self.transform = transform
        self.num_classes = num_classes
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        where = f"{sample.get('__url__')} (sample {sample.get('__key__')})"
        if image is None:
            raise DataError(f"{where}: no .png/.jpg image in the sample")
        label = sample.get("cls")
        if not isinstance(label, int) or not 0 <= label < self.num_classes:
            raise DataError(f"{where}: label {label!r} outside classes.json (expected 0..{self.num_classes - 1})")
        array = np.asarray(image.convert(self.mode))
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return self.transform(tensor), label


def _decode_pil(key: str, data: bytes):
    if key.rsplit(".", 1)[-1].lower() not in IMAGE_KEYS:
        return None
    import io

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy()


def _worker_shuffle(bufsize: int, seed: tuple[int, ...]):
    """A shuffle buffer whose RNG depends on the DataLoader worker (reproducible, distinct)."""

    def stage(src):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(hash((*seed, info.id if info else 0)))
        return wds.filters._shuffle(src, bufsize, min(bufsize, 100), rng)

    return stage


def _dataset(urls: list[str], example: ToExample, batch_size: int, shuffle: Callable | None) -> wds.WebDataset:
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                        empty_check=False, handler=_raise_data_error)
    if shuffle is not None:
        ds = ds.compose(shuffle)
    return ds.decode(_decode_pil, handler=_raise_data_error).map(example).batched(batch_size, partial=True)


def _loader(ds, num_workers: int, seed: int) -> wds.WebLoader:
    generator = torch.Generator().manual_seed(seed)
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, generator=generator,
                         persistent_workers=False, prefetch_factor=4 if num_workers else None)


class Batches:
    """An iterable of batches with a known length (the same on every rank)."""

    def __init__(self, make_iter: Callable[[], Iterator], num_batches: int) -> None:
        self._make_iter = make_iter
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator:
        return self._make_iter()


def _batches_per_rank(shards: list[tuple[str, int]], batch_size: int, num_workers: int) -> int:
    """Batches a rank's loader yields: each DataLoader worker batches its own shards."""
    workers = max(1, min(num_workers, len(shards)))
    return sum(math.ceil(sum(n for _, n in shards[w::workers]) / batch_size) for w in range(workers))


def split_shards(shards: list[tuple[str, int]], rank: int, world_size: int) -> list[tuple[str, int]]:
    """This rank's shards (node split: every ``world_size``-th shard from ``rank``)."""
    return shards[rank::world_size]


def train_batches(
    index: ShardIndex,
    cfg: DataConfig,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    transform: Callable | None = None,
    multiple_of: int = 1,
) -> Batches:
    """One training epoch of uint8 ``(images (B, C, S, S), labels (B,))`` batches for this rank.

    Each DataLoader worker batches its own shards, so up to one partial batch per worker
    comes near the end; the count is known in advance from the index, and cut down to a
    multiple of ``multiple_of``.
    """
    shards = index.shards(split)
    if len(shards) < world_size:
        raise DataError(f"{index.root}: {split} has {len(shards)} shards but {world_size} processes; "
                        "re-run prepare with a smaller --shard-size")
    order = np.random.default_rng([seed, epoch, 3]).permutation(len(shards))
    shuffled = [shards[i] for i in order]
    bs = cfg.batch_size
    num_batches = min(_batches_per_rank(split_shards(shuffled, r, world_size), bs, cfg.num_workers)
                      for r in range(world_size))
    num_batches -= num_batches % multiple_of  # e.g. whole gradient-accumulation groups only
    mine = [url for url, _ in split_shards(shuffled, rank, world_size)]
    example = ToExample(transform or build_transform(cfg, train=True), index.num_classes, cfg.channels)
    shuffle = _worker_shuffle(cfg.shuffle_buffer, (seed, epoch, rank)) if cfg.shuffle_buffer > 1 else None

    def make_iter() -> Iterator:
        ds = _dataset(mine, example, bs, shuffle)
        workers = min(cfg.num_workers, len(mine))
        loader = _loader(ds, workers, seed=hash((seed, epoch, rank)) % 2**62)
        batches = iter(loader.slice(num_batches))
        return batches if workers else own_rng(batches, hash((seed, epoch, rank, 17)) % 2**62)

    return Batches(make_iter, num_batches)


def eval_batches(
    index: ShardIndex,
    cfg: DataConfig,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    transform: Callable | None = None,
) -> Batches:
    """Every sample of ``split`` exactly once across ranks, as uint8 ``(images, labels, valid)``.

    Batches have exactly ``batch_size`` rows; padding rows have ``valid == False``.
    Ranks with fewer samples yield all-padding batches so every rank has the same count.
    """
    shards = index.shards(split)
    bs = batch_size or cfg.eval_batch_size
    per_rank = [sum(n for _, n in split_shards(shards, r, world_size)) for r in range(world_size)]
    num_batches = max(_batches_per_rank(split_shards(shards, r, world_size), bs, cfg.num_workers)
                      for r in range(world_size))
    mine = [url for url, _ in split_shards(shards, rank, world_size)]
    expected = per_rank[rank]
    example = ToExample(transform or build_transform(cfg, train=False), index.num_classes, cfg.channels)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)

    def make_iter() -> Iterator:
        seen = 0
        produced = 0
        if mine:
            ds = _dataset(mine, example, bs, None)
            loader = _loader(ds, min(cfg.num_workers, len(mine)), seed=0)
            for images, labels in loader:
                n = len(labels)
                seen += n
                yield _pad(images, labels, bs)
                produced += 1
        if seen != expected:
            raise DataError(f"{index.root}: {split} shards of rank {rank} hold {seen} samples, index.json says {expected}")
        for _ in range(num_batches - produced):
            yield torch.zeros((bs, *shape), dtype=torch.uint8), torch.zeros(bs, dtype=torch.long), torch.zeros(bs, dtype=torch.bool)

    return Batches(make_iter, num_batches)


def own_rng(batches: Iterator, seed: int) -> Iterator:
    """Run a main-process pipeline's random transforms on an RNG of its own, as a DataLoader worker
    does: the data's draws and the training loop's (dropout) never interleave, so a resumed run that
    replays an epoch's first batches gets exactly the augmentations an uninterrupted run got."""
    state = torch.Generator().manual_seed(seed).get_state()
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            batch = next(batches, None)
            state = torch.get_rng_state()
        if batch is None:
            return
        yield batch


def _pad(images: torch.Tensor, labels: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = len(labels)
    labels = torch.as_tensor(labels, dtype=torch.long)
    valid = torch.ones(bs, dtype=torch.bool)
    if n < bs:
        images = torch.cat([images, images.new_zeros((bs - n, *images.shape[1:]))])
        labels = torch.cat([labels, labels.new_zeros(bs - n)])
        valid[n:] = False
    return images, labels, valid


def split_chunks(index: ShardIndex, cfg: DataConfig, split: str, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A split streamed as uint8 images (n, C, S, S) and labels (n,) in pieces of exactly ``size``
    rows (the last one shorter), in the order of :func:`load_split`, whatever the loader's batches.

    Fixed pieces make per-row model outputs the same as over the split held whole in ``size``-row
    batches (a batch's size can change a kernel's float order); memory holds about two pieces.
    """
    held_x: list[torch.Tensor] = []
    held_y: list[torch.Tensor] = []
    count = 0
    for x, y, valid in eval_batches(index, cfg, split):
        held_x.append(x[valid])
        held_y.append(y[valid])
        count += int(valid.sum())
        while count >= size:
            xs, ys = torch.cat(held_x), torch.cat(held_y)
            yield xs[:size], ys[:size]
            held_x, held_y, count = [xs[size:]], [ys[size:]], count - size
    if count:
        yield torch.cat(held_x), torch.cat(held_y)


def load_split(index: ShardIndex, cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split in memory: uint8 images (N, C, S, S) and labels (N,), in shard order."""
    images, labels = [], []
    for x, y, valid in eval_batches(index, cfg, split):
        images.append(x[valid])
        labels.append(y[valid])
    return torch.cat(images), torch.cat(labels)
