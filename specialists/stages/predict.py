"""``specialists predict``: the ensemble's top-1 class for every image of an input, as JSONL or CSV.

Inputs (``--input``):

* ``shards:DIR[:split]``: a prepared shard directory, every split or one; an image is named
  ``split/key``.
* ``list:FILE``: a text file with one image path per line (blank lines and ``#`` comments
  skipped; relative paths are relative to FILE's folder); an image is named as written.
* ``DIR``: every .png/.jpg/.jpeg under DIR, recursively, sorted; named ``DIR/relative/path``.

Images go through the evaluation transform of training (:func:`specialists.data.build_transform`
with ``train=False``, then :func:`normalize`). An image that cannot be read is named in a
warning and skipped; the run goes on and reports how many were skipped.

``--predictor`` names what answers (:func:`select_predictor`): ``ensemble``, ``generalist``, a
control or a student; ``--package PKG`` reads an exported package instead of a run's config. The
Python API (:mod:`specialists.api`) loads its predictors and decodes images with the same functions.

Under ``accelerate launch`` process r predicts the r-th share (every P-th file, or every P-th
shard) and writes its rows to ``.<output>.parts/`` next to the output; the main process merges
them into ONE output holding every readable input exactly once, in input order (sorted paths,
list order, or shard order), written atomically. The parts folder must be on a file system
all processes see (as the run directory is).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import shutil
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from accelerate.utils import gather_object
from PIL import Image

from inference import EnsembleEngine, EnsemblePrediction

from ..artifacts.package import Package, read_package
from ..artifacts.shard_index import ShardIndex
from ..config import RunConfig
from ..context import make_accelerator
from ..data.pipeline import IMAGE_KEYS, build_transform, normalize
from ..ensemble import LoadedEnsemble, load_ensemble, load_predictors
from ..errors import UserError
from ..io import atomic_write
from ..layout import RunLayout
from ..progress import progress

log = logging.getLogger(__name__)

NAME = "predict"
HELP = "the ensemble's top-1 class for every image (works under accelerate launch)"
DESCRIPTION = ("Batched top-1 of the ensemble over shards:DIR[:split], list:FILE (one image path per line) or an "
               "image folder (.png/.jpg/.jpeg, recursive). Writes one JSON line per image {input, class, name, prob, "
               "generalist_class}, or CSV (input,class,name,prob) for an output ending in .csv. Unreadable images "
               "are named and skipped. --predictor picks another predictor of the run: generalist, a control or a "
               "distilled student (their rows have no generalist_class). --package PKG (from `specialists export`) "
               "replaces --config: the package holds every setting.")
USES_CONFIG = "optional"  # --config, or --package instead (which then switches the config off: _PackageAction)
PREDICTOR_NAMES = "generalist, ensemble, control, control-x<K>, control-x<K>-mean or student[:NAME]"


class _PackageAction(argparse.Action):
    """``--package PKG``: the CLI then loads no config (and locks no run directory); the package has it all."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.uses_config = False  # read by specialists.cli after parsing (set_defaults ran before)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="DIR | list:FILE | shards:DIR[:split]")
    p.add_argument("--output", required=True, help="predictions file: .jsonl (default) or .csv")
    p.add_argument("--predictor", default="ensemble",
                   help=f"{PREDICTOR_NAMES} (default ensemble; a student's NAME defaults to distill.name, "
                        "else distill.teacher)")
    p.add_argument("--package", metavar="PKG", action=_PackageAction,
                   help="an exported package (specialists export) instead of --config")


def command(cfg: RunConfig | None, args: argparse.Namespace) -> int:
    package = None
    if args.package is not None:
        if args.config is not None or args.overrides:
            raise UserError("--package PKG holds every setting: give it without --config or --set")
        package = read_package(args.package)
        cfg = package.config()
    elif args.config is None:
        raise UserError("predict needs --config (a run's config) or --package PKG (from `specialists export`)")
    result = run(cfg, args.input, args.output, predictor=args.predictor, package=package)
    if result is not None:  # the main process
        print(f"{result.num_predicted} predictions written to {result.output} ({result.world_size} process(es)); "
              f"{len(result.skipped)} unreadable image(s) skipped")
    return 0

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CSV_HEADER = ["input", "class", "name", "prob"]

