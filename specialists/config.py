"""Run configuration: one YAML file describes a whole run (see configs/).

Frozen dataclasses (nanoGPT's ``GPTConfig`` style) loaded from YAML and then
overridden from the command line with ``--set section.key=value`` (timm's
two-stage ``--config``). An unknown key or a value of the wrong type is a
:class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class SyntheticConfig:
    """Options of the synthetic generator (``data.source: synthetic``)."""

    num_classes: int = 20
    group_size: int = 4  # planted groups of confusable classes share a base pattern
    train_per_class: int = 100
    val_per_class: int = 20
    test_per_class: int = 20
    image_size: int = 28
    detail_strength: float = 0.35  # how visible the per-class detail is (smaller = harder)


@dataclass(frozen=True)
class TypefacesConfig:
    """Options of the rendered-characters source (``data.source: typefaces``)."""

    chars: str = "gb2312-1"  # gb2312-1 (3,755 level-1 hanzi) | file:PATH | the characters themselves
    num_classes: int | None = None  # a seeded subset of that many characters (quick runs)
    image_size: int = 32
    split: str = "design"  # design: val/test typefaces never train | renders: every face in every split (i.i.d.)
    renders: int = 2  # train renders per face and character
    eval_renders: int = 1  # val and test renders per face and character
    distortion: float = 1.0  # scales every augmentation amplitude (0: clean glyphs)
    supersample: int = 2  # render at this multiple of image_size, then reduce
    font_dirs: tuple[str, ...] = ("/usr/share/fonts",)
    val_designs: tuple[str, ...] = ("wqy-zenhei", "uming", "wenkai")
    test_designs: tuple[str, ...] = ("droid", "noto-serif", "ukai")
    exclude_designs: tuple[str, ...] = ()  # installed designs to leave out entirely
    workers: int = 0  # rendering processes (0: one per CPU)


@dataclass(frozen=True)
class DataConfig:
    source: str = "fashion-mnist"  # fashion-mnist[:DIR] | imagefolder:DIR | synthetic | typefaces
    shards: str = "data/fashion-mnist"  # prepared shard directory (holds index.json)
    split_seed: int = 0  # seed of the train/val split done by `prepare`
    shard_size: int = 1000  # samples per shard
    val_fraction: float = 0.0833333  # imagefolder without val/: part of train held out
    test_fraction: float = 0.0  # imagefolder without test/: part held out for test
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    typefaces: TypefacesConfig = field(default_factory=TypefacesConfig)
    image_size: int = 28  # model input size after transforms
    channels: int = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    augment: str = "crop-flip"  # none | crop (shift only) | crop-flip | random-resized-crop
    crop_padding: int = 2
    batch_size: int = 128  # per process
    eval_batch_size: int = 512
    num_workers: int = 2
    shuffle_buffer: int = 2000


@dataclass(frozen=True)
class GeneralistConfig:
    arch: str = "compact_cnn"
    width: int = 64  # compact_cnn / glyph_cnn base width
    hidden: int = 512  # glyph_cnn hidden layer before the classifier
    dropout: float = 0.0
    epochs: int = 10
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # for a batch of 128 summed over processes and accumulation
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    channels_last: bool = False
    checkpoint_every: int = 500  # optimizer steps; checkpoints also at every epoch end
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class ClusteringConfig:
    split: str = "val"  # split the generalist is run over (labels unused)
    num_specialists: int = 2
    classes_per_specialist: int | None = None  # None: disjoint k-means clusters
    coverage: int | None = None  # instead of classes_per_specialist: every class in this many sets
    method: str = "faiss"  # faiss | minibatch | random (the ablation: seeded sets of the same sizes and coverage)
    columns: str = "correlation"  # raw | zero_diagonal | correlation (see docs/clustering-notes.md)
    normalize: bool = True  # unit-length columns before k-means
    top_k: int | None = None  # keep each image's k largest probabilities (large C)
    n_init: int = 5
    max_iter: int = 50
    max_dim: int = 512  # random projection of the columns above this many classes
    batch_size: int = 512


@dataclass(frozen=True)
class SpecialistsConfig:
    head: str = "dustbin"  # dustbin | full
    special_fraction: float = 0.5  # f: share of each batch drawn from the specialist's classes
    bias: str = "prior"  # prior | fit (all of val) | routed (val images routed to it) | none
    steps: int = 500
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    soft_target_weight: float = 0.0  # weight of the generalist's soft targets (section 6.1)
    temperature: float = 2.0  # soft-target temperature T (loss scaled by T^2)
    eval_every: int = 100
    checkpoint_every: int = 100  # optimizer steps (0: none until the end)


@dataclass(frozen=True)
class InferenceConfig:
    top_n: int = 1  # generalist's top-n classes used for routing
    bias: str = "trained"  # dustbin correction at inference: trained (sidecar) | prior | fit | routed | none
    solver: str = "em"  # em | gradient
    tol: float = 1e-7
    max_iter: int = 100
    batch_size: int = 512
    control: bool = False  # compute-matched control in `evaluate`


@dataclass(frozen=True)
class ControlConfig:
    """The compute-matched control (``inference.control``): the generalist fine-tuned on all classes
    for the specialists' total steps, with their optimiser and schedule."""

    lr: float | None = None  # None: specialists.lr (a fair rival chooses its own on val)
    # K > 1: a plain ensemble of K copies, each with its own seed (data order, augmentation) and
    # steps / K of the total; evaluate combines them with the generalist by the solver and by the mean
    copies: int = 1