Order = tuple[int, ...]  # where an image sits in the input: (file index,) or (shard index, position)


@dataclass(frozen=True)
class FileInput:
    """Image files: ``names`` as reported, ``paths`` to open (same order = input order)."""

    names: list[str]
    paths: list[Path]


@dataclass(frozen=True)
class ShardInput:
    """Shards of a prepared directory: (url, split, count) in input order."""

    shards: list[tuple[str, str, int]]


@dataclass(frozen=True)
class PredictResult:
    output: Path
    num_predicted: int
    skipped: list[str]  # names of unreadable images
    world_size: int


# ----------------------------------------------------------------------------------- inputs
def parse_input(spec: str) -> FileInput | ShardInput:
    """``shards:DIR[:split]``, ``list:FILE`` or a folder → what to read (errors name the input)."""
    if spec.startswith("shards:"):
        rest = spec[len("shards:"):]
        root, split = rest, None
        head, _, tail = rest.rpartition(":")
        if head and tail and not Path(rest).is_dir():
            root, split = head, tail
        index = ShardIndex.load(root)
        splits = [split] if split else index.splits
        if split and split not in index.splits:
            raise UserError(f"{root}: no {split!r} split (have: {', '.join(index.splits)})")
        return ShardInput([(url, s, n) for s in splits for url, n in index.shards(s)])
    if spec.startswith("list:"):
        path = Path(spec[len("list:"):])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"{path}: list file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read the list file ({exc})") from None
        names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not names:
            raise UserError(f"{path}: the list names no images")
        return FileInput(names, [path.parent / n for n in names])
    folder = Path(spec)
    if not folder.is_dir():
        raise UserError(f"{spec}: not a directory (expected DIR, list:FILE or shards:DIR[:split])")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"{spec}: no {'/'.join(IMAGE_SUFFIXES)} images under this directory")
    return FileInput([str(p) for p in paths], paths)


def decode_image(data: bytes | Path, channels: int) -> torch.Tensor:
    """Encoded image bytes or a file → uint8 (channels, H, W)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as img:
        img.load()
        return image_to_tensor(img, channels)


def image_to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    """A PIL image → uint8 (channels, H, W): greyscale for one channel, else RGB."""
    array = torch.from_numpy(np.array(img.convert("L" if channels == 1 else "RGB")))
    return array[None] if array.ndim == 2 else array.permute(2, 0, 1)


Sample = tuple[Order, str, torch.Tensor | None, str | None]  # order, name, image (or None), error


def _load(data: bytes | Path, channels: int, transform: Callable) -> tuple[torch.Tensor | None, str | None]:
    """(uint8 image, None), or (None, why) for an image that cannot be read."""
    try:
        return transform(decode_image(data, channels)), None
    except Exception as exc:  # an unreadable image must never stop the run
        return None, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


class _Files(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[int, str, Path]], channels: int, transform: Callable) -> None:
        self.items, self.channels, self.transform = items, channels, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        k, name, path = self.items[i]
        image, error = _load(path, self.channels, self.transform)
        return (k,), name, image, error


def _numbered(shard_pos: dict[str, tuple[int, str]], channels: int, transform: Callable):
    """WebDataset stage: raw samples → (order, "split/key", image, error)."""

    def stage(src: Iterator[dict]) -> Iterator[Sample]:
        position: dict[str, int] = {}
        for sample in src:
            url = sample["__url__"]
            i = position.get(url, 0)
            position[url] = i + 1
            shard, split = shard_pos[url]
            name = f"{split}/{sample['__key__']}"
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                yield (shard, i), name, None, "no .png/.jpg image in the sample"
                continue
            image, error = _load(sample[key], channels, transform)
            yield (shard, i), name, image, error

    return stage


def _collate(samples: list[Sample]):
    good = [s for s in samples if s[2] is not None]
    images = torch.stack([s[2] for s in good]) if good else None
    return [s[0] for s in good], [s[1] for s in good], images, [(s[1], s[3]) for s in samples if s[2] is None]


def _batches(source: FileInput | ShardInput, cfg: RunConfig, rank: int, world: int, batch_size: int):
    """This rank's share as batches of (orders, names, uint8 images or None, [(name, error)]); and their count."""
    transform = build_transform(cfg.data, train=False)
    channels = cfg.data.channels
    if isinstance(source, FileInput):
        items = [(k, source.names[k], source.paths[k]) for k in range(rank, len(source.paths), world)]
        if not items:
            return [], 0
        dataset = _Files(items, channels, transform)
        workers = min(cfg.data.num_workers, len(items))
        count = math.ceil(len(items) / batch_size)
    else:
        mine = [(k, *source.shards[k]) for k in range(rank, len(source.shards), world)]
        if not mine:
            return [], 0
        shard_pos = {url: (k, split) for k, url, split, _ in mine}
        dataset = wds.WebDataset([url for _, url, _, _ in mine], shardshuffle=False, nodesplitter=None,
                                 workersplitter=wds.split_by_worker, empty_check=False)
        dataset = dataset.compose(_numbered(shard_pos, channels, transform))
        workers = min(cfg.data.num_workers, len(mine))
        count = sum(math.ceil(n / batch_size) for *_, n in mine) if workers <= 1 else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    return loader, count