@dataclass(frozen=True)
class DistillConfig:
    """A single student trained on a teacher's soft targets (section 2): ``alpha`` weighs the soft term
    T²·KL(teacher_T ‖ student_T), 1 − alpha the hard labels' cross-entropy."""

    enabled: bool = False  # a stage of `specialists run` (before evaluate, which then reports the student)
    teacher: str = "ensemble"  # ensemble (q of eq. 5, routed and solved) | generalist | none (hard labels only)
    name: str | None = None  # the student's folder and predictor name (default: the teacher)
    # chosen on val (docs/RESULTS.md): 0.3 of 0.3 … 0.9 at 1,000 classes i.i.d., narrow and wide students;
    # 0.5 of 0.5 / 0.9 on Fashion-MNIST. The paper weighs the soft term more; here less was always better.
    alpha: float = 0.3
    temperature: float = 2.0
    init: str = "generalist"  # generalist: its weights (same architecture) | scratch
    arch: str | None = None  # None: the generalist's architecture
    width: int | None = None  # None: the generalist's (compact_cnn / glyph_cnn)
    hidden: int | None = None  # None: the generalist's (glyph_cnn)
    epochs: int = 4
    optimizer: str = "sgd"
    lr: float = 0.01  # for a batch of 128 summed over processes
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    # The teacher's top-k per training view computed once, reused by every student on the same views.
    # Off by default: the first student pays for it and gains nothing; each later one skips the
    # teacher (measured in docs/RESULTS.md, "Distillation on Fashion-MNIST").
    teacher_cache: bool = False
    cache_top_k: int = 20  # classes kept per view in the cache (the rest split evenly, its softened total kept)
    # the rest's mass is also cached softened at each of these T; distill.temperature must be one of them
    cache_temperatures: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    checkpoint_every: int = 500


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers (plumbing: they decide no result). ``--log-with tensorboard`` sets log_with."""

    log_with: tuple[str, ...] = ()  # accelerate trackers: tensorboard, wandb, mlflow, …, or all (installed ones)
    every: int = 50  # optimiser steps between logged training points (loss, lr, images/s)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # shown in reports and logs
    run_dir: str = "runs/run"
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process; 0: auto (context.intra_op_threads)
    data: DataConfig = field(default_factory=DataConfig)
    generalist: GeneralistConfig = field(default_factory=GeneralistConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        key_where = f"{where}.{key}" if where else str(key)
        if key not in hints:
            raise ConfigError(f"{key_where}: unknown key (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], key_where)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"generalist.lr=0.05"`` → ``("generalist.lr", 0.05)`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: cannot parse value: {exc}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config from YAML and apply ``--set`` overrides.

    Errors name the file and the dotted key, e.g.
    ``configs/x.yaml: generalist.lr: expected float, got 'fast'``.
    """
    tree: dict[str, Any] = {}
    label = "<defaults>"
    if path is not None:
        label = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{label}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read config: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{label}: not valid YAML{at}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{label}: expected a mapping at the top level")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        config = _build(RunConfig, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    _check_values(config, label)
    return config


def _check_values(cfg: RunConfig, label: str) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{label}: {key}: {msg}")

    choices = {
        "data.augment": (cfg.data.augment, ("none", "crop", "crop-flip", "random-resized-crop")),
        "data.typefaces.split": (cfg.data.typefaces.split, ("design", "renders")),
        "generalist.optimizer": (cfg.generalist.optimizer, ("sgd", "adamw")),
        "generalist.mixed_precision": (cfg.generalist.mixed_precision, ("auto", "no", "fp16", "bf16")),
        "clustering.method": (cfg.clustering.method, ("faiss", "minibatch", "random")),
        "clustering.columns": (cfg.clustering.columns, ("raw", "zero_diagonal", "correlation")),
        "clustering.split": (cfg.clustering.split, ("train", "val", "test")),
        "specialists.head": (cfg.specialists.head, ("dustbin", "full")),
        "specialists.bias": (cfg.specialists.bias, ("prior", "fit", "routed", "none")),
        "specialists.optimizer": (cfg.specialists.optimizer, ("sgd", "adamw")),
        "inference.solver": (cfg.inference.solver, ("em", "gradient")),
        "inference.bias": (cfg.inference.bias, ("trained", "prior", "fit", "routed", "none")),
        "distill.teacher": (cfg.distill.teacher, ("ensemble", "generalist", "none")),
        "distill.init": (cfg.distill.init, ("generalist", "scratch")),
        "distill.optimizer": (cfg.distill.optimizer, ("sgd", "adamw")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            fail(key, f"expected one of {', '.join(allowed)}, got {value!r}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "data.shard_size": cfg.data.shard_size,
        "data.image_size": cfg.data.image_size,
        "data.channels": cfg.data.channels,
        "generalist.epochs": cfg.generalist.epochs,
        "generalist.grad_accum_steps": cfg.generalist.grad_accum_steps,
        "generalist.keep_checkpoints": cfg.generalist.keep_checkpoints,
        "clustering.num_specialists": cfg.clustering.num_specialists,
        "clustering.batch_size": cfg.clustering.batch_size,
        "control.copies": cfg.control.copies,
        "specialists.steps": cfg.specialists.steps,
        "specialists.eval_every": cfg.specialists.eval_every,
        "inference.top_n": cfg.inference.top_n,
        "inference.batch_size": cfg.inference.batch_size,
        "inference.max_iter": cfg.inference.max_iter,
        "distill.epochs": cfg.distill.epochs,
        "distill.cache_top_k": cfg.distill.cache_top_k,
        "tracking.every": cfg.tracking.every,
    }
    for key, value in positive.items():
        if value < 1:
            fail(key, f"expected a positive integer, got {value}")
    non_negative = {"threads": cfg.threads, "data.num_workers": cfg.data.num_workers,
                    "data.crop_padding": cfg.data.crop_padding,
                    "generalist.checkpoint_every": cfg.generalist.checkpoint_every,
                    "specialists.checkpoint_every": cfg.specialists.checkpoint_every,
                    "specialists.warmup_steps": cfg.specialists.warmup_steps, "data.shuffle_buffer": cfg.data.shuffle_buffer}
    for key, value in non_negative.items():
        if value < 0:
            fail(key, f"expected ≥ 0, got {value}")
    if len(cfg.data.mean) != cfg.data.channels or len(cfg.data.std) != cfg.data.channels:
        fail("data.mean/std", f"expected {cfg.data.channels} values each (data.channels)")
    if any(not s > 0 for s in cfg.data.std):
        fail("data.std", f"expected positive values (each image is divided by them), got {list(cfg.data.std)}")
    if not 0.0 < cfg.specialists.special_fraction < 1.0:
        fail("specialists.special_fraction", f"expected a value in (0, 1), got {cfg.specialists.special_fraction}")
    rates = {"generalist.lr": cfg.generalist.lr, "specialists.lr": cfg.specialists.lr, "distill.lr": cfg.distill.lr,
             "distill.temperature": cfg.distill.temperature,
             "specialists.temperature": cfg.specialists.temperature, "inference.tol": cfg.inference.tol}
    for key, value in rates.items():
        if not value > 0:
            fail(key, f"expected > 0, got {value}")
    fractions = {"specialists.soft_target_weight": cfg.specialists.soft_target_weight, "distill.alpha": cfg.distill.alpha,
                 "generalist.label_smoothing": cfg.generalist.label_smoothing,
                 "generalist.dropout": cfg.generalist.dropout}
    for key, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            fail(key, f"expected a value in [0, 1], got {value}")
    for key, value in (("generalist.warmup_epochs", cfg.generalist.warmup_epochs),
                       ("distill.warmup_epochs", cfg.distill.warmup_epochs),
                       ("distill.checkpoint_every", cfg.distill.checkpoint_every)):
        if value < 0:
            fail(key, f"expected ≥ 0, got {value}")
    d = cfg.distill
    if d.teacher_cache and not any(math.isclose(d.temperature, t) for t in d.cache_temperatures):
        fail("distill.temperature", f"expected one of distill.cache_temperatures {list(d.cache_temperatures)} "
             f"with distill.teacher_cache on, got {d.temperature:g} (add it there: a new cache is built)")
    if any(not t > 0 for t in d.cache_temperatures):
        fail("distill.cache_temperatures", f"expected values > 0, got {list(d.cache_temperatures)}")
    name = cfg.distill.name
    if cfg.control.lr is not None and not cfg.control.lr > 0:
        fail("control.lr", f"expected > 0 or null, got {cfg.control.lr}")
    if name is not None and (not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith(".")):
        fail("distill.name", f"expected a folder name of letters, digits, '-', '_' or '.', got {name!r}")


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