# ---------------------------------------------------------------------------------- the stage
class GeneralistPredictor:
    """The engine's generalist alone, with the engine's ``predict`` interface: q = pᵍ, no specialist active."""

    def __init__(self, engine: EnsembleEngine) -> None:
        self.engine = engine
        self.device = engine.device

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, *, return_q: bool = False, top_k: int | None = None,
                **_: object) -> EnsemblePrediction:
        p_general = self.engine.general_probs(images)  # (B, C)
        g_prob, g_top = p_general.max(dim=1)  # the first maximum, as the engine's general_top1
        probs, idx = p_general.topk(top_k or 1, dim=1)
        empty = torch.zeros((len(p_general), 0), dtype=torch.bool, device=p_general.device)
        return EnsemblePrediction(top1=g_top, top1_prob=g_prob, general_top1=g_top, general_top1_prob=g_prob,
                                  active=empty, q=p_general if return_q else None,
                                  p_general=p_general if return_q else None,
                                  topk_indices=idx if top_k is not None else None,
                                  topk_probs=probs if top_k is not None else None)


def select_predictor(cfg: RunConfig, loaded: LoadedEnsemble, spec: str) -> tuple[str, Any]:
    """``--predictor spec`` → (its full name, e.g. ``student:NAME``; the engine-like predictor)."""
    if spec == "ensemble":
        return spec, loaded.engine
    if spec == "generalist":
        return spec, GeneralistPredictor(loaded.engine)
    kind, _, name = spec.partition(":")
    if kind == "student":
        spec = f"student:{name or cfg.distill.name or cfg.distill.teacher}"
    elif not spec.startswith("control"):
        raise UserError(f"--predictor {spec!r}: expected {PREDICTOR_NAMES}")
    predictors = load_predictors(cfg, loaded, controls=True)
    if spec not in predictors:
        what = f"student {spec.partition(':')[2]!r}" if kind == "student" else f"control {spec!r}"
        stage = "distill" if kind == "student" else "train-control"
        have = ", ".join(["generalist", *predictors])
        raise UserError(f"--predictor {spec!r}: no finished {what} in {RunLayout(cfg.run_dir).root} "
                        f"(have: {have}); run `specialists {stage}` first")
    return spec, predictors[spec]


def open_predictor(cfg: RunConfig, device: str | torch.device, spec: str, *,
                   package: Package | None = None) -> tuple[LoadedEnsemble, str, Any]:
    """The run's (or package's) ensemble and the predictor ``spec`` names (see :func:`select_predictor`)."""
    loaded = load_ensemble(cfg, device)
    if package is not None:
        engine = loaded.engine
        package.check_applied(loaded.ids, engine.dustbin_biases, engine.temperatures)
    name, model = select_predictor(cfg, loaded, spec)
    return loaded, name, model


def run(cfg: RunConfig, input_spec: str, output: str | Path, *, predictor: str = "ensemble",
        package: Package | None = None) -> PredictResult | None:
    """Predict every image of ``input_spec`` and write ``output`` (.csv → CSV, else JSONL).

    ``package``: the package ``cfg`` came from (its recorded corrections are checked against the engine).
    The main process returns what it wrote; other processes return None.
    """
    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output {output}: is a directory; expected a file name ending in .jsonl or .csv")
    source = parse_input(input_spec)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    loaded, _, model = open_predictor(cfg, accelerator.device, predictor, package=package)
    names = loaded.class_names
    parts = output.parent / f".{output.name}.parts"
    if accelerator.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    accelerator.wait_for_everyone()
    loader, count = _batches(source, cfg, rank, world, cfg.inference.batch_size)
    skipped: list[str] = []
    with open(parts / f"rank-{rank:05d}.jsonl", "w", encoding="utf-8") as part:
        bar = progress(loader, main_process=accelerator.is_main_process, total=count, desc="predict", unit="batch")
        for orders, batch_names, images, failures in bar:
            for name, error in failures:
                log.warning("skipped unreadable image %s (%s)", name, error)
                skipped.append(name)
            if images is None:
                continue
            pred = model.predict(normalize(images.to(accelerator.device), cfg.data))
            rows = zip(orders, batch_names, pred.top1.tolist(), pred.top1_prob.tolist(), pred.general_top1.tolist(),
                       strict=True)
            for order, name, c, prob, g in rows:
                record = {"input": name, "class": c, "name": names[c], "prob": prob}
                if model is loaded.engine:
                    record["generalist_class"] = g
                part.write(json.dumps([list(order), record], ensure_ascii=False) + "\n")
    skipped = gather_object(skipped)
    accelerator.wait_for_everyone()
    result = None
    if accelerator.is_main_process:
        try:
            count = _merge(parts, world, output)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
        result = PredictResult(output, count, sorted(skipped), world)
    accelerator.wait_for_everyone()
    return result


def _merge(parts: Path, world: int, output: Path) -> int:
    """Write every rank's rows into ``output`` in input order; returns how many.

    Memory: the input position and file offset of every row (a few ints each), never the rows:
    each row is read back from its part file when its turn comes.
    """
    paths = [parts / f"rank-{r:05d}.jsonl" for r in range(world)]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: missing; the output's folder must be on a file system every process sees")
    keys, where = array("q"), array("q")  # flat: the order key and (rank, byte offset) of every row
    width = 1
    for rank, path in enumerate(paths):
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                key = json.loads(line)[0]
                width = len(key)
                keys.extend(key)
                where.extend((rank, offset))
                offset += len(line)
    if not where:
        _write_output(output, iter(()))
        return 0
    key_rows = np.frombuffer(keys, dtype=np.int64).reshape(-1, width)
    located = np.frombuffer(where, dtype=np.int64).reshape(-1, 2)[np.lexsort(key_rows.T[::-1])]
    del keys, where, key_rows
    files = [open(path, "rb") for path in paths]

    def rows() -> Iterator[dict[str, Any]]:
        for rank, offset in located.tolist():
            files[rank].seek(offset)
            yield json.loads(files[rank].readline())[1]

    try:
        _write_output(output, rows())
    finally:
        for f in files:
            f.close()
    return len(located)


def _write_output(output: Path, records: Iterator[dict[str, Any]]) -> None:
    """JSONL (one object per image) or, for a .csv name, CSV with header input,class,name,prob; atomically."""

    def write(f) -> None:
        if output.suffix.lower() == ".csv":
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            for r in records:
                writer.writerow([r[k] for k in CSV_HEADER])
        else:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(output, write, text=True)
